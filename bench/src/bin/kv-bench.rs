//! kv-bench: load for the text protocol, with redis as the yardstick.
//!
//! For each store (a kv-service it starts itself, `mem` and `sqlite` by default) and each
//! pipelining depth, it runs `put` then `get` with N connections, each sending P requests at a
//! time and waiting for their P answers, and reports ops/s and latency percentiles (each
//! request's latency runs from the write of its batch to the read of its answer). When
//! `redis-server` and `redis-benchmark` are installed it starts its own redis-server on a free
//! loopback port and runs `redis-benchmark -t set,get` with the same N, P, request count, key
//! space and value size, then prints both and the ratio.
//!
//! The client runs on one thread, as redis-benchmark does, so both loads cost the same share
//! of the machine; the kv-service it starts serves on one thread too (`--service-threads`), as
//! redis-server runs its commands.
//!
//! ```text
//! cargo build --release -p kv-service -p bench
//! target/release/kv-bench                          # mem and sqlite, P=1 and P=16, 50 connections
//! target/release/kv-bench --stores mem --pipeline 16 --requests 1000000
//! target/release/kv-bench --addr 127.0.0.1:8395    # a kv-service that is already running
//! target/release/kv-bench --memory-keys 1000000   # bytes per key, kv-service mem vs redis
//! ```
//!
//! Two more scenarios (`--scenario`) run through the real gateway: they start distributor,
//! gateway and one kv-service (the e2e harness's stack, binaries next to this one) and speak
//! HTTP to the gateway, as users do.
//!
//! - `watch`: `--watchers` SSE streams `GET /kv?prefix=P&watch=1`, spread round robin over
//!   `--watch-prefixes` distinct prefixes, then `--rate` puts per second for `--duration`, each
//!   under the next prefix in turn and carrying its send time in its value; every watcher records
//!   put-to-event latency. Prints p50/p99/max, deliveries/s and the events lost (expected minus
//!   received). With one prefix every watcher sees every put (watchers x rate deliveries/s);
//!   with as many prefixes as watchers each sees its share.
//! - `txn`: for each `--stores` entry (`mem`, `sqlite`, `postgres`: a throwaway PostgreSQL
//!   cluster when the binaries are installed), `--connections` clients each send 2-compare 2-put
//!   `POST /txn` on their own pair of keys (so they succeed) for `--duration`, then plain
//!   `PUT /kv/KEY` for as long: txn/s, put/s, their latencies and the ratio.
//!
//! ```text
//! cargo build --release -p distributor -p gateway -p kv-service -p bench
//! target/release/kv-bench --scenario watch                          # 1,000 watchers, 1,000 prefixes, 1,000 puts/s
//! target/release/kv-bench --scenario watch --watch-prefixes 1 --rate 100
//! target/release/kv-bench --scenario txn --stores mem,sqlite,postgres
//! ```

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::Stdio,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use bytes::{BufMut, BytesMut};
use clap::Parser;
use e2e::{free_port, sse::EventStream, wait_for_port, Process, Stack, Storage};
use hdrhistogram::Histogram;
use kv_service::text_protocol::{OwnedReply, ReplyCodec, Request, Token};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    process::{Child, Command},
};
use tokio_util::codec::{Decoder, Encoder};

/// Load for the kv-service text protocol, next to a redis-server baseline.
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// What to measure: the text protocol next to redis (`text`), or through the gateway
    /// watch delivery latency (`watch`) or transactions/s (`txn`).
    #[arg(long, value_enum, env = "KV_BENCH_SCENARIO", default_value = "text")]
    scenario: Scenario,
    /// Connections (txn: concurrent HTTP clients).
    #[arg(short = 'c', long, env = "KV_BENCH_CONNECTIONS", default_value_t = 50)]
    connections: usize,
    /// Pipelining depths to run, comma separated.
    #[arg(
        short = 'P',
        long,
        env = "KV_BENCH_PIPELINE",
        value_delimiter = ',',
        default_value = "1,16"
    )]
    pipeline: Vec<usize>,
    /// Requests per run on the mem store (and for the redis baseline).
    #[arg(
        short = 'n',
        long,
        env = "KV_BENCH_REQUESTS",
        default_value_t = 200_000
    )]
    requests: usize,
    /// Requests per run on the sqlite store, where every put is a durable commit.
    #[arg(long, env = "KV_BENCH_SQLITE_REQUESTS", default_value_t = 50_000)]
    sqlite_requests: usize,
    /// Distinct keys the requests pick from at random.
    #[arg(short = 'r', long, env = "KV_BENCH_KEYSPACE", default_value_t = 10_000)]
    keyspace: u64,
    /// Value size of puts, in bytes.
    #[arg(short = 'd', long, env = "KV_BENCH_VALUE_SIZE", default_value_t = 3)]
    value_size: usize,
    /// Stores to start a kv-service with, comma separated: mem, sqlite (txn: also postgres).
    #[arg(
        long,
        env = "KV_BENCH_STORES",
        value_delimiter = ',',
        default_value = "mem,sqlite"
    )]
    stores: Vec<String>,
    /// Load an already running kv-service text port instead of starting one.
    #[arg(long, env = "KV_BENCH_ADDR")]
    addr: Option<SocketAddr>,
    /// A token to send as auth<TOKEN> on each connection, for a kv-service that requires one
    /// (--addr). Needs the scopes kv:read and kv:write.
    #[arg(long, env = "KV_BENCH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The kv-service binary to start (default: next to this one).
    #[arg(long, env = "KV_BENCH_SERVICE_BIN")]
    service_bin: Option<PathBuf>,
    /// Runs of each measurement; the median is reported.
    #[arg(long, env = "KV_BENCH_ROUNDS", default_value_t = 3)]
    rounds: usize,
    /// `--threads` of the kv-service started here (0: one per core). One by default, as
    /// redis-server runs every command on one thread.
    #[arg(long, env = "KV_BENCH_SERVICE_THREADS", default_value_t = 1)]
    service_threads: usize,
    /// Skip the redis baseline.
    #[arg(long, env = "KV_BENCH_NO_REDIS")]
    no_redis: bool,
    /// Instead of the load runs, measure memory: load this many keys of 12 bytes with values of
    /// 14 bytes into a `--store mem` kv-service over the text port, and into redis-server with
    /// SET, and report each process's resident memory growth per key.
    #[arg(long, env = "KV_BENCH_MEMORY_KEYS")]
    memory_keys: Option<u64>,
    /// watch: SSE watchers opened through the gateway.
    #[arg(long, env = "KV_BENCH_WATCHERS", default_value_t = 1000)]
    watchers: usize,
    /// watch: distinct prefixes the watchers are spread over, round robin; each put goes under
    /// the next one in turn (1: every watcher sees every put).
    #[arg(long, env = "KV_BENCH_WATCH_PREFIXES", default_value_t = 1000)]
    watch_prefixes: usize,
    /// watch: puts per second through the gateway.
    #[arg(long, env = "KV_BENCH_RATE", default_value_t = 1000)]
    rate: u64,
    /// watch: how long the puts go on; txn: how long each of its two phases runs per store.
    #[arg(long, env = "KV_BENCH_DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// watch and txn: where the distributor, gateway and kv-service binaries are (default:
    /// next to this one).
    #[arg(long, env = "KV_BENCH_BIN_DIR")]
    bin_dir: Option<PathBuf>,
}

