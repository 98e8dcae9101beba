//! The service runtime and the packet client over real TCP on 127.0.0.1: routing and statuses,
//! many requests in flight on one connection, original-design requests, streams and their
//! cancellation, bad input, reconnection, the original-design (legacy) dialect, and graceful
//! shutdown. Where a test needs to see the exact bytes, it talks through a plain socket instead of
//! the client, so the client and the runtime are never only tested against each other.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use serde::Deserialize;
use serde_json::{json, Value};
use shared::{
    service::{
        multicast, serve, with_state, Created, Event, EventSink, Json, Request, Response, Router,
        ServiceConfig, ServiceError, StreamAddress, MAX_KEYS_PER_PACKET,
    },
    ClientError, Dialect, Packet, PacketClient, ResponseStream,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, Notify},
    task::{JoinHandle, JoinSet},
    time::timeout,
};
use tokio_util::sync::CancellationToken;

/// Upper bound for anything that should happen promptly; only reached when a test fails.
const PROMPTLY: Duration = Duration::from_secs(10);

const DELIMITER: &[u8] = "¶".as_bytes();

/// A service served in-process on a port of its own; shut down when dropped.
struct Service {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl Service {
    async fn start(router: Router) -> Service {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Service::start_on(listener, router)
    }

    fn start_on(listener: TcpListener, router: Router) -> Service {
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let config = ServiceConfig {
            name: "test".into(),
            ..ServiceConfig::default()
        };
        let task = tokio::spawn(serve(listener, router, config, shutdown.clone()));
        Service {
            addr,
            shutdown,
            task: Some(task),
        }
    }

    async fn client(&self) -> PacketClient {
        connected_client(self.addr, Dialect::Packet).await
    }

