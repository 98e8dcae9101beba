//! Two kv-service replicas on one PostgreSQL database serve the same data: a write through one
//! is read through the other at once, concurrent puts through both never lose a version, a
//! watch on either sees both's writes in revision order, and a key expires once.

mod common;

use common::{call, concurrent_put_versions, kv_store, Backend, Service, WAIT};
use kv_service::text_protocol::OwnedReply;
use serde_json::{json, Value};
use shared::{Packet, PacketClient, ResponseStream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_postgres_serve_the_same_data() {
    let Some(fixture) = kv_store(Backend::Postgres).await else {
        return;
    };
    // Started together: both apply migrations at once, which must be safe.
    let (a, b) = tokio::join!(
        Service::start(fixture.spec.clone()),
        Service::start(fixture.spec.clone())
    );
    let (rest_a, rest_b) = (a.rest().await, b.rest().await);
    let (mut text_a, mut text_b) = (a.text().await, b.text().await);

    // Read your own write through the other replica, for every pair of doors.
    for i in 0..20 {
        let key = format!("k{i}");
        let (status, _, _) = call(
            &rest_a,
            "PUT",
            json!({"params": key, "value": format!("a{i}")}),
        )
        .await
        .unwrap();
        assert_eq!(status, 200);
        let (status, body, _) = call(&rest_b, "GET", json!({"params": key})).await.unwrap();
        assert_eq!(
            (status, body["value"].as_str()),
            (200, Some(format!("a{i}").as_str()))
        );
        assert_eq!(
            text_b.call(format!("get<{key}>")).await,
            OwnedReply::Value(format!("a{i}"))
        );
        assert_eq!(
            text_b.call(format!("put<{key},b{i}>")).await,
            OwnedReply::Ok(key.clone())
        );
        assert_eq!(
            text_a.call(format!("get<{key}>")).await,
            OwnedReply::Value(format!("b{i}"))
        );
        let (_, body, _) = call(&rest_a, "GET", json!({"params": key})).await.unwrap();
        assert_eq!(body["version"], 2);
    }

    // Deletes and conflicts are seen across replicas too.
    assert_eq!(text_a.call("del<k0>").await, OwnedReply::Ok("k0".into()));
    assert_eq!(text_b.call("get<k0>").await, OwnedReply::None("k0".into()));
    let (status, _, _) = call(&rest_a, "POST", json!({"key": "once", "value": "a"}))
        .await
        .unwrap();
    assert_eq!(status, 201);
    let (status, _, _) = call(&rest_b, "POST", json!({"key": "once", "value": "b"}))
        .await
        .unwrap();
    assert_eq!(status, 409);

    // Concurrent puts on one key through both replicas: every version handed out once.
    let versions = concurrent_put_versions(&[rest_a.clone(), rest_b.clone()], 100).await;
    assert_eq!(versions, (1..=100).collect::<Vec<i64>>());

    drop((rest_a, rest_b));
    a.stop().await;
    b.stop().await;
}

/// The next event of a watch stream.
async fn next_event(stream: &mut ResponseStream) -> Packet {
    let packet = tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("an event in time")
        .expect("the stream goes on")
        .expect("a well-formed packet");
    assert!(packet.stream && !packet.end, "{packet:?}");
    packet
}

/// Opens a watch of the prefix `r/` on `client`, past its opening empty event.
async fn watch(client: &PacketClient, from: Option<i64>) -> ResponseStream {
    let mut params = json!({"prefix": "r/", "watch": "1"});
    if let Some(from) = from {
        params["from_revision"] = json!(from);
    }
    let mut stream = client
        .stream(Packet::request("GET", "/kv", params))
        .await
        .unwrap();
    let opened = next_event(&mut stream).await;
    assert_eq!((opened.event, opened.params), (None, Value::Null));
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_on_one_replica_sees_every_replicas_writes_and_one_expiry() {
    let Some(fixture) = kv_store(Backend::Postgres).await else {
        return;
    };
    let (a, b) = tokio::join!(
        Service::start(fixture.spec.clone()),
        Service::start(fixture.spec.clone())
    );
    let (rest_a, rest_b) = (a.rest().await, b.rest().await);
    let mut on_b = watch(&rest_b, None).await;

    // Writes through both replicas at once: the watcher on B gets them all, in revision order.
    let writers: Vec<_> = [rest_a.clone(), rest_b.clone()]
        .into_iter()
        .enumerate()
        .map(|(n, client)| {
            tokio::spawn(async move {
                for i in 0..25 {
                    let params = json!({"params": format!("r/{n}"), "value": i.to_string()});
                    assert_eq!(call(&client, "PUT", params).await.unwrap().0, 200);
                }
            })
        })
        .collect();
    let mut revisions = Vec::new();
    for _ in 0..50 {
        let event = next_event(&mut on_b).await;
        assert_eq!(event.event.as_deref(), Some("put"));
        revisions.push(event.id.unwrap().as_i64().unwrap());
    }
    for writer in writers {
        writer.await.unwrap();
    }
    assert_eq!(revisions, (1..=50).collect::<Vec<_>>());

    // A replay from B of what was written, opened on A.
    let mut on_a = watch(&rest_a, Some(45)).await;
    for revision in 46..=50 {
        assert_eq!(next_event(&mut on_a).await.id, Some(json!(revision)));
    }

    // A key with a time to live: both replicas sweep, exactly one expire event is recorded.
    let params = json!({"params": "r/short", "value": "v", "ttl": "200ms"});
    let (status, body, _) = call(&rest_a, "PUT", params).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body["expires_at"].is_string());
    let mut expiries = 0;
    for stream in [&mut on_a, &mut on_b] {
        let put = next_event(stream).await;
        assert_eq!(put.params["key"], "r/short");
        let expired = next_event(stream).await;
        assert_eq!(
            (expired.event.as_deref(), &expired.params["key"]),
            (Some("expire"), &json!("r/short"))
        );
    }
    // Give both sweepers several more rounds, then mark the end of the log with a write: any
    // second expire event would come before it.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let params = json!({"params": "r/end", "value": "v"});
    assert_eq!(call(&rest_b, "PUT", params).await.unwrap().0, 200);
    for stream in [&mut on_a, &mut on_b] {
        loop {
            let event = next_event(stream).await;
            if event.params["key"] == "r/end" {
                break;
            }
            expiries += 1;
        }
    }
    assert_eq!(expiries, 0, "no second expire event on either replica");
    let (status, _, _) = call(&rest_b, "GET", json!({"params": "r/short"}))
        .await
        .unwrap();
    assert_eq!(status, 404);

    drop((on_a, on_b, rest_a, rest_b));
    a.stop().await;
    b.stop().await;
}
