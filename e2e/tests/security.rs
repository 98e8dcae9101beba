//! The attacks of the security review, replayed against the real binaries with authentication
//! on, as an attacker on the same network would try them: join the cluster as a service, call
//! the API without a token or with too few scopes, read someone else's whispers, use the kv text
//! port without `auth<>`. Each must now fail safe while the real users keep being served.

use std::time::Duration;

use e2e::{read_text_answers, sse::EventStream, Checks, Stack, StackOptions};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(10);

/// A client that sends no token unless asked.
fn anonymous() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Reads `¶`-delimited frames until the peer closes or `WAIT` passes.
async fn frames_until_closed(socket: &mut tokio::net::TcpStream) -> Vec<Value> {
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    let _ = tokio::time::timeout(WAIT, async {
        loop {
            match socket.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(read) => bytes.extend_from_slice(&chunk[..read]),
            }
        }
    })
    .await;
    String::from_utf8_lossy(&bytes)
        .split('¶')
        .filter(|frame| !frame.trim().is_empty())
        .filter_map(|frame| serde_json::from_str(frame).ok())
        .collect()
}

#[tokio::test]
async fn a_node_without_the_cluster_secret_cannot_take_over_a_route() {
    let stack = Stack::start(StackOptions {
        notice: false,
        ..StackOptions::default()
    })
    .await;
    let mut checks = Checks::new("a rogue node on the distributor");
    let put = stack
        .http
        .put(stack.url("/kv/secret"))
        .body("the real value")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), StatusCode::OK);

    // A rogue service registers GET/kv and PUT/kv, as the original attack did.
    let mut rogue = tokio::net::TcpStream::connect(("127.0.0.1", stack.distributor_port))
        .await
        .unwrap();
    let registration = json!({"uri": "/distributes", "method": "POST", "key": 1,
        "params": {"port": 1, "name": "kv", "urls": ["GET/kv", "PUT/kv"], "protocol": 2}});
    rogue
        .write_all(format!("{registration}¶").as_bytes())
        .await
        .unwrap();
    let frames = frames_until_closed(&mut rogue).await;
    assert!(
        frames.iter().any(|frame| frame["status"] == 401),
        "the rogue gets a handshake error: {frames:?}"
    );
    checks.pass("a registration without the handshake is refused with 401 and closed");

    let topology = stack.topology().await.unwrap();
    let kv_nodes: Vec<&Value> = topology["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|node| node["name"] == "kv")
        .collect();
    assert_eq!(kv_nodes.len(), 1, "{topology:#}");
    for _ in 0..10 {
        let get = stack.get_json("/kv/secret").await;
        assert_eq!(get["value"], "the real value");
    }
    checks.pass("the topology is unchanged and 10 of 10 reads get the real value");
}

#[tokio::test]
async fn callers_need_a_valid_token_with_the_route_scope() {
    let stack = Stack::start(StackOptions::default()).await;
    let secrets = stack.secrets.as_ref().unwrap();
    let mut checks = Checks::new("tokens and scopes at the gateway");
    let http = anonymous();

    for (method, path) in [
        ("GET", "/kv/a"),
        ("PUT", "/kv/a"),
        ("POST", "/notices"),
        ("GET", "/notices"),
        ("DELETE", "/notices/subscribers/alice"),
        ("GET", "/_/topology"),
        ("GET", "/metrics"),
    ] {
        let response = http
            .request(method.parse().unwrap(), stack.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "{method} {path}"
        );
        assert!(response
            .headers()
            .get("www-authenticate")
            .is_some_and(|value| value.to_str().unwrap().starts_with("Bearer")));
    }
    checks.pass("no token: 401 with WWW-Authenticate: Bearer on kv, notices and admin routes");

    let reader = secrets.mint("reader", &["kv:read"]);
    let write = http
        .put(stack.url("/kv/a"))
        .header("authorization", bearer(&reader))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(write.status(), StatusCode::FORBIDDEN);
    let body: Value = write.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("kv:write"),
        "{body}"
    );
    let read = http
        .get(stack.url("/kv/a"))
        .header("authorization", bearer(&reader))
        .send()
        .await
        .unwrap();
    assert_eq!(
        read.status(),
        StatusCode::NOT_FOUND,
        "allowed through, no such key"
    );
    checks.pass("a kv:read token reads but cannot write (403 naming kv:write)");

    let mut forged = reader.clone();
    forged.pop();
    forged.push(if reader.ends_with('A') { 'B' } else { 'A' });
    let response = http
        .get(stack.url("/kv/a"))
        .header("authorization", bearer(&forged))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    checks.pass("a token with a changed signature is 401");
}

