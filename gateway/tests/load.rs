//! Many requests at once: 1,000 requests in flight through the gateway at the same moment, over
//! two nodes, each getting its own answer.

mod common;

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use common::{Distributor, Gateway, Service};
use reqwest::StatusCode;
use serde_json::{json, Value};
use shared::service::{Response, Router};
use tokio::{sync::watch, task::JoinSet, time::timeout};

const IN_FLIGHT: usize = 1000;

/// Answers `GET /together?i=N` with N and its node's name, but only once all `IN_FLIGHT`
/// requests have arrived (at either node): until then every one of them is in flight.
fn together_router(
    name: &'static str,
    arrived: Arc<AtomicUsize>,
    all: watch::Sender<bool>,
) -> Router {
    let all = Arc::new(all);
    Router::new().route("GET", "/together", move |request| {
        let (arrived, all) = (arrived.clone(), all.clone());
        async move {
            if arrived.fetch_add(1, Ordering::SeqCst) + 1 == IN_FLIGHT {
                all.send_replace(true);
            }
            let _ = all.subscribe().wait_for(|all| *all).await;
            Response::ok(json!({"i": request.params["i"], "node": name}))
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_requests_each_get_their_own_answer() {
    let distributor = Distributor::start().await;
    let arrived = Arc::new(AtomicUsize::new(0));
    let (all, _) = watch::channel(false);
    // Two replicas of one service: a url belongs to one service name.
    let _a = Service::start(
        "together",
        together_router("a", arrived.clone(), all.clone()),
        distributor.addr,
    )
    .await;
    let _b = Service::start(
        "together",
        together_router("b", arrived.clone(), all),
        distributor.addr,
    )
    .await;
    let gateway = Gateway::start(distributor.addr, |config| {
        config.request_timeout = Duration::from_secs(60);
    })
    .await;
    gateway.wait_for_nodes("GET/together", 2).await;

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(IN_FLIGHT)
        .build()
        .unwrap();
    let mut requests = JoinSet::new();
    for i in 0..IN_FLIGHT {
        let (http, url) = (http.clone(), gateway.url(&format!("/together?i={i}")));
        requests.spawn(async move {
            let response = http.get(url).send().await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            (i, response.json::<Value>().await.unwrap())
        });
    }
    let mut per_node = [0usize; 2];
    let answers = timeout(Duration::from_secs(60), async {
        let mut answers = 0;
        while let Some(answer) = requests.join_next().await {
            let (i, body) = answer.unwrap();
            assert_eq!(body["i"], i.to_string(), "request {i} got its own answer");
            per_node[usize::from(body["node"] == "b")] += 1;
            answers += 1;
        }
        answers
    })
    .await
    .expect("all requests were in flight together and were answered");
    assert_eq!(answers, IN_FLIGHT);
    assert_eq!(arrived.load(Ordering::SeqCst), IN_FLIGHT);
    assert!(
        per_node[0] > 0 && per_node[1] > 0,
        "both nodes served: {per_node:?}"
    );
    assert_eq!(gateway.metric("gateway_requests_in_flight").await, 0.0);
}
