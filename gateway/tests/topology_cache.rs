//! Static stability: a gateway restarted while the distributor is down routes with the topology
//! it cached on disk, at once, and takes the distributor's again when it is back. Distributor,
//! node and gateway are the real ones, served in-process on 127.0.0.1 ports of their own.

mod common;

use common::{echo_router, Distributor, Gateway, Service, PROMPTLY};
use reqwest::StatusCode;
use shared::topology_cache::TopologyCache;

#[tokio::test]
async fn a_gateway_started_while_the_distributor_is_down_routes_from_its_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cache = TopologyCache::new(dir.path().join("gateway-topology.json"));
    let mut distributor = Distributor::start().await;
    let distributor_addr = distributor.addr;
    let node = Service::start("echo", echo_router("a"), distributor_addr).await;
    let with_cache = |config: &mut gateway::Config| config.topology_cache = Some(cache.clone());

    let mut gateway = Gateway::start(distributor_addr, with_cache).await;
    gateway.wait_for_nodes("GET/echo", 1).await;
    assert_eq!(gateway.topology().await["source"], "distributor");
    let (status, body) = gateway.get("/echo").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // The cache is written by a task of its own once the topology arrives.
    tokio::time::timeout(PROMPTLY, async {
        loop {
            let cached = cache
                .load(&distributor_addr.to_string())
                .unwrap_or_default()
                .unwrap_or_default();
            if cached.iter().any(|info| info.port == node.addr.port()) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the gateway writes the topology to its cache");

    gateway.stop().await.unwrap();
    distributor.stop().await;

    // The distributor is down: the new gateway knows the node only from the cache.
    let gateway = Gateway::start(distributor_addr, with_cache).await;
    assert_eq!(gateway.topology().await["source"], "cache");
    gateway.wait_for_nodes("GET/echo", 1).await;
    let (status, body) = gateway.get("/echo").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["node"], "a");
    assert_eq!(gateway.topology().await["source"], "cache");

    let _distributor = Distributor::start_at(distributor_addr).await;
    gateway
        .wait_for_topology("the distributor's topology", |topology| {
            topology["source"] == "distributor"
        })
        .await;
    gateway.wait_for_nodes("GET/echo", 1).await;
    let (status, body) = gateway.get("/echo").await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn without_a_cache_or_a_distributor_the_source_is_none_and_nothing_routes() {
    let dir = tempfile::tempdir().unwrap();
    let cache = TopologyCache::new(dir.path().join("absent.json"));
    // A port nothing listens on: bound, then released.
    let nowhere = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let gateway = Gateway::start(nowhere, |config| {
        config.topology_cache = Some(cache.clone())
    })
    .await;
    assert_eq!(gateway.topology().await["source"], "none");
    let (status, _) = gateway.get("/echo").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}
