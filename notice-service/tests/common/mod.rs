//! Helpers shared by the integration tests: a real notice-service on a 127.0.0.1 port, and
//! packet-client shortcuts that never wait without a bound.

#![allow(dead_code)]

use std::{net::SocketAddr, time::Duration};

use notice_service::{store::StoreSpec, Config, NoticeServiceError};
use serde_json::{json, Value};
use shared::{packet::Identity, Dialect, Packet, PacketClient, ResponseStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The bound on every single wait in these tests.
pub const WAIT: Duration = Duration::from_secs(10);

/// A notice-service serving on a free port; dropping it shuts it down.
pub struct TestService {
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), NoticeServiceError>>>,
}

impl TestService {
    pub async fn start(config: Config) -> TestService {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(notice_service::run(listener, config, shutdown.clone()));
        TestService {
            addr,
            shutdown,
            task: Some(task),
        }
    }

    pub async fn with_store(store: &str) -> TestService {
        TestService::start(Config::standalone(store.parse::<StoreSpec>().unwrap())).await
    }

    /// A connected packet client.
    pub async fn client(&self) -> PacketClient {
        let client = PacketClient::connect(self.addr.to_string(), Dialect::Packet);
        tokio::time::timeout(WAIT, client.connected())
            .await
            .expect("the service accepts connections");
        client
    }

    /// Shuts the service down and waits until it has stopped.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let task = self.task.take().unwrap();
        tokio::time::timeout(WAIT, task)
            .await
            .expect("the service stops in time")
            .unwrap()
            .unwrap();
    }
}

impl Drop for TestService {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub async fn call(client: &PacketClient, method: &str, uri: &str, params: Value) -> Packet {
    tokio::time::timeout(WAIT, client.request(Packet::request(method, uri, params)))
        .await
        .expect("answer in time")
        .expect("request sent")
}

/// A verified caller, as the gateway puts it in the packets it forwards.
pub fn caller(sub: Option<&str>, scopes: &[&str]) -> Identity {
    Identity {
        sub: sub.map(str::to_string),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
    }
}

/// A request carrying `auth`, as the gateway sends it for a verified caller.
pub fn request_as(method: &str, uri: &str, params: Value, auth: &Identity) -> Packet {
    Packet {
        auth: Some(auth.clone()),
        ..Packet::request(method, uri, params)
    }
}

pub async fn call_as(
    client: &PacketClient,
    auth: &Identity,
    method: &str,
    uri: &str,
    params: Value,
) -> Packet {
    tokio::time::timeout(WAIT, client.request(request_as(method, uri, params, auth)))
        .await
        .expect("answer in time")
        .expect("request sent")
}

pub async fn subscribe_as(client: &PacketClient, auth: &Identity, params: Value) -> ResponseStream {
    tokio::time::timeout(
        WAIT,
        client.stream(request_as("GET", "/notices/stream", params, auth)),
    )
    .await
    .expect("stream opened in time")
    .expect("stream request sent")
}

/// Kicks every subscription named `name` (`DELETE /notices/subscribers/{name}`); the answer.
pub async fn kick(client: &PacketClient, name: &str) -> Packet {
    call(
        client,
        "DELETE",
        "/notices/subscribers",
        json!({ "params": name }),
    )
    .await
}

/// Publishes and returns the answer (status and params).
pub async fn publish(client: &PacketClient, params: Value) -> Packet {
    call(client, "POST", "/notices", params).await
}

/// Publishes a notice that must be stored now; returns its id.
pub async fn publish_now(client: &PacketClient, params: Value) -> i64 {
    let answer = publish(client, params).await;
    assert_eq!(answer.status(), 201, "{answer:?}");
    answer.params["id"].as_i64().unwrap()
}

pub async fn subscribe(client: &PacketClient, params: Value) -> ResponseStream {
    tokio::time::timeout(
        WAIT,
        client.stream(Packet::request("GET", "/notices/stream", params)),
    )
    .await
    .expect("stream opened in time")
    .expect("stream request sent")
}

/// The next packet of a stream, which must come within the bound. The empty event that opens
/// a stream carries nothing and is skipped.
pub async fn next_packet(stream: &mut ResponseStream) -> Packet {
    loop {
        let packet = tokio::time::timeout(WAIT, stream.next())
            .await
            .expect("an event in time")
            .expect("the stream has not ended")
            .expect("the stream did not fail");
        if !packet.is_empty_event() {
            return packet;
        }
    }
}

/// The next notice event; its id and message.
pub async fn next_notice(stream: &mut ResponseStream) -> (i64, String) {
    let packet = next_packet(stream).await;
    assert_eq!(packet.event.as_deref(), Some("notice"), "{packet:?}");
    let id = packet.params["id"].as_i64().unwrap();
    assert_eq!(packet.id, Some(json!(id)), "the event id is the notice id");
    (id, packet.params["message"].as_str().unwrap().to_string())
}

pub async fn presence(client: &PacketClient) -> Vec<Value> {
    let answer = call(client, "GET", "/notices/subscribers", json!({})).await;
    assert_eq!(answer.status(), 200, "{answer:?}");
    answer.params["items"].as_array().unwrap().clone()
}

/// Waits until presence lists exactly `count` subscribers.
pub async fn wait_for_presence(client: &PacketClient, count: usize) -> Vec<Value> {
    tokio::time::timeout(WAIT, async {
        loop {
            let items = presence(client).await;
            if items.len() == count {
                return items;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("presence never reached {count}"))
}

/// The next event of a stream, which must be a presence event: "join alice@room".
pub async fn next_presence(stream: &mut ResponseStream) -> String {
    let packet = next_packet(stream).await;
    let kind = packet.event.clone().unwrap_or_default();
    assert!(kind == "join" || kind == "leave", "{packet:?}");
    assert_eq!(
        packet.id, None,
        "presence is not part of the resumable sequence"
    );
    let at = packet.params["at"].as_str().expect("an event time");
    assert!(chrono::DateTime::parse_from_rfc3339(at).is_ok(), "{at}");
    format!(
        "{kind} {}@{}",
        packet.params["name"].as_str().unwrap(),
        packet.params["topic"].as_str().unwrap()
    )
}

/// Asserts that nothing more arrives on `stream` for a moment (used after the events a test
/// expects, to show there was no duplicate).
pub async fn assert_quiet(stream: &mut ResponseStream, quiet: Duration) {
    if let Ok(more) = tokio::time::timeout(quiet, next_packet(stream)).await {
        panic!("expected nothing more, got {more:?}");
    }
}