    async fn raw(&self) -> Raw {
        Raw::connect(self.addr).await
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn connected_client(addr: SocketAddr, dialect: Dialect) -> PacketClient {
    let client = PacketClient::connect(addr.to_string(), dialect);
    timeout(PROMPTLY, client.connected())
        .await
        .expect("the client connects");
    client
}

/// A plain socket speaking JSON + `¶` by hand, without the shared crate's codec.
struct Raw {
    stream: TcpStream,
    buffer: Vec<u8>,
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Raw {
        Raw::new(TcpStream::connect(addr).await.unwrap())
    }

    fn new(stream: TcpStream) -> Raw {
        Raw {
            stream,
            buffer: Vec::new(),
        }
    }

    async fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    async fn send(&mut self, value: Value) {
        let mut frame = serde_json::to_vec(&value).unwrap();
        frame.extend_from_slice(DELIMITER);
        self.send_bytes(&frame).await;
    }

    /// The next frame as JSON, or `None` once the peer closed the connection.
    async fn try_next(&mut self) -> Option<Value> {
        timeout(PROMPTLY, async {
            loop {
                if let Some(end) = self.buffer.windows(2).position(|w| w == DELIMITER) {
                    let frame: Vec<u8> = self.buffer.drain(..end + DELIMITER.len()).collect();
                    let text = &frame[..end];
                    return Some(serde_json::from_slice(text).unwrap_or_else(|err| {
                        panic!("invalid frame {:?}: {err}", String::from_utf8_lossy(text))
                    }));
                }
                let mut chunk = [0u8; 16 * 1024];
                match self.stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await
        .expect("a frame or the end of the connection arrives")
    }

    async fn next(&mut self) -> Value {
        self.try_next().await.expect("the connection stays open")
    }
}

/// Sends a value on a channel when dropped: shows that a handler's future was dropped.
struct DropSignal(mpsc::UnboundedSender<&'static str>, &'static str);

impl Drop for DropSignal {
    fn drop(&mut self) {
        let _ = self.0.send(self.1);
    }
}

async fn echo(request: Request) -> Response {
    Response::ok(json!({
        "uri": request.uri,
        "method": request.method,
        "params": request.params,
        "path": request.path_param(),
        "request_id": request.request_id,
    }))
}

fn echo_router() -> Router {
    Router::new().route("GET", "/echo", echo)
}

/// Test requests use keys from here up, far from what the client assigns.
fn request(uri: &str, key: u64, params: Value) -> Value {
    json!({"uri": uri, "method": "GET", "key": key, "params": params})
}

#[tokio::test]
async fn a_unary_route_answers_with_the_request_key() {
    let service = Service::start(echo_router()).await;
    let mut raw = service.raw().await;
    raw.send(json!({
        "uri": "/echo", "method": "GET", "key": 4242, "params": {"params": "a/b", "x": 1},
        "request_id": "req-1",
    }))
    .await;
    let answer = raw.next().await;
    assert_eq!(answer["key"], 4242);
    assert_eq!(answer["uri"], "/echo");
    assert_eq!(answer["method"], "GET");
    assert_eq!(answer.get("status"), None, "200 is left out: {answer}");
    assert_eq!(answer.get("error"), None);
    assert_eq!(answer["params"]["params"], json!({"params": "a/b", "x": 1}));
    assert_eq!(answer["params"]["path"], "a/b");
    assert_eq!(answer["params"]["request_id"], "req-1");

    let client = service.client().await;
    let answer = client
        .request(Packet::request("GET", "/echo", json!({"n": 1})))
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.params["params"], json!({"n": 1}));
    assert!(answer.key >= 1, "the client assigned a request key");
}

#[tokio::test]
async fn an_unknown_route_is_answered_404() {
    let service = Service::start(echo_router()).await;
    let client = service.client().await;
    for (method, uri) in [("GET", "/nothing"), ("DELETE", "/echo"), ("get", "/echo")] {
        let answer = client
            .request(Packet::request(method, uri, Value::Null))
            .await
            .unwrap();
        assert_eq!(answer.status, Some(404), "{method} {uri}: {answer:?}");
        let error = answer.error.unwrap_or_default();
        assert!(error.contains(uri), "{method} {uri}: {error}");
    }
}

#[tokio::test]
async fn error_statuses_and_messages_travel_to_the_caller() {
    let router = Router::new()
        .route("GET", "/conflict", |_| async {
            Response::error(409, "the key already exists")
        })
        .route("POST", "/created", |_| async {
            Response::with_status(201, json!({"id": 3}))
        });
    let service = Service::start(router).await;
    let client = service.client().await;

    let answer = client
        .request(Packet::request("GET", "/conflict", Value::Null))
        .await
        .unwrap();
    assert_eq!(answer.status, Some(409));
    assert_eq!(answer.error.as_deref(), Some("the key already exists"));
    assert_eq!(answer.params, Value::Null);

    let answer = client
        .request(Packet::request("POST", "/created", Value::Null))
        .await
        .unwrap();
    assert_eq!(answer.status, Some(201));
    assert_eq!(answer.error, None);
    assert_eq!(answer.params, json!({"id": 3}));
}

#[tokio::test]
async fn unparsable_params_are_answered_400_with_a_message() {
    #[derive(Deserialize)]
    struct Put {
        value: String,
    }
    let router = Router::new().route("PUT", "/kv", |request: Request| async move {
        match request.parse::<Put>() {
            Ok(put) => Response::ok(json!({"stored": put.value})),
            Err(refusal) => refusal,
        }
    });
    let service = Service::start(router).await;
    let client = service.client().await;

    for params in [json!({"value": 5}), json!({}), json!("text"), Value::Null] {
        let answer = client
            .request(Packet::request("PUT", "/kv", params.clone()))
            .await
            .unwrap();
        assert_eq!(answer.status, Some(400), "{params}: {answer:?}");
        let error = answer.error.unwrap_or_default();
        assert!(
            error.starts_with("invalid parameters:"),
            "{params}: {error}"
        );
    }
    let answer = client
        .request(Packet::request("PUT", "/kv", json!({"value": "v"})))
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.params, json!({"stored": "v"}));
}

#[tokio::test]
async fn many_requests_in_flight_on_one_connection_each_get_their_own_answer() {
    const REQUESTS: u64 = 500;
    let in_flight = Arc::new(AtomicUsize::new(0));
    let most_in_flight = Arc::new(AtomicUsize::new(0));
    let router = Router::new().route("GET", "/double", {
        let (in_flight, most_in_flight) = (in_flight.clone(), most_in_flight.clone());
        move |request: Request| {
            let (in_flight, most_in_flight) = (in_flight.clone(), most_in_flight.clone());
            async move {
                let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                most_in_flight.fetch_max(now, Ordering::SeqCst);
                let n = request.params["n"].as_u64().unwrap();
                // A pseudo-random pause of 0..8 ms, so answers come back out of order.
                let pause = (n.wrapping_mul(2_654_435_761) >> 7) & 7;
                tokio::time::sleep(Duration::from_millis(pause)).await;
                in_flight.fetch_sub(1, Ordering::SeqCst);
                Response::ok(json!({"n": n, "double": n * 2}))
            }
        }
    });
    let service = Service::start(router).await;
    let client = service.client().await;

    let mut requests = JoinSet::new();
    for n in 0..REQUESTS {
        let client = client.clone();
        requests.spawn(async move {
            let answer = client
                .request(Packet::request("GET", "/double", json!({"n": n})))
                .await
                .unwrap();
            (n, answer)
        });
    }
    let mut answered = 0;
    timeout(PROMPTLY * 3, async {
        while let Some(joined) = requests.join_next().await {
            let (n, answer) = joined.unwrap();
            assert_eq!(answer.status(), 200, "{answer:?}");
            assert_eq!(answer.params, json!({"n": n, "double": n * 2}));
            answered += 1;
        }
    })
    .await
    .expect("every request is answered");
    assert_eq!(answered, REQUESTS);
    assert!(
        most_in_flight.load(Ordering::SeqCst) > 1,
        "requests on one connection were handled concurrently"
    );
}

#[tokio::test]
async fn an_original_design_request_is_answered_with_a_top_level_key() {
    let service = Service::start(echo_router()).await;
    let mut raw = service.raw().await;
    // The original design's gateway sends no top-level key: it lives in params.key.
    raw.send_bytes(r#"{"uri":"/echo","method":"GET","params":{"key":7,"name":"x"}}¶"#.as_bytes())
        .await;
    let answer = raw.next().await;
    assert_eq!(answer["key"], 7, "{answer}");
    assert_eq!(answer["uri"], "/echo");
    assert_eq!(answer["params"]["params"], json!({"key": 7, "name": "x"}));

    // Some original-design callers send the key as a numeric string.
    raw.send_bytes(r#"{"uri":"/echo","method":"GET","params":{"key":"8"}}¶"#.as_bytes())
        .await;
    assert_eq!(raw.next().await["key"], 8);

    // A top-level key of 0 means "none", so params.key still counts.
    raw.send(request("/echo", 0, json!({"key": 9}))).await;
    assert_eq!(raw.next().await["key"], 9);
}

#[tokio::test]
async fn the_runtime_echoes_heartbeats() {
    let service = Service::start(echo_router()).await;
    let mut raw = service.raw().await;
    raw.send(json!({"uri": "/heartbeat", "method": "GET", "key": 0, "params": null}))
        .await;
    let echo = raw.next().await;
    assert_eq!(echo["uri"], "/heartbeat");
    assert_eq!(echo["key"], 0);
}

/// Sends `count` events (ids 0.., event "tick"), then ends with `{"count": count}`.
/// The stream's next packet, which must come within [`PROMPTLY`] and not be an error.
async fn next_packet(stream: &mut ResponseStream) -> Packet {
    timeout(PROMPTLY, stream.next())
        .await
        .expect("a packet in time")
        .expect("the stream has not ended")
        .expect("the stream did not fail")
}

fn counting_router() -> Router {
    Router::new().stream(
        "GET",
        "/count",
        |request: Request, sink: EventSink| async move {
            let count = request.params["count"].as_u64().unwrap_or(3);
            for i in 0..count {
                let event = Event {
                    id: Some(json!(i)),
                    event: Some("tick".into()),
                    data: json!({"i": i}),
                };
                if sink.send(event).await.is_err() {
                    return Response::error(499, "cancelled");
                }
            }
            Response::ok(json!({"count": count}))
        },
    )
}

#[tokio::test]
async fn a_stream_sends_its_events_in_order_then_an_end_packet() {
    let service = Service::start(counting_router()).await;
    let client = service.client().await;
    let mut stream = client
        .stream(Packet::request("GET", "/count", json!({"count": 50})))
        .await
        .unwrap();
    for i in 0..50u64 {
        let event = next_packet(&mut stream).await;
        assert!(event.stream, "events carry stream:true: {event:?}");
        assert!(!event.end);
        assert_eq!(event.id, Some(json!(i)));
        assert_eq!(event.event.as_deref(), Some("tick"));
        assert_eq!(event.params, json!({"i": i}));
        assert_eq!(event.uri, "/count");
    }
    let end = next_packet(&mut stream).await;
    assert!(end.end, "{end:?}");
    assert_eq!(end.status(), 200);
    assert_eq!(end.params, json!({"count": 50}));
    assert!(timeout(PROMPTLY, stream.next()).await.unwrap().is_none());

    // On the wire, as a plain socket sees it: same key on every packet, string ids allowed.
    let router = Router::new().stream("GET", "/named", |_, sink: EventSink| async move {
        sink.open().await.unwrap();
        let event = Event {
            id: Some(json!("a-1")),
            event: None,
            data: json!("first"),
        };
        sink.send(event).await.unwrap();
        Response::ok(Value::Null)
    });
    let named = Service::start(router).await;
    let mut raw = named.raw().await;
    raw.send(json!({"uri": "/named", "method": "GET", "key": 31, "params": null, "stream": true}))
        .await;
    let opened = raw.next().await;
    assert_eq!(opened["key"], 31);
    assert_eq!(opened["stream"], true);
    let opened: Packet = serde_json::from_value(opened).unwrap();
    assert!(opened.is_empty_event(), "open() sends an empty event");
    let event = raw.next().await;
    assert_eq!(
        (
            &event["key"],
            &event["stream"],
            &event["id"],
            &event["params"]
        ),
        (&json!(31), &json!(true), &json!("a-1"), &json!("first")),
        "{event}"
    );
    assert_eq!(event.get("event"), None);
    let end = raw.next().await;
    assert_eq!(
        (&end["key"], &end["end"]),
        (&json!(31), &json!(true)),
        "{end}"
    );
}

#[tokio::test]
async fn call_takes_whatever_the_node_answers_a_stream_or_one_packet() {
    let service = Service::start(counting_router().route("GET", "/echo", echo)).await;
    let client = service.client().await;

    // No `stream: true` on the request: a stream route streams all the same.
    let mut answers = client
        .call(Packet::request("GET", "/count", json!({"count": 2})))
        .await
        .unwrap();
    let mut packets = Vec::new();
    while let Some(packet) = timeout(PROMPTLY, answers.next()).await.unwrap() {
        packets.push(packet.unwrap());
    }
    let shape: Vec<(bool, bool, Value)> = packets
        .iter()
        .map(|p| (p.stream, p.end, p.params.clone()))
        .collect();
    assert_eq!(
        shape,
        vec![
            (true, false, json!({"i": 0})),
            (true, false, json!({"i": 1})),
            (false, true, json!({"count": 2})),
        ]
    );

    let mut answers = client
        .call(Packet::request("GET", "/echo", json!("one")))
        .await
        .unwrap();
    let only = timeout(PROMPTLY, answers.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(!only.stream && !only.end, "{only:?}");
    assert_eq!(only.params["params"], "one");
    assert!(timeout(PROMPTLY, answers.next()).await.unwrap().is_none());
}

/// Handlers as the services write them: typed answers, `?` on named errors, state bound with
/// `with_state`. Each answer reaches the caller as the status its type names.
#[tokio::test]
async fn typed_answers_and_named_errors_travel_as_their_statuses() {
    #[derive(Deserialize)]
    struct Claim {
        name: String,
    }
    async fn claim(taken: &'static str, request: Request) -> Result<Created<Value>, ServiceError> {
        let claim: Claim = request.params_as()?;
        if claim.name == taken {
            return Err(ServiceError::Conflict(format!("{taken} is taken")));
        }
        Ok(Created(json!({ "name": claim.name })))
    }
    let router = Router::new()
        .route("POST", "/names", with_state("alice", claim))
        .route("GET", "/names", |_| async {
            Ok::<_, ServiceError>(Json(json!(["alice"])))
        })
        .stream("GET", "/names/stream", |_, _sink: EventSink| async {
            Err::<Json<Value>, _>(ServiceError::Unavailable("full".into()))
        });
    let service = Service::start(router).await;
    let client = service.client().await;

    let answer = |method: &'static str, params: Value| {
        let client = &client;
        async move {
            let answer = client
                .request(Packet::request(method, "/names", params))
                .await
                .unwrap();
            (answer.status, answer.error, answer.params)
        }
    };
    assert_eq!(
        answer("POST", json!({"name": "bob"})).await,
        (Some(201), None, json!({"name": "bob"}))
    );
    assert_eq!(
        answer("POST", json!({"name": "alice"})).await,
        (Some(409), Some("alice is taken".into()), Value::Null)
    );
    let (status, error, _) = answer("POST", json!({"name": 5})).await;
    assert_eq!(status, Some(400));
    assert!(error.unwrap().starts_with("invalid parameters:"));
    assert_eq!(
        answer("GET", Value::Null).await,
        (None, None, json!(["alice"]))
    );

    let mut stream = client
        .stream(Packet::request("GET", "/names/stream", Value::Null))
        .await
        .unwrap();
    let end = next_packet(&mut stream).await;
    assert!(end.end, "{end:?}");
    assert_eq!(
        (end.status, end.error.as_deref()),
        (Some(503), Some("full"))
    );
}

#[tokio::test]
async fn a_stream_route_that_answers_without_opening_gives_a_one_shot_answer() {
    let router = Router::new().stream("GET", "/maybe", |_, _sink: EventSink| async {
        Ok::<_, ServiceError>(Json(json!({"plain": true})))
    });
    let service = Service::start(router).await;
    let client = service.client().await;
    let mut stream = client
        .stream(Packet::request("GET", "/maybe", Value::Null))
        .await
        .unwrap();
    let only = next_packet(&mut stream).await;
    assert!(!only.stream && !only.end, "{only:?}");
    assert_eq!(only.params, json!({"plain": true}));
}

#[tokio::test]
async fn a_stream_refused_before_it_opens_ends_with_its_error() {
    let router = Router::new().stream("GET", "/picky", |_, _sink: EventSink| async {
        Response::error(400, "no topic given")
    });
    let service = Service::start(router).await;
    let client = service.client().await;
    let mut stream = client
        .stream(Packet::request("GET", "/picky", Value::Null))
        .await
        .unwrap();
    let end = next_packet(&mut stream).await;
    assert!(end.end, "{end:?}");
    assert_eq!(end.status, Some(400));
    assert_eq!(end.error.as_deref(), Some("no topic given"));
    assert!(timeout(PROMPTLY, stream.next()).await.unwrap().is_none());
}

/// A stream route whose handler sends one event and then waits forever; its future reports being
/// dropped on `dropped`.
fn endless_router(dropped: mpsc::UnboundedSender<&'static str>) -> Router {
    Router::new().stream("GET", "/forever", move |_, sink: EventSink| {
        let guard = DropSignal(dropped.clone(), "forever");
        async move {
            let _guard = guard;
            let first = Event {
                data: json!("first"),
                ..Event::default()
            };
            let _ = sink.send(first).await;
            std::future::pending::<()>().await;
            Response::ok(Value::Null)
        }
    })
}

#[tokio::test]
async fn dropping_a_response_stream_cancels_the_handler() {
    let (dropped_tx, mut dropped) = mpsc::unbounded_channel();
    let service = Service::start(endless_router(dropped_tx)).await;
    let client = service.client().await;
    let mut stream = client
        .stream(Packet::request("GET", "/forever", Value::Null))
        .await
        .unwrap();
    let first = next_packet(&mut stream).await;
    assert_eq!(first.params, "first");
    assert!(dropped.try_recv().is_err(), "the handler still runs");

    drop(stream);
    let signal = timeout(PROMPTLY, dropped.recv()).await;
    assert_eq!(
        signal,
        Ok(Some("forever")),
        "the cancel dropped the handler"
    );

    // The connection is still fine afterwards.
    let mut again = client
        .stream(Packet::request("GET", "/forever", Value::Null))
        .await
        .unwrap();
    let first = timeout(PROMPTLY, again.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.params, "first");
}

#[tokio::test]
async fn a_cancel_packet_drops_the_handler_of_its_key_only() {
    let (dropped_tx, mut dropped) = mpsc::unbounded_channel();
    let service = Service::start(endless_router(dropped_tx)).await;
    let mut raw = service.raw().await;
    for key in [41, 42] {
        raw.send(
            json!({"uri": "/forever", "method": "GET", "key": key, "params": null,
            "stream": true}),
        )
        .await;
    }
    let mut keys = vec![
        raw.next().await["key"].clone(),
        raw.next().await["key"].clone(),
    ];
    keys.sort_by_key(|key| key.as_u64());
    assert_eq!(keys, vec![json!(41), json!(42)]);

    raw.send(
        json!({"uri": "/forever", "method": "GET", "key": 41, "params": null,
        "cancel": true}),
    )
    .await;
    assert_eq!(timeout(PROMPTLY, dropped.recv()).await, Ok(Some("forever")));
    // The other stream keeps running: the connection answers a new request, and only then
    // closing the connection ends stream 42.
    raw.send(
        json!({"uri": "/forever", "method": "GET", "key": 43, "params": null,
        "stream": true}),
    )
    .await;
    assert_eq!(raw.next().await["key"], 43);
    assert!(dropped.try_recv().is_err(), "stream 42 was not cancelled");
    drop(raw);
    for _ in [42, 43] {
        assert_eq!(timeout(PROMPTLY, dropped.recv()).await, Ok(Some("forever")));
    }
}

#[tokio::test]
async fn closing_the_connection_drops_the_stream_handler() {
    let (dropped_tx, mut dropped) = mpsc::unbounded_channel();
    let service = Service::start(endless_router(dropped_tx)).await;
    let mut raw = service.raw().await;
    raw.send(
        json!({"uri": "/forever", "method": "GET", "key": 5, "params": null,
        "stream": true}),
    )
    .await;
    let first = raw.next().await;
    assert_eq!(
        (&first["key"], &first["params"]),
        (&json!(5), &json!("first"))
    );
    assert!(dropped.try_recv().is_err(), "the handler still runs");

    drop(raw);
    assert_eq!(timeout(PROMPTLY, dropped.recv()).await, Ok(Some("forever")));
}

#[tokio::test]
async fn a_plain_request_to_a_stream_route_gets_the_first_event_and_cancels_the_rest() {
    let (dropped_tx, mut dropped) = mpsc::unbounded_channel();
    let service = Service::start(endless_router(dropped_tx)).await;
    let client = service.client().await;
    let answer = timeout(
        PROMPTLY,
        client.request(Packet::request("GET", "/forever", Value::Null)),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(answer.stream);
    assert_eq!(answer.params, "first");
    // Nobody reads the rest, so the client cancels the stream and the handler is dropped.
    assert_eq!(timeout(PROMPTLY, dropped.recv()).await, Ok(Some("forever")));
}

#[tokio::test]
async fn garbage_bytes_are_ignored_and_the_connection_keeps_working() {
    let service = Service::start(echo_router()).await;
    let mut raw = service.raw().await;
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    raw.send_bytes(&garbage).await;
    raw.send_bytes(DELIMITER).await;
    raw.send_bytes(b"\xff\xfe\x00not json at all").await;
    raw.send_bytes(DELIMITER).await;
    // Valid JSON that is not an object, a stray delimiter, and blank space.
    raw.send_bytes("[1,2,3]¶\"text\"¶42¶¶  \n¶".as_bytes())
        .await;
    raw.send(request("/echo", 11, json!({"after": "garbage"})))
        .await;
    let answer = raw.next().await;
    assert_eq!(
        answer["key"], 11,
        "nothing was answered for the garbage: {answer}"
    );
    assert_eq!(answer["params"]["params"], json!({"after": "garbage"}));
}

#[tokio::test]
async fn an_invalid_packet_with_a_key_is_answered_400_with_that_key() {
    let service = Service::start(echo_router()).await;
    let mut raw = service.raw().await;
    // Valid JSON, but not a packet: `uri` must be a string.
    raw.send(json!({"uri": 5, "method": "GET", "key": 12, "params": null}))
        .await;
    let answer = raw.next().await;
    assert_eq!(answer["key"], 12, "{answer}");
    assert_eq!(answer["status"], 400);
    let error = answer["error"].as_str().unwrap();
    assert!(error.contains("invalid packet"), "{error}");

    // The same with an original-design key.
    raw.send(json!({"uri": "/echo", "method": ["GET"], "params": {"key": 13}}))
        .await;
    let answer = raw.next().await;
    assert_eq!(
        (&answer["key"], &answer["status"]),
        (&json!(13), &json!(400))
    );

    raw.send(request("/echo", 14, Value::Null)).await;
    let answer = raw.next().await;
    assert_eq!((&answer["key"], answer.get("status")), (&json!(14), None));
}

#[tokio::test]
async fn broken_json_is_not_answered_and_the_connection_keeps_working() {
    let service = Service::start(echo_router()).await;
    let mut raw = service.raw().await;
    // The key cannot be read from a frame that is not JSON, so there is nobody to answer.
    raw.send_bytes(r#"{"uri":"/echo","method":"GET","key":15,"params":{¶"#.as_bytes())
        .await;
    raw.send(request("/echo", 16, Value::Null)).await;
    let answer = raw.next().await;
    assert_eq!(answer["key"], 16, "{answer}");
    assert_eq!(answer.get("status"), None);
}

#[tokio::test]
async fn an_oversized_frame_is_skipped_and_the_connection_keeps_working() {
    let service = Service::start(echo_router()).await;
    let mut raw = service.raw().await;
    // Over the 4 MiB default, sent in pieces as a real peer would.
    let mut oversized = br#"{"uri":"/echo","method":"GET","key":17,"params":""#.to_vec();
    oversized.resize(shared::codec::DEFAULT_MAX_FRAME_LENGTH + 64 * 1024, b'a');
    oversized.extend_from_slice(br#""}"#);
    oversized.extend_from_slice(DELIMITER);
    for chunk in oversized.chunks(256 * 1024) {
        raw.send_bytes(chunk).await;
    }
    raw.send(request("/echo", 18, json!("small"))).await;
    let answer = raw.next().await;
    assert_eq!(
        answer["key"], 18,
        "the oversized frame is dropped: {answer}"
    );
    assert_eq!(answer["params"]["params"], "small");
}

#[tokio::test]
async fn the_client_is_not_connected_while_nothing_listens_and_connects_once_a_server_appears() {
    // Find a free port, then leave it free.
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let client = PacketClient::connect(addr.to_string(), Dialect::Packet);
    let refused = client
        .request(Packet::request("GET", "/echo", Value::Null))
        .await;
    assert!(
        matches!(refused, Err(ClientError::NotConnected)),
        "{refused:?}"
    );
    assert!(!client.is_connected());
    // Give the first attempt time to be refused, so that connecting below is a retry.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refused = client
        .request(Packet::request("GET", "/echo", Value::Null))
        .await;
    assert!(
        matches!(refused, Err(ClientError::NotConnected)),
        "{refused:?}"
    );

    let listener = TcpListener::bind(addr).await.unwrap();
    let _service = Service::start_on(listener, echo_router());
    // The client retries every 3 s. With the clock paused, the runtime skips straight to the
    // retry as soon as nothing else is runnable, instead of the test waiting the real 3 s; the
    // connection itself is real I/O and happens as usual.
    tokio::time::pause();
    client.connected().await;
    tokio::time::resume();
    assert!(client.is_connected());
    let answer = client
        .request(Packet::request("GET", "/echo", json!("hi")))
        .await
        .unwrap();
    assert_eq!(answer.params["params"], "hi");
}

/// A node written by hand: it listens on a free loopback port and runs `serve` on the first
/// connection it accepts, as raw packets.
async fn node_on_one_connection<F, Fut>(serve: F) -> (SocketAddr, JoinHandle<Fut::Output>)
where
    F: FnOnce(Raw) -> Fut + Send + 'static,
    Fut: std::future::Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        serve(Raw::new(stream)).await
    });
    (addr, task)
}

/// A server that accepts one connection, reads until one whole request arrived, then closes.
async fn server_that_hangs_up() -> (SocketAddr, JoinHandle<Value>) {
    node_on_one_connection(|mut raw| async move { raw.next().await }).await
}

#[tokio::test]
async fn a_request_fails_with_connection_closed_when_the_server_hangs_up() {
    let (addr, server) = server_that_hangs_up().await;
    let client = connected_client(addr, Dialect::Packet).await;
    let result = timeout(
        PROMPTLY,
        client.request(Packet::request("GET", "/slow", json!({"n": 1}))),
    )
    .await
    .expect("the caller is told at once, not left waiting");
    assert!(
        matches!(result, Err(ClientError::ConnectionClosed)),
        "{result:?}"
    );
    let received = server.await.unwrap();
    assert_eq!(received["uri"], "/slow");
    assert!(received["key"].as_u64().unwrap() >= 1);
}

#[tokio::test]
async fn an_open_stream_fails_with_connection_closed_when_the_server_hangs_up() {
    let (addr, server) = server_that_hangs_up().await;
    let client = connected_client(addr, Dialect::Packet).await;
    let mut stream = client
        .stream(Packet::request("GET", "/feed", Value::Null))
        .await
        .unwrap();
    let next = timeout(PROMPTLY, stream.next()).await.unwrap();
    assert!(
        matches!(next, Some(Err(ClientError::ConnectionClosed))),
        "{next:?}"
    );
    assert!(timeout(PROMPTLY, stream.next()).await.unwrap().is_none());
    let received = server.await.unwrap();
    assert_eq!(received["stream"], true);
}

#[tokio::test]
async fn an_abandoned_request_leaves_the_connection_usable() {
    let started = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let router = Router::new()
        .route("GET", "/held", {
            let (started, release) = (started.clone(), release.clone());
            move |_| {
                let (started, release) = (started.clone(), release.clone());
                async move {
                    started.notify_one();
                    release.notified().await;
                    Response::ok("late")
                }
            }
        })
        .route("GET", "/echo", echo);
    let service = Service::start(router).await;
    let client = service.client().await;

    let abandoned = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .request(Packet::request("GET", "/held", Value::Null))
                .await
        }
    });
    timeout(PROMPTLY, started.notified()).await.unwrap();
    abandoned.abort();
    assert!(abandoned.await.unwrap_err().is_cancelled());
    // Its answer now arrives for a key nobody waits for; it must not reach anyone else.
    release.notify_one();
    for n in 0..20 {
        let answer = client
            .request(Packet::request("GET", "/echo", json!(n)))
            .await
            .unwrap();
        assert_eq!(answer.params["params"], n, "{answer:?}");
    }
    assert!(client.is_connected());
}

/// An original-design node: takes `{uri, method, params: {key, ...}}` and answers flat objects
/// `{key, errorcode, errormessage, ...}`. Reports each request it received.
async fn original_design_server() -> (SocketAddr, mpsc::UnboundedReceiver<Value>) {
    let (received_tx, received) = mpsc::unbounded_channel();
    let (addr, _node) = node_on_one_connection(|mut raw| async move {
        while let Some(request) = raw.try_next().await {
            let key = request["params"]["key"].clone();
            let answer = match request["params"]["value"].as_str() {
                Some(value) => json!({"key": key, "errorcode": 0, "value": value, "n": 1}),
                None => json!({"key": key, "errorcode": 3, "errormessage": "no value"}),
            };
            let _ = received_tx.send(request);
            let mut frame = serde_json::to_vec(&answer).unwrap();
            frame.extend_from_slice(DELIMITER);
            raw.send_bytes(&frame).await;
        }
    })
    .await;
    (addr, received)
}

#[tokio::test]
async fn the_legacy_dialect_talks_to_an_original_design_node() {
    let (addr, mut received) = original_design_server().await;
    let client = connected_client(addr, Dialect::Legacy).await;

    let answer = client
        .request(Packet::request("GET", "/kv", json!({"value": "v1"})))
        .await
        .unwrap();
    let request = received.recv().await.unwrap();
    assert_eq!(request["uri"], "/kv");
    assert_eq!(request["method"], "GET");
    assert_eq!(request["params"]["value"], "v1");
    let key = request["params"]["key"]
        .as_u64()
        .expect("the key is in params.key");
    assert!(key >= 1);
    assert_eq!(answer.key, key);
    assert_eq!(answer.status, None, "a zero errorcode is a 200");
    assert_eq!(
        answer.params,
        json!({"errorcode": 0, "value": "v1", "n": 1}),
        "the flat answer less its key"
    );

    let answer = client
        .request(Packet::request("GET", "/kv", json!({})))
        .await
        .unwrap();
    assert_eq!(answer.status, Some(500), "a non-zero errorcode is a 500");
    assert_eq!(
        answer.params,
        json!({"errorcode": 3, "errormessage": "no value"})
    );

    // Many at once still pair up by key.
    let mut requests = JoinSet::new();
    for n in 0..50 {
        let client = client.clone();
        requests.spawn(async move {
            let value = format!("v{n}");
            let answer = client
                .request(Packet::request("GET", "/kv", json!({"value": value})))
                .await
                .unwrap();
            assert_eq!(answer.params["value"], value);
        });
    }
    timeout(PROMPTLY, async {
        while let Some(joined) = requests.join_next().await {
            joined.unwrap();
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn shutdown_answers_the_requests_in_flight_then_serve_returns() {
    let started = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let router = Router::new().route("GET", "/slow", {
        let (started, release) = (started.clone(), release.clone());
        move |_| {
            let (started, release) = (started.clone(), release.clone());
            async move {
                started.notify_one();
                release.notified().await;
                Response::ok("finished")
            }
        }
    });
    let mut service = Service::start(router).await;
    let client = service.client().await;
    let slow = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .request(Packet::request("GET", "/slow", Value::Null))
                .await
        }
    });
    timeout(PROMPTLY, started.notified()).await.unwrap();

    service.shutdown.cancel();
    // Once the listener is closed the shutdown is under way; only then let the handler finish.
    let addr = service.addr;
    timeout(PROMPTLY, async {
        while TcpStream::connect(addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the listener closes on shutdown");
    release.notify_one();

    let answer = timeout(PROMPTLY, slow).await.unwrap().unwrap().unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.params, "finished");
    let served = timeout(PROMPTLY, service.task.take().unwrap())
        .await
        .expect("serve returns once the request is answered");
    served.unwrap().unwrap();
}

/// A stream route that opens, hands its stream's multicast address (if its caller takes
/// multicast packets) to `addresses`, and waits to be cancelled.
fn addressed_router(addresses: mpsc::UnboundedSender<Option<StreamAddress>>) -> Router {
    Router::new().stream("GET", "/room", move |_, sink: EventSink| {
        let addresses = addresses.clone();
        async move {
            sink.open().await.unwrap();
            let _ = addresses.send(sink.address());
            sink.closed().await;
            Response::ok(Value::Null)
        }
    })
}

async fn next_address(
    addresses: &mut mpsc::UnboundedReceiver<Option<StreamAddress>>,
) -> Option<StreamAddress> {
    timeout(PROMPTLY, addresses.recv())
        .await
        .expect("the stream opens")
        .expect("the router lives")
}

#[tokio::test]
async fn a_multicast_event_reaches_every_stream_of_a_connection_in_one_packet() {
    let (addresses_tx, mut addresses) = mpsc::unbounded_channel();
    let service = Service::start(addressed_router(addresses_tx)).await;
    let mut raw = service.raw().await;
    for key in [51, 52, 53] {
        raw.send(
            json!({"uri": "/room", "method": "GET", "key": key, "params": null,
            "stream": true, "multicast": key != 53}),
        )
        .await;
        assert_eq!(raw.next().await["key"], key, "the stream opens");
    }
    let mut targets = Vec::new();
    for key in [51, 52] {
        let address = next_address(&mut addresses)
            .await
            .expect("asked for multicast");
        assert_eq!(address.key(), key);
        targets.push((key, address));
    }
    assert!(
        next_address(&mut addresses).await.is_none(),
        "a stream whose caller did not ask for multicast has no address"
    );

    let event = Event {
        id: Some(json!(7)),
        event: Some("notice".into()),
        data: json!({"message": "hello"}),
    };
    let missed = multicast(targets.iter().map(|(key, to)| (*key, to)), &event);
    assert!(missed.is_empty());
    let packet = raw.next().await;
    assert_eq!(
        (
            &packet["keys"],
            &packet["stream"],
            &packet["id"],
            &packet["event"]
        ),
        (&json!([51, 52]), &json!(true), &json!(7), &json!("notice")),
        "{packet}"
    );
    assert_eq!(packet["params"], json!({"message": "hello"}));
    assert_eq!(packet["key"], 51);

    // One stream alone gets a plain event packet.
    multicast([(52, &targets[1].1)], &event);
    let packet = raw.next().await;
    assert_eq!(
        (&packet["key"], packet.get("keys")),
        (&json!(52), None),
        "{packet}"
    );
}

#[tokio::test]
async fn multicast_splits_many_streams_into_bounded_packets_and_the_client_hands_each_its_copy() {
    let (addresses_tx, mut addresses) = mpsc::unbounded_channel();
    let service = Service::start(addressed_router(addresses_tx)).await;
    let client = service.client().await;
    let streams = MAX_KEYS_PER_PACKET + 5;
    let mut opened = Vec::new();
    for _ in 0..streams {
        let request = Packet {
            multicast: true,
            ..Packet::request("GET", "/room", Value::Null)
        };
        let mut stream = client.call(request).await.unwrap();
        let first = next_packet(&mut stream).await;
        assert!(first.is_empty_event());
        opened.push(stream);
    }
    let mut targets = Vec::new();
    for _ in 0..streams {
        targets.push(
            next_address(&mut addresses)
                .await
                .expect("asked for multicast"),
        );
    }
    let event = Event {
        id: Some(json!(1)),
        event: Some("tick".into()),
        data: json!("once for all"),
    };
    let missed = multicast(targets.iter().map(|to| (to.key(), to)), &event);
    assert!(missed.is_empty());
    for stream in &mut opened {
        let packet = next_packet(stream).await;
        assert_eq!(
            (&packet.id, packet.event.as_deref(), &packet.params),
            (&Some(json!(1)), Some("tick"), &json!("once for all"))
        );
        assert!(packet.keys.is_empty(), "each stream gets its own copy");
    }

    // On the wire: no packet carries more than the bound.
    let mut raw = service.raw().await;
    let mut keys = Vec::new();
    for key in 0..streams as u64 {
        raw.send(
            json!({"uri": "/room", "method": "GET", "key": 1000 + key, "params": null,
            "stream": true, "multicast": true}),
        )
        .await;
        raw.next().await;
        keys.push(next_address(&mut addresses).await.unwrap());
    }
    multicast(keys.iter().map(|to| (to.key(), to)), &event);
    let first = raw.next().await;
    let second = raw.next().await;
    let counts = [&first, &second].map(|p| p["keys"].as_array().map_or(1, Vec::len));
    assert_eq!(counts, [MAX_KEYS_PER_PACKET, 5], "{second}");
}

#[tokio::test]
async fn a_multicast_packet_naming_more_streams_than_allowed_is_dropped() {
    // A node written by hand: it opens the stream, sends an event naming the stream more times
    // than a packet may name streams, then an ordinary event.
    let (addr, node) = node_on_one_connection(|mut raw| async move {
        let request = raw.next().await;
        let key = request["key"].as_u64().unwrap();
        let event = |id: u64, keys: Vec<u64>| {
            json!({"uri": "/room", "method": "GET", "key": key, "params": {"n": id},
                "stream": true, "id": id, "keys": keys})
        };
        raw.send(
            json!({"uri": "/room", "method": "GET", "key": key, "params": null,
            "stream": true}),
        )
        .await;
        raw.send(event(1, vec![key; MAX_KEYS_PER_PACKET + 1])).await;
        raw.send(event(2, vec![key])).await;
        // Keep the connection open until the test is done reading.
        raw.try_next().await
    })
    .await;
    let client = connected_client(addr, Dialect::Packet).await;
    let request = Packet {
        multicast: true,
        ..Packet::request("GET", "/room", Value::Null)
    };
    let mut stream = client.call(request).await.unwrap();
    assert!(next_packet(&mut stream).await.is_empty_event());
    let event = next_packet(&mut stream).await;
    assert_eq!(
        event.id,
        Some(json!(2)),
        "the oversized packet was dropped: {event:?}"
    );
    drop(client);
    drop(stream);
    node.abort();
}
