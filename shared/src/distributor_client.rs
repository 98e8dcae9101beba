//! Staying registered with the distributor, and learning the topology from it.
//!
//! Every node (services through the runtime, and the gateway) keeps one connection to the
//! distributor. [`DistributorClient::spawn`] owns it: it registers, echoes heartbeats, publishes
//! each topology it receives on a `watch` channel, and when the connection is lost (or the
//! distributor falls silent for longer than [`SILENCE_TIMEOUT`]) it reconnects every
//! [`RECONNECT_INTERVAL`] and registers again. A distributor restart therefore heals by itself.
//!
//! The last topology stays on the channel while the distributor is away, so the gateway keeps
//! routing with what it last knew.

use std::{sync::Arc, time::Duration};

use tokio::{net::TcpStream, sync::watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    client::RECONNECT_INTERVAL,
    cluster::{self, ClusterSecret, HandshakeError},
    codec::{encode_frame, PacketCodec},
    connection::{tune_socket, PacketReader, WRITE_TIMEOUT},
    packet::{registration_packet, Registration, Topology, DISTRIBUTES_URI},
    Packet,
};

/// The distributor heartbeats every few seconds; this much silence means it is gone.
pub const SILENCE_TIMEOUT: Duration = Duration::from_secs(10);

/// The node side of the distributor connection.
pub struct DistributorClient;

impl DistributorClient {
    /// Registers `registration` with the distributor at `addr` (and re-registers after every
    /// reconnect) until `shutdown` is cancelled. The returned channel holds the latest topology.
    pub fn spawn(
        addr: String,
        registration: Registration,
        shutdown: CancellationToken,
    ) -> watch::Receiver<Arc<Topology>> {
        DistributorClient::spawn_with_secret(addr, registration, None, shutdown)
    }

    /// [`DistributorClient::spawn`] for a cluster with a secret: every connection starts with
    /// the handshake ([`crate::cluster`]).
    pub fn spawn_with_secret(
        addr: String,
        registration: Registration,
        secret: Option<ClusterSecret>,
        shutdown: CancellationToken,
    ) -> watch::Receiver<Arc<Topology>> {
        let (topology_tx, topology_rx) = watch::channel(Arc::new(Topology::new()));
        tokio::spawn(async move {
            loop {
                let session = stay_registered(&addr, &registration, secret.as_ref(), &topology_tx);
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
        });
        topology_rx
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

/// One connection's life: register, then answer heartbeats and take topologies until it ends.
async fn stay_registered(
    addr: &str,
    registration: &Registration,
    secret: Option<&ClusterSecret>,
    topology: &watch::Sender<Arc<Topology>>,
) -> Result<(), SessionError> {
    use tokio::io::AsyncWriteExt;

    let stream = TcpStream::connect(addr).await?;
    tune_socket(&stream);
    let (mut read_half, mut write_half) = stream.into_split();
    let buffered = match secret {
        Some(secret) => cluster::connect(&mut read_half, &mut write_half, secret).await?,
        None => Default::default(),
    };
    write_half
        .write_all(&encode_frame(registration_packet(registration))?)
        .await?;
    info!(%addr, name = %registration.name, port = registration.port, "registered with the distributor");

    let mut reader = PacketReader::with_buffer(read_half, buffered, PacketCodec::<Packet>::new());
    loop {
        let frame = tokio::time::timeout(SILENCE_TIMEOUT, reader.next())
            .await
            .map_err(|_| SessionError::Silent(SILENCE_TIMEOUT))?;
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
            let echo = encode_frame(&packet)?;
            tokio::time::timeout(WRITE_TIMEOUT, write_half.write_all(&echo))
                .await
                .map_err(|_| SessionError::Silent(WRITE_TIMEOUT))??;
        } else if packet.uri == DISTRIBUTES_URI && packet.method == "GET" {
            match serde_json::from_value::<Topology>(packet.params) {
                Ok(nodes) => {
                    debug!(nodes = nodes.len(), "topology update");
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
