//! The gateway: the system's HTTP front door.
//!
//! It registers with the distributor as `gate` (with no urls of its own), follows the topology
//! the distributor broadcasts, keeps one multiplexed packet connection to every service node, and
//! turns each HTTP request into a packet for the next node of the route that serves it. Answers
//! come back as JSON, or as Server-Sent Events when the node answers with a stream. The gateway
//! is generic: it knows routes only from the topology, never a service by name.
//!
//! Layout:
//! - [`config`]: the settings [`run`] takes.
//! - [`topology`]: follows the distributor's topology, owns the node connections, and publishes
//!   the route table.
//! - [`routes`]: the route table: exact and longest-prefix matching, round-robin over nodes.
//! - [`proxy`]: HTTP request → packet → HTTP response.
//! - [`sse`]: a node's stream → `text/event-stream`.
//! - [`error`]: the gateway's own error answers (404, 503, 504, 502, 400, 413).
//! - [`metrics`]: Prometheus metrics.
//! - [`http`]: serves HTTP/1.1 connections.
//! - `endpoints`: `/healthz`, `/metrics`, `/_/topology` and the status page at `/`.
//!
//! docs/HTTP.md describes the behaviour from the outside.

use std::sync::Arc;

use axum::{routing::get, Router};
use shared::{
    distributor_client::DistributorClient,
    packet::{Registration, PROTOCOL_VERSION},
    Topology,
};
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;
use tracing::info;

pub mod config;
mod endpoints;
pub mod error;
pub mod http;
pub mod metrics;
pub mod proxy;
pub mod routes;
pub mod sse;
pub mod topology;

pub use config::Config;
use metrics::Metrics;
use routes::RouteTable;

/// Why the gateway stopped other than by shutdown.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("serving HTTP failed: {0}")]
    Io(#[from] std::io::Error),
}

/// What every request handler shares.
pub(crate) struct AppState {
    routes: watch::Receiver<Arc<RouteTable>>,
    config: Config,
    metrics: Metrics,
    /// The metrics label of requests that matched no route.
    no_route: Arc<str>,
    shutdown: CancellationToken,
}

/// Serves HTTP on `listener` until `shutdown` is cancelled, then stops accepting, lets the
/// requests in flight finish (event streams are closed), and returns. Callers bound that wait.
///
/// With `config.distributor` set, the gateway registers there and routes by its topology;
/// without one it routes nothing (see [`run_with_topology`]).
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    let topology = match &config.distributor {
        Some(distributor) => {
            let registration = Registration {
                port: listener.local_addr()?.port(),
                name: config::GATEWAY_NAME.into(),
                urls: Vec::new(),
                host: None,
                protocol: Some(PROTOCOL_VERSION),
            };
            DistributorClient::spawn(distributor.clone(), registration, shutdown.child_token())
        }
        None => watch::channel(Arc::new(Topology::new())).1,
    };
    run_with_topology(listener, config, topology, shutdown).await
}

/// [`run`] with the topology taken from `topology` instead of a distributor: for embedding the
/// gateway where something else knows the nodes, and for tests.
pub async fn run_with_topology(
    listener: TcpListener,
    config: Config,
    topology: watch::Receiver<Arc<Topology>>,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    let addr = listener.local_addr()?;
    let routes = topology::spawn(topology, config.departure_grace, shutdown.child_token());
    let state = Arc::new(AppState {
        routes,
        config,
        metrics: Metrics::default(),
        no_route: metrics::NO_ROUTE.into(),
        shutdown: shutdown.clone(),
    });
    let app = router(state);
    info!(%addr, "gateway listening");
    http::serve(listener, app, shutdown).await;
    info!("gateway stopped");
    Ok(())
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(endpoints::status_page).fallback(proxy::proxy))
        .route("/healthz", get(endpoints::healthz).fallback(proxy::proxy))
        .route("/metrics", get(endpoints::metrics).fallback(proxy::proxy))
        .route(
            "/_/topology",
            get(endpoints::topology).fallback(proxy::proxy),
        )
        .fallback(proxy::proxy)
        .with_state(state)
}
