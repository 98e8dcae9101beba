//! Measures what the gateway hop costs, next to the proxies a user would put there instead.
//!
//! Starts the real binaries on loopback (distributor, kv-service on the in-memory store,
//! gateway), stores one key, then measures in one run, one after the other on the same machine:
//! - direct: the same request as a packet straight to the kv-service, N requests in flight on
//!   one multiplexed packet client (as the gateway itself talks to the node), timed here with an
//!   HDR histogram;
//! - gateway: `GET /kv/hello` over HTTP with `wrk` at N connections, through the gateway to the
//!   kv-service;
//! - the peers, when Debian's `nginx` and `haproxy` are installed: an nginx backend answering
//!   the gateway's exact response body from its configuration, that backend straight (the floor
//!   of an HTTP request with no hop), nginx as a reverse proxy to it (upstream keep-alive), and
//!   HAProxy to it (`http-reuse always`). Their configurations are written to a temporary
//!   directory and they listen on free loopback ports; nothing is installed.
//!
//! For each it prints requests/s, p50 and p99 (wrk's own percentiles for the HTTP rows), and
//! the CPU time the server processes used per request (user + system time from /proc over the
//! measured run: gateway + kv-service, nginx proxy + backend, HAProxy + backend), then the
//! gateway's ratios to each peer. The binaries are taken from the directory of this one, so
//! build them together:
//! `cargo build --release -p distributor -p kv-service -p gateway -p bench`.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context};
use clap::Parser;
use e2e::{free_port, Process, Stack, Storage};
use nix::sys::signal::Signal;
use serde_json::json;
use shared::{Dialect, Packet, PacketClient};
use tokio::process::Command;

/// What to install when a tool is missing.
const INSTALL_HINT: &str = "apt-get install nginx-light haproxy wrk";

/// The key every run reads.
const KEY: &str = "hello";

#[derive(Debug, Parser)]
#[command(
    about = "Gateway throughput and latency against a direct packet client, nginx and HAProxy"
)]
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
    #[arg(long, env = "BENCH_THREADS", default_value_t = 1)]
    threads: usize,
    /// Size of the stored value, in bytes.
    #[arg(long, env = "BENCH_VALUE_SIZE", default_value_t = 100)]
    value_size: usize,
    /// Where the distributor, kv-service and gateway binaries are (default: next to this one).
    #[arg(long, env = "BENCH_BIN_DIR")]
    bin_dir: Option<PathBuf>,
    /// Skip nginx and HAProxy.
    #[arg(long, env = "BENCH_NO_PEERS")]
    no_peers: bool,
    /// Exit non-zero when a target is missed: throughput >= half the direct baseline, p99 added
    /// < 1 ms, and, when the peers ran, >= 1.3x the faster proxy's requests/s with a lower p99
    /// and no more CPU per request than either.
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

/// A process's parent and the CPU time (user + system, in clock ticks) it has used so far, from
/// the text of /proc/PID/stat.
fn parse_stat(stat: &str) -> Option<(u32, u64)> {
    // The command name (field 2) may hold spaces; the fields after its closing parenthesis are
    // plain: the parent is the 4th field of the line, utime and stime the 14th and 15th.
    let (_, fields) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = fields.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some((u32::try_from(field(4)?).ok()?, field(14)? + field(15)?))
}

/// CPU ticks this benchmark has used so far.
fn own_cpu_ticks() -> u64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| parse_stat(&stat))
        .map_or(0, |(_, ticks)| ticks)
}

/// CPU ticks used so far by each process of `roots` and all their descendants (nginx's workers
/// are children of its master), read from every /proc/PID/stat.
fn tree_cpu_ticks(roots: &[u32]) -> u64 {
    let mut processes: HashMap<u32, (u32, u64)> = HashMap::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(parsed) = std::fs::read_to_string(entry.path().join("stat"))
                .ok()
                .and_then(|stat| parse_stat(&stat))
            {
                processes.insert(pid, parsed);
            }
        }
    }
    let mut total = 0;
    let mut pending: Vec<u32> = roots.to_vec();
    while let Some(pid) = pending.pop() {
        total += processes.get(&pid).map_or(0, |(_, ticks)| *ticks);
        pending.extend(
            processes
                .iter()
                .filter(|(_, (parent, _))| *parent == pid)
                .map(|(child, _)| *child),
        );
    }
    total
}

