//! The cluster handshake over real TCP on 127.0.0.1, from both sides: a service served with a
//! secret, reached by the packet client and by plain sockets that try what an attacker on the
//! same network would (no handshake, a wrong secret, a recorded handshake replayed), and the
//! per-IP and loopback limits of the shared accept loop.

use std::{net::SocketAddr, time::Duration};

use serde_json::{json, Value};
use shared::{
    cluster::{self, ClusterPolicy, ClusterSecret},
    server::ConnectionLimits,
    service::{serve, Request, Response, Router, ServiceConfig},
    Dialect, Packet, PacketClient,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::timeout,
};
use tokio_util::sync::CancellationToken;

const PROMPTLY: Duration = Duration::from_secs(10);

fn secret(text: &str) -> Option<ClusterSecret> {
    Some(ClusterSecret::new(text.as_bytes().to_vec()))
}

fn echo_router() -> Router {
    Router::new().route("GET", "/echo", |request: Request| async move {
        Response::ok(json!({ "echo": request.params }))
    })
}

/// Serves the echo router with `policy` and `limits` until dropped.
struct Service {
    addr: SocketAddr,
    shutdown: CancellationToken,
}

impl Service {
    async fn start(policy: ClusterPolicy, limits: ConnectionLimits) -> Service {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let config = ServiceConfig {
            name: "echo".into(),
            cluster: policy,
            limits,
            ..ServiceConfig::default()
        };
        tokio::spawn(serve(listener, echo_router(), config, shutdown.clone()));
        Service { addr, shutdown }
    }

    async fn with_secret(text: &str) -> Service {
        let policy = ClusterPolicy {
            secret: secret(text),
            allow_legacy: false,
        };
        Service::start(policy, ConnectionLimits::default()).await
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Reads `¶`-delimited frames off a plain socket until it closes or `limit` frames arrived.
async fn read_frames(stream: &mut TcpStream, limit: usize) -> Vec<Value> {
    let mut frames = Vec::new();
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    while frames.len() < limit {
        let read = match timeout(PROMPTLY, stream.read(&mut chunk)).await {
            Ok(Ok(read)) => read,
            Ok(Err(_)) => 0,
            Err(_) => panic!("no frame within {PROMPTLY:?}"),
        };
        if read == 0 {
            break;
        }
        buffer.extend_from_slice(&chunk[..read]);
        while let Some(end) = find_delimiter(&buffer) {
            let frame: Vec<u8> = buffer.drain(..end + 2).collect();
            frames.push(serde_json::from_slice(&frame[..end]).unwrap());
        }
    }
    frames
}

fn find_delimiter(buffer: &[u8]) -> Option<usize> {
    buffer.windows(2).position(|pair| pair == "¶".as_bytes())
}

/// True once the peer has closed the connection (reads end), within a bound.
async fn closed_by_peer(stream: &mut TcpStream) -> bool {
    let mut chunk = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + PROMPTLY;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

async fn echo_through(client: &PacketClient) -> Result<Packet, shared::ClientError> {
    timeout(PROMPTLY, client.connected())
        .await
        .expect("connects");
    client
        .request(Packet::request("GET", "/echo", json!({ "n": 1 })))
        .await
}

#[tokio::test]
async fn a_client_with_the_secret_is_served() {
    let service = Service::with_secret("right").await;
    let client: PacketClient = PacketClient::connect_with_secret(
        service.addr.to_string(),
        Dialect::Packet,
        secret("right"),
    );
    let answer = echo_through(&client).await.unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.params["echo"]["n"], 1);
}

#[tokio::test]
async fn a_client_with_another_secret_never_connects() {
    let service = Service::with_secret("right").await;
    let client: PacketClient = PacketClient::connect_with_secret(
        service.addr.to_string(),
        Dialect::Packet,
        secret("wrong"),
    );
    let failures_before = cluster::handshake_failures();
    let connected = timeout(Duration::from_secs(2), client.connected()).await;
    assert!(connected.is_err(), "a wrong secret must not connect");
    assert!(!client.is_connected());
    assert!(cluster::handshake_failures() > failures_before);
}

#[tokio::test]
async fn a_peer_that_skips_the_handshake_gets_one_error_and_is_closed() {
    let service = Service::with_secret("right").await;
    let mut stream = TcpStream::connect(service.addr).await.unwrap();
    stream
        .write_all("{\"uri\":\"/echo\",\"method\":\"GET\",\"key\":1,\"params\":{}}¶".as_bytes())
        .await
        .unwrap();
    let frames = read_frames(&mut stream, 10).await;
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(frames[0]["status"], 401);
    assert!(
        frames[0]["error"].as_str().unwrap().contains("handshake"),
        "{frames:?}"
    );
    assert!(
        !frames[0].to_string().contains("echo\":{"),
        "never answered"
    );
}

#[tokio::test]
async fn a_silent_peer_is_closed_after_the_handshake_timeout() {
    let service = Service::with_secret("right").await;
    let mut stream = TcpStream::connect(service.addr).await.unwrap();
    assert!(closed_by_peer(&mut stream).await);
}

#[tokio::test]
async fn a_recorded_handshake_replayed_on_a_new_connection_is_refused() {
    let service = Service::with_secret("right").await;
    // A recording relay between a real client and the service, as an eavesdropper would see it.
    let relay = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let (recorded_tx, recorded_rx) = tokio::sync::oneshot::channel::<Vec<u8>>();
    let upstream = service.addr;
    tokio::spawn(async move {
        let (mut client_side, _) = relay.accept().await.unwrap();
        let mut server_side = TcpStream::connect(upstream).await.unwrap();
        let mut recorded = Vec::new();
        let mut from_client = [0u8; 4096];
        let mut from_server = [0u8; 4096];
        // Relay until the client has sent its HELLO and PROOF (two frames).
        while recorded
            .windows(2)
            .filter(|pair| *pair == "¶".as_bytes())
            .count()
            < 2
        {
            tokio::select! {
                read = client_side.read(&mut from_client) => {
                    let read = read.unwrap();
                    recorded.extend_from_slice(&from_client[..read]);
                    server_side.write_all(&from_client[..read]).await.unwrap();
                }
                read = server_side.read(&mut from_server) => {
                    let read = read.unwrap();
                    client_side.write_all(&from_server[..read]).await.unwrap();
                }
            }
        }
        let _ = recorded_tx.send(recorded);
        let _ = tokio::io::copy_bidirectional(&mut client_side, &mut server_side).await;
    });
    let client: PacketClient =
        PacketClient::connect_with_secret(relay_addr.to_string(), Dialect::Packet, secret("right"));
    assert_eq!(echo_through(&client).await.unwrap().status(), 200);
    let recorded = timeout(PROMPTLY, recorded_rx).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&recorded).contains("PROOF"));

