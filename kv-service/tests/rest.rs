//! The REST door, spoken to as the gateway does: packets over TCP to the real service, with
//! params built the gateway's way (query fields as strings, body fields, `params` for the rest
//! of the path, `body` for a plain text body).

mod common;

use common::{call, concurrent_put_versions, kv_store, Backend, Service};
use kv_service::{config::StoreSpec, text_protocol::OwnedReply};
use serde_json::{json, Value};
use shared::PacketClient;

async fn service() -> (Service, PacketClient) {
    let service = Service::start(StoreSpec::Memory).await;
    let client = service.rest().await;
    (service, client)
}

async fn ok(client: &PacketClient, method: &str, params: Value) -> Value {
    let (status, body, error) = call(client, method, params.clone()).await.unwrap();
    assert!(
        status == 200 || status == 201,
        "{method} {params} answered {status} {error:?}"
    );
    body
}

async fn failed(client: &PacketClient, method: &str, params: Value) -> (u16, String) {
    let (status, body, error) = call(client, method, params.clone()).await.unwrap();
    assert_eq!(body, Value::Null, "an error carries no params");
    (
        status,
        error.unwrap_or_else(|| panic!("{method} {params}: no error message")),
    )
}

#[tokio::test]
async fn put_then_get_with_versions() {
    let (_service, client) = service().await;
    assert_eq!(
        ok(&client, "PUT", json!({"params": "a", "value": "1"})).await,
        json!({"key": "a", "value": "1", "version": 1, "revision": 1, "expires_at": null})
    );
    assert_eq!(
        ok(&client, "PUT", json!({"params": "a", "value": "2"})).await,
        json!({"key": "a", "value": "2", "version": 2, "revision": 2, "expires_at": null})
    );
    assert_eq!(
        ok(&client, "GET", json!({"params": "a"})).await,
        json!({"key": "a", "value": "2", "version": 2, "revision": 2, "expires_at": null})
    );
}

#[tokio::test]
async fn put_with_a_plain_text_body() {
    let (_service, client) = service().await;
    assert_eq!(
        ok(
            &client,
            "PUT",
            json!({"params": "t", "body": "hello\nworld"})
        )
        .await,
        json!({"key": "t", "value": "hello\nworld", "version": 1, "revision": 1, "expires_at": null})
    );
    assert_eq!(
        ok(&client, "GET", json!({"params": "t"})).await["value"],
        "hello\nworld"
    );
}

#[tokio::test]
async fn put_with_if_version() {
    let (_service, client) = service().await;
    let (status, error) = failed(
        &client,
        "PUT",
        json!({"params": "a", "value": "x", "if_version": 1}),
    )
    .await;
    assert_eq!(status, 409);
    assert_eq!(
        error,
        "version mismatch for a: expected 1, the key does not exist"
    );

    ok(&client, "PUT", json!({"params": "a", "value": "1"})).await;
    assert_eq!(
        ok(
            &client,
            "PUT",
            json!({"params": "a", "value": "2", "if_version": 1})
        )
        .await,
        json!({"key": "a", "value": "2", "version": 2, "revision": 2, "expires_at": null})
    );
    let (status, error) = failed(
        &client,
        "PUT",
        json!({"params": "a", "value": "3", "if_version": 1}),
    )
    .await;
    assert_eq!(status, 409);
    assert_eq!(
        error,
        "version mismatch for a: expected 1, current version is 2"
    );
    // From a query string the version is a string.
    assert_eq!(
        ok(
            &client,
            "PUT",
            json!({"params": "a", "value": "3", "if_version": "2"})
        )
        .await["version"],
        3
    );
    assert_eq!(
        ok(&client, "GET", json!({"params": "a"})).await["value"],
        "3"
    );
}

#[tokio::test]
async fn post_creates_or_conflicts() {
    let (_service, client) = service().await;
    let (status, body, _) = call(&client, "POST", json!({"key": "n", "value": "first"}))
        .await
        .unwrap();
    assert_eq!(status, 201);
    assert_eq!(
        body,
        json!({"key": "n", "value": "first", "version": 1, "revision": 1, "expires_at": null})
    );
    let (status, error) = failed(&client, "POST", json!({"key": "n", "value": "second"})).await;
    assert_eq!(status, 409);
    assert_eq!(error, "key already exists: n");
    assert_eq!(
        ok(&client, "GET", json!({"params": "n"})).await["value"],
        "first"
    );
}

