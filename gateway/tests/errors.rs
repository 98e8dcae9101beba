//! Every error the gateway answers itself, each provoked the way it happens for real: always JSON
//! `{"error": "..."}` with the documented status, and never a hang.

mod common;

use std::time::Duration;

use common::{echo_router, Distributor, Gateway, Service, PROMPTLY};
use reqwest::StatusCode;
use serde_json::Value;
use shared::{
    distributor_client::DistributorClient,
    packet::{Registration, PROTOCOL_VERSION},
    service::{Response, Router},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::oneshot,
    time::timeout,
};
use tokio_util::sync::CancellationToken;

async fn error_of(response: reqwest::Response) -> (StatusCode, String) {
    let status = response.status();
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: Value = response.json().await.unwrap();
    let error = body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error in {body}"))
        .to_owned();
    (status, error)
}

/// Registers `urls` for a node listening on `port` (or for nobody), as a protocol-2 node would.
fn register(distributor: std::net::SocketAddr, port: u16, urls: &[&str], stop: &CancellationToken) {
    let registration = Registration {
        port,
        name: "raw".into(),
        urls: urls.iter().map(|url| url.to_string()).collect(),
        host: None,
        protocol: Some(PROTOCOL_VERSION),
        ..Registration::default()
    };
    let _topology =
        DistributorClient::spawn(distributor.to_string(), registration, stop.child_token());
}

