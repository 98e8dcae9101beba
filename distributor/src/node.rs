//! One node's connection to the distributor, from the cluster handshake to removal.
//!
//! The task owning a connection first runs the cluster handshake (when the cluster has a secret),
//! then reads the node's packets, registers it, forwards every new topology to it, and ends the
//! connection (removing the node) when
//! - the node closes it or the socket fails,
//! - it has not registered within the registration timeout,
//! - a write to the node blocks too long or its queue overflows (it stopped reading), or
//! - a node speaking protocol 2 stays silent past the heartbeat timeout: it is sent a heartbeat
//!   every interval and must echo it, so a frozen process is noticed even though its socket is
//!   still open.
//!
//! A node's heartbeats may carry its readiness (`{"ready": bool}`, false while it cannot serve,
//! e.g. its store is down): a change is recorded on its entry and broadcast like any other, so
//! gateways route around the node. A node that never says is ready.
//!
//! Original-design nodes never get heartbeats (they would not know what to do with them): they
//! stay registered while their connection is open and accepts writes.
//!
//! A registration is checked here against the bounds of one entry (name, urls, scopes, host)
//! and then by the [`Registry`] against the rules between entries. The `host` a registration
//! advertises is taken only from a node that proved it knows the cluster secret; any other node
//! is registered at the address its connection comes from, so a stranger cannot point the
//! gateway at an address of its choosing.
//!
//! A topology can be megabytes, and every node is sent each new one: each connection has at
//! most one topology frame on its way to the node (and one answer to `GET /distributes`), both
//! sharing the registry's buffer. A newer topology waits until the previous one is written, and
//! only the latest is sent then, so a slow node costs one topology, not a backlog of them.
//!
//! Sending every node the whole list costs nodes × length bytes per change, which grows with the
//! square of the cluster: 2,000 nodes starting together would make hundreds of gigabytes of
//! topologies. So pushes are paced: after a push, a node's next one waits until the whole
//! cluster could have been sent one at [`BROADCAST_RATE`]. In a small cluster that is
//! microseconds; in a large one that is churning, each node gets the latest topology every few
//! seconds instead of every change.

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;
use shared::{
    cluster::HANDSHAKE_URI,
    codec::{encode_frame, CodecError, PacketCodec},
    connection::{tune_socket, write_frames, PacketReader},
    packet::{heartbeat_packet, readiness_in, NodeInfo, Registration, DISTRIBUTES_URI},
    Packet,
};
use tokio::{
    net::{tcp::OwnedReadHalf, TcpStream},
    sync::{mpsc, oneshot, watch},
    time::{sleep_until, Instant},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    registry::{ConnectionId, Registry, Topology},
    Config,
};

/// Frames queued for one node before it counts as not reading.
const NODE_QUEUE: usize = 64;

/// The bytes per second all topology pushes together aim to stay under (about half a gigabit).
const BROADCAST_RATE: u64 = 64 * 1024 * 1024;

/// The longest service name, in bytes.
pub const MAX_NAME_LENGTH: usize = 64;
/// The most urls one registration may hold.
pub const MAX_URLS: usize = 64;
/// The longest url (`METHOD/path`), in bytes.
pub const MAX_URL_LENGTH: usize = 256;
/// The longest scope, in bytes.
pub const MAX_SCOPE_LENGTH: usize = 64;
/// The longest advertised host, in bytes (a DNS name is at most 253).
pub const MAX_HOST_LENGTH: usize = 253;

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
    // The handshake counts against the registration timeout: together they bound how long a
    // stranger holds a connection.
    let registration_deadline = Instant::now() + config.registration_timeout;
    let (read_half, mut write_half) = stream.into_split();
    let mut reader = PacketReader::new(
        read_half,
        PacketCodec::<Packet>::with_max_frame_length(config.max_frame_length),
    );
    let accepted = tokio::select! {
        _ = shutdown.cancelled() => return,
        accepted = shared::cluster::accept(&mut reader, &mut write_half, &config.cluster, peer) => {
            match accepted {
                Ok(accepted) => accepted,
                // `accept` told the peer why and logged it.
                Err(_) => return,
            }
        }
    };

    let (outgoing, frames) = mpsc::channel(NODE_QUEUE);
    let mut writer = tokio::spawn(write_frames(write_half, frames));
    let mut node = NodeConnection {
        id,
        peer,
        authenticated: accepted.authenticated,
        registry: registry.clone(),
        outgoing,
        speaks_heartbeats: false,
        registered: false,
        ready: true,
        topology_due: false,
        answer_in_flight: None,
    };

    let Err(departure) = node
        .run(
            reader,
            accepted.first,
            registration_deadline,
            &config,
            &mut writer,
            &shutdown,
        )
        .await;

    if let Some(removed) = registry.remove(id) {
        match departure {
            Departure::Closed | Departure::Shutdown => {
                info!(name = %removed.name, addr = %removed.addr(), %departure, "node left")
            }
            _ => warn!(name = %removed.name, addr = %removed.addr(), %departure, "node evicted"),
        }
    } else {
        debug!(%peer, %departure, "connection ended");
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
    /// The node proved it knows the cluster secret, so the `host` it advertises is believed.
    authenticated: bool,
    registry: Registry,
    outgoing: mpsc::Sender<Bytes>,
    speaks_heartbeats: bool,
    registered: bool,
    /// What the node last said of its readiness in a heartbeat; ready until it says otherwise.
    ready: bool,
    /// The node is owed the latest topology: it changed, or the node just registered.
    topology_due: bool,
    /// Resolves once the last answer to `GET /distributes` has left the writer.
    answer_in_flight: Option<oneshot::Receiver<()>>,
}

