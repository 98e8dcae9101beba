//! The notice-service binary as a real process: protected mode without a cluster secret, and
//! with one, only peers that prove they know it are served.

mod common;

use std::{path::Path, process::Stdio};

use common::*;
use serde_json::json;
use shared::{
    cluster::ClusterSecret, codec::PacketCodec, connection::PacketReader, Dialect, Packet,
    PacketClient,
};
use tokio::{io::AsyncWriteExt, process::Command};

const BINARY: &str = env!("CARGO_BIN_EXE_notice-service");

fn notice_service(args: &[&str]) -> Command {
    let mut command = Command::new(BINARY);
    command
        .args(["--distributor", "", "--store", "mem"])
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// A raw connection; the write half stays open so that only the server can end it.
type Peer = (
    PacketReader<tokio::net::tcp::OwnedReadHalf, Packet>,
    tokio::net::tcp::OwnedWriteHalf,
);

async fn send(writer: &mut tokio::net::tcp::OwnedWriteHalf, packet: &Packet) {
    let frame = shared::codec::encode_frame(packet).unwrap();
    writer.write_all(&frame).await.unwrap();
}

/// A peer that skips the handshake and sends a request claiming to be an admin.
async fn without_handshake(addr: &str) -> Peer {
    let (read_half, mut write_half) = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap()
        .into_split();
    let forged = Packet {
        key: 1,
        auth: Some(caller(None, &["admin"])),
        ..Packet::request("POST", "/notices", json!({"message": "forged"}))
    };
    send(&mut write_half, &forged).await;
    let reader = PacketReader::new(read_half, PacketCodec::<Packet>::new());
    (reader, write_half)
}

/// A peer that starts the handshake but cannot prove it knows the secret.
async fn with_a_wrong_proof(addr: &str) -> Peer {
    let (read_half, mut write_half) = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap()
        .into_split();
    let mut reader = PacketReader::new(read_half, PacketCodec::<Packet>::new());
    let handshake = |method: &str, params| Packet {
        uri: shared::cluster::HANDSHAKE_URI.into(),
        method: method.into(),
        params,
        ..Packet::default()
    };
    let hello = handshake("HELLO", json!({"nonce": "ab".repeat(32), "protocol": 2}));
    send(&mut write_half, &hello).await;
    let challenge = tokio::time::timeout(WAIT, reader.next())
        .await
        .expect("challenged in time")
        .unwrap()
        .unwrap();
    assert_eq!(challenge.method, "CHALLENGE", "{challenge:?}");
    send(
        &mut write_half,
        &handshake("PROOF", json!({"proof": "00".repeat(32)})),
    )
    .await;
    (reader, write_half)
}

fn write_secret(dir: &Path, name: &str, secret: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("{secret}\n")).unwrap();
    path.display().to_string()
}

#[tokio::test]
async fn a_non_loopback_address_without_a_secret_is_refused_at_start() {
    let child = notice_service(&["--listen", "0.0.0.0:0"]).spawn().unwrap();
    let output = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("it exits at once")
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("refusing"), "{stderr}");
    assert!(stderr.contains("--cluster-secret-file"), "{stderr}");
}

#[tokio::test]
async fn with_a_secret_only_peers_that_know_it_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = write_secret(dir.path(), "cluster.secret", "right horse battery staple");
    let addr = format!("127.0.0.1:{}", shared::testing::free_port());
    let _service = notice_service(&["--listen", &addr, "--cluster-secret-file", &secret_file])
        .spawn()
        .unwrap();

    // A peer with the secret is served, and a request it forwards with `auth` is treated as
    // the verified caller's.
    let secret = ClusterSecret::new(b"right horse battery staple".to_vec());
    let member = PacketClient::connect_with_secret(addr.clone(), Dialect::Packet, Some(secret));
    tokio::time::timeout(WAIT, member.connected())
        .await
        .expect("a peer with the secret is served");
    let alice = caller(Some("alice"), &["notice:publish"]);
    let answer = call_as(
        &member,
        &alice,
        "POST",
        "/notices",
        json!({"message": "hi"}),
    )
    .await;
    assert_eq!(answer.status(), 201, "{answer:?}");
    assert_eq!(answer.params["from"], "alice");

    // A peer without it gets one refusal and the connection closes, before any request of
    // its runs: a forged `auth` from it is never read.
    for (mut reader, _writer) in [
        without_handshake(&addr).await,
        with_a_wrong_proof(&addr).await,
    ] {
        let refusal = tokio::time::timeout(WAIT, reader.next())
            .await
            .expect("refused in time")
            .expect("one packet before closing")
            .expect("a valid packet");
        assert_eq!(refusal.status(), 401, "{refusal:?}");
        assert!(tokio::time::timeout(WAIT, reader.next())
            .await
            .expect("closed in time")
            .is_none());
    }
    // Nothing from them was published.
    let listed = call(&member, "GET", "/notices", json!({})).await;
    let messages: Vec<_> = listed.params["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["message"].clone())
        .collect();
    assert_eq!(messages, [json!("hi")]);
}