/// What kv-bench measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Scenario {
    /// The text protocol next to redis (or, with --memory-keys, bytes per key).
    Text,
    /// Put-to-event latency to prefix watchers through the gateway.
    Watch,
    /// 2-compare 2-put transactions/s through the gateway, next to plain puts/s.
    Txn,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Put,
    Get,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Put => "put",
            Op::Get => "get",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Figures {
    ops_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// What a run loads: a kv-service text port, or redis (RESP) with this tool's own client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Text,
    Resp,
}

struct Target {
    name: String,
    addr: SocketAddr,
    protocol: Protocol,
    requests: usize,
}

/// Where a row's figures come from.
const REDIS_BENCHMARK: &str = "redis (redis-benchmark)";
const REDIS_SAME_CLIENT: &str = "redis (kv-bench client)";

struct Row {
    target: String,
    op: Op,
    pipeline: usize,
    figures: Figures,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.connections > 0, "--connections must be at least 1");
    anyhow::ensure!(args.keyspace > 0, "--keyspace must be at least 1");
    anyhow::ensure!(args.rounds > 0, "--rounds must be at least 1");
    anyhow::ensure!(
        args.pipeline.iter().all(|&p| p > 0),
        "--pipeline depths must be at least 1"
    );
    if args.scenario != Scenario::Text {
        // Through the gateway: a thousand streams and the requests share the machine's cores.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        return match args.scenario {
            Scenario::Watch => runtime.block_on(measure_watch(&args)),
            _ => runtime.block_on(measure_txn(&args)),
        };
    }
    // One thread, like redis-benchmark: the client's share of the machine is the same for both.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(bench(args))
}

async fn bench(args: Args) -> anyhow::Result<()> {
    if let Some(keys) = args.memory_keys {
        return measure_memory(&args, keys).await;
    }
    print_heading(&args);
    let mut redis = start_redis(&args).await;
    let (mut services, targets) = start_targets(&args, redis.as_ref()).await?;
    let mut rows = Vec::new();
    for &pipeline in &args.pipeline {
        rows.extend(measure_depth(&args, pipeline, &targets, &mut redis).await?);
    }
    for service in &mut services {
        service.process.check_running()?;
    }
    print_table(&rows);
    drop(services);
    Ok(())
}

/// The settings every figure depends on, before the table.
fn print_heading(args: &Args) {
    println!(
        "kv-bench: {} connections, keyspace {}, {}-byte values, {} cores, median of {} rounds, \
         kv-service --threads {}",
        args.connections,
        args.keyspace,
        args.value_size,
        bench::cores(),
        args.rounds,
        args.service_threads,
    );
}

/// The redis baseline, unless `--no-redis` or redis is not installed (said on stdout).
async fn start_redis(args: &Args) -> Option<Redis> {
    if args.no_redis {
        return None;
    }
    match Redis::start().await {
        Ok(redis) => Some(redis),
        Err(err) => {
            println!("no redis baseline: {err:#}");
            None
        }
    }
}

