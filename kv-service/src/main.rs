use std::{sync::Arc, time::Duration};

use anyhow::Context;
use clap::Parser;
use kv_service::config::{Config, StoreCheck, StoreOptions, StoreSpec, TextConfig, TEXT_PORT};
use shared::{
    cluster::ClusterArgs, server::check_protected_mode, service::ServiceConfig, token::TokenKeyArgs,
};
use tokio_util::sync::CancellationToken;

/// jemalloc rather than the system allocator: a packet or an event is often allocated on one
/// worker thread and freed on another, which glibc's allocator serializes on its arena locks.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// A versioned key-value store served as REST routes (through the gateway) and as a raw TCP
/// text protocol.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to accept packet connections (the REST routes) on. Another address than loopback
    /// needs --cluster-secret-file (or --insecure).
    #[arg(long, env = "KV_LISTEN", default_value = "127.0.0.1:9010")]
    listen: String,
    /// Address to accept text protocol connections on. Another address than loopback needs a
    /// JWT key (--jwt-secret-file or --jwt-public-key-file), so clients must send auth<TOKEN>
    /// (or --insecure).
    #[arg(long, env = "KV_TEXT_LISTEN", default_value = "127.0.0.1:8395")]
    text_listen: String,
    /// The distributor to register with; an empty value serves without registering.
    #[arg(long, env = "KV_DISTRIBUTOR", default_value = "127.0.0.1:9000")]
    distributor: String,
    /// Where the data lives: `mem`, `sqlite:PATH`, `postgres://USER@HOST/DB`, or `rdb`
    /// (= sqlite:kv.db).
    #[arg(long, global = true, env = "KV_STORE", default_value = "sqlite:kv.db", value_parser = kv_service::store::parse_store_flag)]
    store: StoreSpec,
    /// The longest a store operation waits for a database connection (and on PostgreSQL for a
    /// statement) before it is answered 503 "the store is unavailable". Keep it shorter than the
    /// gateway's --request-timeout.
    #[arg(long, env = "KV_STORE_TIMEOUT", default_value = "1s", value_parser = shared::flags::positive_duration)]
    store_timeout: Duration,
    /// How a SQLite store is checked when it opens: `quick` (PRAGMA quick_check) or `full`
    /// (PRAGMA integrity_check, slower on a large file).
    #[arg(long, env = "KV_CHECK_STORE", value_enum, default_value_t = StoreCheck::Quick)]
    check_store: StoreCheck,
    /// The host other nodes should connect to, when it differs from the socket's address.
    #[arg(long, env = "KV_ADVERTISE_HOST")]
    advertise_host: Option<String>,
    /// Changes the change log keeps, so that watchers can resume from any of their revisions;
    /// one resuming from further back gets a `reset` event. The memory store's log also keeps
    /// at most 64 MiB of keys and values.
    #[arg(long, env = "KV_HISTORY", default_value_t = kv_service::store::DEFAULT_HISTORY, value_parser = clap::value_parser!(u64).range(1..))]
    history: u64,
    /// A watcher that falls this many revisions further behind the newest one than it has been
    /// since it started (its client, or the gateway's connection, reading too slowly) is ended
    /// with `event: lagged` `{"revision":R}`, and resumes with `from_revision=R`.
    #[arg(long, env = "KV_WATCH_MAX_LAG", default_value_t = kv_service::rest::MAX_WATCH_LAG, value_parser = clap::value_parser!(u64).range(1..))]
    watch_max_lag: u64,
    /// Threads that serve requests; 0 means one per core. On a small machine that also runs the
    /// clients, 1 can be faster: a single thread never has to wake another.
    #[arg(long, env = "KV_THREADS", default_value_t = 0)]
    threads: usize,
    /// Close a text protocol connection that sends nothing for this long.
    #[arg(long, env = "KV_IDLE_TIMEOUT", default_value = "300s", value_parser = shared::flags::positive_duration)]
    idle_timeout: Duration,
    /// With a JWT key, close a text protocol connection that has not sent a good auth<TOKEN>
    /// this long after it opened.
    #[arg(long, env = "KV_AUTH_TIMEOUT", default_value = "10s", value_parser = shared::flags::positive_duration)]
    auth_timeout: Duration,
    /// The key that verifies the tokens text protocol clients send in auth<TOKEN>.
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

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if let Some(command) = args.command.take() {
        return Ok(command.run(&args.store)?);
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if args.threads > 0 {
        runtime.worker_threads(args.threads);
    }
    runtime
        .enable_all()
        .build()
        .context("cannot start the runtime")?
        .block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let telemetry = args.telemetry.init(kv_service::SERVICE_NAME)?;
    args.telemetry.check()?;
    let secret = args.cluster.secret()?;
    let tokens = args.tokens.verifier()?.map(Arc::new);
    let rest_listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    args.cluster
        .check_listen(rest_listener.local_addr()?, "the packet port (--listen)")?;
    let text_listener = tokio::net::TcpListener::bind(&args.text_listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.text_listen))?;
    check_protected_mode(
        text_listener.local_addr()?,
        tokens.is_some(),
        args.cluster.insecure,
        &TEXT_PORT,
    )?;
    let config = Config {
        store: args.store,
        store_options: StoreOptions {
            timeout: args.store_timeout,
            check: args.check_store,
        },
        node: ServiceConfig::from_flags(
            kv_service::SERVICE_NAME,
            args.distributor,
            args.advertise_host,
            &args.cluster,
            secret,
        ),
        text: TextConfig {
            limits: args.cluster.limits(tokens.is_some()),
            tokens,
            idle_timeout: args.idle_timeout,
            auth_timeout: args.auth_timeout,
        },
        history: args.history,
        watch_max_lag: args.watch_max_lag,
    };
    let shutdown = CancellationToken::new();
    args.telemetry
        .serve_metrics(Arc::new(shared::metrics::render), shutdown.clone())
        .await?;
    let server = kv_service::run(config, rest_listener, text_listener, shutdown.clone());
    let finished = shared::shutdown::run_until_signal(server, shutdown, SHUTDOWN_GRACE).await;
    // The last spans go out however the server stopped.
    telemetry.shutdown();
    finished?;
    Ok(())
}
