//! The HTTP edge under abuse, against the real gateway binary: slow clients, oversized and
//! ambiguous requests, too many connections from one address, and browsers' CORS.

mod common;
mod process;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use common::{echo_router, Distributor, Service};
use process::{
    connect_from, exchange, read_until_closed, refused_start, status_of, GatewayProcess, PROMPTLY,
};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::Barrier,
    task::JoinSet,
    time::{sleep, timeout},
};

/// A distributor, an echo service registered with it (`/echo` for GET, PUT, POST, DELETE), and
/// the gateway binary started with `args` on top, once it routes `PUT/echo`.
struct Stack {
    gateway: GatewayProcess,
    http: reqwest::Client,
    _service: Service,
    _distributor: Distributor,
}

impl Stack {
    async fn start(args: &[&str]) -> Stack {
        let distributor = Distributor::start().await;
        let service = Service::start("echo", echo_router("echo"), distributor.addr).await;
        let distributor_addr = distributor.addr.to_string();
        let mut all_args = vec!["--distributor", &distributor_addr];
        all_args.extend_from_slice(args);
        let gateway = GatewayProcess::start(&all_args).await;
        let http = fresh_connections();
        wait_for_route(&http, &gateway, "PUT/echo").await;
        Stack {
            gateway,
            http,
            _service: service,
            _distributor: distributor,
        }
    }
}

/// A client that opens a new connection for every request.
fn fresh_connections() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(PROMPTLY)
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

