//! The gateway and the distributor: serving on while the distributor is away, learning new nodes
//! when it is back, riding out its restart, and routing to nodes written with nothing but a
//! socket: one of the original design, and one of ours whose answers' text must arrive as is.

mod common;

use std::{
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use common::{echo_router, Distributor, Gateway, Service, PROMPTLY};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::timeout,
};

#[tokio::test]
async fn the_gateway_keeps_serving_while_the_distributor_is_down_and_learns_new_nodes_after() {
    let mut distributor = Distributor::start().await;
    let distributor_addr = distributor.addr;
    let _a = Service::start("echo", echo_router("a"), distributor_addr).await;
    let gateway = Gateway::start(distributor_addr, |_| {}).await;
    gateway.wait_for_nodes("GET/echo", 1).await;

    distributor.stop().await;
    // Across more than one reconnect attempt of every node (every 3 s), requests go on.
    for _ in 0..20 {
        let (status, body) = gateway.get("/echo").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["node"], "a");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A node started meanwhile cannot register yet.
    let _b = Service::start("echo", echo_router("b"), distributor_addr).await;
    assert_eq!(gateway.connected_nodes("GET/echo").await, 1);

    let _distributor = Distributor::start_at(distributor_addr).await;
    gateway.wait_for_nodes("GET/echo", 2).await;
    let nodes = gateway.answering_nodes("/echo", 4).await;
    assert!(
        nodes.iter().any(|node| node == "b"),
        "the new node is served: {nodes:?}"
    );
}

