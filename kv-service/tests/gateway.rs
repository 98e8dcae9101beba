//! kv-service behind the real gateway and distributor (all in process, on port 0), spoken to
//! over HTTP the way curl does: the REST contract end to end, and two replicas on one PostgreSQL
//! database behind the gateway's round-robin.

mod common;

use std::{net::SocketAddr, time::Duration};

use common::{kv_store, Backend, Service, WAIT};
use kv_service::{config::StoreSpec, text_protocol::OwnedReply, Config};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A distributor and a gateway; stopped on drop.
struct Stack {
    distributor: SocketAddr,
    gateway: SocketAddr,
    http: reqwest::Client,
    shutdown: CancellationToken,
}

impl Stack {
    async fn start() -> Stack {
        let shutdown = CancellationToken::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let distributor = listener.local_addr().unwrap();
        tokio::spawn(distributor::run(
            listener,
            distributor::Config::default(),
            shutdown.clone(),
        ));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gateway = listener.local_addr().unwrap();
        let config = gateway::Config {
            distributor: Some(distributor.to_string()),
            ..gateway::Config::default()
        };
        tokio::spawn(gateway::run(listener, config, shutdown.clone()));
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(WAIT)
            .build()
            .unwrap();
        Stack {
            distributor,
            gateway,
            http,
            shutdown,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.gateway)
    }

    /// A kv-service registered with this stack's distributor.
    async fn kv(&self, store: StoreSpec) -> Service {
        let mut config = Config::standalone(store);
        config.node.distributor = Some(self.distributor.to_string());
        config.node.advertise_host = Some("127.0.0.1".into());
        Service::start_with(config).await
    }

