//! Streams end to end: a stream route of a real service node, relayed by the gateway as
//! Server-Sent Events to an HTTP client, including the ways a stream ends.

mod common;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{Distributor, Gateway, Service, PROMPTLY};
use e2e::sse::EventStream;
use reqwest::StatusCode;
use serde_json::{json, Value};
use shared::{
    service::{multicast, Event, Response, Router, StreamAddress},
    RawParams,
};
use tokio::{sync::mpsc, time::timeout};

/// Sends `what` on `tx` when dropped: tells the test that a stream handler was dropped.
struct DropSignal {
    tx: mpsc::UnboundedSender<&'static str>,
    what: &'static str,
}

impl DropSignal {
    fn new(tx: &mpsc::UnboundedSender<&'static str>, what: &'static str) -> DropSignal {
        DropSignal {
            tx: tx.clone(),
            what,
        }
    }
}

impl Drop for DropSignal {
    fn drop(&mut self) {
        let _ = self.tx.send(self.what);
    }
}

fn stream_router(dropped: mpsc::UnboundedSender<&'static str>) -> Router {
    let forever_dropped = dropped.clone();
    let quiet_dropped = dropped.clone();
    let room: Arc<Mutex<Vec<StreamAddress>>> = Arc::default();
    Router::new()
        // The second stream to join multicasts one event to both, as notice-service does.
        .stream("GET", "/room", move |_, sink| {
            let room = room.clone();
            async move {
                let _ = sink.open().await;
                let Some(address) = sink.address() else {
                    return Response::error(400, "the gateway did not ask for multicast");
                };
                let members = {
                    let mut room = room.lock().unwrap();
                    room.push(address);
                    room.clone()
                };
                if members.len() == 2 {
                    let event = Event {
                        id: Some(json!(7)),
                        event: Some("hello".into()),
                        data: json!({"to": "everyone"}),
                    };
                    let missed = multicast(members.iter().map(|to| (to.key(), to)), &event);
                    assert!(missed.is_empty());
                }
                sink.closed().await;
                Response::ok(Value::Null)
            }
        })
        .stream("GET", "/ticks", |request, sink| async move {
            let count: u64 = match request.params["count"].as_str().map(str::parse) {
                Some(Ok(count)) => count,
                _ => return Response::error(400, "count must be a number"),
            };
            if sink.open().await.is_err() {
                return Response::ok(Value::Null);
            }
            for n in 1..=count {
                let event = Event {
                    id: Some(n.into()),
                    event: Some("tick".into()),
                    data: json!({"n": n, "last_event_id": request.params["last_event_id"]}),
                };
                if sink.send(event).await.is_err() {
                    break;
                }
            }
            Response::ok(Value::Null)
        })
        .stream("GET", "/verbatim", |_, sink| async move {
            // Params exactly as a node might write them: odd spacing, then pretty-printed.
            for text in [
                "{\"b\": 1,  \"a\": [true]}",
                "{\n  \"a\": 1,\n  \"b\": \"x\\ny\"\n}",
            ] {
                let event = Event {
                    data: RawParams::from_text(text.into()).unwrap(),
                    id: None,
                    event: None,
                };
                if sink.send(event).await.is_err() {
                    break;
                }
            }
            Response::ok(Value::Null)
        })
        .stream("GET", "/failing", |_, sink| async move {
            let event = Event {
                data: json!("first"),
                ..Event::default()
            };
            let _ = sink.send(event).await;
            Response::error(500, "boom")
        })
        .stream("GET", "/forever", move |_, sink| {
            let signal = DropSignal::new(&forever_dropped, "forever");
            async move {
                let _signal = signal;
                let mut n = 0u64;
                loop {
                    n += 1;
                    let event = Event {
                        id: Some(json!(format!("e{n}"))),
                        data: json!({"n": n}),
                        ..Event::default()
                    };
                    if sink.send(event).await.is_err() {
                        return Response::ok(Value::Null);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        })
        .stream("GET", "/flood", move |_, sink| {
            let signal = DropSignal::new(&dropped, "flood");
            async move {
                let _signal = signal;
                let payload = "x".repeat(8 * 1024);
                loop {
                    let event = Event {
                        data: json!(payload),
                        ..Event::default()
                    };
                    if sink.send(event).await.is_err() {
                        return Response::ok(Value::Null);
                    }
                }
            }
        })
        .stream("GET", "/quiet", move |_, sink| {
            let signal = DropSignal::new(&quiet_dropped, "quiet");
            async move {
                let _signal = signal;
                let _ = sink.open().await;
                sink.closed().await;
                Response::ok(Value::Null)
            }
        })
}

struct Setup {
    _distributor: Distributor,
    _service: Service,
    gateway: Gateway,
    dropped: mpsc::UnboundedReceiver<&'static str>,
}

async fn setup(adjust: impl FnOnce(&mut gateway::Config)) -> Setup {
    let distributor = Distributor::start().await;
    let (tx, dropped) = mpsc::unbounded_channel();
    let service = Service::start("streams", stream_router(tx), distributor.addr).await;
    let gateway = Gateway::start(distributor.addr, adjust).await;
    gateway.wait_for_nodes("GET/ticks", 1).await;
    Setup {
        _distributor: distributor,
        _service: service,
        gateway,
        dropped,
    }
}

impl Setup {
    /// Waits for the node's stream handler `what` to be dropped, which a cancel from the
    /// gateway does.
    async fn expect_dropped(&mut self, what: &str, why: &str) {
        let dropped = timeout(PROMPTLY, self.dropped.recv()).await.expect(why);
        assert_eq!(dropped, Some(what));
    }
}

async fn open(gateway: &Gateway, path: &str, last_event_id: Option<&str>) -> EventStream {
    let mut request = gateway
        .http
        .get(gateway.url(path))
        .header("accept", "text/event-stream")
        .timeout(Duration::from_secs(3600));
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id);
    }
    EventStream::from_response(request.send().await.unwrap())
        .await
        .unwrap()
}

#[tokio::test]
async fn events_are_relayed_until_the_end_packet() {
    let setup = setup(|_| {}).await;
    let mut stream = open(&setup.gateway, "/ticks?count=3", Some("41")).await;
    let events = stream.rest_within(PROMPTLY).await.unwrap();
    assert_eq!(events.len(), 3, "{events:?}");
    for (i, event) in events.iter().enumerate() {
        let n = i as u64 + 1;
        assert_eq!(event.id.as_deref(), Some(n.to_string().as_str()));
        assert_eq!(event.event.as_deref(), Some("tick"));
        assert_eq!(event.json(), json!({"n": n, "last_event_id": "41"}));
    }
}

#[tokio::test]
async fn event_data_is_the_nodes_json_text_on_one_line() {
    let setup = setup(|_| {}).await;
    let events = open(&setup.gateway, "/verbatim", None)
        .await
        .rest_within(PROMPTLY)
        .await
        .unwrap();
    let data: Vec<&str> = events.iter().map(|event| event.data.as_str()).collect();
    // Relayed as written; a pretty-printed one is written again on one `data:` line.
    assert_eq!(data, [r#"{"b": 1,  "a": [true]}"#, r#"{"a":1,"b":"x\ny"}"#]);
}

#[tokio::test]
async fn a_stream_route_streams_without_an_accept_header_too() {
    let setup = setup(|_| {}).await;
    let response = setup
        .gateway
        .http
        .get(setup.gateway.url("/ticks?count=2"))
        .send()
        .await
        .unwrap();
    let events = EventStream::from_response(response)
        .await
        .unwrap()
        .rest_within(PROMPTLY)
        .await
        .unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[1].json()["n"], 2);
}

#[tokio::test]
async fn a_stream_refused_before_it_opens_is_a_plain_http_error() {
    let setup = setup(|_| {}).await;
    let response = setup
        .gateway
        .http
        .get(setup.gateway.url("/ticks?count=many"))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body, json!({"error": "count must be a number"}));
}

#[tokio::test]
async fn a_stream_that_fails_ends_with_an_error_event() {
    let setup = setup(|_| {}).await;
    let mut stream = open(&setup.gateway, "/failing", None).await;
    let events = stream.rest_within(PROMPTLY).await.unwrap();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0].json(), json!("first"));
    assert_eq!(events[0].event, None);
    assert_eq!(events[1].event.as_deref(), Some("error"));
    assert_eq!(events[1].json(), json!({"error": "boom", "status": 500}));
}

