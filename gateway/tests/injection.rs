//! What a hostile node or client may put into the fields the gateway writes out: line breaks and
//! NULs in event ids and names (which would forge SSE fields), request ids that are not plain
//! text, and JSON nested far deeper than any parser should follow. Each is refused or dropped,
//! and nothing crashes.

mod common;
mod process;

use common::{Distributor, Gateway, Service, PROMPTLY};
use reqwest::StatusCode;
use serde_json::{json, Value};
use shared::service::{Event, Response, Router};
use tokio::time::timeout;

/// A stream whose events carry ids and names that try to end their line and start new fields.
fn forging_router() -> Router {
    Router::new().stream("GET", "/forge", |_request, sink| async move {
        let forgeries = [
            ("1\nevent: forged", "tick"),
            ("2", "tick\r\ndata: {\"forged\":true}"),
            ("3\0", "tick\0"),
            ("4", "tick"),
        ];
        for (n, (id, name)) in forgeries.into_iter().enumerate() {
            let event = Event {
                id: Some(json!(id)),
                event: Some(name.to_owned()),
                data: json!({ "n": n + 1 }),
            };
            if sink.send(event).await.is_err() {
                break;
            }
        }
        Response::ok(Value::Null)
    })
}

#[tokio::test]
async fn line_breaks_and_nuls_never_reach_sse_fields() {
    let distributor = Distributor::start().await;
    let _service = Service::start("forger", forging_router(), distributor.addr).await;
    let gateway = Gateway::start(distributor.addr, |_| {}).await;
    gateway.wait_for_nodes("GET/forge", 1).await;

    let body = timeout(PROMPTLY, async {
        reqwest::Client::new()
            .get(gateway.url("/forge"))
            .header("accept", "text/event-stream")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    })
    .await
    .expect("the stream ends");

    assert!(
        !body.contains("forged"),
        "a forged field got through:\n{body}"
    );
    assert!(!body.contains('\0'), "a NUL got through:\n{body}");
    for line in body.lines().filter(|line| !line.is_empty()) {
        let field = line.split(':').next().unwrap_or_default();
        assert!(
            ["id", "event", "data", ""].contains(&field),
            "an unexpected line {line:?} in\n{body}"
        );
    }
    // The safe parts of each event still arrive: its data, and the fields that were clean.
    for n in 1..=4 {
        assert!(body.contains(&format!("data: {{\"n\":{n}}}")), "{body}");
    }
    assert!(body.contains("id: 4\nevent: tick\n"), "{body}");
}

#[tokio::test]
async fn request_ids_that_are_not_plain_text_are_replaced() {
    let distributor = Distributor::start().await;
    let gateway = Gateway::start(distributor.addr, |_| {}).await;
    let addr = gateway
        .url("")
        .trim_start_matches("http://")
        .parse()
        .unwrap();

    // Raw bytes, as no HTTP library would send them: obs-text and a tab inside the id.
    let request =
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-Id: a\xffb\tc\r\nConnection: close\r\n\r\n";
    let answer = process::exchange(addr, request.to_vec()).await.text;
    assert!(!answer.contains('\u{fffd}'), "{answer}");
    assert!(!answer.contains("a\tb"), "{answer}");

    // A CR or LF cannot even be sent inside a header value: the request is refused whole.
    let request = b"GET /nowhere HTTP/1.1\r\nHost: x\r\nX-Request-Id: a\rInjected: 1\r\n\r\n";
    let answer = process::exchange(addr, request.to_vec()).await.text;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        !answer.to_ascii_lowercase().contains("injected"),
        "{answer}"
    );
}

#[tokio::test]
async fn json_nested_a_hundred_thousand_deep_is_a_400_not_a_crash() {
    let distributor = Distributor::start().await;
    let _service = Service::start("echo", common::echo_router("echo"), distributor.addr).await;
    let gateway = Gateway::start(distributor.addr, |_| {}).await;
    gateway.wait_for_nodes("PUT/echo", 1).await;

    let depth = 100_000;
    let deep = format!("{{\"a\":{}{}}}", "[".repeat(depth), "]".repeat(depth));
    let response = reqwest::Client::new()
        .put(gateway.url("/echo"))
        .header("content-type", "application/json")
        .body(deep)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    // The gateway and the node are both still there.
    let (status, _) = gateway.get("/echo/still-here").await;
    assert_eq!(status, StatusCode::OK);
}
