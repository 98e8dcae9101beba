//! The pieces the gateway tests assemble: a real distributor, real service nodes built on the
//! shared runtime, and the gateway itself, each served in-process on a 127.0.0.1 port of its
//! own and stopped when dropped.

#![allow(dead_code)]

use std::{net::SocketAddr, time::Duration};

use gateway::{Config, GatewayError};
use serde_json::{json, Value};
use shared::service::{serve, Request, Response, Router, ServiceConfig};
use tokio::{net::TcpListener, task::JoinHandle, time::timeout};
use tokio_util::sync::CancellationToken;

/// Upper bound for anything that should happen promptly; only reached when a test fails.
pub const PROMPTLY: Duration = Duration::from_secs(15);

/// A server task of a test, cancelled when dropped.
struct Served {
    shutdown: CancellationToken,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl Served {
    fn spawn(run: impl FnOnce(CancellationToken) -> JoinHandle<std::io::Result<()>>) -> Served {
        let shutdown = CancellationToken::new();
        let task = run(shutdown.clone());
        Served {
            shutdown,
            task: Some(task),
        }
    }

    /// Cancels it and waits until it has stopped; `what` names it in a failure.
    async fn stop(&mut self, what: &str) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            timeout(PROMPTLY, task)
                .await
                .unwrap_or_else(|_| panic!("the {what} did not stop promptly"))
                .unwrap()
                .unwrap();
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A distributor served in-process; stopped when dropped.
pub struct Distributor {
    pub addr: SocketAddr,
    served: Served,
}

impl Distributor {
    pub async fn start() -> Distributor {
        Distributor::start_at("127.0.0.1:0".parse().unwrap()).await
    }

    /// Starts on `addr`: a restart on the port the nodes already know.
    pub async fn start_at(addr: SocketAddr) -> Distributor {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = Served::spawn(|shutdown| {
            tokio::spawn(distributor::run(
                listener,
                distributor::Config::default(),
                shutdown,
            ))
        });
        Distributor { addr, served }
    }

    /// Stops it; every node's connection to it closes.
    pub async fn stop(&mut self) {
        self.served.stop("distributor").await;
    }
}

/// A service node on the shared runtime, registered with a distributor; stopped when dropped.
pub struct Service {
    pub addr: SocketAddr,
    served: Served,
}

impl Service {
    pub async fn start(name: &str, router: Router, distributor: SocketAddr) -> Service {
        Service::start_with_readiness(name, router, distributor, None).await
    }

    /// [`Service::start`] for a node that reports its readiness from `readiness`.
    pub async fn start_with_readiness(
        name: &str,
        router: Router,
        distributor: SocketAddr,
        readiness: Option<tokio::sync::watch::Receiver<bool>>,
    ) -> Service {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = ServiceConfig {
            name: name.into(),
            distributor: Some(distributor.to_string()),
            advertise_host: None,
            readiness,
            ..ServiceConfig::default()
        };
        let served =
            Served::spawn(|shutdown| tokio::spawn(serve(listener, router, config, shutdown)));
        Service { addr, served }
    }

    /// Stops it gracefully: its connections close once its requests are answered.
    pub async fn stop(&mut self) {
        self.served.stop("service").await;
    }
}

/// Answers `method uri` with everything it was sent and the name of the node that answered.
fn echo(name: &str) -> impl Fn(Request) -> std::future::Ready<Response> + Send + Sync + 'static {
    let name = name.to_owned();
    move |request: Request| {
        std::future::ready(Response::ok(json!({
            "node": name,
            "method": request.method,
            "uri": request.uri,
            "params": request.params,
            "request_id": request.request_id,
        })))
    }
}

/// A router answering `/echo` and `/echo/deeper` for GET, PUT, POST and DELETE with [`echo`].
pub fn echo_router(name: &str) -> Router {
    let mut router = Router::new();
    for method in ["GET", "PUT", "POST", "DELETE"] {
        router =
            router
                .route(method, "/echo", echo(name))
                .route(method, "/echo/deeper", echo(name));
    }
    router
}

/// The gateway served in-process; stopped when dropped.
pub struct Gateway {
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), GatewayError>>>,
}

impl Gateway {
    /// A gateway on `distributor` with the default settings changed by `adjust`.
    pub async fn start(distributor: SocketAddr, adjust: impl FnOnce(&mut Config)) -> Gateway {
        let mut config = Config {
            distributor: Some(distributor.to_string()),
            ..Config::default()
        };
        adjust(&mut config);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(gateway::run(listener, config, shutdown.clone()));
        Gateway {
            addr,
            http: reqwest::Client::builder()
                .timeout(PROMPTLY)
                .build()
                .unwrap(),
            shutdown,
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `GET /_/topology`.
    pub async fn topology(&self) -> Value {
        self.http
            .get(self.url("/_/topology"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// How many connected nodes the gateway has for `url` (e.g. `GET/echo`).
    pub async fn connected_nodes(&self, url: &str) -> usize {
        let topology = self.topology().await;
        topology["routes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|route| route["url"] == url)
            .flat_map(|route| route["nodes"].as_array().unwrap())
            .filter(|node| node["connected"] == true)
            .count()
    }

    /// Waits until `/_/topology` satisfies `done`; `what` names it in a failure.
    pub async fn wait_for_topology(&self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let reached = timeout(PROMPTLY, async {
            loop {
                let topology = self.topology().await;
                if done(&topology) {
                    return topology;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        match reached {
            Ok(topology) => topology,
            Err(_) => panic!(
                "{what} never happened; topology: {:#}",
                self.topology().await
            ),
        }
    }

    /// Waits until `url` has exactly `count` connected nodes.
    pub async fn wait_for_nodes(&self, url: &str, count: usize) {
        let reached = timeout(PROMPTLY, async {
            while self.connected_nodes(url).await != count {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        if reached.is_err() {
            panic!(
                "{url} never had {count} connected nodes; topology: {:#}",
                self.topology().await
            );
        }
    }

    /// `GET path` as JSON, with its status.
    pub async fn get(&self, path: &str) -> (reqwest::StatusCode, Value) {
        let response = self.http.get(self.url(path)).send().await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap())
    }

    /// The node that answered each of `times` requests `GET path`, every one of them a 200 from
    /// the echo router.
    pub async fn answering_nodes(&self, path: &str, times: usize) -> Vec<String> {
        let mut nodes = Vec::new();
        for _ in 0..times {
            let (status, body) = self.get(path).await;
            assert_eq!(status, reqwest::StatusCode::OK, "GET {path}: {body}");
            nodes.push(
                body["node"]
                    .as_str()
                    .expect("an echo answer names its node")
                    .to_owned(),
            );
        }
        nodes
    }

    /// The value of an unlabelled metric in `GET /metrics`, or of the first series whose line
    /// starts with `series`.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self
            .http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find(|line| line.starts_with(series))
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in the metrics:\n{text}"))
    }

    /// Begins a graceful shutdown.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Shuts down and waits for `run` to return.
    pub async fn stop(&mut self) -> Result<(), GatewayError> {
        self.shutdown.cancel();
        match self.task.take() {
            Some(task) => timeout(PROMPTLY, task)
                .await
                .expect("the gateway stops promptly")
                .unwrap(),
            None => Ok(()),
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