#[tokio::test]
async fn get_and_delete_of_missing_keys_are_404() {
    let (_service, client) = service().await;
    assert_eq!(
        failed(&client, "GET", json!({"params": "nope"})).await,
        (404, "no such key: nope".to_owned())
    );
    assert_eq!(
        failed(&client, "DELETE", json!({"params": "nope"})).await,
        (404, "no such key: nope".to_owned())
    );
}

#[tokio::test]
async fn delete_removes() {
    let (_service, client) = service().await;
    ok(&client, "PUT", json!({"params": "d", "value": "1"})).await;
    assert_eq!(
        ok(&client, "DELETE", json!({"params": "d"})).await,
        json!({"key": "d", "deleted": true, "revision": 2})
    );
    assert_eq!(failed(&client, "GET", json!({"params": "d"})).await.0, 404);
}

#[tokio::test]
async fn list_pages_through_keys_in_order() {
    let (_service, client) = service().await;
    for key in ["user/3", "user/1", "user/2", "other", "user/10"] {
        ok(&client, "PUT", json!({"params": key, "value": key})).await;
    }
    let page = ok(&client, "GET", json!({"prefix": "user/", "limit": "2"})).await;
    assert_eq!(
        page,
        json!({"items": [
            {"key": "user/1", "value": "user/1", "version": 1, "revision": 2, "expires_at": null},
            {"key": "user/10", "value": "user/10", "version": 1, "revision": 5, "expires_at": null},
        ], "next": "user/10", "revision": 5})
    );
    let page = ok(
        &client,
        "GET",
        json!({"prefix": "user/", "limit": "2", "after": "user/10"}),
    )
    .await;
    let keys: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["user/2", "user/3"]);
    assert_eq!(page["next"], Value::Null);

    // No params at all: everything, default limit.
    let page = ok(&client, "GET", Value::Null).await;
    assert_eq!(page["items"].as_array().unwrap().len(), 5);
    assert_eq!(page["next"], Value::Null);
}

#[tokio::test]
async fn list_default_limit_is_100_and_max_1000() {
    let (_service, client) = service().await;
    for i in 0..150 {
        ok(
            &client,
            "PUT",
            json!({"params": format!("k{i:03}"), "value": "v"}),
        )
        .await;
    }
    let page = ok(&client, "GET", json!({})).await;
    assert_eq!(page["items"].as_array().unwrap().len(), 100);
    assert_eq!(page["next"], "k099");
    let page = ok(&client, "GET", json!({"limit": 1000})).await;
    assert_eq!(page["items"].as_array().unwrap().len(), 150);
    for bad in [json!(0), json!(1001), json!("-1"), json!("ten"), json!(1.5)] {
        let (status, error) = failed(&client, "GET", json!({"limit": bad})).await;
        assert_eq!(status, 400, "limit {bad}");
        assert!(error.contains("limit"), "{error}");
    }
}

#[tokio::test]
async fn bad_requests_get_400_with_a_clear_message() {
    let (_service, client) = service().await;
    let long_key = "k".repeat(1025);
    let cases = [
        ("PUT", json!({"params": "a"}), "missing value"),
        ("PUT", json!({"value": "v"}), "missing key"),
        (
            "PUT",
            json!({"params": "a", "value": 5}),
            "value must be a string",
        ),
        (
            "PUT",
            json!({"params": "a", "value": "v", "if_version": "x"}),
            "if_version must be a whole number",
        ),
        (
            "PUT",
            json!({"params": long_key, "value": "v"}),
            "key must be 1 to 1024 bytes",
        ),
        (
            "PUT",
            json!({"params": "a", "value": "v".repeat(1024 * 1024 + 1)}),
            "value must be at most 1048576 bytes",
        ),
        ("POST", json!({"value": "v"}), "missing key"),
        (
            "POST",
            json!({"key": "", "value": "v"}),
            "key must be 1 to 1024 bytes",
        ),
        (
            "POST",
            json!({"key": 7, "value": "v"}),
            "key must be a string",
        ),
        ("DELETE", json!({}), "missing key"),
        (
            "GET",
            json!({"params": long_key}),
            "key must be 1 to 1024 bytes",
        ),
        ("GET", json!({"prefix": 3}), "prefix must be a string"),
        ("GET", json!([1, 2]), "params must be a JSON object"),
    ];
    for (method, params, message) in cases {
        let (status, error) = failed(&client, method, params.clone()).await;
        assert_eq!(status, 400, "{method} {params}");
        assert!(
            error.contains(message),
            "{method}: {error:?} should say {message:?}"
        );
    }
}

