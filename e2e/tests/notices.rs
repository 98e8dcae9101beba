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

/// Restarts the stack's notice-service on the same port and store, keeping only the newest
/// `keep` notices, and waits until the gateway lists no more than that.
async fn restart_notices_keeping(stack: &mut Stack, keep: usize) {
    let store = format!("sqlite:{}", stack.dir.path().join("notices.db").display());
    let mut args = vec![
        "--listen".to_string(),
        format!("127.0.0.1:{}", stack.notice_port.unwrap()),
        "--distributor".into(),
        format!("127.0.0.1:{}", stack.distributor_port),
        "--store".into(),
        store,
        "--retain-count".into(),
        keep.to_string(),
    ];
    args.extend(
        stack
            .secrets
            .as_ref()
            .map(|s| s.cluster_flags())
            .unwrap_or_default(),
    );
    stack.notice.as_mut().unwrap().kill9().await;
    stack.notice = Some(e2e::Process::spawn("notice", "notice-service", &args));
    tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(response) = stack.http.get(stack.url("/notices")).send().await {
                if response.status() == StatusCode::OK {
                    let listed: Value = response.json().await.unwrap();
                    if listed["items"].as_array().unwrap().len() <= keep {
                        return;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the restarted service prunes to its retention");
}

/// The next event, which must be a `reset`; its data.
async fn next_reset(stream: &mut EventStream) -> Value {
    let event = stream.next_within(WAIT).await.unwrap();
    assert_eq!(event.event.as_deref(), Some("reset"), "{event:?}");
    assert_eq!(
        event.id, None,
        "a reset leaves the browser's Last-Event-ID alone"
    );
    event.json()
}

async fn next_notice_id(stream: &mut EventStream) -> i64 {
    let event = stream.next_within(WAIT).await.unwrap();
    assert_eq!(event.event.as_deref(), Some("notice"), "{event:?}");
    event.json()["id"].as_i64().unwrap()
}

#[tokio::test]
async fn a_resume_point_the_store_cannot_continue_from_gets_a_reset() {
    let mut stack = Stack::start(notices_only()).await;
    let mut checks = Checks::new("honest replay over Server-Sent Events");
    let mut ids = Vec::new();
    for i in 0..6 {
        let (status, notice) = publish(&stack, json!({"message": format!("n{i}")})).await;
        assert_eq!(status, StatusCode::CREATED);
        ids.push(notice["id"].as_i64().unwrap());
    }
    restart_notices_keeping(&mut stack, 3).await;
    let stream_url = stack.url("/notices/stream");

    // Retention deleted ids[1] .. ids[2]: reset, then the kept ones, then live.
    let too_old = ids[0].to_string();
    let mut old = EventStream::open(&stack.http, &stream_url, Some(&too_old))
        .await
        .unwrap();
    let reset = next_reset(&mut old).await;
    assert_eq!(reset, json!({"oldest_id": ids[3], "current_id": ids[5]}));
    for id in &ids[3..] {
        assert_eq!(next_notice_id(&mut old).await, *id);
    }
    checks.pass("a Last-Event-ID older than the oldest kept notice gets reset, then the kept ones");

    // From another database: reset, then nothing stored, only what is published next.
    let too_new = (ids[5] + 1000).to_string();
    let mut new = EventStream::open(&stack.http, &stream_url, Some(&too_new))
        .await
        .unwrap();
    let reset = next_reset(&mut new).await;
    assert_eq!(reset, json!({"oldest_id": ids[3], "current_id": ids[5]}));

    // An ordinary resume point: no reset, just what was missed.
    let recent = ids[4].to_string();
    let mut ordinary = EventStream::open(&stack.http, &stream_url, Some(&recent))
        .await
        .unwrap();
    assert_eq!(next_notice_id(&mut ordinary).await, ids[5]);

    let (_, live) = publish(&stack, json!({"message": "live"})).await;
    let live = live["id"].as_i64().unwrap();
    for stream in [&mut old, &mut new, &mut ordinary] {
        assert_eq!(next_notice_id(stream).await, live);
    }
    checks.pass("a Last-Event-ID above every published id gets reset, then live notices");
    checks.pass("an ordinary Last-Event-ID gets no reset");
}

/// The next event of a presence stream, as "join alice@room".
async fn next_presence(stream: &mut EventStream) -> String {
    let event = stream.next_within(WAIT).await.unwrap();
    let data = event.json();
    assert_eq!(event.id, None, "presence events carry no id: {event:?}");
    assert!(data["at"].as_str().is_some(), "{data}");
    format!(
        "{} {}@{}",
        event.event.unwrap_or_default(),
        data["name"].as_str().unwrap(),
        data["topic"].as_str().unwrap()
    )
}

#[tokio::test]
async fn presence_names_and_rename_through_the_gateway() {
    // A development stack without a key, where names are free text: unique per client.
    let stack = Stack::start(StackOptions {
        auth: false,
        ..notices_only()
    })
    .await;
    let mut checks = Checks::new("presence, names and rename over HTTP");
    let open = |query: &str| {
        let url = stack.url(&format!("/notices/stream?{query}"));
        let http = stack.http.clone();
        async move { EventStream::open(&http, &url, None).await }
    };

    let mut watcher = open("topics=room&presence=1").await.unwrap();
    let tab_1 = open("topics=room&name=alice&client=tab-key-1")
        .await
        .unwrap();
    assert_eq!(next_presence(&mut watcher).await, "join alice@room");
    let tab_2 = open("topics=room&name=alice&client=tab-key-1")
        .await
        .unwrap();
    stack.wait_for_subscribers(&["alice", "alice"]).await;
    checks.pass("presence=1 streams a join when a name arrives on a topic; a second tab adds none");

    let thief = stack
        .http
        .get(stack.url("/notices/stream?name=alice&client=someone-else"))
        .header("Accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(thief.status(), StatusCode::CONFLICT);
    let body: Value = thief.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("in use"), "{body}");
    checks.pass("a name in use by another client is 409");

    let by_topic = stack.get_json("/notices/subscribers?topic=room").await;
    assert_eq!(by_topic["items"].as_array().unwrap().len(), 3, "{by_topic}");
    let elsewhere = stack.get_json("/notices/subscribers?topic=hall").await;
    assert_eq!(elsewhere["items"], json!([]));
    checks.pass("GET /notices/subscribers?topic= filters by topic");

    let renamed = stack
        .http
        .post(stack.url("/notices/subscribers/alice/rename"))
        .json(&json!({"to": "ally"}))
        .send()
        .await
        .unwrap();
    assert_eq!(renamed.status(), StatusCode::OK);
    let renamed: Value = renamed.json().await.unwrap();
    assert_eq!(renamed, json!({"renamed": 2, "name": "ally"}));
    assert_eq!(next_presence(&mut watcher).await, "leave alice@room");
    assert_eq!(next_presence(&mut watcher).await, "join ally@room");
    checks.pass("POST /notices/subscribers/{name}/rename renames every tab and announces it");

    drop(tab_1);
    drop(tab_2);
    assert_eq!(next_presence(&mut watcher).await, "leave ally@room");
    checks.pass("the name leaves with its last tab");
}