impl NodeConnection {
    /// Runs until the connection ends; the error says why.
    async fn run(
        &mut self,
        mut reader: PacketReader<OwnedReadHalf, Packet>,
        first: Option<Packet>,
        registration_deadline: Instant,
        config: &Config,
        writer: &mut tokio::task::JoinHandle<std::io::Result<()>>,
        shutdown: &CancellationToken,
    ) -> Result<Infallible, Departure> {
        let mut topology = self.registry.subscribe();
        let mut heartbeat = tokio::time::interval(config.heartbeat_interval);
        // The interval only runs once the node registers (or after a stall): catch up with one
        // heartbeat, not a burst of all the missed ones, which would overflow the node's queue.
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        // Reserving a slot borrows the sender, so the select uses its own handle to it.
        let topology_out = self.outgoing.clone();
        // Resolves once the last topology sent has left the writer.
        let mut topology_in_flight: Option<oneshot::Receiver<()>> = None;
        let mut next_push_at = Instant::now();

        if let Some(packet) = first {
            // What an original-design node sent where the handshake would have been.
            self.handle(packet, &topology)?;
        }

        loop {
            let silence_deadline = last_heard + config.heartbeat_timeout;
            let may_push = self.topology_due && topology_in_flight.is_none();
            let paced = Instant::now() < next_push_at;
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
                        Some(Ok(packet)) => self.handle(packet, &topology)?,
                        Some(Err(err)) if err.is_recoverable() => self.reject_frame(err)?,
                        Some(Err(err)) => return Err(err.into()),
                    }
                }
                // Once a push is due, later changes need not wake this task: the push sends the
                // latest anyway. With thousands of nodes, that is most of the distributor's work.
                changed = topology.changed(), if self.registered && !self.topology_due => {
                    self.topology_due |= changed.is_ok();
                }
                _ = wait_written(&mut topology_in_flight), if topology_in_flight.is_some() => {
                    topology_in_flight = None;
                }
                _ = wait_written(&mut self.answer_in_flight), if self.answer_in_flight.is_some() => {
                    self.answer_in_flight = None;
                }
                _ = sleep_until(next_push_at), if may_push && paced => {}
                // Only the latest topology is ever sent, once the previous one is written: while
                // the node reads slowly, newer topologies replace the due one instead of queueing.
                permit = topology_out.reserve(), if may_push && !paced => {
                    let permit = permit.map_err(|_| Departure::Closed)?;
                    let latest = topology.borrow_and_update().clone();
                    next_push_at = Instant::now() + push_pace(&latest);
                    let (frame, written) = tracked(latest.frame);
                    permit.send(frame);
                    topology_in_flight = Some(written);
                    self.topology_due = false;
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
        }
    }

    fn handle(
        &mut self,
        packet: Packet,
        topology: &watch::Receiver<Topology>,
    ) -> Result<(), Departure> {
        if packet.is_heartbeat() {
            if let Some(ready) = readiness_in(&packet) {
                self.set_ready(ready);
            }
            return Ok(());
        }
        // Each request is a span of its own (exported with --otlp-endpoint), continuing the trace
        // of a caller that sent one, such as the gateway gathering logs.
        let _span = shared::trace::server_span(
            format_args!("{} {}", packet.method, packet.uri),
            packet.traceparent.as_deref(),
        )
        .entered();
        match (packet.method.as_str(), packet.uri.as_str()) {
            ("POST", DISTRIBUTES_URI) => self.register(&packet),
            ("GET", DISTRIBUTES_URI) => {
                if self.answer_in_flight.is_some() {
                    let reason = "the previous topology answer is still being sent".to_owned();
                    return self.answer_error(&packet, 429, reason);
                }
                let latest = topology.borrow().frame.clone();
                let (head, list) = topology_answer(&latest, packet.key);
                let (list, written) = tracked(list);
                let permits = self
                    .outgoing
                    .try_reserve_many(2)
                    .map_err(|_| Departure::NotReading)?;
                for (permit, frame) in permits.zip([head, list]) {
                    permit.send(frame);
                }
                self.answer_in_flight = Some(written);
                Ok(())
            }
            ("GET", shared::logs::LOGS_URI) => self.answer_logs(&packet),
            // Only reached without a secret: with one, the handshake is done before this.
            (_, HANDSHAKE_URI) => {
                let reason = "this node has no cluster secret: give every node the same \
                    --cluster-secret-file"
                    .to_owned();
                self.answer_error(&packet, 401, reason)
            }
            (method, uri) => {
                let reason = format!("the distributor has no {method} {uri}");
                self.answer_error(&packet, 404, reason)
            }
        }
    }

    fn register(&mut self, packet: &Packet) -> Result<(), Departure> {
        let node = match self.node_from(&packet.params) {
            Ok(node) => node,
            Err(reason) => {
                warn!(peer = %self.peer, %reason, "registration refused");
                crate::metrics::count_refused_registration();
                return self.answer_error(packet, 400, reason);
            }
        };
        let peer_ip = plain_ip(self.peer.ip());
        match self.registry.register(self.id, peer_ip, node.clone()) {
            Ok(()) => {
                if !self.registered {
                    info!(name = %node.name, addr = %node.addr(), urls = ?node.urls,
                        protocol = node.protocol, "node joined");
                }
                self.registered = true;
                self.speaks_heartbeats = node.speaks_protocol_2();
                // Every node gets the topology right after it registers, changed or not.
                self.topology_due = true;
                Ok(())
            }
            Err(err) => {
                warn!(peer = %self.peer, name = %node.name, %err, "registration refused");
                crate::metrics::count_refused_registration();
                self.answer_error(packet, err.status(), err.to_string())
            }
        }
    }

    /// Records the node's readiness; a change reaches every node with the next topology. A node
    /// may say it before it registers, and its entry then starts with it.
    fn set_ready(&mut self, ready: bool) {
        if ready == self.ready {
            return;
        }
        self.ready = ready;
        match self.registry.set_ready(self.id, ready) {
            Ok(true) => info!(peer = %self.peer, ready, "node readiness changed"),
            Ok(false) => {}
            Err(err) => warn!(peer = %self.peer, ready, %err, "readiness change not published"),
        }
    }

    /// Builds the topology entry for a registration, or says what is wrong with it.
    fn node_from(&self, params: &Value) -> Result<NodeInfo, String> {
        // Serde would also take the fields positionally from an array; only an object is valid.
        if !params.is_object() {
            return Err("invalid registration: params must be an object".into());
        }
        let registration = Registration::deserialize(params)
            .map_err(|err| format!("invalid registration: {err}"))?;
        check_bounds(&registration).map_err(|reason| format!("invalid registration: {reason}"))?;
        let advertised = registration.host.filter(|host| !host.trim().is_empty());
        let host = match advertised {
            Some(host) if self.authenticated => {
                check_host(&host).map_err(|reason| format!("invalid registration: {reason}"))?;
                host
            }
            Some(_) => {
                // Not logged: it is whatever a stranger wrote.
                debug!(peer = %self.peer, "ignoring the host of a node that did not authenticate");
                plain_ip(self.peer.ip()).to_string()
            }
            None => plain_ip(self.peer.ip()).to_string(),
        };
        Ok(NodeInfo {
            host,
            port: registration.port,
            name: registration.name,
            urls: registration.urls,
            scopes: registration.scopes,
            protocol: registration.protocol,
            ready: self.ready,
        })
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

    /// `GET /_/logs`: the distributor's recent log lines, for a cluster member (the gateway
    /// gathering every node's) or a caller whose verified identity holds `admin`.
    fn answer_logs(&self, packet: &Packet) -> Result<(), Departure> {
        if packet
            .auth
            .as_ref()
            .is_some_and(|auth| !auth.has_scope(shared::packet::ADMIN_SCOPE))
        {
            let reason = "reading the logs needs the scope \"admin\"".to_owned();
            return self.answer_error(packet, 403, reason);
        }
        match shared::logs::answer(&packet.params) {
            Ok(lines) => self.send(encode_frame(Packet::reply_to(packet, lines))?),
            Err(reason) => self.answer_error(packet, 400, reason),
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

/// The bounds of one registration, so that no entry can make the topology unwieldy or carry
/// text that does not belong in a log line.
fn check_bounds(registration: &Registration) -> Result<(), String> {
    let name = &registration.name;
    if name.trim().is_empty() {
        return Err("name is empty".into());
    }
    if name.len() > MAX_NAME_LENGTH {
        return Err(format!(
            "name is {} bytes long, longer than {MAX_NAME_LENGTH}",
            name.len()
        ));
    }
    if name.chars().any(char::is_control) {
        return Err("name has control characters".into());
    }
    if registration.urls.len() > MAX_URLS {
        return Err(format!(
            "{} urls, more than {MAX_URLS}",
            registration.urls.len()
        ));
    }
    for url in &registration.urls {
        if url.len() > MAX_URL_LENGTH {
            return Err(format!(
                "a url is {} bytes long, longer than {MAX_URL_LENGTH}",
                url.len()
            ));
        }
        if !is_url(url) {
            return Err(format!("url {url:?} is not METHOD/path (e.g. GET/kv)"));
        }
    }
    for scope in registration.scopes.values() {
        if scope.len() > MAX_SCOPE_LENGTH {
            return Err(format!(
                "a scope is {} bytes long, longer than {MAX_SCOPE_LENGTH}",
                scope.len()
            ));
        }
        if scope.is_empty() || scope.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("scope {scope:?} is empty or has spaces"));
        }
    }
    Ok(())
}

/// An advertised host: a name or an address, nothing else.
fn check_host(host: &str) -> Result<(), String> {
    if host.len() > MAX_HOST_LENGTH {
        return Err(format!(
            "host is {} bytes long, longer than {MAX_HOST_LENGTH}",
            host.len()
        ));
    }
    if host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("host has spaces or control characters".into());
    }
    Ok(())
}

