//! Who may join the cluster: the cluster secret, the handshake that proves both ends know it,
//! and protected mode when there is none.
//!
//! Every packet connection (node → distributor, gateway → node, any node → another) starts, when
//! the cluster has a secret, with a challenge-response in which each side proves it knows the
//! secret without sending it:
//!
//! ```text
//! client → {"uri":"/handshake","method":"HELLO","key":0,"params":{"nonce":C,"protocol":2}}
//! server → {"uri":"/handshake","method":"CHALLENGE","key":0,"params":{"nonce":S,"proof":P_s}}
//! client → {"uri":"/handshake","method":"PROOF","key":0,"params":{"proof":P_c}}
//! server → {"uri":"/handshake","method":"OK","key":0}
//! ```
//!
//! `C` and `S` are 32 fresh random bytes from each side (hex), `P_s = HMAC-SHA256(secret,
//! "server" C S)` and `P_c = HMAC-SHA256(secret, "client" C S)`. Both nonces are fresh, so a
//! recorded handshake cannot be replayed; the labels differ, so one side's proof is never valid
//! for the other. A failure is answered with one error packet (`status` 401, `error` saying
//! why), logged at warn with the peer address, counted ([`handshake_failures`]), and the
//! connection is closed.
//!
//! Without a secret, nodes run in protected mode: no handshake, and servers accept only loopback
//! peers ([`ClusterArgs::check_listen`] refuses a non-loopback listen address unless
//! `--insecure`). Nodes of the original design cannot do the handshake: a server with a secret
//! serves them only when told to (`--allow-legacy-nodes`), see [`ClusterPolicy`].

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::BytesMut;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tracing::{info, warn};

use crate::{
    codec::{encode_frame, CodecError, PacketCodec},
    connection::PacketReader,
    packet::PROTOCOL_VERSION,
    secrets::read_secret_file,
    server::{
        check_protected_mode, default_max_connections, ConnectionLimits, ListenerAdvice,
        UnprotectedListener, MAX_CONNECTIONS_PER_IP,
    },
    token::TokenError,
    Packet,
};

/// The `uri` of every handshake packet.
pub const HANDSHAKE_URI: &str = "/handshake";

/// How long a whole handshake may take before the connection is closed: a peer that connects
/// and says nothing cannot hold a connection slot.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

const NONCE_BYTES: usize = 32;

/// What each side's proof is labelled with, so that neither can stand for the other.
const SERVER: &[u8] = b"server";
const CLIENT: &[u8] = b"client";

static HANDSHAKE_FAILURES: AtomicU64 = AtomicU64::new(0);

/// Handshakes refused or failed in this process, on either side, since it started.
pub fn handshake_failures() -> u64 {
    HANDSHAKE_FAILURES.load(Ordering::Relaxed)
}

/// The secret every node of a cluster shares. Cheap to clone; never printed.
#[derive(Clone)]
pub struct ClusterSecret(Arc<[u8]>);

impl ClusterSecret {
    pub fn new(bytes: impl Into<Arc<[u8]>>) -> ClusterSecret {
        ClusterSecret(bytes.into())
    }

    fn proof(&self, label: &[u8], client_nonce: &[u8], server_nonce: &[u8]) -> Hmac<Sha256> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(label);
        mac.update(client_nonce);
        mac.update(server_nonce);
        mac
    }

    /// The proof as it goes on the wire.
    fn proof_hex(&self, label: &[u8], client_nonce: &[u8], server_nonce: &[u8]) -> String {
        let proof = self.proof(label, client_nonce, server_nonce).finalize();
        hex(&proof.into_bytes())
    }

    /// Checks a proof that came off the wire, in constant time.
    fn verify(
        &self,
        label: &[u8],
        client_nonce: &[u8],
        server_nonce: &[u8],
        proof_hex: &str,
    ) -> Result<(), HandshakeError> {
        let proof = unhex(proof_hex).ok_or(HandshakeError::WrongSecret)?;
        self.proof(label, client_nonce, server_nonce)
            .verify_slice(&proof)
            .map_err(|_| HandshakeError::WrongSecret)
    }
}

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

