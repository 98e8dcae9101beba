//! Live figures for operators: what `msctl connections` and the status page's charts show.
//!
//! Prometheus metrics ([`crate::metrics`]) are totals meant for a scraper that keeps the history
//! itself. An operator looking at one gateway without a Prometheus wants the recent past from
//! the gateway directly, so this module keeps it, bounded:
//!
//! - per route, the last [`HISTORY_SECONDS`] seconds in one-second buckets: requests, errors
//!   (answers with a status of 500 or more) and a latency histogram per second, from which the
//!   99th percentile is read (`GET /_/history`);
//! - per node, what the gateway has sent it: requests in flight, requests answered, errors
//!   (a 5xx answer, a connection that closed before the answer, no answer in time), and the
//!   history of its connection state, when it dropped and came back (`GET /_/connections`);
//! - the gateway's own open HTTP connections, streams and requests in flight.
//!
//! Memory is bounded: routes are the registered urls (plus `none`), never raw paths, and a route
//! with no request for [`HISTORY_SECONDS`] is forgotten; nodes are those of the route table, and
//! at most [`MAX_DEPARTED_NODES`] nodes that left it are remembered, each with at most
//! [`MAX_NODE_CHANGES`] state changes.
//!
//! Connection state is sampled every [`SAMPLE_INTERVAL`] rather than observed on every change:
//! the node clients live in `shared`, and a drop and reconnect shorter than the interval is
//! of no interest on a five-minute chart anyway.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, RwLock,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    extract::{Request, State},
    response::{IntoResponse, Response},
    Json,
};
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    endpoints::refusal_unless_admin,
    routes::{Node, RouteTable},
    AppState,
};

/// How far back the per-route history goes, in one-second buckets.
pub const HISTORY_SECONDS: usize = 300;

/// How often the nodes' connection state is looked at.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(500);

/// Nodes that left the route table and are still reported, the most recently seen first.
pub const MAX_DEPARTED_NODES: usize = 64;

/// State changes kept per node.
pub const MAX_NODE_CHANGES: usize = 100;

/// Latency buckets per second: bucket `i` holds latencies up to 100 µs × √2^i, so 40 buckets
/// reach about 74 s and a percentile read from them is within a factor of √2.
const LATENCY_BUCKETS: usize = 40;

/// The upper bound of latency bucket `index`, in milliseconds.
fn bucket_bound_ms(index: usize) -> f64 {
    0.1 * std::f64::consts::SQRT_2.powi(index as i32)
}

fn bucket_of(elapsed: Duration) -> usize {
    let ratio = elapsed.as_secs_f64() / 0.0001;
    if ratio <= 1.0 {
        return 0;
    }
    ((ratio.log2() * 2.0).ceil() as usize).min(LATENCY_BUCKETS - 1)
}

