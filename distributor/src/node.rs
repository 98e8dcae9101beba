//! One node's connection to the distributor, from registration to removal.
//!
//! The task owning a connection reads the node's packets, registers it, forwards every new
//! topology to it, and ends the connection (removing the node) when
//! - the node closes it or the socket fails,
//! - a write to the node blocks too long or its queue overflows (it stopped reading), or
//! - a node speaking protocol 2 stays silent past the heartbeat timeout: it is sent a heartbeat
//!   every interval and must echo it, so a frozen process is noticed even though its socket is
//!   still open.
//!
//! Original-design nodes never get heartbeats (they would not know what to do with them): they
//! stay registered while their connection is open and accepts writes.

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;
use shared::{
    codec::{encode_frame, CodecError, PacketCodec},
    connection::{tune_socket, write_frames, PacketReader},
    packet::{heartbeat_packet, NodeInfo, Registration, DISTRIBUTES_URI},
    Packet,
};
use tokio::{
    net::TcpStream,
    sync::mpsc,
    time::{sleep_until, Instant},
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    registry::{ConnectionId, Registry},
    Config,
};

/// Frames queued for one node before it counts as not reading.
const NODE_QUEUE: usize = 64;

/// Why a node's connection ended; logged when its node is removed.
#[derive(Debug, thiserror::Error)]
enum Departure {
    #[error("connection closed")]
    Closed,
    #[error("connection failed: {0}")]
    Failed(#[from] CodecError),
    #[error("no heartbeat for {0:?}")]
    Silent(Duration),
    #[error("stopped reading")]
    NotReading,
    #[error("did not register within {0:?}")]
    NeverRegistered(Duration),
    #[error("distributor shutting down")]
    Shutdown,
}

pub(crate) async fn serve_node(
    stream: TcpStream,
    peer: SocketAddr,
    id: ConnectionId,
    registry: Registry,
    config: Config,
    shutdown: CancellationToken,
) {
    tune_socket(&stream);
    let (read_half, write_half) = stream.into_split();
    let (outgoing, frames) = mpsc::channel(NODE_QUEUE);
    let mut writer = tokio::spawn(write_frames(write_half, frames));
    let mut node = NodeConnection {
        id,
        peer,
        registry: registry.clone(),
        outgoing,
        speaks_heartbeats: false,
        registered: false,
    };

    let Err(departure) = node.run(read_half, &config, &mut writer, &shutdown).await;

    if let Some(removed) = registry.remove(id) {
        match departure {
            Departure::Closed | Departure::Shutdown => {
                info!(name = %removed.name, addr = %removed.addr(), %departure, "node left")
            }
            _ => warn!(name = %removed.name, addr = %removed.addr(), %departure, "node evicted"),
        }
    }
    drop(node);
    // Let queued frames (an error answer, say) go out before the socket closes, but not forever.
    // The writer may already have ended (and been awaited) in `run`: a JoinHandle must not be
    // polled again after it completed.
    if !writer.is_finished() {
        let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
    }
}

struct NodeConnection {
    id: ConnectionId,
    peer: SocketAddr,
    registry: Registry,
    outgoing: mpsc::Sender<Bytes>,
    speaks_heartbeats: bool,
    registered: bool,
}

impl NodeConnection {
    /// Runs until the connection ends; the error says why.
    async fn run(
        &mut self,
        read_half: tokio::net::tcp::OwnedReadHalf,
        config: &Config,
        writer: &mut tokio::task::JoinHandle<std::io::Result<()>>,
        shutdown: &CancellationToken,
    ) -> Result<Infallible, Departure> {
        let mut reader = PacketReader::new(
            read_half,
            PacketCodec::<Packet>::with_max_frame_length(config.max_frame_length),
        );
        let mut topology = self.registry.subscribe();
        let mut heartbeat = tokio::time::interval(config.heartbeat_interval);
        // The interval only runs once the node registers (or after a stall): catch up with one
        // heartbeat, not a burst of all the missed ones, which would overflow the node's queue.
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        let registration_deadline = last_heard + config.registration_timeout;
        // Reserving a slot borrows the sender, so the select uses its own handle to it.
        let topology_out = self.outgoing.clone();
        let mut topology_pending = false;

        loop {
            let silence_deadline = last_heard + config.heartbeat_timeout;
            tokio::select! {
                _ = shutdown.cancelled() => return Err(Departure::Shutdown),
                written = &mut *writer => return Err(match written {
                    Ok(Err(err)) if err.kind() == std::io::ErrorKind::TimedOut => Departure::NotReading,
                    Ok(Err(err)) => Departure::Failed(err.into()),
                    Ok(Ok(())) | Err(_) => Departure::Closed,
                }),
                frame = reader.next() => {
                    last_heard = Instant::now();
                    match frame {
                        None => return Err(Departure::Closed),
                        Some(Ok(packet)) => self.handle(packet, &mut topology)?,
                        Some(Err(err)) if err.is_recoverable() => self.reject_frame(err)?,
                        Some(Err(err)) => return Err(err.into()),
                    }
                }
                changed = topology.changed(), if self.registered => {
                    topology_pending |= changed.is_ok();
                }
                // Only the latest topology is ever sent: while the node's queue is full, newer
                // topologies replace the pending one instead of queueing behind it.
                permit = topology_out.reserve(), if topology_pending => {
                    let permit = permit.map_err(|_| Departure::Closed)?;
                    permit.send(topology.borrow_and_update().clone());
                    topology_pending = false;
                }
                _ = heartbeat.tick(), if self.speaks_heartbeats => {
                    self.send(encode_frame(heartbeat_packet())?)?;
                }
                _ = sleep_until(silence_deadline), if self.speaks_heartbeats => {
                    return Err(Departure::Silent(config.heartbeat_timeout));
                }
                _ = sleep_until(registration_deadline), if !self.registered => {
                    return Err(Departure::NeverRegistered(config.registration_timeout));
                }
            }
            if self.registered && !self.registry.is_registered(self.id) {
                // A newer connection registered the same address: this one is a stale leftover.
                return Err(Departure::Closed);
            }
        }
    }