/// The flags every binary takes for joining the cluster and for protected mode.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClusterArgs {
    /// The cluster secret (a file; its bytes less a trailing newline). Every node of the cluster
    /// must have the same one; packet connections then authenticate both ways.
    #[arg(long, env = "CLUSTER_SECRET_FILE")]
    pub cluster_secret_file: Option<PathBuf>,
    /// Serve clients on non-loopback addresses without a secret or token key (protected mode
    /// off). For throwaway development setups only; warns at every start.
    #[arg(long, env = "INSECURE")]
    pub insecure: bool,
    /// Connections one IP address may hold on each listener.
    #[arg(long, env = "MAX_CONNECTIONS_PER_IP", default_value_t = MAX_CONNECTIONS_PER_IP)]
    pub max_connections_per_ip: usize,
    /// Connections each listener serves at once; further clients wait in the listen backlog
    /// until one closes. By default sized from the open-file limit (`ulimit -n`): the limit
    /// less 5% and 64 descriptors for files and the node's own connections.
    #[arg(long, env = "MAX_CONNECTIONS", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: Option<u64>,
}

/// Why a binary refuses to start with the flags it was given.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Secret(#[from] TokenError),
    #[error(transparent)]
    Unprotected(#[from] UnprotectedListener),
}

/// What protected mode says about a packet listener, less what it serves (the caller names it).
const PACKET_LISTENER: ListenerAdvice = ListenerAdvice {
    serves: "a packet port",
    lacking: "a cluster secret",
    risk: "any host that reaches it could join the cluster",
    authenticate: "Give every node the same --cluster-secret-file (for example `head -c 32 \
        /dev/urandom | base64 > cluster.secret && chmod 600 cluster.secret`)",
    loopback: "127.0.0.1",
    opt_out: "pass --insecure for a throwaway setup",
    opt_out_warning: "--insecure: serving without authentication on a non-loopback address; \
        anyone who reaches it has full access",
};

impl ClusterArgs {
    /// The cluster secret, if a file is given.
    pub fn secret(&self) -> Result<Option<ClusterSecret>, ConfigError> {
        match &self.cluster_secret_file {
            Some(path) => Ok(Some(ClusterSecret::new(read_secret_file(path)?))),
            None => Ok(None),
        }
    }

    /// Protected mode's start-up rule for the packet listener `addr` (`serves` names it in the
    /// message): without a secret, only a loopback address, unless `--insecure`.
    pub fn check_listen(&self, addr: SocketAddr, serves: &'static str) -> Result<(), ConfigError> {
        let advice = ListenerAdvice {
            serves,
            ..PACKET_LISTENER
        };
        let has_secret = self.cluster_secret_file.is_some();
        check_protected_mode(addr, has_secret, self.insecure, &advice)?;
        Ok(())
    }

    /// The connection cap of each listener: `--max-connections`, else sized from the
    /// open-file limit (`server::default_max_connections`). Logged, since a cap set too low
    /// shows up only as clients that wait.
    pub fn max_connections(&self) -> usize {
        let (cap, source) = match self.max_connections {
            Some(flag) => (
                usize::try_from(flag).unwrap_or(usize::MAX),
                "--max-connections",
            ),
            None => (default_max_connections(), "the open-file limit"),
        };
        info!(max_connections = cap, from = source, "connection cap");
        cap
    }

    /// The limits of a listener that `protected` says is authenticated (or not).
    pub fn limits(&self, protected: bool) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: self.max_connections(),
            max_per_ip: self.max_connections_per_ip.max(1),
            loopback_only: !protected && !self.insecure,
        }
    }
}

/// How a server treats the packet connections it accepts.
#[derive(Debug, Clone, Default)]
pub struct ClusterPolicy {
    /// With a secret every peer must complete the handshake; without one, none does.
    pub secret: Option<ClusterSecret>,
    /// With a secret, still serve peers that do not do the handshake (original-design nodes).
    pub allow_legacy: bool,
}

/// What [`accept`] found out about a peer.
#[derive(Debug)]
pub struct Accepted {
    /// The peer proved it knows the cluster secret.
    pub authenticated: bool,
    /// A packet the peer sent instead of a handshake (an original-design node, allowed by the
    /// policy, or any peer when there is no secret): to be handled as usual.
    pub first: Option<Packet>,
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("the peer did not complete the handshake within {0:?}")]
    Timeout(Duration),
    #[error("the connection closed during the handshake")]
    Closed,
    #[error("the peer does not know the cluster secret")]
    WrongSecret,
    #[error("the peer sent {0} instead of the cluster handshake (it has no cluster secret, or is an original-design node without --allow-legacy-nodes)")]
    Unexpected(String),
    #[error("the peer refused the handshake: {0}")]
    Refused(String),
    #[error("malformed handshake: {0}")]
    Malformed(String),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