#[tokio::test]
async fn an_unknown_route_is_404() {
    let distributor = Distributor::start().await;
    let _a = Service::start("a", echo_router("a"), distributor.addr).await;
    let gateway = Gateway::start(distributor.addr, |_| {}).await;
    gateway.wait_for_nodes("GET/echo", 1).await;

    let (status, error) = error_of(
        gateway
            .http
            .get(gateway.url("/nothing/here"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error, "no route for GET /nothing/here");

    let (status, _) = error_of(
        gateway
            .http
            .patch(gateway.url("/echo"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "a method nobody registered");

    let (status, _) = error_of(
        gateway
            .http
            .get(gateway.url("/echoes"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "a prefix only matches whole segments"
    );
}

#[tokio::test]
async fn a_route_without_a_reachable_node_is_503() {
    let distributor = Distributor::start().await;
    // A node registered for a port where nothing listens (a wrong advertised address, a
    // listener that died while the registration lives on).
    let vacant = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = vacant.local_addr().unwrap().port();
    drop(vacant);
    let stop = CancellationToken::new();
    register(distributor.addr, port, &["GET/unreachable"], &stop);
    let gateway = Gateway::start(distributor.addr, |_| {}).await;
    timeout(PROMPTLY, async {
        while !gateway.topology().await["routes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|route| route["url"] == "GET/unreachable")
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the route never appeared");

    let (status, error) = error_of(
        gateway
            .http
            .get(gateway.url("/unreachable"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error, "no node of GET/unreachable is reachable");
    stop.cancel();
}

#[tokio::test]
async fn no_answer_within_the_timeout_is_504() {
    let distributor = Distributor::start().await;
    let router = Router::new().route("GET", "/slow", |_| async {
        tokio::time::sleep(Duration::from_secs(60)).await;
        Response::ok("too late")
    });
    let _slow = Service::start("slow", router, distributor.addr).await;
    let gateway = Gateway::start(distributor.addr, |config| {
        config.request_timeout = Duration::from_millis(300);
    })
    .await;
    gateway.wait_for_nodes("GET/slow", 1).await;

    let (status, error) =
        error_of(gateway.http.get(gateway.url("/slow")).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(error, "the service did not answer within 300ms");
    assert_eq!(gateway.metric("gateway_requests_in_flight").await, 0.0);
}

#[tokio::test]
async fn a_node_dying_mid_request_is_502_at_once() {
    let distributor = Distributor::start().await;
    // A node that reads one request and dies with it: its socket closes, as the kernel closes
    // the sockets of a killed process.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (got_request, request_arrived) = oneshot::channel();
    let node = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut received = Vec::new();
        let mut buf = [0u8; 4096];
        while !received.ends_with("¶".as_bytes()) {
            let n = socket.read(&mut buf).await.unwrap();
            assert!(n > 0, "the gateway closed the connection");
            received.extend_from_slice(&buf[..n]);
        }
        let _ = got_request.send(String::from_utf8_lossy(&received).into_owned());
        drop(socket);
        drop(listener);
    });
    let stop = CancellationToken::new();
    register(distributor.addr, port, &["GET/doomed"], &stop);
    // Far beyond the test's patience: only the connection closing can answer in time.
    let gateway = Gateway::start(distributor.addr, |config| {
        config.request_timeout = Duration::from_secs(600);
    })
    .await;
    gateway.wait_for_nodes("GET/doomed", 1).await;

    let response = timeout(PROMPTLY, gateway.http.get(gateway.url("/doomed")).send())
        .await
        .expect("the 502 came at once, not after the request timeout")
        .unwrap();
    let (status, error) = error_of(response).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(error, "the service's connection closed before it answered");
    let request = request_arrived.await.unwrap();
    assert!(request.contains(r#""uri":"/doomed""#), "{request}");
    node.await.unwrap();
    assert_eq!(gateway.metric("gateway_requests_in_flight").await, 0.0);
    stop.cancel();
}

#[tokio::test]
async fn a_malformed_json_body_is_400() {
    let distributor = Distributor::start().await;
    let _a = Service::start("a", echo_router("a"), distributor.addr).await;
    let gateway = Gateway::start(distributor.addr, |_| {}).await;
    gateway.wait_for_nodes("PUT/echo", 1).await;

    let response = gateway
        .http
        .put(gateway.url("/echo/x"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    let (status, error) = error_of(response).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        error.starts_with("the request body is not valid JSON"),
        "{error}"
    );

    let binary = gateway
        .http
        .put(gateway.url("/echo/x"))
        .body(vec![0xffu8, 0xfe, 0xfd])
        .send()
        .await
        .unwrap();
    assert_eq!(binary.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_body_over_the_limit_is_413() {
    let distributor = Distributor::start().await;
    let _a = Service::start("a", echo_router("a"), distributor.addr).await;
    let gateway = Gateway::start(distributor.addr, |config| config.max_body = 1024).await;
    gateway.wait_for_nodes("PUT/echo", 1).await;

    let response = gateway
        .http
        .put(gateway.url("/echo/x"))
        .body("x".repeat(1025))
        .send()
        .await
        .unwrap();
    let (status, error) = error_of(response).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        error,
        "the request body is larger than the limit of 1024 bytes"
    );

    // Without a Content-Length the body is counted as it arrives.
    let chunks = (0..8).map(|_| Ok::<_, std::io::Error>(vec![b'y'; 200]));
    let response = gateway
        .http
        .put(gateway.url("/echo/x"))
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);

    let at_limit = gateway
        .http
        .put(gateway.url("/echo/x"))
        .body("z".repeat(1024))
        .send()
        .await
        .unwrap();
    assert_eq!(at_limit.status(), StatusCode::OK);
    let body: Value = at_limit.json().await.unwrap();
    assert_eq!(body["params"]["body"].as_str().unwrap().len(), 1024);
}

#[tokio::test]
async fn service_errors_pass_through_with_their_status() {
    let distributor = Distributor::start().await;
    let router = Router::new()
        .route("GET", "/conflict", |_| async {
            Response::error(409, "version mismatch")
        })
        .route("POST", "/made", |_| async {
            Response::with_status(201, serde_json::json!({"id": 7}))
        });
    let _service = Service::start("s", router, distributor.addr).await;
    let gateway = Gateway::start(distributor.addr, |_| {}).await;
    gateway.wait_for_nodes("GET/conflict", 1).await;

    let (status, error) = error_of(
        gateway
            .http
            .get(gateway.url("/conflict"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(error, "version mismatch");

    let made = gateway
        .http
        .post(gateway.url("/made"))
        .send()
        .await
        .unwrap();
    assert_eq!(made.status(), StatusCode::CREATED);
    assert_eq!(
        made.json::<Value>().await.unwrap(),
        serde_json::json!({"id": 7})
    );
}

#[tokio::test]
async fn a_request_head_that_never_ends_is_cut_off() {
    let distributor = Distributor::start().await;
    let gateway = Gateway::start(distributor.addr, |_| {}).await;
    let mut socket = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    socket
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let closed = timeout(
        gateway::http::HEADER_READ_TIMEOUT * 2,
        socket.read_to_end(&mut answer),
    )
    .await;
    assert!(
        closed.is_ok(),
        "the gateway closes a connection whose request head never ends"
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        !answer.contains("200 OK"),
        "an unfinished request is not answered as if it were whole: {answer}"
    );
}
