//! Measures what the gateway hop costs.
//!
//! Starts the real binaries on loopback (distributor, kv-service on the in-memory store, gateway),
//! stores one key, then measures in one run:
//! - the gateway path: `GET /kv/bench` over HTTP with `wrk` at N connections;
//! - the direct baseline: the same request as a packet straight to the kv-service, N requests in
//!   flight on one multiplexed packet client (as the gateway itself talks to the node), timed
//!   here with an HDR histogram.
//!
//! It prints requests/s, p50 and p99 of both, the throughput ratio and the p99 the hop adds.
//! The binaries are taken from the directory of this one, so build them together:
//! `cargo build --release -p distributor -p kv-service -p gateway`.

use std::{
    net::TcpListener as StdListener,
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context};
use clap::Parser;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use shared::{Dialect, Packet, PacketClient};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    process::{Child, Command},
};

#[derive(Debug, Parser)]
#[command(about = "Gateway throughput and latency against a direct packet-client baseline")]
struct Args {
    /// Measured time of each run.
    #[arg(long, env = "BENCH_DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Untimed load before each measured run.
    #[arg(long, env = "BENCH_WARMUP", default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// HTTP connections (wrk) and requests in flight (baseline).
    #[arg(long, env = "BENCH_CONNECTIONS", default_value_t = 64)]
    connections: usize,
    /// wrk threads.
    #[arg(long, env = "BENCH_THREADS", default_value_t = 2)]
    threads: usize,
    /// Size of the stored value, in bytes.
    #[arg(long, env = "BENCH_VALUE_SIZE", default_value_t = 100)]
    value_size: usize,
    /// Where the distributor, kv-service and gateway binaries are (default: next to this one).
    #[arg(long, env = "BENCH_BIN_DIR")]
    bin_dir: Option<PathBuf>,
    /// Exit non-zero when a target (throughput >= half the baseline, p99 added < 1 ms) is missed.
    #[arg(long)]
    check: bool,
}

/// One measured run.
struct Figures {
    requests: u64,
    elapsed: Duration,
    p50_us: u64,
    p99_us: u64,
    errors: u64,
}

