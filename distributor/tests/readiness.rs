//! Readiness in the topology: a node's heartbeat says whether it can serve, and the distributor
//! broadcasts the change to every node. Nodes here are a plain socket writing JSON + `¶` by hand
//! (to pin the wire format) and a real service on the shared runtime whose `ServiceConfig`
//! carries a readiness channel; the topology is watched the way every node sees it, through a
//! real `DistributorClient`.

mod common;

use std::{sync::Arc, time::Duration};

use common::{Node, PROMPTLY};
use distributor::{Config, Registry};
use serde_json::{json, Value};
use shared::{
    distributor_client::DistributorClient,
    packet::Registration,
    service::{serve, Response, Router, ServiceConfig},
    Topology,
};
use tokio::{net::TcpListener, sync::watch, time::timeout};
use tokio_util::sync::{CancellationToken, DropGuard};

/// A distributor in-process on 127.0.0.1, stopped when dropped, and a watcher registered with
/// it that sees the topology every node is sent.
struct Setup {
    addr: std::net::SocketAddr,
    registry: Registry,
    topology: watch::Receiver<Arc<Topology>>,
    shutdown: CancellationToken,
    _stop: DropGuard,
}

impl Setup {
    async fn start() -> Setup {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let registry = Registry::default();
        let shutdown = CancellationToken::new();
        let config = Config {
            heartbeat_interval: Duration::from_millis(200),
            heartbeat_timeout: Duration::from_secs(2),
            ..Config::default()
        };
        tokio::spawn(distributor::run_with_registry(
            listener,
            config,
            registry.clone(),
            shutdown.child_token(),
        ));
        let watcher = Registration {
            port: 1,
            name: "watcher".into(),
            protocol: Some(2),
            ..Registration::default()
        };
        let topology = DistributorClient::spawn(addr.to_string(), watcher, shutdown.child_token());
        Setup {
            addr,
            registry,
            topology,
            _stop: shutdown.clone().drop_guard(),
            shutdown,
        }
    }

    /// Waits until the broadcast topology lists the node on `port` with readiness `ready`.
    async fn wait_for_readiness(&mut self, port: u16, ready: bool) {
        let reached = timeout(
            PROMPTLY,
            self.topology.wait_for(|topology| {
                topology
                    .iter()
                    .any(|node| node.port == port && node.ready == ready)
            }),
        )
        .await
        .is_ok();
        if !reached {
            panic!(
                "the topology never said node {port} is {}: {:?}",
                if ready { "ready" } else { "not ready" },
                self.topology.borrow()
            );
        }
    }
}

fn heartbeat(ready: bool) -> Value {
    json!({"uri": "/heartbeat", "method": "GET", "key": 0, "params": {"ready": ready}})
}

#[tokio::test]
async fn a_heartbeat_with_ready_false_changes_the_topology_and_ready_true_restores_it() {
    let mut setup = Setup::start().await;
    let mut node = Node::connect(setup.addr).await;
    // An original-design registration (no heartbeats are sent to it), so the only heartbeats
    // on this connection are the ones the test writes.
    node.send(json!({"uri": "/distributes", "method": "POST", "key": 0,
               "params": {"port": 4100, "name": "kv", "urls": ["GET/kv"]}}))
        .await;
    setup.wait_for_readiness(4100, true).await;

    node.send(heartbeat(false)).await;
    setup.wait_for_readiness(4100, false).await;
    assert!(!setup
        .registry
        .nodes()
        .iter()
        .any(|n| n.port == 4100 && n.ready));

    // A heartbeat without params (how every node echoed before readiness) changes nothing.
    node.send(json!({"uri": "/heartbeat", "method": "GET", "key": 0, "params": null}))
        .await;
    node.send(heartbeat(true)).await;
    setup.wait_for_readiness(4100, true).await;
    let nodes = setup.registry.nodes();
    let entry = nodes.iter().find(|n| n.port == 4100).unwrap();
    assert!(entry.ready, "{entry:?}");
}

#[tokio::test]
async fn a_node_that_says_it_is_not_ready_before_registering_starts_not_ready() {
    let mut setup = Setup::start().await;
    let mut node = Node::connect(setup.addr).await;
    node.send(heartbeat(false)).await;
    node.send(json!({"uri": "/distributes", "method": "POST", "key": 0,
               "params": {"port": 4200, "name": "kv", "urls": ["GET/kv"]}}))
        .await;
    setup.wait_for_readiness(4200, false).await;
    let seen_ready = setup
        .topology
        .borrow()
        .iter()
        .any(|n| n.port == 4200 && n.ready);
    assert!(!seen_ready);
}

#[tokio::test]
async fn a_service_config_readiness_flip_reaches_the_distributors_topology() {
    let mut setup = Setup::start().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let router = Router::new().route("GET", "/kv", |_| async { Response::ok("hello") });
    let (ready_tx, ready_rx) = watch::channel(false);
    let config = ServiceConfig {
        name: "kv".into(),
        distributor: Some(setup.addr.to_string()),
        readiness: Some(ready_rx),
        ..ServiceConfig::default()
    };
    let service = tokio::spawn(serve(
        listener,
        router,
        config,
        setup.shutdown.child_token(),
    ));

    // Not ready from the first topology on.
    setup.wait_for_readiness(port, false).await;
    ready_tx.send_replace(true);
    setup.wait_for_readiness(port, true).await;
    ready_tx.send_replace(false);
    setup.wait_for_readiness(port, false).await;
    // Heartbeat echoes keep saying it: the entry stays not ready across several of them.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(setup
        .registry
        .nodes()
        .iter()
        .any(|n| n.port == port && !n.ready));
    ready_tx.send_replace(true);
    setup.wait_for_readiness(port, true).await;

    setup.shutdown.cancel();
    timeout(PROMPTLY, service)
        .await
        .expect("the service stops")
        .unwrap()
        .unwrap();
}
