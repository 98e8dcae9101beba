//! Helpers shared by the integration tests: store fixtures for the three backends, an
//! in-process service on port 0, and small clients for both doors.
#![allow(dead_code)]

use std::{net::SocketAddr, time::Duration};

use anyhow::Context;
use futures::{SinkExt, StreamExt};
use kv_service::{
    config::{Config, StoreSpec},
    text_protocol::{OwnedReply, ReplyCodec},
};
use serde_json::{json, Value};
use shared::{Dialect, Packet, PacketClient};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::{codec::Framed, sync::CancellationToken};

/// Bound on every wait in the tests.
pub const WAIT: Duration = Duration::from_secs(30);

/// The store fixtures both services' tests share.
pub use shared::testing::{Backend, StoreFixture};

/// A fresh kv store on `backend` (`kv.db`, or the database `kv`); `None` only when PostgreSQL
/// cannot be started outside CI.
pub async fn kv_store(backend: Backend) -> Option<StoreFixture> {
    StoreFixture::new(backend, "kv").await
}

/// A kv-service running in this process on two port-0 listeners.
pub struct Service {
    pub rest_addr: SocketAddr,
    pub text_addr: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), kv_service::KvServiceError>>>,
}

impl Service {
    pub async fn start(store: StoreSpec) -> Service {
        Self::start_with(Config::standalone(store)).await
    }

    pub async fn start_with(config: Config) -> Service {
        let rest = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let text = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let rest_addr = rest.local_addr().unwrap();
        let text_addr = text.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(kv_service::run(config, rest, text, shutdown.clone()));
        Service {
            rest_addr,
            text_addr,
            shutdown,
            task: Some(task),
        }
    }

    /// Shuts the service down and waits (bounded) until `run` has returned.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let task = self.task.take().unwrap();
        tokio::time::timeout(WAIT, task)
            .await
            .expect("run did not return after shutdown")
            .unwrap()
            .unwrap();
    }

    pub async fn text(&self) -> TextClient {
        TextClient::connect(self.text_addr).await
    }

    pub async fn rest(&self) -> PacketClient {
        let client = PacketClient::connect(self.rest_addr.to_string(), Dialect::Packet);
        tokio::time::timeout(WAIT, client.connected())
            .await
            .expect("the REST door did not accept a connection");
        client
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A text protocol client: writes raw bytes, reads decoded answers.
pub struct TextClient {
    framed: Framed<tokio::net::TcpStream, ReplyCodec>,
}

impl TextClient {
    pub async fn connect(addr: SocketAddr) -> TextClient {
        let stream = tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(addr))
            .await
            .expect("connect timed out")
            .expect("connect failed");
        TextClient {
            framed: Framed::new(stream, ReplyCodec::new()),
        }
    }

    /// The socket itself, for tests that read raw bytes or half-close. Only safe while the
    /// framed reader has nothing buffered.
    pub fn stream_mut(&mut self) -> &mut tokio::net::TcpStream {
        self.framed.get_mut()
    }

    /// The socket, for tests that read raw bytes from here on. Only safe while the framed
    /// reader has nothing buffered.
    pub fn into_stream(self) -> tokio::net::TcpStream {
        self.framed.into_inner()
    }

    pub async fn send(&mut self, raw: impl AsRef<[u8]>) {
        use tokio::io::AsyncWriteExt;
        let stream = self.framed.get_mut();
        tokio::time::timeout(WAIT, stream.write_all(raw.as_ref()))
            .await
            .expect("write timed out")
            .expect("write failed");
    }

    pub async fn reply(&mut self) -> OwnedReply {
        self.try_reply().await.expect("the connection closed")
    }

    /// The next answer, or `None` once the server closed the connection.
    pub async fn try_reply(&mut self) -> Option<OwnedReply> {
        tokio::time::timeout(WAIT, self.framed.next())
            .await
            .expect("no answer in time")
            .map(|reply| reply.expect("a well-formed answer"))
    }

    pub async fn call(&mut self, raw: impl AsRef<[u8]>) -> OwnedReply {
        self.send(raw).await;
        self.reply().await
    }

    pub async fn request(&mut self, request: &kv_service::text_protocol::Request) -> OwnedReply {
        tokio::time::timeout(WAIT, self.framed.send(request))
            .await
            .expect("write timed out")
            .expect("write failed");
        self.reply().await
    }
}

/// Sends one REST-style request packet and returns (status, params, error).
pub async fn call(
    client: &PacketClient,
    method: &str,
    params: Value,
) -> anyhow::Result<(u16, Value, Option<String>)> {
    let answer = tokio::time::timeout(WAIT, client.request(Packet::request(method, "/kv", params)))
        .await
        .context("no answer in time")??;
    Ok((answer.status(), answer.params, answer.error))
}

/// Sends `count` concurrent `PUT /kv/hot` requests spread round-robin over `clients`; each must
/// be answered 200. Returns the versions they were given, sorted.
pub async fn concurrent_put_versions(clients: &[PacketClient], count: usize) -> Vec<i64> {
    let tasks: Vec<_> = (0..count)
        .map(|i| {
            let client = clients[i % clients.len()].clone();
            tokio::spawn(async move {
                let (status, body, _) = call(
                    &client,
                    "PUT",
                    json!({"params": "hot", "value": i.to_string()}),
                )
                .await
                .unwrap();
                assert_eq!(status, 200);
                body["version"].as_i64().unwrap()
            })
        })
        .collect();
    let mut versions = Vec::new();
    for task in tasks {
        versions.push(tokio::time::timeout(WAIT, task).await.unwrap().unwrap());
    }
    versions.sort();
    versions
}

/// An HS256 token signed with `secret` for `subject` with `scopes` (space-separated), valid for
/// an hour.
pub fn token_with(secret: &[u8], subject: &str, scopes: &str) -> String {
    let scopes: Vec<&str> = scopes.split_whitespace().collect();
    shared::testing::hs256_token(secret, subject, &scopes, Duration::from_secs(3600))
}

/// Starts `command` (the kv-service binary) and waits until its text port serves; returns the
/// running process and the text port's address as it logged it.
pub async fn serve_text(
    command: tokio::process::Command,
) -> (shared::testing::process::Serving, SocketAddr) {
    use shared::testing::process::{logged_addr, Serving};
    Serving::start(command, |line| {
        line.contains("serving the text protocol")
            .then(|| logged_addr(line))
            .flatten()
    })
    .await
}
