//! notice-service over the packet protocol, on real TCP with real SQLite (or the memory store
//! where persistence does not matter).

mod common;

use std::time::Duration;

use chrono::Utc;
use common::*;
use notice_service::{store::StoreSpec, Config};
use serde_json::{json, Value};
use shared::{codec::PacketCodec, connection::PacketReader, Packet};
use tokio::io::AsyncWriteExt;

fn sqlite_config(dir: &tempfile::TempDir) -> Config {
    Config::standalone(StoreSpec::Sqlite(dir.path().join("notices.db")))
}

/// Reads notice events until the one with `marker` as its message; returns the messages before.
async fn messages_until(stream: &mut shared::ResponseStream, marker: &str) -> Vec<String> {
    let mut messages = Vec::new();
    loop {
        let (_, message) = next_notice(stream).await;
        if message == marker {
            return messages;
        }
        messages.push(message);
    }
}

#[tokio::test]
async fn topics_broadcasts_and_whispers_reach_exactly_their_audience() {
    let dir = tempfile::tempdir().unwrap();
    let service = TestService::start(sqlite_config(&dir)).await;
    let client = service.client().await;
    let mut alice = subscribe(&client, json!({"topics": "room,news", "name": "alice"})).await;
    let mut bob = subscribe(&client, json!({"topics": "other", "name": "bob"})).await;
    let mut anonymous = subscribe(&client, json!({})).await;
    wait_for_presence(&client, 3).await;

    for notice in [
        json!({"message": "to everyone"}),
        json!({"message": "in room", "topic": "room"}),
        json!({"message": "in other", "topic": "other"}),
        json!({"message": "in nowhere", "topic": "nowhere"}),
        json!({"message": "psst alice", "to": "alice"}),
        json!({"message": "psst bob in room", "topic": "room", "to": "bob"}),
        json!({"message": "psst carol", "to": "carol"}),
        json!({"message": "end"}),
    ] {
        publish_now(&client, notice).await;
    }
    assert_eq!(
        messages_until(&mut alice, "end").await,
        ["to everyone", "in room", "psst alice"]
    );
    assert_eq!(
        messages_until(&mut bob, "end").await,
        ["to everyone", "in other", "psst bob in room"]
    );
    assert_eq!(messages_until(&mut anonymous, "end").await, ["to everyone"]);
}