/// What the runs load: the `--addr` kv-service, or one started per `--stores` entry, then
/// redis through this tool's own client when it runs. The services are kept alive by the
/// caller for as long as their targets are used.
async fn start_targets(
    args: &Args,
    redis: Option<&Redis>,
) -> anyhow::Result<(Vec<Service>, Vec<Target>)> {
    let mut services = Vec::new();
    let mut targets = Vec::new();
    if let Some(addr) = args.addr {
        targets.push(Target {
            name: format!("kv {addr}"),
            addr,
            protocol: Protocol::Text,
            requests: args.requests,
        });
    } else {
        for store in &args.stores {
            let requests = match store.as_str() {
                "mem" => args.requests,
                "sqlite" => args.sqlite_requests,
                other => bail!("unknown store {other:?}: use mem or sqlite"),
            };
            let service = Service::start(args, store).await?;
            targets.push(Target {
                name: format!("kv {store}"),
                addr: service.text_addr,
                protocol: Protocol::Text,
                requests,
            });
            services.push(service);
        }
    }
    if let Some(redis) = redis {
        targets.push(Target {
            name: REDIS_SAME_CLIENT.to_owned(),
            addr: SocketAddr::from(([127, 0, 0, 1], redis.port)),
            protocol: Protocol::Resp,
            requests: args.requests,
        });
    }
    Ok((services, targets))
}

/// The rows of one pipelining depth: `--rounds` rounds alternating between redis-benchmark and
/// the targets, so a burst of other load on the machine hits both; each figure is the median
/// of its rounds.
async fn measure_depth(
    args: &Args,
    pipeline: usize,
    targets: &[Target],
    redis: &mut Option<Redis>,
) -> anyhow::Result<Vec<Row>> {
    let mut rounds = Rounds::default();
    for _ in 0..args.rounds {
        if let Some(redis) = redis {
            match redis.benchmark(args, pipeline).await {
                Ok(figures) => {
                    for (op, figures) in figures {
                        rounds.record(REDIS_BENCHMARK, op, figures);
                    }
                }
                Err(err) => println!("redis-benchmark failed: {err:#}"),
            }
        }
        for target in targets {
            // Puts first, so gets find their keys.
            for op in [Op::Put, Op::Get] {
                let figures = run_load(target, op, args, pipeline).await?;
                rounds.record(&target.name, op, figures);
            }
        }
    }
    Ok(rounds.into_medians(pipeline))
}

/// Each target and op's figures over the rounds of one depth, in the order first measured.
#[derive(Default)]
struct Rounds(Vec<(String, Op, Vec<Figures>)>);

impl Rounds {
    fn record(&mut self, target: &str, op: Op, figures: Figures) {
        match self.0.iter_mut().find(|(t, o, _)| t == target && *o == op) {
            Some((_, _, list)) => list.push(figures),
            None => self.0.push((target.to_owned(), op, vec![figures])),
        }
    }

    /// One row per target and op, with the median round's figures.
    fn into_medians(self, pipeline: usize) -> Vec<Row> {
        self.0
            .into_iter()
            .map(|(target, op, list)| Row {
                target,
                op,
                pipeline,
                figures: median(&list).expect("at least one round"),
            })
            .collect()
    }
}

/// Prints the figures as a markdown table, with each kv-service row's throughput relative to
/// redis at the same op and depth.
fn print_table(rows: &[Row]) {
    let baseline = |source: &str, row: &Row| -> String {
        rows.iter()
            .find(|r| r.target == source && r.op == row.op && r.pipeline == row.pipeline)
            .filter(|_| row.target.starts_with("kv "))
            .map_or("-".to_owned(), |redis| {
                format!("{:.2}", row.figures.ops_per_sec / redis.figures.ops_per_sec)
            })
    };
    println!();
    println!(
        "| target | op | P | ops/s | p50 ms | p99 ms | / redis-benchmark | / redis, same client |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut sorted: Vec<&Row> = rows.iter().collect();
    sorted.sort_by_key(|row| {
        (
            row.pipeline,
            row.op == Op::Get,
            !row.target.starts_with("kv "),
        )
    });
    for row in sorted {
        println!(
            "| {} | {} | {} | {:.0} | {:.3} | {:.3} | {} | {} |",
            row.target,
            row.op.name(),
            row.pipeline,
            row.figures.ops_per_sec,
            row.figures.p50_ms,
            row.figures.p99_ms,
            baseline(REDIS_BENCHMARK, row),
            baseline(REDIS_SAME_CLIENT, row),
        );
    }
}

/// The round with the median throughput.
fn median(rounds: &[Figures]) -> Option<Figures> {
    let mut sorted = rounds.to_vec();
    sorted.sort_by(|a, b| a.ops_per_sec.total_cmp(&b.ops_per_sec));
    sorted.get(sorted.len() / 2).copied()
}

/// A small, fast pseudo-random sequence (xorshift): key choice must not cost more than a request.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Runs `requests` requests of one kind over `args.connections` connections, `pipeline` at a
/// time on each.
async fn run_load(
    target: &Target,
    op: Op,
    args: &Args,
    pipeline: usize,
) -> anyhow::Result<Figures> {
    let (addr, requests) = (target.addr, target.requests);
    let connections = args.connections;
    let mut streams = Vec::with_capacity(connections);
    for _ in 0..connections {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        stream.set_nodelay(true)?;
        let stream = match (&args.token, target.protocol) {
            (Some(token), Protocol::Text) => authenticate(stream, token).await?,
            _ => stream,
        };
        streams.push(stream);
    }
    let value = "x".repeat(args.value_size);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (index, stream) in streams.into_iter().enumerate() {
        // Spread the requests evenly; the first connections take the remainder.
        let share = requests / connections + usize::from(index < requests % connections);
        let value = value.clone();
        let keyspace = args.keyspace;
        let load = Load {
            protocol: target.protocol,
            op,
            pipeline,
            requests: share,
            keyspace,
            value,
            seed: index as u64,
        };
        tasks.spawn(connection_load(stream, load));
    }
    let mut histogram = bench::microsecond_histogram();
    while let Some(done) = tasks.join_next().await {
        histogram.add(done??)?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok(Figures {
        ops_per_sec: requests as f64 / elapsed,
        p50_ms: histogram.value_at_quantile(0.50) as f64 / 1000.0,
        p99_ms: histogram.value_at_quantile(0.99) as f64 / 1000.0,
    })
}

/// Sends `auth<token>` and checks that it is accepted.
async fn authenticate(mut stream: TcpStream, token: &str) -> anyhow::Result<TcpStream> {
    let mut request = BytesMut::new();
    ReplyCodec::new().encode(
        &Request::Auth {
            token: Token::new(token),
        },
        &mut request,
    )?;
    stream.write_all(&request).await?;
    let mut codec = ReplyCodec::new();
    let mut input = BytesMut::new();
    let reply = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(reply) = codec.decode(&mut input)? {
                return anyhow::Ok(reply);
            }
            if stream.read_buf(&mut input).await? == 0 {
                bail!("the server closed the connection");
            }
        }
    })
    .await
    .context("no answer to auth in time")??;
    match reply {
        OwnedReply::Ok(_) => Ok(stream),
        other => bail!("the token was refused: {other:?}"),
    }
}

