//! The distributor in-process on 127.0.0.1, with nodes that are plain sockets writing JSON + `¶` by
//! hand (as an original-design node would) or real services built on the shared runtime:
//! registration and topology broadcasts, departures and evictions, heartbeats, a distributor
//! restart, bad input, and many nodes coming and going.

use std::{
    net::{Ipv6Addr, SocketAddr},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

mod common;

use common::{ports_of, Node, DELIMITER, PROMPTLY};
use distributor::{Config, Registry};
use serde_json::{json, Value};
use shared::{
    distributor_client::DistributorClient,
    packet::Registration,
    service::{serve, Response, Router, ServiceConfig},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::oneshot,
    task::{JoinHandle, JoinSet},
    time::{timeout, Instant},
};
use tokio_util::sync::CancellationToken;

/// Short heartbeats, so that evictions happen within a test's patience.
fn fast_heartbeats() -> Config {
    Config {
        heartbeat_interval: Duration::from_millis(200),
        heartbeat_timeout: Duration::from_secs(1),
        ..Config::default()
    }
}

/// Counts panics on the current thread. The test runtime is single-threaded, so the distributor's
/// connection tasks run here too, and a task that panics would otherwise only leave a line on
/// stderr while the test goes on.
struct Panics(Arc<AtomicUsize>);

impl Panics {
    fn watch() -> Panics {
        let count = Arc::new(AtomicUsize::new(0));
        let thread = std::thread::current().id();
        let previous = std::panic::take_hook();
        let counter = count.clone();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().id() == thread {
                counter.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
        Panics(count)
    }

    fn assert_none(&self) {
        assert_eq!(
            self.0.load(Ordering::SeqCst),
            0,
            "a task panicked (see stderr)"
        );
    }
}

/// A distributor served in-process, with its registry at hand; stopped when dropped.
struct Distributor {
    addr: SocketAddr,
    registry: Registry,
    shutdown: CancellationToken,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl Distributor {
    async fn start(config: Config) -> Distributor {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Distributor::start_on(listener, config)
    }

    fn start_on(listener: TcpListener, config: Config) -> Distributor {
        let addr = listener.local_addr().unwrap();
        let registry = Registry::default();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(distributor::run_with_registry(
            listener,
            config,
            registry.clone(),
            shutdown.clone(),
        ));
        Distributor {
            addr,
            registry,
            shutdown,
            task: Some(task),
        }
    }

    async fn stop(&mut self) {
        self.shutdown.cancel();
        let task = self.task.take().expect("running");
        timeout(PROMPTLY, task)
            .await
            .expect("the distributor stops promptly")
            .unwrap()
            .unwrap();
    }

    async fn node(&self) -> Node {
        Node::connect(self.addr).await
    }

    /// The registered ports once `done` holds for them.
    async fn wait_for_ports(&self, within: Duration, done: impl Fn(&[u16]) -> bool) -> Vec<u16> {
        let waited = timeout(within, async {
            loop {
                let ports: Vec<u16> = self.registry.nodes().iter().map(|n| n.port).collect();
                if done(&ports) {
                    return ports;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        waited.unwrap_or_else(|_| {
            panic!(
                "registry never reached the expected state: {:?}",
                self.registry.nodes()
            )
        })
    }
}

impl Drop for Distributor {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn original_design(port: u16, name: &str) -> Value {
    json!({"port": port, "name": name, "urls": [format!("GET/{name}")]})
}

#[tokio::test]
async fn a_registered_node_gets_the_topology_and_every_other_node_the_update() {
    let panics = Panics::watch();
    let distributor = Distributor::start(Config::default()).await;

    let mut a = distributor.node().await;
    a.register(json!({"port": 9001, "name": "a", "urls": ["GET/a"]}))
        .await;
    let a_entry = json!({"host": "127.0.0.1", "port": 9001, "name": "a", "urls": ["GET/a"]});
    assert_eq!(a.next_topology().await, vec![a_entry.clone()]);

    // `protocol` passes through; `host` is ignored from a node that did not authenticate with
    // the cluster secret (there is none here): the socket's address is used.
    let mut b = distributor.node().await;
    b.register(
        json!({"port": 9002, "name": "b", "urls": ["GET/b", "PUT/b"],
        "host": "10.1.2.3", "protocol": 2}),
    )
    .await;
    let b_entry = json!({"host": "127.0.0.1", "port": 9002, "name": "b",
        "urls": ["GET/b", "PUT/b"], "protocol": 2});
    let both = vec![a_entry.clone(), b_entry.clone()];
    assert_eq!(b.next_topology().await, both);
    assert_eq!(a.next_topology().await, both);

    // A blank host means "use the socket's"; urls may be left out.
    let mut c = distributor.node().await;
    c.register(json!({"port": 9003, "name": "c", "host": " "}))
        .await;
    let c_entry = json!({"host": "127.0.0.1", "port": 9003, "name": "c", "urls": []});
    let all = vec![a_entry, b_entry, c_entry];
    assert_eq!(c.next_topology().await, all);
    assert_eq!(a.next_topology().await, all);
    assert_eq!(b.next_topology().await, all);
    assert_eq!(
        distributor.wait_for_ports(PROMPTLY, |p| p.len() == 3).await,
        [9001, 9002, 9003]
    );

    // Any node may also ask for the topology.
    a.send(json!({"uri": "/distributes", "method": "GET", "key": 5, "params": null}))
        .await;
    let answer = a.next().await;
    assert_eq!(answer["key"], 5);
    assert_eq!(answer["params"].as_array().unwrap(), &all);
    panics.assert_none();
}

#[tokio::test]
async fn a_closed_connection_is_removed_and_the_others_are_told_at_once() {
    let panics = Panics::watch();
    let distributor = Distributor::start(Config::default()).await;
    let mut nodes = Vec::new();
    for (port, name) in [(9001, "a"), (9002, "b"), (9003, "c")] {
        let mut node = distributor.node().await;
        node.register(original_design(port, name)).await;
        assert!(ports_of(&node.next_topology().await).contains(&port));
        nodes.push(node);
    }
    let [mut a, b, mut c] = <[Node; 3]>::try_from(nodes).ok().unwrap();
    // The last to join is up to date already; the first catches up.
    a.topology_with_ports(&[9001, 9002, 9003]).await;

    drop(b);
    assert_eq!(ports_of(&a.next_topology().await), [9001, 9003]);
    assert_eq!(ports_of(&c.next_topology().await), [9001, 9003]);
    assert_eq!(
        distributor.wait_for_ports(PROMPTLY, |p| p.len() == 2).await,
        [9001, 9003]
    );
    panics.assert_none();
}

#[tokio::test]
async fn a_protocol_2_node_that_falls_silent_is_evicted() {
    let panics = Panics::watch();
    let distributor = Distributor::start(fast_heartbeats()).await;
    let mut watcher = distributor.node().await;
    watcher.register(original_design(9001, "watcher")).await;
    watcher.topology_with_ports(&[9001]).await;

    // Registers as a protocol-2 node, then neither reads nor writes: a frozen process.
    let mut frozen = distributor.node().await;
    frozen
        .send(json!({"uri": "/distributes", "method": "POST", "key": 0,
            "params": {"port": 9002, "name": "frozen", "urls": ["GET/frozen"], "protocol": 2}}))
        .await;
    watcher.topology_with_ports(&[9001, 9002]).await;

    // Evicted after the 1 s heartbeat timeout; this only bounds the wait.
    assert_eq!(ports_of(&watcher.next_topology().await), [9001]);
    assert_eq!(
        distributor.wait_for_ports(PROMPTLY, |p| p.len() == 1).await,
        [9001]
    );

    // What the frozen node would have seen: its topology, heartbeats, then the connection closed.
    let mut frames = Vec::new();
    timeout(PROMPTLY, async {
        while let Some(frame) = frozen.next_frame().await {
            frames.push(serde_json::from_slice::<Value>(&frame).unwrap());
        }
    })
    .await
    .expect("the distributor closed the frozen node's connection");
    assert_eq!(frames[0]["uri"], "/distributes");
    assert!(
        frames[1..].iter().all(|f| f["uri"] == "/heartbeat"),
        "{frames:?}"
    );
    assert!(frames.len() > 1, "the frozen node was sent heartbeats");
    panics.assert_none();
}

#[tokio::test]
async fn heartbeats_go_only_to_protocol_2_nodes_and_echoing_keeps_them_registered() {
    let panics = Panics::watch();
    let distributor = Distributor::start(fast_heartbeats()).await;
    // An original-design node: only the registration, then it just reads.
    let mut old = distributor.node().await;
    old.register(original_design(9001, "old")).await;
    old.topology_with_ports(&[9001]).await;
    // A protocol-2 node that echoes every heartbeat.
    let mut new = distributor.node().await;
    new.register(json!({"port": 9002, "name": "new", "protocol": 2}))
        .await;
    new.topology_with_ports(&[9001, 9002]).await;
    old.topology_with_ports(&[9001, 9002]).await;

    // Several heartbeat timeouts (1 s each) go by.
    let deadline = Instant::now() + Duration::from_millis(3500);
    let (old_saw, new_saw) = tokio::join!(
        async {
            let packets = old.read_until(deadline).await;
            (packets, old.heartbeats)
        },
        async {
            let packets = new.read_until(deadline).await;
            (packets, new.heartbeats)
        },
    );
    assert_eq!(
        old_saw,
        (vec![], 0),
        "an original-design node gets no heartbeats"
    );
    assert!(
        new_saw.0.is_empty(),
        "no topology change meanwhile: {:?}",
        new_saw.0
    );
    assert!(new_saw.1 > 0, "a protocol-2 node gets heartbeats");
    assert_eq!(distributor.registry.nodes().len(), 2);

    // Both connections are still served.
    old.send(json!({"uri": "/distributes", "method": "GET", "key": 3, "params": null}))
        .await;
    let answer = old.next().await;
    assert_eq!(answer["key"], 3);
    assert_eq!(ports_of(answer["params"].as_array().unwrap()), [9001, 9002]);
    panics.assert_none();
}

#[tokio::test]
async fn a_protocol_2_node_that_registers_late_is_not_flooded_with_heartbeats() {
    let panics = Panics::watch();
    let config = Config {
        heartbeat_interval: Duration::from_millis(10),
        heartbeat_timeout: Duration::from_secs(1),
        ..Config::default()
    };
    let distributor = Distributor::start(config).await;
    let mut node = distributor.node().await;
    // Connected, but registering only after many heartbeat intervals went by.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    node.register(json!({"port": 9001, "name": "late", "protocol": 2}))
        .await;
    node.topology_with_ports(&[9001]).await;
    let packets = node
        .read_until(Instant::now() + Duration::from_millis(500))
        .await;
    assert!(packets.is_empty(), "{packets:?}");
    assert_eq!(distributor.registry.nodes().len(), 1, "still registered");
    panics.assert_none();
}

/// A service on the shared runtime, registered with the distributor at `distributor`.
async fn start_service(
    name: &str,
    distributor: SocketAddr,
    shutdown: &CancellationToken,
) -> (u16, JoinHandle<std::io::Result<()>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let router = Router::new().route("GET", &format!("/{name}"), |_| async {
        Response::ok("hello")
    });
    let config = ServiceConfig {
        name: name.into(),
        distributor: Some(distributor.to_string()),
        advertise_host: None,
        ..ServiceConfig::default()
    };
    (
        port,
        tokio::spawn(serve(listener, router, config, shutdown.clone())),
    )
}

#[tokio::test]
async fn every_node_is_back_after_a_distributor_restart() {
    let panics = Panics::watch();
    let mut first = Distributor::start(fast_heartbeats()).await;
    let addr = first.addr;
    let services_shutdown = CancellationToken::new();
    let _stop_services = services_shutdown.clone().drop_guard();
    let mut ports = Vec::new();
    for name in ["kv", "notice", "other"] {
        let (port, _service) = start_service(name, addr, &services_shutdown).await;
        ports.push(port);
    }
    let watcher_registration = Registration {
        port: 1,
        name: "watcher".into(),
        urls: vec![],
        host: None,
        protocol: Some(2),
        ..Registration::default()
    };
    let mut topology = DistributorClient::spawn(
        addr.to_string(),
        watcher_registration,
        services_shutdown.child_token(),
    );
    let has_every_service = |topology: &Arc<shared::Topology>, extra: Option<u16>| {
        let registered: Vec<u16> = topology.iter().map(|n| n.port).collect();
        ports
            .iter()
            .chain(&[1])
            .chain(&extra)
            .all(|p| registered.contains(p))
    };
    let seen = timeout(PROMPTLY, topology.wait_for(|t| has_every_service(t, None)))
        .await
        .expect("every node registers")
        .unwrap()
        .clone();
    for node in seen.iter().filter(|n| n.port != 1) {
        assert_eq!(node.host, "127.0.0.1");
        assert_eq!(node.protocol, Some(2));
        assert_eq!(node.urls, [format!("GET/{}", node.name)]);
    }

    first.stop().await;
    // A new distributor on the same address, with an empty registry.
    let listener = timeout(PROMPTLY, async {
        loop {
            match TcpListener::bind(addr).await {
                Ok(listener) => return listener,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await
    .expect("the address can be bound again");
    let second = Distributor::start_on(listener, fast_heartbeats());
    assert!(second.registry.nodes().is_empty());

    // Nodes retry every 3 s.
    let mut expected: Vec<u16> = ports.iter().copied().chain([1]).collect();
    expected.sort_unstable();
    second
        .wait_for_ports(Duration::from_secs(15), |registered| {
            let mut registered = registered.to_vec();
            registered.sort_unstable();
            registered == expected
        })
        .await;

    // The watcher hears from the new distributor: a node that only ever joined it shows up.
    let mut late = second.node().await;
    late.register(original_design(2, "late")).await;
    timeout(
        PROMPTLY,
        topology.wait_for(|t| has_every_service(t, Some(2))),
    )
    .await
    .expect("the watcher gets the new distributor's topology")
    .unwrap();
    panics.assert_none();
}

#[tokio::test]
async fn bad_input_gets_clear_errors_and_never_disturbs_other_nodes() {
    let panics = Panics::watch();
    let distributor = Distributor::start(Config::default()).await;
    let mut bystander = distributor.node().await;
    bystander.register(original_design(9001, "bystander")).await;
    bystander.topology_with_ports(&[9001]).await;

    // Connections that only ever send junk and leave, at the same time as the rest.
    let mut junk = JoinSet::new();
    for case in 0..3u8 {
        let addr = distributor.addr;
        junk.spawn(async move {
            let mut node = Node::connect(addr).await;
            match case {
                // Garbage without any delimiter, well past the frame limit.
                0 => node.send_bytes(&vec![0xab; 256 * 1024]).await,
                // Half a registration, then gone.
                1 => {
                    node.send_bytes(br#"{"uri":"/distributes","method":"POST","#)
                        .await
                }
                // Binary noise with delimiters in it.
                _ => {
                    for _ in 0..100 {
                        node.send_bytes(b"\x00\xff\x13\x37").await;
                        node.send_bytes(DELIMITER).await;
                    }
                }
            }
        });
    }

    let mut bad = distributor.node().await;
    // Garbage, and JSON that is broken: nothing can be answered.
    bad.send_bytes(&(0..4096u32).map(|i| (i * 7 + 3) as u8).collect::<Vec<u8>>())
        .await;
    bad.send_bytes(DELIMITER).await;
    bad.send_bytes(r#"{"uri":"/distributes","method":"POST","key":5,"params":{¶"#.as_bytes())
        .await;
    // Over the 64 KiB default frame limit.
    let mut oversized =
        br#"{"uri":"/distributes","method":"POST","key":0,"params":{"port":9,"name":""#.to_vec();
    oversized.resize(100 * 1024, b'x');
    oversized.extend_from_slice(br#""}}"#);
    oversized.extend_from_slice(DELIMITER);
    bad.send_bytes(&oversized).await;

    // JSON that is not a packet, with a key: answered 400 with that key.
    bad.send(json!({"uri": 1, "method": "POST", "key": 6, "params": {}}))
        .await;
    let answer = bad.next().await;
    assert_eq!(
        (&answer["key"], &answer["status"]),
        (&json!(6), &json!(400)),
        "{answer}"
    );
    assert!(answer["error"].as_str().unwrap().contains("invalid packet"));

    // Registrations with missing or wrong fields: 400 and a reason, nothing registered.
    for params in [
        json!({"name": "x", "urls": []}),
        json!({"port": 1}),
        json!({"port": "abc", "name": "x"}),
        json!({"port": 70000, "name": "x"}),
        json!({"port": -1, "name": "x"}),
        json!({"port": 1, "name": ""}),
        json!({"port": 1, "name": "x", "urls": ["kv"]}),
        json!({"port": 1, "name": "x", "urls": ["get/kv"]}),
        json!({"port": 1, "name": "x", "urls": "GET/kv"}),
        json!({"port": 1, "name": "x", "protocol": "two"}),
        json!(null),
        json!([9002, "x"]),
    ] {
        bad.send(json!({"uri": "/distributes", "method": "POST", "key": 0, "params": params}))
            .await;
        let answer = bad.next().await;
        assert_eq!(answer["status"], 400, "{params}: {answer}");
        assert_eq!(
            (&answer["uri"], &answer["method"], &answer["key"]),
            (&json!("/distributes"), &json!("POST"), &json!(0)),
            "{answer}"
        );
        let error = answer["error"].as_str().unwrap();
        assert!(
            error.starts_with("invalid registration"),
            "{params}: {error}"
        );
    }

    // Unknown routes: 404.
    for (method, uri) in [("GET", "/nothing"), ("DELETE", "/distributes")] {
        bad.send(json!({"uri": uri, "method": method, "key": 7, "params": null}))
            .await;
        let answer = bad.next().await;
        assert_eq!(
            (&answer["key"], &answer["status"]),
            (&json!(7), &json!(404)),
            "{answer}"
        );
        assert!(answer["error"].as_str().unwrap().contains(uri));
    }

    timeout(PROMPTLY, async {
        while let Some(done) = junk.join_next().await {
            done.unwrap();
        }
    })
    .await
    .unwrap();

    // The bad connection still works, and registered nothing.
    bad.send(json!({"uri": "/distributes", "method": "GET", "key": 8, "params": null}))
        .await;
    let answer = bad.next().await;
    assert_eq!(answer["key"], 8);
    assert_eq!(ports_of(answer["params"].as_array().unwrap()), [9001]);

    // New nodes are still served, and the bystander's next news is just that.
    let mut newcomer = distributor.node().await;
    newcomer.register(original_design(9003, "newcomer")).await;
    assert_eq!(ports_of(&newcomer.next_topology().await), [9001, 9003]);
    assert_eq!(ports_of(&bystander.next_topology().await), [9001, 9003]);

    // A correct registration on the connection that misbehaved is accepted.
    bad.register(original_design(9002, "reformed")).await;
    bad.topology_with_ports(&[9001, 9002, 9003]).await;
    bystander.topology_with_ports(&[9001, 9002, 9003]).await;
    panics.assert_none();
}

/// A listener on `[::]` that also takes IPv4 connections, which then show up with IPv4-mapped
/// peer addresses (`::ffff:127.0.0.1`), as behind the original design's dual-stack servers.
fn dual_stack_listener() -> TcpListener {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV6, Type::STREAM, None).unwrap();
    socket.set_only_v6(false).unwrap();
    let any: SocketAddr = "[::]:0".parse().unwrap();
    socket.bind(&any.into()).unwrap();
    socket.listen(128).unwrap();
    socket.set_nonblocking(true).unwrap();
    TcpListener::from_std(socket.into()).unwrap()
}

#[tokio::test]
async fn an_original_design_node_registers_and_gets_the_topology_with_plain_ipv4_hosts() {
    let panics = Panics::watch();
    let distributor = Distributor::start_on(dual_stack_listener(), Config::default());
    let port = distributor.addr.port();

    // Exactly what an original-design node writes and reads: no protocol, no heartbeats.
    let mut v4 = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    v4.write_all(
        r#"{"uri":"/distributes","method":"POST","key":0,"params":{"port":9010,"name":"kv","urls":["GET/kv","PUT/kv"]}}¶"#
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut received = Vec::new();
    let frame = timeout(PROMPTLY, async {
        loop {
            let mut chunk = [0u8; 4096];
            let n = v4.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the connection stays open");
            received.extend_from_slice(&chunk[..n]);
            if let Some(end) = received.windows(2).position(|w| w == DELIMITER) {
                return String::from_utf8(received[..end].to_vec()).unwrap();
            }
        }
    })
    .await
    .unwrap();
    let topology: Value = serde_json::from_str(&frame).unwrap();
    assert_eq!(
        topology,
        json!({"uri": "/distributes", "method": "GET", "key": 0,
            "params": [{"host": "127.0.0.1", "port": 9010, "name": "kv", "urls": ["GET/kv", "PUT/kv"]}]}),
        "{frame}"
    );

    // A real IPv6 peer keeps its address.
    let mut v6 = Node::connect(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), port)).await;
    v6.register(original_design(9011, "v6")).await;
    let topology = v6.next_topology().await;
    let hosts: Vec<&str> = topology
        .iter()
        .map(|n| n["host"].as_str().unwrap())
        .collect();
    assert_eq!(hosts, ["127.0.0.1", "::1"]);
    panics.assert_none();
}

#[tokio::test]
async fn memory_stays_bounded_with_many_nodes_coming_and_going() {
    let panics = Panics::watch();
    const NODES: u16 = 2000;
    const AT_ONCE: u16 = 100;
    let distributor = Distributor::start(Config::default()).await;

    // A node that stays connected and keeps reading every broadcast while the others churn.
    let mut watcher = distributor.node().await;
    watcher.register(original_design(1, "watcher")).await;
    watcher.topology_with_ports(&[1]).await;
    let (stop_watching, stop) = oneshot::channel::<()>();
    let watching = tokio::spawn(async move {
        let (mut topologies, mut last) = (0usize, Vec::new());
        tokio::select! {
            _ = stop => {}
            _ = async {
                loop {
                    last = watcher.next_topology().await;
                    topologies += 1;
                }
            } => {}
        }
        (watcher, topologies, last)
    });

    let addr = distributor.addr;
    timeout(Duration::from_secs(120), async {
        for batch in 0..NODES / AT_ONCE {
            let mut nodes = JoinSet::new();
            for i in 0..AT_ONCE {
                let port = 10_000 + batch * AT_ONCE + i;
                nodes.spawn(async move {
                    let mut node = Node::connect(addr).await;
                    node.register(original_design(port, "churn")).await;
                    let topology = node.next_topology().await;
                    assert!(ports_of(&topology).contains(&port));
                });
            }
            while let Some(done) = nodes.join_next().await {
                done.unwrap();
            }
        }
    })
    .await
    .expect("every node registers and leaves");

    assert_eq!(
        distributor.wait_for_ports(PROMPTLY, |p| p.len() == 1).await,
        [1]
    );
    stop_watching.send(()).unwrap();
    let (mut watcher, topologies, last) = timeout(PROMPTLY, watching).await.unwrap().unwrap();
    assert!(topologies > 0, "the watcher was told about the churn");
    // The last word it gets is "only you", whether it read it already or not.
    if ports_of(&last) != [1] {
        watcher.topology_with_ports(&[1]).await;
    }

    drop(watcher);
    distributor.wait_for_ports(PROMPTLY, |p| p.is_empty()).await;
    let mut fresh = distributor.node().await;
    fresh.register(original_design(9999, "fresh")).await;
    assert_eq!(ports_of(&fresh.next_topology().await), [9999]);
    panics.assert_none();
}
