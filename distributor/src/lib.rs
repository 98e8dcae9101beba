//! The distributor: the registry every node connects to.
//!
//! Services and gateways connect over the packet protocol, prove they belong to the cluster (the
//! handshake of `shared::cluster`, when the cluster has a secret), register (`POST /distributes`
//! with name, port and urls), and receive the whole topology (`GET /distributes`) right after
//! they register and whenever it changes. A node is removed when its connection closes, when it
//! stops reading, or, for nodes that speak protocol 2, when it misses heartbeats for too long.
//!
//! The topology decides where the gateway sends every request, so a registration is checked
//! before it is believed:
//! - a url belongs to the first service name that registers it, for as long as any node of that
//!   name is registered; another name claiming it is refused;
//! - a node is registered at the address its connection comes from; only a node that proved it
//!   knows the cluster secret may advertise another host;
//! - an address (`host:port`) held by one connection is never taken over by another;
//! - a registration is bounded (name, urls, scopes, host), one IP address holds a bounded number
//!   of them, and the topology never grows past the frame length nodes accept.
//!
//! A refused registration is answered with an error packet and changes nothing. Memory stays
//! linear in the number of nodes: every connection shares the one encoded topology.
//!
//! Layout:
//! - [`registry`]: the registered nodes, url ownership, and the encoded topology, published on
//!   a watch channel.
//! - [`metrics`]: nodes and refused registrations, for `--metrics-listen`.
//! - `node`: one node's connection: handshake, registration, topology forwarding, heartbeats,
//!   eviction.
//!
//! docs/PROTOCOL.md describes the packets and the limits.

use std::time::Duration;

use shared::{cluster::ClusterPolicy, server::ConnectionLimits};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, Instrument};

pub mod metrics;
mod node;
pub mod registry;

pub use node::{MAX_HOST_LENGTH, MAX_NAME_LENGTH, MAX_SCOPE_LENGTH, MAX_URLS, MAX_URL_LENGTH};
pub use registry::{RegisterError, Registry, RegistryLimits};

/// The distributor's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// How often protocol-2 nodes are sent a heartbeat.
    pub heartbeat_interval: Duration,
    /// How long a protocol-2 node may stay silent before it is evicted.
    pub heartbeat_timeout: Duration,
    /// How long a connection may stay open without registering (a stray client, a port scan)
    /// before it is closed, so idle strangers cannot hold connection slots forever.
    pub registration_timeout: Duration,
    /// The largest packet a node may send; registrations are small, so this stays low to bound
    /// the memory an unfinished frame can hold.
    pub max_frame_length: usize,
    /// What the registry lets nodes hold (used by [`run`]; a registry given to
    /// [`run_with_registry`] brings its own).
    pub registry: RegistryLimits,
    /// Who may join: the cluster secret, and whether original-design nodes are served with one.
    pub cluster: ClusterPolicy,
    /// How many connections are served, from where (protected mode: loopback peers only).
    pub connections: ConnectionLimits,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            heartbeat_interval: Duration::from_secs(3),
            heartbeat_timeout: Duration::from_secs(10),
            registration_timeout: Duration::from_secs(5),
            max_frame_length: 64 * 1024,
            registry: RegistryLimits::default(),
            cluster: ClusterPolicy::default(),
            connections: ConnectionLimits::default(),
        }
    }
}

/// Serves nodes on `listener` until `shutdown` is cancelled.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let registry = Registry::new(config.registry);
    run_with_registry(listener, config, registry, shutdown).await
}

/// [`run`] with a registry the caller can look into (tests, embedding).
pub async fn run_with_registry(
    listener: TcpListener,
    config: Config,
    registry: Registry,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    info!(addr = %listener.local_addr()?, "distributor listening");
    let mut next_id = 0;
    let limits = config.connections;
    shared::server::serve_connections(listener, limits, &shutdown, |stream, peer| {
        next_id += 1;
        node::serve_node(
            stream,
            peer,
            next_id,
            registry.clone(),
            config.clone(),
            shutdown.clone(),
        )
        .instrument(tracing::info_span!("node", %peer))
    })
    .await;
    info!("distributor stopped");
    Ok(())
}
