//! Staying registered with the distributor, and learning the topology from it.
//!
//! Every node (services through the runtime, and the gateway) keeps one connection to the
//! distributor. A [`DistributorClient`] owns it: it registers, echoes heartbeats, publishes
//! each topology it receives on a `watch` channel, and when the connection is lost (or the
//! distributor falls silent for longer than [`SILENCE_TIMEOUT`]) it reconnects every
//! [`RECONNECT_INTERVAL`] and registers again. A distributor restart therefore heals by itself.
//!
//! The last topology stays on the channel while the distributor is away, so the gateway keeps
//! routing with what it last knew. With a [`TopologyCache`] that also survives a restart of the
//! node itself: the channel starts with the cached topology, and every topology received from
//! the distributor is written to the cache ([`crate::topology_cache`]). [`TopologySource`] says
//! which one is in force.
//!
//! A node that can be unable to serve (its store unreachable) gives the client a readiness
//! channel: each heartbeat echo carries `{"ready": bool}`, and a change is sent at once as a
//! heartbeat of its own, so the distributor can tell gateways to route around the node without
//! waiting for its next heartbeat. Without one the node is always ready and says nothing.

use std::{sync::Arc, time::Duration};

use serde::Serialize;
use tokio::{net::TcpStream, sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    client::RECONNECT_INTERVAL,
    cluster::{self, ClusterSecret, HandshakeError},
    codec::{encode_frame, PacketCodec},
    connection::{tune_socket, PacketReader, WRITE_TIMEOUT},
    packet::{readiness_heartbeat, registration_packet, Registration, Topology, DISTRIBUTES_URI},
    topology_cache::TopologyCache,
    Packet,
};

/// The distributor heartbeats every few seconds; this much silence means it is gone.
pub const SILENCE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the topology in force came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TopologySource {
    /// Nothing yet: the distributor has not answered and there was no cache.
    None,
    /// The cache file, read at start-up while the distributor has not answered.
    Cache,
    /// The distributor (its latest topology, or the last one it sent before going away).
    Distributor,
}

/// What a running client publishes.
pub struct DistributorLink {
    /// The latest topology.
    pub topology: watch::Receiver<Arc<Topology>>,
    /// Where [`DistributorLink::topology`] came from.
    pub source: watch::Receiver<TopologySource>,
}

/// The node side of the distributor connection, configured before it starts:
/// `DistributorClient::new(addr, registration).with_secret(..).with_topology_cache(..).start(..)`.
pub struct DistributorClient {
    addr: String,
    registration: Registration,
    secret: Option<ClusterSecret>,
    cache: Option<TopologyCache>,
    readiness: Option<watch::Receiver<bool>>,
}

impl DistributorClient {
    /// A client that registers `registration` with the distributor at `addr`, without a secret,
    /// cache or readiness.
    pub fn new(addr: String, registration: Registration) -> DistributorClient {
        DistributorClient {
            addr,
            registration,
            secret: None,
            cache: None,
            readiness: None,
        }
    }

    /// Every connection starts with the cluster handshake ([`crate::cluster`]) when `secret` is
    /// set.
    pub fn with_secret(mut self, secret: Option<ClusterSecret>) -> DistributorClient {
        self.secret = secret;
        self
    }

    /// Starts from the topology in `cache` and keeps it up to date, when set.
    pub fn with_topology_cache(mut self, cache: Option<TopologyCache>) -> DistributorClient {
        self.cache = cache;
        self
    }

    /// Reports readiness from `readiness` (true: able to serve), when set; otherwise the node
    /// is always ready.
    pub fn with_readiness(mut self, readiness: Option<watch::Receiver<bool>>) -> DistributorClient {
        self.readiness = readiness;
        self
    }

