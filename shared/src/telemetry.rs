//! What every binary does about logs, metrics and traces, set by the flags they all share
//! ([`TelemetryArgs`], flattened into each binary's arguments).
//!
//! - Logs go to stderr as text (`--log-format text`, for people) or one JSON object per line
//!   (`--log-format json`, for log shippers), filtered by `RUST_LOG` (default `info`). Every line
//!   that passes the filter is also kept in memory ([`crate::logs`]) for `GET /_/logs`.
//! - `--metrics-listen ADDR` serves Prometheus metrics ([`crate::metrics`]). The listener has no
//!   authentication, so, as for every unauthenticated listener here, a non-loopback address is
//!   refused at start unless the operator chose it explicitly with `--metrics-public`.
//! - `--otlp-endpoint URL` (the standard `OTEL_EXPORTER_OTLP_ENDPOINT`) exports the request spans
//!   ([`crate::trace`]) over OTLP/HTTP (protobuf, to `URL/v1/traces`), in batches from a thread of
//!   the OpenTelemetry SDK. Without it, no exporting layer is installed at all.

use std::net::SocketAddr;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{trace::SdkTracerProvider, Resource};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::{
    filter::Targets, layer::SubscriberExt, util::SubscriberInitExt, EnvFilter, Layer,
};

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
    /// Export request spans over OTLP/HTTP to this collector (an http:// url such as
    /// http://localhost:4318; the spans go to its /v1/traces). Nothing is exported without it.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
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
    /// log buffer, both behind the `RUST_LOG` filter, and with `--otlp-endpoint` the exporting
    /// layer, which sees only the request spans ([`crate::trace::TARGET`]) whatever `RUST_LOG`
    /// says. `service` names the process in its spans (`service.name`). Installing it a second
    /// time does nothing. Keep the returned [`Telemetry`] until the process ends.
    pub fn init(&self, service: &str) -> Result<Telemetry, TelemetryError> {
        let filter = || {
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info"))
                // The request spans are for the exporter; in log lines they would only repeat
                // the request span each process already has.
                .add_directive(
                    format!("{}=off", crate::trace::TARGET)
                        .parse()
                        .expect("a valid directive"),
                )
        };
        let stderr = match self.log_format {
            LogFormat::Text => tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .boxed(),
            LogFormat::Json => tracing_subscriber::fmt::layer()
                .json()
                .with_writer(std::io::stderr)
                .boxed(),
        };
        let provider = match &self.otlp_endpoint {
            Some(endpoint) => Some(tracer_provider(endpoint, service)?),
            None => None,
        };
        let exporter = provider.as_ref().map(|provider| {
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("microservices"))
                .with_filter(Targets::new().with_target(crate::trace::TARGET, tracing::Level::INFO))
        });
        let _ = tracing_subscriber::registry()
            .with(stderr.with_filter(filter()))
            .with(BufferLayer.with_filter(filter()))
            .with(exporter)
            .try_init();
        Ok(Telemetry { provider })
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

/// What [`TelemetryArgs::init`] started and must be flushed before the process exits.
#[derive(Debug)]
#[must_use = "keep it until the process ends, then call shutdown"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sends the spans not exported yet (the SDK bounds how long that takes).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(err) = provider.shutdown() {
                tracing::warn!(%err, "could not export the last spans");
            }
        }
    }
}

/// The OTLP/HTTP exporter's provider for `endpoint`, the collector's base url.
fn tracer_provider(endpoint: &str, service: &str) -> Result<SdkTracerProvider, TelemetryError> {
    let url = traces_url(endpoint)?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(url)
        .build()
        .map_err(|err| TelemetryError::Otlp(err.to_string()))?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            Resource::builder()
                .with_service_name(service.to_owned())
                .build(),
        )
        .build())
}

/// `URL/v1/traces` for the collector's base url, as the OTLP specification derives it from
/// `OTEL_EXPORTER_OTLP_ENDPOINT`; an url that already ends so is kept.
fn traces_url(endpoint: &str) -> Result<String, TelemetryError> {
    let endpoint = endpoint.trim();
    // reqwest is built without TLS here: a collector is reached over plain HTTP, usually on the
    // same host or network (an OpenTelemetry Collector or agent that forwards over TLS).
    let host = endpoint.strip_prefix("http://").unwrap_or_default();
    if host.is_empty() || endpoint.contains(char::is_whitespace) {
        return Err(TelemetryError::Otlp(format!(
            "--otlp-endpoint must be an http:// url, such as http://localhost:4318, not {endpoint:?}"
        )));
    }
    let base = endpoint.trim_end_matches('/');
    Ok(if base.ends_with("/v1/traces") {
        base.to_owned()
    } else {
        format!("{base}/v1/traces")
    })
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot export traces: {0}")]
    Otlp(String),
    #[error(transparent)]
    Unprotected(#[from] UnprotectedListener),
    #[error("cannot serve metrics on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}
