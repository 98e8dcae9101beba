//! What every node of the system shares: the packet protocol and the service runtime.
//!
//! Layout:
//! - [`packet`]: the packet type and the distributor's control messages (registration, topology,
//!   heartbeat).
//! - [`codec`]: the `¶` framing codec, a tokio-util `Decoder`/`Encoder`. The only code that knows
//!   the delimiter.
//! - [`connection`]: reading packets off a socket (recovering from bad frames) and a batching
//!   writer task.
//! - [`client`]: a reconnecting client that multiplexes many requests and streams over one
//!   connection by key.
//! - [`service`]: the runtime that serves a [`service::Router`] of handlers and keeps the service
//!   registered with the distributor.
//! - [`distributor_client`]: registration and topology updates, for services and the gateway,
//!   with readiness reported in heartbeats.
//! - [`topology_cache`]: the last topology on disk, so a node restarted while the distributor
//!   is down still finds the others.
//! - [`telemetry`], [`shutdown`]: logging setup and the shutdown signal every binary uses.
//! - [`logs`]: the recent log lines every process keeps in memory, and the request that reads
//!   them; [`metrics`]: the process-wide Prometheus registry and its `--metrics-listen` listener.
//! - [`store_spec`]: the `--store` flag of the services that keep data (and how a store is
//!   opened: its timeout and start-up check), and `postgres` (feature `postgres`): waiting for
//!   PostgreSQL at start-up, a deadline on every step, failures that say whether a write may have
//!   been applied, and readiness.
//! - [`flags`]: parsers for flag values several binaries take.
//! - `sqlite` (feature `sqlite`): checking a SQLite file before a service opens it (refusing a
//!   damaged one), and the online backup behind the services' `backup` command.
//! - [`cluster`]: the cluster secret, the handshake every packet connection starts with, and
//!   protected mode.
//! - [`server`]: the accept loop every TCP server shares, with its connection limits.
//! - [`trace`]: the W3C `traceparent` carried from the gateway to the services, and the request
//!   spans exported over OTLP (`--otlp-endpoint`).
//! - [`token`], [`secrets`]: verifying and minting the JWT bearer tokens callers present, and
//!   reading secret files.
//!
//! docs/PROTOCOL.md describes the wire format this crate implements.

pub mod client;
pub mod cluster;
pub mod codec;
pub mod connection;
pub mod distributor_client;
pub mod flags;
pub mod logs;
pub mod metrics;
pub mod packet;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod secrets;
pub mod server;
pub mod service;
pub mod shutdown;
#[cfg(feature = "sqlite")]
pub mod sqlite;
pub mod store_spec;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod token;
pub mod topology_cache;
pub mod trace;

pub use client::{ClientError, Dialect, PacketClient, ResponseStream};
pub use packet::{Identity, NodeInfo, Packet, Params, RawParams, Registration, Topology};
