//! The service runtime: what turns a set of async handlers into a node of the system.
//!
//! A service builds a [`Router`] of handlers keyed by method and uri and calls [`serve`], which
//! - accepts packet connections on the given listener (the gateway's, or any other node's),
//!   within the listener's limits, each opened with the cluster handshake when there is a secret,
//! - dispatches each request packet to its handler on a task of its own, so one connection can
//!   carry any number of requests in flight, and answers it with the request's key; a request
//!   whose verified caller lacks the route's scope is answered 403 without reaching its handler,
//! - runs stream handlers ([`Router::stream`]) that push events until they return, and drops them
//!   at once when the caller cancels or its connection closes,
//! - registers the service with the distributor (urls derived from the routes) and keeps it
//!   registered across distributor restarts,
//! - answers `GET /_/logs` (admin scope) with the process's recent log lines, on every service,
//!   without registering it ([`crate::logs`]).
//!
//! The services themselves then hold only their own logic.
//!
//! # The shape of a service
//!
//! kv-service and notice-service are built the same way, and a third service copies it:
//! - A core that knows nothing of packets (`kv_service::core::Kv`,
//!   `notice_service::service::NoticeService`): a cheap-to-clone handle with a `thiserror` error.
//! - Next to the routes, `impl From<CoreError> for ServiceError`: the one place that gives each
//!   of the core's errors its named status ([`ServiceError::NotFound`],
//!   [`ServiceError::Conflict`], ...) and logs the failures a caller only sees as
//!   [`ServiceError::Internal`].
//! - `pub fn router(core) -> Router`: each route with its scope, the core bound to each handler
//!   with [`with_state`].
//! - Thin handlers, such as
//!   `async fn get(kv: Kv, request: Request) -> Result<Json<Item>, ServiceError>`: read the
//!   params ([`Request::params_as`], or a small reader of the service's own), call the core with
//!   `?`, and wrap what it returns in [`Json`] (200), [`Created`] (201) or [`Accepted`] (202).
//!   Handlers never write a status number; anything implementing [`IntoAnswer`] can be returned.
//! - A stream handler checks its request before it builds the future that lives as long as the
//!   stream (a refusal is then a plain answer), opens the [`EventSink`], and ends with an answer
//!   like any other handler.
//! - A `Config` holding the service's own settings and a [`ServiceConfig`] (`node`), which
//!   `main.rs` builds with [`ServiceConfig::from_flags`] and tests with [`ServiceConfig::named`].
//!   `lib.rs`'s `run` opens the store (waiting for it as long as it takes), builds the core, and
//!   calls [`serve`] with the router and that `ServiceConfig`, its `readiness` following the
//!   store.
//!
//! Inside, a connection's packets go one of three ways (`Connection::dispatch`): control
//! packets (a cancel, a heartbeat, a handshake this node cannot take) are handled on the spot,
//! a one-shot request gets a task that answers it once, and a stream gets a task that lives until
//! its handler returns or the caller cancels.

mod answer;
mod multicast;

pub use answer::{Accepted, Created, IntoAnswer, Json, Response, ServiceError};
pub use multicast::{multicast, StreamAddress, MAX_KEYS_PER_PACKET};

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use futures::FutureExt;
use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn, Instrument, Span};

use crate::{
    cluster::{self, ClusterPolicy},
    codec::{encode_frame, CodecError, PacketCodec},
    connection::{queue_frame, tune_socket, write_frames, PacketReader, OUTGOING_CAPACITY},
    distributor_client::DistributorClient,
    packet::{key_in, Identity, Registration, PROTOCOL_VERSION},
    server::ConnectionLimits,
    Packet,
};

/// A request as a handler sees it.
#[derive(Debug, Clone)]
pub struct Request {
    pub uri: String,
    pub method: String,
    pub params: Value,
    pub request_id: Option<String>,
    /// The caller as the gateway verified it; `None` for a cluster member calling directly.
    pub auth: Option<Identity>,
}

impl Request {
    /// True when the caller may use `scope`: a verified caller holding it (or `admin`), or a
    /// cluster member calling directly, which the authenticated link already vouches for.
    pub fn allows(&self, scope: &str) -> bool {
        self.auth.as_ref().is_none_or(|auth| auth.has_scope(scope))
    }

