//! The faults an operator meets on a bad day, reproduced against the real binaries: each test
//! breaks something the way it breaks in production and checks that the system keeps serving
//! or fails in the way docs/DEPLOYMENT.md describes.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use e2e::{
    connected_nodes, route_nodes, Checks, Process, Stack, StackOptions, Storage, READY_TIMEOUT,
};
use reqwest::StatusCode;
use serde_json::{json, Value};
use shared::{testing::TestPostgres, topology_cache::TopologyCache};
use tokio::task::JoinSet;

#[tokio::test]
async fn a_gateway_started_while_the_distributor_is_down_routes_from_its_cache() {
    let mut stack = Stack::start(StackOptions {
        notice: false,
        ..StackOptions::default()
    })
    .await;
    let mut checks = Checks::new("routing while the distributor is down");

    let put = stack
        .http
        .put(stack.url("/kv/cached-route"))
        .body("reachable")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::OK);
    let kv_port = stack.kv[0].port;
    let cache = TopologyCache::new(stack.topology_cache());
    let distributor = format!("127.0.0.1:{}", stack.distributor_port);
    tokio::time::timeout(READY_TIMEOUT, async {
        loop {
            let cached = cache.load(&distributor).ok().flatten().unwrap_or_default();
            if cached.iter().any(|node| node.port == kv_port) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the gateway writes its topology cache");
    checks.pass("the gateway keeps the distributor's topology in its cache file");

    assert_eq!(stack.gateway.terminate().await.unwrap(), Some(0));
    stack.distributor.kill9().await;
    stack.gateway.restart();
    e2e::wait_for_port(stack.gateway_port).await;
    let topology = stack.topology().await.unwrap();
    assert_eq!(topology["source"], "cache", "{topology:#}");
    checks.pass("restarted with the distributor down, the gateway takes the cached topology");

    // Bounded by the time it takes to connect to the node and run the handshake.
    let answer = stack
        .wait_for_ok(
            "/kv/cached-route",
            "the gateway never routed from its cache",
        )
        .await;
    assert_eq!(answer["value"], "reachable");
    let topology = stack.topology().await.unwrap();
    assert_eq!(topology["source"], "cache", "{topology:#}");
    assert_eq!(connected_nodes(&topology, "GET/kv"), 1, "{topology:#}");
    checks.pass("it routes to the cached kv node while the distributor is still down");

    stack.distributor.restart();
    stack
        .wait_for_topology("the distributor's topology", |topology| {
            topology["source"] == "distributor" && connected_nodes(topology, "GET/kv") == 1
        })
        .await;
    let get = stack
        .http
        .get(stack.url("/kv/cached-route"))
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), StatusCode::OK);
    checks.pass("once the distributor is back, its topology replaces the cache");
}

/// What the store says when it could not apply a write; anything else is not that promise.
const UNAVAILABLE: &str = "the store is unavailable";

/// How one PUT ended.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Applied,
    /// 503 "the store is unavailable": the service says it did not apply it.
    NotApplied,
    /// 503 "outcome unknown ...": it may or may not have been applied.
    Unknown,
    /// Anything else: the status and the error text.
    Other(u16, String),
}

/// Writers of distinct keys through the gateway, remembering how each write ended and how long
/// the failed ones took.
struct Writers {
    stop: Arc<AtomicBool>,
    outcomes: Arc<Mutex<HashMap<String, (String, Outcome)>>>,
    slowest_failure: Arc<Mutex<Duration>>,
    workers: JoinSet<()>,
}

