//! The gateway's metrics, served by `GET /metrics` in the Prometheus (OpenMetrics) text format.
//!
//! - `gateway_requests_total{route,status}`: proxied requests by route (the registered url, e.g.
//!   `GET/kv`, or `none` when nothing matched or the request was refused before the lookup)
//!   and HTTP status.
//! - `gateway_request_duration_seconds{route}`: time to the response headers (for an event
//!   stream: until it opened).
//! - `gateway_route_nodes{route}`: connected nodes per route, read from the route table when
//!   scraped.
//! - `gateway_requests_in_flight`, `gateway_open_streams`.
//! - `gateway_refused_total{reason}`: requests the gateway refused itself before forwarding them:
//!   `unauthenticated` (401), `forbidden` (403), `rate_limited` (429).
//! - `gateway_handshake_failures_total`: cluster handshakes with the distributor or a node that
//!   failed (wrong secret, a peer that does not answer it), read when scraped.
//!
//! Route labels are the registered urls, never raw request paths, so the number of series stays
//! bounded whatever clients send.

use std::{sync::Arc, time::Duration};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

use crate::routes::RouteTable;

/// The route label of requests that matched no route.
pub const NO_ROUTE: &str = "none";

/// A route label that shares the route's url instead of copying it for every request.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct RouteName(Arc<str>);

impl EncodeLabelValue for RouteName {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&&*self.0, encoder)
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: RouteName,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: RouteName,
}

/// Why the gateway refused a request itself.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum RefusalReason {
    unauthenticated,
    forbidden,
    rate_limited,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    reason: RefusalReason,
}

fn latency_histogram() -> Histogram {
    // 100 µs to about 13 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram, fn() -> Histogram>,
    route_nodes: Family<RouteLabels, Gauge>,
    in_flight: Gauge,
    open_streams: Gauge,
    refused: Family<RefusalLabels, Counter>,
    handshake_failures: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("gateway");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        let route_nodes = Family::<RouteLabels, Gauge>::default();
        let in_flight = Gauge::default();
        let open_streams = Gauge::default();
        let refused = Family::<RefusalLabels, Counter>::default();
        // Every reason from the start, at 0, so alerts on them need no special case.
        for reason in [
            RefusalReason::unauthenticated,
            RefusalReason::forbidden,
            RefusalReason::rate_limited,
        ] {
            let _ = refused.get_or_create(&RefusalLabels { reason });
        }
        registry.register(
            "requests",
            "Proxied requests by route and HTTP status",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from a request's arrival to its response headers",
            latency.clone(),
        );
        registry.register(
            "route_nodes",
            "Connected nodes per route",
            route_nodes.clone(),
        );
        registry.register(
            "requests_in_flight",
            "Proxied requests waiting for their answer",
            in_flight.clone(),
        );
        registry.register(
            "open_streams",
            "Event streams being relayed to clients",
            open_streams.clone(),
        );
        registry.register(
            "refused",
            "Requests the gateway refused itself: no or bad token, missing scope, over the rate limit",
            refused.clone(),
        );
        let handshake_failures = Counter::default();
        registry.register(
            "handshake_failures",
            "Cluster handshakes with the distributor or a node that failed",
            handshake_failures.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            route_nodes,
            in_flight,
            open_streams,
            refused,
            handshake_failures,
        }
    }
}

impl Metrics {
    /// Counts one finished request.
    pub fn record(&self, route: &Arc<str>, status: u16, elapsed: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                route: RouteName(route.clone()),
                status,
            })
            .inc();
        self.latency
            .get_or_create(&RouteLabels {
                route: RouteName(route.clone()),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Counts a request the gateway refused itself with `status` (401, 403 or 429).
    pub fn count_refusal(&self, status: u16) {
        let reason = match status {
            401 => RefusalReason::unauthenticated,
            403 => RefusalReason::forbidden,
            _ => RefusalReason::rate_limited,
        };
        self.refused.get_or_create(&RefusalLabels { reason }).inc();
    }

    /// Counts a request as in flight until the guard is dropped.
    pub fn in_flight(&self) -> GaugeGuard {
        GaugeGuard::new(&self.in_flight)
    }

    /// Counts an event stream as open until the guard is dropped.
    pub fn open_stream(&self) -> GaugeGuard {
        GaugeGuard::new(&self.open_streams)
    }

    /// Event streams being relayed now.
    pub fn open_streams(&self) -> i64 {
        self.open_streams.get()
    }

    /// Proxied requests waiting for their answer now.
    pub fn requests_in_flight(&self) -> i64 {
        self.in_flight.get()
    }

    /// The text exposition, with the per-route node counts read from `table` now.
    pub fn render(&self, table: &RouteTable) -> String {
        self.route_nodes.clear();
        for route in table.routes() {
            self.route_nodes
                .get_or_create(&RouteLabels {
                    route: RouteName(route.url.clone()),
                })
                .set(route.connected_nodes() as i64);
        }
        // The process-wide count lives in shared; the counter catches up with it (a maximum,
        // so concurrent scrapes cannot add the same failures twice).
        self.handshake_failures.inner().fetch_max(
            shared::cluster::handshake_failures(),
            std::sync::atomic::Ordering::Relaxed,
        );
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// Increments a gauge now and decrements it when dropped, however the request ends.
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    fn new(gauge: &Gauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