    /// The verified caller's name (the token's subject), if the caller has one.
    pub fn subject(&self) -> Option<&str> {
        self.auth.as_ref()?.sub.as_deref()
    }

    /// The rest of the path after the matched route (`params.params`), e.g. `7` for
    /// `DELETE /kv/7` routed to `DELETE/kv`.
    pub fn path_param(&self) -> Option<&str> {
        self.params.get("params").and_then(Value::as_str)
    }

    /// Reads the params as `T`, or a [`ServiceError::BadRequest`] saying what is wrong with them.
    pub fn params_as<T: DeserializeOwned>(&self) -> Result<T, ServiceError> {
        T::deserialize(&self.params)
            .map_err(|err| ServiceError::BadRequest(format!("invalid parameters: {err}")))
    }

    /// [`Request::params_as`] for a handler that builds its [`Response`] by hand.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, Response> {
        self.params_as().map_err(IntoAnswer::into_answer)
    }

    /// Takes what a handler needs out of a request packet, leaving the rest to answer it with.
    fn take_from(packet: &mut Packet) -> Request {
        Request {
            uri: packet.uri.clone(),
            method: packet.method.clone(),
            params: std::mem::take(&mut packet.params),
            request_id: packet.request_id.take(),
            auth: packet.auth.take(),
        }
    }
}

/// One event of a stream. `data` is a [`Value`], or anything else that serializes to JSON, such
/// as a [`crate::RawParams`] serialized once for many subscribers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Event<D = Value> {
    pub id: Option<Value>,
    pub event: Option<String>,
    pub data: D,
}

/// Returned by [`EventSink::send`] once nobody listens to the stream any more.
#[derive(Debug, thiserror::Error)]
#[error("the stream was cancelled or its connection closed")]
pub struct SinkClosed;

/// Where a stream handler pushes its events.
///
/// A handler first checks its request and may still answer with a plain error (by returning a
/// [`ServiceError`] before sending anything). Once it accepts, it calls
/// [`EventSink::open`] (or sends its first event), which tells the caller at once that the stream
/// has started, even if the first real event is a long time coming.
pub struct EventSink {
    /// What every event repeats of the request (uri, method, key); shared with the stream's task.
    request: Arc<Packet>,
    outgoing: mpsc::Sender<Bytes>,
    cancelled: CancellationToken,
    /// Shared with the stream's task, which answers a handler that never opened the stream
    /// like a one-shot request.
    opened: Arc<std::sync::atomic::AtomicBool>,
    /// The caller takes this stream's events in multicast packets too (see [`multicast`]).
    multicast: bool,
}

impl EventSink {
    /// Opens the stream without an event: sends an empty event (no params, id or event name),
    /// which callers take as "the stream has started" and otherwise ignore. Does nothing once
    /// the stream is open.
    pub async fn open(&self) -> Result<(), SinkClosed> {
        if self.opened.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        self.send(Event::<Value>::default()).await
    }

