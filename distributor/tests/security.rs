//! The distributor binary against the ways a stranger on the network could abuse it: each test
//! starts the real process on a free 127.0.0.1 port and talks to it over raw TCP, writing
//! packets (JSON + `¶`) by hand as an attacker would, and checks that the attack now fails
//! safe:
//! - a second service claiming a registered url is refused and routing does not change;
//! - a registration cannot choose the address it is registered at, nor take over another
//!   node's, unless it proved it knows the cluster secret;
//! - registrations with huge names are refused, so later services are still routed;
//! - thousands of registered nodes keep the distributor's memory small;
//! - one address holds a bounded number of registrations;
//! - the cluster handshake and protected mode guard who may join at all.

mod common;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use common::{hosts_of, ports_of, Node, DELIMITER, LOCALHOST, PROMPTLY};
use serde_json::{json, Value};
use shared::cluster::ClusterSecret;
use tokio::{
    io::AsyncReadExt,
    net::TcpStream,
    sync::{mpsc, Semaphore},
    task::JoinSet,
    time::{timeout, Instant},
};
use tokio_util::sync::CancellationToken;

/// The distributor binary, running on a free loopback port until dropped.
struct DistributorProcess {
    child: Child,
    addr: SocketAddr,
}

impl DistributorProcess {
    async fn start(args: &[&str]) -> DistributorProcess {
        // A free port can be taken by someone else before the child binds it: try a few.
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let mut child = distributor_command()
                .arg("--listen")
                .arg(addr.to_string())
                .args(args)
                .stdout(Stdio::null())
                .spawn()
                .expect("the distributor binary starts");
            let deadline = Instant::now() + PROMPTLY;
            loop {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                if TcpStream::connect(addr).await.is_ok() {
                    return DistributorProcess { child, addr };
                }
                assert!(Instant::now() < deadline, "the distributor never listened");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        panic!("the distributor could not listen on a free port");
    }

    async fn node(&self) -> Node {
        Node::connect_from(self.addr, LOCALHOST).await
    }

    /// The distributor's resident memory, in bytes.
    fn resident_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|value| value.trim().strip_suffix("kB"))
            .and_then(|kib| kib.trim().parse().ok())
            .expect("VmRSS in /proc/PID/status");
        kib * 1024
    }
}

impl Drop for DistributorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The distributor binary with a clean environment: no flag comes from the caller's.
fn distributor_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_distributor"));
    for (name, _) in std::env::vars() {
        if name.starts_with("DISTRIBUTOR_")
            || ["CLUSTER_SECRET_FILE", "INSECURE", "MAX_CONNECTIONS_PER_IP"]
                .contains(&name.as_str())
        {
            command.env_remove(name);
        }
    }
    command.env("RUST_LOG", "warn");
    command
}

/// A cluster secret in a file of its own (mode 0600), removed with the directory.
struct SecretFile {
    _dir: tempfile::TempDir,
    path: PathBuf,
    secret: ClusterSecret,
}

impl SecretFile {
    fn new(bytes: &[u8]) -> SecretFile {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.secret");
        std::fs::write(&path, bytes).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        SecretFile {
            _dir: dir,
            path,
            secret: ClusterSecret::new(bytes.to_vec()),
        }
    }

    fn path(&self) -> &str {
        self.path.to_str().unwrap()
    }
}

