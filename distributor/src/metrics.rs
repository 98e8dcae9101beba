//! The distributor's metrics, in the process-wide registry that `--metrics-listen` serves
//! (`shared::metrics`):
//!
//! - `distributor_nodes{name}`: registered nodes per service name, read from the registry when
//!   scraped.
//! - `distributor_registrations_refused_total`: registrations refused (invalid, out of bounds,
//!   a url or an address another node holds, too many from one address).
//! - `handshake_failures_total` (from `shared`): cluster handshakes that failed.

use std::{
    collections::BTreeMap,
    sync::{Arc, OnceLock},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
};

use shared::metrics::registered;

use crate::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NameLabels {
    name: String,
}

struct Metrics {
    nodes: Family<NameLabels, Gauge>,
    refused: Counter,
}

fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| Metrics {
        nodes: registered(
            "distributor_nodes",
            "Registered nodes per service name",
            Family::default(),
        ),
        refused: registered(
            "distributor_registrations_refused",
            "Registrations the distributor refused",
            Counter::default(),
        ),
    })
}

/// Counts a refused registration.
pub(crate) fn count_refused_registration() {
    metrics().refused.inc();
}

/// What `--metrics-listen` serves: the process's metrics, with the node counts of `registry`
/// read now.
pub fn render(registry: Registry) -> shared::metrics::Render {
    // Registered at start, so that the series exist before the first refusal.
    let _ = metrics();
    Arc::new(move || {
        let mut per_name: BTreeMap<String, i64> = BTreeMap::new();
        for node in registry.nodes() {
            *per_name.entry(node.name).or_default() += 1;
        }
        let nodes = &metrics().nodes;
        nodes.clear();
        for (name, count) in per_name {
            nodes.get_or_create(&NameLabels { name }).set(count);
        }
        shared::metrics::render()
    })
}
