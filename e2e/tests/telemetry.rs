//! Logs, metrics and log formats of the real binaries: `GET /_/logs` gathered from every
//! process over the packet protocol, `--metrics-listen` on every binary, `--log-format json`.

use std::{collections::HashMap, time::Duration};

use anyhow::Context;
use e2e::{free_port, sse::EventStream, Stack, StackOptions};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

/// Every process of the stack logs at `info`, so that each has lines to show.
fn verbose() {
    // Each test runs in a process of its own (nextest), and the stack's children read it.
    std::env::set_var("E2E_LOG", "info");
}

/// Makes the process listening on `port` log a warning: a packet where the cluster handshake
/// should be is refused, logged at warn with the peer address.
async fn provoke_warning(port: u16) {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connecting");
    let _ = stream
        .write_all("{\"uri\":\"/kv\",\"method\":\"GET\",\"key\":1}¶".as_bytes())
        .await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut rest),
    )
    .await;
}

async fn logs(stack: &Stack, query: &str) -> Value {
    let response = stack
        .http
        .get(stack.url(&format!("/_/logs{query}")))
        .send()
        .await
        .expect("GET /_/logs");
    assert_eq!(response.status(), 200, "GET /_/logs{query}");
    response.json().await.expect("a JSON answer")
}

/// Polls `GET /_/logs{query}` until `done` holds for its answer.
async fn logs_until(stack: &Stack, query: &str, done: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    for _ in 0..100 {
        last = logs(stack, query).await;
        if done(&last) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("GET /_/logs{query} never satisfied the test; last answer: {last}");
}

fn lines(answer: &Value) -> &Vec<Value> {
    answer["lines"].as_array().expect("lines is an array")
}

fn has_line_from(answer: &Value, node: &str) -> bool {
    lines(answer).iter().any(|line| line["node"] == node)
}

#[tokio::test]
async fn logs_are_gathered_from_every_process_newest_last() {
    verbose();
    let stack = Stack::start(StackOptions::default()).await;
    let kv = format!("kv@127.0.0.1:{}", stack.kv[0].port);
    let notice = format!("notice@127.0.0.1:{}", stack.notice_port.unwrap());
    let gateway = format!("gateway@127.0.0.1:{}", stack.gateway_port);
    let distributor = format!("distributor@127.0.0.1:{}", stack.distributor_port);

    let answer = logs_until(&stack, "?limit=10000", |answer| {
        [&kv, &notice, &gateway, &distributor]
            .iter()
            .all(|node| has_line_from(answer, node))
    })
    .await;
    assert_eq!(answer["missing"], json!([]));
    let lines = lines(&answer);
    for line in lines {
        let fields: Vec<&String> = line.as_object().unwrap().keys().collect();
        assert_eq!(fields, ["level", "message", "node", "service", "time"]);
        assert!(
            chrono::DateTime::parse_from_rfc3339(line["time"].as_str().unwrap()).is_ok(),
            "{line}"
        );
    }
    let times: Vec<&str> = lines.iter().map(|l| l["time"].as_str().unwrap()).collect();
    assert!(
        times.windows(2).all(|pair| pair[0] <= pair[1]),
        "newest last"
    );
    let service_of = |node: &str| {
        lines
            .iter()
            .find(|line| line["node"] == node)
            .map(|line| line["service"].clone())
    };
    assert_eq!(service_of(&kv), Some(json!("kv")));
    assert_eq!(service_of(&gateway), Some(json!("gateway")));
    assert_eq!(service_of(&distributor), Some(json!("distributor")));

    // `limit` keeps the newest lines.
    let newest = logs(&stack, "?limit=1").await;
    assert_eq!(self::lines(&newest).len(), 1);
    let everything = logs(&stack, "").await;
    assert!(self::lines(&everything).len() <= 200, "the default limit");
}

#[tokio::test]
async fn logs_filter_by_level_and_service() {
    let stack = Stack::start(StackOptions::default()).await;
    provoke_warning(stack.kv[0].port).await;
    let answer = logs_until(&stack, "?level=warn&service=kv", |answer| {
        lines(answer).iter().any(|line| {
            line["message"]
                .as_str()
                .is_some_and(|message| message.contains("127.0.0.1"))
        })
    })
    .await;
    for line in lines(&answer) {
        assert_eq!(line["service"], "kv", "{line}");
        assert!(
            line["level"] == "WARN" || line["level"] == "ERROR",
            "{line}"
        );
    }
    // The distributor, asked alone, answers with its own lines only.
    provoke_warning(stack.distributor_port).await;
    let answer = logs_until(&stack, "?level=warn&service=distributor", |answer| {
        !lines(answer).is_empty()
    })
    .await;
    assert!(lines(&answer)
        .iter()
        .all(|line| line["service"] == "distributor"));
    // A service that does not exist has no lines, and no source is missing.
    let none = logs(&stack, "?service=nothing").await;
    assert_eq!(none, json!({"lines": [], "missing": []}));
}

#[tokio::test]
async fn logs_refuse_bad_parameters_and_callers_without_admin() {
    let stack = Stack::start(StackOptions {
        kv_replicas: 1,
        notice: false,
        ..StackOptions::default()
    })
    .await;
    for (query, expected) in [
        ("?level=loud", "unknown level"),
        ("?limit=0", "limit must be between 1 and 10000"),
        ("?limit=10001", "limit must be between 1 and 10000"),
        ("?follow=maybe", "follow must be 1 or 0"),
        ("?colour=red", "unknown parameter"),
    ] {
        let response = stack
            .http
            .get(stack.url(&format!("/_/logs{query}")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{query}");
        let body: Value = response.json().await.unwrap();
        assert!(
            body["error"].as_str().unwrap().contains(expected),
            "{query}: {body}"
        );
    }
    let plain = reqwest::Client::new();
    let anonymous = plain.get(stack.url("/_/logs")).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let reader = stack.secrets.as_ref().unwrap().mint("reader", &["kv:read"]);
    let not_admin = plain
        .get(stack.url("/_/logs"))
        .bearer_auth(reader)
        .send()
        .await
        .unwrap();
    assert_eq!(not_admin.status(), 403);
}

#[tokio::test]
async fn a_node_that_does_not_answer_is_listed_missing_without_blocking_the_rest() {
    verbose();
    let stack = Stack::start(StackOptions {
        // Slow heartbeats: the stopped node stays in the topology for the whole test.
        heartbeat: (Duration::from_secs(10), Duration::from_secs(60)),
        ..StackOptions::default()
    })
    .await;
    let notice = format!("notice@127.0.0.1:{}", stack.notice_port.unwrap());
    let kv = format!("kv@127.0.0.1:{}", stack.kv[0].port);
    // The gateway asks the nodes it is connected to: wait until both services answer (the
    // topology may bring one before the other).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let answer = logs(&stack, "?limit=10000").await;
        if has_line_from(&answer, &notice) && has_line_from(&answer, &kv) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the services never answered: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let process = stack.notice.as_ref().unwrap();
    process.freeze().await;
    let answer = logs(&stack, "?limit=10000").await;
    process.thaw();
    assert_eq!(answer["missing"], json!([notice]));
    assert!(has_line_from(&answer, &kv), "{answer}");
    assert!(!has_line_from(&answer, &notice));
}

#[tokio::test]
async fn follow_streams_new_lines_as_events() {
    let mut stack = Stack::start(StackOptions {
        notice: false,
        ..StackOptions::default()
    })
    .await;
    let mut events = EventStream::open(
        &stack.http,
        &stack.url("/_/logs?follow=1&level=warn&service=kv"),
        None,
    )
    .await
    .expect("an event stream");
    // Each new refused connection logs a new line; the stream must bring them.
    let mut seen = Vec::new();
    for _ in 0..3 {
        provoke_warning(stack.kv[0].port).await;
    }
    while seen.len() < 3 {
        let event = events
            .next_within(Duration::from_secs(30))
            .await
            .context("a log event")
            .unwrap();
        assert_eq!(event.event.as_deref(), Some("log"));
        let line = event.json();
        assert_eq!(line["service"], "kv");
        assert_eq!(line["level"], "WARN");
        seen.push(line);
    }
    let later = seen.last().unwrap()["time"].as_str().unwrap().to_owned();
    provoke_warning(stack.kv[0].port).await;
    let next = events.next_within(Duration::from_secs(30)).await.unwrap();
    assert!(next.json()["time"].as_str().unwrap() >= later.as_str());

    // kv-service restarts at the same address, so the follower sees the same source, whose
    // new run must not have to log as many lines as the old one before it is followed again.
    for _ in 0..20 {
        provoke_warning(stack.kv[0].port).await;
    }
    let kv = &mut stack.kv[0];
    kv.process.kill9().await;
    kv.process.restart();
    kv.process.wait_for_port(kv.port).await.unwrap();
    let restarted = shared::logs::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        provoke_warning(stack.kv[0].port).await;
        let event = events
            .next_within(Duration::from_secs(5))
            .await
            .ok()
            .filter(|event| event.event.as_deref() == Some("log"));
        if event.is_some_and(|event| event.json()["time"].as_str().unwrap() > restarted.as_str()) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the restarted kv-service's lines never reached the follower"
        );
    }
}

/// `GET http://127.0.0.1:port/metrics` on a metrics listener.
async fn scrape(port: u16) -> String {
    let response = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .expect("scraping");
    assert_eq!(response.status(), 200);
    response.text().await.unwrap()
}

#[tokio::test]
async fn every_binary_serves_prometheus_metrics_with_metrics_listen() {
    let ports: HashMap<&str, u16> = ["distributor", "gateway", "kv-0", "notice"]
        .into_iter()
        .map(|name| (name, free_port()))
        .collect();
    let stack = Stack::start(StackOptions {
        extra_flags: ports
            .iter()
            .map(|(name, port)| {
                let flags = vec!["--metrics-listen".into(), format!("127.0.0.1:{port}")];
                (name.to_string(), flags)
            })
            .collect(),
        ..StackOptions::default()
    })
    .await;
    let put = stack
        .http
        .put(stack.url("/kv/x"))
        .json(&json!({"value": "1"}))
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success());
    let get = stack.http.get(stack.url("/kv/x")).send().await.unwrap();
    assert_eq!(get.status(), 200);
    let published = stack
        .http
        .post(stack.url("/notices"))
        .json(&json!({"message": "hello"}))
        .send()
        .await
        .unwrap();
    assert!(published.status().is_success());
    provoke_warning(stack.distributor_port).await;

    let kv = scrape(ports["kv-0"]).await;
    assert!(
        kv.contains(r#"kv_operations_total{op="put",store="sqlite",outcome="ok"} 1"#),
        "{kv}"
    );
    assert!(kv.contains(r#"kv_operation_duration_seconds_count{op="get",store="sqlite"} 1"#));
    let notice = scrape(ports["notice"]).await;
    assert!(
        notice.contains(r#"notice_publishes_total{when="now"} 1"#),
        "{notice}"
    );
    assert!(notice.contains("notice_subscribers 0"), "{notice}");
    assert!(notice.contains("notice_lagged_total 0"), "{notice}");
    let distributor = scrape(ports["distributor"]).await;
    assert!(
        distributor.contains(r#"distributor_nodes{name="kv"} 1"#),
        "{distributor}"
    );
    assert!(distributor.contains("distributor_registrations_refused_total 0"));
    assert!(
        distributor.contains("handshake_failures_total 1"),
        "{distributor}"
    );
    let gateway = scrape(ports["gateway"]).await;
    assert!(
        gateway.contains(r#"gateway_requests_total{route="PUT/kv",status="200"} 1"#),
        "{gateway}"
    );

    // Only /metrics, only GET, and a head that never ends is cut off rather than held.
    let other = reqwest::get(format!("http://127.0.0.1:{}/other", ports["kv-0"]))
        .await
        .unwrap();
    assert_eq!(other.status(), 404);
    let mut huge = tokio::net::TcpStream::connect(("127.0.0.1", ports["kv-0"]))
        .await
        .unwrap();
    let _ = huge.write_all(&vec![b'a'; 64 * 1024]).await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut huge, &mut answer),
    )
    .await
    .expect("the listener closes an oversized head");
    assert!(
        read.is_err() || answer.is_empty(),
        "no answer to an oversized head"
    );
}

fn run_binary(program: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(e2e::bin_dir().join(program))
        .args(args)
        .env("RUST_LOG", "info")
        .output()
        .expect("running the binary")
}

#[test]
fn a_non_loopback_metrics_address_must_be_chosen_explicitly() {
    for program in ["distributor", "gateway", "kv-service", "notice-service"] {
        let port = free_port();
        let output = run_binary(
            program,
            &[
                "--metrics-listen",
                &format!("0.0.0.0:{port}"),
                "--listen",
                "127.0.0.1:0",
            ],
        );
        assert!(!output.status.success(), "{program} started");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("refusing to serve metrics on 0.0.0.0")
                && stderr.contains("--metrics-public"),
            "{program}: {stderr}"
        );
    }
}

#[tokio::test]
async fn log_format_json_writes_one_json_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let child = tokio::process::Command::new(e2e::bin_dir().join("distributor"))
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--log-format",
            "json",
        ])
        .env("RUST_LOG", "info")
        .current_dir(dir.path())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    e2e::wait_for_port(port).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let output = child.wait_with_output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<Value> = stderr
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
        .collect();
    assert!(lines.iter().any(
        |line| line["level"] == "INFO" && line["fields"]["message"] == "distributor listening"
    ));
}
