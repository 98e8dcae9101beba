use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use distributor::registry::{Registry, RegistryLimits, MAX_REGISTRATIONS_PER_IP};
use shared::{
    cluster::{ClusterArgs, ClusterPolicy},
    codec::DEFAULT_MAX_FRAME_LENGTH,
    telemetry::TelemetryArgs,
};
use tokio_util::sync::CancellationToken;

/// jemalloc rather than the system allocator: a packet or an event is often allocated on one
/// worker thread and freed on another, which glibc's allocator serializes on its arena locks.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The service registry: nodes register here and receive the topology.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to accept node connections on. Without a cluster secret only a loopback address
    /// is allowed (protected mode), unless --insecure.
    #[arg(long, env = "DISTRIBUTOR_LISTEN", default_value = "127.0.0.1:9000")]
    listen: String,
    /// How often protocol-2 nodes are sent a heartbeat.
    #[arg(long, env = "DISTRIBUTOR_HEARTBEAT_INTERVAL", default_value = "3s", value_parser = humantime::parse_duration)]
    heartbeat_interval: Duration,
    /// How long a protocol-2 node may stay silent before it is evicted.
    #[arg(long, env = "DISTRIBUTOR_HEARTBEAT_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    heartbeat_timeout: Duration,
    /// How long a connection may stay open without registering (the handshake included).
    #[arg(long, env = "DISTRIBUTOR_REGISTRATION_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    registration_timeout: Duration,
    /// Largest packet accepted from a node, in bytes.
    #[arg(long, env = "DISTRIBUTOR_MAX_FRAME_LENGTH", default_value_t = 64 * 1024)]
    max_frame_length: usize,
    /// How many registrations one IP address may hold at once.
    #[arg(long, env = "DISTRIBUTOR_MAX_REGISTRATIONS_PER_IP", default_value_t = MAX_REGISTRATIONS_PER_IP)]
    max_registrations_per_ip: usize,
    /// With a cluster secret, still serve nodes written to the original design, which cannot do
    /// the handshake. They are never trusted with an advertised host.
    #[arg(long, env = "DISTRIBUTOR_ALLOW_LEGACY_NODES")]
    allow_legacy_nodes: bool,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Log format, metrics listener.
    #[command(flatten)]
    telemetry: TelemetryArgs,
}

/// How long shutdown waits for the work in flight to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let telemetry = args.telemetry.init("distributor")?;
    args.telemetry.check()?;
    anyhow::ensure!(
        args.heartbeat_interval < args.heartbeat_timeout,
        "--heartbeat-interval must be shorter than --heartbeat-timeout"
    );
    let secret = args.cluster.secret()?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    args.cluster
        .check_listen(listener.local_addr()?, "the distributor")?;
    let config = distributor::Config {
        heartbeat_interval: args.heartbeat_interval,
        heartbeat_timeout: args.heartbeat_timeout,
        registration_timeout: args.registration_timeout,
        max_frame_length: args.max_frame_length,
        registry: RegistryLimits {
            max_registrations_per_ip: args.max_registrations_per_ip,
            max_topology_length: DEFAULT_MAX_FRAME_LENGTH,
        },
        connections: args.cluster.limits(secret.is_some()),
        cluster: ClusterPolicy {
            secret,
            allow_legacy: args.allow_legacy_nodes,
        },
    };
    let shutdown = CancellationToken::new();
    let registry = Registry::new(config.registry);
    args.telemetry
        .serve_metrics(
            distributor::metrics::render(registry.clone()),
            shutdown.clone(),
        )
        .await?;
    let server = distributor::run_with_registry(listener, config, registry, shutdown.clone());
    let finished = shared::shutdown::run_until_signal(server, shutdown, SHUTDOWN_GRACE).await;
    // The last spans go out however the server stopped.
    telemetry.shutdown();
    finished?;
    Ok(())
}