/// One connection's share of a run.
struct Load {
    protocol: Protocol,
    op: Op,
    pipeline: usize,
    requests: usize,
    keyspace: u64,
    value: String,
    seed: u64,
}

/// Runs one connection's share; returns its latencies in microseconds.
async fn connection_load(mut stream: TcpStream, load: Load) -> anyhow::Result<Histogram<u64>> {
    let Load {
        protocol,
        op,
        pipeline,
        requests: mut remaining,
        keyspace,
        value,
        seed,
    } = load;
    let mut histogram = bench::microsecond_histogram();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (seed + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
    let mut replies = ReplyCounter::new(protocol, op);
    let mut output = BytesMut::with_capacity(pipeline * (64 + value.len()));
    let mut input = BytesMut::with_capacity(64 * 1024);
    let mut key_buffer = *b"key:000000000000";
    while remaining > 0 {
        let batch = pipeline.min(remaining);
        output.clear();
        for _ in 0..batch {
            let key = format_key(&mut key_buffer, rng.next() % keyspace);
            encode_request(&mut output, protocol, op, key, value.as_bytes());
        }
        let sent = Instant::now();
        stream.write_all(&output).await?;
        let mut answered = 0;
        while answered < batch {
            while replies.next(&mut input)? {
                answered += 1;
                histogram.saturating_record(sent.elapsed().as_micros() as u64);
            }
            if answered < batch {
                input.reserve(16 * 1024);
                if stream.read_buf(&mut input).await? == 0 {
                    bail!("the server closed the connection");
                }
            }
        }
        remaining -= batch;
    }
    Ok(histogram)
}

fn encode_request(output: &mut BytesMut, protocol: Protocol, op: Op, key: &[u8], value: &[u8]) {
    match (protocol, op) {
        (Protocol::Text, Op::Put) => {
            output.put_slice(b"put<");
            output.put_slice(key);
            output.put_u8(b',');
            output.put_slice(value);
            output.put_u8(b'>');
        }
        (Protocol::Text, Op::Get) => {
            output.put_slice(b"get<");
            output.put_slice(key);
            output.put_u8(b'>');
        }
        (Protocol::Resp, Op::Put) => {
            output.put_slice(format!("*3\r\n$3\r\nSET\r\n${}\r\n", key.len()).as_bytes());
            output.put_slice(key);
            output.put_slice(format!("\r\n${}\r\n", value.len()).as_bytes());
            output.put_slice(value);
            output.put_slice(b"\r\n");
        }
        (Protocol::Resp, Op::Get) => {
            output.put_slice(format!("*2\r\n$3\r\nGET\r\n${}\r\n", key.len()).as_bytes());
            output.put_slice(key);
            output.put_slice(b"\r\n");
        }
    }
}

/// Takes answers off the input, checking each is the kind expected.
struct ReplyCounter {
    protocol: Protocol,
    op: Op,
    text: ReplyCodec,
}

impl ReplyCounter {
    fn new(protocol: Protocol, op: Op) -> Self {
        ReplyCounter {
            protocol,
            op,
            text: ReplyCodec::new(),
        }
    }

    /// Consumes one complete answer from `input`; false when none is complete yet.
    fn next(&mut self, input: &mut BytesMut) -> anyhow::Result<bool> {
        match self.protocol {
            Protocol::Text => match self.text.decode(input)? {
                None => Ok(false),
                Some(OwnedReply::Ok(_)) if self.op == Op::Put => Ok(true),
                Some(OwnedReply::Value(_) | OwnedReply::None(_)) if self.op == Op::Get => Ok(true),
                Some(other) => bail!("unexpected answer to {}: {other:?}", self.op.name()),
            },
            Protocol::Resp => {
                let Some(line_end) = memchr::memmem::find(input, b"\r\n") else {
                    return Ok(false);
                };
                let used = match input[0] {
                    b'+' => line_end + 2,
                    b'$' => {
                        let length: i64 = std::str::from_utf8(&input[1..line_end])?.parse()?;
                        let used = if length < 0 {
                            line_end + 2
                        } else {
                            line_end + 2 + length as usize + 2
                        };
                        if input.len() < used {
                            return Ok(false);
                        }
                        used
                    }
                    _ => bail!(
                        "unexpected redis answer {:?}",
                        String::from_utf8_lossy(&input[..line_end])
                    ),
                };
                let _ = input.split_to(used);
                Ok(true)
            }
        }
    }
}

/// `key:` and a 12-digit number, the key shape redis-benchmark uses with `-r`.
fn format_key(buffer: &mut [u8; 16], mut n: u64) -> &[u8] {
    for digit in buffer[4..].iter_mut().rev() {
        *digit = b'0' + (n % 10) as u8;
        n /= 10;
    }
    &buffer[..]
}

/// A kv-service process started for the run, on its own, without a distributor; killed on
/// drop.
struct Service {
    process: Process,
    _dir: Option<tempfile::TempDir>,
    text_addr: SocketAddr,
}

impl Service {
    /// `store` is `mem`, or `sqlite` for a database in a fresh temporary directory.
    async fn start(args: &Args, store: &str) -> anyhow::Result<Service> {
        let (dir, store) = if store == "sqlite" {
            let dir = tempfile::tempdir()?;
            let flag = format!("sqlite:{}", dir.path().join("kv.db").display());
            (Some(dir), flag)
        } else {
            (None, store.to_owned())
        };
        let text_port = free_port();
        let flags: Vec<String> = [
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--text-listen",
            &format!("127.0.0.1:{text_port}"),
            "--distributor",
            "",
            "--store",
            &store,
            "--threads",
            &args.service_threads.to_string(),
        ]
        .map(String::from)
        .to_vec();
        let mut process = match &args.service_bin {
            Some(binary) => Process::start("kv-service", binary.clone(), &flags)?,
            None => Process::spawn("kv-service", "kv-service", &flags),
        };
        wait_for_port(text_port).await;
        process.check_running()?;
        Ok(Service {
            process,
            _dir: dir,
            text_addr: SocketAddr::from(([127, 0, 0, 1], text_port)),
        })
    }
}

/// Requests written before their answers are read, when loading keys for the memory figure.
const MEMORY_LOAD_BATCH: u64 = 1000;

/// Resident memory growth per key of a `--store mem` kv-service and of redis-server, each
/// loaded with `keys` keys of 12 bytes (`key:00000000`) and values of 14 bytes
/// (`value:00000000`), measured in the same run.
async fn measure_memory(args: &Args, keys: u64) -> anyhow::Result<()> {
    println!("kv-bench memory: {keys} keys of 12 bytes, values of 14 bytes, resident set growth");
    let mut service = Service::start(args, "mem").await?;
    let pid = service.process.pid().as_raw().unsigned_abs();
    let stream = TcpStream::connect(service.text_addr).await?;
    let per_key = load_and_measure(pid, stream, keys, |i, out| {
        out.extend_from_slice(format!("put<key:{i:08},value:{i:08}>").as_bytes());
    })
    .await?;
    service.process.check_running()?;
    println!("kv-service --store mem: {per_key:.1} bytes/key");
    if args.no_redis {
        return Ok(());
    }
    match Redis::start().await {
        Ok(redis) => {
            let pid = redis._child.id().context("redis-server has no pid")?;
            let stream = TcpStream::connect(("127.0.0.1", redis.port)).await?;
            let per_key = load_and_measure(pid, stream, keys, |i, out| {
                let command =
                    format!("*3\r\n$3\r\nSET\r\n$12\r\nkey:{i:08}\r\n$14\r\nvalue:{i:08}\r\n");
                out.extend_from_slice(command.as_bytes());
            })
            .await?;
            println!("redis-server: {per_key:.1} bytes/key");
        }
        Err(err) => println!("redis baseline skipped: {err}"),
    }
    Ok(())
}

/// Loads `keys` requests built by `request` over `stream` (one answer line each), and returns
/// the growth of process `pid`'s resident set per key.
async fn load_and_measure(
    pid: u32,
    mut stream: TcpStream,
    keys: u64,
    request: impl Fn(u64, &mut Vec<u8>),
) -> anyhow::Result<f64> {
    let before = resident_bytes(pid)?;
    let mut output = Vec::new();
    let mut input = vec![0u8; 64 * 1024];
    let mut next = 0;
    while next < keys {
        let batch = MEMORY_LOAD_BATCH.min(keys - next);
        output.clear();
        for i in next..next + batch {
            request(i, &mut output);
        }
        stream.write_all(&output).await?;
        let mut answered = 0;
        while answered < batch {
            let read = stream.read(&mut input).await?;
            anyhow::ensure!(read > 0, "the server closed the connection");
            answered += memchr::memchr_iter(b'\n', &input[..read]).count() as u64;
        }
        next += batch;
    }
    let after = resident_bytes(pid)?;
    Ok(after.saturating_sub(before) as f64 / keys as f64)
}

/// A process's resident set size (`VmRSS` in /proc/PID/status), in bytes.
fn resident_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .context("no VmRSS line")?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .context("no VmRSS figure")?
        .parse()?;
    Ok(kib * 1024)
}