#[tokio::test]
async fn a_second_service_cannot_take_over_a_registered_url() {
    let distributor = DistributorProcess::start(&[]).await;
    let mut kv = distributor.node().await;
    kv.register(json!({"port": 9010, "name": "kv", "urls": ["GET/kv", "PUT/kv"]}))
        .await;
    let before = kv.next_topology().await;
    assert_eq!(ports_of(&before), [9010]);

    // The finding: a stranger registers as another service serving the same routes, and the
    // gateway sends it half the requests for them.
    let mut thief = distributor.node().await;
    thief
        .register(json!({"port": 9666, "name": "thief", "urls": ["GET/other", "PUT/kv"]}))
        .await;
    let (status, error) = thief.refusal().await;
    assert_eq!(status, 403, "{error}");
    assert_eq!(error, r#"url "PUT/kv" belongs to service "kv""#);

    // Nothing changed, for anyone.
    assert_eq!(thief.ask_topology(1).await, before);
    assert_eq!(kv.ask_topology(2).await, before);

    // A replica of kv is still welcome, and the thief may serve urls nobody owns.
    let mut replica = distributor.node().await;
    replica
        .register(json!({"port": 9011, "name": "kv", "urls": ["GET/kv"]}))
        .await;
    assert_eq!(ports_of(&replica.next_topology().await), [9010, 9011]);
    thief
        .register(json!({"port": 9666, "name": "thief", "urls": ["GET/other"]}))
        .await;
    // Nodes are listed in the order their connections were accepted.
    assert_eq!(ports_of(&thief.next_topology().await), [9010, 9666, 9011]);
}

#[tokio::test]
async fn a_node_is_registered_at_its_own_address_and_cannot_take_another_nodes() {
    let distributor = DistributorProcess::start(&[]).await;
    // The finding: `host` was believed as written, pointing the gateway anywhere.
    let mut kv = distributor.node().await;
    kv.register(json!({"port": 9010, "name": "kv", "urls": ["GET/kv"], "host": "10.66.66.66"}))
        .await;
    let first = kv.next_topology().await;
    assert_eq!(hosts_of(&first), ["127.0.0.1"]);

    // The finding: claiming another node's host and port replaced its entry, again and again.
    for _ in 0..3 {
        let mut impostor = distributor.node().await;
        impostor
            .register(json!({"port": 9010, "name": "kv", "urls": ["GET/kv"], "host": "127.0.0.1"}))
            .await;
        let (status, error) = impostor.refusal().await;
        assert_eq!(status, 409, "{error}");
        assert!(
            error.contains("address already registered by another connection"),
            "{error}"
        );
    }
    // The first node is still registered, on a connection still served.
    assert_eq!(kv.ask_topology(1).await, first);

    // From another address the same claim registers that address instead.
    let mut elsewhere = Node::connect_from(distributor.addr, "127.0.0.2".parse().unwrap()).await;
    elsewhere
        .register(json!({"port": 9010, "name": "kv", "urls": ["GET/kv"], "host": "127.0.0.1"}))
        .await;
    assert_eq!(
        hosts_of(&elsewhere.next_topology().await),
        ["127.0.0.1", "127.0.0.2"]
    );
}

#[tokio::test]
async fn only_a_node_that_knows_the_cluster_secret_may_advertise_a_host() {
    let secret = SecretFile::new(b"a cluster secret for this test only");
    let distributor = DistributorProcess::start(&[
        "--cluster-secret-file",
        secret.path(),
        "--allow-legacy-nodes",
    ])
    .await;

    let mut member = Node::authenticated(distributor.addr, &secret.secret).await;
    member
        .register(
            json!({"port": 9010, "name": "kv", "urls": ["GET/kv"], "host": "kv-1.internal",
            "protocol": 2}),
        )
        .await;
    assert_eq!(hosts_of(&member.next_topology().await), ["kv-1.internal"]);

    // An original-design node, let in by --allow-legacy-nodes, did not prove anything.
    let mut legacy = distributor.node().await;
    legacy
        .register(json!({"port": 9020, "name": "old", "urls": ["GET/old"], "host": "10.66.66.66"}))
        .await;
    assert_eq!(
        hosts_of(&legacy.next_topology().await),
        ["kv-1.internal", "127.0.0.1"]
    );
}

#[tokio::test]
async fn with_a_secret_only_nodes_that_prove_it_join_unless_legacy_nodes_are_allowed() {
    let secret = SecretFile::new(b"the right secret");
    let distributor = DistributorProcess::start(&["--cluster-secret-file", secret.path()]).await;

    // An original-design node (or anyone without the secret): one error packet, then closed.
    let mut legacy = distributor.node().await;
    legacy
        .register(json!({"port": 9020, "name": "old", "urls": ["GET/old"]}))
        .await;
    let refusal = legacy.next().await;
    assert_eq!(refusal["status"], 401, "{refusal}");
    assert!(legacy.closed().await, "the connection is closed");

    // The wrong secret fails the handshake.
    let mut wrong = Node::connect_from(distributor.addr, LOCALHOST).await;
    let (reader, mut writer) = wrong.stream.split();
    let wrong_secret = ClusterSecret::new(b"a guess".to_vec());
    assert!(shared::cluster::connect(reader, &mut writer, &wrong_secret)
        .await
        .is_err());

    // The right one registers, and nobody else did.
    let mut member = Node::authenticated(distributor.addr, &secret.secret).await;
    member
        .register(json!({"port": 9010, "name": "kv", "urls": ["GET/kv"], "protocol": 2}))
        .await;
    assert_eq!(ports_of(&member.next_topology().await), [9010]);

    // A node with a secret, at a distributor without one, is told what is wrong.
    let secretless = DistributorProcess::start(&[]).await;
    let mut eager = Node::connect_from(secretless.addr, LOCALHOST).await;
    let (reader, mut writer) = eager.stream.split();
    let err = shared::cluster::connect(reader, &mut writer, &secret.secret)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no cluster secret"), "{err}");

    // With --allow-legacy-nodes the original-design node is served.
    let lenient = DistributorProcess::start(&[
        "--cluster-secret-file",
        secret.path(),
        "--allow-legacy-nodes",
    ])
    .await;
    let mut legacy = lenient.node().await;
    legacy
        .register(json!({"port": 9020, "name": "old", "urls": ["GET/old"]}))
        .await;
    assert_eq!(ports_of(&legacy.next_topology().await), [9020]);
}

#[tokio::test]
async fn registrations_with_huge_names_are_refused_and_later_services_are_still_routed() {
    let distributor = DistributorProcess::start(&[]).await;
    // The finding: 80 registrations with 60 KB names made a topology larger than any node
    // accepts, so services starting afterwards were never routed.
    let name = "x".repeat(60 * 1024);
    let mut attackers = Vec::new();
    for i in 0..80u64 {
        let mut attacker = distributor.node().await;
        attacker
            .register(json!({"port": 20_000 + i, "name": name, "urls": [format!("GET/x{i}")]}))
            .await;
        attackers.push(attacker);
    }
    for attacker in &mut attackers {
        let (status, error) = attacker.refusal().await;
        assert_eq!(status, 400, "{error}");
        assert_eq!(
            error,
            "invalid registration: name is 61440 bytes long, longer than 64"
        );
    }

    // The attackers are still connected; a service starting now is in a small topology.
    let mut kv = distributor.node().await;
    kv.register(json!({"port": 9010, "name": "kv", "urls": ["GET/kv"]}))
        .await;
    let frame = timeout(PROMPTLY, kv.next_frame()).await.unwrap().unwrap();
    assert!(frame.len() < 1024, "{} bytes", frame.len());
    let topology: Value = serde_json::from_slice(&frame).unwrap();
    assert_eq!(ports_of(topology["params"].as_array().unwrap()), [9010]);
}

#[tokio::test]
async fn one_address_holds_a_bounded_number_of_registrations() {
    let distributor = DistributorProcess::start(&["--max-registrations-per-ip", "3"]).await;
    let mut held = Vec::new();
    for port in 1..=3 {
        let mut node = distributor.node().await;
        node.register(json!({"port": port, "name": "kv", "urls": ["GET/kv"]}))
            .await;
        node.next_topology().await;
        held.push(node);
    }
    let mut fourth = distributor.node().await;
    fourth
        .register(json!({"port": 4, "name": "kv", "urls": ["GET/kv"]}))
        .await;
    let (status, error) = fourth.refusal().await;
    assert_eq!(status, 429, "{error}");
    assert_eq!(
        error,
        "127.0.0.1 already holds 3 registrations, the most one address may hold"
    );

    // Another address has its own share.
    let mut other = Node::connect_from(distributor.addr, "127.0.0.2".parse().unwrap()).await;
    other
        .register(json!({"port": 5, "name": "kv", "urls": ["GET/kv"]}))
        .await;
    assert_eq!(ports_of(&other.next_topology().await), [1, 2, 3, 5]);

    // One leaves: there is room again.
    drop(held.remove(0));
    let deadline = Instant::now() + PROMPTLY;
    loop {
        fourth
            .register(json!({"port": 4, "name": "kv", "urls": ["GET/kv"]}))
            .await;
        let answer = fourth.next().await;
        if answer["method"] == "GET" {
            break;
        }
        assert_eq!(answer["status"], 429, "{answer}");
        assert!(Instant::now() < deadline, "the departure frees a place");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_connection_that_never_registers_is_closed_within_seconds() {
    let distributor = DistributorProcess::start(&[]).await;
    let mut silent = distributor.node().await;
    // Closed after the 5 s registration timeout; PROMPTLY only bounds the wait.
    assert!(silent.closed().await, "a silent connection is closed");
}

#[tokio::test]
async fn protected_mode_refuses_a_public_address_without_a_secret() {
    let refused = distributor_command()
        .args(["--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--cluster-secret-file"), "{stderr}");

    // --insecure starts anyway, and says so.
    let mut insecure = distributor_command()
        .args(["--listen", "0.0.0.0:0", "--insecure"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = insecure.stderr.take().unwrap();
    let warned = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .any(|line| line.contains("--insecure"))
    });
    let warned = timeout(PROMPTLY, warned).await;
    let exited = insecure.try_wait().unwrap();
    let _ = insecure.kill();
    let _ = insecure.wait();
    assert!(warned.expect("a warning is logged").unwrap());
    assert!(exited.is_none(), "it keeps running");
}

/// Nodes of the memory test, spread over source addresses so that each stays within the
/// per-address caps.
const MANY_NODES: usize = 2_000;
const NODES_PER_ADDRESS: usize = 250;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_registered_nodes_keep_the_distributors_memory_small() {
    let distributor = DistributorProcess::start(&[]).await;
    let addr = distributor.addr;
    let stop = CancellationToken::new();
    let _stop_nodes = stop.clone().drop_guard();
    let (registered_tx, mut registered) = mpsc::channel::<Result<(), String>>(MANY_NODES);
    // Bounds the connections being set up at once (the listen backlog), not those held.
    let connecting = Arc::new(Semaphore::new(200));
    let mut nodes = JoinSet::new();
    for i in 0..MANY_NODES {
        let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i / NODES_PER_ADDRESS) as u8));
        let (registered, connecting, stop) =
            (registered_tx.clone(), connecting.clone(), stop.clone());
        nodes.spawn(async move {
            let permit = connecting.acquire_owned().await.unwrap();
            let outcome = match Node::try_connect_from(addr, source).await {
                Ok(mut node) => {
                    // Entries of a realistic size: the topology grows to about 200 KB.
                    let name = format!("service-{i:04}");
                    node.register(json!({"port": 10_000 + i, "name": name,
                        "urls": [format!("GET/{name}"), format!("PUT/{name}")]}))
                        .await;
                    read_first_frame_then_drain(node, &registered, permit, &stop).await
                }
                Err(err) => Err(format!("cannot connect: {err}")),
            };
            if let Err(err) = outcome {
                let _ = registered.send(Err(err)).await;
            }
        });
    }
    drop(registered_tx);

    // Every node registered and got its topology; they keep reading whatever follows, as
    // nodes do.
    timeout(Duration::from_secs(60), async {
        for _ in 0..MANY_NODES {
            match registered.recv().await {
                Some(Ok(())) => {}
                Some(Err(err)) => panic!("a node failed: {err}"),
                None => panic!("the nodes ended early"),
            }
        }
    })
    .await
    .expect("2,000 nodes register within a minute");

    let mut watcher = Node::connect_from(addr, "127.0.0.100".parse().unwrap()).await;
    let topology = watcher.ask_topology(1).await;
    assert_eq!(topology.len(), MANY_NODES, "every node is still registered");

    // The finding: 394 MiB here, each connection keeping a buffer as large as the topology.
    let resident = distributor.resident_bytes();
    assert!(
        resident < 100 * 1024 * 1024,
        "the distributor holds {} MiB with {MANY_NODES} nodes",
        resident / (1024 * 1024)
    );
    stop.cancel();
    while nodes.join_next().await.is_some() {}
}