    /// Waits until the gateway routes `GET/kv` to `nodes` connected nodes.
    async fn wait_for_kv_nodes(&self, nodes: usize) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(response) = self.http.get(self.url("/_/topology")).send().await {
                if let Ok(topology) = response.json::<Value>().await {
                    let connected = topology["routes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|route| route["url"] == "GET/kv")
                        .flat_map(|route| route["nodes"].as_array().into_iter().flatten())
                        .filter(|node| node["connected"] == true)
                        .count();
                    if connected == nodes {
                        return;
                    }
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the gateway never routed GET/kv to {nodes} nodes"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> (StatusCode, Value) {
        let response = request.send().await.expect("the gateway answers");
        let status = response.status();
        let body = response.json().await.expect("a JSON body");
        (status, body)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rest_contract_through_the_gateway() {
    let stack = Stack::start().await;
    let kv = stack.kv(StoreSpec::Memory).await;
    stack.wait_for_kv_nodes(1).await;
    let http = &stack.http;

    // PUT with a plain text body, then a JSON body.
    let (status, body) = stack
        .send(http.put(stack.url("/kv/hello")).body("world"))
        .await;
    assert_eq!(
        (status, body),
        (
            StatusCode::OK,
            json!({"key": "hello", "value": "world", "version": 1, "revision": 1, "expires_at": null})
        )
    );
    let (status, body) = stack
        .send(
            http.put(stack.url("/kv/hello"))
                .json(&json!({"value": "again"})),
        )
        .await;
    assert_eq!(
        (status, body["version"].clone()),
        (StatusCode::OK, json!(2))
    );

    // if_version, in the body and in the query string.
    let (status, body) = stack
        .send(
            http.put(stack.url("/kv/hello"))
                .json(&json!({"value": "x", "if_version": 1})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("current version is 2"),
        "{body}"
    );
    let (status, body) = stack
        .send(
            http.put(stack.url("/kv/hello?if_version=2"))
                .json(&json!({"value": "third"})),
        )
        .await;
    assert_eq!(
        (status, body["version"].clone()),
        (StatusCode::OK, json!(3))
    );

    let (status, body) = stack.send(http.get(stack.url("/kv/hello"))).await;
    assert_eq!(
        (status, body),
        (
            StatusCode::OK,
            json!({"key": "hello", "value": "third", "version": 3, "revision": 3, "expires_at": null})
        )
    );

    // POST creates once.
    let (status, body) = stack
        .send(
            http.post(stack.url("/kv"))
                .json(&json!({"key": "new", "value": "v"})),
        )
        .await;
    assert_eq!(
        (status, body),
        (
            StatusCode::CREATED,
            json!({"key": "new", "value": "v", "version": 1, "revision": 4, "expires_at": null})
        )
    );
    let (status, body) = stack
        .send(
            http.post(stack.url("/kv"))
                .json(&json!({"key": "new", "value": "w"})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body, json!({"error": "key already exists: new"}));

    // Listing with query parameters.
    for key in ["p/1", "p/2", "p/3"] {
        stack
            .send(http.put(stack.url(&format!("/kv/{key}"))).body(key))
            .await;
    }
    let (status, body) = stack
        .send(http.get(stack.url("/kv?prefix=p/&limit=2")))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"items": [
            {"key": "p/1", "value": "p/1", "version": 1, "revision": 5, "expires_at": null},
            {"key": "p/2", "value": "p/2", "version": 1, "revision": 6, "expires_at": null},
        ], "next": "p/2", "revision": 7})
    );
    let (_, body) = stack
        .send(http.get(stack.url("/kv?prefix=p/&after=p/2")))
        .await;
    assert_eq!(body["items"].as_array().unwrap().len(), 1);
    assert_eq!(body["next"], Value::Null);
    let (status, body) = stack.send(http.get(stack.url("/kv?limit=5000"))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"].as_str().unwrap().contains("limit"), "{body}");

    // Awkward keys, percent-encoded in the path.
    let (status, body) = stack
        .send(
            http.put(stack.url("/kv/a%2Cb%C2%B6%3C%3E"))
                .json(&json!({"value": "¶ \"q\" <>\n"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["key"], "a,b¶<>");
    let mut text = kv.text().await;
    assert_eq!(
        text.call("get<a\\,b¶\\<\\>>").await,
        OwnedReply::Value("¶ \"q\" <>\n".into())
    );

    // Errors.
    let (status, body) = stack.send(http.get(stack.url("/kv/missing"))).await;
    assert_eq!(
        (status, body),
        (
            StatusCode::NOT_FOUND,
            json!({"error": "no such key: missing"})
        )
    );
    let (status, body) = stack
        .send(
            http.put(stack.url(&format!("/kv/{}", "k".repeat(1025))))
                .body("v"),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"].as_str().unwrap().contains("1024 bytes"),
        "{body}"
    );

    // DELETE.
    let (status, body) = stack.send(http.delete(stack.url("/kv/hello"))).await;
    assert_eq!(
        (status, body),
        (
            StatusCode::OK,
            json!({"key": "hello", "deleted": true, "revision": 9})
        )
    );
    let (status, _) = stack.send(http.delete(stack.url("/kv/hello"))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = stack.send(http.get(stack.url("/kv/hello"))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    kv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_postgres_behind_the_gateway() {
    let Some(fixture) = kv_store(Backend::Postgres).await else {
        return;
    };
    let stack = Stack::start().await;
    let a = stack.kv(fixture.spec.clone()).await;
    let b = stack.kv(fixture.spec.clone()).await;
    stack.wait_for_kv_nodes(2).await;
    let http = &stack.http;

    // Round-robin alternates replicas, so reading right after writing crosses replicas.
    for i in 0..20 {
        let url = stack.url(&format!("/kv/item{i}"));
        let (status, body) = stack.send(http.put(&url).body(format!("v{i}"))).await;
        assert_eq!(
            (status, body["version"].clone()),
            (StatusCode::OK, json!(1))
        );
        for _ in 0..2 {
            let (status, body) = stack.send(http.get(&url)).await;
            assert_eq!(
                (status, body),
                (
                    StatusCode::OK,
                    json!({"key": format!("item{i}"), "value": format!("v{i}"), "version": 1,
                        "revision": i + 1, "expires_at": null})
                )
            );
        }
    }

    // Both replicas really hold the data (asked directly, not through the gateway).
    let (mut text_a, mut text_b) = (a.text().await, b.text().await);
    assert_eq!(
        text_a.call("get<item7>").await,
        OwnedReply::Value("v7".into())
    );
    assert_eq!(
        text_b.call("get<item7>").await,
        OwnedReply::Value("v7".into())
    );

    // Concurrent puts through the gateway, spread over both replicas: no lost version.
    let mut tasks = Vec::new();
    for i in 0..60 {
        let request = http.put(stack.url("/kv/hot")).body(i.to_string());
        tasks.push(tokio::spawn(async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            response.json::<Value>().await.unwrap()["version"]
                .as_i64()
                .unwrap()
        }));
    }
    let mut versions = Vec::new();
    for task in tasks {
        versions.push(tokio::time::timeout(WAIT, task).await.unwrap().unwrap());
    }
    versions.sort();
    assert_eq!(versions, (1..=60).collect::<Vec<i64>>());
    let (_, body) = stack.send(http.get(stack.url("/kv/hot"))).await;
    assert_eq!(body["version"], 60);

    // One replica stops: the other keeps serving everything.
    a.stop().await;
    stack.wait_for_kv_nodes(1).await;
    let (status, body) = stack.send(http.get(stack.url("/kv/item3"))).await;
    assert_eq!(
        (status, body["value"].clone()),
        (StatusCode::OK, json!("v3"))
    );
    b.stop().await;
}