/// A redis-server started for the baseline; killed on drop.
struct Redis {
    _child: Child,
    port: u16,
}

impl Redis {
    async fn start() -> anyhow::Result<Redis> {
        for tool in ["redis-server", "redis-benchmark"] {
            let found = Command::new(tool)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .await;
            anyhow::ensure!(found.is_ok(), "{tool} is not installed");
        }
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start redis-server")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)).await {
                stream.write_all(b"PING\r\n").await?;
                let mut answer = [0u8; 7];
                if stream.read_exact(&mut answer).await.is_ok() && &answer == b"+PONG\r\n" {
                    break;
                }
            }
            anyhow::ensure!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Redis {
            _child: child,
            port,
        })
    }

    /// `redis-benchmark -t set,get` with the run's settings; figures for SET (put) and GET.
    async fn benchmark(
        &mut self,
        args: &Args,
        pipeline: usize,
    ) -> anyhow::Result<Vec<(Op, Figures)>> {
        let output = Command::new("redis-benchmark")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-t", "set,get", "--csv"])
            .args(["-c", &args.connections.to_string()])
            .args(["-P", &pipeline.to_string()])
            .args(["-n", &args.requests.to_string()])
            .args(["-r", &args.keyspace.to_string()])
            .args(["-d", &args.value_size.to_string()])
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .context("cannot run redis-benchmark")?;
        anyhow::ensure!(
            output.status.success(),
            "redis-benchmark failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        parse_redis_csv(&String::from_utf8_lossy(&output.stdout))
    }
}