async fn wait_for_route(http: &reqwest::Client, gateway: &GatewayProcess, url: &str) {
    let routed = timeout(PROMPTLY, async {
        loop {
            if let Ok(response) = http.get(gateway.url("/_/topology")).send().await {
                let topology: Value = response.json().await.unwrap_or_default();
                let connected = topology["routes"].as_array().is_some_and(|routes| {
                    routes.iter().any(|route| {
                        route["url"] == url
                            && route["nodes"]
                                .as_array()
                                .is_some_and(|nodes| nodes.iter().any(|n| n["connected"] == true))
                    })
                });
                if connected {
                    return;
                }
            }
            sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(routed.is_ok(), "the gateway never routed {url}");
}

/// How one slow client's attempt ended.
#[derive(Debug, PartialEq)]
enum SlowEnd {
    /// The gateway closed the connection without answering.
    ClosedUnanswered,
    /// The gateway answered with this status (and closed).
    Answered(u16),
}

/// Sends `head` (then waits for every slow client to have sent theirs), then `drip` every
/// 250 ms, until the gateway answers or closes; panics if it does neither within [`PROMPTLY`].
async fn trickle(
    from: [u8; 4],
    addr: SocketAddr,
    head: &[u8],
    drip: &[u8],
    sent: &Barrier,
) -> SlowEnd {
    let mut socket = connect_from(from, addr).await;
    socket.write_all(head).await.unwrap();
    sent.wait().await;
    let mut answer = Vec::new();
    let ended = timeout(PROMPTLY, async {
        let mut buf = [0u8; 1024];
        let mut drips = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                read = socket.read(&mut buf) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(read) => answer.extend_from_slice(&buf[..read]),
                },
                _ = drips.tick() => {
                    // The gateway may have closed meanwhile; the read above tells.
                    let _ = socket.write_all(drip).await;
                }
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "a slow client was never cut off");
    match status_of(&String::from_utf8_lossy(&answer)) {
        Some(status) => SlowEnd::Answered(status),
        None => SlowEnd::ClosedUnanswered,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_slow_clients_are_cut_off_while_normal_requests_are_served() {
    const HEAD_TRICKLERS: usize = 900;
    const BODY_TRICKLERS: usize = 100;
    let stack = Stack::start(&["--header-timeout", "2s", "--body-timeout", "2s"]).await;
    let addr = stack.gateway.addr;
    // The slow clients come from 127.0.0.2, the normal ones from 127.0.0.1.
    let attacker = [127, 0, 0, 2];
    let sent = Arc::new(Barrier::new(HEAD_TRICKLERS + BODY_TRICKLERS + 1));
    let mut slow = JoinSet::new();
    for i in 0..HEAD_TRICKLERS {
        let sent = sent.clone();
        slow.spawn(async move {
            let drip = format!("X-Slow-{i}: y\r\n");
            let head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n";
            (
                false,
                trickle(attacker, addr, head, drip.as_bytes(), &sent).await,
            )
        });
    }
    for _ in 0..BODY_TRICKLERS {
        let sent = sent.clone();
        slow.spawn(async move {
            let head = b"PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n";
            (true, trickle(attacker, addr, head, b"z", &sent).await)
        });
    }
    // Every slow client is connected and has started its request.
    timeout(PROMPTLY, sent.wait())
        .await
        .expect("the slow clients connect");

    let served = Arc::new(AtomicUsize::new(0));
    let normal = {
        let (http, served) = (stack.http.clone(), served.clone());
        let (healthz, echo) = (stack.gateway.url("/healthz"), stack.gateway.url("/echo"));
        tokio::spawn(async move {
            loop {
                let response = http.get(&healthz).send().await.expect("healthz answers");
                assert_eq!(response.status(), StatusCode::OK);
                let response = http
                    .put(&echo)
                    .body("hello")
                    .send()
                    .await
                    .expect("echo answers");
                assert_eq!(response.status(), StatusCode::OK);
                served.fetch_add(1, Ordering::SeqCst);
            }
        })
    };

    let (mut heads, mut bodies) = (Vec::new(), Vec::new());
    while let Some(end) = slow.join_next().await {
        let (body, end) = end.expect("a slow client's task");
        if body {
            bodies.push(end)
        } else {
            heads.push(end)
        }
    }
    // `trickle` panics unless the gateway ended each one.
    assert_eq!(heads.len() + bodies.len(), HEAD_TRICKLERS + BODY_TRICKLERS);
    assert!(
        heads.iter().all(|end| *end == SlowEnd::ClosedUnanswered),
        "a trickled head is never answered as if it were whole"
    );
    // A body is answered 408. A drip that crosses the gateway's close can make the kernel reset
    // the connection before the client has read that answer, so some see the close only.
    assert!(
        bodies
            .iter()
            .all(|end| matches!(end, SlowEnd::Answered(408) | SlowEnd::ClosedUnanswered)),
        "{bodies:?}"
    );
    assert!(bodies.contains(&SlowEnd::Answered(408)), "{bodies:?}");
    assert!(
        !normal.is_finished(),
        "normal requests kept succeeding: {normal:?}"
    );
    normal.abort();
    assert!(
        served.load(Ordering::SeqCst) > 0,
        "normal requests were answered while the slow clients held their connections"
    );
    // And the gateway is as good as new afterwards.
    let response = stack
        .http
        .get(stack.gateway.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_stalled_body_is_408() {
    let stack = Stack::start(&["--body-timeout", "1s"]).await;
    let mut socket = tokio::net::TcpStream::connect(stack.gateway.addr)
        .await
        .unwrap();
    socket
        .write_all(b"PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let answer = read_until_closed(&mut socket, "a connection whose body stalled").await;
    assert_eq!(status_of(&answer), Some(408), "{answer}");
    assert!(
        answer.contains(r#"{"error":"the request body arrived too slowly"}"#),
        "{answer}"
    );
}

#[tokio::test]
async fn a_body_that_crawls_is_408_though_every_piece_comes_in_time() {
    let stack = Stack::start(&["--body-timeout", "1s"]).await;
    let mut socket = tokio::net::TcpStream::connect(stack.gateway.addr)
        .await
        .unwrap();
    socket
        .write_all(b"PUT /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    // One byte every 200 ms: each piece well within the 1 s timeout, the whole far below
    // 16 KiB/s. 100 pieces would take 20 s; the gateway must stop it before the end.
    let mut answer = Vec::new();
    for _ in 0..100 {
        if socket.write_all(b"1\r\nz\r\n").await.is_err() {
            break;
        }
        let mut buf = [0u8; 1024];
        match timeout(Duration::from_millis(200), socket.read(&mut buf)).await {
            Err(_) => continue,
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(read)) => {
                answer.extend_from_slice(&buf[..read]);
                break;
            }
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    assert_eq!(status_of(&answer), Some(408), "answered: {answer:?}");
}

#[tokio::test]
async fn a_body_sent_in_pieces_at_a_normal_pace_is_served() {
    let stack = Stack::start(&["--body-timeout", "1s"]).await;
    let mut socket = tokio::net::TcpStream::connect(stack.gateway.addr)
        .await
        .unwrap();
    socket
        .write_all(b"PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nConnection: close\r\n\r\nhello")
        .await
        .unwrap();
    sleep(Duration::from_millis(300)).await;
    socket.write_all(b"world").await.unwrap();
    let answer = read_until_closed(&mut socket, "a connection asking to close").await;
    assert_eq!(status_of(&answer), Some(200), "{answer}");
    assert!(answer.contains(r#""body":"helloworld""#), "{answer}");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_header_timeout() {
    let stack = Stack::start(&["--header-timeout", "2s"]).await;
    let mut socket = tokio::net::TcpStream::connect(stack.gateway.addr)
        .await
        .unwrap();
    socket
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // The answer comes, the connection stays open for the next request, and then nothing.
    let answer = read_until_closed(&mut socket, "an idle keep-alive connection").await;
    assert_eq!(status_of(&answer), Some(200), "{answer}");
    assert_eq!(answer.matches("HTTP/1.1").count(), 1);
}

#[tokio::test]
async fn request_smuggling_shapes_are_refused_or_end_the_connection() {
    let stack = Stack::start(&[]).await;
    let addr = stack.gateway.addr;

    // Content-Length and Transfer-Encoding together: the body is read as chunked and the
    // connection closes after the answer, so what follows the chunked body is never taken as
    // a request of its own.
    let both = exchange(
        addr,
        b"PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n\
          0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
            .to_vec(),
    )
    .await;
    assert_eq!(both.text.matches("HTTP/1.1 ").count(), 1, "{}", both.text);
    assert!(!both.text.contains("smuggled"), "{}", both.text);

    // Two different Content-Lengths.
    let lengths = exchange(
        addr,
        b"PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 11\r\n\r\n\
          helloGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
            .to_vec(),
    )
    .await;
    assert_eq!(lengths.status, Some(400), "{}", lengths.text);
    assert!(!lengths.text.contains("smuggled"), "{}", lengths.text);

    // A transfer coding other than chunked last, and Transfer-Encoding in HTTP/1.0.
    for request in [
        &b"PUT /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n"[..],
        b"PUT /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n",
        b"PUT /echo HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ] {
        let refused = exchange(addr, request.to_vec()).await;
        assert_eq!(refused.status, Some(400), "{}", refused.text);
    }
}

/// Asserts `request` is refused: a 4xx answer or the connection cut, never served.
async fn assert_refused(addr: SocketAddr, request: Vec<u8>, what: &str) {
    let answer = exchange(addr, request).await;
    match answer.status {
        None => {}
        Some(status) => assert!((400..500).contains(&status), "{what} was answered {status}"),
    }
}

fn get_with_headers(path: &str, headers: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n").into_bytes()
}

#[tokio::test]
async fn oversized_heads_are_refused() {
    let stack = Stack::start(&[]).await;
    let addr = stack.gateway.addr;
    let long_url = format!("/echo?q={}", "u".repeat(100 * 1024));
    assert_refused(addr, get_with_headers(&long_url, ""), "a 100 KB url").await;
    let many: String = (0..10_000).map(|i| format!("X-Many-{i}: y\r\n")).collect();
    assert_refused(addr, get_with_headers("/healthz", &many), "10,000 headers").await;
    let huge = format!("X-Huge: {}\r\n", "h".repeat(1024 * 1024));
    assert_refused(addr, get_with_headers("/healthz", &huge), "a 1 MB header").await;
    // Within the limits, the same shapes are served.
    let fine: String = (0..50).map(|i| format!("X-Few-{i}: y\r\n")).collect();
    let served = exchange(addr, get_with_headers("/healthz", &fine)).await;
    assert_eq!(served.status, Some(200), "{}", served.text);
}

#[tokio::test]
async fn header_limits_follow_their_flags() {
    let stack = Stack::start(&["--max-headers", "20", "--max-header-bytes", "8KiB"]).await;
    let addr = stack.gateway.addr;
    let headers =
        |count: usize| -> String { (0..count).map(|i| format!("X-H-{i}: y\r\n")).collect() };
    let served = exchange(addr, get_with_headers("/healthz", &headers(15))).await;
    assert_eq!(served.status, Some(200), "{}", served.text);
    assert_refused(
        addr,
        get_with_headers("/healthz", &headers(25)),
        "25 headers",
    )
    .await;

    let big = |size: usize| format!("X-Big: {}\r\n", "b".repeat(size));
    let served = exchange(addr, get_with_headers("/healthz", &big(6 * 1024))).await;
    assert_eq!(served.status, Some(200), "{}", served.text);
    assert_refused(
        addr,
        get_with_headers("/healthz", &big(9 * 1024)),
        "a 9 KiB head",
    )
    .await;
}

#[tokio::test]
async fn connections_over_the_per_ip_cap_are_refused_while_other_addresses_are_served() {
    let stack = Stack::start(&["--max-connections-per-ip", "3"]).await;
    let gateway = &stack.gateway;
    let busy = [127, 0, 0, 2];
    let healthz = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    // Three keep-alive connections from one address, each answered once (so each is surely
    // accepted and counted) and left open.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut socket = connect_from(busy, gateway.addr).await;
        socket.write_all(healthz).await.unwrap();
        let mut buf = [0u8; 1024];
        let read = timeout(PROMPTLY, socket.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status_of(&String::from_utf8_lossy(&buf[..read])), Some(200));
        held.push(socket);
    }

    // A fourth from the same address is closed unanswered.
    let mut fourth = connect_from(busy, gateway.addr).await;
    let _ = fourth.write_all(healthz).await;
    let answer = read_until_closed(&mut fourth, "a connection over the per-address cap").await;
    assert_eq!(answer, "", "a connection over the cap is not served");

    // Another address is served meanwhile.
    let mut other = connect_from([127, 0, 0, 3], gateway.addr).await;
    other.write_all(healthz).await.unwrap();
    let mut buf = [0u8; 1024];
    let read = timeout(PROMPTLY, other.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status_of(&String::from_utf8_lossy(&buf[..read])), Some(200));

    // Once one of the three closes, the address gets its slot back.
    drop(held.pop());
    let served_again = timeout(PROMPTLY, async {
        loop {
            let mut socket = connect_from(busy, gateway.addr).await;
            let _ = socket.write_all(healthz).await;
            let mut buf = [0u8; 1024];
            if let Ok(read) = socket.read(&mut buf).await {
                if status_of(&String::from_utf8_lossy(&buf[..read])) == Some(200) {
                    return;
                }
            }
            sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(served_again.is_ok(), "a freed slot is given again");
}

/// An `OPTIONS` preflight for `PUT /echo` from `origin`, as a browser sends it.
async fn preflight(http: &reqwest::Client, url: String, origin: &str) -> reqwest::Response {
    http.request(reqwest::Method::OPTIONS, url)
        .header("origin", origin)
        .header("access-control-request-method", "PUT")
        .header(
            "access-control-request-headers",
            "authorization,content-type,last-event-id,x-request-id",
        )
        .send()
        .await
        .unwrap()
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    response
        .headers()
        .get(name)
        .map(|value| value.to_str().unwrap())
}

#[tokio::test]
async fn cors_allows_the_configured_origins_only() {
    let stack = Stack::start(&[
        "--cors-origin",
        "https://app.example,http://localhost:3000",
        "--cors-origin",
        "https://other.example/",
    ])
    .await;
    let url = stack.gateway.url("/echo");

    for origin in [
        "https://app.example",
        "http://localhost:3000",
        "https://other.example",
    ] {
        let response = preflight(&stack.http, url.clone(), origin).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            header(&response, "access-control-allow-origin"),
            Some(origin)
        );
        assert!(header(&response, "access-control-allow-methods")
            .unwrap()
            .contains("PUT"));
        let allowed = header(&response, "access-control-allow-headers")
            .unwrap()
            .to_ascii_lowercase();
        for name in [
            "authorization",
            "content-type",
            "last-event-id",
            "x-request-id",
        ] {
            assert!(allowed.contains(name), "{name} is not allowed: {allowed}");
        }
    }
    let refused = preflight(&stack.http, url.clone(), "https://evil.example").await;
    assert_eq!(header(&refused, "access-control-allow-origin"), None);

    // The answers themselves, proxied or the gateway's own errors, carry the headers.
    let answer = stack
        .http
        .put(&url)
        .header("origin", "https://app.example")
        .body("hi")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(
        header(&answer, "access-control-allow-origin"),
        Some("https://app.example")
    );
    assert!(header(&answer, "access-control-expose-headers")
        .unwrap()
        .to_ascii_lowercase()
        .contains("x-request-id"));
    let missing = stack
        .http
        .get(stack.gateway.url("/nothing"))
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        header(&missing, "access-control-allow-origin"),
        Some("https://app.example")
    );
}

#[tokio::test]
async fn without_cors_origins_browsers_get_no_cors_headers_and_a_star_allows_all() {
    let stack = Stack::start(&[]).await;
    let response = preflight(
        &stack.http,
        stack.gateway.url("/echo"),
        "https://app.example",
    )
    .await;
    assert_eq!(header(&response, "access-control-allow-origin"), None);
    let answer = stack
        .http
        .get(stack.gateway.url("/healthz"))
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&answer, "access-control-allow-origin"), None);

    let open = Stack::start(&["--cors-origin", "*"]).await;
    let response = preflight(&open.http, open.gateway.url("/echo"), "https://any.example").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, "access-control-allow-origin"), Some("*"));
}

#[tokio::test]
async fn bad_edge_flags_stop_the_gateway_from_starting() {
    let cases: [(&[&str], &str); 4] = [
        (&["--cors-origin", "app.example"], "--cors-origin"),
        (&["--idle-timeout", "2s"], "--idle-timeout"),
        (&["--header-timeout", "0s"], "--header-timeout"),
        (&["--tls-cert", "/nonexistent/cert.pem"], "--tls-key"),
    ];
    for (args, named) in cases {
        let (code, log) = refused_start(args).await;
        assert_ne!(code, Some(0), "{args:?} started");
        assert!(
            log.contains(named),
            "{args:?}: the message names {named}: {log}"
        );
    }
}
