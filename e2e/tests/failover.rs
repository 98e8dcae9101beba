//! Losing parts of the running system: a replica killed or frozen, the distributor or the gateway
//! restarted, while clients keep sending requests.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use e2e::{connected_nodes, Checks, Stack, StackOptions, Storage, READY_TIMEOUT};
use reqwest::StatusCode;
use serde_json::{json, Value};
use shared::testing::TestPostgres;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    task::JoinSet,
};

/// Clients writing distinct keys as fast as they are answered, remembering every acknowledged
/// write and counting failures.
struct Traffic {
    stop: Arc<AtomicBool>,
    acknowledged: Arc<Mutex<HashMap<String, String>>>,
    failures: Arc<AtomicUsize>,
    workers: JoinSet<()>,
}

impl Traffic {
    const WORKERS: usize = 4;

    fn start(stack: &Stack, name: &str) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let acknowledged = Arc::new(Mutex::new(HashMap::new()));
        let failures = Arc::new(AtomicUsize::new(0));
        let mut workers = JoinSet::new();
        for worker in 0..Self::WORKERS {
            let (http, base) = (stack.http.clone(), stack.url("/kv"));
            let (stop, acknowledged, failures) =
                (stop.clone(), acknowledged.clone(), failures.clone());
            let name = name.to_owned();
            workers.spawn(async move {
                for i in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let key = format!("{name}-{worker}-{i}");
                    let value = format!("value {i} of worker {worker}");
                    let put = http
                        .put(format!("{base}/{key}"))
                        .json(&json!({ "value": value }))
                        .send()
                        .await;
                    match put {
                        Ok(response) if response.status() == StatusCode::OK => {
                            acknowledged.lock().unwrap().insert(key, value);
                        }
                        _ => {
                            failures.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            });
        }
        Traffic {
            stop,
            acknowledged,
            failures,
            workers,
        }
    }

    fn acknowledged(&self) -> usize {
        self.acknowledged.lock().unwrap().len()
    }

    /// Waits until `more` writes beyond the current count were acknowledged.
    async fn wait_for_progress(&self, more: usize) {
        let target = self.acknowledged() + more;
        let progressed = tokio::time::timeout(READY_TIMEOUT, async {
            while self.acknowledged() < target {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(
            progressed.is_ok(),
            "traffic stalled at {} acknowledged writes ({} failures)",
            self.acknowledged(),
            self.failures.load(Ordering::Relaxed)
        );
    }

    async fn stop(mut self) -> (HashMap<String, String>, usize) {
        self.stop.store(true, Ordering::Relaxed);
        while self.workers.join_next().await.is_some() {}
        let acknowledged = std::mem::take(&mut *self.acknowledged.lock().unwrap());
        (acknowledged, self.failures.load(Ordering::Relaxed))
    }
}

async fn postgres_stack(kv_replicas: usize) -> Option<(TestPostgres, Stack)> {
    let postgres = TestPostgres::start().await?;
    let storage = Storage::postgres(&postgres).await;
    let stack = Stack::start(StackOptions {
        kv_replicas,
        notice: false,
        storage,
        ..StackOptions::default()
    })
    .await;
    Some((postgres, stack))
}

async fn connected_kv_nodes(stack: &Stack) -> usize {
    stack
        .topology()
        .await
        .map(|topology| connected_nodes(&topology, "GET/kv"))
        .unwrap_or(0)
}

/// Waits until the gateway has exactly `n` connected kv nodes; returns how long that took.
async fn wait_for_kv_nodes(stack: &Stack, n: usize, within: Duration) -> Duration {
    let started = Instant::now();
    let reached = stack
        .topology_within(within, |topology| connected_nodes(topology, "GET/kv") == n)
        .await;
    assert!(reached.is_some(), "the gateway never had {n} kv nodes");
    started.elapsed()
}

#[tokio::test]
async fn killing_one_of_two_replicas_loses_no_acknowledged_write() {
    let Some((_postgres, mut stack)) = postgres_stack(2).await else {
        return;
    };
    let mut checks = Checks::new("kill -9 of one kv replica under traffic");

    let traffic = Traffic::start(&stack, "kill");
    traffic.wait_for_progress(200).await;
    let before_kill = traffic.acknowledged();
    stack.kv[1].process.kill9().await;
    traffic.wait_for_progress(200).await;
    let (acknowledged, failures) = traffic.stop().await;
    println!(
        "  {} writes acknowledged ({before_kill} before the kill), {failures} failed",
        acknowledged.len()
    );
    assert!(
        failures <= 2 * Traffic::WORKERS,
        "{failures} requests failed around the kill"
    );
    checks.pass(format!(
        "requests kept succeeding after the kill ({failures} failed)"
    ));

    for (key, value) in &acknowledged {
        let get: Value = stack
            .http
            .get(stack.url(&format!("/kv/{key}")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(get["value"], value.as_str(), "acknowledged write of {key}");
    }
    checks.pass(format!(
        "all {} acknowledged writes are readable",
        acknowledged.len()
    ));
}

#[tokio::test]
async fn a_frozen_replica_leaves_the_rotation() {
    let Some((_postgres, stack)) = postgres_stack(2).await else {
        return;
    };
    let mut checks = Checks::new("a frozen (SIGSTOP) kv replica");
    let heartbeat_timeout = StackOptions::default().heartbeat.1;

    stack.kv[1].process.freeze().await;
    let took = wait_for_kv_nodes(&stack, 1, heartbeat_timeout * 4).await;
    println!("  evicted {took:?} after SIGSTOP (heartbeat timeout {heartbeat_timeout:?})");
    checks.pass("the frozen replica was taken out of rotation");

    for i in 0..20 {
        let put = stack
            .http
            .put(stack.url(&format!("/kv/frozen-{i}")))
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(put.status(), StatusCode::OK, "request {i}");
    }
    checks.pass("every request went to the live replica");

    stack.kv[1].process.thaw();
    wait_for_kv_nodes(&stack, 2, READY_TIMEOUT).await;
    checks.pass("the thawed replica registered again and rejoined the rotation");
}

#[tokio::test]
async fn a_distributor_restart_does_not_interrupt_traffic() {
    let Some((_postgres, mut stack)) = postgres_stack(2).await else {
        return;
    };
    let mut checks = Checks::new("distributor restart under traffic");

    let traffic = Traffic::start(&stack, "restart");
    traffic.wait_for_progress(100).await;
    stack.distributor.kill9().await;
    traffic.wait_for_progress(100).await;
    checks.pass("the gateway kept serving with the last topology while the distributor was down");
    stack.distributor.restart();
    e2e::wait_for_port(stack.distributor_port).await;

    // Every node registers again by itself: ask the new distributor as any node could.
    let registered = tokio::time::timeout(READY_TIMEOUT, async {
        loop {
            let names = distributor_node_names(&stack).await;
            if names.iter().filter(|n| *n == "kv").count() == 2 && names.contains(&"gate".into()) {
                return names;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the nodes never registered with the new distributor");
    println!("  registered again: {registered:?}");
    traffic.wait_for_progress(100).await;
    let (acknowledged, failures) = traffic.stop().await;
    assert_eq!(
        failures, 0,
        "requests failed during the distributor restart"
    );
    assert_eq!(connected_kv_nodes(&stack).await, 2);
    checks.pass(format!(
        "all nodes re-registered; {} writes, none failed",
        acknowledged.len()
    ));
}

/// Asks the distributor for the topology over a raw socket, as a node would (after the
/// cluster handshake when the stack has a secret).
async fn distributor_node_names(stack: &Stack) -> Vec<String> {
    let port = stack.distributor_port;
    let Ok(mut socket) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return Vec::new();
    };
    if let Some(secrets) = &stack.secrets {
        let secret = shared::secrets::read_secret_file(&secrets.cluster_secret_file).unwrap();
        let secret = shared::cluster::ClusterSecret::new(secret);
        let (mut read_half, mut write_half) = socket.split();
        if shared::cluster::connect(&mut read_half, &mut write_half, &secret)
            .await
            .is_err()
        {
            return Vec::new();
        }
    }
    let ask = "{\"uri\":\"/distributes\",\"method\":\"GET\",\"key\":1,\"params\":null}¶";
    if socket.write_all(ask.as_bytes()).await.is_err() {
        return Vec::new();
    }
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.ends_with("¶".as_bytes()) {
        match tokio::time::timeout(Duration::from_secs(5), socket.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => answer.extend_from_slice(&buf[..n]),
            _ => return Vec::new(),
        }
    }
    let text = String::from_utf8_lossy(&answer);
    let packet: Value = serde_json::from_str(text.trim_end_matches('¶')).unwrap_or(Value::Null);
    packet["params"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|node| node["name"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn clients_just_retry_across_a_gateway_restart() {
    let mut stack = Stack::start(StackOptions {
        notice: false,
        ..StackOptions::default()
    })
    .await;
    let mut checks = Checks::new("gateway restart");

    let put = stack
        .http
        .put(stack.url("/kv/survivor"))
        .body("still here")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::OK);

    let code = stack.gateway.terminate().await.unwrap();
    assert_eq!(code, Some(0), "the gateway exits cleanly on SIGTERM");
    assert!(stack.http.get(stack.url("/healthz")).send().await.is_err());
    checks.pass("SIGTERM stops the gateway cleanly; requests are refused while it is down");

    stack.gateway.restart();
    let answer = stack
        .wait_for_ok("/kv/survivor", "the restarted gateway never answered")
        .await;
    assert_eq!(answer["value"], "still here");
    checks.pass("a client retrying reaches the restarted gateway and reads its data");
}