#[tokio::test]
async fn keys_and_values_may_hold_any_utf8() {
    let (_service, client) = service().await;
    for (key, value) in [
        ("¶<>,\"'", "¶ va<l>ue, \"quoted\"\n"),
        ("a/b/c", "🦀"),
        ("sp ace", ""),
    ] {
        let revision =
            ok(&client, "PUT", json!({"params": key, "value": value})).await["revision"].clone();
        assert_eq!(
            ok(&client, "GET", json!({"params": key})).await,
            json!({"key": key, "value": value, "version": 1, "revision": revision, "expires_at": null})
        );
    }
}

#[tokio::test]
async fn both_doors_share_one_core() {
    let (service, client) = service().await;
    let mut text = service.text().await;

    ok(
        &client,
        "PUT",
        json!({"params": "shared,key", "value": "from <rest>"}),
    )
    .await;
    assert_eq!(
        text.call("get<shared\\,key>").await,
        OwnedReply::Value("from <rest>".into())
    );

    assert_eq!(
        text.call("put<t,from text>").await,
        OwnedReply::Ok("t".into())
    );
    assert_eq!(
        ok(&client, "GET", json!({"params": "t"})).await,
        json!({"key": "t", "value": "from text", "version": 1, "revision": 2, "expires_at": null})
    );
    // Versions count writes through either door.
    assert_eq!(
        ok(&client, "PUT", json!({"params": "t", "value": "2"})).await["version"],
        2
    );
    assert_eq!(text.call("put<t,3>").await, OwnedReply::Ok("t".into()));
    assert_eq!(
        ok(&client, "GET", json!({"params": "t"})).await["version"],
        3
    );

    assert_eq!(text.call("del<t>").await, OwnedReply::Ok("t".into()));
    assert_eq!(failed(&client, "GET", json!({"params": "t"})).await.0, 404);
    // Deleting what is not there, over the same raw TCP connection.
    assert_eq!(text.call("del<t>").await, OwnedReply::None("t".into()));
    // Pipelined, the deletes share a batch and answer the same way.
    text.send("put<u,1>del<u>del<u>").await;
    assert_eq!(text.reply().await, OwnedReply::Ok("u".into()));
    assert_eq!(text.reply().await, OwnedReply::Ok("u".into()));
    assert_eq!(text.reply().await, OwnedReply::None("u".into()));
}

