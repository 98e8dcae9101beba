//! notice-service through the gateway, as a browser's EventSource and curl see it.

use std::time::Duration;

use e2e::{sse::EventStream, Checks, Stack, StackOptions};
use reqwest::StatusCode;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(10);

fn notices_only() -> StackOptions {
    StackOptions {
        kv_replicas: 0,
        ..StackOptions::default()
    }
}

async fn publish(stack: &Stack, notice: Value) -> (StatusCode, Value) {
    let response = stack
        .http
        .post(stack.url("/notices"))
        .json(&notice)
        .send()
        .await
        .unwrap();
    (response.status(), response.json().await.unwrap())
}

#[tokio::test]
async fn a_subscriber_gets_its_topic_a_whisper_and_a_scheduled_notice() {
    let stack = Stack::start(notices_only()).await;
    let mut checks = Checks::new("notices over Server-Sent Events");

    let mut alice = EventStream::open(
        &stack.http,
        &stack.url("/notices/stream?topics=news,sport&name=alice"),
        None,
    )
    .await
    .unwrap();
    checks.pass("GET /notices/stream answers text/event-stream");

    // Presence is how we know the subscription is live before publishing.
    stack.wait_for_subscribers(&["alice"]).await;
    checks.pass("the subscriber is listed in /notices/subscribers");

    let (status, other) =
        publish(&stack, json!({"message": "elsewhere", "topic": "cooking"})).await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, other_whisper) =
        publish(&stack, json!({"message": "not for alice", "to": "bob"})).await;
    let (status, topical) = publish(&stack, json!({"message": "headline", "topic": "news"})).await;
    assert_eq!(status, StatusCode::CREATED);
    let event = alice.next_within(WAIT).await.unwrap();
    assert_eq!(event.event.as_deref(), Some("notice"));
    assert_eq!(event.json()["message"], "headline");
    assert_eq!(event.id, Some(topical["id"].to_string()));
    checks.pass("a notice of a subscribed topic arrives (id and event set); others do not");

    let (_, _) = publish(&stack, json!({"message": "psst", "to": "alice"})).await;
    let event = alice.next_within(WAIT).await.unwrap();
    assert_eq!(event.json()["message"], "psst");
    assert_eq!(event.json()["to"], "alice");
    checks.pass("a whisper addressed to the subscriber arrives");

    let at = rfc3339_in(Duration::from_secs(2));
    let (status, scheduled) = publish(&stack, json!({"message": "later", "at": at})).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(scheduled["scheduled"], true);
    let event = alice.next_within(WAIT).await.unwrap();
    assert_eq!(event.json()["message"], "later");
    checks.pass("a scheduled broadcast arrives at its time");

    // The earlier notices for others were skipped: their ids are below what alice saw.
    assert!(other["id"].as_u64() < topical["id"].as_u64());
    assert!(other_whisper["id"].as_u64() < topical["id"].as_u64());

    // Reconnecting with Last-Event-ID replays what came after that id, and nothing before it.
    drop(alice);
    let mut again = EventStream::open(
        &stack.http,
        &stack.url("/notices/stream?topics=news&name=alice"),
        Some(&topical["id"].to_string()),
    )
    .await
    .unwrap();
    let replayed = again.next_within(WAIT).await.unwrap();
    assert_eq!(replayed.json()["message"], "psst");
    checks.pass("reconnecting with Last-Event-ID replays the missed notices");
}

/// An RFC 3339 UTC time `after` from now.
fn rfc3339_in(after: Duration) -> String {
    (chrono::Utc::now() + after).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