impl Writers {
    fn start(stack: &Stack) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let outcomes = Arc::new(Mutex::new(HashMap::new()));
        let slowest_failure = Arc::new(Mutex::new(Duration::ZERO));
        let mut workers = JoinSet::new();
        for worker in 0..4 {
            let (http, base) = (stack.http.clone(), stack.url("/kv"));
            let (stop, outcomes, slowest_failure) =
                (stop.clone(), outcomes.clone(), slowest_failure.clone());
            workers.spawn(async move {
                for i in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let (key, value) = (format!("w{worker}-{i}"), format!("value {i}"));
                    let started = Instant::now();
                    let answer = http
                        .put(format!("{base}/{key}"))
                        .json(&json!({ "value": value }))
                        .send()
                        .await;
                    let outcome = match answer {
                        Ok(response) => outcome_of(response).await,
                        Err(err) => Outcome::Other(0, err.to_string()),
                    };
                    if outcome != Outcome::Applied {
                        let mut slowest = slowest_failure.lock().unwrap();
                        *slowest = (*slowest).max(started.elapsed());
                    }
                    outcomes.lock().unwrap().insert(key, (value, outcome));
                }
            });
        }
        Writers {
            stop,
            outcomes,
            slowest_failure,
            workers,
        }
    }

    fn count(&self, wanted: &Outcome) -> usize {
        let outcomes = self.outcomes.lock().unwrap();
        outcomes.values().filter(|(_, o)| o == wanted).count()
    }

    /// Waits until `more` writes have ended as `wanted` (bounded).
    async fn wait_for(&self, wanted: Outcome, more: usize) {
        let target = self.count(&wanted) + more;
        let deadline = Instant::now() + READY_TIMEOUT;
        while self.count(&wanted) < target {
            assert!(
                Instant::now() < deadline,
                "fewer than {target} writes ended as {wanted:?} within {READY_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(mut self) -> (HashMap<String, (String, Outcome)>, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        while self.workers.join_next().await.is_some() {}
        let outcomes = std::mem::take(&mut *self.outcomes.lock().unwrap());
        let slowest = *self.slowest_failure.lock().unwrap();
        (outcomes, slowest)
    }
}

async fn outcome_of(response: reqwest::Response) -> Outcome {
    let status = response.status();
    if status == StatusCode::OK {
        return Outcome::Applied;
    }
    let body: Value = response.json().await.unwrap_or(Value::Null);
    let error = body["error"].as_str().unwrap_or_default().to_owned();
    match (status, error.as_str()) {
        (StatusCode::SERVICE_UNAVAILABLE, UNAVAILABLE) => Outcome::NotApplied,
        (StatusCode::SERVICE_UNAVAILABLE, e) if e.starts_with("outcome unknown") => {
            Outcome::Unknown
        }
        _ => Outcome::Other(status.as_u16(), error),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_killed_under_load_fails_fast_and_never_applies_a_refused_write() {
    let Some(mut postgres) = TestPostgres::start().await else {
        return;
    };
    let stack = Stack::start(StackOptions {
        notice: false,
        storage: Storage::postgres(&postgres).await,
        ..StackOptions::default()
    })
    .await;
    let mut checks = Checks::new("kill -9 of PostgreSQL under kv PUT load");

    let writers = Writers::start(&stack);
    writers.wait_for(Outcome::Applied, 50).await;
    postgres.kill9().await;
    writers.wait_for(Outcome::NotApplied, 20).await;
    checks.pass("with PostgreSQL gone, writes are refused with 503 \"the store is unavailable\"");
    postgres.start_again().await;
    writers.wait_for(Outcome::Applied, 50).await;
    checks.pass("writes succeed again once PostgreSQL is back, without a restart");
    let (outcomes, slowest_failure) = writers.stop().await;

    let count = |wanted: &Outcome| outcomes.values().filter(|(_, o)| o == wanted).count();
    let others: Vec<_> = outcomes
        .values()
        .filter_map(|(_, outcome)| match outcome {
            Outcome::Other(status, error) => Some((*status, error.clone())),
            _ => None,
        })
        .collect();
    println!(
        "  {} applied, {} refused as not applied, {} outcome unknown, {} other; slowest failed \
         request {slowest_failure:?}",
        count(&Outcome::Applied),
        count(&Outcome::NotApplied),
        count(&Outcome::Unknown),
        others.len()
    );
    assert!(
        others.is_empty(),
        "every failed write is a 503 that says whether it was applied (never the gateway's \
         timeout): {others:?}"
    );
    checks.pass("no failed write waited for the gateway's timeout: each got the store's own 503");

    // Every write the service refused as not applied is absent after the restart, and every
    // acknowledged one is there with its value.
    let mut applied_late = Vec::new();
    for (key, (value, outcome)) in &outcomes {
        let response = stack
            .http
            .get(stack.url(&format!("/kv/{key}")))
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        match outcome {
            Outcome::Applied => {
                assert_eq!(status, StatusCode::OK, "acknowledged {key} is missing");
                assert_eq!(body["value"], value.as_str(), "acknowledged {key} changed");
            }
            Outcome::NotApplied if status != StatusCode::NOT_FOUND => applied_late.push(key),
            _ => {}
        }
    }
    assert!(
        applied_late.is_empty(),
        "writes answered \"not applied\" were applied after all: {applied_late:?}"
    );
    checks.pass(format!(
        "none of the {} writes answered \"not applied\" shows up after the restart, and all {} \
         acknowledged ones do",
        count(&Outcome::NotApplied),
        count(&Outcome::Applied)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn services_started_before_postgres_come_up_when_it_does() {
    let Some(mut postgres) = TestPostgres::start().await else {
        return;
    };
    let options = StackOptions {
        storage: Storage::postgres(&postgres).await,
        ..StackOptions::default()
    };
    postgres.stop().await;
    let mut checks = Checks::new("services started while PostgreSQL is down");
    // The stack waits until both services are routed, which they can only be once they reach
    // their database: PostgreSQL starts a few seconds after them (longer than notice-service
    // used to wait).
    let (stack, ()) = tokio::join!(Stack::start(options), async {
        tokio::time::sleep(Duration::from_secs(6)).await;
        postgres.start_again().await;
    });
    checks.pass("kv-service and notice-service waited for PostgreSQL and registered once it came");

    let put = stack
        .http
        .put(stack.url("/kv/after-the-wait"))
        .json(&json!({"value": "here"}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::OK);
    let published = stack
        .http
        .post(stack.url("/notices"))
        .json(&json!({"message": "after the wait"}))
        .send()
        .await
        .unwrap();
    assert!(published.status().is_success(), "{}", published.status());
    checks.pass("both serve");
}

/// Waits until the gateway routes `GET /notices` to two connected nodes, ready as `ready` says
/// (in any order).
async fn wait_for_notice_nodes(stack: &Stack, mut ready: [bool; 2]) {
    ready.sort();
    stack
        .wait_for_topology(&format!("two notice nodes, ready: {ready:?}"), |topology| {
            let nodes = route_nodes(topology, "GET/notices");
            let mut seen: Vec<bool> = nodes.iter().map(|node| node["ready"] != false).collect();
            seen.sort();
            nodes.iter().all(|node| node["connected"] == true) && seen == ready
        })
        .await;
}

/// A second notice-service for `stack`, on its own database.
fn second_notice_service(stack: &Stack, store: &str) -> Process {
    let port = e2e::free_port();
    let mut args = vec![
        "--listen".to_owned(),
        format!("127.0.0.1:{port}"),
        "--distributor".to_owned(),
        format!("127.0.0.1:{}", stack.distributor_port),
        "--store".to_owned(),
        store.to_owned(),
    ];
    if let Some(secrets) = &stack.secrets {
        args.extend(secrets.cluster_flags());
    }
    Process::spawn("notice-2", "notice-service", &args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_whose_database_is_down_is_skipped_while_another_serves() {
    let (Some(first), Some(mut second)) =
        (TestPostgres::start().await, TestPostgres::start().await)
    else {
        return;
    };
    let stack = Stack::start(StackOptions {
        storage: Storage::postgres(&first).await,
        ..StackOptions::default()
    })
    .await;
    let mut checks = Checks::new("one of two notice-service nodes loses its database");
    let _second_notice = second_notice_service(&stack, &second.create_database("notices").await);
    wait_for_notice_nodes(&stack, [true, true]).await;

    second.kill9().await;
    wait_for_notice_nodes(&stack, [false, true]).await;
    checks.pass("the node reports itself not ready and the gateway shows it");

    for i in 0..40 {
        let published = stack
            .http
            .post(stack.url("/notices"))
            .json(&json!({ "message": format!("notice {i}") }))
            .send()
            .await
            .unwrap();
        assert!(
            published.status().is_success(),
            "publish {i}: {}",
            published.status()
        );
        let listed = stack.http.get(stack.url("/notices")).send().await.unwrap();
        assert_eq!(listed.status(), StatusCode::OK, "list {i}");
    }
    checks.pass("80 requests in a row all succeed through the node that can serve");

    second.start_again().await;
    wait_for_notice_nodes(&stack, [true, true]).await;
    checks.pass("the node is back in rotation once its database returns");
}
