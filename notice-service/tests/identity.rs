//! Who may do what, with requests carrying `auth` the way the gateway sets it for a verified
//! caller: each route's scope, a subscription named after its token's subject, whispers seen
//! only by their addressee (live, in replays and in the listing), and `from` on what a subject
//! publishes. Every scenario runs on the memory, SQLite and PostgreSQL stores.

mod common;

use common::*;
use notice_service::{store::StoreSpec, Config};
use serde_json::{json, Value};
use shared::{packet::Identity, PacketClient, ResponseStream};

const PUBLISH: &str = "notice:publish";
const SUBSCRIBE: &str = "notice:subscribe";
const NOTICE_ADMIN: &str = "notice:admin";

fn alice() -> Identity {
    caller(Some("alice"), &[SUBSCRIBE, PUBLISH])
}

fn bob() -> Identity {
    caller(Some("bob"), &[SUBSCRIBE, PUBLISH])
}

fn moderator() -> Identity {
    caller(Some("moderator"), &[SUBSCRIBE, NOTICE_ADMIN])
}

/// Runs a scenario against a fresh service on each store. PostgreSQL is skipped (the helper
/// says why) only outside CI, as in the rest of the suite.
macro_rules! on_every_store {
    ($scenario:ident) => {
        mod $scenario {
            use super::*;

            #[tokio::test]
            async fn memory() {
                super::$scenario(&TestService::with_store("mem").await).await;
            }

            #[tokio::test]
            async fn sqlite() {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("notices.db");
                let service = TestService::start(Config::standalone(StoreSpec::Sqlite(path))).await;
                super::$scenario(&service).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let Some(pg) = shared::testing::TestPostgres::start().await else {
                    return;
                };
                let url = pg.create_database(stringify!($scenario)).await;
                let service =
                    TestService::start(Config::standalone(StoreSpec::Postgres(url))).await;
                super::$scenario(&service).await;
            }
        }
    };
}

on_every_store!(a_stream_with_a_subject_takes_its_name);
on_every_store!(another_name_is_refused_unless_notice_admin);
on_every_store!(a_whisper_reaches_only_its_addressee_live_and_in_replay);
on_every_store!(the_listing_shows_a_whisper_to_its_addressee_and_admins_only);
on_every_store!(from_records_the_publishers_subject_and_cannot_be_forged);
on_every_store!(a_caller_without_the_routes_scope_is_refused);

/// Publishes as `auth`; the stored notice.
async fn publish_as(client: &PacketClient, auth: &Identity, params: Value) -> Value {
    let answer = call_as(client, auth, "POST", "/notices", params).await;
    assert_eq!(answer.status(), 201, "{answer:?}");
    answer.params
}

