//! What every binary does about logs, metrics and traces, set by the flags they all share
//! ([`TelemetryArgs`], flattened into each binary's arguments).
//!
//! - Logs go to stderr as text (`--log-format text`, for people) or one JSON object per line
//!   (`--log-format json`, for log shippers), filtered by `RUST_LOG` (default `info`). Every line
//!   that passes the filter is also kept in memory ([`crate::logs`]) for `GET /_/logs`.
//! - `--metrics-listen ADDR` serves Prometheus metrics ([`crate::metrics`]). The listener has no
//!   authentication, so, as for every unauthenticated listener here, a non-loopback address is
//!   refused at start unless the operator chose it explicitly with `--metrics-public`.

use std::net::SocketAddr;

use tokio_util::sync::CancellationToken;
use tracing_subscriber::{layer::SubscriberExt, util::SubscriberInitExt, EnvFilter, Layer};

use crate::{
    logs::BufferLayer,
    metrics::Render,
    server::{check_protected_mode, ListenerAdvice, UnprotectedListener},
};

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per event (`timestamp`, `level`, `fields`, `target`, `span`...).
    Json,
}

/// The telemetry flags every binary takes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TelemetryArgs {
    /// How log lines are written to stderr: `text`, or `json` (one object per line) for log
    /// shippers.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Serve Prometheus metrics at http://ADDR/metrics (off by default). Unauthenticated: an
    /// address other than loopback also needs --metrics-public.
    #[arg(long, env = "METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Let --metrics-listen use an address other hosts reach (the metrics have no
    /// authentication; keep that port behind a firewall that only lets the scraper in).
    #[arg(long, env = "METRICS_PUBLIC")]
    pub metrics_public: bool,
}

/// What protected mode says about the metrics listener.
const METRICS_LISTENER: ListenerAdvice = ListenerAdvice {
    serves: "metrics",
    lacking: "authentication",
    risk: "any host that reaches it could read how the system is built and how busy it is",
    authenticate: "The metrics listener has no authentication",
    loopback: "127.0.0.1 (a scraper on the same host, or a sidecar)",
    opt_out: "pass --metrics-public and firewall the port so that only the scraper reaches it",
    opt_out_warning: "--metrics-public: serving metrics without authentication on a \
        non-loopback address",
};

impl TelemetryArgs {
    /// Installs the process's `tracing` subscriber: the chosen stderr format and the in-memory
    /// log buffer, both behind the `RUST_LOG` filter. Calling it twice is harmless.
    pub fn init(&self) {
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
        let stderr = match self.log_format {
            LogFormat::Text => tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .boxed(),
            LogFormat::Json => tracing_subscriber::fmt::layer()
                .json()
                .with_writer(std::io::stderr)
                .boxed(),
        };
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(stderr)
            .with(BufferLayer)
            .try_init();
    }

    /// Refuses a non-loopback `--metrics-listen` without `--metrics-public`.
    pub fn check(&self) -> Result<(), UnprotectedListener> {
        match self.metrics_listen {
            Some(addr) => check_protected_mode(addr, false, self.metrics_public, &METRICS_LISTENER),
            None => Ok(()),
        }
    }

    /// With `--metrics-listen`, binds it and serves `render` there until `shutdown`; returns the
    /// bound address. Checks the address first ([`TelemetryArgs::check`]).
    pub async fn serve_metrics(
        &self,
        render: Render,
        shutdown: CancellationToken,
    ) -> Result<Option<SocketAddr>, TelemetryError> {
        self.check()?;
        let Some(addr) = self.metrics_listen else {
            return Ok(None);
        };
        let loopback_only = !self.metrics_public;
        let bound = crate::metrics::spawn(addr, render, loopback_only, shutdown)
            .await
            .map_err(|source| TelemetryError::Bind { addr, source })?;
        Ok(Some(bound))
    }
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error(transparent)]
    Unprotected(#[from] UnprotectedListener),
    #[error("cannot serve metrics on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Installs the default subscriber (text on stderr, the log buffer): for tools and tests that
/// take no telemetry flags.
pub fn init_tracing() {
    TelemetryArgs::default().init();
}