    /// Registers with the distributor (and again after every reconnect) until `shutdown` is
    /// cancelled.
    pub fn start(self, shutdown: CancellationToken) -> DistributorLink {
        let cached = self
            .cache
            .as_ref()
            .and_then(|cache| load_cache(cache, &self.addr));
        let source = match cached {
            Some(_) => TopologySource::Cache,
            None => TopologySource::None,
        };
        let (topology_tx, topology_rx) = watch::channel(Arc::new(cached.unwrap_or_default()));
        let (source_tx, source_rx) = watch::channel(source);
        if let Some(cache) = self.cache.clone() {
            tokio::spawn(persist(
                cache,
                self.addr.clone(),
                topology_rx.clone(),
                source_rx.clone(),
                shutdown.clone(),
            ));
        }
        tokio::spawn(self.run(topology_tx, source_tx, shutdown));
        DistributorLink {
            topology: topology_rx,
            source: source_rx,
        }
    }

    /// Registers `registration` with the distributor at `addr` (and re-registers after every
    /// reconnect) until `shutdown` is cancelled. The returned channel holds the latest topology.
    pub fn spawn(
        addr: String,
        registration: Registration,
        shutdown: CancellationToken,
    ) -> watch::Receiver<Arc<Topology>> {
        DistributorClient::new(addr, registration)
            .start(shutdown)
            .topology
    }