#[tokio::test]
async fn a_client_going_away_cancels_the_stream_at_the_node() {
    let mut setup = setup(|_| {}).await;
    let mut stream = open(&setup.gateway, "/forever", None).await;
    let first = stream.next_within(PROMPTLY).await.unwrap();
    assert_eq!(
        first.id.as_deref(),
        Some("e1"),
        "string ids are sent as they are"
    );
    let second = stream.next_within(PROMPTLY).await.unwrap();
    assert_eq!(second.json(), json!({"n": 2}));
    assert_eq!(setup.gateway.metric("gateway_open_streams").await, 1.0);

    drop(stream);
    setup
        .expect_dropped(
            "forever",
            "the node's stream handler is dropped once the client leaves",
        )
        .await;
    timeout(PROMPTLY, async {
        while setup.gateway.metric("gateway_open_streams").await != 0.0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the gateway forgets the stream");
}

#[tokio::test]
async fn a_client_leaving_an_idle_stream_cancels_it_at_the_node_at_once() {
    // No event and no keep-alive comment is written that could reveal the departure: the
    // gateway must notice the connection closing.
    let mut setup = setup(|config| config.keep_alive = Duration::from_secs(3600)).await;
    let stream = open(&setup.gateway, "/quiet", None).await;
    assert_eq!(setup.gateway.metric("gateway_open_streams").await, 1.0);
    drop(stream);
    setup
        .expect_dropped(
            "quiet",
            "the node's stream handler is dropped once the client leaves",
        )
        .await;
}

#[tokio::test]
async fn a_client_too_slow_for_its_stream_is_told_so() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut setup = setup(|_| {}).await;
    // A client with a small receive buffer that does not read: events pile up at the gateway
    // (a fixed buffer rather than an autotuned one keeps the pile small and the test quick).
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(8 * 1024).unwrap();
    let mut client = socket.connect(setup.gateway.addr).await.unwrap();
    client
        .write_all(b"GET /flood HTTP/1.1\r\nhost: gateway\r\naccept: text/event-stream\r\n\r\n")
        .await
        .unwrap();
    // The gateway gives up on this client and cancels the stream at the node.
    setup
        .expect_dropped("flood", "the flood is cancelled")
        .await;

    // Reading now drains what was queued, then the final error event and the end of the body.
    let mut received = Vec::new();
    timeout(PROMPTLY, async {
        let mut buf = vec![0u8; 64 * 1024];
        while !received.ends_with(b"\r\n0\r\n\r\n") {
            let n = client.read(&mut buf).await.unwrap();
            assert!(n > 0, "the response was cut short");
            received.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("the response ends");
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{}", &text[..200]);
    let error_event = text.find("event: error\n").expect("a final error event");
    assert!(
        text[error_event..].contains(r#""status":503"#)
            && text[error_event..].contains("too slowly"),
        "{}",
        &text[error_event..]
    );
    assert_eq!(text.matches("event: error").count(), 1);
}

#[tokio::test]
async fn idle_streams_get_keep_alive_comments() {
    let setup = setup(|config| config.keep_alive = Duration::from_millis(50)).await;
    let mut stream = open(&setup.gateway, "/quiet", None).await;
    let waited = timeout(Duration::from_millis(500), stream.next()).await;
    assert!(waited.is_err(), "a quiet stream sends no event");
    assert!(stream.comments() > 0, "but comment lines keep it alive");
}

#[tokio::test]
async fn one_multicast_event_reaches_every_client_stream_it_names() {
    let setup = setup(|_| {}).await;
    let mut first = open(&setup.gateway, "/room", None).await;
    let mut second = open(&setup.gateway, "/room", None).await;
    for stream in [&mut first, &mut second] {
        let event = stream.next_within(PROMPTLY).await.unwrap();
        assert_eq!(
            (event.id.as_deref(), event.event.as_deref(), event.json()),
            (Some("7"), Some("hello"), json!({"to": "everyone"}))
        );
    }
}

#[tokio::test]
async fn a_stream_busy_with_events_gets_no_keep_alive_comments() {
    // `/forever` sends an event every 20 ms: four keep-alive periods, none of them silent.
    let setup = setup(|config| config.keep_alive = Duration::from_millis(300)).await;
    let mut stream = open(&setup.gateway, "/forever", None).await;
    for _ in 0..60 {
        stream.next_within(PROMPTLY).await.unwrap();
    }
    assert_eq!(stream.comments(), 0);
}