#[derive(Serialize, Deserialize)]
struct Hello {
    nonce: String,
    #[serde(default)]
    protocol: Option<u8>,
}

#[derive(Serialize, Deserialize)]
struct Challenge {
    nonce: String,
    proof: String,
}

#[derive(Serialize, Deserialize)]
struct Proof {
    proof: String,
}

/// The server side: run on each accepted packet connection before anything else. With a
/// secret, the peer must complete the handshake (or, when the policy allows original-design
/// nodes, send an ordinary packet instead, returned in [`Accepted::first`]). Without one, nothing
/// is read and the peer is not authenticated. On failure the peer has been sent an error packet
/// and the caller closes the connection.
pub async fn accept<R, W>(
    reader: &mut PacketReader<R, Packet>,
    writer: &mut W,
    policy: &ClusterPolicy,
    peer: SocketAddr,
) -> Result<Accepted, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Some(secret) = &policy.secret else {
        return Ok(Accepted {
            authenticated: false,
            first: None,
        });
    };
    let outcome = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        server_exchange(reader, writer, secret, policy.allow_legacy),
    )
    .await
    .unwrap_or(Err(HandshakeError::Timeout(HANDSHAKE_TIMEOUT)));
    if let Err(err) = &outcome {
        if matches!(err, HandshakeError::Closed) {
            // Closed without a word: a TCP health check or a port scan, not a failed attempt.
            tracing::debug!(%peer, "connection closed before the handshake");
            return outcome;
        }
        HANDSHAKE_FAILURES.fetch_add(1, Ordering::Relaxed);
        warn!(%peer, %err, "cluster handshake failed");
        let refusal: Packet = Packet {
            uri: HANDSHAKE_URI.into(),
            status: Some(401),
            error: Some(format!("cluster handshake failed: {err}")),
            ..Packet::default()
        };
        if let Ok(frame) = encode_frame(&refusal) {
            // Best effort, and never for long: the peer may be the one that stopped reading.
            let _ = tokio::time::timeout(Duration::from_secs(1), writer.write_all(&frame)).await;
        }
    }
    outcome
}

async fn server_exchange<R, W>(
    reader: &mut PacketReader<R, Packet>,
    writer: &mut W,
    secret: &ClusterSecret,
    allow_legacy: bool,
) -> Result<Accepted, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let first = next_packet(reader).await?;
    if first.uri != HANDSHAKE_URI {
        if allow_legacy {
            return Ok(Accepted {
                authenticated: false,
                first: Some(first),
            });
        }
        return Err(HandshakeError::Unexpected(format!(
            "{} {}",
            first.method, first.uri
        )));
    }
    let hello: Hello = expect(first, "HELLO")?;
    let client_nonce = decode_nonce(&hello.nonce)?;
    let server_nonce = fresh_nonce();
    let challenge = Challenge {
        nonce: hex(&server_nonce),
        proof: secret.proof_hex(SERVER, &client_nonce, &server_nonce),
    };
    send(writer, "CHALLENGE", &challenge).await?;
    let proof: Proof = expect(next_packet(reader).await?, "PROOF")?;
    secret.verify(CLIENT, &client_nonce, &server_nonce, &proof.proof)?;
    send(writer, "OK", &Value::Null).await?;
    Ok(Accepted {
        authenticated: true,
        first: None,
    })
}

/// The client side: proves to the server at the other end of `reader`/`writer` that we know
/// `secret`, and checks that it does too. Returns the bytes read past the handshake, which
/// belong to the connection's next reader.
pub async fn connect<R, W>(
    reader: R,
    writer: &mut W,
    secret: &ClusterSecret,
) -> Result<BytesMut, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let outcome = tokio::time::timeout(HANDSHAKE_TIMEOUT, client_exchange(reader, writer, secret))
        .await
        .unwrap_or(Err(HandshakeError::Timeout(HANDSHAKE_TIMEOUT)));
    if outcome.is_err() {
        HANDSHAKE_FAILURES.fetch_add(1, Ordering::Relaxed);
    }
    outcome
}

