//! Fan-out benchmark: many Server-Sent-Events subscribers through the real gateway.
//!
//! Starts the real `distributor`, `gateway` and `notice-service` binaries (from the directory
//! of this executable, e.g. target/release) on loopback, opens `--subscribers` SSE streams
//! through the gateway, measures the memory (RSS) of notice-service and gateway with all of
//! them idle, then publishes notices through the gateway and measures:
//! - paced: `--rate` notices/s for `--duration`: publish-to-delivery latency p50/p99/max;
//! - burst: `--burst` notices as fast as `--publishers` concurrent publishers go: delivered
//!   deliveries/s across all subscribers.
//!
//! With `--direct` the subscribers are packet streams on one connection straight to
//! notice-service (the way the gateway holds them) and notices are published over the packet
//! protocol: what the service sustains without the HTTP hop.
//!
//! The baseline, measured first in the same run (unless `--no-floor`): the same subscribers and
//! the same pacing against `fan-out-floor`, a bare writer that gives each subscriber one write
//! per pass with everything published since, from one thread per core: what the kernel alone
//! needs for as many connections on this machine. The report gives the gateway's paced p99 as a
//! ratio of the floor's.
//!
//! Two other scenarios (`--scenario`):
//! - `presence-churn`: `--subscribers` SSE streams through the gateway watch a topic's presence
//!   (`presence=1`) while `--churn-rate` named subscribers per second join the topic and leave
//!   it a second later; join and leave delivery latency, from the joiner's request (or its
//!   disconnect) to each watcher's event.
//! - `udp`: a notice-service with its UDP door open, `--subscribers` UDP sockets registered,
//!   `--burst` notices published over the packet protocol by `--publishers`: deliveries/s,
//!   publish-to-datagram latency, and datagrams lost.
//!
//! Latency is measured from just before the POST is sent to the moment a subscriber has parsed
//! the event, on one clock (this process publishes and subscribes). Build everything with
//! `cargo build --release -p distributor -p gateway -p notice-service -p bench`, then run
//! `target/release/notice-bench`.

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use clap::Parser;
use e2e::{sse::EventStream, Process, Stack, Storage};
use hdrhistogram::Histogram;
use shared::{Dialect, Packet, PacketClient};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt},
    process::{Child, ChildStdin},
    sync::Mutex,
};

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Scenario {
    /// Notices to many SSE subscribers (paced, then burst).
    FanOut,
    /// Join/leave events to presence watchers while subscribers come and go.
    PresenceChurn,
    /// Notices to many UDP subscribers.
    Udp,
}

#[derive(Debug, Parser)]
#[command(about = "notice-service fan-out benchmark through the real gateway")]
struct Args {
    #[arg(long, value_enum, env = "BENCH_SCENARIO", default_value = "fan-out")]
    scenario: Scenario,
    /// presence-churn: named subscribers joining (and, a second later, leaving) per second.
    #[arg(long, env = "BENCH_CHURN_RATE", default_value_t = 100)]
    churn_rate: u64,
    /// SSE subscribers to open through the gateway.
    #[arg(long, env = "BENCH_SUBSCRIBERS", default_value_t = 1000)]
    subscribers: usize,
    /// Notices per second in the paced phase.
    #[arg(long, env = "BENCH_RATE", default_value_t = 100)]
    rate: u64,
    /// Length of the paced phase.
    #[arg(long, env = "BENCH_DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Notices published as fast as possible in the burst phase (0 skips it).
    #[arg(long, env = "BENCH_BURST", default_value_t = 1000)]
    burst: u64,
    /// Concurrent publishers in the burst phase.
    #[arg(long, env = "BENCH_PUBLISHERS", default_value_t = 4)]
    publishers: usize,
    /// notice-service's store: `sqlite` (a temporary file) or `mem`.
    #[arg(long, env = "BENCH_STORE", default_value = "sqlite")]
    store: String,
    /// Subscribe and publish straight to notice-service over the packet protocol, without the
    /// gateway: what the service alone sustains.
    #[arg(long, env = "BENCH_DIRECT")]
    direct: bool,
    /// Where the distributor, gateway and notice-service binaries are (default: next to this one).
    #[arg(long, env = "BENCH_BIN_DIR")]
    bin_dir: Option<PathBuf>,
    /// Skip the baseline: the paced phase against `fan-out-floor`.
    #[arg(long, env = "BENCH_NO_FLOOR")]
    no_floor: bool,
}

