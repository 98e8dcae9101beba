//! `--max-connections` as a real process: a listener capped at 2 serves two connections and
//! leaves a third waiting (queued, not refused) until one of the two closes.

mod common;

use std::{process::Stdio, time::Duration};

use common::WAIT;
use serde_json::json;
use shared::{codec::PacketCodec, connection::PacketReader, Packet};
use tokio::{
    io::AsyncWriteExt,
    net::{tcp::OwnedWriteHalf, TcpStream},
    process::Command,
};

const BINARY: &str = env!("CARGO_BIN_EXE_notice-service");

/// Long enough for a served connection to answer a request many times over; a queued one
/// must not answer within it.
const QUEUED_FOR: Duration = Duration::from_millis(1500);

type Peer = (
    PacketReader<tokio::net::tcp::OwnedReadHalf, Packet>,
    OwnedWriteHalf,
);

/// Connects and sends one listing request.
async fn ask(addr: &str) -> Peer {
    let (read_half, mut write_half) = TcpStream::connect(addr).await.unwrap().into_split();
    let request = Packet {
        key: 1,
        ..Packet::request("GET", "/notices", json!({}))
    };
    let frame = shared::codec::encode_frame(&request).unwrap();
    write_half.write_all(&frame).await.unwrap();
    (
        PacketReader::new(read_half, PacketCodec::<Packet>::new()),
        write_half,
    )
}

async fn answered(peer: &mut Peer, within: Duration) -> Option<Packet> {
    tokio::time::timeout(within, peer.0.next())
        .await
        .ok()
        .flatten()
        .map(|packet| packet.expect("a valid packet"))
}

#[tokio::test]
async fn a_listener_capped_at_two_queues_the_third_connection() {
    let addr = format!("127.0.0.1:{}", shared::testing::free_port());
    let mut service = Command::new(BINARY)
        .args(["--distributor", "", "--store", "mem", "--listen", &addr])
        .args(["--max-connections", "2"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Wait until it listens.
    tokio::time::timeout(WAIT, async {
        while TcpStream::connect(&addr).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the service listens");
    // That probe connection may still hold a slot for a moment: give each served one a
    // full bound.
    let mut first = ask(&addr).await;
    let mut second = ask(&addr).await;
    for peer in [&mut first, &mut second] {
        let answer = answered(peer, WAIT).await.expect("served");
        assert_eq!(answer.status(), 200, "{answer:?}");
    }

    let mut third = ask(&addr).await;
    assert!(
        answered(&mut third, QUEUED_FOR).await.is_none(),
        "a third connection waits while two are served"
    );
    drop(first);
    let answer = answered(&mut third, WAIT)
        .await
        .expect("served once a slot is free");
    assert_eq!(answer.status(), 200, "{answer:?}");

    service.start_kill().unwrap();
    tokio::time::timeout(WAIT, service.wait())
        .await
        .expect("the service exits")
        .unwrap();
}