fn pid_of(process: &Process) -> u32 {
    process.pid().as_raw() as u32
}

/// An HTTP server under test, with the processes whose CPU time counts for it.
struct Target {
    name: &'static str,
    url: String,
    pids: Vec<u32>,
}

/// One row of the results.
struct Row {
    name: &'static str,
    figures: Figures,
    /// Server CPU per request, in µs: all of the target's processes.
    cpu_us: f64,
    /// The same, for each of the target's `pids` in turn.
    cpu_us_by_process: Vec<f64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.connections > 0, "--connections must be at least 1");
    ensure!(
        find_tool("wrk").is_some(),
        "wrk is not installed ({INSTALL_HINT})"
    );

    let mut stack = start_stack(&args).await;
    let kv_addr = format!("127.0.0.1:{}", stack.kv[0].port);
    let client = PacketClient::connect(kv_addr, Dialect::Packet);
    let body = store_key(&stack, &client, args.value_size).await?;
    let dir = tempfile::tempdir()?;
    let peers = if args.no_peers {
        Peers::default()
    } else {
        Peers::start(dir.path(), &body, &stack.http).await?
    };

    print_heading(&args);
    let results = measure_all(&args, &stack, client, &peers).await?;
    stack.distributor.check_running()?;
    stack.kv[0].process.check_running()?;
    stack.gateway.check_running()?;
    peers.stop().await;
    report(&args, &results)
}

/// The settings every figure depends on, before the runs.
fn print_heading(args: &Args) {
    println!(
        "gateway-bench: GET of a {}-byte value, {} connections, wrk -t{}, {:?} per run \
         ({:?} warm-up), {} cores",
        args.value_size,
        args.connections,
        args.threads,
        args.duration,
        args.warmup,
        bench::cores()
    );
}

/// Every row of a run, measured one after the other.
struct Results {
    direct: Row,
    /// The benchmark's own packet client's CPU per request in the direct run.
    client_cpu_us: f64,
    gateway: Row,
    peers: Vec<Row>,
}

/// The direct baseline (the packet client is closed after it, so it does not hold a connection
/// to kv-service during the HTTP runs), then the gateway, then each peer.
async fn measure_all(
    args: &Args,
    stack: &Stack,
    client: PacketClient,
    peers: &Peers,
) -> anyhow::Result<Results> {
    let (kv_pid, gateway_pid) = (pid_of(&stack.kv[0].process), pid_of(&stack.gateway));
    let (direct, client_cpu_us) = measure_direct(&client, args, kv_pid).await?;
    drop(client);
    let gateway_target = Target {
        name: "gateway (wrk HTTP → gateway → kv)",
        url: stack.url(&format!("/kv/{KEY}")),
        pids: vec![gateway_pid, kv_pid],
    };
    let gateway = measure(&gateway_target, args).await?;
    let mut peer_rows = Vec::new();
    for target in &peers.targets {
        peer_rows.push(measure(target, args).await?);
    }
    Ok(Results {
        direct,
        client_cpu_us,
        gateway,
        peers: peer_rows,
    })
}

/// Prints the table and the verdicts; fails when a request failed, or with `--check` when a
/// target was missed.
fn report(args: &Args, results: &Results) -> anyhow::Result<()> {
    let Results {
        direct,
        client_cpu_us,
        gateway,
        peers,
    } = results;
    print_table(direct, gateway, peers, *client_cpu_us);
    let targets_met = print_verdicts(direct, gateway, peers);
    let failed = [direct, gateway]
        .into_iter()
        .chain(peers)
        .any(|row| row.figures.errors > 0);
    ensure!(!failed, "requests failed during the runs");
    if args.check {
        ensure!(targets_met, "a target was missed");
    }
    Ok(())
}