    /// Sends one event, waiting while the connection's outgoing queue is full.
    ///
    /// The event is encoded at once, and the returned future holds only the encoded frame: an
    /// idle subscription's memory is mostly its futures, and this one is part of every
    /// subscription's. It does not watch for the stream being cancelled: the stream's task drops
    /// the handler's future then, and this one with it.
    pub fn send<D: Serialize>(
        &self,
        event: Event<D>,
    ) -> impl Future<Output = Result<(), SinkClosed>> + '_ {
        let frame = self.encode(event);
        async move {
            let frame = frame?;
            let slot = self.outgoing.reserve().await.map_err(|_| SinkClosed)?;
            slot.send(frame);
            Ok(())
        }
    }

    fn encode<D: Serialize>(&self, event: Event<D>) -> Result<Bytes, SinkClosed> {
        if self.cancelled.is_cancelled() {
            return Err(SinkClosed);
        }
        self.opened
            .store(true, std::sync::atomic::Ordering::Relaxed);
        encode_frame(&Packet {
            stream: true,
            id: event.id,
            event: event.event,
            ..Packet::reply_to(&self.request, event.data)
        })
        .map_err(|_| SinkClosed)
    }

    /// Completes when the stream is cancelled; for handlers that wait on something else.
    pub async fn closed(&self) {
        self.cancelled.cancelled().await
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

type UnaryHandler = dyn Fn(Request) -> BoxFuture<Response> + Send + Sync;
type StreamHandler = dyn Fn(Request, EventSink) -> BoxFuture<Response> + Send + Sync;

enum Handler {
    Unary(Box<UnaryHandler>),
    Stream(Box<StreamHandler>),
}

/// A handler and the scope a verified caller needs to reach it.
struct Route {
    handler: Handler,
    scope: Option<String>,
}

/// The handlers of a service, keyed by uri, then method (so a lookup borrows the packet's strings).
#[derive(Default)]
pub struct Router {
    routes: HashMap<String, HashMap<String, Route>>,
    /// The route added last, which [`Router::scope`] applies to.
    last: Option<(String, String)>,
}

impl Router {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a handler answering `method uri` with one answer.
    pub fn route<H, F>(self, method: &str, uri: &str, handler: H) -> Self
    where
        H: Fn(Request) -> F + Send + Sync + 'static,
        F: Future + Send + 'static,
        F::Output: IntoAnswer,
    {
        let handler = Handler::Unary(Box::new(move |request| {
            Box::pin(handler(request).map(IntoAnswer::into_answer))
        }));
        self.insert(method, uri, handler)
    }

    /// Adds a handler answering `method uri` with a stream of events. The stream ends with the
    /// answer the handler returns; the handler's future is dropped if the caller cancels first.
    pub fn stream<H, F>(self, method: &str, uri: &str, handler: H) -> Self
    where
        H: Fn(Request, EventSink) -> F + Send + Sync + 'static,
        F: Future + Send + 'static,
        F::Output: IntoAnswer,
    {
        let handler = Handler::Stream(Box::new(move |request, sink| {
            // A combinator rather than an `async` block, which would hold the handler's future
            // twice over in every idle stream.
            Box::pin(handler(request, sink).map(IntoAnswer::into_answer))
        }));
        self.insert(method, uri, handler)
    }

    /// Declares the scope a caller needs for the route added last, e.g.
    /// `.route("PUT", "/kv", put).scope("kv:write")`. It is registered with the url, so the
    /// gateway checks it before forwarding, and the runtime checks it again on every request
    /// that carries a verified caller.
    pub fn scope(mut self, scope: &str) -> Self {
        let (uri, method) = self.last.as_ref().expect("scope() follows a route");
        let route = self
            .routes
            .get_mut(uri)
            .and_then(|methods| methods.get_mut(method))
            .expect("the last route is registered");
        route.scope = Some(scope.to_owned());
        self
    }

    fn insert(mut self, method: &str, uri: &str, handler: Handler) -> Self {
        let method = method.to_ascii_uppercase();
        self.routes.entry(uri.to_owned()).or_default().insert(
            method.clone(),
            Route {
                handler,
                scope: None,
            },
        );
        self.last = Some((uri.to_owned(), method));
        self
    }

    /// The route `request` is for, if it exists and its caller may use it.
    fn route_for(&self, request: &Request) -> Result<&Route, ServiceError> {
        let route = self
            .routes
            .get(&request.uri)
            .and_then(|methods| methods.get(&request.method))
            .ok_or_else(|| {
                ServiceError::NotFound(format!("no handler for {} {}", request.method, request.uri))
            })?;
        match &route.scope {
            Some(scope) if !request.allows(scope) => Err(ServiceError::Forbidden(format!(
                "this needs the scope {scope:?}"
            ))),
            _ => Ok(route),
        }
    }

    /// The urls to register with the distributor, e.g. `GET/kv`, sorted.
    pub fn urls(&self) -> Vec<String> {
        let mut urls: Vec<String> = self
            .routes
            .iter()
            .flat_map(|(uri, methods)| methods.keys().map(move |method| format!("{method}{uri}")))
            .collect();
        urls.sort();
        urls
    }

    /// The scope each url needs, for the urls that declared one.
    pub fn scopes(&self) -> BTreeMap<String, String> {
        self.routes
            .iter()
            .flat_map(|(uri, methods)| {
                methods.iter().filter_map(move |(method, route)| {
                    Some((format!("{method}{uri}"), route.scope.clone()?))
                })
            })
            .collect()
    }
}

/// Binds a handler to the state it needs, so that it can be an `async fn` taking both:
/// `.route("GET", "/kv", with_state(kv.clone(), get))` with
/// `async fn get(kv: Kv, request: Request) -> Result<Json<Item>, ServiceError>`.
pub fn with_state<S, H, F>(state: S, handler: H) -> impl Fn(Request) -> F + Send + Sync + 'static
where
    S: Clone + Send + Sync + 'static,
    H: Fn(S, Request) -> F + Send + Sync + 'static,
{
    move |request| handler(state.clone(), request)
}

/// How the service presents itself to the distributor.
#[derive(Debug, Clone, Default)]
pub struct ServiceConfig {
    /// The name it registers under, e.g. `kv`.
    pub name: String,
    /// The distributor's address; `None` serves without registering (tests, direct use).
    pub distributor: Option<String>,
    /// The host other nodes should connect to, when the socket's address is not it.
    pub advertise_host: Option<String>,
    /// Who may connect: the cluster secret (also used to register with the distributor).
    pub cluster: ClusterPolicy,
    /// What one client may hold.
    pub limits: ConnectionLimits,
    /// Whether the service can serve right now (true: its store is reachable), reported to the
    /// distributor so that gateways route around it while it cannot. `None`: always ready.
    pub readiness: Option<watch::Receiver<bool>>,
}

impl ServiceConfig {
    /// An unregistered service called `name`, with the default limits (tests, embedding).
    pub fn named(name: &str) -> ServiceConfig {
        ServiceConfig {
            name: name.to_owned(),
            ..ServiceConfig::default()
        }
    }

    /// A service called `name` as the flags every service takes describe it: `--distributor`
    /// (empty: serve without registering), `--advertise-host`, and the cluster flags with the
    /// `secret` they named. Services serve no original-design peers: only the distributor and
    /// the gateway do.
    pub fn from_flags(
        name: &str,
        distributor: String,
        advertise_host: Option<String>,
        cluster: &crate::cluster::ClusterArgs,
        secret: Option<crate::cluster::ClusterSecret>,
    ) -> ServiceConfig {
        ServiceConfig {
            name: name.to_owned(),
            distributor: Some(distributor).filter(|addr| !addr.is_empty()),
            advertise_host,
            limits: cluster.limits(secret.is_some()),
            cluster: ClusterPolicy {
                secret,
                allow_legacy: false,
            },
            readiness: None,
        }
    }
}

/// Serves `router` on `listener` until `shutdown` is cancelled, then waits for the requests in
/// flight to finish (callers bound that wait with a timeout).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    config: ServiceConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    if let Some(distributor) = &config.distributor {
        let registration = Registration {
            port: local.port(),
            name: config.name.clone(),
            urls: router.urls(),
            scopes: router.scopes(),
            host: config.advertise_host.clone(),
            protocol: Some(PROTOCOL_VERSION),
        };
        // The service only needs to be registered; the topology it receives is unused here.
        let _link = DistributorClient::new(distributor.clone(), registration)
            .with_secret(config.cluster.secret.clone())
            .with_readiness(config.readiness.clone())
            .start(shutdown.child_token());
    }
    info!(name = %config.name, addr = %local, urls = ?router.urls(), "serving");

    // Added after the registration, so that the gateway does not route `/_/logs` to any one
    // service: it asks every node itself (docs/PROTOCOL.md, "Logs").
    let router = router
        .route("GET", crate::logs::LOGS_URI, recent_logs)
        .scope(crate::packet::ADMIN_SCOPE);
    let router = Arc::new(router);
    let policy = Arc::new(config.cluster);
    crate::server::serve_connections(listener, config.limits, &shutdown, |stream, peer| {
        serve_connection(
            stream,
            peer,
            router.clone(),
            policy.clone(),
            shutdown.clone(),
        )
        .instrument(tracing::info_span!("connection", %peer))
    })
    .await;
    Ok(())
}

