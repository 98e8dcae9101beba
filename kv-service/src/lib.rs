//! kv-service: a key-value store with a version number per key, reachable through two doors
//! that call one core, so a value put through one is read through the other:
//! - REST routes (`GET/PUT/POST/DELETE /kv`) served as packets on shared's service runtime and
//!   registered with the distributor as `kv`, for callers going through the gateway;
//! - a raw TCP text protocol (`get<k>`, `put<k,v>`, `del<k>`) for clients such as `nc`.
//!
//! Both doors check the same scopes: `kv:read` to read, `kv:write` to write. The REST door gets
//! the caller's identity from the gateway, which verified its token; the text door verifies the
//! token a client sends in `auth<TOKEN>` itself, with the same key flags as the gateway. Without
//! a key the text door serves loopback clients only (protected mode), unless `--insecure`.
//!
//! Layout:
//! - [`config`]: the settings [`run`] takes, and the text port's protected mode.
//! - [`core`]: get, put (plain, `if_version`, create-if-absent, with a time to live), delete,
//!   list and transactions, with the key and value limits both doors share; and the background
//!   upkeep (expiry, change log compaction, following other replicas' revisions).
//! - [`watch`]: watchers reading the change log after a revision.
//! - [`store`]: the store trait and its backends: memory, SQLite and PostgreSQL (sqlx, with
//!   migrations applied at start).
//! - `metrics`: store operations and their latency per store, for `--metrics-listen`.
//! - [`rest`]: the REST handlers (watches as event streams, `POST /txn`).
//! - [`text_protocol`]: the text protocol's grammar as pure incremental codecs.
//! - [`text_server`]: the TCP server for the text protocol: authentication, scopes, idle and
//!   per-address limits.
//!
//! The load tool (`kv-bench`, in the bench crate) drives the text protocol, and watches and
//! transactions through the gateway; docs/BENCHMARKS.md has its figures.

pub mod config;
pub mod core;
mod metrics;
pub mod rest;
pub mod store;
pub mod text_protocol;
pub mod text_server;
pub mod watch;

use shared::service::ServiceConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use crate::config::Config;
use crate::{
    core::Kv,
    store::{KvBackend, StoreError, StoreSpec},
};

/// The name the service registers under.
pub const SERVICE_NAME: &str = "kv";

/// The scope a caller needs to read keys (`GET /kv`, `get<...>`).
pub const READ_SCOPE: &str = "kv:read";

/// The scope a caller needs to write keys (`PUT`, `POST`, `DELETE /kv`, `POST /txn`, `put<...>`,
/// `del<...>`).
pub const WRITE_SCOPE: &str = "kv:write";

/// Why [`run`] failed.
#[derive(Debug, thiserror::Error)]
pub enum KvServiceError {
    #[error("cannot open the store {store:?}: {source}")]
    Store {
        store: StoreSpec,
        source: StoreError,
    },
    #[error("serving failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Opens the store, then serves the REST routes on `rest_listener` and the text protocol on
/// `text_listener` until `shutdown` is cancelled. Returns once both have stopped and pending
/// writes are on disk.
pub async fn run(
    config: Config,
    rest_listener: TcpListener,
    text_listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), KvServiceError> {
    tracing::info!(store = ?config.store, "opening the store");
    // Until the store opens (PostgreSQL may be away for a while), the service is not registered,
    // so nothing is routed to it.
    let opened = tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        opened = KvBackend::open_with_history(&config.store, config.store_options, config.history) => opened,
    };
    let store = opened.map_err(|source| KvServiceError::Store {
        store: config.store.clone(),
        source,
    })?;
    let readiness = store.follow_readiness(shutdown.child_token());
    let kv = Kv::new(store);
    let service = ServiceConfig {
        readiness,
        ..config.node
    };
    let rest = shared::service::serve(
        rest_listener,
        rest::router_with_max_lag(kv.clone(), config.watch_max_lag),
        service,
        shutdown.clone(),
    );
    let background = kv.run_background(config.history, shutdown.clone());
    let text = text_server::serve(text_listener, kv.clone(), config.text, shutdown);
    let (served, (), ()) = tokio::join!(rest, text, background);
    kv.close().await;
    served?;
    Ok(())
}