impl Figures {
    fn rate(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    /// CPU time per request, in µs, of `ticks` spent during this run.
    fn cpu_per_request_us(&self, ticks: u64) -> f64 {
        ticks as f64 * 1e6 / CLOCK_TICKS_PER_SECOND / self.requests.max(1) as f64
    }
}

/// Linux's USER_HZ, the unit of the CPU times in /proc/PID/stat (100 on every common platform).
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

/// CPU time (user + system, in clock ticks) a process has used so far; 0 when unknown.
fn cpu_ticks(pid: Option<u32>) -> u64 {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let Ok(stat) = std::fs::read_to_string(path) else {
        return 0;
    };
    // The command name (field 2) may hold spaces; the fields after its closing parenthesis are
    // plain, utime and stime being the 14th and 15th of the line.
    let Some((_, fields)) = stat.rsplit_once(')') else {
        return 0;
    };
    let fields: Vec<&str> = fields.split_whitespace().collect();
    let field = |n: usize| {
        fields
            .get(n - 3)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(14) + field(15)
}

/// CPU ticks of each measured process, sampled around a run.
#[derive(Clone, Copy)]
struct CpuSample {
    bench: u64,
    kv: u64,
    gateway: u64,
}

impl CpuSample {
    fn take(kv: &Process, gateway: &Process) -> CpuSample {
        CpuSample {
            bench: cpu_ticks(None),
            kv: cpu_ticks(kv.child.id()),
            gateway: cpu_ticks(gateway.child.id()),
        }
    }

    fn since(self, earlier: CpuSample) -> CpuSample {
        CpuSample {
            bench: self.bench.saturating_sub(earlier.bench),
            kv: self.kv.saturating_sub(earlier.kv),
            gateway: self.gateway.saturating_sub(earlier.gateway),
        }
    }
}

/// A child process killed when dropped.
struct Process {
    name: &'static str,
    child: Child,
}

impl Process {
    fn spawn(name: &'static str, bin_dir: &Path, args: &[&str]) -> anyhow::Result<Process> {
        let program = bin_dir.join(name);
        ensure!(
            program.exists(),
            "{} is missing: run `cargo build --release -p distributor -p kv-service -p gateway`",
            program.display()
        );
        let child = Command::new(&program)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        Ok(Process { name, child })
    }

    fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited early: {status}", self.name);
        }
        Ok(())
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.connections > 0, "--connections must be at least 1");
    let bin_dir = match &args.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("the bench binary has no directory")?
            .to_path_buf(),
    };
    which_wrk()?;

    let (distributor_port, kv_port, kv_text_port, gateway_port) =
        (free_port()?, free_port()?, free_port()?, free_port()?);
    let distributor_addr = format!("127.0.0.1:{distributor_port}");
    let kv_addr = format!("127.0.0.1:{kv_port}");
    let gateway_addr = format!("127.0.0.1:{gateway_port}");
    let mut distributor =
        Process::spawn("distributor", &bin_dir, &["--listen", &distributor_addr])?;
    wait_for_port(&distributor_addr).await?;
    let kv_text = format!("127.0.0.1:{kv_text_port}");
    let mut kv = Process::spawn(
        "kv-service",
        &bin_dir,
        &[
            "--listen",
            &kv_addr,
            "--text-listen",
            &kv_text,
            "--distributor",
            &distributor_addr,
            "--store",
            "mem",
        ],
    )?;
    let mut gateway = Process::spawn(
        "gateway",
        &bin_dir,
        &[
            "--listen",
            &gateway_addr,
            "--distributor",
            &distributor_addr,
        ],
    )?;
    wait_until_routed(&gateway_addr).await?;
    for process in [&mut distributor, &mut kv, &mut gateway] {
        process.check_running()?;
    }

    let client = PacketClient::connect(kv_addr.clone(), Dialect::Packet);
    tokio::time::timeout(Duration::from_secs(10), client.connected())
        .await
        .context("cannot connect to the kv-service")?;
    let value = "v".repeat(args.value_size);
    let stored = client
        .request(Packet::request(
            "PUT",
            "/kv",
            json!({"params": "bench", "value": value}),
        ))
        .await?;
    ensure!(stored.status() == 200, "storing the key failed: {stored:?}");
    let expected = gateway_get(&gateway_addr, "/kv/bench").await?;
    ensure!(
        expected["value"] == value.as_str(),
        "the gateway answers {expected}"
    );

    println!(
        "gateway-bench: GET of a {}-byte value, {} connections, {:?} per run ({:?} warm-up), {} cores",
        args.value_size,
        args.connections,
        args.duration,
        args.warmup,
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    baseline(&client, args.connections, args.warmup).await?;
    let before = CpuSample::take(&kv, &gateway);
    let direct = baseline(&client, args.connections, args.duration).await?;
    let direct_cpu = CpuSample::take(&kv, &gateway).since(before);
    drop(client);

    let url = format!("http://{gateway_addr}/kv/bench");
    wrk(&url, &args, args.warmup).await?;
    let before = CpuSample::take(&kv, &gateway);
    let through = wrk(&url, &args, args.duration).await?;
    let through_cpu = CpuSample::take(&kv, &gateway).since(before);
    for process in [&mut distributor, &mut kv, &mut gateway] {
        process.check_running()?;
    }

    let ratio = through.rate() / direct.rate();
    let added_p99_us = through.p99_us as i64 - direct.p99_us as i64;
    println!();
    println!("| path                              | requests/s | p50      | p99      | errors |");
    println!("|-----------------------------------|-----------:|---------:|---------:|-------:|");
    for (name, figures) in [
        ("direct (packet client → kv)", &direct),
        ("gateway (wrk HTTP → gateway → kv)", &through),
    ] {
        println!(
            "| {name:<33} | {:>10.0} | {:>5} µs | {:>5} µs | {:>6} |",
            figures.rate(),
            figures.p50_us,
            figures.p99_us,
            figures.errors
        );
    }
    println!();
    // Where the two cores went: wrk's own share is what is left of 2 × the run's length.
    println!(
        "CPU per request: direct: kv-service {:.1} µs, packet client {:.1} µs; \
         gateway path: kv-service {:.1} µs, gateway {:.1} µs (wrk not counted)",
        direct.cpu_per_request_us(direct_cpu.kv),
        direct.cpu_per_request_us(direct_cpu.bench),
        through.cpu_per_request_us(through_cpu.kv),
        through.cpu_per_request_us(through_cpu.gateway),
    );
    let throughput_ok = ratio >= 0.5;
    let latency_ok = added_p99_us < 1000;
    println!(
        "throughput ratio gateway/direct: {ratio:.2} (target >= 0.50: {})",
        verdict(throughput_ok)
    );
    println!(
        "p99 added by the gateway: {added_p99_us} µs (target < 1000 µs: {})",
        verdict(latency_ok)
    );
    ensure!(
        through.errors == 0 && direct.errors == 0,
        "requests failed during the runs"
    );
    if args.check {
        ensure!(throughput_ok && latency_ok, "a target was missed");
    }
    Ok(())
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

fn which_wrk() -> anyhow::Result<()> {
    let found = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join("wrk").is_file()))
        .unwrap_or(false);
    ensure!(found, "wrk is not installed (apt-get install wrk)");
    Ok(())
}