#[tokio::test]
async fn a_distributor_restart_fails_no_request() {
    let mut distributor = Distributor::start().await;
    let distributor_addr = distributor.addr;
    let _a = Service::start("echo", echo_router("a"), distributor_addr).await;
    let _b = Service::start("echo", echo_router("b"), distributor_addr).await;
    let gateway = Arc::new(Gateway::start(distributor_addr, |_| {}).await);
    gateway.wait_for_nodes("GET/echo", 2).await;

    let stop = Arc::new(AtomicBool::new(false));
    let (answered, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let traffic = tokio::spawn({
        let (gateway, stop) = (gateway.clone(), stop.clone());
        let (answered, failed) = (answered.clone(), failed.clone());
        async move {
            while !stop.load(Ordering::Relaxed) {
                let response = gateway.http.get(gateway.url("/echo")).send().await;
                match response {
                    Ok(response) if response.status() == StatusCode::OK => {
                        answered.fetch_add(1, Ordering::Relaxed)
                    }
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });

    distributor.stop().await;
    let _distributor = Distributor::start_at(distributor_addr).await;
    // Until every node has registered again (and a little after), nothing fails.
    tokio::time::sleep(Duration::from_secs(4)).await;
    gateway.wait_for_nodes("GET/echo", 2).await;
    let nodes = gateway.topology().await["nodes"].clone();
    assert!(
        nodes
            .as_array()
            .unwrap()
            .iter()
            .all(|node| node["leaving"] == false),
        "both nodes are back in the topology: {nodes}"
    );
    let before = answered.load(Ordering::Relaxed);
    timeout(PROMPTLY, async {
        while answered.load(Ordering::Relaxed) < before + 20 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("traffic stalled");
    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();
    assert_eq!(failed.load(Ordering::Relaxed), 0, "requests failed");
}

const DELIMITER: &str = "¶";

/// Reads `¶`-delimited JSON frames, one at a time.
struct RawFrames<R> {
    reader: R,
    buffer: Vec<u8>,
}

impl<R: tokio::io::AsyncRead + Unpin> RawFrames<R> {
    fn new(reader: R) -> Self {
        RawFrames {
            reader,
            buffer: Vec::new(),
        }
    }

    async fn next(&mut self) -> Option<Value> {
        loop {
            if let Some(end) = self
                .buffer
                .windows(DELIMITER.len())
                .position(|window| window == DELIMITER.as_bytes())
            {
                let frame: Vec<u8> = self.buffer.drain(..end + DELIMITER.len()).collect();
                return Some(serde_json::from_slice(&frame[..end]).expect("a JSON frame"));
            }
            let mut chunk = [0u8; 4096];
            let n = self.reader.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            self.buffer.extend_from_slice(&chunk[..n]);
        }
    }
}

/// An original-design node written with nothing but a socket and JSON: it registers without
/// `protocol`, reads the key from `params.key`, and answers flat objects
/// `{key, errorcode, errormessage, ...}`. `PUT` fails with errorcode 1.
async fn original_design_node(distributor: std::net::SocketAddr) -> tokio::task::JoinHandle<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut registry = TcpStream::connect(distributor).await.unwrap();
    let register = json!({"uri": "/distributes", "method": "POST", "key": 0,
        "params": {"port": port, "name": "legacy", "urls": ["GET/legacy", "PUT/legacy"]}});
    registry
        .write_all(format!("{register}{DELIMITER}").as_bytes())
        .await
        .unwrap();
    let mut registry = RawFrames::new(registry);
    let topology = timeout(PROMPTLY, registry.next())
        .await
        .expect("the topology arrives after registering")
        .expect("the distributor keeps the connection");
    assert_eq!(topology["uri"], "/distributes");
    assert_eq!(topology["method"], "GET");
    assert!(topology["params"]
        .as_array()
        .unwrap()
        .iter()
        .any(|node| node["name"] == "legacy" && node["port"] == port));

    tokio::spawn(async move {
        // Keep reading the distributor's broadcasts, as a registered node must.
        tokio::spawn(async move { while registry.next().await.is_some() {} });
        answer_each_request(listener, |request| {
            let params = &request["params"];
            let answer = if request["method"] == "PUT" {
                json!({"key": params["key"], "errorcode": 1,
                    "errormessage": "read-only", "uri": request["uri"]})
            } else {
                json!({"key": params["key"], "errorcode": 0, "errormessage": "",
                    "uri": request["uri"], "got": params["params"]})
            };
            Some(answer.to_string())
        })
        .await
    })
}

/// Serves the connections `listener` accepts: every request frame gets the frame `answer` writes
/// for it, if any.
async fn answer_each_request(listener: TcpListener, answer: fn(&Value) -> Option<String>) {
    loop {
        let (socket, _) = listener.accept().await.unwrap();
        tokio::spawn(async move {
            let (read, mut write) = socket.into_split();
            let mut requests = RawFrames::new(read);
            while let Some(request) = requests.next().await {
                let Some(frame) = answer(&request) else {
                    continue;
                };
                let frame = format!("{frame}{DELIMITER}");
                if write.write_all(frame.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}

#[tokio::test]
async fn an_original_design_node_is_served_through_the_gateway() {
    let distributor = Distributor::start().await;
    let node = original_design_node(distributor.addr).await;
    let gateway = Gateway::start(distributor.addr, |_| {}).await;
    gateway.wait_for_nodes("GET/legacy", 1).await;
    let topology = gateway.topology().await;
    assert_eq!(topology["nodes"][0]["protocol"], Value::Null);

    let (status, body) = gateway.get("/legacy/abc").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"errorcode": 0, "errormessage": "", "uri": "/legacy", "got": "abc"}),
        "the flat answer less its key"
    );

    // Many requests in flight at once on the one connection are told apart by params.key.
    let mut answers = tokio::task::JoinSet::new();
    for i in 0..50 {
        let (http, url) = (gateway.http.clone(), gateway.url(&format!("/legacy/{i}")));
        answers.spawn(async move {
            let body: Value = http.get(url).send().await.unwrap().json().await.unwrap();
            (i, body)
        });
    }
    while let Some(answer) = answers.join_next().await {
        let (i, body) = answer.unwrap();
        assert_eq!(body["got"], i.to_string());
    }

    let failed = gateway
        .http
        .put(gateway.url("/legacy/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(failed.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body: Value = failed.json().await.unwrap();
    assert_eq!(body["errorcode"], 1);
    assert_eq!(body["errormessage"], "read-only");
    node.abort();
}

/// The params every answer of [`hand_written_node`] carries, spacing and key order included.
const PARAMS_TEXT: &str = r#"{"zeta": 1,  "alpha": [true, null], "nested": {"b": "x", "a": 2.50}}"#;

/// A node of our protocol written with nothing but a socket: it registers with `"protocol": 2`,
/// echoes the distributor's heartbeats, and answers every request with [`PARAMS_TEXT`].
async fn hand_written_node(distributor: std::net::SocketAddr) -> tokio::task::JoinHandle<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (registry_read, mut registry_write) =
        TcpStream::connect(distributor).await.unwrap().into_split();
    let register = json!({"uri": "/distributes", "method": "POST", "key": 0,
        "params": {"port": port, "name": "handmade", "urls": ["GET/handmade"], "protocol": 2}});
    registry_write
        .write_all(format!("{register}{DELIMITER}").as_bytes())
        .await
        .unwrap();
    tokio::spawn(async move {
        tokio::spawn(async move {
            let mut registry = RawFrames::new(registry_read);
            while let Some(packet) = registry.next().await {
                if packet["uri"] == "/heartbeat" {
                    let echo = format!("{packet}{DELIMITER}");
                    if registry_write.write_all(echo.as_bytes()).await.is_err() {
                        return;
                    }
                }
            }
        });
        answer_each_request(listener, |request| {
            if request["uri"] == "/heartbeat" || request["cancel"] == true {
                return None;
            }
            Some(format!(
                r#"{{"uri":{},"method":{},"key":{},"params":{PARAMS_TEXT}}}"#,
                request["uri"], request["method"], request["key"]
            ))
        })
        .await
    })
}

#[tokio::test]
async fn a_plain_answer_is_relayed_as_the_json_text_the_node_wrote() {
    let distributor = Distributor::start().await;
    let node = hand_written_node(distributor.addr).await;
    let gateway = Gateway::start(distributor.addr, |_| {}).await;
    gateway.wait_for_nodes("GET/handmade", 1).await;
    let response = gateway
        .http
        .get(gateway.url("/handmade"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/json");
    // Not parsed and written out again, which would sort the keys, drop the spaces and turn
    // 2.50 into 2.5.
    assert_eq!(response.text().await.unwrap(), PARAMS_TEXT);
    node.abort();
}
