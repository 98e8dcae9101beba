use std::time::Duration;

use anyhow::Context;
use clap::Parser;
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
    /// Address to serve HTTP on.
    #[arg(long, env = "GATEWAY_LISTEN", default_value = "0.0.0.0:8000")]
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
    /// How long shutdown waits for requests in flight before giving up on them.
    #[arg(long, env = "GATEWAY_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    shutdown_timeout: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    shared::telemetry::init_tracing();
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
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let config = gateway::Config {
        distributor: Some(args.distributor),
        request_timeout: args.request_timeout,
        max_body: args.max_body,
        keep_alive: args.sse_keep_alive,
        departure_grace: args.departure_grace,
    };
    let shutdown = CancellationToken::new();
    let server = gateway::run(listener, config, shutdown.clone());
    shared::shutdown::run_until_signal(server, shutdown, args.shutdown_timeout).await?;
    Ok(())
}
