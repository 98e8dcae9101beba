//! The distributor: the registry every node connects to.
//!
//! Services and gateways connect over the packet protocol, register (`POST /distributes` with
//! name, port and urls), and receive the whole topology (`GET /distributes`) right after they
//! register and whenever it changes. A node is removed when its connection closes, when it stops
//! reading, or, for nodes that speak protocol 2, when it misses heartbeats for too long.
//!
//! Layout:
//! - [`registry`]: the registered nodes and the encoded topology, published on a watch channel.
//! - `node`: one node's connection: registration, topology forwarding, heartbeats, eviction.
//!
//! docs/PROTOCOL.md describes the packets.

use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, Instrument};

mod node;
pub mod registry;

pub use registry::Registry;

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
}

impl Default for Config {
    fn default() -> Self {
        Config {
            heartbeat_interval: Duration::from_secs(3),
            heartbeat_timeout: Duration::from_secs(10),
            registration_timeout: Duration::from_secs(30),
            max_frame_length: 64 * 1024,
        }
    }
}

/// Serves nodes on `listener` until `shutdown` is cancelled.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    run_with_registry(listener, config, Registry::default(), shutdown).await
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
    shared::service::serve_connections(listener, &shutdown, |stream, peer| {
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