async fn client_exchange<R, W>(
    reader: R,
    writer: &mut W,
    secret: &ClusterSecret,
) -> Result<BytesMut, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut reader = PacketReader::new(reader, PacketCodec::<Packet>::new());
    let client_nonce = fresh_nonce();
    let hello = Hello {
        nonce: hex(&client_nonce),
        protocol: Some(PROTOCOL_VERSION),
    };
    send(writer, "HELLO", &hello).await?;
    let challenge: Challenge = expect(next_packet(&mut reader).await?, "CHALLENGE")?;
    let server_nonce = decode_nonce(&challenge.nonce)?;
    secret.verify(SERVER, &client_nonce, &server_nonce, &challenge.proof)?;
    let proof = Proof {
        proof: secret.proof_hex(CLIENT, &client_nonce, &server_nonce),
    };
    send(writer, "PROOF", &proof).await?;
    let _: Value = expect(next_packet(&mut reader).await?, "OK")?;
    Ok(reader.into_buffer())
}

async fn next_packet<R: AsyncRead + Unpin>(
    reader: &mut PacketReader<R, Packet>,
) -> Result<Packet, HandshakeError> {
    match reader.next().await {
        None => Err(HandshakeError::Closed),
        Some(Ok(packet)) => Ok(packet),
        Some(Err(err)) => Err(err.into()),
    }
}

/// The params of `packet`, which must be the handshake step `method`.
fn expect<T: serde::de::DeserializeOwned>(
    packet: Packet,
    method: &str,
) -> Result<T, HandshakeError> {
    let status = packet.status();
    if status >= 400 {
        return Err(HandshakeError::Refused(
            packet.error.unwrap_or_else(|| format!("status {status}")),
        ));
    }
    if packet.uri != HANDSHAKE_URI {
        return Err(HandshakeError::Unexpected(format!(
            "{} {}",
            packet.method, packet.uri
        )));
    }
    if packet.method != method {
        return Err(HandshakeError::Malformed(format!(
            "expected {method}, got {}",
            packet.method
        )));
    }
    serde_json::from_value(packet.params)
        .map_err(|err| HandshakeError::Malformed(format!("{method}: {err}")))
}

async fn send<W: AsyncWrite + Unpin>(
    writer: &mut W,
    method: &str,
    params: &impl Serialize,
) -> Result<(), HandshakeError> {
    let packet = Packet {
        uri: HANDSHAKE_URI.into(),
        method: method.into(),
        params: serde_json::to_value(params).expect("handshake params always serialize"),
        ..Packet::default()
    };
    writer.write_all(&encode_frame(&packet)?).await?;
    Ok(())
}

fn fresh_nonce() -> [u8; NONCE_BYTES] {
    let mut nonce = [0; NONCE_BYTES];
    getrandom::getrandom(&mut nonce).expect("the operating system provides randomness");
    nonce
}

fn decode_nonce(text: &str) -> Result<Vec<u8>, HandshakeError> {
    unhex(text)
        .filter(|nonce| nonce.len() == NONCE_BYTES)
        .ok_or_else(|| HandshakeError::Malformed("a nonce must be 32 bytes in hex".into()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || text.len() > 256 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_refuses_garbage() {
        let bytes = [0u8, 1, 0xab, 0xff];
        assert_eq!(unhex(&hex(&bytes)).unwrap(), bytes);
        assert!(unhex("abc").is_none());
        assert!(unhex("zz").is_none());
        assert!(unhex("é1").is_none());
    }

    #[test]
    fn proofs_depend_on_the_label_the_secret_and_both_nonces() {
        let secret = ClusterSecret::new(b"hunter2".to_vec());
        let proof = |secret: &ClusterSecret, label: &[u8], c: &[u8], s: &[u8]| {
            secret.proof(label, c, s).finalize().into_bytes().to_vec()
        };
        let base = proof(&secret, CLIENT, b"c", b"s");
        assert_ne!(base, proof(&secret, SERVER, b"c", b"s"));
        assert_ne!(base, proof(&secret, CLIENT, b"d", b"s"));
        assert_ne!(base, proof(&secret, CLIENT, b"c", b"t"));
        let wire = secret.proof_hex(CLIENT, b"c", b"s");
        assert!(secret.verify(CLIENT, b"c", b"s", &wire).is_ok());
        assert!(secret.verify(SERVER, b"c", b"s", &wire).is_err());
        assert!(secret.verify(CLIENT, b"c", b"s", "zz").is_err());
        assert_ne!(
            base,
            proof(&ClusterSecret::new(b"t".to_vec()), CLIENT, b"c", b"s")
        );
        assert!(!format!("{secret:?}").contains("hunter2"));
    }
}