/// Reads a node's first frame (it must be the topology, not a refusal) without keeping it,
/// reports it, then reads and drops everything else until `stop`: a node that stopped reading
/// would be evicted.
async fn read_first_frame_then_drain(
    mut node: Node,
    registered: &mpsc::Sender<Result<(), String>>,
    permit: tokio::sync::OwnedSemaphorePermit,
    stop: &CancellationToken,
) -> Result<(), String> {
    const TOPOLOGY: &[u8] = br#"{"uri":"/distributes","method":"GET""#;
    let mut head = Vec::new();
    let mut previous_last = 0u8;
    let mut first_done = false;
    let mut permit = Some(permit);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            read = node.stream.read(&mut chunk) => read.map_err(|err| err.to_string())?,
        };
        if n == 0 {
            return Err("the distributor closed the connection".into());
        }
        if first_done {
            continue;
        }
        let chunk = &chunk[..n];
        if head.len() < TOPOLOGY.len() {
            let wanted = (TOPOLOGY.len() - head.len()).min(chunk.len());
            head.extend_from_slice(&chunk[..wanted]);
        }
        let ends_frame = chunk.windows(2).any(|w| w == DELIMITER)
            || (previous_last == DELIMITER[0] && chunk[0] == DELIMITER[1]);
        previous_last = chunk[n - 1];
        if ends_frame {
            if head != TOPOLOGY {
                return Err(format!(
                    "not a topology: {}",
                    String::from_utf8_lossy(&head)
                ));
            }
            first_done = true;
            permit.take();
            let _ = registered.send(Ok(())).await;
        }
    }
}