/// The messages of the notices `auth` lists.
async fn listed_as(client: &PacketClient, auth: Option<&Identity>, params: Value) -> Vec<String> {
    let answer = match auth {
        Some(auth) => call_as(client, auth, "GET", "/notices", params).await,
        None => call(client, "GET", "/notices", params).await,
    };
    assert_eq!(answer.status(), 200, "{answer:?}");
    answer.params["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["message"].as_str().unwrap().to_string())
        .collect()
}

/// The answer to a stream request that must be refused before the stream opens.
async fn refused(stream: &mut ResponseStream) -> shared::Packet {
    let answer = next_packet(stream).await;
    assert!(
        answer.event.is_none(),
        "no event before the refusal: {answer:?}"
    );
    answer
}

/// Reads notice events up to the one with `marker` as its message; the messages before it.
async fn messages_until(stream: &mut ResponseStream, marker: &str) -> Vec<String> {
    let mut messages = Vec::new();
    loop {
        let (_, message) = next_notice(stream).await;
        if message == marker {
            return messages;
        }
        messages.push(message);
    }
}

async fn a_stream_with_a_subject_takes_its_name(service: &TestService) {
    let client = service.client().await;
    let mut stream = subscribe_as(&client, &alice(), json!({})).await;
    let items = wait_for_presence(&client, 1).await;
    assert_eq!(items[0]["name"], "alice", "{items:?}");
    // Named alice, so alice's whispers reach it.
    publish_as(&client, &bob(), json!({"message": "psst", "to": "alice"})).await;
    assert_eq!(next_notice(&mut stream).await.1, "psst");
    // Asking for its own name is the same.
    let _again = subscribe_as(&client, &alice(), json!({"name": "alice"})).await;
    let items = wait_for_presence(&client, 2).await;
    assert!(items.iter().all(|i| i["name"] == "alice"), "{items:?}");
}

async fn another_name_is_refused_unless_notice_admin(service: &TestService) {
    let client = service.client().await;
    let mut as_bob = subscribe_as(&client, &bob(), json!({"name": "alice"})).await;
    let answer = refused(&mut as_bob).await;
    assert_eq!(answer.status(), 403, "{answer:?}");
    let error = answer.error.unwrap_or_default();
    assert!(error.contains("notice:admin"), "{error}");
    assert!(presence(&client).await.is_empty(), "bob never subscribed");

    // notice:admin, or admin which implies it, may watch alice's whispers.
    let admin = caller(Some("root"), &["admin"]);
    let mut watchers = Vec::new();
    for auth in [moderator(), admin] {
        watchers.push(subscribe_as(&client, &auth, json!({"name": "alice"})).await);
    }
    let items = wait_for_presence(&client, 2).await;
    assert!(items.iter().all(|i| i["name"] == "alice"), "{items:?}");
    publish_as(&client, &bob(), json!({"message": "psst", "to": "alice"})).await;
    for watcher in &mut watchers {
        assert_eq!(next_notice(watcher).await.1, "psst");
    }
}

async fn a_whisper_reaches_only_its_addressee_live_and_in_replay(service: &TestService) {
    let client = service.client().await;
    let mut alice_stream = subscribe_as(&client, &alice(), json!({"topics": "room"})).await;
    let mut bob_stream = subscribe_as(&client, &bob(), json!({"topics": "room"})).await;
    // Bob asking for alice's name gets nothing at all.
    let mut bob_as_alice = subscribe_as(&client, &bob(), json!({"name": "alice"})).await;
    assert_eq!(refused(&mut bob_as_alice).await.status(), 403);
    wait_for_presence(&client, 2).await;

    let carol = caller(Some("carol"), &[PUBLISH]);
    for notice in [
        json!({"message": "hello all"}),
        json!({"message": "psst alice", "to": "alice"}),
        json!({"message": "psst alice in room", "topic": "room", "to": "alice"}),
        json!({"message": "in room", "topic": "room"}),
        json!({"message": "end"}),
    ] {
        publish_as(&client, &carol, notice).await;
    }
    assert_eq!(
        messages_until(&mut alice_stream, "end").await,
        ["hello all", "psst alice", "psst alice in room", "in room"]
    );
    assert_eq!(
        messages_until(&mut bob_stream, "end").await,
        ["hello all", "in room"]
    );

    // Replays from the start apply the same rule.
    let mut bob_replay = subscribe_as(&client, &bob(), json!({"topics": "room", "after": 0})).await;
    assert_eq!(
        messages_until(&mut bob_replay, "end").await,
        ["hello all", "in room"]
    );
    let mut alice_replay = subscribe_as(
        &client,
        &alice(),
        json!({"topics": "room", "last_event_id": "0"}),
    )
    .await;
    assert_eq!(
        messages_until(&mut alice_replay, "end").await,
        ["hello all", "psst alice", "psst alice in room", "in room"]
    );
}

async fn the_listing_shows_a_whisper_to_its_addressee_and_admins_only(service: &TestService) {
    let client = service.client().await;
    for notice in [
        json!({"message": "hello all"}),
        json!({"message": "psst alice", "to": "alice"}),
        json!({"message": "in room", "topic": "room"}),
        json!({"message": "psst bob in room", "topic": "room", "to": "bob"}),
    ] {
        publish_as(&client, &alice(), notice).await;
    }
    let all = ["hello all", "psst alice", "in room", "psst bob in room"];
    assert_eq!(
        listed_as(&client, Some(&bob()), json!({})).await,
        ["hello all", "in room", "psst bob in room"]
    );
    assert_eq!(
        listed_as(&client, Some(&alice()), json!({})).await,
        ["hello all", "psst alice", "in room"]
    );
    assert_eq!(listed_as(&client, Some(&moderator()), json!({})).await, all);
    // An anonymous caller the gateway granted notice:subscribe is nobody's addressee.
    let anonymous = caller(None, &[SUBSCRIBE]);
    assert_eq!(
        listed_as(&client, Some(&anonymous), json!({})).await,
        ["hello all", "in room"]
    );
    // A cluster member calling directly is trusted, as before.
    assert_eq!(listed_as(&client, None, json!({})).await, all);
    // A topic filter does not widen it.
    let room = json!({"topic": "room"});
    assert_eq!(
        listed_as(&client, Some(&alice()), room.clone()).await,
        ["in room"]
    );
    assert_eq!(
        listed_as(&client, Some(&bob()), room.clone()).await,
        ["in room", "psst bob in room"]
    );
    assert_eq!(
        listed_as(&client, Some(&moderator()), room).await,
        ["in room", "psst bob in room"]
    );
}

async fn from_records_the_publishers_subject_and_cannot_be_forged(service: &TestService) {
    let client = service.client().await;
    let mut stream = subscribe_as(&client, &bob(), json!({})).await;
    wait_for_presence(&client, 1).await;

    let published = publish_as(&client, &alice(), json!({"message": "signed"})).await;
    assert_eq!(published["from"], "alice");
    let event = next_packet(&mut stream).await;
    assert_eq!(event.params["from"], "alice", "{event:?}");

    // Nobody may say who sent it, whatever they hold.
    for auth in [Some(alice()), Some(caller(Some("root"), &["admin"])), None] {
        let params = json!({"message": "forged", "from": "bob"});
        let answer = match &auth {
            Some(auth) => call_as(&client, auth, "POST", "/notices", params).await,
            None => call(&client, "POST", "/notices", params).await,
        };
        assert_eq!(answer.status(), 400, "{auth:?}: {answer:?}");
        assert!(answer.error.unwrap_or_default().contains("from"));
    }
    // Without a subject there is no sender.
    let anonymous = caller(None, &[PUBLISH]);
    assert_eq!(
        publish_as(&client, &anonymous, json!({"message": "unsigned"})).await["from"],
        Value::Null
    );
    let direct = publish(&client, json!({"message": "direct"})).await;
    assert_eq!(direct.params["from"], Value::Null);

    // A scheduled notice keeps its sender until it is published.
    let at = (chrono::Utc::now() + chrono::Duration::milliseconds(200)).to_rfc3339();
    let answer = call_as(
        &client,
        &alice(),
        "POST",
        "/notices",
        json!({"message": "later", "at": at}),
    )
    .await;
    assert_eq!(answer.status(), 202, "{answer:?}");
    // The stream got the rest, each with its sender.
    let mut senders = Vec::new();
    while senders.len() < 3 {
        let event = next_packet(&mut stream).await;
        let message = event.params["message"].as_str().unwrap().to_string();
        senders.push((message, event.params["from"].clone()));
    }
    let expected = [
        ("unsigned", Value::Null),
        ("direct", Value::Null),
        ("later", json!("alice")),
    ]
    .map(|(message, from)| (message.to_string(), from));
    assert_eq!(senders, expected);
    // And the listing shows the same senders.
    let listed = call(&client, "GET", "/notices", json!({})).await;
    let from: Vec<Value> = listed.params["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["from"].clone())
        .collect();
    assert_eq!(
        from,
        [json!("alice"), Value::Null, Value::Null, json!("alice")]
    );
}

#[tokio::test]
async fn from_survives_a_restart_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let config = || Config::standalone(StoreSpec::Sqlite(dir.path().join("notices.db")));
    let id = {
        let service = TestService::start(config()).await;
        let client = service.client().await;
        let published = publish_as(&client, &alice(), json!({"message": "kept"})).await;
        drop(client);
        service.stop().await;
        published["id"].clone()
    };
    let service = TestService::start(config()).await;
    let client = service.client().await;
    let listed = call_as(&client, &bob(), "GET", "/notices", json!({})).await;
    let items = listed.params["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{listed:?}");
    assert_eq!((&items[0]["id"], &items[0]["from"]), (&id, &json!("alice")));
    // A replay after the restart carries it too.
    let mut replay = subscribe_as(&client, &bob(), json!({"after": 0})).await;
    let event = next_packet(&mut replay).await;
    assert_eq!(event.params["from"], "alice", "{event:?}");
}

async fn a_caller_without_the_routes_scope_is_refused(service: &TestService) {
    let client = service.client().await;
    let reader = caller(Some("reader"), &[SUBSCRIBE]);
    let writer = caller(Some("writer"), &[PUBLISH]);
    let refusals = [
        (
            &reader,
            "POST",
            "/notices",
            json!({"message": "x"}),
            PUBLISH,
        ),
        (&writer, "GET", "/notices", json!({}), SUBSCRIBE),
        (
            &reader,
            "GET",
            "/notices/subscribers",
            json!({}),
            NOTICE_ADMIN,
        ),
        (
            &reader,
            "DELETE",
            "/notices/subscribers",
            json!({"params": "alice"}),
            NOTICE_ADMIN,
        ),
    ];
    for (auth, method, uri, params, scope) in refusals {
        let answer = call_as(&client, auth, method, uri, params).await;
        assert_eq!(answer.status(), 403, "{method} {uri}: {answer:?}");
        let error = answer.error.unwrap_or_default();
        assert!(error.contains(scope), "{method} {uri}: {error}");
    }
    let mut stream = subscribe_as(&client, &writer, json!({})).await;
    let answer = refused(&mut stream).await;
    assert_eq!(answer.status(), 403, "{answer:?}");
    assert!(answer.error.unwrap_or_default().contains(SUBSCRIBE));
    // None of it had an effect.
    assert!(presence(&client).await.is_empty());
    assert!(listed_as(&client, None, json!({})).await.is_empty());
    // With the scope, the same requests go through.
    publish_as(&client, &writer, json!({"message": "x"})).await;
    assert_eq!(listed_as(&client, Some(&reader), json!({})).await, ["x"]);
}