/// The direct baseline after its warm-up, with kv-service's CPU per request, and the
/// benchmark's own (its packet client's) CPU per request.
async fn measure_direct(
    client: &PacketClient,
    args: &Args,
    kv_pid: u32,
) -> anyhow::Result<(Row, f64)> {
    baseline(client, args.connections, args.warmup).await?;
    let (kv_before, bench_before) = (tree_cpu_ticks(&[kv_pid]), own_cpu_ticks());
    let figures = baseline(client, args.connections, args.duration).await?;
    let kv_us = figures.cpu_per_request_us(tree_cpu_ticks(&[kv_pid]) - kv_before);
    let client_us = figures.cpu_per_request_us(own_cpu_ticks() - bench_before);
    let row = Row {
        name: "direct (packet client → kv)",
        cpu_us: kv_us,
        cpu_us_by_process: vec![kv_us],
        figures,
    };
    Ok((row, client_us))
}

fn print_table(direct: &Row, gateway: &Row, peers: &[Row], client_cpu_us: f64) {
    println!();
    println!(
        "| path                              | requests/s | p50      | p99      | errors | server CPU/request |"
    );
    println!(
        "|-----------------------------------|-----------:|---------:|---------:|-------:|-------------------:|"
    );
    for row in [direct, gateway].into_iter().chain(peers) {
        println!(
            "| {:<33} | {:>10.0} | {:>5} µs | {:>5} µs | {:>6} | {:>13.1} µs |",
            row.name,
            row.figures.rate(),
            row.figures.p50_us,
            row.figures.p99_us,
            row.figures.errors,
            row.cpu_us,
        );
    }
    println!();
    // The gateway target's processes are the gateway, then kv-service.
    println!(
        "CPU per request: direct: kv-service {:.1} µs, packet client {:.1} µs; \
         gateway path: kv-service {:.1} µs, gateway {:.1} µs (wrk not counted)",
        direct.cpu_us, client_cpu_us, gateway.cpu_us_by_process[1], gateway.cpu_us_by_process[0],
    );
}

/// Prints the ratios and whether each target is met; true when all are.
fn print_verdicts(direct: &Row, gateway: &Row, peers: &[Row]) -> bool {
    let ratio = gateway.figures.rate() / direct.figures.rate();
    let added_p99_us = gateway.figures.p99_us as i64 - direct.figures.p99_us as i64;
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
    let hop_ok = compare_with_peers(gateway, peers);
    throughput_ok && latency_ok && hop_ok.unwrap_or(true)
}

/// Distributor, one kv-service on the memory store and the gateway, routed.
async fn start_stack(args: &Args) -> Stack {
    let options = bench::stack_options(1, false, Storage::Memory, args.bin_dir.clone());
    Stack::start(options).await
}

/// Stores the benchmark's key and returns the body the gateway answers for it, the exact
/// bytes the nginx backend will answer with.
async fn store_key(
    stack: &Stack,
    client: &PacketClient,
    value_size: usize,
) -> anyhow::Result<String> {
    tokio::time::timeout(Duration::from_secs(10), client.connected())
        .await
        .context("cannot connect to the kv-service")?;
    let value = "v".repeat(value_size);
    let stored = client
        .request(Packet::request(
            "PUT",
            "/kv",
            json!({"params": KEY, "value": value}),
        ))
        .await?;
    ensure!(stored.status() == 200, "storing the key failed: {stored:?}");
    let response = stack
        .http
        .get(stack.url(&format!("/kv/{KEY}")))
        .send()
        .await?;
    ensure!(
        response.status().is_success(),
        "GET /kv/{KEY} through the gateway: {}",
        response.status()
    );
    let body = response.text().await?;
    let answer: serde_json::Value = serde_json::from_str(&body)?;
    ensure!(
        answer["value"] == value.as_str(),
        "the gateway answers {body}"
    );
    Ok(body)
}

