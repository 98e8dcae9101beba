//! Several notice-service instances on one real PostgreSQL database behave as one service.

mod common;

use std::{collections::HashMap, sync::Arc, time::Duration};

use chrono::Utc;
use common::*;
use notice_service::{
    cluster::{self, Cluster},
    hub::{Hub, Live},
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

    let kicked = kick(&client_b, "alice").await;
    assert_eq!(kicked.params, json!({"kicked": 2}), "{kicked:?}");
    for stream in [&mut alice_on_a, &mut alice_on_b] {
        assert_eq!(next_packet(stream).await.event.as_deref(), Some("kicked"));
        assert!(next_packet(stream).await.end);
    }
    for client in [&client_a, &client_b] {
        let items = wait_for_presence(client, 1).await;
        assert_eq!(items[0]["name"], "bob");
    }
    let none = kick(&client_a, "alice").await;
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
    let Live::Notice(live) = live else {
        panic!("expected a notice, got {live:?}")
    };
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_with_tabs_on_two_instances_joins_once_and_leaves_once_everywhere() {
    let Some(pg) = postgres().await else { return };
    let (a, b) = two_instances(&pg, "presence_events").await;
    let (client_a, client_b) = (a.client().await, b.client().await);
    let presence = json!({"topics": "room", "presence": "1"});
    let mut watcher_a = subscribe(&client_a, presence.clone()).await;
    let mut watcher_b = subscribe(&client_b, presence).await;
    wait_for_presence(&client_a, 2).await;

    // alice opens a tab on each instance, then a third; bob opens one on b.
    let tab_a = subscribe(&client_a, json!({"name": "alice", "topics": "room"})).await;
    let tab_b = subscribe(&client_b, json!({"name": "alice", "topics": "room"})).await;
    let tab_b2 = subscribe(&client_b, json!({"name": "alice", "topics": "room"})).await;
    let bob = subscribe(&client_b, json!({"name": "bob", "topics": "room"})).await;
    wait_for_presence(&client_a, 6).await;
    drop((tab_b, tab_a));
    wait_for_presence(&client_b, 4).await;
    drop((tab_b2, bob));
    for watcher in [&mut watcher_a, &mut watcher_b] {
        let mut events = Vec::new();
        for _ in 0..4 {
            events.push(next_presence(watcher).await);
        }
        // Per name in order; the two names may interleave either way.
        let of = |name: &str| -> Vec<String> {
            events
                .iter()
                .filter(|e| e.contains(name))
                .cloned()
                .collect()
        };
        assert_eq!(of("alice"), ["join alice@room", "leave alice@room"]);
        assert_eq!(of("bob"), ["join bob@room", "leave bob@room"]);
        assert_quiet(watcher, Duration::from_millis(1500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_and_renames_hold_across_instances() {
    let Some(pg) = postgres().await else { return };
    let (a, b) = two_instances(&pg, "names").await;
    let (client_a, client_b) = (a.client().await, b.client().await);
    let anonymous = caller(None, &["admin"]);
    let mut watcher = subscribe(&client_a, json!({"topics": "room", "presence": "1"})).await;
    let mut ann = subscribe_as(
        &client_a,
        &anonymous,
        json!({"name": "ann", "topics": "room", "client": "c-1"}),
    )
    .await;
    assert_eq!(next_presence(&mut watcher).await, "join ann@room");
    // Another client cannot take ann's name on the other instance; her own client can.
    let mut thief = subscribe_as(
        &client_b,
        &anonymous,
        json!({"name": "ann", "client": "c-2"}),
    )
    .await;
    assert_eq!(next_packet(&mut thief).await.status(), 409);
    let ann_tab = subscribe_as(
        &client_b,
        &anonymous,
        json!({"name": "ann", "topics": "room", "client": "c-1"}),
    )
    .await;
    wait_for_presence(&client_a, 3).await;

    // Renamed on both instances at once, announced once.
    let renamed = call_as(
        &client_b,
        &anonymous,
        "POST",
        "/notices/subscribers",
        json!({"params": "ann/rename", "to": "anna"}),
    )
    .await;
    assert_eq!(
        renamed.params,
        json!({"renamed": 2, "name": "anna"}),
        "{renamed:?}"
    );
    // Each instance renames its own tab; whichever goes first, ann leaves once and anna joins
    // once.
    let mut events = vec![
        next_presence(&mut watcher).await,
        next_presence(&mut watcher).await,
    ];
    events.sort();
    assert_eq!(events, ["join anna@room", "leave ann@room"]);
    assert_quiet(&mut watcher, Duration::from_millis(1500)).await;
    let id = publish_now(&client_b, json!({"message": "hi anna", "to": "anna"})).await;
    assert_eq!(next_notice(&mut ann).await.0, id);
    drop(ann_tab);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subscribers_of_a_killed_instance_leave() {
    let Some(pg) = postgres().await else { return };
    let url = pg.create_database("killed").await;
    let a = TestService::start(Config::standalone(StoreSpec::Postgres(url.clone()))).await;
    let client_a = a.client().await;
    let mut watcher = subscribe(&client_a, json!({"topics": "room", "presence": "1"})).await;

    let addr = format!("127.0.0.1:{}", shared::testing::free_port());
    let mut command = shared::testing::process::clean_command(
        env!("CARGO_BIN_EXE_notice-service"),
        &["NOTICE_STORE", "NOTICE_LISTEN", "NOTICE_DISTRIBUTOR"],
    );
    command.args(["--distributor", "", "--listen", &addr, "--store", &url]);
    let (instance_b, ()) = shared::testing::process::Serving::start(command, |line| {
        line.contains("serving").then_some(())
    })
    .await;
    let client_b = shared::PacketClient::connect(addr, shared::Dialect::Packet);
    tokio::time::timeout(WAIT, client_b.connected())
        .await
        .expect("instance b accepts connections");
    let _carol = subscribe(&client_b, json!({"name": "carol", "topics": "room"})).await;
    assert_eq!(next_presence(&mut watcher).await, "join carol@room");

    // kill -9: no clean leave. The others notice the heartbeat stopped (15 s) and say so once.
    instance_b.stop().await;
    let leave = tokio::time::timeout(Duration::from_secs(40), async {
        loop {
            let packet = watcher.next().await.expect("open").expect("not failed");
            if !packet.is_empty_event() {
                return packet;
            }
        }
    })
    .await
    .expect("carol leaves once her instance's heartbeat is stale");
    assert_eq!(leave.event.as_deref(), Some("leave"), "{leave:?}");
    assert_eq!(leave.params["name"], "carol");
    wait_for_presence(&client_a, 1).await;
}