#[tokio::test]
async fn routes_register_as_the_issue_names_them() {
    let store = kv_service::store::KvBackend::Memory(kv_service::store::MemoryStore::new());
    let router = kv_service::rest::router(kv_service::core::Kv::new(store));
    assert_eq!(
        router.urls(),
        ["DELETE/kv", "GET/kv", "POST/kv", "POST/txn", "PUT/kv"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_rest_puts_on_each_store_never_lose_a_version() {
    for backend in [Backend::Memory, Backend::Sqlite, Backend::Postgres] {
        let Some(fixture) = kv_store(backend).await else {
            continue;
        };
        let service = Service::start(fixture.spec.clone()).await;
        let client = service.rest().await;
        let versions = concurrent_put_versions(std::slice::from_ref(&client), 100).await;
        assert_eq!(versions, (1..=100).collect::<Vec<i64>>(), "{backend:?}");
        drop(client);
        service.stop().await;
    }
}

/// Sends one request as a verified caller holding `scopes` would reach us from the gateway.
async fn call_as(
    client: &PacketClient,
    scopes: &[&str],
    method: &str,
    params: Value,
) -> (u16, Option<String>) {
    let mut packet = shared::Packet::request(method, "/kv", params);
    packet.auth = Some(shared::Identity {
        sub: Some("caller".into()),
        scopes: scopes.iter().map(|scope| scope.to_string()).collect(),
    });
    let answer = tokio::time::timeout(common::WAIT, client.request(packet))
        .await
        .expect("no answer in time")
        .unwrap();
    (answer.status(), answer.error)
}

#[test]
fn reads_declare_kv_read_and_writes_kv_write() {
    let kv = kv_service::core::Kv::new(kv_service::store::KvBackend::Memory(Default::default()));
    let scopes = kv_service::rest::router(kv).scopes();
    assert_eq!(
        scopes.into_iter().collect::<Vec<_>>(),
        [
            ("DELETE/kv".to_owned(), "kv:write".to_owned()),
            ("GET/kv".to_owned(), "kv:read".to_owned()),
            ("POST/kv".to_owned(), "kv:write".to_owned()),
            ("POST/txn".to_owned(), "kv:write".to_owned()),
            ("PUT/kv".to_owned(), "kv:write".to_owned()),
        ]
    );
}

#[tokio::test]
async fn a_verified_caller_needs_the_scope_of_each_route() {
    let (_service, client) = service().await;
    let put = json!({"params": "a", "value": "1"});

    let (status, error) = call_as(&client, &["kv:read"], "PUT", put.clone()).await;
    assert_eq!(status, 403, "{error:?}");
    assert!(error.unwrap().contains("kv:write"));
    let (status, _) = call_as(
        &client,
        &["kv:read"],
        "POST",
        json!({"key": "b", "value": "1"}),
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = call_as(&client, &["kv:read"], "DELETE", json!({"params": "a"})).await;
    assert_eq!(status, 403);
    // Nothing was written.
    let (status, _) = call_as(&client, &["kv:read"], "GET", json!({"params": "a"})).await;
    assert_eq!(status, 404);

    let (status, _) = call_as(&client, &["kv:write"], "PUT", put).await;
    assert_eq!(status, 200);
    let (status, error) = call_as(&client, &["kv:write"], "GET", json!({"params": "a"})).await;
    assert_eq!(status, 403, "{error:?}");
    assert!(error.unwrap().contains("kv:read"));
    let (status, _) = call_as(&client, &["kv:write"], "GET", json!({})).await;
    assert_eq!(status, 403, "listing is a read too");

    let (status, _) = call_as(&client, &["admin"], "GET", json!({"params": "a"})).await;
    assert_eq!(status, 200);
    let (status, _) = call_as(&client, &["admin"], "DELETE", json!({"params": "a"})).await;
    assert_eq!(status, 200);

    // A request a cluster member makes itself carries no identity and is trusted.
    ok(&client, "PUT", json!({"params": "c", "value": "1"})).await;
}

/// Opens a watch on a raw packet connection to the REST door, the way the gateway's connection
/// carries one (protected mode: no handshake), with the socket's receive buffer set to
/// `receive_buffer` bytes when given (which also stops the kernel from growing it).
async fn raw_watch(
    addr: std::net::SocketAddr,
    params: Value,
    receive_buffer: Option<u32>,
) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(bytes) = receive_buffer {
        socket.set_recv_buffer_size(bytes).unwrap();
    }
    let mut stream = socket.connect(addr).await.unwrap();
    let request =
        json!({"uri": "/kv", "method": "GET", "key": 1, "stream": true, "params": params});
    let mut frame = serde_json::to_vec(&request).unwrap();
    frame.extend_from_slice("¶".as_bytes());
    stream.write_all(&frame).await.unwrap();
    stream
}

/// The packets of a raw connection, one at a time.
struct RawFrames {
    stream: tokio::net::TcpStream,
    buffer: Vec<u8>,
}

impl RawFrames {
    async fn next(&mut self) -> Value {
        use tokio::io::AsyncReadExt;
        let delimiter = "¶".as_bytes();
        loop {
            if let Some(end) = self
                .buffer
                .windows(delimiter.len())
                .position(|window| window == delimiter)
            {
                let frame: Value = serde_json::from_slice(&self.buffer[..end]).unwrap();
                self.buffer.drain(..end + delimiter.len());
                return frame;
            }
            let mut chunk = vec![0u8; 64 * 1024];
            let read = tokio::time::timeout(common::WAIT, self.stream.read(&mut chunk))
                .await
                .expect("no packet in time")
                .unwrap();
            assert!(read > 0, "the connection closed");
            self.buffer.extend_from_slice(&chunk[..read]);
        }
    }

    /// The next change event as (revision, key), or `Err(revision)` for `lagged`. The packet
    /// that opens the stream (no event name) is skipped.
    async fn next_change(&mut self) -> Result<(i64, String), i64> {
        loop {
            let frame = self.next().await;
            assert_eq!(frame["key"], 1, "{frame}");
            assert_eq!(frame["end"], Value::Null, "the stream ended early: {frame}");
            match frame["event"].as_str() {
                None => continue,
                Some("lagged") => return Err(frame["params"]["revision"].as_i64().unwrap()),
                Some("put") => {
                    let revision = frame["params"]["revision"].as_i64().unwrap();
                    assert_eq!(frame["id"], revision, "{frame}");
                    let key = frame["params"]["key"].as_str().unwrap().to_owned();
                    return Ok((revision, key));
                }
                Some(other) => panic!("unexpected event {other}: {frame}"),
            }
        }
    }
}

/// A watcher whose connection stops being read (a gateway connection that cannot keep up) is
/// ended with `lagged` `{"revision":N}` once it falls `--watch-max-lag` revisions behind, after
/// every change up to N; resuming with `from_revision=N` delivers every later change, in order,
/// none twice, although it starts further behind than the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_stops_reading_ends_lagged_and_resumes_without_a_gap() {
    const MAX_LAG: u64 = 4;
    const PUTS_PER_TXN: usize = 100;
    const VALUE_BYTES: usize = 4096;
    let mut config = kv_service::Config::standalone(StoreSpec::Memory);
    config.watch_max_lag = MAX_LAG;
    let service = Service::start_with(config).await;
    let writer = service.rest().await;

    let stalled = raw_watch(
        service.rest_addr,
        json!({"prefix": "s/", "watch": "1"}),
        Some(4096),
    )
    .await;
    let mut stalled = RawFrames {
        stream: stalled,
        buffer: Vec::new(),
    };
    // The stream is open (and its cursor set) once its first packet arrives.
    let opened = stalled.next().await;
    assert_eq!(
        (opened["stream"].clone(), opened["event"].clone()),
        (json!(true), Value::Null)
    );

    // Enough changes that the watcher stops, whatever this machine's socket buffers hold:
    // at most the connection's queue of frames, a batch being written, the kernel's largest
    // send buffer and the watcher's page of the log in hand are sent before it waits, and
    // the transactions after those leave it more than MAX_LAG revisions behind.
    let send_buffer_max: usize = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|limits| limits.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(4 << 20);
    let buffered_events = shared::connection::OUTGOING_CAPACITY
        + kv_service::store::CHANGE_PAGE
        + (send_buffer_max + (2 << 20)) / VALUE_BYTES;
    let txns = buffered_events.div_ceil(PUTS_PER_TXN) + 2 * MAX_LAG as usize + 2;
    let value = "v".repeat(VALUE_BYTES);
    let mut expected: Vec<(i64, String)> = Vec::new();
    for t in 0..txns {
        let keys: Vec<String> = (0..PUTS_PER_TXN).map(|i| format!("s/{t}/{i:03}")).collect();
        let success: Vec<Value> = keys
            .iter()
            .map(|key| json!({"put": {"key": key, "value": value}}))
            .collect();
        let answer = tokio::time::timeout(
            common::WAIT,
            writer.request(shared::Packet::request(
                "POST",
                "/txn",
                json!({"success": success}),
            )),
        )
        .await
        .expect("no answer to a transaction in time")
        .unwrap();
        assert_eq!(answer.status(), 200, "{:?}", answer.error);
        let revision = answer.params["revision"].as_i64().unwrap();
        expected.extend(keys.into_iter().map(|key| (revision, key)));
    }
    let newest = expected.last().unwrap().0;

    // Now read: what was queued arrives, then `lagged`.
    let mut delivered = Vec::new();
    let lagged_at = loop {
        match stalled.next_change().await {
            Ok(change) => delivered.push(change),
            Err(revision) => break revision,
        }
    };
    assert!(
        newest - lagged_at > MAX_LAG as i64,
        "lagged at {lagged_at}, newest {newest}"
    );
    assert_eq!(
        delivered.last().map(|(revision, _)| *revision),
        Some(lagged_at),
        "lagged names the revision of the last change delivered"
    );
    assert_eq!(
        delivered,
        expected[..delivered.len()],
        "every change up to the lagged revision, in order"
    );

    // Resuming from there delivers the rest, starting further behind than MAX_LAG.
    let resumed = raw_watch(
        service.rest_addr,
        json!({"prefix": "s/", "watch": "1", "from_revision": lagged_at.to_string()}),
        None,
    )
    .await;
    let mut resumed = RawFrames {
        stream: resumed,
        buffer: Vec::new(),
    };
    let rest = &expected[delivered.len()..];
    let mut replayed = Vec::with_capacity(rest.len());
    while replayed.len() < rest.len() {
        match resumed.next_change().await {
            Ok(change) => replayed.push(change),
            Err(revision) => panic!(
                "the resumed watcher was ended as lagged at {revision} after {} changes",
                replayed.len()
            ),
        }
    }
    assert_eq!(replayed, rest, "no gap, no duplicate, in order");
    drop(writer);
    service.stop().await;
}
