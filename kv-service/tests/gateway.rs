//! kv-service behind the real gateway and distributor (all in process, on port 0), spoken to
//! over HTTP the way curl does: the REST contract end to end, watches as Server-Sent Events,
//! keys with a time to live, transactions, and two replicas on one PostgreSQL database behind
//! the gateway's round-robin.

mod common;

use std::{net::SocketAddr, time::Duration};

use common::{kv_store, Backend, Service, WAIT};
use e2e::sse::{Event as SseEvent, EventStream};
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
        self.kv_with(Config::standalone(store)).await
    }

    /// A kv-service with `config`, registered with this stack's distributor.
    async fn kv_with(&self, mut config: Config) -> Service {
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

/// Reads events until one with revision `revision` (or a non-change event) arrives.
async fn events_until(stream: &mut EventStream, revision: i64) -> Vec<SseEvent> {
    let mut events = Vec::new();
    loop {
        let event = stream.next_within(WAIT).await.expect("an event");
        let done = event.json()["revision"]
            .as_i64()
            .is_none_or(|seen| seen >= revision);
        events.push(event);
        if done {
            return events;
        }
    }
}

/// Revision, event name, key and value of change events, for comparing.
fn changes(events: &[SseEvent]) -> Vec<(String, String, String, Value)> {
    events
        .iter()
        .map(|event| {
            let data = event.json();
            assert_eq!(
                event.id.as_deref(),
                Some(data["revision"].to_string().as_str())
            );
            (
                event.id.clone().unwrap_or_default(),
                event.event.clone().unwrap_or_default(),
                data["key"].as_str().unwrap_or_default().to_owned(),
                data["value"].clone(),
            )
        })
        .collect()
}

fn change(id: &str, event: &str, key: &str, value: Value) -> (String, String, String, Value) {
    (id.into(), event.into(), key.into(), value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_a_key_and_a_prefix_as_server_sent_events() {
    let stack = Stack::start().await;
    let _kv = stack.kv(StoreSpec::Memory).await;
    stack.wait_for_kv_nodes(1).await;
    let http = &stack.http;
    let mut key = EventStream::open(http, &stack.url("/kv/a?watch=1"), None)
        .await
        .unwrap();
    let mut prefix = EventStream::open(http, &stack.url("/kv?prefix=p/&watch=1"), None)
        .await
        .unwrap();

    stack.send(http.put(stack.url("/kv/a")).body("1")).await;
    stack.send(http.put(stack.url("/kv/p/1")).body("x")).await;
    stack.send(http.put(stack.url("/kv/other")).body("y")).await;
    let (status, _) = stack.send(http.delete(stack.url("/kv/a"))).await;
    assert_eq!(status, StatusCode::OK);
    stack.send(http.put(stack.url("/kv/p/2")).body("z")).await;

    let events = events_until(&mut key, 4).await;
    assert_eq!(
        changes(&events),
        [
            change("1", "put", "a", json!("1")),
            change("4", "delete", "a", Value::Null),
        ]
    );
    assert_eq!(
        events[1].json(),
        json!({"key": "a", "version": 1, "revision": 4})
    );
    let events = events_until(&mut prefix, 5).await;
    assert_eq!(
        changes(&events),
        [
            change("2", "put", "p/1", json!("x")),
            change("5", "put", "p/2", json!("z")),
        ]
    );
    assert_eq!(
        events[0].json(),
        json!({"key": "p/1", "value": "x", "version": 1, "revision": 2})
    );

    // Without `watch`, the same route answers once.
    let (status, body) = stack.send(http.get(stack.url("/kv/p/1"))).await;
    assert_eq!(
        (status, body["revision"].clone()),
        (StatusCode::OK, json!(2))
    );
    let (status, body) = stack.send(http.get(stack.url("/kv/a?watch=maybe"))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_with_from_revision_or_last_event_id_misses_nothing_during_writes() {
    const WRITES: i64 = 300;
    let stack = Stack::start().await;
    let _kv = stack.kv(StoreSpec::Memory).await;
    stack.wait_for_kv_nodes(1).await;
    let writer = {
        let http = stack.http.clone();
        let base = stack.url("/kv/w/");
        tokio::spawn(async move {
            for i in 0..WRITES {
                let response = http
                    .put(format!("{base}{}", i % 7))
                    .body(i.to_string())
                    .send()
                    .await;
                assert_eq!(response.unwrap().status(), StatusCode::OK);
            }
        })
    };
    // Three watchers one after the other, each taking a share of the changes while the writes
    // go on, each resuming where the last one stopped.
    let mut seen: Vec<i64> = Vec::new();
    let mut last = 0;
    for round in 0..3 {
        let mut stream = match round {
            0 => {
                EventStream::open(
                    &stack.http,
                    &stack.url("/kv?prefix=w/&watch=1&from_revision=0"),
                    None,
                )
                .await
            }
            1 => {
                EventStream::open(
                    &stack.http,
                    &stack.url("/kv?prefix=w/&watch=1"),
                    Some(&last.to_string()),
                )
                .await
            }
            _ => {
                EventStream::open(
                    &stack.http,
                    &stack.url(&format!("/kv?prefix=w/&watch=1&from_revision={last}")),
                    None,
                )
                .await
            }
        }
        .unwrap();
        let share = if round == 2 { WRITES - last } else { 100 };
        for _ in 0..share {
            let event = stream.next_within(WAIT).await.unwrap();
            assert_eq!(event.event.as_deref(), Some("put"));
            let revision: i64 = event.id.as_deref().unwrap().parse().unwrap();
            assert_eq!(event.json()["value"], json!((revision - 1).to_string()));
            seen.push(revision);
            last = revision;
        }
    }
    tokio::time::timeout(WAIT, writer).await.unwrap().unwrap();
    assert_eq!(
        seen,
        (1..=WRITES).collect::<Vec<_>>(),
        "no gap, no duplicate, in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_point_the_history_no_longer_holds_gets_a_reset() {
    let stack = Stack::start().await;
    let mut config = Config::standalone(StoreSpec::Memory);
    config.history = 5;
    let _kv = stack.kv_with(config).await;
    stack.wait_for_kv_nodes(1).await;
    let http = &stack.http;
    for i in 0..20 {
        stack
            .send(http.put(stack.url("/kv/h")).body(i.to_string()))
            .await;
    }
    // Each round's live put moves the revision on by one.
    for (from, current) in [("1", 20), ("999", 21)] {
        let url = stack.url(&format!("/kv/h?watch=1&from_revision={from}"));
        let mut stream = EventStream::open(http, &url, None).await.unwrap();
        let reset = stream.next_within(WAIT).await.unwrap();
        assert_eq!(
            (reset.event.as_deref(), reset.id.as_deref()),
            (Some("reset"), None)
        );
        assert_eq!(
            reset.json(),
            json!({"oldest_revision": current - 4, "current_revision": current})
        );
        // Then live.
        stack.send(http.put(stack.url("/kv/h")).body("live")).await;
        let next = stream.next_within(WAIT).await.unwrap();
        assert_eq!(next.event.as_deref(), Some("put"));
        assert_eq!(next.json()["value"], "live");
    }
    // A resume point the history still holds replays from there.
    let mut stream = EventStream::open(http, &stack.url("/kv/h?watch=1"), Some("21"))
        .await
        .unwrap();
    let replayed = stream.next_within(WAIT).await.unwrap();
    assert_eq!(replayed.id.as_deref(), Some("22"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_key_is_gone_on_every_path_and_watchers_hear_of_it() {
    let dir = tempfile::tempdir().unwrap();
    for store in [
        StoreSpec::Memory,
        StoreSpec::Sqlite(dir.path().join("kv.db")),
    ] {
        let stack = Stack::start().await;
        let kv = stack.kv(store).await;
        stack.wait_for_kv_nodes(1).await;
        let http = &stack.http;
        let mut watcher = EventStream::open(http, &stack.url("/kv?prefix=t&watch=1"), None)
            .await
            .unwrap();
        let (status, body) = stack
            .send(http.put(stack.url("/kv/t?ttl=1s")).body("v"))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let expires_at = body["expires_at"].as_str().unwrap().to_owned();
        assert!(
            humantime::parse_rfc3339(&expires_at).is_ok(),
            "{expires_at}"
        );
        let (_, body) = stack.send(http.get(stack.url("/kv/t"))).await;
        assert_eq!(body["expires_at"], json!(expires_at));
        // A key written with a ttl and then without one stays.
        stack
            .send(http.put(stack.url("/kv/tt?ttl=1h")).body("v"))
            .await;
        let (_, body) = stack
            .send(http.put(stack.url("/kv/tt")).json(&json!({"value": "w"})))
            .await;
        assert_eq!(body["expires_at"], Value::Null);

        let expire = loop {
            let event = watcher.next_within(WAIT).await.unwrap();
            if event.event.as_deref() == Some("expire") {
                break event;
            }
        };
        let data = expire.json();
        assert_eq!((&data["key"], &data["version"]), (&json!("t"), &json!(1)));
        assert_eq!(expire.id, Some(data["revision"].to_string()));
        let (status, _) = stack.send(http.get(stack.url("/kv/t"))).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (_, body) = stack.send(http.get(stack.url("/kv?prefix=t"))).await;
        let keys: Vec<&str> = body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|item| item["key"].as_str().unwrap())
            .collect();
        assert_eq!(keys, ["tt"]);
        let mut text = kv.text().await;
        assert_eq!(text.call("get<t>").await, OwnedReply::None("t".into()));
        assert_eq!(text.call("get<tt>").await, OwnedReply::Value("w".into()));

        for bad in ["abc", "0s", "-1s"] {
            let (status, body) = stack
                .send(http.put(stack.url(&format!("/kv/b?ttl={bad}"))).body("v"))
                .await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
            assert!(body["error"].as_str().unwrap().contains("ttl"), "{body}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_succeed_fail_and_refuse_malformed_bodies() {
    let stack = Stack::start().await;
    let _kv = stack.kv(StoreSpec::Memory).await;
    stack.wait_for_kv_nodes(1).await;
    let http = &stack.http;
    stack.send(http.put(stack.url("/kv/a")).body("0")).await;
    stack.send(http.put(stack.url("/kv/c")).body("x")).await;
    let txn = |version: i64| {
        json!({
            "compare": [{"key": "a", "version": version}, {"key": "b", "exists": false}, {"key": "c", "value": "x"}],
            "success": [{"put": {"key": "a", "value": "1", "ttl": "1h"}}, {"delete": {"key": "b"}}, {"get": {"key": "c"}}],
            "failure": [{"get": {"key": "a"}}, {"get": {"key": "missing"}}],
        })
    };
    let (status, body) = stack.send(http.post(stack.url("/txn")).json(&txn(1))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (&body["succeeded"], &body["revision"]),
        (&json!(true), &json!(3))
    );
    let results = body["results"].as_array().unwrap();
    assert_eq!(results[0]["put"]["version"], 2);
    assert!(results[0]["put"]["expires_at"].is_string());
    assert_eq!(
        results[1],
        json!({"delete": {"key": "b", "deleted": false}})
    );
    assert_eq!(results[2]["get"]["value"], "x");

    let (status, body) = stack.send(http.post(stack.url("/txn")).json(&txn(1))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (&body["succeeded"], &body["revision"]),
        (&json!(false), &json!(3))
    );
    assert_eq!(body["results"][0]["get"]["value"], "1");
    assert_eq!(
        body["results"][1],
        json!({"get": {"key": "missing", "found": false}})
    );

    let too_many: Vec<Value> = (0..129)
        .map(|i| json!({"get": {"key": format!("k{i}")}}))
        .collect();
    for (bad, names) in [
        (json!({"compare": [{"key": "a"}]}), "compare[0]"),
        (
            json!({"compare": [{"key": "a", "version": "x"}]}),
            "compare[0].version",
        ),
        (
            json!({"success": [{"put": {"key": "a"}}]}),
            "success[0].put.value",
        ),
        (
            json!({"success": [{"get": {"key": "a"}}, {"put": {"key": "", "value": "v"}}]}),
            "success[1].put.key",
        ),
        (json!({"failure": [{"frob": {"key": "a"}}]}), "failure[0]"),
        (
            json!({"success": [{"put": {"key": "a", "value": "v", "ttl": "soon"}}]}),
            "success[0].put.ttl",
        ),
        (json!({"success": "all"}), "success"),
        (json!({"success": too_many}), "at most 128"),
    ] {
        let (status, body) = stack.send(http.post(stack.url("/txn")).json(&bad)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains(names),
            "{bad}: {body}"
        );
    }
}