fn unix_seconds(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// One second of one route.
#[derive(Clone)]
struct Second {
    /// The unix second this bucket holds; a bucket whose `at` is not the one asked for is empty.
    at: u64,
    requests: u32,
    errors: u32,
    latency: [u32; LATENCY_BUCKETS],
}

impl Second {
    const EMPTY: Second = Second {
        at: 0,
        requests: 0,
        errors: 0,
        latency: [0; LATENCY_BUCKETS],
    };

    /// The 99th percentile in milliseconds; `None` without requests.
    fn p99_ms(&self) -> Option<f64> {
        if self.requests == 0 {
            return None;
        }
        let rank = (u64::from(self.requests) * 99).div_ceil(100);
        let mut seen = 0u64;
        for (index, count) in self.latency.iter().enumerate() {
            seen += u64::from(*count);
            if seen >= rank {
                return Some(bucket_bound_ms(index));
            }
        }
        Some(bucket_bound_ms(LATENCY_BUCKETS - 1))
    }
}

/// A ring of [`HISTORY_SECONDS`] seconds, indexed by unix second.
struct RouteHistory {
    seconds: Vec<Second>,
    last: u64,
}

impl RouteHistory {
    fn new() -> RouteHistory {
        RouteHistory {
            seconds: vec![Second::EMPTY; HISTORY_SECONDS],
            last: 0,
        }
    }

    fn record(&mut self, now: u64, error: bool, elapsed: Duration) {
        let slot = &mut self.seconds[now as usize % HISTORY_SECONDS];
        if slot.at != now {
            *slot = Second {
                at: now,
                ..Second::EMPTY
            };
        }
        slot.requests += 1;
        slot.errors += u32::from(error);
        slot.latency[bucket_of(elapsed)] += 1;
        self.last = self.last.max(now);
    }

    /// The series of the [`HISTORY_SECONDS`] seconds ending with `now`, oldest first.
    fn series(&self, route: &str, now: u64) -> RouteSeries {
        let mut series = RouteSeries {
            route: route.to_owned(),
            requests: Vec::with_capacity(HISTORY_SECONDS),
            errors: Vec::with_capacity(HISTORY_SECONDS),
            p99_ms: Vec::with_capacity(HISTORY_SECONDS),
        };
        let start = now + 1 - HISTORY_SECONDS as u64;
        for at in start..=now {
            let slot = &self.seconds[at as usize % HISTORY_SECONDS];
            let second = if slot.at == at { slot } else { &Second::EMPTY };
            series.requests.push(second.requests);
            series.errors.push(second.errors);
            series.p99_ms.push(second.p99_ms());
        }
        series
    }
}

/// What the gateway has sent one node.
#[derive(Default)]
pub struct NodeCounters {
    in_flight: AtomicU64,
    requests: AtomicU64,
    errors: AtomicU64,
}

/// One node's connection state over time.
struct NodeRecord {
    name: String,
    counters: Arc<NodeCounters>,
    connected: bool,
    ready: bool,
    in_topology: bool,
    /// When it was last in the route table.
    seen: SystemTime,
    changes: VecDeque<StateChange>,
}

impl NodeRecord {
    /// A node not looked at yet: its first sample records its state as its first change.
    fn new(name: &str, at: SystemTime) -> NodeRecord {
        NodeRecord {
            name: name.to_owned(),
            counters: Arc::default(),
            connected: false,
            ready: true,
            in_topology: true,
            seen: at,
            changes: VecDeque::new(),
        }
    }

    /// Records that the connection is now `connected`, keeping the last [`MAX_NODE_CHANGES`].
    fn change(&mut self, at: SystemTime, connected: bool) {
        self.connected = connected;
        if self.changes.len() == MAX_NODE_CHANGES {
            self.changes.pop_front();
        }
        self.changes.push_back(StateChange {
            at: humantime::format_rfc3339_millis(at).to_string(),
            connected,
        });
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct StateChange {
    /// RFC 3339.
    pub at: String,
    pub connected: bool,
}

/// The figures one gateway keeps; shared by every request.
#[derive(Default)]
pub struct Figures {
    /// One lock per route, behind a map that is only written when a route appears or goes:
    /// requests of different routes never wait for each other.
    routes: RwLock<HashMap<Arc<str>, Mutex<RouteHistory>>>,
    nodes: RwLock<HashMap<String, NodeRecord>>,
    open_connections: Arc<AtomicUsize>,
}

impl Figures {
    /// Counts one finished request of `route`.
    pub fn record(&self, route: &Arc<str>, status: u16, elapsed: Duration) {
        let now = unix_seconds(SystemTime::now());
        let error = status >= 500;
        if let Some(history) = self.routes.read().unwrap().get(route) {
            history.lock().unwrap().record(now, error, elapsed);
            return;
        }
        self.routes
            .write()
            .unwrap()
            .entry(route.clone())
            .or_insert_with(|| Mutex::new(RouteHistory::new()))
            .get_mut()
            .unwrap()
            .record(now, error, elapsed);
    }

    /// Starts counting one request sent to `node`. The returned guard counts it as answered
    /// with [`NodeCall::answered`]; dropped otherwise (a timeout, the client gone), it counts as
    /// an error.
    pub fn node_call(&self, node: &Node) -> NodeCall {
        let known = self
            .nodes
            .read()
            .unwrap()
            .get(&node.addr)
            .map(|record| record.counters.clone());
        // A node the sampler has not looked at yet (the table just changed) gets its record now,
        // so no request goes uncounted; its connection state follows at the next sample.
        let counters = known.unwrap_or_else(|| {
            self.nodes
                .write()
                .unwrap()
                .entry(node.addr.clone())
                .or_insert_with(|| NodeRecord::new(&node.name, SystemTime::now()))
                .counters
                .clone()
        });
        counters.in_flight.fetch_add(1, Ordering::Relaxed);
        NodeCall {
            counters,
            outcome: Outcome::Pending,
        }
    }

    /// The counter of open HTTP connections, which the HTTP edge keeps.
    pub fn open_connections(&self) -> Arc<AtomicUsize> {
        self.open_connections.clone()
    }

    /// Looks at every node's connection now, and forgets what is past keeping.
    fn sample(&self, table: &RouteTable, at: SystemTime) {
        let mut nodes = self.nodes.write().unwrap();
        for record in nodes.values_mut() {
            record.in_topology = false;
        }
        for node in table.nodes() {
            let connected = node.is_connected();
            let record = nodes
                .entry(node.addr.clone())
                .or_insert_with(|| NodeRecord::new(&node.name, at));
            record.name.clone_from(&node.name);
            record.ready = node.ready;
            record.in_topology = true;
            record.seen = at;
            if record.connected != connected || record.changes.is_empty() {
                record.change(at, connected);
            }
        }
        // A node out of the table is disconnected as far as routing goes.
        for record in nodes.values_mut().filter(|record| !record.in_topology) {
            if record.connected {
                record.change(at, false);
            }
        }
        let mut departed: Vec<(SystemTime, String)> = nodes
            .iter()
            .filter(|(_, record)| !record.in_topology)
            .map(|(addr, record)| (record.seen, addr.clone()))
            .collect();
        if departed.len() > MAX_DEPARTED_NODES {
            departed.sort();
            for (_, addr) in &departed[..departed.len() - MAX_DEPARTED_NODES] {
                nodes.remove(addr);
            }
        }
        drop(nodes);
        let now = unix_seconds(at);
        self.routes
            .write()
            .unwrap()
            .retain(|_, history| history.get_mut().unwrap().last + HISTORY_SECONDS as u64 > now);
    }

    /// Samples the nodes of the current route table every [`SAMPLE_INTERVAL`] until `shutdown`.
    pub(crate) fn spawn_sampler(
        self: &Arc<Self>,
        routes: watch::Receiver<Arc<RouteTable>>,
        shutdown: CancellationToken,
    ) {
        let figures = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let table = routes.borrow().clone();
                figures.sample(&table, SystemTime::now());
            }
        });
    }

    fn nodes_report(&self) -> Vec<NodeReport> {
        let nodes = self.nodes.read().unwrap();
        let mut report: Vec<NodeReport> = nodes
            .iter()
            .map(|(addr, record)| NodeReport {
                addr: addr.clone(),
                name: record.name.clone(),
                connected: record.connected,
                ready: record.ready,
                in_topology: record.in_topology,
                in_flight: record.counters.in_flight.load(Ordering::Relaxed),
                requests: record.counters.requests.load(Ordering::Relaxed),
                errors: record.counters.errors.load(Ordering::Relaxed),
                since: record.changes.back().map(|change| change.at.clone()),
                history: record.changes.iter().cloned().collect(),
            })
            .collect();
        report.sort_by(|a, b| (&a.name, &a.addr).cmp(&(&b.name, &b.addr)));
        report
    }

    fn history_report(&self, now: u64) -> Vec<RouteSeries> {
        let routes = self.routes.read().unwrap();
        let mut report: Vec<RouteSeries> = routes
            .iter()
            .map(|(route, history)| history.lock().unwrap().series(route, now))
            .collect();
        report.sort_by(|a, b| a.route.cmp(&b.route));
        report
    }
}