    async fn run(
        self,
        topology: watch::Sender<Arc<Topology>>,
        source: watch::Sender<TopologySource>,
        shutdown: CancellationToken,
    ) {
        let addr = &self.addr;
        loop {
            let session = self.stay_registered(&topology, &source);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                result = session => match result {
                    Ok(()) => info!(%addr, "distributor closed the connection"),
                    Err(err) => warn!(%addr, %err, "distributor connection failed"),
                },
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(RECONNECT_INTERVAL) => {}
            }
        }
    }

    /// One connection's life: register, then answer heartbeats, report readiness and take
    /// topologies until it ends.
    async fn stay_registered(
        &self,
        topology: &watch::Sender<Arc<Topology>>,
        source: &watch::Sender<TopologySource>,
    ) -> Result<(), SessionError> {
        use tokio::io::AsyncWriteExt;

        let addr = &self.addr;
        let stream = TcpStream::connect(addr).await?;
        tune_socket(&stream);
        let (mut read_half, mut write_half) = stream.into_split();
        let buffered = match &self.secret {
            Some(secret) => cluster::connect(&mut read_half, &mut write_half, secret).await?,
            None => Default::default(),
        };
        let mut readiness = self.readiness.clone();
        let ready = readiness
            .as_mut()
            .is_none_or(|ready| *ready.borrow_and_update());
        // A node that is not ready says so before it registers, so that its entry never
        // appears ready, not even for a moment.
        let mut hello = Vec::new();
        if !ready {
            hello.extend_from_slice(&encode_frame(readiness_heartbeat(false))?);
        }
        hello.extend_from_slice(&encode_frame(registration_packet(&self.registration))?);
        write_half.write_all(&hello).await?;
        let registration = &self.registration;
        info!(%addr, name = %registration.name, port = registration.port, ready,
            "registered with the distributor");

        let mut reader =
            PacketReader::with_buffer(read_half, buffered, PacketCodec::<Packet>::new());
        let mut silence_deadline = Instant::now() + SILENCE_TIMEOUT;
        loop {
            let frame = tokio::select! {
                frame = reader.next() => frame,
                _ = tokio::time::sleep_until(silence_deadline) => {
                    return Err(SessionError::Silent(SILENCE_TIMEOUT));
                }
                ready = readiness_change(&mut readiness) => {
                    info!(ready, "readiness changed; telling the distributor");
                    send(&mut write_half, readiness_heartbeat(ready)).await?;
                    continue;
                }
            };
            silence_deadline = Instant::now() + SILENCE_TIMEOUT;
            let packet = match frame {
                None => return Ok(()),
                Some(Ok(packet)) => packet,
                Some(Err(err)) if err.is_recoverable() => {
                    warn!(%err, "bad packet from the distributor");
                    continue;
                }
                Some(Err(err)) => return Err(err.into()),
            };
            if packet.is_heartbeat() {
                let ready = readiness.as_ref().is_none_or(|ready| *ready.borrow());
                send(&mut write_half, readiness_heartbeat(ready)).await?;
            } else if packet.uri == DISTRIBUTES_URI && packet.method == "GET" {
                take_topology(packet, topology, source);
            } else if packet.status() >= 400 {
                // A refused registration (a url owned by another service, an address in use, a
                // bound exceeded): start again later rather than sit unregistered on this
                // connection. The reason is in the log every time.
                let status = packet.status();
                let reason = packet.error.unwrap_or_else(|| format!("status {status}"));
                return Err(SessionError::Refused(reason));
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Codec(#[from] crate::codec::CodecError),
    #[error("the distributor was unresponsive for {0:?}")]
    Silent(Duration),
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error("the distributor refused the registration: {0}")]
    Refused(String),
}

/// Writes one packet to the distributor, within [`WRITE_TIMEOUT`].
async fn send(
    writer: &mut tokio::net::tcp::OwnedWriteHalf,
    packet: Packet,
) -> Result<(), SessionError> {
    use tokio::io::AsyncWriteExt;
    let frame = encode_frame(&packet)?;
    tokio::time::timeout(WRITE_TIMEOUT, writer.write_all(&frame))
        .await
        .map_err(|_| SessionError::Silent(WRITE_TIMEOUT))??;
    Ok(())
}

/// Publishes a topology packet's nodes: from now on the distributor's topology is in force.
fn take_topology(
    packet: Packet,
    topology: &watch::Sender<Arc<Topology>>,
    source: &watch::Sender<TopologySource>,
) {
    match serde_json::from_value::<Topology>(packet.params) {
        Ok(nodes) => {
            debug!(nodes = nodes.len(), "topology update");
            // The source first: whoever sees the new topology sees where it came from.
            source.send_if_modified(|current| {
                let changed = *current != TopologySource::Distributor;
                *current = TopologySource::Distributor;
                changed
            });
            topology.send_if_modified(|current| {
                let changed = **current != nodes;
                if changed {
                    *current = Arc::new(nodes);
                }
                changed
            });
        }
        Err(err) => warn!(%err, "malformed topology from the distributor"),
    }
}

/// The next readiness the node reports, once it changes; never, without a readiness channel or
/// once its sender is gone (the last value stands).
async fn readiness_change(readiness: &mut Option<watch::Receiver<bool>>) -> bool {
    if let Some(ready) = readiness {
        if ready.changed().await.is_ok() {
            return *ready.borrow_and_update();
        }
    }
    std::future::pending().await
}

/// The cached topology, if there is a usable one; an unusable one is reported and ignored.
fn load_cache(cache: &TopologyCache, distributor: &str) -> Option<Topology> {
    match cache.load(distributor) {
        Ok(Some(topology)) => {
            info!(path = %cache.path().display(), nodes = topology.len(),
                "starting from the cached topology until the distributor answers");
            Some(topology)
        }
        Ok(None) => {
            debug!(path = %cache.path().display(), "no topology cache yet");
            None
        }
        Err(err) => {
            warn!(%err, "ignoring the topology cache");
            None
        }
    }
}

/// Writes every topology the distributor sends to `cache`, the latest first when they come
/// faster than the disk takes them.
async fn persist(
    cache: TopologyCache,
    distributor: String,
    mut topology: watch::Receiver<Arc<Topology>>,
    source: watch::Receiver<TopologySource>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = topology.changed() => if changed.is_err() { return },
        }
        let latest = topology.borrow_and_update().clone();
        // The cache's own topology is not written back.
        if *source.borrow() != TopologySource::Distributor {
            continue;
        }
        let (cache, distributor) = (cache.clone(), distributor.clone());
        match tokio::task::spawn_blocking(move || cache.save(&distributor, &latest)).await {
            Ok(Ok(())) => debug!("topology cache written"),
            Ok(Err(err)) => warn!(%err, "could not write the topology cache"),
            Err(err) => warn!(%err, "the topology cache writer failed"),
        }
    }
}
