//! Graceful shutdown: the gateway stops accepting, answers what is in flight, closes its event
//! streams, and returns from `run`.

mod common;

use std::time::Duration;

use common::{Distributor, Gateway, Service, PROMPTLY};
use e2e::sse::EventStream;
use reqwest::StatusCode;
use serde_json::{json, Value};
use shared::service::{Response, Router};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::mpsc,
    time::timeout,
};

fn holding_router(started: mpsc::UnboundedSender<()>) -> Router {
    Router::new()
        .route("GET", "/hold", move |_| {
            let started = started.clone();
            async move {
                let _ = started.send(());
                tokio::time::sleep(Duration::from_millis(300)).await;
                Response::ok(json!("done"))
            }
        })
        .stream("GET", "/subscribe", |_, sink| async move {
            let _ = sink.open().await;
            sink.closed().await;
            Response::ok(Value::Null)
        })
}

#[tokio::test]
async fn requests_in_flight_are_answered_before_the_gateway_stops() {
    let distributor = Distributor::start().await;
    let (started_tx, mut started) = mpsc::unbounded_channel();
    let _service = Service::start("hold", holding_router(started_tx), distributor.addr).await;
    let mut gateway = Gateway::start(distributor.addr, |_| {}).await;
    gateway.wait_for_nodes("GET/hold", 1).await;

    let request = tokio::spawn(gateway.http.get(gateway.url("/hold")).send());
    timeout(PROMPTLY, started.recv())
        .await
        .expect("the request reaches the node");
    gateway.begin_shutdown();

    let response = timeout(PROMPTLY, request).await.unwrap().unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.json::<Value>().await.unwrap(), json!("done"));
    gateway.stop().await.expect("run returns cleanly");
    let refused = tokio::net::TcpStream::connect(gateway.addr).await;
    assert!(
        refused.is_err(),
        "the gateway no longer accepts connections"
    );
}

#[tokio::test]
async fn open_event_streams_end_at_shutdown() {
    let distributor = Distributor::start().await;
    let (started_tx, _started) = mpsc::unbounded_channel();
    let _service = Service::start("hold", holding_router(started_tx), distributor.addr).await;
    let mut gateway = Gateway::start(distributor.addr, |_| {}).await;
    gateway.wait_for_nodes("GET/subscribe", 1).await;

    let response = gateway
        .http
        .get(gateway.url("/subscribe"))
        .header("accept", "text/event-stream")
        .timeout(Duration::from_secs(3600))
        .send()
        .await
        .unwrap();
    let mut stream = EventStream::from_response(response).await.unwrap();
    gateway
        .stop()
        .await
        .expect("run returns although a stream was open");
    assert!(
        stream.rest_within(PROMPTLY).await.unwrap().is_empty(),
        "the stream ended without events"
    );
}

#[tokio::test]
async fn an_idle_keep_alive_connection_does_not_hold_up_shutdown() {
    let distributor = Distributor::start().await;
    let mut gateway = Gateway::start(distributor.addr, |_| {}).await;
    let mut socket = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    socket
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut head = vec![0; 1024];
    let read = timeout(PROMPTLY, socket.read(&mut head))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&head[..read]);
    assert!(head.starts_with("HTTP/1.1 200"), "answered: {head}");

    // The connection stays open (keep-alive) and idle while the gateway stops.
    timeout(PROMPTLY, gateway.stop())
        .await
        .expect("an idle connection does not hold up shutdown")
        .expect("run returns cleanly");
    let mut rest = Vec::new();
    let closed = timeout(PROMPTLY, socket.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the gateway closed the idle connection");
}
