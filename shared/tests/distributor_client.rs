//! The distributor client against a distributor written by hand on a real socket, to pin what it
//! writes and when: readiness before the registration, on every heartbeat echo and at once when
//! it changes; and the topology cache it starts from and keeps up to date.

use std::time::Duration;

use serde_json::{json, Value};
use shared::{
    distributor_client::{DistributorClient, TopologySource},
    packet::Registration,
    topology_cache::TopologyCache,
    NodeInfo, Topology,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
    time::timeout,
};
use tokio_util::sync::CancellationToken;

/// Upper bound for anything that should happen promptly; only reached when a test fails.
const PROMPTLY: Duration = Duration::from_secs(10);

const DELIMITER: &[u8] = "¶".as_bytes();

/// The distributor's end of one node connection, packet by packet.
struct Peer {
    stream: TcpStream,
    buffer: Vec<u8>,
}

impl Peer {
    async fn accept(listener: &TcpListener) -> Peer {
        let (stream, _) = timeout(PROMPTLY, listener.accept())
            .await
            .expect("the client connects")
            .unwrap();
        Peer {
            stream,
            buffer: Vec::new(),
        }
    }

    async fn next(&mut self) -> Value {
        timeout(PROMPTLY, async {
            loop {
                if let Some(end) = self.buffer.windows(2).position(|w| w == DELIMITER) {
                    let frame: Vec<u8> = self.buffer.drain(..end + DELIMITER.len()).collect();
                    return serde_json::from_slice(&frame[..end]).unwrap();
                }
                let mut chunk = [0u8; 4096];
                let read = self.stream.read(&mut chunk).await.unwrap();
                assert!(read > 0, "the client closed the connection");
                self.buffer.extend_from_slice(&chunk[..read]);
            }
        })
        .await
        .expect("the client sends a packet")
    }

    async fn send(&mut self, packet: Value) {
        let mut frame = serde_json::to_vec(&packet).unwrap();
        frame.extend_from_slice(DELIMITER);
        self.stream.write_all(&frame).await.unwrap();
    }
}

fn registration() -> Registration {
    Registration {
        port: 4300,
        name: "kv".into(),
        urls: vec!["GET/kv".into()],
        protocol: Some(2),
        ..Registration::default()
    }
}

fn heartbeat_saying(ready: bool) -> Value {
    json!({"uri": "/heartbeat", "method": "GET", "key": 0, "params": {"ready": ready}})
}

fn node(port: u16) -> NodeInfo {
    NodeInfo {
        host: "127.0.0.1".into(),
        port,
        name: "kv".into(),
        urls: vec!["GET/kv".into()],
        protocol: Some(2),
        ..NodeInfo::default()
    }
}

#[tokio::test]
async fn readiness_goes_out_before_registering_on_every_echo_and_at_once_when_it_changes() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let (ready_tx, ready_rx) = watch::channel(false);
    let _link = DistributorClient::new(listener.local_addr().unwrap().to_string(), registration())
        .with_readiness(Some(ready_rx))
        .start(shutdown.child_token());

    let mut peer = Peer::accept(&listener).await;
    assert_eq!(peer.next().await, heartbeat_saying(false));
    let registered = peer.next().await;
    assert_eq!(registered["uri"], "/distributes", "{registered}");
    assert_eq!(registered["method"], "POST", "{registered}");

    peer.send(json!({"uri": "/heartbeat", "method": "GET", "key": 0}))
        .await;
    assert_eq!(peer.next().await, heartbeat_saying(false));

    // Nothing asked: the change is sent on its own.
    ready_tx.send_replace(true);
    assert_eq!(peer.next().await, heartbeat_saying(true));
    peer.send(json!({"uri": "/heartbeat", "method": "GET", "key": 0}))
        .await;
    assert_eq!(peer.next().await, heartbeat_saying(true));
}

#[tokio::test]
async fn a_node_without_readiness_registers_first_and_echoes_ready() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let _topology = DistributorClient::spawn(
        listener.local_addr().unwrap().to_string(),
        registration(),
        shutdown.child_token(),
    );
    let mut peer = Peer::accept(&listener).await;
    assert_eq!(peer.next().await["method"], "POST");
    peer.send(json!({"uri": "/heartbeat", "method": "GET", "key": 0}))
        .await;
    assert_eq!(peer.next().await, heartbeat_saying(true));
}

#[tokio::test]
async fn the_client_starts_from_the_cache_and_the_distributors_topology_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    let cache = TopologyCache::new(dir.path().join("topology.json"));
    // Bound but not yet accepting: the distributor "is down" until the test accepts.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let distributor = listener.local_addr().unwrap().to_string();
    cache
        .save(&distributor, &vec![node(4401), node(4402)])
        .unwrap();
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let mut link =
        DistributorClient::new(listener.local_addr().unwrap().to_string(), registration())
            .with_topology_cache(Some(cache.clone()))
            .start(shutdown.child_token());
    assert_eq!(**link.topology.borrow(), vec![node(4401), node(4402)]);
    assert_eq!(*link.source.borrow(), TopologySource::Cache);

    let mut peer = Peer::accept(&listener).await;
    assert_eq!(peer.next().await["method"], "POST");
    let fresh: Topology = vec![node(4403)];
    peer.send(json!({"uri": "/distributes", "method": "GET", "key": 0, "params": fresh}))
        .await;
    timeout(
        PROMPTLY,
        link.topology.wait_for(|topology| **topology == fresh),
    )
    .await
    .expect("the distributor's topology replaces the cache")
    .unwrap();
    assert_eq!(*link.source.borrow(), TopologySource::Distributor);
    // The cache follows, written by a task of its own.
    timeout(PROMPTLY, async {
        while cache.load(&distributor).unwrap() != Some(fresh.clone()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the new topology is written to the cache");
}

#[tokio::test]
async fn the_cache_of_another_distributor_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let cache = TopologyCache::new(dir.path().join("topology.json"));
    cache.save("127.0.0.1:1", &vec![node(4501)]).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let link = DistributorClient::new(listener.local_addr().unwrap().to_string(), registration())
        .with_topology_cache(Some(cache))
        .start(shutdown.child_token());
    assert_eq!(**link.topology.borrow(), Topology::new());
    assert_eq!(*link.source.borrow(), TopologySource::None);
}

#[tokio::test]
async fn a_damaged_cache_is_ignored_and_the_client_starts_empty() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("topology.json");
    std::fs::write(&path, "{\"version\":1,\"nodes\":[{\"host\":").unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let link = DistributorClient::new(listener.local_addr().unwrap().to_string(), registration())
        .with_topology_cache(Some(TopologyCache::new(&path)))
        .start(shutdown.child_token());
    assert_eq!(**link.topology.borrow(), Topology::new());
    assert_eq!(*link.source.borrow(), TopologySource::None);
}
