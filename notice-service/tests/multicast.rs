//! Subscriptions whose caller takes multicast packets (as the gateway does): once caught up,
//! their live notices arrive as one packet per connection naming every stream, after a replay
//! sent stream by stream, with no gap and no duplicate; and a subscription ended while the hub
//! sends to it directly still tells its client where to resume.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use serde_json::{json, Value};
use shared::{codec::PacketCodec, connection::PacketReader, Packet, PacketClient, ResponseStream};
use tokio::{
    io::AsyncWriteExt,
    net::{tcp::OwnedReadHalf, TcpStream},
};

/// A subscription request asking for multicast packets.
fn multicast_request(params: Value) -> Packet {
    Packet {
        multicast: true,
        ..Packet::request("GET", "/notices/stream", params)
    }
}

async fn next_frame(reader: &mut PacketReader<OwnedReadHalf>) -> Packet {
    tokio::time::timeout(WAIT, reader.next())
        .await
        .expect("a packet in time")
        .expect("the connection stays open")
        .expect("a valid packet")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caught_up_subscriptions_of_one_connection_share_one_packet_per_notice() {
    let service = TestService::with_store("mem").await;
    let publisher = service.client().await;
    let first = publish_now(&publisher, json!({"message": "n1"})).await;
    let mut published = vec![first];
    for message in ["n2", "n3"] {
        published.push(publish_now(&publisher, json!({ "message": message })).await);
    }

    // Two streams on one plain connection: key 1 replays what followed the first notice, key 2
    // starts live.
    let socket = TcpStream::connect(service.addr).await.unwrap();
    let (read, mut write) = socket.into_split();
    let mut reader = PacketReader::new(read, PacketCodec::<Packet>::new());
    for (key, params) in [(1, json!({"after": first})), (2, json!({}))] {
        let request = Packet {
            key,
            stream: true,
            ..multicast_request(params)
        };
        let frame = shared::codec::encode_frame(&request).unwrap();
        write.write_all(&frame).await.unwrap();
    }

    // Per stream, the notice ids received in order; and whether a packet ever named both.
    let mut received: BTreeMap<u64, Vec<i64>> = BTreeMap::new();
    let mut shared_packet = false;
    // A stream opens (its empty event) once it is subscribed: what is published after both
    // opened reaches both.
    let mut opened = BTreeSet::new();
    while opened.len() < 2 {
        let packet = next_frame(&mut reader).await;
        if packet.is_empty_event() {
            opened.insert(packet.key);
        } else {
            shared_packet |= record_notice(&packet, &mut received);
        }
    }
    let mut wanted = published[1..].to_vec();
    // Both streams go direct soon after they open; publish until a notice shows they have.
    for attempt in 0..50 {
        if shared_packet {
            break;
        }
        let id = publish_now(&publisher, json!({ "message": format!("live {attempt}") })).await;
        published.push(id);
        wanted.push(id);
        while received.get(&1).and_then(|ids| ids.last()) != Some(&id)
            || received.get(&2).and_then(|ids| ids.last()) != Some(&id)
        {
            let packet = next_frame(&mut reader).await;
            shared_packet |= record_notice(&packet, &mut received);
        }
    }
    assert!(shared_packet, "a notice reached both streams in one packet");
    assert_eq!(
        received[&1], wanted,
        "replay then live, no gap, no duplicate"
    );
    assert_eq!(
        received[&2],
        published[3..],
        "everything published once it opened"
    );
}

/// Records a notice packet under each stream it names; whether it named more than one.
fn record_notice(packet: &Packet, received: &mut BTreeMap<u64, Vec<i64>>) -> bool {
    assert_eq!(packet.event.as_deref(), Some("notice"), "{packet:?}");
    let notice = packet.params["id"].as_i64().unwrap();
    assert_eq!(packet.id, Some(json!(notice)));
    let keys = if packet.keys.is_empty() {
        vec![packet.key]
    } else {
        assert_eq!(packet.key, packet.keys[0], "key is the first of keys");
        packet.keys.clone()
    };
    for key in &keys {
        received.entry(*key).or_default().push(notice);
    }
    keys.len() > 1
}

/// Reads the stream until its `kicked` event; the ids of the notices before it and its data.
async fn notices_until_kicked(stream: &mut ResponseStream) -> (Vec<i64>, Value) {
    let mut ids = Vec::new();
    loop {
        let packet = next_packet(stream).await;
        match packet.event.as_deref() {
            Some("notice") => ids.push(packet.params["id"].as_i64().unwrap()),
            Some("kicked") => return (ids, packet.params),
            other => panic!("unexpected event {other:?}: {packet:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_subscription_that_is_kicked_says_where_to_resume() {
    let service = TestService::with_store("mem").await;
    let client: PacketClient = service.client().await;
    let mut streams = Vec::new();
    for _ in 0..3 {
        let request = multicast_request(json!({"name": "alice", "client": "tab"}));
        streams.push(client.stream(request).await.unwrap());
    }
    wait_for_presence(&client, 3).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(publish_now(&client, json!({ "message": format!("n{i}") })).await);
    }
    let kicked = kick(&client, "alice").await;
    assert_eq!(kicked.params, json!({"kicked": 3}));
    for stream in &mut streams {
        let (received, kicked) = notices_until_kicked(stream).await;
        assert_eq!(received, ids, "every notice, once, in order");
        assert_eq!(kicked["last_event_id"], json!(ids.last().unwrap()));
    }
}
