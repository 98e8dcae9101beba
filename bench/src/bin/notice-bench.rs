//! Fan-out benchmark: many Server-Sent-Events subscribers through the real gateway.
//!
//! Starts the real `distributor`, `gateway` and `notice-service` binaries (from the directory
//! of this executable, e.g. target/release) on loopback, opens `--subscribers` SSE streams
//! through the gateway, measures the memory (RSS) of notice-service and gateway with all of
//! them idle, then publishes notices through the gateway and measures:
//! - paced: `--rate` notices/s for `--duration`: publish-to-delivery latency p50/p99/max;
//! - burst: `--burst` notices as fast as `--publishers` concurrent publishers go: delivered
//!   notices/s across all subscribers.
//!
//! With `--direct` the subscribers are packet streams on one connection straight to
//! notice-service (the way the gateway holds them) and notices are published over the packet
//! protocol: what the service sustains without the HTTP hop.
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

#[derive(Debug, Parser)]
#[command(about = "notice-service fan-out benchmark through the real gateway")]
struct Args {
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

/// The 1-minute load average: the machine is shared, so every result carries it.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
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

fn now_nanos(shared: &Shared) -> u64 {
    shared.start.elapsed().as_nanos() as u64
}

/// Extracts the benchmark sequence number from an SSE event's data line.
fn sequence_of(event: &str) -> Option<usize> {
    let at = event.find("bench ")? + "bench ".len();
    let digits: String = event[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// One SSE subscriber on its own connection through the gateway: records, per notice, the
/// publish-to-delivery latency. The harness's plain-socket reader keeps the load generator's
/// own cost per event low, so the figures are about the gateway and the service rather than
/// the client.
async fn subscriber(
    addr: String,
    path: String,
    shared: Arc<Shared>,
    histogram: Arc<std::sync::Mutex<Histogram<u64>>>,
) -> anyhow::Result<()> {
    let mut events = EventStream::connect(&addr, &path)
        .await
        .context("subscribing")?;
    shared.connected.fetch_add(1, Ordering::Relaxed);
    while let Some(event) = events.next().await? {
        match event.event.as_deref() {
            Some("lagged") => {
                shared.lagged.fetch_add(1, Ordering::Relaxed);
            }
            Some("error") => {
                shared.cut_off.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        if let Some(seq) = sequence_of(&event.data) {
            let sent = shared.sent_at[seq].load(Ordering::Relaxed);
            let latency = now_nanos(&shared).saturating_sub(sent).max(1);
            // Recorded straight into the shared histogram: merging a per-subscriber one after
            // every read walks all of its buckets, which cost more than the reading.
            histogram.lock().unwrap().saturating_record(latency);
            shared.delivered.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// How notices are published and presence is asked: through the gateway over HTTP, or
/// (`--direct`) straight to notice-service over the packet protocol.
#[derive(Clone)]
enum Publisher {
    Http { http: reqwest::Client, base: String },
    Packet(PacketClient),
}

impl Publisher {
    async fn publish(&self, shared: &Shared, seq: usize) -> anyhow::Result<()> {
        let notice = serde_json::json!({"message": format!("bench {seq}"), "topic": "bench"});
        shared.sent_at[seq].store(now_nanos(shared), Ordering::Relaxed);
        let status = match self {
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

    async fn presence_count(&self) -> anyhow::Result<usize> {
        let presence = match self {
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
        Ok(presence["items"].as_array().map_or(0, Vec::len))
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
                let seq = packet.params["message"].as_str().and_then(sequence_of);
                if let Some(seq) = seq {
                    let sent = shared.sent_at[seq].load(Ordering::Relaxed);
                    let latency = now_nanos(&shared).saturating_sub(sent).max(1);
                    histogram.lock().unwrap().saturating_record(latency);
                    shared.delivered.fetch_add(1, Ordering::Relaxed);
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

fn ms(nanos: u64) -> f64 {
    nanos as f64 / 1e6
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let load_at_start = load_average();
    let stack = start_stack(&args).await?;
    let notice = stack
        .notice
        .as_ref()
        .context("notice-service was not started")?;
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
            http: http.clone(),
            base: stack.url(""),
        },
    };
    let rss_before = (rss_kib(notice)?, rss_kib(&stack.gateway)?);

    let paced_count = (args.rate as f64 * args.duration.as_secs_f64()).round() as usize;
    let total = paced_count + args.burst as usize;
    let shared = Arc::new(Shared {
        start: Instant::now(),
        sent_at: (0..total).map(|_| AtomicU64::new(0)).collect(),
        delivered: AtomicUsize::new(0),
        lagged: AtomicUsize::new(0),
        cut_off: AtomicUsize::new(0),
        connected: AtomicUsize::new(0),
    });
    let histogram = Arc::new(std::sync::Mutex::new(Histogram::<u64>::new_with_bounds(
        1,
        60_000_000_000,
        3,
    )?));
    // Through the gateway each subscriber has its own connection, as browsers would; direct
    // subscribers share one, as the gateway's do.
    let gateway_addr = format!("127.0.0.1:{}", stack.gateway_port);
    let mut subscribers = Vec::new();
    for _ in 0..args.subscribers {
        let (shared, histogram) = (shared.clone(), histogram.clone());
        subscribers.push(match &direct {
            Some(client) => tokio::spawn(packet_subscriber(client.clone(), shared, histogram)),
            None => tokio::spawn(subscriber(
                gateway_addr.clone(),
                "/notices/stream?topics=bench".to_string(),
                shared,
                histogram,
            )),
        });
    }
    // Every subscriber is registered once presence lists them all.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let count = publisher.presence_count().await?;
        if count == args.subscribers && shared.connected.load(Ordering::Relaxed) == args.subscribers
        {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "only {count} of {} subscribers registered",
                args.subscribers
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_idle = (rss_kib(notice)?, rss_kib(&stack.gateway)?);

    // Paced phase.
    let period = Duration::from_secs_f64(1.0 / args.rate as f64);
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut in_flight = Vec::with_capacity(paced_count);
    for seq in 0..paced_count {
        ticker.tick().await;
        let (publisher, shared) = (publisher.clone(), shared.clone());
        in_flight.push(tokio::spawn(async move {
            publisher.publish(&shared, seq).await
        }));
    }
    // A failed publish (e.g. a 504 from an overloaded gateway) is counted, not fatal.
    let mut failed = 0;
    for publish in in_flight {
        if let Err(err) = publish.await? {
            if failed == 0 {
                eprintln!("publish failed: {err} (further failures are only counted)");
            }
            failed += 1;
        }
    }
    let paced_expected = (paced_count - failed) * args.subscribers;
    let paced_done = wait_delivered(&shared, paced_expected, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let paced_latency = histogram.lock().unwrap().clone();
    let paced_delivered = shared.delivered.load(Ordering::Relaxed);
    histogram.lock().unwrap().reset();

    // Burst phase.
    let mut burst_result = None;
    if args.burst > 0 {
        let next = Arc::new(AtomicUsize::new(paced_count));
        let failed_in_burst = Arc::new(AtomicUsize::new(0));
        let burst_start = Instant::now();
        let publishers: Vec<_> = (0..args.publishers)
            .map(|_| {
                let (publisher, shared, next, failed_in_burst) = (
                    publisher.clone(),
                    shared.clone(),
                    next.clone(),
                    failed_in_burst.clone(),
                );
                tokio::spawn(async move {
                    loop {
                        let seq = next.fetch_add(1, Ordering::Relaxed);
                        if seq >= total {
                            return anyhow::Ok(());
                        }
                        if let Err(err) = publisher.publish(&shared, seq).await {
                            if failed_in_burst.fetch_add(1, Ordering::Relaxed) == 0 {
                                eprintln!(
                                    "publish failed: {err} (further failures are only counted)"
                                );
                            }
                        }
                    }
                })
            })
            .collect();
        for publisher in publishers {
            publisher.await??;
        }
        failed += failed_in_burst.load(Ordering::Relaxed);
        let published_in = burst_start.elapsed();
        let expected = (total - failed) * args.subscribers;
        let done = wait_delivered(&shared, expected, Duration::from_secs(120)).await;
        let delivered = shared.delivered.load(Ordering::Relaxed) - paced_delivered;
        let elapsed = done.unwrap_or_else(Instant::now) - burst_start;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let latency = histogram.lock().unwrap().clone();
        burst_result = Some((published_in, delivered, elapsed, latency, done.is_some()));
    }

    let kib = |v: u64| v as f64;
    let per_sub =
        |before: u64, idle: u64| idle.saturating_sub(before) as f64 / args.subscribers as f64;
    let path = if args.direct {
        "packet streams straight to notice-service on one connection"
    } else {
        "SSE subscribers through the gateway"
    };
    println!(
        "## notice-service fan-out ({} {path}, store {})",
        args.subscribers, args.store
    );
    println!();
    println!("| measure | value |");
    println!("| --- | --- |");
    println!(
        "| RSS before subscribers | notice-service {:.1} MiB, gateway {:.1} MiB |",
        kib(rss_before.0) / 1024.0,
        kib(rss_before.1) / 1024.0
    );
    println!(
        "| RSS at {} idle subscribers | notice-service {:.1} MiB, gateway {:.1} MiB |",
        args.subscribers,
        kib(rss_idle.0) / 1024.0,
        kib(rss_idle.1) / 1024.0
    );
    let (service_per, gateway_per) = (
        per_sub(rss_before.0, rss_idle.0),
        per_sub(rss_before.1, rss_idle.1),
    );
    println!(
        "| memory per idle subscriber | notice-service {service_per:.1} KiB + gateway {gateway_per:.1} KiB = {:.1} KiB |",
        service_per + gateway_per
    );
    println!(
        "| paced: {} notices/s for {:?} | {} deliveries of {} expected{} |",
        args.rate,
        args.duration,
        paced_delivered,
        paced_expected,
        if paced_done.is_some() {
            ""
        } else {
            " (timed out)"
        }
    );
    println!(
        "| paced: publish-to-delivery latency | p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms |",
        ms(paced_latency.value_at_quantile(0.5)),
        ms(paced_latency.value_at_quantile(0.99)),
        ms(paced_latency.max())
    );
    if let Some((published_in, delivered, elapsed, latency, complete)) = burst_result {
        println!(
            "| burst: {} notices, {} publishers | published in {:.2} s ({:.0} notices/s accepted) |",
            args.burst,
            args.publishers,
            published_in.as_secs_f64(),
            args.burst as f64 / published_in.as_secs_f64()
        );
        println!(
            "| burst: delivered | {delivered} deliveries in {:.2} s = {:.0} notices/s{} |",
            elapsed.as_secs_f64(),
            delivered as f64 / elapsed.as_secs_f64(),
            if complete { "" } else { " (incomplete)" }
        );
        println!(
            "| burst: publish-to-delivery latency | p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms |",
            ms(latency.value_at_quantile(0.5)),
            ms(latency.value_at_quantile(0.99)),
            ms(latency.max())
        );
    }
    println!("| failed publishes | {failed} |");
    println!(
        "| load average (1 min) at start / end | {load_at_start} / {} |",
        load_average()
    );
    println!(
        "| streams ended early | {} by notice-service (`lagged`), {} by the gateway (`error`) |",
        shared.lagged.load(Ordering::Relaxed),
        shared.cut_off.load(Ordering::Relaxed)
    );
    for subscriber in subscribers {
        subscriber.abort();
    }
    drop(stack);
    Ok(())
}