    fn handle(
        &mut self,
        packet: Packet,
        topology: &mut tokio::sync::watch::Receiver<Bytes>,
    ) -> Result<(), Departure> {
        if packet.is_heartbeat() {
            return Ok(());
        }
        match (packet.method.as_str(), packet.uri.as_str()) {
            ("POST", DISTRIBUTES_URI) => match self.node_from(&packet.params) {
                Ok((node, speaks_heartbeats)) => {
                    for replaced in self.registry.register(self.id, node.clone()) {
                        info!(name = %replaced.name, addr = %replaced.addr(), "replaced by a new connection");
                    }
                    if !self.registered {
                        info!(name = %node.name, addr = %node.addr(), urls = ?node.urls,
                            protocol = node.protocol, "node joined");
                    }
                    self.registered = true;
                    self.speaks_heartbeats = speaks_heartbeats;
                    // Every node gets the topology right after it registers, changed or not.
                    let latest = topology.borrow_and_update().clone();
                    self.send(latest)
                }
                Err(reason) => {
                    warn!(peer = %self.peer, %reason, "registration refused");
                    self.answer_error(&packet, 400, reason)
                }
            },
            ("GET", DISTRIBUTES_URI) => {
                let nodes = serde_json::to_value(self.registry.nodes()).unwrap_or(Value::Null);
                self.send(encode_frame(Packet::reply_to(&packet, nodes))?)
            }
            (method, uri) => {
                let reason = format!("the distributor has no {method} {uri}");
                self.answer_error(&packet, 404, reason)
            }
        }
    }

    /// Builds the topology entry for a registration, or says what is wrong with it.
    fn node_from(&self, params: &Value) -> Result<(NodeInfo, bool), String> {
        // Serde would also take the fields positionally from an array; only an object is valid.
        if !params.is_object() {
            return Err("invalid registration: params must be an object".into());
        }
        let registration = Registration::deserialize(params)
            .map_err(|err| format!("invalid registration: {err}"))?;
        if registration.name.trim().is_empty() {
            return Err("invalid registration: name is empty".into());
        }
        if let Some(url) = registration.urls.iter().find(|url| !is_url(url)) {
            return Err(format!(
                "invalid registration: url {url:?} is not METHOD/path (e.g. GET/kv)"
            ));
        }
        let host = match registration.host {
            Some(host) if !host.trim().is_empty() => host,
            _ => plain_ip(self.peer.ip()).to_string(),
        };
        let speaks_heartbeats = registration.protocol.is_some_and(|p| p >= 2);
        let node = NodeInfo {
            host,
            port: registration.port,
            name: registration.name,
            urls: registration.urls,
            protocol: registration.protocol,
        };
        Ok((node, speaks_heartbeats))
    }

    fn reject_frame(&self, err: CodecError) -> Result<(), Departure> {
        warn!(peer = %self.peer, %err, "bad packet");
        match &err {
            CodecError::Json { key: Some(key), .. } => {
                let answer: Packet = Packet {
                    key: *key,
                    status: Some(400),
                    error: Some(err.to_string()),
                    ..Packet::default()
                };
                self.send(encode_frame(answer)?)
            }
            _ => Ok(()),
        }
    }

    fn answer_error(&self, to: &Packet, status: u16, reason: String) -> Result<(), Departure> {
        let answer = Packet {
            status: Some(status),
            error: Some(reason),
            ..Packet::reply_to(to, Value::Null)
        };
        self.send(encode_frame(answer)?)
    }

    /// Queues a frame for the node without waiting: a node whose queue is full is not reading.
    fn send(&self, frame: Bytes) -> Result<(), Departure> {
        self.outgoing
            .try_send(frame)
            .map_err(|_| Departure::NotReading)
    }
}

/// `METHOD/path`: an upper-case method followed by an absolute path.
fn is_url(url: &str) -> bool {
    match url.find('/') {
        Some(slash) if slash > 0 => url[..slash].bytes().all(|b| b.is_ascii_uppercase()),
        _ => false,
    }
}

/// Reports IPv4-mapped IPv6 addresses (`::ffff:127.0.0.1`) as plain IPv4.
fn plain_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_method_then_path() {
        assert!(is_url("GET/kv"));
        assert!(is_url("DELETE/notices/subscribers"));
        assert!(!is_url("/kv"));
        assert!(!is_url("get/kv"));
        assert!(!is_url("GET"));
    }

    #[test]
    fn ipv4_mapped_addresses_are_reported_as_ipv4() {
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(plain_ip(mapped).to_string(), "127.0.0.1");
        let v6: IpAddr = "::1".parse().unwrap();
        assert_eq!(plain_ip(v6), v6);
    }
}
