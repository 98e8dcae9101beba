//! Two kv-service replicas on one PostgreSQL database serve the same data: a write through one
//! is read through the other at once, and concurrent puts through both never lose a version.

mod common;

use common::{call, concurrent_put_versions, kv_store, Backend, Service};
use kv_service::text_protocol::OwnedReply;
use serde_json::json;

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