/// `METHOD/path`: an upper-case method followed by an absolute path without control characters.
fn is_url(url: &str) -> bool {
    let well_formed = match url.find('/') {
        Some(slash) if slash > 0 => url[..slash].bytes().all(|b| b.is_ascii_uppercase()),
        _ => false,
    };
    well_formed && !url.chars().any(char::is_control)
}

/// A frame that reports when the writer is done with it (written, or dropped with the queue),
/// without copying it: the receiver resolves once the frame is dropped.
fn tracked(frame: Bytes) -> (Bytes, oneshot::Receiver<()>) {
    struct Tracked {
        frame: Bytes,
        _written: oneshot::Sender<()>,
    }
    impl AsRef<[u8]> for Tracked {
        fn as_ref(&self) -> &[u8] {
            &self.frame
        }
    }
    let (written, done) = oneshot::channel();
    let frame = Bytes::from_owner(Tracked {
        frame,
        _written: written,
    });
    (frame, done)
}

/// How long after pushing `topology` to one node the next push to it waits: the time
/// [`BROADCAST_RATE`] takes to send it to every node.
fn push_pace(topology: &Topology) -> Duration {
    let cluster_bytes = topology.frame.len() as u64 * topology.nodes as u64;
    Duration::from_micros(cluster_bytes * 1_000_000 / BROADCAST_RATE)
}

