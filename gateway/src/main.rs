use std::{sync::Arc, time::Duration};

use anyhow::Context;
use clap::Parser;
use gateway::{
    auth,
    rate_limit::{Rate, RateLimit},
};
use shared::{
    cluster::ClusterArgs,
    server::check_protected_mode,
    telemetry::TelemetryArgs,
    token::{MintArgs, TokenKeyArgs},
    topology_cache::TopologyCache,
};
use tokio_util::sync::CancellationToken;

/// jemalloc rather than the system allocator: a packet or an event is often allocated on one
/// worker thread and freed on another, which glibc's allocator serializes on its arena locks.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The HTTP front door: turns REST calls into packets and routes them, round-robin, to the
/// service nodes the distributor announces.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Address to serve HTTP on. Without a token key, a non-loopback address also needs
    /// --anonymous-scopes (protected mode).
    #[arg(long, env = "GATEWAY_LISTEN", default_value = "127.0.0.1:8000")]
    listen: String,
    /// The distributor to register with and take the topology from.
    #[arg(long, env = "GATEWAY_DISTRIBUTOR", default_value = "127.0.0.1:9000")]
    distributor: String,
    /// How long a request waits for the service's answer (504 after that).
    #[arg(long, env = "GATEWAY_REQUEST_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    request_timeout: Duration,
    /// Largest request body accepted (413 above it): bytes, or with a unit such as 64KiB, 1MiB.
    #[arg(long, env = "GATEWAY_MAX_BODY", default_value = "1MiB", value_parser = gateway::config::parse_byte_size)]
    max_body: usize,
    /// Interval of the comment lines that keep idle event streams open through proxies.
    #[arg(long, env = "GATEWAY_SSE_KEEP_ALIVE", default_value = "15s", value_parser = humantime::parse_duration)]
    sse_keep_alive: Duration,
    /// How long a node that left the topology stays in rotation while still connected (covers a
    /// distributor restart, when nodes re-register one by one).
    #[arg(long, env = "GATEWAY_DEPARTURE_GRACE", default_value = "5s", value_parser = humantime::parse_duration)]
    departure_grace: Duration,
    /// Where the last topology received from the distributor is kept, so that a gateway
    /// restarted while the distributor is down still routes; empty turns it off.
    #[arg(
        long,
        env = "GATEWAY_TOPOLOGY_CACHE",
        default_value = "gateway-topology.json"
    )]
    topology_cache: String,
    /// How long shutdown waits for requests in flight before giving up on them.
    #[arg(long, env = "GATEWAY_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    shutdown_timeout: Duration,
    #[command(flatten)]
    edge: EdgeArgs,
    /// The key that callers' bearer tokens are verified with.
    #[command(flatten)]
    tokens: TokenKeyArgs,
    /// Scopes granted to requests without a token, separated by spaces ("kv:read
    /// notice:subscribe"; '*' for every scope). Without a token key, they are what clients on
    /// other hosts may do.
    #[arg(long, env = "GATEWAY_ANONYMOUS_SCOPES")]
    anonymous_scopes: Option<String>,
    /// Requests per caller (token subject, else client address), e.g. 1000/s or 600/m; no limit
    /// when absent. Beyond it: 429 with Retry-After.
    #[arg(long, env = "GATEWAY_RATE_LIMIT")]
    rate_limit: Option<Rate>,
    /// Requests a caller may make at once above the rate (default: the rate's count).
    #[arg(long, env = "GATEWAY_RATE_BURST", requires = "rate_limit")]
    rate_burst: Option<std::num::NonZeroU32>,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Connect to original-design nodes (no protocol 2), which cannot prove the cluster secret.
    #[arg(long, env = "GATEWAY_ALLOW_LEGACY_NODES")]
    allow_legacy_nodes: bool,
    /// Log format, metrics listener.
    #[command(flatten)]
    telemetry: TelemetryArgs,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Print a bearer token signed with the HS256 key of --jwt-secret-file.
    MintToken(MintArgs),
}

/// `gateway mint-token`: the token on stdout, nothing else.
fn mint_token(args: &MintArgs) -> anyhow::Result<()> {
    println!("{}", args.mint()?);
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let telemetry = args.telemetry.init("gateway")?;
    args.telemetry.check()?;
    if let Some(Command::MintToken(mint)) = &args.command {
        return mint_token(mint);
    }
    // Without a distributor the gateway would know no route at all.
    anyhow::ensure!(
        !args.distributor.trim().is_empty(),
        "--distributor must name the distributor's address"
    );
    anyhow::ensure!(
        !args.request_timeout.is_zero(),
        "--request-timeout must be longer than 0"
    );
    anyhow::ensure!(
        !args.sse_keep_alive.is_zero(),
        "--sse-keep-alive must be longer than 0"
    );
    let tokens = args.tokens.verifier()?.map(Arc::new);
    let anonymous_scopes = args.anonymous_scopes.as_deref().map(auth::parse_scopes);
    let cluster_secret = args.cluster.secret()?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    check_protected_mode(
        listener.local_addr()?,
        tokens.is_some(),
        anonymous_scopes.is_some(),
        &auth::HTTP_LISTENER,
    )?;
    let config = gateway::Config {
        distributor: Some(args.distributor),
        request_timeout: args.request_timeout,
        max_body: args.max_body,
        keep_alive: args.sse_keep_alive,
        departure_grace: args.departure_grace,
        topology_cache: TopologyCache::from_flag(&args.topology_cache),
        tokens,
        anonymous_scopes: anonymous_scopes.unwrap_or_default(),
        rate_limit: args.rate_limit.map(|rate| RateLimit {
            rate,
            burst: args.rate_burst,
        }),
        cluster_secret,
        allow_legacy_nodes: args.allow_legacy_nodes,
        telemetry: args.telemetry,
        edge: args
            .edge
            .config(args.request_timeout, args.sse_keep_alive, &args.cluster)?,
    };
    let shutdown = CancellationToken::new();
    let server = gateway::run(listener, config, shutdown.clone());
    let finished =
        shared::shutdown::run_until_signal(server, shutdown, args.shutdown_timeout).await;
    // The last spans go out however the server stopped.
    telemetry.shutdown();
    finished?;
    Ok(())
}