/// Prints the gateway's ratios to each peer and whether the hop target is met; `None` when
/// neither proxy ran.
fn compare_with_peers(gateway: &Row, peers: &[Row]) -> Option<bool> {
    if peers.is_empty() {
        return None;
    }
    for peer in peers {
        println!(
            "gateway / {}: requests/s {:.2}x, p99 {:.2}x, server CPU per request {:.2}x",
            peer.name,
            gateway.figures.rate() / peer.figures.rate(),
            gateway.figures.p99_us as f64 / peer.figures.p99_us.max(1) as f64,
            gateway.cpu_us / peer.cpu_us,
        );
    }
    let proxies: Vec<&Row> = peers
        .iter()
        .filter(|peer| peer.name != NGINX_DIRECT)
        .collect();
    let fastest = proxies
        .iter()
        .max_by(|a, b| a.figures.rate().total_cmp(&b.figures.rate()))?;
    let met = gateway.figures.rate() >= 1.3 * fastest.figures.rate()
        && proxies
            .iter()
            .all(|proxy| gateway.figures.p99_us < proxy.figures.p99_us)
        && proxies.iter().all(|proxy| gateway.cpu_us <= proxy.cpu_us);
    println!(
        "hop target (>= 1.30x the requests/s of the faster proxy, {}; a lower p99 and no more \
         CPU per request than each proxy): {}",
        fastest.name,
        verdict(met)
    );
    Some(met)
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

/// `name` in `PATH`, or in the sbin directories where Debian puts daemons (absent from a
/// normal user's `PATH`).
fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

const NGINX_DIRECT: &str = "nginx direct (no hop)";
const NGINX_PROXY: &str = "nginx proxy → nginx backend";
const HAPROXY: &str = "HAProxy → nginx backend";

/// The peers that are installed, started; each stopped with SIGTERM at the end.
#[derive(Default)]
struct Peers {
    processes: Vec<Process>,
    ports: Vec<u16>,
    targets: Vec<Target>,
}

impl Peers {
    async fn start(dir: &Path, body: &str, http: &reqwest::Client) -> anyhow::Result<Peers> {
        let mut peers = Peers::default();
        let Some(nginx) = find_tool("nginx") else {
            println!("nginx is not installed: no peers ({INSTALL_HINT})");
            return Ok(peers);
        };
        let backend_port = free_port();
        let backend_conf = nginx_backend_conf(dir, backend_port, body)?;
        let backend = peers.add_nginx(dir, "backend", &nginx, &backend_conf, backend_port)?;
        peers.add_target(NGINX_DIRECT, backend_port, vec![backend]);
        let proxy_port = free_port();
        let proxy_conf = nginx_proxy_conf(dir, proxy_port, backend_port);
        let proxy = peers.add_nginx(dir, "proxy", &nginx, &proxy_conf, proxy_port)?;
        peers.add_target(NGINX_PROXY, proxy_port, vec![proxy, backend]);
        match find_tool("haproxy") {
            Some(haproxy) => {
                let haproxy_port = free_port();
                let pid = peers.add_haproxy(dir, haproxy, haproxy_port, backend_port)?;
                peers.add_target(HAPROXY, haproxy_port, vec![pid, backend]);
            }
            None => println!("haproxy is not installed: no HAProxy row ({INSTALL_HINT})"),
        }
        peers.wait_until_answering(body, http).await?;
        Ok(peers)
    }

    /// Starts one nginx (`name` tells its files apart) on `config`, which listens on `port`;
    /// returns its master's pid.
    fn add_nginx(
        &mut self,
        dir: &Path,
        name: &str,
        nginx: &Path,
        config: &str,
        port: u16,
    ) -> anyhow::Result<u32> {
        let args = nginx_args(dir, name, config)?;
        self.add(&format!("nginx-{name}"), nginx.to_path_buf(), args, port)
    }

    /// Starts HAProxy on `port` in front of the nginx backend; returns its pid.
    fn add_haproxy(
        &mut self,
        dir: &Path,
        haproxy: PathBuf,
        port: u16,
        backend_port: u16,
    ) -> anyhow::Result<u32> {
        let config = dir.join("haproxy.cfg");
        std::fs::write(&config, haproxy_conf(port, backend_port))?;
        let args = ["-db", "-f"]
            .map(String::from)
            .into_iter()
            .chain([config.display().to_string()])
            .collect::<Vec<_>>();
        self.add("haproxy", haproxy, args, port)
    }

    /// A row measured against the key's URL on `port`, charged with the CPU of `pids`.
    fn add_target(&mut self, name: &'static str, port: u16, pids: Vec<u32>) {
        self.targets.push(Target {
            name,
            url: format!("http://127.0.0.1:{port}/kv/{KEY}"),
            pids,
        });
    }

    /// Waits until every server listens, then checks that each target answers the gateway's
    /// exact body, so every row measures the same response.
    async fn wait_until_answering(
        &mut self,
        body: &str,
        http: &reqwest::Client,
    ) -> anyhow::Result<()> {
        for (process, port) in self.processes.iter_mut().zip(&self.ports) {
            process.wait_for_port(*port).await?;
        }
        for target in &self.targets {
            let answer = http.get(&target.url).send().await?.text().await?;
            ensure!(
                answer == body,
                "{} answers {answer:?}, not the gateway's body",
                target.name
            );
        }
        Ok(())
    }

    /// Starts one server, which will listen on `port`, and returns its pid.
    fn add(
        &mut self,
        name: &str,
        program: PathBuf,
        args: Vec<String>,
        port: u16,
    ) -> anyhow::Result<u32> {
        let process = Process::start(name, program, &args)?;
        let pid = pid_of(&process);
        self.processes.push(process);
        self.ports.push(port);
        Ok(pid)
    }

    /// SIGTERM and a wait for each: a killed nginx master would leave its workers behind.
    async fn stop(mut self) {
        for process in &mut self.processes {
            if let Err(err) = process.terminate().await {
                eprintln!("stopping {}: {err:#}", process.name);
            }
        }
        self.processes.clear();
    }
}

impl Drop for Peers {
    /// On an early return, ask each server to stop (nginx's master takes its workers with it)
    /// before the processes are dropped and killed.
    fn drop(&mut self) {
        for process in &mut self.processes {
            if process.check_running().is_ok() {
                process.signal(Signal::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline
            && self
                .processes
                .iter_mut()
                .any(|process| process.check_running().is_ok())
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The command line that runs nginx in the foreground on `config`, with `dir` as its prefix.
fn nginx_args(dir: &Path, name: &str, config: &str) -> anyhow::Result<Vec<String>> {
    let path = dir.join(format!("nginx-{name}.conf"));
    std::fs::write(&path, config)?;
    Ok(vec![
        "-p".into(),
        dir.display().to_string(),
        "-c".into(),
        path.display().to_string(),
    ])
}

/// What every nginx of the run shares: in the foreground, one worker per core, every file in
/// `dir`, no access log (the gateway writes none either), and client connections kept open
/// for the whole run (nginx closes one after 1,000 requests by default, and wrk would count the
/// reconnections).
fn nginx_conf(dir: &Path, name: &str, http: &str) -> String {
    let dir = dir.display();
    format!(
        "daemon off;\n\
         worker_processes auto;\n\
         pid {dir}/nginx-{name}.pid;\n\
         error_log {dir}/nginx-{name}-error.log warn;\n\
         events {{ worker_connections 1024; }}\n\
         http {{\n\
         \x20   access_log off;\n\
         \x20   keepalive_requests 1000000;\n\
         \x20   client_body_temp_path {dir}/nginx-{name}-body;\n\
         \x20   proxy_temp_path {dir}/nginx-{name}-proxy;\n\
         \x20   fastcgi_temp_path {dir}/nginx-{name}-fastcgi;\n\
         \x20   uwsgi_temp_path {dir}/nginx-{name}-uwsgi;\n\
         \x20   scgi_temp_path {dir}/nginx-{name}-scgi;\n\
         {http}\
         }}\n"
    )
}

/// The backend: the gateway's response body, answered from the configuration.
fn nginx_backend_conf(dir: &Path, port: u16, body: &str) -> anyhow::Result<String> {
    // nginx would read `$` in the text as a variable; the body is JSON of a value made here.
    ensure!(!body.contains('$'), "the body holds a `$`: {body}");
    let quoted = body.replace('\\', "\\\\").replace('\'', "\\'");
    Ok(nginx_conf(
        dir,
        "backend",
        &format!(
            "    server {{\n\
             \x20       listen 127.0.0.1:{port};\n\
             \x20       location / {{\n\
             \x20           default_type application/json;\n\
             \x20           return 200 '{quoted}';\n\
             \x20       }}\n\
             \x20   }}\n"
        ),
    ))
}

/// The reverse proxy, keeping its connections to the backend open (HTTP/1.1 upstream
/// keep-alive, as nginx's documentation sets it up).
fn nginx_proxy_conf(dir: &Path, port: u16, backend_port: u16) -> String {
    nginx_conf(
        dir,
        "proxy",
        &format!(
            "    upstream backend {{\n\
             \x20       server 127.0.0.1:{backend_port};\n\
             \x20       keepalive 64;\n\
             \x20       keepalive_requests 1000000;\n\
             \x20   }}\n\
             \x20   server {{\n\
             \x20       listen 127.0.0.1:{port};\n\
             \x20       location / {{\n\
             \x20           proxy_pass http://backend;\n\
             \x20           proxy_http_version 1.1;\n\
             \x20           proxy_set_header Connection \"\";\n\
             \x20       }}\n\
             \x20   }}\n"
        ),
    )
}

/// HAProxy in HTTP mode, one thread per core (its default), sharing idle backend connections
/// between clients (`http-reuse always`), without logs. `maxconn` is far above the run's
/// connections but low enough that HAProxy can reserve its descriptors (two per connection)
/// under a common limit of open files.
fn haproxy_conf(port: u16, backend_port: u16) -> String {
    format!(
        "global\n\
         \x20   maxconn 1000\n\
         defaults\n\
         \x20   mode http\n\
         \x20   timeout connect 5s\n\
         \x20   timeout client 60s\n\
         \x20   timeout server 60s\n\
         \x20   http-reuse always\n\
         frontend bench\n\
         \x20   bind 127.0.0.1:{port}\n\
         \x20   default_backend nginx\n\
         backend nginx\n\
         \x20   server backend 127.0.0.1:{backend_port}\n"
    )
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
            let mut histogram = bench::microsecond_histogram();
            while Instant::now() < deadline {
                let request = Packet::request("GET", "/kv", json!({"params": KEY}));
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
    let mut total = bench::microsecond_histogram();
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

/// A warm-up, then a measured wrk run against `target`, with the CPU its processes used.
async fn measure(target: &Target, args: &Args) -> anyhow::Result<Row> {
    let sample = || -> Vec<u64> {
        target
            .pids
            .iter()
            .map(|pid| tree_cpu_ticks(&[*pid]))
            .collect()
    };
    wrk(&target.url, args, args.warmup).await?;
    let before = sample();
    let figures = wrk(&target.url, args, args.duration).await?;
    let ticks: Vec<u64> = sample()
        .into_iter()
        .zip(before)
        .map(|(after, before)| after.saturating_sub(before))
        .collect();
    Ok(Row {
        name: target.name,
        cpu_us: figures.cpu_per_request_us(ticks.iter().sum()),
        cpu_us_by_process: ticks
            .iter()
            .map(|ticks| figures.cpu_per_request_us(*ticks))
            .collect(),
        figures,
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
            "--latency",
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
