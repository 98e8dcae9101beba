//! Readiness: a node that says it cannot serve (its store is down) is skipped like a
//! disconnected one, while another node of the route can serve; when none can, requests still
//! reach the nodes, so callers get the service's own answer. The nodes are real services on the
//! shared runtime reporting readiness through their `ServiceConfig`, registered with a real
//! distributor.

mod common;

use common::{echo_router, Distributor, Gateway, Service};
use serde_json::Value;
use tokio::sync::watch;

/// The readiness `/_/topology` shows for the node at `addr` on route `url` (`"ready": false`,
/// absent when ready).
fn readiness_of(topology: &Value, url: &str, addr: std::net::SocketAddr) -> Option<bool> {
    topology["routes"]
        .as_array()?
        .iter()
        .filter(|route| route["url"] == url)
        .flat_map(|route| route["nodes"].as_array().into_iter().flatten())
        .find(|node| node["addr"] == addr.to_string())
        .map(|node| node["ready"] != false)
}

#[tokio::test]
async fn a_node_that_is_not_ready_is_skipped_until_no_node_is_ready() {
    let distributor = Distributor::start().await;
    let (a_ready, a_readiness) = watch::channel(true);
    let (b_ready, b_readiness) = watch::channel(true);
    let a = Service::start_with_readiness(
        "echo",
        echo_router("a"),
        distributor.addr,
        Some(a_readiness),
    )
    .await;
    let b = Service::start_with_readiness(
        "echo",
        echo_router("b"),
        distributor.addr,
        Some(b_readiness),
    )
    .await;
    let gateway = Gateway::start(distributor.addr, |_| {}).await;
    gateway.wait_for_nodes("GET/echo", 2).await;
    let mut answered = gateway.answering_nodes("/echo", 4).await;
    answered.sort();
    answered.dedup();
    assert_eq!(
        answered,
        ["a", "b"],
        "both nodes serve while both are ready"
    );

    b_ready.send_replace(false);
    let topology = gateway
        .wait_for_topology("b not ready", |topology| {
            readiness_of(topology, "GET/echo", b.addr) == Some(false)
        })
        .await;
    assert_eq!(readiness_of(&topology, "GET/echo", a.addr), Some(true));
    let node_b = topology["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|node| node["addr"] == b.addr.to_string())
        .expect("b is listed");
    assert_eq!(node_b["ready"], false, "{node_b}");
    assert_eq!(node_b["connected"], true, "{node_b}");
    let answered = gateway.answering_nodes("/echo", 20).await;
    assert!(answered.iter().all(|node| node == "a"), "{answered:?}");

    // Neither can serve: requests still reach them rather than failing at the gateway.
    a_ready.send_replace(false);
    gateway
        .wait_for_topology("a not ready", |topology| {
            readiness_of(topology, "GET/echo", a.addr) == Some(false)
        })
        .await;
    let mut answered = gateway.answering_nodes("/echo", 10).await;
    answered.sort();
    answered.dedup();
    assert_eq!(
        answered,
        ["a", "b"],
        "requests reach the nodes that are not ready"
    );

    // b recovers: it alone serves.
    b_ready.send_replace(true);
    gateway
        .wait_for_topology("b ready again", |topology| {
            readiness_of(topology, "GET/echo", b.addr) == Some(true)
        })
        .await;
    let answered = gateway.answering_nodes("/echo", 20).await;
    assert!(answered.iter().all(|node| node == "b"), "{answered:?}");
}