/// `GET /_/logs`: this process's recent log lines ([`crate::logs`]).
async fn recent_logs(request: Request) -> Result<Json<Value>, ServiceError> {
    crate::logs::answer(&request.params)
        .map(Json)
        .map_err(ServiceError::BadRequest)
}

/// Streams running on one connection, by key, so a cancel packet can find its stream. Each entry
/// also holds a serial number, so a finished stream removes its own entry and never a newer one
/// that reused the key.
#[derive(Default)]
struct Streams {
    running: Mutex<HashMap<u64, (u64, CancellationToken)>>,
    next_serial: std::sync::atomic::AtomicU64,
}

impl Streams {
    fn start(&self, key: u64, token: CancellationToken) -> u64 {
        let serial = self
            .next_serial
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let previous = self.running.lock().unwrap().insert(key, (serial, token));
        if let Some((_, previous)) = previous {
            previous.cancel();
        }
        serial
    }

    fn cancel(&self, key: u64) {
        if let Some((_, token)) = self.running.lock().unwrap().remove(&key) {
            debug!(key, "stream cancelled by the caller");
            token.cancel();
        }
    }

    fn finished(&self, key: u64, serial: u64) {
        let mut running = self.running.lock().unwrap();
        if running.get(&key).is_some_and(|(s, _)| *s == serial) {
            running.remove(&key);
        }
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: Arc<Router>,
    policy: Arc<ClusterPolicy>,
    shutdown: CancellationToken,
) {
    tune_socket(&stream);
    let (read_half, mut write_half) = stream.into_split();
    let mut reader = PacketReader::new(read_half, PacketCodec::<Packet>::new());
    let first = match cluster::accept(&mut reader, &mut write_half, &policy, peer).await {
        Ok(accepted) => accepted.first,
        Err(_) => return,
    };
    let (outgoing, frames) = mpsc::channel(OUTGOING_CAPACITY);
    let writer = tokio::spawn(write_frames(write_half, frames));
    let connection = Connection {
        router,
        outgoing,
        streams: Arc::default(),
        closed: CancellationToken::new(),
        requests: TaskTracker::new(),
    };
    // A packet an original-design peer sent instead of the handshake comes first.
    let mut first = first.map(Ok);

    loop {
        let frame = match first.take() {
            Some(frame) => Some(frame),
            None => tokio::select! {
                _ = shutdown.cancelled() => break,
                frame = reader.next() => frame,
            },
        };
        match frame {
            None => break,
            Some(Ok(packet)) => connection.dispatch(packet),
            Some(Err(err)) => {
                warn!(%err, "bad packet");
                if let CodecError::Json { key: Some(key), .. } = &err {
                    let refusal = ServiceError::BadRequest(err.to_string()).into_answer();
                    let answer = Packet {
                        key: *key,
                        status: Some(refusal.status),
                        error: refusal.error,
                        ..Packet::default()
                    };
                    send_packet(&connection.outgoing, &answer).await;
                }
                if !err.is_recoverable() {
                    break;
                }
            }
        }
    }

    connection.close().await;
    if let Ok(Err(err)) = writer.await {
        debug!(%err, "connection write failed");
    }
}

/// What the requests of one connection share.
struct Connection {
    router: Arc<Router>,
    outgoing: mpsc::Sender<Bytes>,
    streams: Arc<Streams>,
    /// Cancelled when the connection ends, which ends every stream it carries.
    closed: CancellationToken,
    /// The one-shot requests in flight, which the connection waits for before it closes.
    requests: TaskTracker,
}

impl Connection {
    /// Sends `packet` its own way: a control packet, a one-shot request or a stream.
    fn dispatch(&self, mut packet: Packet) {
        if packet.key == 0 {
            // An original-design caller puts the key in params.key; we answer it at the top level.
            packet.key = key_in(&serde_json::json!({ "params": &packet.params })).unwrap_or(0);
        }
        if packet.cancel || packet.is_heartbeat() || packet.uri == cluster::HANDSHAKE_URI {
            return self.control(packet);
        }
        let request = Request::take_from(&mut packet);
        let route = match self.router.route_for(&request) {
            Ok(route) => route,
            Err(refusal) => return self.answer_now(&packet, refusal),
        };
        let span = tracing::debug_span!("request", method = %request.method, uri = %request.uri,
            key = packet.key, request_id = request.request_id.as_deref());
        // The span exported with `--otlp-endpoint`, in the trace the caller's packet names;
        // disabled (and free) otherwise.
        let traced = crate::trace::server_span(
            format_args!("{} {}", request.method, request.uri),
            packet.traceparent.take().as_deref(),
        );
        match &route.handler {
            Handler::Unary(handler) => self.one_shot(packet, handler, request, span, traced),
            Handler::Stream(handler) => self.stream(packet, handler, request, span, traced),
        }
    }