/// Reads redis-benchmark's `--csv` output:
/// `"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"`.
fn parse_redis_csv(csv: &str) -> anyhow::Result<Vec<(Op, Figures)>> {
    let mut figures = Vec::new();
    for line in csv.lines().skip(1) {
        let fields: Vec<&str> = line.split(',').map(|f| f.trim_matches('"')).collect();
        let op = match fields.first() {
            Some(&"SET") => Op::Put,
            Some(&"GET") => Op::Get,
            _ => continue,
        };
        let number = |index: usize| -> anyhow::Result<f64> {
            fields
                .get(index)
                .context("short csv line")?
                .parse()
                .with_context(|| format!("bad number in {line:?}"))
        };
        figures.push((
            op,
            Figures {
                ops_per_sec: number(1)?,
                p50_ms: number(4)?,
                p99_ms: number(6)?,
            },
        ));
    }
    anyhow::ensure!(
        !figures.is_empty(),
        "no figures in redis-benchmark's output:\n{csv}"
    );
    Ok(figures)
}

/// A stack for the gateway scenarios: distributor, gateway and one kv-service on `storage`,
/// with the gateway's per-address cap raised, since every watcher and client connects from
/// 127.0.0.1.
async fn start_gateway_stack(args: &Args, storage: Storage) -> Stack {
    let mut options = bench::stack_options(1, false, storage, args.bin_dir.clone());
    let per_ip = (args.watchers + args.connections + 1024).to_string();
    options.extra_flags.insert(
        "gateway".into(),
        vec!["--max-connections-per-ip".into(), per_ip],
    );
    Stack::start(options).await
}

/// What the watchers share with the putter.
struct WatchCounters {
    start: Instant,
    /// Put-to-event latencies, nanoseconds.
    latency: Mutex<Histogram<u64>>,
    delivered: AtomicUsize,
    /// When the last event arrived, nanoseconds since `start`.
    last_delivery: AtomicU64,
    /// Streams ended by kv-service as too slow (`event: lagged`).
    lagged: AtomicUsize,
    /// Streams ended by the gateway (`event: error`, e.g. its client read too slowly).
    cut_off: AtomicUsize,
}

impl WatchCounters {
    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
}

