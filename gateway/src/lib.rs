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
//! - [`auth`]: bearer tokens and scopes: who a request comes from and what it may do.
//! - [`rate_limit`]: requests per caller.
//! - [`topology`]: follows the distributor's topology (or, until the distributor answers after a
//!   restart, the topology cache), owns the node connections, and publishes the route table.
//! - [`routes`]: the route table: exact and longest-prefix matching, round-robin over nodes.
//! - [`proxy`]: HTTP request → packet → HTTP response.
//! - [`sse`]: a node's stream → `text/event-stream`.
//! - [`error`]: the gateway's own error answers (404, 503, 504, 502, 400, 413).
//! - [`metrics`]: Prometheus metrics.
//! - [`figures`]: the recent past for operators: per-route history, per-node figures and
//!   connection history (`/_/history`, `/_/connections`).
//! - [`logs`]: `GET /_/logs`, the recent log lines of every node, the distributor and the
//!   gateway, gathered over the packet protocol.
//! - [`http`]: the HTTP edge: serves connections within the limits on clients (connections per
//!   address, head and body pace, header size, idle time), and CORS.
//! - [`tls`]: TLS, with HTTP/2 offered over ALPN.
//! - `endpoints`: `/healthz`, `/metrics`, `/_/topology` and the status page at `/`.
//!
//! docs/HTTP.md describes the behaviour from the outside.

use std::sync::Arc;

use axum::{routing::get, Router};
use shared::{
    distributor_client::{DistributorClient, DistributorLink, TopologySource},
    packet::{Registration, PROTOCOL_VERSION},
    Topology,
};
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;
use tracing::info;

pub mod auth;
pub mod config;
mod endpoints;
pub mod error;
pub mod figures;
pub mod http;
pub mod logs;
pub mod metrics;
pub mod proxy;
pub mod rate_limit;
pub mod routes;
pub mod sse;
pub mod tls;
pub mod topology;

use auth::Authenticator;
pub use config::Config;
use metrics::Metrics;
use rate_limit::RateLimiter;
use routes::RouteTable;

/// Why the gateway stopped other than by shutdown.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("serving HTTP failed: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Telemetry(#[from] shared::telemetry::TelemetryError),
}

/// What every request handler shares.
pub(crate) struct AppState {
    routes: watch::Receiver<Arc<RouteTable>>,
    /// Where the topology behind `routes` came from, for `/_/topology`.
    topology_source: watch::Receiver<TopologySource>,
    config: Config,
    auth: Authenticator,
    /// `None` when requests are not limited.
    rate_limiter: Option<Arc<RateLimiter>>,
    metrics: Metrics,
    figures: Arc<figures::Figures>,
    /// The address the gateway serves HTTP on, which names its own log lines.
    addr: std::net::SocketAddr,
    /// The metrics label of requests that matched no route.
    no_route: Arc<str>,
    shutdown: CancellationToken,
}

/// Serves HTTP on `listener` until `shutdown` is cancelled, then stops accepting, lets the
/// requests in flight finish (event streams are closed), and returns. Callers bound that wait.
///
/// With `config.distributor` set, the gateway registers there and routes by its topology
/// (starting from `config.topology_cache` until the distributor answers); without one it routes
/// nothing (see [`run_with_topology`]).
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    let link = match &config.distributor {
        Some(distributor) => {
            let registration = Registration {
                port: listener.local_addr()?.port(),
                name: config::GATEWAY_NAME.into(),
                urls: Vec::new(),
                scopes: Default::default(),
                host: None,
                protocol: Some(PROTOCOL_VERSION),
            };
            DistributorClient::new(distributor.clone(), registration)
                .with_secret(config.cluster_secret.clone())
                .with_topology_cache(config.topology_cache.clone())
                .start(shutdown.child_token())
        }
        None => DistributorLink {
            topology: watch::channel(Arc::new(Topology::new())).1,
            source: watch::channel(TopologySource::None).1,
        },
    };
    serve(listener, config, link, shutdown).await
}

/// [`run`] with the topology taken from `topology` instead of a distributor: for embedding the
/// gateway where something else knows the nodes, and for tests. Whatever feeds `topology`
/// stands in for the distributor, and `/_/topology` names it so.
pub async fn run_with_topology(
    listener: TcpListener,
    config: Config,
    topology: watch::Receiver<Arc<Topology>>,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    let link = DistributorLink {
        topology,
        source: watch::channel(TopologySource::Distributor).1,
    };
    serve(listener, config, link, shutdown).await
}

async fn serve(
    listener: TcpListener,
    config: Config,
    DistributorLink { topology, source }: DistributorLink,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    let addr = listener.local_addr()?;
    let edge = config.edge.clone();
    let routes = topology::spawn(
        topology,
        topology::NodePolicy {
            grace: config.departure_grace,
            secret: config.cluster_secret.clone(),
            allow_legacy: config.allow_legacy_nodes,
        },
        shutdown.child_token(),
    );
    let auth = Authenticator::new(config.tokens.clone(), config.anonymous_scopes.clone());
    let rate_limiter = config.rate_limit.map(|limit| {
        let limiter = Arc::new(RateLimiter::new(limit));
        limiter.spawn_cleanup(shutdown.child_token());
        limiter
    });
    let figures = Arc::new(figures::Figures::default());
    figures.spawn_sampler(routes.clone(), shutdown.child_token());
    let open_connections = figures.open_connections();
    let state = Arc::new(AppState {
        routes,
        topology_source: source,
        config,
        auth,
        rate_limiter,
        metrics: Metrics::default(),
        figures,
        addr,
        no_route: metrics::NO_ROUTE.into(),
        shutdown: shutdown.clone(),
    });
    let render_state = state.clone();
    let render: shared::metrics::Render = Arc::new(move || {
        let table = render_state.routes.borrow().clone();
        render_state.metrics.render(&table)
    });
    state
        .config
        .telemetry
        .serve_metrics(render, shutdown.child_token())
        .await?;
    let app = router(state);
    info!(%addr, "gateway listening");
    http::serve(listener, app, edge, open_connections, shutdown).await;
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
        .route(
            "/_/connections",
            get(figures::connections).fallback(proxy::proxy),
        )
        .route("/_/history", get(figures::history).fallback(proxy::proxy))
        .route("/_/logs", get(logs::logs).fallback(proxy::proxy))
        .fallback(proxy::proxy)
        .with_state(state)
}