/// The HTTP listener's limits, CORS and TLS (docs/HTTP.md, "Limits").
#[derive(Debug, clap::Args)]
struct EdgeArgs {
    /// Time a client has to send a whole request head (and to finish the TLS handshake); an
    /// HTTP/1.1 connection idle between requests is closed after it too.
    #[arg(long, env = "GATEWAY_HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    header_timeout: Duration,
    /// Longest wait for the next piece of a request body; the whole body must also arrive within
    /// this time plus its size at 16 KiB/s (408 otherwise).
    #[arg(long, env = "GATEWAY_BODY_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    body_timeout: Duration,
    /// A connection on which nothing moves either way for this long is closed.
    #[arg(long, env = "GATEWAY_IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
    /// Most header fields a request may have (431 above it).
    #[arg(long, env = "GATEWAY_MAX_HEADERS", default_value_t = gateway::http::DEFAULT_MAX_HEADERS)]
    max_headers: usize,
    /// Largest request head, request line and headers (431 above it): bytes, or with a unit.
    #[arg(long, env = "GATEWAY_MAX_HEADER_BYTES", default_value = "64KiB", value_parser = gateway::config::parse_byte_size)]
    max_header_bytes: usize,
    /// The gateway's earlier name for `--max-connections` (which every binary now takes),
    /// kept so that deployments setting GATEWAY_MAX_CONNECTIONS keep their cap; the shared
    /// flag wins when both are set.
    #[arg(
        long = "gateway-max-connections",
        env = "GATEWAY_MAX_CONNECTIONS",
        hide = true,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    legacy_max_connections: Option<u64>,
    /// Browser origins allowed to call the gateway (CORS), such as https://app.example.com;
    /// repeat the flag or separate with commas; `*` for any. None by default.
    #[arg(
        long = "cors-origin",
        env = "GATEWAY_CORS_ORIGIN",
        value_delimiter = ','
    )]
    cors_origins: Vec<String>,
    /// PEM certificate chain to serve HTTPS with (HTTP/2 and HTTP/1.1); needs --tls-key.
    #[arg(long, env = "GATEWAY_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "GATEWAY_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
}

impl EdgeArgs {
    /// The checked settings; the answers in flight and the event streams' keep-alives must fit
    /// in the idle timeout, or it would cut them. The connection caps are the flags every
    /// binary shares (`ClusterArgs`).
    fn config(
        self,
        request_timeout: Duration,
        sse_keep_alive: Duration,
        cluster: &ClusterArgs,
    ) -> anyhow::Result<gateway::config::EdgeConfig> {
        let max_connections_per_ip = cluster.max_connections_per_ip;
        let caps = ClusterArgs {
            max_connections: cluster.max_connections.or(self.legacy_max_connections),
            ..cluster.clone()
        };
        let max_connections = caps.max_connections();
        anyhow::ensure!(
            !self.header_timeout.is_zero() && !self.body_timeout.is_zero(),
            "--header-timeout and --body-timeout must be longer than 0"
        );
        anyhow::ensure!(
            self.idle_timeout > request_timeout && self.idle_timeout > sse_keep_alive,
            "--idle-timeout must be longer than --request-timeout and --sse-keep-alive"
        );
        anyhow::ensure!(
            self.max_headers > 0
                && self.max_header_bytes > 0
                && max_connections > 0
                && max_connections_per_ip > 0,
            "--max-headers, --max-header-bytes, --max-connections and --max-connections-per-ip \
             must be at least 1"
        );
        let cors = gateway::config::CorsOrigins::parse(&self.cors_origins)
            .map_err(|err| anyhow::anyhow!("--cors-origin: {err}"))?;
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(gateway::tls::server_config(cert, key)?),
            _ => None,
        };
        Ok(gateway::config::EdgeConfig {
            header_timeout: self.header_timeout,
            body_timeout: self.body_timeout,
            idle_timeout: self.idle_timeout,
            max_headers: self.max_headers,
            max_header_bytes: self.max_header_bytes,
            max_connections,
            max_connections_per_ip,
            cors,
            tls,
        })
    }
}