/// The send time a put's value carries (`t` and nanoseconds since the run's start), found in an
/// event's data without parsing all of it.
fn sent_at(data: &str) -> Option<u64> {
    let at = data.find("\"value\":\"t")? + "\"value\":\"t".len();
    let digits = &data[at..];
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// One prefix watcher through the gateway: records each put's latency until the stream ends.
async fn prefix_watcher(mut events: EventStream, counters: Arc<WatchCounters>) {
    while let Ok(Some(event)) = events.next().await {
        match event.event.as_deref() {
            Some("put") => {
                if let Some(sent) = sent_at(&event.data) {
                    let now = counters.now();
                    counters
                        .latency
                        .lock()
                        .unwrap()
                        .saturating_record(now.saturating_sub(sent).max(1));
                    counters.delivered.fetch_add(1, Ordering::Relaxed);
                    counters.last_delivery.fetch_max(now, Ordering::Relaxed);
                }
            }
            Some("lagged") => {
                counters.lagged.fetch_add(1, Ordering::Relaxed);
            }
            Some("error") => {
                counters.cut_off.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }
}

/// watch: see the module doc.
async fn measure_watch(args: &Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.watchers > 0, "--watchers must be at least 1");
    anyhow::ensure!(args.rate > 0, "--rate must be at least 1");
    anyhow::ensure!(
        (1..=args.watchers).contains(&args.watch_prefixes),
        "--watch-prefixes must be between 1 and --watchers"
    );
    let load_at_start = bench::load_average();
    let stack = start_gateway_stack(args, Storage::Memory).await;
    let gateway = format!("127.0.0.1:{}", stack.gateway_port);
    let prefixes = args.watch_prefixes;
    let counters = Arc::new(WatchCounters {
        start: Instant::now(),
        latency: Mutex::new(bench::nanosecond_histogram()),
        delivered: AtomicUsize::new(0),
        last_delivery: AtomicU64::new(0),
        lagged: AtomicUsize::new(0),
        cut_off: AtomicUsize::new(0),
    });
    // Watchers on prefix k: those with index % prefixes == k.
    let mut watching = vec![0usize; prefixes];
    let mut watchers = Vec::with_capacity(args.watchers);
    for index in 0..args.watchers {
        let prefix = index % prefixes;
        let path = format!("/kv?prefix=w{prefix}/&watch=1");
        let events = EventStream::connect(&gateway, &path)
            .await
            .with_context(|| format!("opening watcher {index}"))?;
        watching[prefix] += 1;
        watchers.push(tokio::spawn(prefix_watcher(events, counters.clone())));
    }
    // Each stream answered 200 once kv-service opened its watch: all are live.
    let watching = Arc::new(watching);

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .timeout(Duration::from_secs(10))
        .build()?;
    let puts = (args.rate as f64 * args.duration.as_secs_f64()).round() as usize;
    let expected = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate as f64));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let first_put = counters.now();
    let mut in_flight = Vec::with_capacity(puts);
    for seq in 0..puts {
        ticker.tick().await;
        let prefix = seq % prefixes;
        let url = stack.url(&format!("/kv/w{prefix}/{seq}"));
        let (http, counters, watching) = (http.clone(), counters.clone(), watching.clone());
        let (expected, failed) = (expected.clone(), failed.clone());
        in_flight.push(tokio::spawn(async move {
            let value = format!("t{}", counters.now());
            let ok = match http.put(url).body(value).send().await {
                Ok(response) => response.status() == reqwest::StatusCode::OK,
                Err(_) => false,
            };
            if ok {
                expected.fetch_add(watching[prefix], Ordering::Relaxed);
            } else {
                failed.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for put in in_flight {
        put.await?;
    }
    let puts_done = counters.now();
    // Then wait for the deliveries, as long as they keep coming (at most a minute).
    let expected = expected.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = (counters.delivered.load(Ordering::Relaxed), Instant::now());
    loop {
        let delivered = counters.delivered.load(Ordering::Relaxed);
        if delivered >= expected || Instant::now() > deadline {
            break;
        }
        if delivered != last.0 {
            last = (delivered, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(5) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let delivered = counters.delivered.load(Ordering::Relaxed);
    let span = counters
        .last_delivery
        .load(Ordering::Relaxed)
        .saturating_sub(first_put)
        .max(1);
    let latency = counters.latency.lock().unwrap().clone();
    bench::print_table_heading(&format!(
        "kv watch delivery ({} prefix watchers over {} prefixes through the gateway, {} puts/s for {:?}, store mem, {} cores)",
        args.watchers,
        prefixes,
        args.rate,
        args.duration,
        bench::cores()
    ));
    println!(
        "| puts | {puts} sent in {:.2} s ({:.0}/s), {} failed |",
        bench::ms(puts_done - first_put) / 1000.0,
        puts as f64 / (bench::ms(puts_done - first_put) / 1000.0),
        failed.load(Ordering::Relaxed)
    );
    println!(
        "| events delivered | {delivered} of {expected} expected; {} lost |",
        expected.saturating_sub(delivered)
    );
    println!(
        "| deliveries/s | {:.0} (first put to last event: {:.2} s) |",
        delivered as f64 / (span as f64 / 1e9),
        span as f64 / 1e9
    );
    bench::print_latency_row("put-to-event", &latency);
    println!(
        "| streams ended early | {} by kv-service (`lagged`), {} by the gateway (`error`) |",
        counters.lagged.load(Ordering::Relaxed),
        counters.cut_off.load(Ordering::Relaxed)
    );
    bench::print_load_row(&load_at_start);
    for watcher in watchers {
        watcher.abort();
    }
    drop(stack);
    Ok(())
}

/// One phase's outcome over all clients.
#[derive(Default)]
struct PhaseFigures {
    /// Requests answered 200 whose work was done (a transaction that succeeded, a put).
    succeeded: usize,
    /// Transactions answered 200 whose compare failed.
    compare_failed: usize,
    /// Requests answered with another status, or not at all.
    errors: usize,
    elapsed: Duration,
    latency: Option<Histogram<u64>>,
}

impl PhaseFigures {
    fn per_sec(&self) -> f64 {
        self.succeeded as f64 / self.elapsed.as_secs_f64()
    }

    fn ms_at(&self, quantile: f64) -> f64 {
        self.latency
            .as_ref()
            .map_or(0.0, |h| h.value_at_quantile(quantile) as f64 / 1000.0)
    }
}

/// What one client reports of a phase.
struct ClientFigures {
    succeeded: usize,
    compare_failed: usize,
    errors: usize,
    latency: Histogram<u64>,
}

impl ClientFigures {
    fn empty() -> ClientFigures {
        ClientFigures {
            succeeded: 0,
            compare_failed: 0,
            errors: 0,
            latency: bench::microsecond_histogram(),
        }
    }
}

/// The versions a transaction's results show for its two keys (`put` after success, `get`
/// after failure).
fn result_versions(answer: &serde_json::Value) -> Option<(i64, i64)> {
    let version = |i: usize| -> Option<i64> {
        let result = &answer["results"][i];
        result["put"]["version"]
            .as_i64()
            .or_else(|| result["get"]["version"].as_i64())
    };
    Some((version(0)?, version(1)?))
}

/// One txn client: on its keys `t{client}/a` and `t{client}/b`, compares both versions and puts
/// both until `until`.
async fn txn_client(
    http: reqwest::Client,
    base: String,
    client: usize,
    until: Instant,
) -> anyhow::Result<ClientFigures> {
    let (a, b) = (format!("t{client}/a"), format!("t{client}/b"));
    let mut versions = (0, 0);
    for (key, version) in [(&a, &mut versions.0), (&b, &mut versions.1)] {
        let answer: serde_json::Value = http
            .put(format!("{base}/kv/{key}"))
            .body("0")
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        *version = answer["version"].as_i64().context("no version")?;
    }
    let mut figures = ClientFigures::empty();
    let mut n = 0u64;
    while Instant::now() < until {
        n += 1;
        let body = serde_json::json!({
            "compare": [{"key": a, "version": versions.0}, {"key": b, "version": versions.1}],
            "success": [{"put": {"key": a, "value": n.to_string()}}, {"put": {"key": b, "value": n.to_string()}}],
            "failure": [{"get": {"key": a}}, {"get": {"key": b}}],
        });
        let sent = Instant::now();
        let answer = match http.post(format!("{base}/txn")).json(&body).send().await {
            Ok(response) if response.status() == reqwest::StatusCode::OK => {
                response.json::<serde_json::Value>().await.ok()
            }
            _ => None,
        };
        figures
            .latency
            .saturating_record(sent.elapsed().as_micros() as u64);
        match answer {
            Some(answer) => {
                if answer["succeeded"] == true {
                    figures.succeeded += 1;
                } else {
                    figures.compare_failed += 1;
                }
                versions = result_versions(&answer).context("a transaction without versions")?;
            }
            None => figures.errors += 1,
        }
    }
    Ok(figures)
}

/// One put client: puts `p{client}` until `until`.
async fn put_client(
    http: reqwest::Client,
    base: String,
    client: usize,
    until: Instant,
) -> anyhow::Result<ClientFigures> {
    let url = format!("{base}/kv/p{client}");
    let mut figures = ClientFigures::empty();
    let mut n = 0u64;
    while Instant::now() < until {
        n += 1;
        let sent = Instant::now();
        let ok = match http.put(&url).body(n.to_string()).send().await {
            Ok(response) => {
                let ok = response.status() == reqwest::StatusCode::OK;
                let _ = response.bytes().await;
                ok
            }
            Err(_) => false,
        };
        figures
            .latency
            .saturating_record(sent.elapsed().as_micros() as u64);
        if ok {
            figures.succeeded += 1;
        } else {
            figures.errors += 1;
        }
    }
    Ok(figures)
}

/// Runs `--connections` clients of one kind for `--duration` and sums their figures.
async fn run_phase<F, Fut>(args: &Args, stack: &Stack, client: F) -> anyhow::Result<PhaseFigures>
where
    F: Fn(reqwest::Client, String, usize, Instant) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<ClientFigures>> + Send + 'static,
{
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections)
        .timeout(Duration::from_secs(10))
        .build()?;
    let started = Instant::now();
    let until = started + args.duration;
    let clients: Vec<_> = (0..args.connections)
        .map(|index| tokio::spawn(client(http.clone(), stack.url(""), index, until)))
        .collect();
    let mut figures = PhaseFigures::default();
    let mut latency = bench::microsecond_histogram();
    for client in clients {
        let done = client.await??;
        figures.succeeded += done.succeeded;
        figures.compare_failed += done.compare_failed;
        figures.errors += done.errors;
        latency.add(&done.latency)?;
    }
    figures.elapsed = started.elapsed();
    figures.latency = Some(latency);
    Ok(figures)
}

/// txn: see the module doc.
async fn measure_txn(args: &Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.connections > 0, "--connections must be at least 1");
    let load_at_start = bench::load_average();
    let mut rows = Vec::new();
    for store in &args.stores {
        let mut postgres = None;
        let storage = match store.as_str() {
            "mem" => Storage::Memory,
            "sqlite" => Storage::Sqlite,
            "postgres" => match shared::testing::TestPostgres::start().await {
                Some(server) => {
                    let storage = Storage::postgres(&server).await;
                    postgres = Some(server);
                    storage
                }
                None => {
                    println!("postgres: no PostgreSQL server could be started; skipped");
                    continue;
                }
            },
            other => bail!("unknown store {other:?}: use mem, sqlite or postgres"),
        };
        let mut stack = start_gateway_stack(args, storage).await;
        let txn = run_phase(args, &stack, txn_client).await?;
        let put = run_phase(args, &stack, put_client).await?;
        for replica in &mut stack.kv {
            replica.process.check_running()?;
        }
        drop(stack);
        drop(postgres);
        rows.push((store.clone(), txn, put));
    }
    println!(
        "## kv transactions through the gateway ({} clients, {:?} per phase, {} cores)",
        args.connections,
        args.duration,
        bench::cores()
    );
    println!();
    println!("| store | txn/s | txn p50 ms | txn p99 ms | succeeded | compare failed | errors | put/s | put p50 ms | put p99 ms | put errors | txn/s : put/s |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (store, txn, put) in &rows {
        println!(
            "| {store} | {:.0} | {:.2} | {:.2} | {} | {} | {} | {:.0} | {:.2} | {:.2} | {} | {:.2} |",
            txn.per_sec(),
            txn.ms_at(0.5),
            txn.ms_at(0.99),
            txn.succeeded,
            txn.compare_failed,
            txn.errors,
            put.per_sec(),
            put.ms_at(0.5),
            put.ms_at(0.99),
            put.errors,
            txn.per_sec() / put.per_sec()
        );
    }
    println!();
    println!(
        "load average (1 min) at start / end: {load_at_start} / {}",
        bench::load_average()
    );
    Ok(())
}