    /// Packets about the connection rather than a route: a cancel ends the stream it names, a
    /// heartbeat is echoed, and a handshake reaching dispatch is refused (it only can when this
    /// node has no secret: with one, the handshake happens before dispatch).
    fn control(&self, packet: Packet) {
        if packet.cancel {
            self.streams.cancel(packet.key);
        } else if packet.is_heartbeat() {
            let outgoing = self.outgoing.clone();
            tokio::spawn(async move { send_packet(&outgoing, &packet).await });
        } else {
            let refusal = ServiceError::Unauthorized(
                "this node has no cluster secret: give every node the same --cluster-secret-file"
                    .into(),
            );
            self.answer_now(&packet, refusal);
        }
    }

    /// Answers `request` without a handler (a refusal by the runtime itself).
    fn answer_now(&self, request: &Packet, answer: impl IntoAnswer) {
        let answer = answer.into_answer().into_packet(request);
        let outgoing = self.outgoing.clone();
        self.requests
            .spawn(async move { send_packet(&outgoing, &answer).await });
    }

    /// Runs a one-shot handler on a task of its own and sends its answer.
    fn one_shot(
        &self,
        packet: Packet,
        handler: &UnaryHandler,
        request: Request,
        span: Span,
        traced: Span,
    ) {
        let answering = traced.in_scope(|| span.in_scope(|| handler(request)));
        let outgoing = self.outgoing.clone();
        self.requests.spawn(
            async move {
                let answer = answering.await.into_packet(&packet);
                send_packet(&outgoing, &answer).await;
            }
            .instrument(span)
            .instrument(traced),
        );
    }

