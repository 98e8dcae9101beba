//! Resuming a subscription over the packet protocol from a point the store cannot continue from
//! exactly: one retention overtook gets a `reset` and then the oldest kept notices, one above
//! every published id gets a `reset` and then live notices, and an ordinary one no reset.

mod common;

use std::time::Duration;

use common::*;
use notice_service::{store::StoreSpec, Config};
use serde_json::{json, Value};
use shared::{PacketClient, ResponseStream};

/// A service keeping only the newest `keep` notices, over SQLite.
async fn service_keeping(dir: &tempfile::TempDir, keep: u64) -> TestService {
    let mut config = Config::standalone(StoreSpec::Sqlite(dir.path().join("notices.db")));
    config.retention.max_count = Some(keep);
    TestService::start(config).await
}

/// Publishes `count` notices and waits (bounded) until retention has left only `keep`.
async fn publish_and_prune(client: &PacketClient, count: usize, keep: usize) -> Vec<i64> {
    let mut ids = Vec::new();
    for i in 0..count {
        ids.push(publish_now(client, json!({"message": format!("n{i}")})).await);
    }
    tokio::time::timeout(WAIT, async {
        loop {
            let listed = call(client, "GET", "/notices", json!({})).await;
            if listed.params["items"].as_array().unwrap().len() <= keep {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("retention prunes the old notices");
    ids
}

/// The next event, which must be a `reset`; its data.
async fn next_reset(stream: &mut ResponseStream) -> Value {
    let packet = next_packet(stream).await;
    assert_eq!(packet.event.as_deref(), Some("reset"), "{packet:?}");
    assert_eq!(packet.id, None, "a reset carries no event id");
    packet.params
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_point_retention_overtook_gets_a_reset_then_the_oldest_kept() {
    let dir = tempfile::tempdir().unwrap();
    let service = service_keeping(&dir, 3).await;
    let client = service.client().await;
    let ids = publish_and_prune(&client, 8, 3).await;

    let mut stream = subscribe(&client, json!({"after": ids[1]})).await;
    let reset = next_reset(&mut stream).await;
    assert_eq!(reset, json!({"oldest_id": ids[5], "current_id": ids[7]}));
    for id in &ids[5..] {
        assert_eq!(next_notice(&mut stream).await.0, *id);
    }
    let live = publish_now(&client, json!({"message": "live"})).await;
    assert_eq!(next_notice(&mut stream).await, (live, "live".to_string()));
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_point_above_every_published_id_gets_a_reset_then_live() {
    let dir = tempfile::tempdir().unwrap();
    let service = service_keeping(&dir, 3).await;
    let client = service.client().await;
    let ids = publish_and_prune(&client, 5, 3).await;

    // Last-Event-ID as the gateway passes it, from another database's ids.
    let mut stream = subscribe(&client, json!({"last_event_id": ids[4] + 1000})).await;
    let reset = next_reset(&mut stream).await;
    assert_eq!(reset, json!({"oldest_id": ids[2], "current_id": ids[4]}));
    // Nothing already stored is replayed: the next event is the next notice published.
    let live = publish_now(&client, json!({"message": "live"})).await;
    assert_eq!(next_notice(&mut stream).await, (live, "live".to_string()));
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordinary_resume_point_gets_no_reset() {
    let dir = tempfile::tempdir().unwrap();
    let service = service_keeping(&dir, 3).await;
    let client = service.client().await;
    let ids = publish_and_prune(&client, 6, 3).await;

    // Just below the oldest kept notice (nothing missed), in the middle, from the start, and
    // up to date: none gets a reset, each replays what it missed and then goes on live.
    let mut streams = Vec::new();
    for (after, expected) in [
        (ids[2], &ids[3..]),
        (ids[4], &ids[5..]),
        (0, &ids[3..]),
        (ids[5], &ids[6..]),
    ] {
        let mut stream = subscribe(&client, json!({"after": after})).await;
        for id in expected {
            assert_eq!(next_notice(&mut stream).await.0, *id, "after {after}");
        }
        streams.push((after, stream));
    }
    let live = publish_now(&client, json!({"message": "live"})).await;
    for (after, stream) in &mut streams {
        assert_eq!(
            next_notice(stream).await,
            (live, "live".to_string()),
            "after {after}: the next event is the live notice, not a reset"
        );
    }

    // A store that never published anything: a first connection resuming from 0 is exact.
    let empty = TestService::with_store("mem").await;
    let empty_client = empty.client().await;
    let mut stream = subscribe(&empty_client, json!({"after": 0})).await;
    let first = publish_now(&empty_client, json!({"message": "first"})).await;
    assert_eq!(next_notice(&mut stream).await, (first, "first".to_string()));
    empty.stop().await;
    service.stop().await;
}
