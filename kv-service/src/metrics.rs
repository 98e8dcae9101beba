//! kv-service's metrics, in the process-wide registry that `--metrics-listen` serves
//! (`shared::metrics`):
//!
//! - `kv_operations_total{op,store,outcome}`: store operations (`get`, `put`, `delete`, `list`,
//!   `write_batch`) per store (`mem`, `sqlite`, `postgres`), `ok` or `error` (the store failed;
//!   a conflict or a missing key is `ok`).
//! - `kv_operation_duration_seconds{op,store}`: how long each took in the store.

use std::{
    future::Future,
    sync::OnceLock,
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        histogram::{exponential_buckets, Histogram},
    },
};

use shared::metrics::registered;

use crate::store::KvBackend;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    op: &'static str,
    store: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    op: &'static str,
    store: &'static str,
}

struct Metrics {
    operations: Family<OperationLabels, Counter>,
    latency: Family<LatencyLabels, Histogram, fn() -> Histogram>,
}

fn latency_histogram() -> Histogram {
    // 10 µs to about 5 s: an in-memory get is microseconds, a PostgreSQL write milliseconds.
    Histogram::new(exponential_buckets(0.00001, 2.0, 20))
}

fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| Metrics {
        operations: registered(
            "kv_operations",
            "Store operations by operation, store and outcome",
            Family::default(),
        ),
        latency: registered(
            "kv_operation_duration_seconds",
            "Time a store operation took",
            Family::new_with_constructor(latency_histogram),
        ),
    })
}

/// The `store` label of a backend.
pub(crate) fn store_label(backend: &KvBackend) -> &'static str {
    match backend {
        KvBackend::Memory(_) => "mem",
        KvBackend::Sqlite(_) => "sqlite",
        KvBackend::Postgres(_) => "postgres",
    }
}

/// Runs the store operation `op` and counts it, with how long it took.
pub(crate) async fn timed<T, E>(
    store: &'static str,
    op: &'static str,
    operation: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let started = Instant::now();
    let result = operation.await;
    record(store, op, result.is_ok(), started.elapsed());
    result
}

/// Counts one store operation that took `elapsed`.
pub(crate) fn record(store: &'static str, op: &'static str, ok: bool, elapsed: Duration) {
    let metrics = metrics();
    let outcome = if ok { "ok" } else { "error" };
    metrics
        .operations
        .get_or_create(&OperationLabels { op, store, outcome })
        .inc();
    metrics
        .latency
        .get_or_create(&LatencyLabels { op, store })
        .observe(elapsed.as_secs_f64());
}