    /// Runs a stream handler on a task of its own, until it returns (its answer then ends the
    /// stream) or the stream is cancelled.
    fn stream(
        &self,
        packet: Packet,
        handler: &StreamHandler,
        request: Request,
        span: Span,
        traced: Span,
    ) {
        let cancelled = self.closed.child_token();
        let serial = self.streams.start(packet.key, cancelled.clone());
        let streams = self.streams.clone();
        // The task keeps only what answers repeat of the request, shared with the sink: it
        // lives as long as the subscription, idle most of the time.
        let reply = Arc::new(Packet::reply_to(&packet, Value::Null));
        let outgoing = self.outgoing.clone();
        let opened = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sink = EventSink {
            request: reply.clone(),
            outgoing: outgoing.clone(),
            cancelled: cancelled.clone(),
            opened: opened.clone(),
            multicast: packet.multicast,
        };
        // Called here rather than in the task, so that the task holds the handler's future
        // but not the request as well.
        let handling = traced.in_scope(|| span.in_scope(|| handler(request, sink)));
        // Streams are not tracked with the requests: shutdown cancels them rather than
        // waiting for them, since a subscription may never end on its own.
        tokio::spawn(
            async move {
                let end = cancelled.run_until_cancelled(handling).await;
                streams.finished(reply.key, serial);
                let Some(response) = end else { return };
                let answer = response.into_packet(&reply);
                // A handler that answered successfully without opening the stream (a route
                // that streams only when asked to, like kv's `watch`) gave a one-shot answer.
                let one_shot =
                    !opened.load(std::sync::atomic::Ordering::Relaxed) && answer.status() < 400;
                let Some(frame) = encode_answer(&Packet {
                    end: !one_shot,
                    ..answer
                }) else {
                    return;
                };
                // Not a waiting send: that would size the task of every idle subscription.
                queue_frame(&outgoing, frame);
            }
            .instrument(span)
            .instrument(traced),
        );
    }

    /// Ends the connection's streams and waits for its one-shot requests to be answered.
    async fn close(self) {
        self.closed.cancel();
        self.requests.close();
        self.requests.wait().await;
    }
}

async fn send_packet(outgoing: &mpsc::Sender<Bytes>, packet: &Packet) {
    // A closed channel means the connection is gone; nobody is left to answer.
    if let Some(frame) = encode_answer(packet) {
        let _ = outgoing.send(frame).await;
    }
}

fn encode_answer(packet: &Packet) -> Option<Bytes> {
    encode_frame(packet)
        .inspect_err(|err| warn!(%err, "could not encode an answer"))
        .ok()
}
