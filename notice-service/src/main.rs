use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use notice_service::{
    store::{Retention, StoreSpec},
    udp::{UdpConfig, UDP_DOOR},
};
use shared::{
    cluster::ClusterArgs,
    server::check_protected_mode,
    service::ServiceConfig,
    store_spec::{StoreCheck, StoreOptions},
    token::TokenKeyArgs,
};
use tokio_util::sync::CancellationToken;

/// jemalloc rather than the system allocator: a packet or an event is often allocated on one
/// worker thread and freed on another, which glibc's allocator serializes on its arena locks.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Real-time notices pushed to subscribers: topics, whispers, schedules, presence and replay.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to accept packet connections on. Another address than loopback needs
    /// --cluster-secret-file (or --insecure).
    #[arg(long, env = "NOTICE_LISTEN", default_value = "127.0.0.1:9020")]
    listen: String,
    /// The distributor to register with; an empty value serves without registering.
    #[arg(long, env = "NOTICE_DISTRIBUTOR", default_value = "127.0.0.1:9000")]
    distributor: String,
    /// Where notices live: `mem`, `sqlite:PATH` or `postgres://USER@HOST/DB`.
    #[arg(
        long,
        global = true,
        env = "NOTICE_STORE",
        default_value = "sqlite:notices.db"
    )]
    store: StoreSpec,
    /// The longest a store operation waits for a database connection (and on PostgreSQL for a
    /// statement) before it is answered 503 "the store is unavailable". Keep it shorter than the
    /// gateway's --request-timeout.
    #[arg(long, env = "NOTICE_STORE_TIMEOUT", default_value = "1s", value_parser = shared::flags::positive_duration)]
    store_timeout: Duration,
    /// How a SQLite store is checked when it opens: `quick` (PRAGMA quick_check) or `full`
    /// (PRAGMA integrity_check, slower on a large file).
    #[arg(long, env = "NOTICE_CHECK_STORE", value_enum, default_value_t = StoreCheck::Quick)]
    check_store: StoreCheck,
    /// The host other nodes should connect to, when it differs from the socket's address.
    #[arg(long, env = "NOTICE_ADVERTISE_HOST")]
    advertise_host: Option<String>,
    /// Keep at most this many notices (the newest); 0 keeps any number.
    #[arg(long, env = "NOTICE_RETAIN_COUNT", default_value_t = 100_000)]
    retain_count: u64,
    /// Delete notices older than this (e.g. `7d`, `12h`); 0s keeps them regardless of age.
    #[arg(long, env = "NOTICE_RETAIN_AGE", default_value = "7d", value_parser = humantime::parse_duration)]
    retain_age: Duration,
    /// Notices queued per subscriber before it is cut off as too slow.
    #[arg(long, env = "NOTICE_SUBSCRIBER_BUFFER", default_value_t = 1024)]
    subscriber_buffer: usize,
    /// Live subscriptions accepted at once; more are refused with 503.
    #[arg(long, env = "NOTICE_MAX_SUBSCRIBERS", default_value_t = 100_000)]
    max_subscribers: usize,
    /// Serve subscribers over UDP on this address (`#REG`/`#DEREG`, one datagram per notice);
    /// off when absent. Another address than loopback needs a JWT key (or --insecure).
    #[arg(long, env = "NOTICE_UDP_LISTEN")]
    udp_listen: Option<std::net::SocketAddr>,
    /// UDP subscribers (addresses) registered at once; more are refused.
    #[arg(long, env = "NOTICE_UDP_MAX_SUBSCRIBERS", default_value_t = 10_000)]
    udp_max_subscribers: usize,
    /// The key that verifies the tokens UDP subscribers send with #REG.
    #[command(flatten)]
    tokens: TokenKeyArgs,
    /// The cluster secret, protected mode and per-address limits.
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Log format, metrics listener.
    #[command(flatten)]
    telemetry: shared::telemetry::TelemetryArgs,
    /// Without a command, the service serves.
    #[command(subcommand)]
    command: Option<shared::sqlite::StoreCommand>,
}

/// How long shutdown waits for the work in flight to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if let Some(command) = args.command.take() {
        return Ok(command.run(&args.store)?);
    }
    let telemetry = args.telemetry.init(notice_service::SERVICE_NAME)?;
    args.telemetry.check()?;
    anyhow::ensure!(
        args.subscriber_buffer > 0,
        "--subscriber-buffer must be at least 1"
    );
    let secret = args.cluster.secret()?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    args.cluster
        .check_listen(listener.local_addr()?, "the packet port (--listen)")?;
    let tokens = args.tokens.verifier()?.map(std::sync::Arc::new);
    let udp = match args.udp_listen {
        Some(listen) => {
            check_protected_mode(listen, tokens.is_some(), args.cluster.insecure, &UDP_DOOR)?;
            Some(UdpConfig {
                max_subscribers: args.udp_max_subscribers,
                ..UdpConfig::new(listen, tokens)
            })
        }
        None => None,
    };
    let config = notice_service::Config {
        store: args.store,
        store_options: StoreOptions {
            timeout: args.store_timeout,
            check: args.check_store,
        },
        node: ServiceConfig::from_flags(
            notice_service::SERVICE_NAME,
            args.distributor,
            args.advertise_host,
            &args.cluster,
            secret,
        ),
        retention: Retention {
            max_count: Some(args.retain_count).filter(|n| *n > 0),
            max_age: Some(args.retain_age).filter(|age| !age.is_zero()),
        },
        subscriber_buffer: args.subscriber_buffer,
        max_subscribers: args.max_subscribers,
        udp,
    };
    let shutdown = CancellationToken::new();
    args.telemetry
        .serve_metrics(
            std::sync::Arc::new(shared::metrics::render),
            shutdown.clone(),
        )
        .await?;
    let server = notice_service::run(listener, config, shutdown.clone());
    let finished = shared::shutdown::run_until_signal(server, shutdown, SHUTDOWN_GRACE).await;
    // The last spans go out however the server stopped.
    telemetry.shutdown();
    finished?;
    Ok(())
}