/// Starts distributor, gateway and notice-service (no kv-service) and waits until the gateway
/// routes the notice routes.
async fn start_stack(args: &Args) -> anyhow::Result<Stack> {
    let storage = match args.store.as_str() {
        "mem" => Storage::Memory,
        "sqlite" => Storage::Sqlite,
        other => bail!("--store must be sqlite or mem, not {other}"),
    };
    let options = bench::stack_options(0, true, storage, args.bin_dir.clone());
    Ok(Stack::start(options).await)
}

/// Resident memory of a process, in KiB.
fn rss_kib(process: &Process) -> anyhow::Result<u64> {
    let pid = process.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("bad VmRSS")?
        .parse()?)
}

/// What the subscribers share with the publisher.
struct Shared {
    start: Instant,
    /// Per notice sequence number: nanoseconds since `start` when its POST was sent.
    sent_at: Vec<AtomicU64>,
    delivered: AtomicUsize,
    /// Streams ended by notice-service as too slow (`event: lagged`).
    lagged: AtomicUsize,
    /// Streams ended by the gateway (`event: error`, e.g. its client read too slowly).
    cut_off: AtomicUsize,
    connected: AtomicUsize,
}

impl Shared {
    /// Counters at zero, with room for `notices` sequence numbers.
    fn new(notices: usize) -> Shared {
        Shared {
            start: Instant::now(),
            sent_at: (0..notices).map(|_| AtomicU64::new(0)).collect(),
            delivered: AtomicUsize::new(0),
            lagged: AtomicUsize::new(0),
            cut_off: AtomicUsize::new(0),
            connected: AtomicUsize::new(0),
        }
    }

    /// Counts the delivery of notice `seq` and records its publish-to-delivery latency.
    fn record_delivery(&self, seq: usize, histogram: &std::sync::Mutex<Histogram<u64>>) {
        let sent = self.sent_at[seq].load(Ordering::Relaxed);
        let latency = now_nanos(self).saturating_sub(sent).max(1);
        // Recorded straight into the shared histogram: merging a per-subscriber one after
        // every read walks all of its buckets, which cost more than the reading.
        histogram.lock().unwrap().saturating_record(latency);
        self.delivered.fetch_add(1, Ordering::Relaxed);
    }
}

fn now_nanos(shared: &Shared) -> u64 {
    shared.start.elapsed().as_nanos() as u64
}

/// One SSE subscriber on its own connection through the gateway: records, per notice, the
/// publish-to-delivery latency. It reads the socket itself into a buffer on its stack and
/// looks only for what the benchmark needs (the sequence number in a notice's data, the name
/// of an event that ends a stream), without allocating per event: 18,000 of these share the
/// two cores with the gateway and the service, so the figures are about those rather than
/// about the load generator.
async fn subscriber(
    addr: String,
    path: String,
    shared: Arc<Shared>,
    histogram: Arc<std::sync::Mutex<Histogram<u64>>>,
) -> anyhow::Result<()> {
    let (mut socket, mut partial) = e2e::sse::open_socket(&addr, &path)
        .await
        .context("subscribing")?;
    shared.connected.fetch_add(1, Ordering::Relaxed);
    let mut read = [0u8; 4096];
    loop {
        // tokio takes a read that did not fill the buffer as the socket drained, so each event
        // costs one `recv`, not a second one that finds nothing.
        let n = socket.read(&mut read).await?;
        if n == 0 {
            return Ok(());
        }
        // Events end with a blank line; what follows the last one waits for the next read.
        if partial.is_empty() {
            let done = complete_events(&read[..n]);
            record_events(&read[..done], &shared, &histogram);
            partial.extend_from_slice(&read[done..n]);
        } else {
            partial.extend_from_slice(&read[..n]);
            let done = complete_events(&partial);
            record_events(&partial[..done], &shared, &histogram);
            partial.drain(..done);
        }
    }
}

/// How many bytes of `bytes` are whole events (up to and including the last blank line).
fn complete_events(bytes: &[u8]) -> usize {
    bytes
        .windows(2)
        .rposition(|pair| pair == b"\n\n")
        .map_or(0, |at| at + 2)
}