/// `connections` tasks each sending one request at a time on the shared client, for `duration`.
async fn baseline(
    client: &PacketClient,
    connections: usize,
    duration: Duration,
) -> anyhow::Result<Figures> {
    let started = Instant::now();
    let deadline = started + duration;
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let client = client.clone();
        let errors = errors.clone();
        workers.spawn(async move {
            let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
                .expect("valid histogram bounds");
            while Instant::now() < deadline {
                let request = Packet::request("GET", "/kv", json!({"params": "bench"}));
                let sent = Instant::now();
                match client.request(request).await {
                    Ok(answer) if answer.status() == 200 => {
                        let micros = sent.elapsed().as_micros() as u64;
                        histogram.saturating_record(micros.max(1));
                    }
                    _ => {
                        errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
            histogram
        });
    }
    let mut total = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    while let Some(histogram) = workers.join_next().await {
        total.add(histogram?)?;
    }
    let elapsed = started.elapsed();
    Ok(Figures {
        requests: total.len(),
        elapsed,
        p50_us: total.value_at_quantile(0.50),
        p99_us: total.value_at_quantile(0.99),
        errors: errors.load(std::sync::atomic::Ordering::Relaxed),
    })
}

/// wrk's own summary, printed by this script in one line the bench parses.
const WRK_SCRIPT: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d\n", summary.requests, summary.duration,
    e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"#;

async fn wrk(url: &str, args: &Args, duration: Duration) -> anyhow::Result<Figures> {
    let script = std::env::temp_dir().join(format!("gateway-bench-{}.lua", std::process::id()));
    std::fs::write(&script, WRK_SCRIPT)?;
    let seconds = duration.as_secs().max(1).to_string();
    let output = Command::new("wrk")
        .args([
            "-t",
            &args.threads.to_string(),
            "-c",
            &args.connections.to_string(),
            "-d",
            &format!("{seconds}s"),
            "-s",
            &script.to_string_lossy(),
            url,
        ])
        .kill_on_drop(true)
        .output()
        .await
        .context("running wrk")?;
    let _ = std::fs::remove_file(&script);
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "wrk failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|line| line.strip_prefix("RESULT "))
        .with_context(|| format!("no result from wrk: {stdout}"))?;
    let numbers: Vec<u64> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("unexpected wrk result {line:?}"))?;
    let [requests, duration_us, errors, p50_us, p99_us] = numbers[..] else {
        bail!("unexpected wrk result {line:?}");
    };
    Ok(Figures {
        requests,
        elapsed: Duration::from_micros(duration_us),
        p50_us,
        p99_us,
        errors,
    })
}

async fn wait_for_port(addr: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).await.is_err() {
        ensure!(Instant::now() < deadline, "nothing listens on {addr}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// `GET path` on the gateway with a minimal HTTP/1.1 client; the JSON body.
async fn gateway_get(addr: &str, path: &str) -> anyhow::Result<Value> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response)).await??;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("not an HTTP response: {text}"))?;
    ensure!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
    Ok(serde_json::from_str(body)?)
}

/// Waits until the gateway routes `GET/kv` to a connected node.
async fn wait_until_routed(gateway: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(topology) = gateway_get(gateway, "/_/topology").await {
            let routed = topology["routes"].as_array().is_some_and(|routes| {
                routes.iter().any(|route| {
                    route["url"] == "GET/kv"
                        && route["nodes"]
                            .as_array()
                            .is_some_and(|nodes| nodes.iter().any(|n| n["connected"] == true))
                })
            });
            if routed {
                return Ok(());
            }
        }
        ensure!(Instant::now() < deadline, "the gateway never routed GET/kv");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