    // The eavesdropper replays the client's half of the handshake, then asks for something.
    let mut replay = TcpStream::connect(service.addr).await.unwrap();
    replay.write_all(&recorded).await.unwrap();
    replay
        .write_all("{\"uri\":\"/echo\",\"method\":\"GET\",\"key\":1,\"params\":{}}¶".as_bytes())
        .await
        .unwrap();
    let frames = read_frames(&mut replay, 10).await;
    assert!(
        frames.iter().all(|frame| frame["key"] != 1),
        "the replayed connection was served: {frames:?}"
    );
    let refusal = frames.last().expect("an error packet");
    assert_eq!(refusal["status"], 401, "{frames:?}");
    assert!(refusal["error"].as_str().unwrap().contains("secret"));
}

#[tokio::test]
async fn a_client_with_a_secret_is_told_when_the_node_has_none() {
    let service = Service::start(ClusterPolicy::default(), ConnectionLimits::default()).await;
    let mut stream = TcpStream::connect(service.addr).await.unwrap();
    let (mut read_half, mut write_half) = stream.split();
    let err = cluster::connect(&mut read_half, &mut write_half, &secret("right").unwrap())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no cluster secret"), "{err}");
}

#[tokio::test]
async fn original_design_nodes_are_served_only_when_allowed() {
    let legacy_request = "{\"uri\":\"/echo\",\"method\":\"GET\",\"params\":{\"key\":7}}¶";
    let allowing = Service::start(
        ClusterPolicy {
            secret: secret("right"),
            allow_legacy: true,
        },
        ConnectionLimits::default(),
    )
    .await;
    let mut stream = TcpStream::connect(allowing.addr).await.unwrap();
    stream.write_all(legacy_request.as_bytes()).await.unwrap();
    let frames = read_frames(&mut stream, 1).await;
    assert_eq!(frames[0]["key"], 7);
    assert!(frames[0].get("status").is_none(), "{frames:?}");

    let refusing = Service::with_secret("right").await;
    let mut stream = TcpStream::connect(refusing.addr).await.unwrap();
    stream.write_all(legacy_request.as_bytes()).await.unwrap();
    let frames = read_frames(&mut stream, 10).await;
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0]["status"], 401);
}

#[tokio::test]
async fn connections_over_the_per_ip_cap_are_closed_at_once() {
    let limits = ConnectionLimits {
        max_per_ip: 3,
        ..ConnectionLimits::default()
    };
    let service = Service::start(ClusterPolicy::default(), limits).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let client = PacketClient::connect(service.addr.to_string(), Dialect::Packet);
        assert_eq!(echo_through(&client).await.unwrap().status(), 200);
        held.push(client);
    }
    let mut fourth = TcpStream::connect(service.addr).await.unwrap();
    assert!(closed_by_peer(&mut fourth).await, "over the cap: closed");
    drop(held);
    // The slots come back when the connections close.
    let client = PacketClient::connect(service.addr.to_string(), Dialect::Packet);
    let answer = timeout(PROMPTLY, async {
        loop {
            if let Ok(answer) = echo_through(&client).await {
                return answer;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(answer.status(), 200);
}

#[tokio::test]
async fn loopback_only_refuses_other_addresses() {
    // The only non-loopback address a test can reach is one of this machine's own: bind to all
    // interfaces and connect through the first non-loopback address the host has, if any.
    let Some(own_ip) = own_non_loopback_ip() else {
        eprintln!("SKIP: this machine has no non-loopback address to connect from");
        return;
    };
    let listener = TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let shutdown = CancellationToken::new();
    let config = ServiceConfig {
        name: "echo".into(),
        limits: ConnectionLimits {
            loopback_only: true,
            ..ConnectionLimits::default()
        },
        ..ServiceConfig::default()
    };
    tokio::spawn(serve(listener, echo_router(), config, shutdown.clone()));
    let mut outside = TcpStream::connect((own_ip, port)).await.unwrap();
    assert!(
        closed_by_peer(&mut outside).await,
        "a non-loopback peer is closed"
    );
    let client = PacketClient::connect(format!("127.0.0.1:{port}"), Dialect::Packet);
    assert_eq!(echo_through(&client).await.unwrap().status(), 200);
    shutdown.cancel();
}

fn own_non_loopback_ip() -> Option<std::net::IpAddr> {
    // Connecting a UDP socket sends nothing; it only picks the interface a route would use.
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}
