//! A raw node for the distributor's tests: a plain socket writing packets (JSON + `¶`) by hand,
//! the way an original-design node (or an attacker) does, so the tests pin the wire format
//! rather than what the shared runtime makes of it. Every test file that talks to the
//! distributor over raw TCP uses this one.

#![allow(dead_code)]

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use serde_json::{json, Value};
use shared::cluster::ClusterSecret;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    time::{timeout, timeout_at, Instant},
};

/// Upper bound for anything that should happen promptly; only reached when a test fails.
pub const PROMPTLY: Duration = Duration::from_secs(10);

pub const DELIMITER: &[u8] = "¶".as_bytes();

pub const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A node on a plain socket, speaking JSON + `¶` by hand.
pub struct Node {
    pub stream: TcpStream,
    /// Bytes read but not yet taken as frames.
    pub buffer: Vec<u8>,
    /// Answer heartbeats as a protocol-2 node must; set by [`Node::register`].
    echo_heartbeats: bool,
    /// Heartbeats received so far.
    pub heartbeats: usize,
}

impl Node {
    fn on(stream: TcpStream) -> Node {
        Node {
            stream,
            buffer: Vec::new(),
            echo_heartbeats: false,
            heartbeats: 0,
        }
    }

    /// Connects to `addr` (IPv4 or IPv6) from whatever address the system picks.
    pub async fn connect(addr: SocketAddr) -> Node {
        Node::on(TcpStream::connect(addr).await.unwrap())
    }

    /// Connects from `source`, any loopback address (127.0.0.0/8 is all ours).
    pub async fn connect_from(addr: SocketAddr, source: IpAddr) -> Node {
        Node::try_connect_from(addr, source).await.unwrap()
    }

    pub async fn try_connect_from(addr: SocketAddr, source: IpAddr) -> std::io::Result<Node> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source, 0))?;
        Ok(Node::on(socket.connect(addr).await?))
    }

    /// Connects and proves it knows `secret` with the cluster handshake.
    pub async fn authenticated(addr: SocketAddr, secret: &ClusterSecret) -> Node {
        let mut node = Node::connect_from(addr, LOCALHOST).await;
        let (reader, mut writer) = node.stream.split();
        let leftover = shared::cluster::connect(reader, &mut writer, secret)
            .await
            .expect("the handshake succeeds");
        node.buffer = leftover.to_vec();
        node
    }

    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    pub async fn send(&mut self, value: Value) {
        let mut frame = serde_json::to_vec(&value).unwrap();
        frame.extend_from_slice(DELIMITER);
        self.send_bytes(&frame).await;
    }

    /// Sends a registration; a node that registers with `"protocol": 2` echoes heartbeats from
    /// then on, as the protocol asks.
    pub async fn register(&mut self, params: Value) {
        self.echo_heartbeats = params["protocol"] == 2;
        self.send(json!({"uri": "/distributes", "method": "POST", "key": 0, "params": params}))
            .await;
    }

    /// The next frame as it arrived, or `None` once the distributor closed the connection.
    /// Cancel-safe: a partly read frame stays in the buffer.
    pub async fn next_frame(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == DELIMITER) {
                let mut frame: Vec<u8> = self.buffer.drain(..end + DELIMITER.len()).collect();
                frame.truncate(end);
                return Some(frame);
            }
            let mut chunk = [0u8; 16 * 1024];
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The next packet other than a heartbeat (echoing heartbeats if this node speaks
    /// protocol 2), or `None` once the connection is closed.
    pub async fn try_next(&mut self) -> Option<Value> {
        timeout(PROMPTLY, async {
            loop {
                let frame = self.next_frame().await?;
                let packet: Value = serde_json::from_slice(&frame).unwrap_or_else(|err| {
                    panic!("invalid frame {:?}: {err}", String::from_utf8_lossy(&frame))
                });
                if packet["uri"] == "/heartbeat" {
                    assert_eq!(packet["key"], 0, "{packet}");
                    self.heartbeats += 1;
                    if self.echo_heartbeats {
                        self.send(packet).await;
                    }
                    continue;
                }
                return Some(packet);
            }
        })
        .await
        .expect("a packet or the end of the connection arrives")
    }

    pub async fn next(&mut self) -> Value {
        self.try_next().await.expect("the connection stays open")
    }

    /// The next packet, which must be a topology; returns its nodes.
    pub async fn next_topology(&mut self) -> Vec<Value> {
        let packet = self.next().await;
        assert_eq!(
            (&packet["uri"], &packet["method"], &packet["key"]),
            (&json!("/distributes"), &json!("GET"), &json!(0)),
            "not a topology: {packet}"
        );
        packet["params"]
            .as_array()
            .expect("a list of nodes")
            .clone()
    }

    /// Reads topologies until one has exactly these ports (in any order).
    pub async fn topology_with_ports(&mut self, ports: &[u16]) -> Vec<Value> {
        let mut expected = ports.to_vec();
        expected.sort_unstable();
        loop {
            let topology = self.next_topology().await;
            let mut seen = ports_of(&topology);
            seen.sort_unstable();
            if seen == expected {
                return topology;
            }
        }
    }

    /// Everything but heartbeats that arrives until `deadline`.
    pub async fn read_until(&mut self, deadline: Instant) -> Vec<Value> {
        let mut packets = Vec::new();
        while let Ok(packet) = timeout_at(deadline, self.try_next()).await {
            packets.push(packet.expect("the connection stays open"));
        }
        packets
    }

    /// The next packet, which must refuse a registration: its status and error.
    pub async fn refusal(&mut self) -> (u64, String) {
        let packet = self.next().await;
        assert_eq!(
            (&packet["uri"], &packet["method"]),
            (&json!("/distributes"), &json!("POST")),
            "not an answer to a registration: {packet}"
        );
        let status = packet["status"].as_u64().expect("an error status");
        let error = packet["error"].as_str().expect("an error").to_owned();
        (status, error)
    }

    /// The topology as the distributor has it now, asked with `GET /distributes`.
    pub async fn ask_topology(&mut self, key: u64) -> Vec<Value> {
        self.send(json!({"uri": "/distributes", "method": "GET", "key": key, "params": null}))
            .await;
        loop {
            let packet = self.next().await;
            if packet["key"] == key {
                assert!(packet["status"].is_null(), "{packet}");
                return packet["params"]
                    .as_array()
                    .expect("a list of nodes")
                    .clone();
            }
        }
    }

    /// True once the distributor closes the connection (packets before that are skipped).
    pub async fn closed(&mut self) -> bool {
        timeout(PROMPTLY, async {
            while self.next_frame().await.is_some() {}
        })
        .await
        .is_ok()
    }
}

/// The ports of a topology's nodes, in its order.
pub fn ports_of(topology: &[Value]) -> Vec<u16> {
    topology
        .iter()
        .map(|node| node["port"].as_u64().unwrap() as u16)
        .collect()
}

/// The hosts of a topology's nodes, in its order.
pub fn hosts_of(topology: &[Value]) -> Vec<&str> {
    topology
        .iter()
        .map(|node| node["host"].as_str().unwrap())
        .collect()
}
