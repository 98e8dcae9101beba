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

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use bytes::{BufMut, BytesMut};
use clap::Parser;
use e2e::{free_port, wait_for_port, Process};
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
    /// Connections.
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
    /// Stores to start a kv-service with, comma separated: mem, sqlite.
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
