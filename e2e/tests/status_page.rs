//! The gateway's status page in a real headless browser, against a stack with authentication on:
//! it takes its token from the address (and keeps it out of the address bar), lists the nodes, and
//! shows a notice published by someone else, and one typed into its own form.

use e2e::{browser, Checks, Stack, StackOptions};
use serde_json::{json, Value};

#[tokio::test]
async fn the_status_page_shows_the_nodes_and_live_notices() {
    let Some(chromium) = browser::chromium_for_test() else {
        return;
    };
    let stack = Stack::start(StackOptions::default()).await;
    let mut checks = Checks::new("status page in headless chromium");

    let token = &stack
        .secrets
        .as_ref()
        .expect("authentication is on")
        .admin_token;
    let mut page = browser::Browser::open(chromium, &stack.url(&format!("/#access_token={token}")))
        .await
        .unwrap();
    // The page target exists before navigation commits; wait for the real document.
    page.wait_until("location.protocol === 'http:' && document.readyState === 'complete'")
        .await
        .unwrap();
    let title = page.eval("document.title").await.unwrap();
    assert_eq!(title, "gateway status");
    checks.pass("GET / serves the status page");
    page.wait_until("location.hash === '' && sessionStorage.getItem('gateway-token') !== null")
        .await
        .unwrap();
    checks.pass("the page keeps the token for the tab and clears it from the address bar");

    let kv_addr = format!("127.0.0.1:{}", stack.kv[0].port);
    let text = page.wait_for_text(&kv_addr).await.unwrap();
    assert!(text.contains("GET/kv"), "{text}");
    assert!(text.contains("GET/notices/stream"), "{text}");
    assert!(text.contains("connected"), "{text}");
    checks.pass("the page lists the routes and their connected nodes");

    page.wait_for_text("(streaming)").await.unwrap();
    let published: Value = stack
        .http
        .post(stack.url("/notices"))
        .json(&json!({"message": "hello from the test"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    page.wait_for_text("hello from the test").await.unwrap();
    checks.pass(format!(
        "a notice published over HTTP (#{}) appears in the live feed",
        published["id"]
    ));

    page.eval(
        "document.getElementById('message').value = 'typed into the page';\
         document.getElementById('publish').requestSubmit(); true",
    )
    .await
    .unwrap();
    page.wait_for_text("typed into the page").await.unwrap();
    let listed: Value = stack
        .http
        .get(stack.url("/notices"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .any(|notice| notice["message"] == "typed into the page"));
    checks.pass("the page's form publishes a notice that comes back through the feed");
}