#[tokio::test]
async fn whispers_reach_only_their_addressee() {
    let stack = Stack::start(StackOptions {
        kv_replicas: 0,
        ..StackOptions::default()
    })
    .await;
    let secrets = stack.secrets.as_ref().unwrap();
    let mut checks = Checks::new("whisper privacy");
    let alice_token = secrets.mint("alice", &["notice:subscribe"]);
    let bob_token = secrets.mint("bob", &["notice:subscribe"]);
    let as_user = |token: &str| {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("authorization", bearer(token).parse().unwrap());
        reqwest::Client::builder()
            .default_headers(headers)
            .build()
            .unwrap()
    };
    let (alice, bob) = (as_user(&alice_token), as_user(&bob_token));

    let refused = bob
        .get(stack.url("/notices/stream?name=alice"))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    checks.pass("bob cannot open a stream named alice (403)");

    let mut alice_stream = EventStream::open(&alice, &stack.url("/notices/stream"), None)
        .await
        .unwrap();
    let mut bob_stream = EventStream::open(&bob, &stack.url("/notices/stream"), None)
        .await
        .unwrap();
    // Both must be live before the whisper, or a replay would be what delivers it.
    stack.wait_for_subscribers(&["alice", "bob"]).await;

    let whisper = stack
        .http
        .post(stack.url("/notices"))
        .json(&json!({"message": "for alice only", "to": "alice"}))
        .send()
        .await
        .unwrap();
    assert_eq!(whisper.status(), StatusCode::CREATED);
    let broadcast = stack
        .http
        .post(stack.url("/notices"))
        .json(&json!({"message": "for everyone"}))
        .send()
        .await
        .unwrap();
    assert_eq!(broadcast.status(), StatusCode::CREATED);

    let first = alice_stream.next_within(WAIT).await.unwrap();
    assert_eq!(first.json()["message"], "for alice only", "{first:?}");
    let first = bob_stream.next_within(WAIT).await.unwrap();
    assert_eq!(first.json()["message"], "for everyone", "{first:?}");
    checks.pass("alice's whisper reaches alice's stream; bob's stream gets only the broadcast");

    let listing = |client: &reqwest::Client| {
        let request = client.get(stack.url("/notices")).send();
        async move {
            let body: Value = request.await.unwrap().json().await.unwrap();
            body["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|item| item["message"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(listing(&bob).await, ["for everyone"]);
    assert_eq!(listing(&alice).await, ["for alice only", "for everyone"]);
    checks.pass("GET /notices hides alice's whisper from bob and shows it to alice");

    let mut bob_replay = EventStream::open(&bob, &stack.url("/notices/stream?after=0"), None)
        .await
        .unwrap();
    let replayed = bob_replay.next_within(WAIT).await.unwrap();
    assert_eq!(replayed.json()["message"], "for everyone", "{replayed:?}");
    checks.pass("a replay from 0 as bob skips alice's whisper");
}

#[tokio::test]
async fn the_kv_text_port_requires_auth() {
    let stack = Stack::start(StackOptions {
        notice: false,
        ..StackOptions::default()
    })
    .await;
    let secrets = stack.secrets.as_ref().unwrap();
    let mut checks = Checks::new("kv text port authentication");
    let port = stack.kv[0].text_port;

    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    socket.write_all(b"put<a,stolen>get<a>").await.unwrap();
    let answers = read_text_answers(&mut socket, 2).await.unwrap();
    assert!(answers.iter().all(|(word, _)| word == "err"), "{answers:?}");
    checks.pass("put and get before auth<> are answered err<...>");

    let reader = secrets.mint("reader", &["kv:read"]);
    socket
        .write_all(format!("auth<{reader}>put<a,stolen>get<a>").as_bytes())
        .await
        .unwrap();
    let answers = read_text_answers(&mut socket, 3).await.unwrap();
    assert_eq!(answers[0], ("ok".into(), "reader".into()));
    assert_eq!(answers[1].0, "err", "{answers:?}");
    assert_eq!(answers[2].0, "none", "{answers:?}");
    checks.pass("a kv:read token reads but its put is refused");

    let mut guesser = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    guesser
        .write_all(b"auth<guess1>auth<guess2>auth<guess3>")
        .await
        .unwrap();
    let answers = read_text_answers(&mut guesser, 3).await.unwrap();
    assert!(answers.iter().all(|(word, _)| word == "err"), "{answers:?}");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(WAIT, guesser.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "closed after three failed attempts");
    checks.pass("three failed auth<> attempts close the connection");
}
