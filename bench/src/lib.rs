//! Load tools for the workspace's binaries, each measured next to what a user would run
//! instead (redis, nginx, HAProxy) on the same machine in the same run.
//!
//! The binaries live in `src/bin/`; they start their processes with the end-to-end harness of
//! the `e2e` crate, so a benchmark brings a stack up the way the tests do. Build them with the
//! binaries they start: `cargo build --release -p distributor -p gateway -p kv-service
//! -p notice-service -p bench`. docs/BENCHMARKS.md has the figures and the commands.

use std::path::PathBuf;

use e2e::{StackOptions, Storage};

/// A stack as the benchmarks run it: no cluster secret (every process in protected mode, on
/// loopback, as a single machine runs without one), and the distributor's own heartbeat
/// defaults, so that a node busy under load is not evicted sooner than in a real deployment.
pub fn stack_options(
    kv_replicas: usize,
    notice: bool,
    storage: Storage,
    bin_dir: Option<PathBuf>,
) -> StackOptions {
    StackOptions {
        kv_replicas,
        notice,
        storage,
        heartbeat: (
            std::time::Duration::from_secs(3),
            std::time::Duration::from_secs(10),
        ),
        auth: false,
        bin_dir,
        extra_flags: Default::default(),
    }
}

/// A histogram of latencies in microseconds, from 1 µs to one minute at three significant
/// digits: the resolution kv-bench and gateway-bench both record at, so their figures compare.
pub fn microsecond_histogram() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant bounds are valid")
}

/// The cores this machine offers (0 when unknown), printed in each benchmark's heading because
/// every figure depends on it.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(0, usize::from)
}

/// A histogram of latencies in nanoseconds, from 1 ns to one minute at three significant
/// digits: the resolution the fan-out benchmarks (notice-bench, kv-bench's watch) record at.
pub fn nanosecond_histogram() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::new_with_bounds(1, 60_000_000_000, 3)
        .expect("constant bounds are valid")
}

/// The 1-minute load average: the machine is shared, so every result carries it.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// A report's heading (`## title`) and the head of its two-column markdown table.
pub fn print_table_heading(title: &str) {
    println!("## {title}");
    println!();
    println!("| measure | value |");
    println!("| --- | --- |");
}

/// The markdown table row of the load average at a run's start (`at_start`, from
/// [`load_average`]) and now.
pub fn print_load_row(at_start: &str) {
    println!(
        "| load average (1 min) at start / end | {at_start} / {} |",
        load_average()
    );
}

/// Nanoseconds as milliseconds.
pub fn ms(nanos: u64) -> f64 {
    nanos as f64 / 1e6
}

/// One markdown table row of latencies recorded in nanoseconds; `measure` says from what to
/// what ("paced: publish-to-delivery").
pub fn print_latency_row(measure: &str, latency: &hdrhistogram::Histogram<u64>) {
    println!(
        "| {measure} latency | p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms |",
        ms(latency.value_at_quantile(0.5)),
        ms(latency.value_at_quantile(0.99)),
        ms(latency.max())
    );
}
