//! The status page's operator views in a real headless browser, against a stack with
//! authentication on: live per-route charts after traffic, the nodes' figures, the subscribers
//! with a kick button that really ends a stream, the kv browser, and the logs section (which an
//! older gateway without `/_/logs` leaves empty without breaking the page). A screenshot of what
//! the test saw is written to `target/tmp/status-page/` (cargo's folder for tests' output).

use std::path::Path;

use e2e::{browser, sse::EventStream, Checks, Stack, StackOptions};
use serde_json::Value;

#[tokio::test]
async fn the_status_page_charts_traffic_and_kicks_a_subscriber() {
    let Some(chromium) = browser::chromium_for_test() else {
        return;
    };
    let stack = Stack::start(StackOptions::default()).await;
    let mut checks = Checks::new("status page figures in headless chromium");
    let secrets = stack.secrets.as_ref().expect("authentication is on");

    // Traffic before the page opens: writes, reads, and a read of a missing key (a 404 is an
    // answer, not an error).
    for i in 0..20 {
        let put = stack
            .http
            .put(stack.url(&format!("/kv/page/key{i}")))
            .body(format!("value {i}"))
            .send()
            .await
            .unwrap();
        assert!(put.status().is_success());
        let get = stack
            .http
            .get(stack.url(&format!("/kv/page/key{i}")))
            .send()
            .await
            .unwrap();
        assert!(get.status().is_success());
    }

    let mut page = browser::Browser::open(
        chromium,
        &stack.url(&format!("/#access_token={}", secrets.admin_token)),
    )
    .await
    .unwrap();
    page.wait_until("location.protocol === 'http:' && document.readyState === 'complete'")
        .await
        .unwrap();

    // The charts: one per route and series, drawn from /_/history.
    page.wait_until(
        "Number(document.querySelector('.chart[data-route=\"PUT/kv\"][data-series=\"requests/s\"]')?.dataset.total) >= 20",
    )
    .await
    .unwrap();
    let figures = page
        .eval(
            "Array.from(document.querySelectorAll('.chart[data-route=\"GET/kv\"]')).map(c => \
             ({series: c.dataset.series, max: Number(c.dataset.max), total: Number(c.dataset.total), \
               points: c.querySelector('polyline').getAttribute('points').split(' ').length, \
               caption: c.innerText}))",
        )
        .await
        .unwrap();
    let series = |name: &str| -> &Value {
        figures
            .as_array()
            .unwrap()
            .iter()
            .find(|chart| chart["series"] == name)
            .unwrap_or_else(|| panic!("no {name} chart: {figures}"))
    };
    assert_eq!(series("requests/s")["total"], 20, "{figures}");
    assert!(
        series("requests/s")["max"].as_f64() > Some(0.0),
        "{figures}"
    );
    assert_eq!(series("requests/s")["points"], 300, "{figures}");
    assert!(
        series("p99 latency")["max"].as_f64() > Some(0.0),
        "{figures}"
    );
    assert_eq!(series("error rate")["max"], 0, "{figures}");
    checks.pass(format!(
        "after 40 kv requests the charts show non-zero figures: {} / {}",
        series("requests/s")["caption"],
        series("p99 latency")["caption"]
    ));

    // The nodes' figures.
    let kv_addr = format!("127.0.0.1:{}", stack.kv[0].port);
    page.wait_until(&format!(
        "(() => {{ const row = document.querySelector('tr[data-node=\"{kv_addr}\"]'); \
           return !!row && row.cells[2].innerText === 'connected' && Number(row.cells[4].innerText) >= 40 \
             && row.querySelectorAll('svg rect').length >= 1; }})()"
    ))
    .await
    .unwrap();
    page.wait_for_text("HTTP connections").await.unwrap();
    checks.pass("the nodes table shows the kv node connected, its requests and its history strip");

    // A subscriber, kicked from the page.
    let alice = secrets.mint("alice", &["notice:subscribe"]);
    let client = reqwest::Client::new();
    let mut stream = EventStream::open(
        &client,
        &stack.url(&format!("/notices/stream?access_token={alice}")),
        None,
    )
    .await
    .unwrap();
    stack.wait_for_subscribers(&["alice"]).await;
    page.wait_until("!!document.querySelector('button[data-kick=\"alice\"]')")
        .await
        .unwrap();
    page.eval("document.querySelector('button[data-kick=\"alice\"]').click(); true")
        .await
        .unwrap();
    let kicked = stream.next_within(e2e::READY_TIMEOUT).await.unwrap();
    assert_eq!(kicked.event.as_deref(), Some("kicked"), "{kicked:?}");
    assert_eq!(
        stream.next().await.unwrap(),
        None,
        "the stream ends after the kick"
    );
    page.wait_for_text("Kicked 1 subscription(s) named alice.")
        .await
        .unwrap();
    checks.pass("the kick button ends that subscriber's stream with a kicked event");

    // The kv browser.
    page.eval(
        "document.getElementById('kv-prefix').value = 'page/key1';\
         document.getElementById('kv-list').requestSubmit(); true",
    )
    .await
    .unwrap();
    page.wait_for_text("11 keys").await.unwrap();
    page.eval("document.querySelector('a[data-key=\"page/key12\"]').click(); true")
        .await
        .unwrap();
    page.wait_until("document.getElementById('kv-value').innerText === 'value 12'")
        .await
        .unwrap();
    page.wait_for_text("version 1").await.unwrap();
    page.eval("document.getElementById('kv-watch').click(); true")
        .await
        .unwrap();
    // This kv-service streams changes: the page watches the key and shows the next one.
    page.wait_until("document.getElementById('kv-watch-state').innerText === '(watching)'")
        .await
        .unwrap();
    stack
        .http
        .put(stack.url("/kv/page/key12"))
        .body("changed live")
        .send()
        .await
        .unwrap();
    page.wait_until("document.getElementById('kv-value').innerText === 'changed live'")
        .await
        .unwrap();
    checks.pass("the kv browser lists by prefix, opens a key and watches it change");

    // Recent warnings and errors, gathered by this gateway's /_/logs: a table, or "(none)".
    page.wait_until(
        "(() => { const state = document.getElementById('logs-state').innerText; \
           return state === '(none)' || !document.getElementById('logs-table').hidden; })()",
    )
    .await
    .unwrap();
    checks.pass("the logs section shows the recent warnings, or that there are none to show");

    let shot = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("status-page")
        .join("the_status_page_charts_traffic_and_kicks_a_subscriber.png");
    page.eval("window.scrollTo(0, 0); true").await.unwrap();
    page.screenshot(&shot).await.unwrap();
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    checks.pass(format!(
        "a screenshot ({} bytes) is at {}",
        png.len(),
        shot.display()
    ));
}