/// Waits until the tracked frame in `slot` has left the writer.
async fn wait_written(slot: &mut Option<oneshot::Receiver<()>>) {
    if let Some(done) = slot {
        // Never sent on: the sender is only ever dropped.
        let _ = done.await;
    }
}

/// The answer to a `GET /distributes` with `key`, as two frames to be written back to back: the
/// topology packet's head with that key, then the rest of `topology`, shared rather than
/// copied. The topology packet is `{"uri":..,"method":"GET","key":0,"params":[..]}`, and the
/// answer repeats the request's `uri`, `method` and `key`, which are the same but for the key.
fn topology_answer(topology: &Bytes, key: u64) -> (Bytes, Bytes) {
    const PARAMS: &[u8] = br#","params":"#;
    let params_at = topology
        .windows(PARAMS.len())
        .position(|window| window == PARAMS)
        .expect("a topology packet has params");
    let key_at = params_at - 1;
    debug_assert_eq!(topology[key_at], b'0', "a topology packet has key 0");
    let mut head = topology[..key_at].to_vec();
    head.extend_from_slice(key.to_string().as_bytes());
    (Bytes::from(head), topology.slice(params_at..))
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
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn urls_are_method_then_path() {
        assert!(is_url("GET/kv"));
        assert!(is_url("DELETE/notices/subscribers"));
        assert!(!is_url("/kv"));
        assert!(!is_url("get/kv"));
        assert!(!is_url("GET"));
        assert!(!is_url("GET/kv\n"));
    }

    #[test]
    fn ipv4_mapped_addresses_are_reported_as_ipv4() {
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(plain_ip(mapped).to_string(), "127.0.0.1");
        let v6: IpAddr = "::1".parse().unwrap();
        assert_eq!(plain_ip(v6), v6);
    }

    fn registration(name: &str, urls: Vec<String>) -> Registration {
        Registration {
            port: 1,
            name: name.into(),
            urls,
            ..Registration::default()
        }
    }

    #[test]
    fn a_registration_within_bounds_passes() {
        let mut ok = registration(
            &"n".repeat(MAX_NAME_LENGTH),
            (0..MAX_URLS).map(|i| format!("GET/{i:0>252}")).collect(),
        );
        assert_eq!(ok.urls[0].len(), MAX_URL_LENGTH);
        ok.scopes = BTreeMap::from([(ok.urls[0].clone(), "s".repeat(MAX_SCOPE_LENGTH))]);
        assert_eq!(check_bounds(&ok), Ok(()));
        assert_eq!(check_host(&"h".repeat(MAX_HOST_LENGTH)), Ok(()));
    }

    #[test]
    fn each_bound_is_named_when_it_is_passed() {
        let cases = [
            (
                registration(&"n".repeat(65), vec![]),
                "name is 65 bytes long",
            ),
            (registration(" ", vec![]), "name is empty"),
            (
                registration("k\u{1b}[31mv", vec![]),
                "name has control characters",
            ),
            (
                registration("kv", (0..65).map(|i| format!("GET/{i}")).collect()),
                "65 urls, more than 64",
            ),
            (
                registration("kv", vec![format!("GET/{}", "a".repeat(253))]),
                "a url is 257 bytes long",
            ),
        ];
        for (registration, expected) in cases {
            let refused = check_bounds(&registration).unwrap_err();
            assert!(refused.starts_with(expected), "{refused}");
        }
        let mut scoped = registration("kv", vec!["GET/kv".into()]);
        scoped.scopes.insert("GET/kv".into(), "s".repeat(65));
        assert!(check_bounds(&scoped)
            .unwrap_err()
            .starts_with("a scope is 65 bytes long"));
        scoped
            .scopes
            .insert("GET/kv".into(), "kv:read admin".into());
        assert!(check_bounds(&scoped).is_err());
        assert!(check_host(&"h".repeat(254))
            .unwrap_err()
            .starts_with("host is 254 bytes"));
        assert!(check_host("evil host").is_err());
    }

    #[test]
    fn a_topology_answer_is_the_topology_packet_with_the_request_key() {
        let nodes = serde_json::json!([{"host": "127.0.0.1", "port": 1, "name": "a¶", "urls": []}]);
        let topology =
            encode_frame(Packet::request("GET", DISTRIBUTES_URI, nodes.clone())).unwrap();
        let request = Packet::request("GET", DISTRIBUTES_URI, Value::Null);
        for key in [0, 7, u64::MAX] {
            let (head, list) = topology_answer(&topology, key);
            let expected = encode_frame(Packet::reply_to(
                &Packet {
                    key,
                    ..request.clone()
                },
                nodes.clone(),
            ))
            .unwrap();
            assert_eq!([head, list].concat(), expected.to_vec(), "key {key}");
        }
    }

    #[tokio::test]
    async fn a_tracked_frame_reports_when_it_is_dropped() {
        let (frame, mut written) = tracked(Bytes::from_static(b"abc"));
        assert_eq!(&frame[..], b"abc");
        assert!(written.try_recv().is_err());
        let copy = frame.clone();
        drop(frame);
        assert_eq!(written.try_recv(), Err(oneshot::error::TryRecvError::Empty));
        drop(copy);
        wait_written(&mut Some(written)).await;
    }
}
