//! notice-service's metrics, in the process-wide registry that `--metrics-listen` serves
//! (`shared::metrics`):
//!
//! - `notice_publishes_total{when}`: notices accepted by this instance, `now` or `scheduled`.
//! - `notice_deliveries_total`: notices handed to a live subscriber of this instance.
//! - `notice_subscribers`: live subscriptions on this instance.
//! - `notice_lagged_total`: subscribers cut off because they fell a whole buffer behind.
//! - `notice_udp_datagrams_total{kind}`: the UDP door's datagrams: notices `sent`, notices sent
//!   `truncated`, and `ignored` garbage.

use std::sync::OnceLock;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
};
use shared::metrics::registered;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PublishLabels {
    when: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UdpLabels {
    kind: &'static str,
}

struct Metrics {
    publishes: Family<PublishLabels, Counter>,
    udp: Family<UdpLabels, Counter>,
    deliveries: Counter,
    subscribers: Gauge,
    lagged: Counter,
}

fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| Metrics {
        publishes: registered(
            "notice_publishes",
            "Notices accepted, published now or scheduled",
            Family::default(),
        ),
        deliveries: registered(
            "notice_deliveries",
            "Notices handed to a live subscriber",
            Counter::default(),
        ),
        subscribers: registered("notice_subscribers", "Live subscriptions", Gauge::default()),
        udp: registered(
            "notice_udp_datagrams",
            "UDP door datagrams: notices sent, notices sent truncated, garbage ignored",
            Family::default(),
        ),
        lagged: registered(
            "notice_lagged",
            "Subscribers cut off for falling a whole buffer behind",
            Counter::default(),
        ),
    })
}

/// Counts an accepted notice: published now, or `scheduled` for later.
pub(crate) fn count_publish(scheduled: bool) {
    let when = if scheduled { "scheduled" } else { "now" };
    metrics()
        .publishes
        .get_or_create(&PublishLabels { when })
        .inc();
}

/// Counts what one fan-out did.
pub(crate) fn count_fan_out(delivered: usize, lagged: usize) {
    let metrics = metrics();
    metrics.deliveries.inc_by(delivered as u64);
    metrics.lagged.inc_by(lagged as u64);
}

/// A subscription started (`1`) or ended (`-1`).
pub(crate) fn count_subscribers(change: i64) {
    metrics().subscribers.inc_by(change);
}

/// Counts one UDP door datagram of `kind`: `sent`, `truncated` or `ignored`.
pub(crate) fn count_udp(kind: &'static str) {
    metrics().udp.get_or_create(&UdpLabels { kind }).inc();
}