/// Counts the deliveries and stream endings in `events`, whole events as the gateway writes
/// them (`id:`, `event:`, `data:` lines; chunk-size lines in between are not fields).
fn record_events(events: &[u8], shared: &Shared, histogram: &std::sync::Mutex<Histogram<u64>>) {
    for line in events.split(|byte| *byte == b'\n') {
        if let Some(data) = line.strip_prefix(b"data: ") {
            if let Some(seq) = sequence_in(data) {
                shared.record_delivery(seq, histogram);
            }
        } else if line == b"event: lagged" {
            shared.lagged.fetch_add(1, Ordering::Relaxed);
        } else if line == b"event: error" {
            shared.cut_off.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The benchmark sequence number in a notice's JSON or message (`"bench 17"`).
fn sequence_in(data: &[u8]) -> Option<usize> {
    let at = data.windows(6).position(|w| w == b"bench ")? + 6;
    let digits = &data[at..];
    let len = digits.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&digits[..len]).ok()?.parse().ok()
}

/// How notices are published and presence is asked: through the gateway over HTTP, or
/// (`--direct`) straight to notice-service over the packet protocol; for the baseline, as
/// sequence numbers to `fan-out-floor`.
#[derive(Clone)]
enum Publisher {
    Http { http: reqwest::Client, base: String },
    Packet(PacketClient),
    Floor(Arc<Mutex<ChildStdin>>),
}

impl Publisher {
    async fn publish(&self, shared: &Shared, seq: usize) -> anyhow::Result<()> {
        let notice = serde_json::json!({"message": format!("bench {seq}"), "topic": "bench"});
        shared.sent_at[seq].store(now_nanos(shared), Ordering::Relaxed);
        let status = match self {
            Publisher::Floor(writer) => {
                writer
                    .lock()
                    .await
                    .write_all(format!("{seq}\n").as_bytes())
                    .await?;
                return Ok(());
            }
            Publisher::Http { http, base } => http
                .post(format!("{base}/notices"))
                .json(&notice)
                .send()
                .await?
                .status()
                .as_u16(),
            Publisher::Packet(client) => client
                .request(Packet::request("POST", "/notices", notice))
                .await?
                .status(),
        };
        if status != 201 {
            bail!("publish answered {status}");
        }
        Ok(())
    }

    /// How many subscribers the service lists; `None` where there is no service.
    async fn presence_count(&self) -> anyhow::Result<Option<usize>> {
        let presence = match self {
            Publisher::Floor(_) => return Ok(None),
            Publisher::Http { http, base } => {
                http.get(format!("{base}/notices/subscribers"))
                    .send()
                    .await?
                    .json::<serde_json::Value>()
                    .await?
            }
            Publisher::Packet(client) => {
                client
                    .request(Packet::request(
                        "GET",
                        "/notices/subscribers",
                        serde_json::json!({}),
                    ))
                    .await?
                    .params
            }
        };
        Ok(Some(presence["items"].as_array().map_or(0, Vec::len)))
    }
}

/// One subscriber as a packet stream on a connection shared by all of them, the way the
/// gateway holds them (`--direct`).
async fn packet_subscriber(
    client: PacketClient,
    shared: Arc<Shared>,
    histogram: Arc<std::sync::Mutex<Histogram<u64>>>,
) -> anyhow::Result<()> {
    let request = Packet::request(
        "GET",
        "/notices/stream",
        serde_json::json!({"topics": "bench"}),
    );
    let mut stream = client.stream(request).await?;
    shared.connected.fetch_add(1, Ordering::Relaxed);
    while let Some(packet) = stream.next().await {
        let packet = match packet {
            Ok(packet) => packet,
            Err(_) => {
                shared.cut_off.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
        };
        match packet.event.as_deref() {
            Some("notice") => {
                let seq = packet.params["message"]
                    .as_str()
                    .and_then(|message| sequence_in(message.as_bytes()));
                if let Some(seq) = seq {
                    shared.record_delivery(seq, &histogram);
                }
            }
            Some("lagged") => {
                shared.lagged.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }
    Ok(())
}

/// Waits until `expected` deliveries in total were counted (or a bound passed).
async fn wait_delivered(shared: &Shared, expected: usize, bound: Duration) -> Option<Instant> {
    let deadline = Instant::now() + bound;
    loop {
        if shared.delivered.load(Ordering::Relaxed) >= expected {
            return Some(Instant::now());
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Resident memory of notice-service and the gateway at one moment.
#[derive(Debug, Clone, Copy)]
struct Memory {
    notice_kib: u64,
    gateway_kib: u64,
}

impl Memory {
    fn sample(notice: &Process, gateway: &Process) -> anyhow::Result<Memory> {
        Ok(Memory {
            notice_kib: rss_kib(notice)?,
            gateway_kib: rss_kib(gateway)?,
        })
    }
}

/// The paced phase's outcome: its latencies and how many of the expected deliveries arrived.
struct PacedFigures {
    latency: Histogram<u64>,
    delivered: usize,
    expected: usize,
    complete: bool,
}

/// The burst phase's outcome, counted from the end of the paced phase.
struct BurstFigures {
    published_in: Duration,
    delivered: usize,
    elapsed: Duration,
    latency: Histogram<u64>,
    complete: bool,
}

/// Everything the report prints.
struct Report {
    load_at_start: String,
    rss_before: Memory,
    rss_idle: Memory,
    /// The baseline's paced phase (see the module doc).
    floor: Option<PacedFigures>,
    paced: PacedFigures,
    burst: Option<BurstFigures>,
    failed: usize,
    lagged: usize,
    cut_off: usize,
}

/// One benchmark run against a started stack: the publisher, the subscribers' shared counters
/// and the latency histogram they record into.
struct FanOut<'a> {
    args: &'a Args,
    publisher: Publisher,
    /// With `--direct`, the one packet connection every subscriber shares.
    direct: Option<PacketClient>,
    shared: Arc<Shared>,
    histogram: Arc<std::sync::Mutex<Histogram<u64>>>,
    paced_count: usize,
    total: usize,
    /// Publishes that failed so far; counted, not fatal (e.g. a 504 from an overloaded gateway).
    failed: usize,
}

impl<'a> FanOut<'a> {
    /// Connects the publisher (over HTTP through the gateway, or `--direct` over the packet
    /// protocol) and sizes the per-notice bookkeeping for both phases.
    async fn connect(args: &'a Args, stack: &Stack) -> anyhow::Result<FanOut<'a>> {
        let notice_addr = format!(
            "127.0.0.1:{}",
            stack.notice_port.context("notice-service has no port")?
        );
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(args.publishers.max(8))
            .build()?;
        let direct = args
            .direct
            .then(|| PacketClient::connect(notice_addr, Dialect::Packet));
        let publisher = match &direct {
            Some(client) => {
                tokio::time::timeout(Duration::from_secs(10), client.connected())
                    .await
                    .context("cannot connect to notice-service")?;
                Publisher::Packet(client.clone())
            }
            None => Publisher::Http {
                http,
                base: stack.url(""),
            },
        };
        Ok(FanOut::new(args, publisher, direct, args.burst as usize))
    }

    /// The baseline's run: publishing to `fan-out-floor` through `writer`, paced phase only.
    fn floor(args: &'a Args, writer: ChildStdin) -> FanOut<'a> {
        let publisher = Publisher::Floor(Arc::new(Mutex::new(writer)));
        FanOut::new(args, publisher, None, 0)
    }

    fn new(
        args: &'a Args,
        publisher: Publisher,
        direct: Option<PacketClient>,
        burst: usize,
    ) -> FanOut<'a> {
        let paced_count = (args.rate as f64 * args.duration.as_secs_f64()).round() as usize;
        let total = paced_count + burst;
        FanOut {
            args,
            publisher,
            direct,
            shared: Arc::new(Shared::new(total)),
            histogram: Arc::new(std::sync::Mutex::new(bench::nanosecond_histogram())),
            paced_count,
            total,
            failed: 0,
        }
    }

    /// Opens `--subscribers` streams. Through the gateway each subscriber has its own
    /// connection, as browsers would; direct subscribers share one, as the gateway's do.
    fn open_subscribers(
        &self,
        gateway_port: u16,
    ) -> Vec<tokio::task::JoinHandle<anyhow::Result<()>>> {
        let gateway_addr = format!("127.0.0.1:{gateway_port}");
        (0..self.args.subscribers)
            .map(|_| {
                let (shared, histogram) = (self.shared.clone(), self.histogram.clone());
                match &self.direct {
                    Some(client) => {
                        tokio::spawn(packet_subscriber(client.clone(), shared, histogram))
                    }
                    None => tokio::spawn(subscriber(
                        gateway_addr.clone(),
                        "/notices/stream?topics=bench".to_string(),
                        shared,
                        histogram,
                    )),
                }
            })
            .collect()
    }

    /// Waits until presence lists every subscriber (where there is a service to ask) and each
    /// has its stream open, then lets the processes settle before their idle memory is read.
    async fn wait_until_subscribed(&self) -> anyhow::Result<()> {
        let subscribers = self.args.subscribers;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let connected = self.shared.connected.load(Ordering::Relaxed);
            let count = self.publisher.presence_count().await?.unwrap_or(connected);
            if count == subscribers && connected == subscribers {
                break;
            }
            if Instant::now() > deadline {
                bail!("only {count} of {subscribers} subscribers registered");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        Ok(())
    }

    /// Paced phase: `--rate` notices/s for `--duration`, each publish on its own task so a slow
    /// answer does not hold back the next tick; then the publish-to-delivery latencies.
    async fn measure_paced(&mut self) -> anyhow::Result<PacedFigures> {
        let period = Duration::from_secs_f64(1.0 / self.args.rate as f64);
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut in_flight = Vec::with_capacity(self.paced_count);
        for seq in 0..self.paced_count {
            ticker.tick().await;
            let (publisher, shared) = (self.publisher.clone(), self.shared.clone());
            in_flight.push(tokio::spawn(async move {
                publisher.publish(&shared, seq).await
            }));
        }
        for publish in in_flight {
            if let Err(err) = publish.await? {
                if self.failed == 0 {
                    eprintln!("publish failed: {err} (further failures are only counted)");
                }
                self.failed += 1;
            }
        }
        let expected = (self.paced_count - self.failed) * self.args.subscribers;
        let done = wait_delivered(&self.shared, expected, Duration::from_secs(30)).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let latency = self.histogram.lock().unwrap().clone();
        let delivered = self.shared.delivered.load(Ordering::Relaxed);
        self.histogram.lock().unwrap().reset();
        Ok(PacedFigures {
            latency,
            delivered,
            expected,
            complete: done.is_some(),
        })
    }

    /// Burst phase: the remaining `--burst` notices from `--publishers` concurrent publishers
    /// as fast as they go; then how fast the deliveries arrived. `paced_delivered` is what the
    /// paced phase delivered, not counted again here.
    async fn measure_burst(&mut self, paced_delivered: usize) -> anyhow::Result<BurstFigures> {
        let next = Arc::new(AtomicUsize::new(self.paced_count));
        let failed_in_burst = Arc::new(AtomicUsize::new(0));
        let burst_start = Instant::now();
        let publishers: Vec<_> = (0..self.args.publishers)
            .map(|_| {
                tokio::spawn(publish_until_done(
                    self.publisher.clone(),
                    self.shared.clone(),
                    next.clone(),
                    self.total,
                    failed_in_burst.clone(),
                ))
            })
            .collect();
        for publisher in publishers {
            publisher.await??;
        }
        self.failed += failed_in_burst.load(Ordering::Relaxed);
        let published_in = burst_start.elapsed();
        let expected = (self.total - self.failed) * self.args.subscribers;
        let done = wait_delivered(&self.shared, expected, Duration::from_secs(120)).await;
        let delivered = self.shared.delivered.load(Ordering::Relaxed) - paced_delivered;
        let elapsed = done.unwrap_or_else(Instant::now) - burst_start;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let latency = self.histogram.lock().unwrap().clone();
        Ok(BurstFigures {
            published_in,
            delivered,
            elapsed,
            latency,
            complete: done.is_some(),
        })
    }
}

/// One burst publisher: takes the next sequence number until `total` were taken; a failed
/// publish is counted in `failed` (the first one printed), not fatal.
async fn publish_until_done(
    publisher: Publisher,
    shared: Arc<Shared>,
    next: Arc<AtomicUsize>,
    total: usize,
    failed: Arc<AtomicUsize>,
) -> anyhow::Result<()> {
    loop {
        let seq = next.fetch_add(1, Ordering::Relaxed);
        if seq >= total {
            return Ok(());
        }
        if let Err(err) = publisher.publish(&shared, seq).await {
            if failed.fetch_add(1, Ordering::Relaxed) == 0 {
                eprintln!("publish failed: {err} (further failures are only counted)");
            }
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.scenario {
        Scenario::FanOut => fan_out(args).await,
        Scenario::PresenceChurn => presence_churn(args).await,
        Scenario::Udp => udp_fan_out(args).await,
    }
}

/// The baseline: `fan-out-floor` (next to this executable), the same subscribers opened to it,
/// and the same paced phase.
async fn measure_floor(args: &Args) -> anyhow::Result<PacedFigures> {
    let mut writer = tokio::process::Command::new(e2e::bin_dir().join("fan-out-floor"))
        .args(["--subscribers", &args.subscribers.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting fan-out-floor (built by cargo build --release -p bench)")?;
    let (port, stdin) = floor_port_and_input(&mut writer).await?;
    let mut floor = FanOut::floor(args, stdin);
    let subscribers = floor.open_subscribers(port);
    floor.wait_until_subscribed().await?;
    let paced = floor.measure_paced().await;
    // The last handle on the writer's stdin: it exits, and its subscribers read the end.
    drop(floor);
    let status = tokio::time::timeout(Duration::from_secs(10), writer.wait())
        .await
        .context("fan-out-floor did not exit")??;
    if !status.success() {
        bail!("fan-out-floor failed ({status}); its error is above");
    }
    for subscriber in subscribers {
        subscriber.abort();
    }
    paced
}

/// The port `fan-out-floor` listens on (its first line of output) and its input.
async fn floor_port_and_input(writer: &mut Child) -> anyhow::Result<(u16, ChildStdin)> {
    let stdout = writer
        .stdout
        .take()
        .context("fan-out-floor has no stdout")?;
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::BufReader::new(stdout).read_line(&mut line),
    )
    .await
    .context("fan-out-floor printed no port")??;
    let port = line
        .trim()
        .parse()
        .context("fan-out-floor printed no port")?;
    Ok((
        port,
        writer.stdin.take().context("fan-out-floor has no stdin")?,
    ))
}

async fn fan_out(args: Args) -> anyhow::Result<()> {
    let load_at_start = bench::load_average();
    let floor = if args.direct || args.no_floor {
        None
    } else {
        Some(measure_floor(&args).await?)
    };
    let stack = start_stack(&args).await?;
    let notice = stack
        .notice
        .as_ref()
        .context("notice-service was not started")?;
    let mut fan_out = FanOut::connect(&args, &stack).await?;
    let rss_before = Memory::sample(notice, &stack.gateway)?;
    let subscribers = fan_out.open_subscribers(stack.gateway_port);
    fan_out.wait_until_subscribed().await?;
    let rss_idle = Memory::sample(notice, &stack.gateway)?;
    let paced = fan_out.measure_paced().await?;
    let burst = if args.burst > 0 {
        Some(fan_out.measure_burst(paced.delivered).await?)
    } else {
        None
    };
    let report = Report {
        load_at_start,
        rss_before,
        rss_idle,
        floor,
        paced,
        burst,
        failed: fan_out.failed,
        lagged: fan_out.shared.lagged.load(Ordering::Relaxed),
        cut_off: fan_out.shared.cut_off.load(Ordering::Relaxed),
    };
    print_report(&args, &report);
    for subscriber in subscribers {
        subscriber.abort();
    }
    drop(stack);
    Ok(())
}

/// Prints the results as a markdown table.
fn print_report(args: &Args, report: &Report) {
    let path = if args.direct {
        "packet streams straight to notice-service on one connection"
    } else {
        "SSE subscribers through the gateway"
    };
    bench::print_table_heading(&format!(
        "notice-service fan-out ({} {path}, store {})",
        args.subscribers, args.store
    ));
    print_memory_rows(args, report.rss_before, report.rss_idle);
    if let Some(floor) = &report.floor {
        print_paced_rows(args, "floor (fan-out-floor)", floor);
    }
    print_paced_rows(args, "paced", &report.paced);
    if let Some(floor) = &report.floor {
        let p99 = |paced: &PacedFigures| paced.latency.value_at_quantile(0.99) as f64;
        println!(
            "| paced p99 against the floor's | {:.2} × |",
            p99(&report.paced) / p99(floor)
        );
    }
    if let Some(burst) = &report.burst {
        print_burst_rows(args, burst);
    }
    println!("| failed publishes | {} |", report.failed);
    bench::print_load_row(&report.load_at_start);
    println!(
        "| streams ended early | {} by notice-service (`lagged`), {} by the gateway (`error`) |",
        report.lagged, report.cut_off
    );
}

/// Memory before the subscribers, with them idle, and the difference per subscriber.
fn print_memory_rows(args: &Args, before: Memory, idle: Memory) {
    let mib = |kib: u64| kib as f64 / 1024.0;
    let per_sub =
        |before: u64, idle: u64| idle.saturating_sub(before) as f64 / args.subscribers as f64;
    println!(
        "| RSS before subscribers | notice-service {:.1} MiB, gateway {:.1} MiB |",
        mib(before.notice_kib),
        mib(before.gateway_kib)
    );
    println!(
        "| RSS at {} idle subscribers | notice-service {:.1} MiB, gateway {:.1} MiB |",
        args.subscribers,
        mib(idle.notice_kib),
        mib(idle.gateway_kib)
    );
    let (service_per, gateway_per) = (
        per_sub(before.notice_kib, idle.notice_kib),
        per_sub(before.gateway_kib, idle.gateway_kib),
    );
    println!(
        "| memory per idle subscriber | notice-service {service_per:.1} KiB + gateway {gateway_per:.1} KiB = {:.1} KiB |",
        service_per + gateway_per
    );
}

/// A paced phase's rows; `phase` names it (`paced`, or the baseline's).
fn print_paced_rows(args: &Args, phase: &str, paced: &PacedFigures) {
    println!(
        "| {phase}: {} notices/s for {:?} | {} deliveries of {} expected{} |",
        args.rate,
        args.duration,
        paced.delivered,
        paced.expected,
        if paced.complete { "" } else { " (timed out)" }
    );
    bench::print_latency_row(&format!("{phase}: publish-to-delivery"), &paced.latency);
}

fn print_burst_rows(args: &Args, burst: &BurstFigures) {
    println!(
        "| burst: {} notices, {} publishers | published in {:.2} s ({:.0} notices/s accepted) |",
        args.burst,
        args.publishers,
        burst.published_in.as_secs_f64(),
        args.burst as f64 / burst.published_in.as_secs_f64()
    );
    println!(
        "| burst: delivered | {} deliveries in {:.2} s = {:.0} deliveries/s{} |",
        burst.delivered,
        burst.elapsed.as_secs_f64(),
        burst.delivered as f64 / burst.elapsed.as_secs_f64(),
        if burst.complete { "" } else { " (incomplete)" }
    );
    bench::print_latency_row("burst: publish-to-delivery", &burst.latency);
}

/// When each churning subscriber asked to join and when it went away, in nanoseconds since the
/// run's start (0: not yet).
struct Churners {
    start: Instant,
    joined_at: Vec<AtomicU64>,
    left_at: Vec<AtomicU64>,
}

impl Churners {
    fn elapsed(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
}

/// One presence watcher: records, for each `join`/`leave` of a churner, how long after the
/// churner's request (or disconnect) it arrived.
async fn presence_watcher(
    mut events: EventStream,
    churners: Arc<Churners>,
    joins: Arc<std::sync::Mutex<Histogram<u64>>>,
    leaves: Arc<std::sync::Mutex<Histogram<u64>>>,
    delivered: Arc<AtomicUsize>,
) -> anyhow::Result<()> {
    while let Some(event) = events.next().await? {
        let (times, histogram) = match event.event.as_deref() {
            Some("join") => (&churners.joined_at, &joins),
            Some("leave") => (&churners.left_at, &leaves),
            _ => continue,
        };
        let Some(index) = event.json()["name"]
            .as_str()
            .and_then(|name| name.strip_prefix('c'))
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        let at = times[index].load(Ordering::Relaxed);
        let latency = churners.elapsed().saturating_sub(at).max(1);
        histogram.lock().unwrap().saturating_record(latency);
        delivered.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// presence-churn: see the module doc.
async fn presence_churn(args: Args) -> anyhow::Result<()> {
    let load_at_start = bench::load_average();
    let stack = start_stack(&args).await?;
    let gateway = format!("127.0.0.1:{}", stack.gateway_port);
    let joiners = (args.churn_rate as f64 * args.duration.as_secs_f64()).round() as usize;
    let churners = Arc::new(Churners {
        start: Instant::now(),
        joined_at: (0..joiners).map(|_| AtomicU64::new(0)).collect(),
        left_at: (0..joiners).map(|_| AtomicU64::new(0)).collect(),
    });
    let histogram = bench::nanosecond_histogram;
    let joins = Arc::new(std::sync::Mutex::new(histogram()));
    let leaves = Arc::new(std::sync::Mutex::new(histogram()));
    let delivered = Arc::new(AtomicUsize::new(0));
    let mut watchers = Vec::with_capacity(args.subscribers);
    for _ in 0..args.subscribers {
        let events = EventStream::connect(&gateway, "/notices/stream?topics=bench&presence=1")
            .await
            .context("opening a presence watcher")?;
        watchers.push(tokio::spawn(presence_watcher(
            events,
            churners.clone(),
            joins.clone(),
            leaves.clone(),
            delivered.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    let period = Duration::from_secs_f64(1.0 / args.churn_rate as f64);
    let mut ticker = tokio::time::interval(period);
    let mut churning = Vec::with_capacity(joiners);
    let mut refused = 0;
    for index in 0..joiners {
        ticker.tick().await;
        let (gateway, churners) = (gateway.clone(), churners.clone());
        churning.push(tokio::spawn(async move {
            let path = format!("/notices/stream?topics=bench&name=c{index}");
            churners.joined_at[index].store(churners.elapsed(), Ordering::Relaxed);
            let stream = EventStream::connect(&gateway, &path).await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
            churners.left_at[index].store(churners.elapsed(), Ordering::Relaxed);
            drop(stream);
            anyhow::Ok(())
        }));
    }
    for churner in churning {
        if churner.await?.is_err() {
            refused += 1;
        }
    }
    let expected = (joiners - refused) * 2 * args.subscribers;
    let deadline = Instant::now() + Duration::from_secs(30);
    while delivered.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (joins, leaves) = (
        joins.lock().unwrap().clone(),
        leaves.lock().unwrap().clone(),
    );
    bench::print_table_heading(&format!(
        "notice-service presence churn ({} watchers through the gateway, {} joins/s for {:?}, {} cores)",
        args.subscribers,
        args.churn_rate,
        args.duration,
        bench::cores()
    ));
    println!(
        "| presence events delivered | {} of {} expected ({} joiners refused) |",
        delivered.load(Ordering::Relaxed),
        expected,
        refused
    );
    bench::print_latency_row("join: request-to-event", &joins);
    bench::print_latency_row("leave: disconnect-to-event", &leaves);
    bench::print_load_row(&load_at_start);
    for watcher in watchers {
        watcher.abort();
    }
    drop(stack);
    Ok(())
}

/// udp: see the module doc.
async fn udp_fan_out(args: Args) -> anyhow::Result<()> {
    let load_at_start = bench::load_average();
    let bin_dir = args.bin_dir.clone().unwrap_or_else(e2e::bin_dir);
    let (packet_port, udp_port) = (e2e::free_port(), e2e::free_port());
    let service_args: Vec<String> = [
        "--distributor",
        "",
        "--store",
        "mem",
        "--listen",
        &format!("127.0.0.1:{packet_port}"),
        "--udp-listen",
        &format!("127.0.0.1:{udp_port}"),
        "--udp-max-subscribers",
        &args.subscribers.to_string(),
    ]
    .iter()
    .map(|arg| arg.to_string())
    .collect();
    let mut service =
        Process::spawn_in(&bin_dir, "notice-service", "notice-service", &service_args);
    service.wait_for_port(packet_port).await?;
    let client = PacketClient::connect(format!("127.0.0.1:{packet_port}"), Dialect::Packet);
    tokio::time::timeout(Duration::from_secs(10), client.connected())
        .await
        .context("cannot connect to notice-service")?;

    let total = args.burst.max(1) as usize;
    let shared = Arc::new(Shared::new(total));
    let histogram = Arc::new(std::sync::Mutex::new(bench::nanosecond_histogram()));
    let mut receivers = Vec::with_capacity(args.subscribers);
    for index in 0..args.subscribers {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
        socket.connect(("127.0.0.1", udp_port)).await?;
        socket
            .send(format!("#REG u{index} bench").as_bytes())
            .await?;
        let mut buffer = vec![0u8; 2048];
        let len = tokio::time::timeout(Duration::from_secs(5), socket.recv(&mut buffer))
            .await
            .context("no answer to #REG")??;
        if !buffer[..len].starts_with(b"#OK") {
            bail!("#REG refused: {}", String::from_utf8_lossy(&buffer[..len]));
        }
        let (shared, histogram) = (shared.clone(), histogram.clone());
        receivers.push(tokio::spawn(async move {
            loop {
                let Ok(len) = socket.recv(&mut buffer).await else {
                    return;
                };
                if let Some(seq) = sequence_in(&buffer[..len]) {
                    shared.record_delivery(seq, &histogram);
                }
            }
        }));
    }

    let next = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let publishers: Vec<_> = (0..args.publishers)
        .map(|_| {
            tokio::spawn(publish_until_done(
                Publisher::Packet(client.clone()),
                shared.clone(),
                next.clone(),
                total,
                failed.clone(),
            ))
        })
        .collect();
    for publisher in publishers {
        publisher.await??;
    }
    let published_in = started.elapsed();
    let expected = (total - failed.load(Ordering::Relaxed)) * args.subscribers;
    let done = wait_delivered(&shared, expected, Duration::from_secs(30)).await;
    // Past the bound, what has not arrived was dropped (UDP may drop).
    let elapsed = done.unwrap_or_else(Instant::now) - started;
    let delivered = shared.delivered.load(Ordering::Relaxed);
    let latency = histogram.lock().unwrap().clone();
    bench::print_table_heading(&format!(
        "notice-service UDP fan-out ({} UDP subscribers, {} notices, {} publishers over the packet protocol, {} cores)",
        args.subscribers,
        total,
        args.publishers,
        bench::cores()
    ));
    println!(
        "| published | {total} notices in {:.2} s ({} failed) |",
        published_in.as_secs_f64(),
        failed.load(Ordering::Relaxed)
    );
    println!(
        "| delivered | {delivered} datagrams of {expected} in {:.2} s = {:.0} deliveries/s; {} lost |",
        elapsed.as_secs_f64(),
        delivered as f64 / elapsed.as_secs_f64(),
        expected.saturating_sub(delivered)
    );
    bench::print_latency_row("publish-to-datagram", &latency);
    bench::print_load_row(&load_at_start);
    for receiver in receivers {
        receiver.abort();
    }
    drop(service);
    Ok(())
}
