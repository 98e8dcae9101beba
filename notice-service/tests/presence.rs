//! Presence events, unique names and rename on one instance, over real packet connections.
//! (Across instances on PostgreSQL: tests/postgres.rs; through the gateway: e2e.)

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

/// What a loopback caller of a development stack without a key gets from the gateway: no
/// subject, every scope.
fn anonymous() -> shared::packet::Identity {
    caller(None, &["admin"])
}

#[tokio::test]
async fn a_name_joins_once_with_its_first_tab_and_leaves_once_with_its_last() {
    let service = TestService::with_store("mem").await;
    let client = service.client().await;
    let mut watcher = subscribe(&client, json!({"topics": "room", "presence": "1"})).await;
    let mut other_room = subscribe(&client, json!({"topics": "hall", "presence": 1})).await;
    let mut no_presence = subscribe(&client, json!({"topics": "room"})).await;
    wait_for_presence(&client, 3).await;

    let tab_1 = subscribe(&client, json!({"name": "alice", "topics": "room"})).await;
    assert_eq!(next_presence(&mut watcher).await, "join alice@room");
    let tab_2 = subscribe(&client, json!({"name": "alice", "topics": "room"})).await;
    wait_for_presence(&client, 5).await;
    drop(tab_1);
    wait_for_presence(&client, 4).await;
    drop(tab_2);
    assert_eq!(next_presence(&mut watcher).await, "leave alice@room");

    // A notice still arrives in between, with its id; the others heard nothing of room.
    let id = publish_now(&client, json!({"message": "after", "topic": "room"})).await;
    assert_eq!(next_notice(&mut watcher).await, (id, "after".to_string()));
    assert_eq!(next_notice(&mut no_presence).await.0, id);
    assert_quiet(&mut other_room, Duration::from_millis(300)).await;

    // Presence by topic.
    let room = call(
        &client,
        "GET",
        "/notices/subscribers",
        json!({"topic": "room"}),
    )
    .await;
    assert_eq!(
        room.params["items"].as_array().unwrap().len(),
        2,
        "{room:?}"
    );
    let hall = call(
        &client,
        "GET",
        "/notices/subscribers",
        json!({"topic": "hall"}),
    )
    .await;
    assert_eq!(
        hall.params["items"].as_array().unwrap().len(),
        1,
        "{hall:?}"
    );
}

#[tokio::test]
async fn a_kicked_name_leaves() {
    let service = TestService::with_store("mem").await;
    let client = service.client().await;
    let mut watcher = subscribe(&client, json!({"topics": "room", "presence": "true"})).await;
    let mut bob = subscribe(&client, json!({"name": "bob", "topics": "room,hall"})).await;
    assert_eq!(next_presence(&mut watcher).await, "join bob@room");
    let kicked = kick(&client, "bob").await;
    assert_eq!(kicked.status(), 200);
    assert_eq!(next_packet(&mut bob).await.event.as_deref(), Some("kicked"));
    assert_eq!(next_presence(&mut watcher).await, "leave bob@room");
}

#[tokio::test]
async fn a_chosen_name_is_refused_to_another_client_with_409() {
    let service = TestService::with_store("mem").await;
    let client = service.client().await;
    let anonymous = anonymous();
    let mut first_tab =
        subscribe_as(&client, &anonymous, json!({"name": "ann", "client": "c-1"})).await;
    wait_for_presence(&client, 1).await;
    // The same client's second tab shares the name.
    let _second_tab =
        subscribe_as(&client, &anonymous, json!({"name": "ann", "client": "c-1"})).await;
    wait_for_presence(&client, 2).await;
    for params in [
        json!({"name": "ann", "client": "c-2"}),
        json!({"name": "ann"}),
    ] {
        let mut thief = subscribe_as(&client, &anonymous, params).await;
        let refusal = next_packet(&mut thief).await;
        assert_eq!(refusal.status(), 409, "{refusal:?}");
        assert!(
            refusal.error.as_deref().unwrap().contains("in use"),
            "{refusal:?}"
        );
    }
    // So nobody reads ann's whispers by taking her name.
    let id = publish_now(&client, json!({"message": "psst", "to": "ann"})).await;
    assert_eq!(next_notice(&mut first_tab).await.0, id);
    // Once ann is gone the name is free again.
    drop(first_tab);
    drop(_second_tab);
    wait_for_presence(&client, 0).await;
    let mut later =
        subscribe_as(&client, &anonymous, json!({"name": "ann", "client": "c-2"})).await;
    let id = publish_now(&client, json!({"message": "hello", "to": "ann"})).await;
    assert_eq!(next_notice(&mut later).await.0, id);
}

#[tokio::test]
async fn rename_moves_the_streams_and_announces_it() {
    let service = TestService::with_store("mem").await;
    let client = service.client().await;
    let mut watcher = subscribe(&client, json!({"topics": "room", "presence": "1"})).await;
    let mut alice = subscribe(&client, json!({"name": "alice", "topics": "room"})).await;
    let _bob = subscribe(&client, json!({"name": "bob"})).await;
    assert_eq!(next_presence(&mut watcher).await, "join alice@room");

    let rename = |from: &str, to: &str, who: shared::packet::Identity| {
        let client = client.clone();
        let path = format!("{from}/rename");
        let to = to.to_string();
        async move {
            let params = json!({"params": path, "to": to});
            call_as(&client, &who, "POST", "/notices/subscribers", params).await
        }
    };
    // Only an admin or the subject itself.
    let refused = rename(
        "alice",
        "ally",
        caller(Some("mallory"), &["notice:subscribe"]),
    )
    .await;
    assert_eq!(refused.status(), 403, "{refused:?}");
    let taken = rename("alice", "bob", anonymous()).await;
    assert_eq!(taken.status(), 409, "{taken:?}");
    let unknown = rename("nobody", "x", anonymous()).await;
    assert_eq!(unknown.status(), 404, "{unknown:?}");
    let bad = rename("alice", "a\nb", anonymous()).await;
    assert_eq!(bad.status(), 400, "{bad:?}");
    let missing = call(
        &client,
        "POST",
        "/notices/subscribers",
        json!({"params": "alice/rename"}),
    )
    .await;
    assert_eq!(missing.status(), 400, "{missing:?}");

    let renamed = rename(
        "alice",
        "ally",
        caller(Some("alice"), &["notice:subscribe"]),
    )
    .await;
    assert_eq!(renamed.status(), 200, "{renamed:?}");
    assert_eq!(renamed.params, json!({"renamed": 1, "name": "ally"}));
    assert_eq!(next_presence(&mut watcher).await, "leave alice@room");
    assert_eq!(next_presence(&mut watcher).await, "join ally@room");
    // Whispers follow the new name.
    publish_now(&client, json!({"message": "old", "to": "alice"})).await;
    let id = publish_now(&client, json!({"message": "new", "to": "ally"})).await;
    assert_eq!(next_notice(&mut alice).await, (id, "new".to_string()));
}

#[tokio::test]
async fn bad_presence_params_get_a_400() {
    let service = TestService::with_store("mem").await;
    let client = service.client().await;
    let mut stream = subscribe(&client, json!({"presence": "perhaps"})).await;
    let refusal = next_packet(&mut stream).await;
    assert_eq!(refusal.status(), 400, "{refusal:?}");
}
