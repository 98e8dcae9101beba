//! Prometheus metrics for every binary: one process-wide registry that each crate adds its
//! metrics to, and the small HTTP listener (`--metrics-listen`) that serves them.
//!
//! The gateway keeps its own registry (its `/metrics` route came first) and serves that same text
//! on its metrics listener; the other binaries register here ([`register`]) and serve
//! [`render`]. Both use `prometheus-client`, so every binary writes the same OpenMetrics text.
//!
//! The listener answers `GET /metrics` and nothing else, one request per connection, with a
//! bounded request head and a deadline to send it: it is for a scraper, not for browsers. It has
//! no authentication, so it listens on loopback unless the operator says otherwise
//! (`--metrics-public`, see [`crate::telemetry::TelemetryArgs`]).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use prometheus_client::{metrics::counter::Counter, registry::Registry};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::server::{serve_connections, ConnectionLimits};

/// What a metrics listener serves: the text exposition as of now.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// The largest request head the listener reads.
const MAX_HEAD: usize = 8 * 1024;
/// How long a client has to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapers open one connection at a time; a few more leave room for a person with curl.
const MAX_CONNECTIONS: usize = 16;

struct Global {
    registry: Mutex<Registry>,
    handshake_failures: Counter,
}

fn global() -> &'static Global {
    static GLOBAL: OnceLock<Global> = OnceLock::new();
    GLOBAL.get_or_init(|| {
        let mut registry = Registry::default();
        let handshake_failures = Counter::default();
        registry.register(
            "handshake_failures",
            "Cluster handshakes with another node that failed (wrong secret, no answer)",
            handshake_failures.clone(),
        );
        Global {
            registry: Mutex::new(registry),
            handshake_failures,
        }
    })
}

/// Adds a metric to the process-wide registry. Register each metric once (keep it in a
/// `OnceLock`): a second registration under the same name would be written twice.
pub fn register(name: &str, help: &str, metric: impl prometheus_client::registry::Metric) {
    global()
        .registry
        .lock()
        .unwrap()
        .register(name, help, metric);
}

/// [`register`]s `metric` and returns it: the metric and the registry share the same counts.
pub fn registered<M>(name: &str, help: &str, metric: M) -> M
where
    M: prometheus_client::registry::Metric + Clone,
{
    register(name, help, metric.clone());
    metric
}

/// The process-wide registry's text exposition.
pub fn render() -> String {
    let global = global();
    // The count lives in `cluster`; the counter catches up with it (a maximum, so concurrent
    // scrapes cannot add the same failures twice).
    global.handshake_failures.inner().fetch_max(
        crate::cluster::handshake_failures(),
        std::sync::atomic::Ordering::Relaxed,
    );
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &global.registry.lock().unwrap())
        .expect("writing to a String cannot fail");
    text
}

/// Serves `render` as `GET /metrics` on `listener` until `shutdown` is cancelled. With
/// `loopback_only`, clients from other hosts are refused as well (the address was checked at
/// start; this holds for a wildcard address too).
pub async fn serve(
    listener: TcpListener,
    render: Render,
    loopback_only: bool,
    shutdown: CancellationToken,
) {
    let limits = ConnectionLimits {
        max_connections: MAX_CONNECTIONS,
        max_per_ip: MAX_CONNECTIONS,
        loopback_only,
    };
    serve_connections(listener, limits, &shutdown, |stream, peer| {
        let render = render.clone();
        async move {
            if let Err(err) = answer(stream, &render).await {
                debug!(%peer, %err, "metrics request failed");
            }
        }
    })
    .await;
}

/// Binds `addr` and serves `render` there on a task of its own; returns the bound address.
pub async fn spawn(
    addr: SocketAddr,
    render: Render,
    loopback_only: bool,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tracing::info!(addr = %local, "serving metrics");
    tokio::spawn(serve(listener, render, loopback_only, shutdown));
    Ok(local)
}

async fn answer(mut stream: TcpStream, render: &Render) -> std::io::Result<()> {
    let head = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream))
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "request head too slow")
        })??;
    let request_line = head.lines().next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (method, path) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let path = path.split('?').next().unwrap_or_default();
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            render(),
        ),
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "only /metrics is served here\n".into(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET /metrics is served here\n".into(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Reads up to the blank line ending the request head, refusing a head over [`MAX_HEAD`].
async fn read_head(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_HEAD {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.extend_from_slice(&chunk[..read]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}