enum Outcome {
    Pending,
    Answered {
        error: bool,
    },
    /// The request was never written (the connection had just dropped): not counted.
    NotSent,
}

/// One request to one node, counted while it waits and when it ends.
pub struct NodeCall {
    counters: Arc<NodeCounters>,
    outcome: Outcome,
}

impl NodeCall {
    /// The node answered with `status` (a stream that opened counts as 200), or the connection
    /// closed before it did (`None`).
    pub fn answered(mut self, status: Option<u16>) {
        self.outcome = Outcome::Answered {
            error: status.is_none_or(|status| status >= 500),
        };
    }

    /// The request was not sent to this node after all.
    pub fn not_sent(mut self) {
        self.outcome = Outcome::NotSent;
    }
}

impl Drop for NodeCall {
    fn drop(&mut self) {
        let counters = &self.counters;
        counters.in_flight.fetch_sub(1, Ordering::Relaxed);
        let error = match self.outcome {
            Outcome::NotSent => return,
            Outcome::Answered { error } => error,
            // Dropped while waiting: the request timed out or its client went away.
            Outcome::Pending => true,
        };
        counters.requests.fetch_add(1, Ordering::Relaxed);
        if error {
            counters.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One node in `GET /_/connections`.
#[derive(Debug, Serialize)]
pub struct NodeReport {
    pub addr: String,
    pub name: String,
    pub connected: bool,
    pub ready: bool,
    /// False for a node that has left the route table (kept for its history).
    pub in_topology: bool,
    pub in_flight: u64,
    pub requests: u64,
    pub errors: u64,
    /// When the connection state last changed (RFC 3339).
    pub since: Option<String>,
    /// Every change, oldest first, at most [`MAX_NODE_CHANGES`].
    pub history: Vec<StateChange>,
}

/// One route in `GET /_/history`: one value per second, oldest first.
#[derive(Debug, Serialize)]
pub struct RouteSeries {
    pub route: String,
    pub requests: Vec<u32>,
    pub errors: Vec<u32>,
    /// The second's 99th percentile latency in milliseconds; `null` for a second without
    /// requests.
    pub p99_ms: Vec<Option<f64>>,
}

/// `GET /_/connections`: the gateway's HTTP side and every node's figures and state history.
pub(crate) async fn connections(State(state): State<Arc<AppState>>, request: Request) -> Response {
    if let Some(refused) = refusal_unless_admin(&state, &request) {
        return refused;
    }
    Json(serde_json::json!({
        "http": {
            "open_connections": state.figures.open_connections.load(Ordering::Relaxed),
            "open_streams": state.metrics.open_streams(),
            "in_flight": state.metrics.requests_in_flight(),
        },
        "nodes": state.figures.nodes_report(),
    }))
    .into_response()
}

/// `GET /_/history`: per route, the last five minutes in one-second buckets.
pub(crate) async fn history(State(state): State<Arc<AppState>>, request: Request) -> Response {
    if let Some(refused) = refusal_unless_admin(&state, &request) {
        return refused;
    }
    let now = unix_seconds(SystemTime::now());
    Json(serde_json::json!({
        "end": now,
        "seconds": HISTORY_SECONDS,
        "routes": state.figures.history_report(now),
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_grow_by_a_factor_of_root_two() {
        assert_eq!(bucket_of(Duration::from_micros(50)), 0);
        assert_eq!(bucket_of(Duration::from_micros(100)), 0);
        assert_eq!(bucket_of(Duration::from_micros(141)), 1);
        assert_eq!(bucket_of(Duration::from_micros(200)), 2);
        assert_eq!(bucket_of(Duration::from_secs(3600)), LATENCY_BUCKETS - 1);
        let ms = Duration::from_millis(10);
        assert!(bucket_bound_ms(bucket_of(ms)) >= 10.0);
        assert!(bucket_bound_ms(bucket_of(ms)) < 10.0 * std::f64::consts::SQRT_2 + 1e-9);
    }

    #[test]
    fn a_second_reports_its_requests_errors_and_p99() {
        let mut history = RouteHistory::new();
        for _ in 0..99 {
            history.record(1000, false, Duration::from_micros(100));
        }
        history.record(1000, true, Duration::from_millis(50));
        history.record(1002, false, Duration::from_millis(1));
        let series = history.series("GET/kv", 1002);
        assert_eq!(series.requests.len(), HISTORY_SECONDS);
        let n = HISTORY_SECONDS;
        assert_eq!(&series.requests[n - 3..], [100, 0, 1]);
        assert_eq!(&series.errors[n - 3..], [1, 0, 0]);
        // 99 of 100 at 100 µs: the 99th percentile is in the first bucket.
        assert_eq!(series.p99_ms[n - 3], Some(0.1));
        assert_eq!(series.p99_ms[n - 2], None);
        assert!(series.p99_ms[n - 1].unwrap() >= 1.0);
    }

    #[test]
    fn seconds_older_than_the_history_are_not_reported() {
        let mut history = RouteHistory::new();
        history.record(1000, false, Duration::from_millis(1));
        // The same slot, one lap later: the old second is replaced, not added to.
        history.record(
            1000 + HISTORY_SECONDS as u64,
            false,
            Duration::from_millis(1),
        );
        let series = history.series("GET/kv", 1000 + HISTORY_SECONDS as u64);
        assert_eq!(series.requests.iter().sum::<u32>(), 1);
        let later = history.series("GET/kv", 1000 + 2 * HISTORY_SECONDS as u64);
        assert_eq!(later.requests.iter().sum::<u32>(), 0);
    }

    #[tokio::test]
    async fn a_node_call_counts_answers_errors_and_timeouts() {
        let figures = Figures::default();
        // Port 9 (discard) on loopback: nothing listens, nothing is sent.
        let node = Node {
            addr: "127.0.0.1:9".into(),
            name: "kv".into(),
            dialect: shared::Dialect::Packet,
            urls: vec!["GET/kv".into()],
            scopes: Default::default(),
            leaving: false,
            ready: true,
            client: crate::routes::NodeClient::connect_as("127.0.0.1:9", shared::Dialect::Packet),
        };
        // Counted from the first request, before any sample saw the node.
        let call = figures.node_call(&node);
        let counters = figures.nodes.read().unwrap()["127.0.0.1:9"]
            .counters
            .clone();
        assert_eq!(counters.in_flight.load(Ordering::Relaxed), 1);
        call.answered(Some(200));
        figures.node_call(&node).answered(Some(503));
        figures.node_call(&node).answered(None);
        figures.node_call(&node).not_sent();
        drop(figures.node_call(&node));
        assert_eq!(counters.in_flight.load(Ordering::Relaxed), 0);
        assert_eq!(counters.requests.load(Ordering::Relaxed), 4);
        assert_eq!(counters.errors.load(Ordering::Relaxed), 3);
        let report = figures.nodes_report();
        assert_eq!(report[0].requests, 4);
        assert_eq!(report[0].name, "kv");
    }

    #[test]
    fn routes_are_reported_and_forgotten_after_five_idle_minutes() {
        let figures = Figures::default();
        let route: Arc<str> = "GET/kv".into();
        figures.record(&route, 200, Duration::from_millis(2));
        figures.record(&route, 503, Duration::from_millis(2));
        let now = SystemTime::now();
        let report = figures.history_report(unix_seconds(now));
        assert_eq!(report.len(), 1);
        assert_eq!(report[0].requests.iter().sum::<u32>(), 2);
        assert_eq!(report[0].errors.iter().sum::<u32>(), 1);
        let table = RouteTable::default();
        figures.sample(&table, now + Duration::from_secs(60));
        assert_eq!(figures.history_report(unix_seconds(now)).len(), 1);
        figures.sample(
            &table,
            now + Duration::from_secs(HISTORY_SECONDS as u64 + 1),
        );
        assert!(figures.history_report(unix_seconds(now)).is_empty());
    }
}
