//! Several notice-service instances on one real PostgreSQL database behave as one service.

mod common;

use std::{collections::HashMap, sync::Arc, time::Duration};

use chrono::Utc;
use common::*;
use notice_service::{
    cluster::{self, Cluster},
    hub::Hub,
    notice::{Interest, NewNotice},
    store::{NoticeBackend, NoticeStore, StoreOptions, StoreSpec},
    Config,
};
use serde_json::json;
use shared::testing::TestPostgres;
use tokio_util::sync::CancellationToken;

/// A fresh database on a throwaway cluster, and two instances on it.
async fn two_instances(pg: &TestPostgres, db: &str) -> (TestService, TestService) {
    let url = pg.create_database(db).await;
    let config = || Config::standalone(StoreSpec::Postgres(url.clone()));
    let a = TestService::start(config()).await;
    let b = TestService::start(config()).await;
    (a, b)
}

/// A throwaway PostgreSQL cluster; `None` (the helper says why) only outside CI.
async fn postgres() -> Option<TestPostgres> {
    TestPostgres::start().await
}

/// Reads notice events until the one with `marker` as its message; returns the (id, message)
/// pairs before it.
async fn notices_until(stream: &mut shared::ResponseStream, marker: &str) -> Vec<(i64, String)> {
    let mut notices = Vec::new();
    loop {
        let notice = next_notice(stream).await;
        if notice.1 == marker {
            return notices;
        }
        notices.push(notice);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notice_published_anywhere_reaches_every_instance_exactly_once() {
    let Some(pg) = postgres().await else { return };
    let (a, b) = two_instances(&pg, "fan_out").await;
    let (client_a, client_b) = (a.client().await, b.client().await);
    let mut alice_on_a = subscribe(&client_a, json!({"name": "alice", "topics": "room"})).await;
    let mut everyone_on_a = subscribe(&client_a, json!({})).await;
    let mut bob_on_b = subscribe(&client_b, json!({"name": "bob", "topics": "room"})).await;
    let mut everyone_on_b = subscribe(&client_b, json!({})).await;
    wait_for_presence(&client_a, 4).await;

    // Both instances publish at once, interleaving their ids.
    let publish_all = |client: shared::PacketClient, from: &'static str| async move {
        let mut ids = HashMap::new();
        for i in 0..40 {
            let notice = match i % 4 {
                0 => json!({"message": format!("{from} all {i}")}),
                1 => json!({"message": format!("{from} room {i}"), "topic": "room"}),
                2 => json!({"message": format!("{from} to alice {i}"), "to": "alice"}),
                _ => json!({"message": format!("{from} to bob {i}"), "to": "bob"}),
            };
            let message = notice["message"].as_str().unwrap().to_string();
            ids.insert(publish_now(&client, notice).await, message);
        }
        ids
    };
    let (from_a, from_b) = tokio::join!(
        publish_all(client_a.clone(), "a"),
        publish_all(client_b.clone(), "b")
    );
    publish_now(&client_b, json!({"message": "end"})).await;
    let mut published: Vec<(i64, String)> = from_a.into_iter().chain(from_b).collect();
    published.sort();

    let expect = |keep: &dyn Fn(&str) -> bool| -> Vec<(i64, String)> {
        published.iter().filter(|(_, m)| keep(m)).cloned().collect()
    };
    let broadcast = |m: &str| m.contains(" all ");
    let room = |m: &str| m.contains(" room ");
    assert_eq!(
        notices_until(&mut alice_on_a, "end").await,
        expect(&|m| broadcast(m) || room(m) || m.contains("to alice"))
    );
    assert_eq!(
        notices_until(&mut bob_on_b, "end").await,
        expect(&|m| broadcast(m) || room(m) || m.contains("to bob"))
    );
    assert_eq!(
        notices_until(&mut everyone_on_a, "end").await,
        expect(&broadcast)
    );
    assert_eq!(
        notices_until(&mut everyone_on_b, "end").await,
        expect(&broadcast)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_kick_span_every_instance() {
    let Some(pg) = postgres().await else { return };
    let (a, b) = two_instances(&pg, "presence").await;
    let (client_a, client_b) = (a.client().await, b.client().await);
    let mut alice_on_a = subscribe(&client_a, json!({"name": "alice", "topics": "x"})).await;
    let mut alice_on_b = subscribe(&client_b, json!({"name": "alice"})).await;
    let _bob_on_b = subscribe(&client_b, json!({"name": "bob"})).await;
    // Each instance lists the other's subscribers too.
    for client in [&client_a, &client_b] {
        let items = wait_for_presence(client, 3).await;
        let mut names: Vec<&str> = items.iter().map(|i| i["name"].as_str().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["alice", "alice", "bob"]);
    }

    let kicked = call(
        &client_b,
        "DELETE",
        "/notices/subscribers",
        json!({"params": "alice"}),
    )
    .await;
    assert_eq!(kicked.params, json!({"kicked": 2}), "{kicked:?}");
    for stream in [&mut alice_on_a, &mut alice_on_b] {
        assert_eq!(next_packet(stream).await.event.as_deref(), Some("kicked"));
        assert!(next_packet(stream).await.end);
    }
    for client in [&client_a, &client_b] {
        let items = wait_for_presence(client, 1).await;
        assert_eq!(items[0]["name"], "bob");
    }
    let none = call(
        &client_a,
        "DELETE",
        "/notices/subscribers",
        json!({"params": "alice"}),
    )
    .await;
    assert_eq!(none.status(), 404);

    // An instance that stops takes its subscribers out of presence.
    drop(client_b);
    b.stop().await;
    wait_for_presence(&client_a, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_notices_are_published_once_by_the_cluster() {
    let Some(pg) = postgres().await else { return };
    let (a, b) = two_instances(&pg, "schedules").await;
    let (client_a, client_b) = (a.client().await, b.client().await);
    let mut on_a = subscribe(&client_a, json!({})).await;
    let mut on_b = subscribe(&client_b, json!({})).await;
    wait_for_presence(&client_a, 2).await;

    let at = Utc::now() + chrono::Duration::milliseconds(500);
    let mut expected = Vec::new();
    for i in 0..20 {
        let client = if i % 2 == 0 { &client_a } else { &client_b };
        let message = format!("scheduled {i}");
        let answer = publish(client, json!({"message": message, "at": at.to_rfc3339()})).await;
        assert_eq!(answer.status(), 202);
        expected.push(message);
    }
    for stream in [&mut on_a, &mut on_b] {
        let mut got: Vec<String> = Vec::new();
        while got.len() < expected.len() {
            got.push(next_notice(stream).await.1);
        }
        got.sort();
        let mut want = expected.clone();
        want.sort();
        assert_eq!(got, want);
    }
    assert!(Utc::now() >= at);
    publish_now(&client_a, json!({"message": "end"})).await;
    for stream in [&mut on_a, &mut on_b] {
        assert_eq!(
            next_notice(stream).await.1,
            "end",
            "no scheduled notice came twice"
        );
    }
    let listed = call(&client_b, "GET", "/notices", json!({})).await;
    assert_eq!(listed.params["items"].as_array().unwrap().len(), 21);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_on_one_instance_while_another_publishes_misses_nothing() {
    let Some(pg) = postgres().await else { return };
    let (a, b) = two_instances(&pg, "replay").await;
    let (client_a, client_b) = (a.client().await, b.client().await);
    let first = publish_now(&client_a, json!({"message": "first"})).await;
    let publisher = tokio::spawn(async move {
        let mut ids = vec![first];
        for i in 0..150 {
            ids.push(publish_now(&client_a, json!({"message": format!("n{i}")})).await);
        }
        ids
    });
    let mut received = Vec::new();
    let mut last = first - 1;
    while received.len() < 151 {
        let mut stream = subscribe(&client_b, json!({"last_event_id": last.to_string()})).await;
        for _ in 0..9 {
            if received.len() == 151 {
                break;
            }
            last = next_notice(&mut stream).await.0;
            received.push(last);
        }
    }
    let published = tokio::time::timeout(Duration::from_secs(60), publisher)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(received, published);
}

/// A notice committed while an instance starts, after it joined the cluster but before its
/// fan-out task first ran, still reaches that instance's live subscribers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notice_stored_while_an_instance_starts_is_fanned_out() {
    let Some(pg) = postgres().await else { return };
    let url = pg.create_database("joining").await;
    let store = Arc::new(
        NoticeBackend::open(&StoreSpec::Postgres(url), StoreOptions::default())
            .await
            .unwrap(),
    );
    let pool = store.postgres_pool().cloned().unwrap();
    let (cluster, listener) = Cluster::join(pool, &store).await.unwrap();
    let hub = Hub::new(16, 16, None);
    let mut subscription = hub.subscribe(Interest::default()).unwrap();
    let notice = NewNotice {
        message: "meanwhile".into(),
        topic: None,
        to: None,
        from: None,
    };
    let stored = store.insert(notice, Utc::now()).await.unwrap();

    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    tokio::spawn(cluster::run_fan_out(
        cluster,
        listener,
        store.clone(),
        hub.clone(),
        shutdown,
    ));
    let live = tokio::time::timeout(WAIT, subscription.recv())
        .await
        .expect("the notice was fanned out")
        .unwrap();
    assert_eq!((live.id, live.message.as_str()), (stored.id, "meanwhile"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_postgres_returns_notices_reach_live_subscribers_again() {
    let Some(mut pg) = postgres().await else {
        return;
    };
    let (a, b) = two_instances(&pg, "outage").await;
    let (client_a, client_b) = (a.client().await, b.client().await);
    let mut on_a = subscribe(&client_a, json!({})).await;
    wait_for_presence(&client_a, 1).await;
    publish_now(&client_b, json!({"message": "before"})).await;
    assert_eq!(next_notice(&mut on_a).await.1, "before");

    pg.kill9().await;
    let refused = publish(&client_b, json!({"message": "refused"})).await;
    assert_eq!(refused.status(), 503, "{refused:?}");
    assert_eq!(refused.error.as_deref(), Some("the store is unavailable"));

    pg.start_again().await;
    // Published on the other instance as soon as the store takes it: it reaches the subscriber
    // on `a` once `a` listens again (or its periodic catch-up reads it), and the refused one
    // never does.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let answer = publish(&client_b, json!({"message": "after"})).await;
        if answer.status() < 300 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "publishing never worked again: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(next_notice(&mut on_a).await.1, "after");
}