#[tokio::test]
async fn publish_answers_with_the_stored_notice_and_lists_in_id_order() {
    let service = TestService::with_store("mem").await;
    let client = service.client().await;
    let answer = publish(&client, json!({"message": "hello", "topic": "room"})).await;
    assert_eq!(answer.status(), 201);
    let first = answer.params.clone();
    assert_eq!(first["message"], "hello");
    assert_eq!(first["topic"], "room");
    assert_eq!(first["to"], Value::Null);
    let created = first["created_at"].as_str().unwrap();
    assert!(
        chrono::DateTime::parse_from_rfc3339(created).is_ok(),
        "{created}"
    );

    let second = publish_now(&client, json!({"message": "b", "to": "alice"})).await;
    let third = publish_now(&client, json!({"message": "c", "topic": "room"})).await;
    assert!(first["id"].as_i64().unwrap() < second && second < third);

    let list = |params: Value| {
        let client = client.clone();
        async move {
            let answer = call(&client, "GET", "/notices", params).await;
            assert_eq!(answer.status(), 200, "{answer:?}");
            answer.params["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n["message"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(list(json!({})).await, ["hello", "b", "c"]);
    assert_eq!(list(json!({"topic": "room"})).await, ["hello", "c"]);
    assert_eq!(list(json!({"after": second.to_string()})).await, ["c"]);
    assert_eq!(
        list(json!({"limit": "2", "topic": ""})).await,
        ["hello", "b"]
    );
}

#[tokio::test]
async fn bad_input_gets_a_400_with_a_clear_message() {
    let service = TestService::with_store("mem").await;
    let client = service.client().await;
    for (params, reason) in [
        (json!({}), "message is required"),
        (json!({"body": "plain text"}), "JSON body"),
        (json!({"message": 5}), "invalid parameters"),
        (json!({"message": ""}), "must not be empty"),
        (json!({"message": "x", "topic": "a,b"}), "commas"),
        (json!({"message": "x", "to": ""}), "must not be empty"),
        (json!({"message": "x", "at": "tomorrow"}), "RFC 3339"),
        (json!({"message": "x".repeat(70_000)}), "limit"),
        (json!("not an object"), "invalid parameters"),
    ] {
        let answer = publish(&client, params.clone()).await;
        assert_eq!(answer.status(), 400, "{params} -> {answer:?}");
        let error = answer.error.unwrap_or_default();
        assert!(
            error.contains(reason),
            "{params}: {error:?} should mention {reason}"
        );
    }
    let answer = call(&client, "GET", "/notices", json!({"limit": "5000"})).await;
    assert_eq!(answer.status(), 400);
    let answer = call(&client, "GET", "/notices", json!({"after": "abc"})).await;
    assert_eq!(answer.status(), 400);
    // The gateway routes GET /notices/whatever here with the rest of the path as params.
    let answer = call(&client, "GET", "/notices", json!({"params": "whatever"})).await;
    assert_eq!(answer.status(), 404);

    // A bad subscription is refused before any event.
    let mut stream = subscribe(&client, json!({"after": "yesterday"})).await;
    let end = next_packet(&mut stream).await;
    assert!(end.end);
    assert_eq!(end.status(), 400);
    assert!(end.error.unwrap().contains("after"));
    // Nothing was published by any of it.
    let answer = call(&client, "GET", "/notices", json!({})).await;
    assert_eq!(answer.params["items"], json!([]));
}

#[tokio::test]
async fn a_scheduled_notice_is_published_at_its_time_once() {
    let dir = tempfile::tempdir().unwrap();
    let service = TestService::start(sqlite_config(&dir)).await;
    let client = service.client().await;
    let mut stream = subscribe(&client, json!({"topics": "t"})).await;
    wait_for_presence(&client, 1).await;

    let at = Utc::now() + chrono::Duration::milliseconds(300);
    let at_text = at.to_rfc3339();
    let answer = publish(
        &client,
        json!({"message": "later", "topic": "t", "at": at_text}),
    )
    .await;
    assert_eq!(answer.status(), 202, "{answer:?}");
    assert_eq!(answer.params["scheduled"], true);
    let announced = chrono::DateTime::parse_from_rfc3339(answer.params["at"].as_str().unwrap());
    assert_eq!(announced.unwrap().timestamp_millis(), at.timestamp_millis());
    // Not listed before it is published.
    let listed = call(&client, "GET", "/notices", json!({})).await;
    assert_eq!(listed.params["items"], json!([]));

    let (id, message) = next_notice(&mut stream).await;
    assert_eq!(message, "later");
    assert!(Utc::now() >= at, "not published early");

    // A marker published afterwards arrives next: the scheduled one did not come twice.
    publish_now(&client, json!({"message": "marker", "topic": "t"})).await;
    assert_eq!(next_notice(&mut stream).await.1, "marker");
    let listed = call(&client, "GET", "/notices", json!({})).await;
    let ids: Vec<i64> = listed.params["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids.iter().filter(|i| **i == id).count(), 1);

    // A time in the past publishes at once.
    let past = (Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    let answer = publish(&client, json!({"message": "now", "at": past})).await;
    assert_eq!(answer.status(), 201);
}

#[tokio::test]
async fn scheduled_notices_survive_a_restart_and_are_published_once() {
    let dir = tempfile::tempdir().unwrap();
    let start = Utc::now();
    let due_while_down = start + chrono::Duration::milliseconds(700);
    let due_after_restart = start + chrono::Duration::milliseconds(2500);
    let before = {
        let service = TestService::start(sqlite_config(&dir)).await;
        let client = service.client().await;
        let before = publish_now(&client, json!({"message": "before"})).await;
        for (message, at) in [
            ("while down", due_while_down),
            ("after restart", due_after_restart),
        ] {
            let answer = publish(&client, json!({"message": message, "at": at.to_rfc3339()})).await;
            assert_eq!(answer.status(), 202);
        }
        drop(client);
        service.stop().await;
        before
    };
    // Restart only once the first one is overdue.
    let overdue = (due_while_down - Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(overdue + Duration::from_millis(200)).await;

    let service = TestService::start(sqlite_config(&dir)).await;
    let client = service.client().await;
    let mut stream = subscribe(&client, json!({"after": before})).await;
    assert_eq!(next_notice(&mut stream).await.1, "while down");
    let (_, message) = next_notice(&mut stream).await;
    assert_eq!(message, "after restart");
    assert!(Utc::now() >= due_after_restart);
    publish_now(&client, json!({"message": "marker"})).await;
    assert_eq!(
        next_notice(&mut stream).await.1,
        "marker",
        "each exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_with_the_last_event_id_misses_nothing_while_publishing() {
    const TOTAL: usize = 400;
    let dir = tempfile::tempdir().unwrap();
    let service = TestService::start(sqlite_config(&dir)).await;
    let client = service.client().await;
    let first = publish_now(&client, json!({"message": "first"})).await;

    let publisher = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut ids = vec![first];
            for i in 1..TOTAL {
                ids.push(publish_now(&client, json!({"message": format!("n{i}")})).await);
            }
            ids
        })
    };
    // The subscriber drops its connection every few notices and comes back with its last id,
    // each time on a new connection, as a browser's EventSource does.
    let subscriber = {
        let addr = service.addr;
        tokio::spawn(async move {
            let mut received: Vec<i64> = Vec::new();
            let mut last_event_id: Option<i64> = Some(first - 1);
            let mut reconnects = 0;
            while received.len() < TOTAL {
                let client =
                    shared::PacketClient::connect(addr.to_string(), shared::Dialect::Packet);
                tokio::time::timeout(WAIT, client.connected())
                    .await
                    .unwrap();
                let params = match last_event_id {
                    Some(id) => json!({"last_event_id": id.to_string()}),
                    None => json!({}),
                };
                let mut stream = subscribe(&client, params).await;
                for _ in 0..(7 + reconnects % 5) {
                    if received.len() == TOTAL {
                        break;
                    }
                    let (id, _) = next_notice(&mut stream).await;
                    received.push(id);
                    last_event_id = Some(id);
                }
                reconnects += 1;
            }
            (received, reconnects)
        })
    };
    let published = tokio::time::timeout(Duration::from_secs(60), publisher)
        .await
        .unwrap()
        .unwrap();
    let (received, reconnects) = tokio::time::timeout(Duration::from_secs(60), subscriber)
        .await
        .unwrap()
        .unwrap();
    assert!(reconnects > 10);
    assert_eq!(received, published, "no gap, no duplicate, in order");
}

#[tokio::test]
async fn presence_lists_subscribers_and_kick_ends_their_streams() {
    let service = TestService::with_store("mem").await;
    let client = service.client().await;
    assert_eq!(presence(&client).await, Vec::<Value>::new());
    let mut alice_phone = subscribe(&client, json!({"name": "alice", "topics": "b,a"})).await;
    let mut alice_laptop = subscribe(&client, json!({"name": "alice"})).await;
    let mut bob = subscribe(&client, json!({"name": "bob"})).await;
    let items = wait_for_presence(&client, 3).await;
    let alice = items
        .iter()
        .find(|i| i["name"] == "alice" && i["topics"] != json!([]))
        .expect("alice's subscription with topics");
    assert_eq!(alice["topics"], json!(["a", "b"]));
    assert!(chrono::DateTime::parse_from_rfc3339(alice["since"].as_str().unwrap()).is_ok());

    let kicked = kick(&client, "alice").await;
    assert_eq!(kicked.status(), 200);
    assert_eq!(kicked.params, json!({"kicked": 2}));
    for stream in [&mut alice_phone, &mut alice_laptop] {
        let last = next_packet(stream).await;
        assert_eq!(last.event.as_deref(), Some("kicked"));
        let end = next_packet(stream).await;
        assert!(end.end);
        assert!(tokio::time::timeout(WAIT, stream.next())
            .await
            .unwrap()
            .is_none());
    }
    let items = presence(&client).await;
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["name"], "bob");

    let again = kick(&client, "alice").await;
    assert_eq!(again.status(), 404);
    let nameless = call(&client, "DELETE", "/notices/subscribers", json!({})).await;
    assert_eq!(nameless.status(), 400);
    // Bob is unaffected.
    publish_now(&client, json!({"message": "still here"})).await;
    assert_eq!(next_notice(&mut bob).await.1, "still here");
}

#[tokio::test]
async fn a_cancelled_or_dropped_subscription_is_freed_at_once() {
    let service = TestService::with_store("mem").await;
    let client = service.client().await;
    let cancelled = subscribe(&client, json!({"name": "cancelled"})).await;
    let other_connection = service.client().await;
    let _dropped = subscribe(&other_connection, json!({"name": "dropped"})).await;
    let mut kept = subscribe(&client, json!({"name": "kept"})).await;
    wait_for_presence(&client, 3).await;

    // Dropping the stream sends a cancel packet.
    drop(cancelled);
    let items = wait_for_presence(&client, 2).await;
    assert!(items.iter().all(|i| i["name"] != "cancelled"));
    // Dropping the last handle of a client closes its connection.
    drop(_dropped);
    drop(other_connection);
    let items = wait_for_presence(&client, 1).await;
    assert_eq!(items[0]["name"], "kept");
    publish_now(&client, json!({"message": "hi"})).await;
    assert_eq!(next_notice(&mut kept).await.1, "hi");
}

/// A subscriber that stops reading is cut off with a final `lagged` event, while another
/// subscriber keeps receiving everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_is_cut_off_without_holding_up_others() {
    let mut config = Config::standalone(StoreSpec::Memory);
    config.subscriber_buffer = 64;
    let service = TestService::start(config).await;
    let client = service.client().await;

    // The slow subscriber: a raw connection that sends the stream request and reads nothing.
    // A small receive window keeps the kernel from buffering much on its behalf, so its
    // connection queue and then its subscriber buffer fill after a modest number of notices.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut slow = socket.connect(service.addr).await.unwrap();
    let request = Packet {
        key: 1,
        stream: true,
        ..Packet::request("GET", "/notices/stream", json!({"name": "slow"}))
    };
    slow.write_all(&shared::codec::encode_frame(&request).unwrap())
        .await
        .unwrap();
    let mut fast = subscribe(&client, json!({"name": "fast"})).await;
    wait_for_presence(&client, 2).await;

    let fast_reader = tokio::spawn(async move {
        let mut ids = Vec::new();
        loop {
            let (id, message) = next_notice(&mut fast).await;
            if message == "done" {
                return ids;
            }
            ids.push(id);
        }
    });
    let big = "x".repeat(4 * 1024);
    let mut published = Vec::new();
    // A few publishes run at once, far fewer than a buffer holds, so only a reader that stopped
    // can lag. The bound keeps the test finite if it never lagged.
    let slow_present = |items: &[Value]| items.iter().any(|i| i["name"] == "slow");
    while published.len() < 5000 {
        let batch = (0..8).map(|_| publish_now(&client, json!({"message": big})));
        published.extend(futures::future::join_all(batch).await);
        if !slow_present(&presence(&client).await) {
            break;
        }
    }
    // Concurrent publishes were answered in any order; ids give the publication order.
    published.sort_unstable();
    let items = presence(&client).await;
    assert_eq!(items.len(), 1, "the slow subscriber was removed");
    assert_eq!(items[0]["name"], "fast");
    publish_now(&client, json!({"message": "done"})).await;
    let fast_ids = tokio::time::timeout(Duration::from_secs(30), fast_reader)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(fast_ids, published, "the fast subscriber got everything");

    // Reading the slow connection now: some notices in order, then the lagged event, then end.
    let (read_half, _write_half) = slow.into_split();
    let mut reader = PacketReader::new(read_half, PacketCodec::<Packet>::new());
    let mut ids = Vec::new();
    let lagged = loop {
        let packet = tokio::time::timeout(WAIT, reader.next())
            .await
            .expect("the slow connection is answered")
            .expect("not closed")
            .expect("a valid packet");
        match packet.event.as_deref() {
            Some("notice") => ids.push(packet.params["id"].as_i64().unwrap()),
            _ if packet.is_empty_event() => {}
            _ => break packet,
        }
    };
    assert_eq!(lagged.event.as_deref(), Some("lagged"), "{lagged:?}");
    assert!(!ids.is_empty() && ids.len() < published.len());
    assert_eq!(ids, published[..ids.len()], "what it got was in order");
    assert_eq!(lagged.params["last_event_id"], json!(ids.last().unwrap()));
    let end = tokio::time::timeout(WAIT, reader.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(end.end);
}

#[tokio::test]
async fn shutdown_ends_streams_with_a_final_event() {
    let service = TestService::with_store("mem").await;
    let client = service.client().await;
    let mut stream = subscribe(&client, json!({})).await;
    wait_for_presence(&client, 1).await;
    let stopping = tokio::spawn(service.stop());
    let last = next_packet(&mut stream).await;
    assert_eq!(last.event.as_deref(), Some("shutdown"));
    tokio::time::timeout(WAIT, stopping).await.unwrap().unwrap();
}

#[tokio::test]
async fn retention_keeps_only_the_newest_notices() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = sqlite_config(&dir);
    config.retention.max_count = Some(3);
    let service = TestService::start(config).await;
    let client = service.client().await;
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(publish_now(&client, json!({"message": format!("n{i}")})).await);
    }
    let kept = tokio::time::timeout(WAIT, async {
        loop {
            let listed = call(&client, "GET", "/notices", json!({})).await;
            let kept: Vec<i64> = listed.params["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n["id"].as_i64().unwrap())
                .collect();
            if kept.len() <= 3 {
                return kept;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("old notices are pruned");
    assert_eq!(kept, ids[7..]);
    // New ids continue the sequence.
    let next = publish_now(&client, json!({"message": "next"})).await;
    assert!(next > ids[9]);
}

/// The gateway sends its SSE headers when the stream opens, so an accepted subscription must
/// say so at once, before any notice exists.
#[tokio::test]
async fn an_accepted_subscription_opens_before_the_first_notice() {
    let service = TestService::with_store("mem").await;
    let client = service.client().await;
    let mut stream = subscribe(&client, json!({"topics": "quiet"})).await;
    let first = tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("the stream opens without waiting for a notice")
        .unwrap()
        .unwrap();
    assert!(first.is_empty_event(), "{first:?}");
    assert!(!first.end);
}
