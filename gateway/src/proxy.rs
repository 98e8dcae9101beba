//! HTTP request → packet → HTTP response: the gateway's one real job.
//!
//! For every request that is not one of the gateway's own endpoints:
//! 1. establish the caller ([`crate::auth`]): a bad token is a 401, and so is no token where
//!    anonymous callers are granted nothing; then take one request from the caller's rate limit
//!    (429 beyond it);
//! 2. find the route (exact url, else the longest prefix; HEAD follows GET) — 404 if none — and
//!    check the caller holds its scopes (401 for an anonymous caller, 403 for a token);
//! 3. read the body (413 over the limit) and build `params`: the query's fields, the JSON body's
//!    fields (or the body as `params.body`), `params` for the rest of the path, and
//!    `last_event_id` from a `Last-Event-ID` header; never the `access_token` parameter, and never
//!    an `auth` field (the packet's `auth` is the verified caller, set here);
//! 4. send the packet to the route's next connected node (503 if there is none), retrying
//!    idempotent requests on the next node if the connection had just dropped;
//! 5. wait for the first answer within the request timeout (504), or fail at once with 502 if
//!    the node's connection closes meanwhile;
//! 6. answer: a plain packet becomes status + JSON body; a stream becomes Server-Sent Events
//!    ([`crate::sse`]).
//!
//! The request id (`X-Request-Id`, generated when absent) travels in the packet, in the span of
//! every log line about the request, and back in the response headers.
//!
//! Why not tower-http's `SetRequestIdLayer`/`PropagateRequestIdLayer` (read from tower-http
//! 0.6's code; no benchmark run): they keep any `X-Request-Id` a client sends, while the
//! gateway replaces one that is empty, longer than 128 bytes or not plain text
//! (gateway/tests/injection.rs), and `MakeRequestId` is only asked when the header is absent,
//! so validating would take a layer of its own in front. They would also echo ids on the
//! gateway's own endpoints, insert a `RequestId` into every request's extensions (an allocation
//! per request), and the proxy would still need the id as text for its span, the packet and its
//! logs. Nothing would get shorter or cheaper, so the id is made here.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, LazyLock,
    },
    time::Instant,
};

use axum::{
    body::Body,
    extract::{Request, State},
    http::{header, request::Parts, HeaderMap, HeaderName, HeaderValue, Method, StatusCode},
    response::{IntoResponse, Response},
};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use serde_json::{Map, Value};
use shared::{ClientError, Dialect, Packet, RawParams, ResponseStream};
use tracing::{debug, Instrument};

use crate::{
    auth::{self, AuthError, Caller, ACCESS_TOKEN_PARAM},
    error::{json_error, ProxyError},
    rate_limit::{self, RateKey},
    routes::{Node, Route},
    sse, AppState,
};

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static LAST_EVENT_ID: HeaderName = HeaderName::from_static("last-event-id");

/// A params field a client might send to pose as a verified caller; always dropped.
const AUTH_PARAM: &str = "auth";

/// Request ids longer than this are replaced by a generated one rather than echoed.
const MAX_REQUEST_ID_LEN: usize = 128;

/// The fallback handler: every request the gateway does not answer itself.
pub(crate) async fn proxy(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let started = Instant::now();
    let _in_flight = state.metrics.in_flight();
    let request_id = request_id(request.headers());
    // The path only: the query may carry a token.
    let span = tracing::debug_span!("request", method = %request.method(),
        path = %request.uri().path(), request_id = %request_id);
    let (route, mut response) = forward(&state, request, &request_id).instrument(span).await;
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(X_REQUEST_ID.clone(), value);
    }
    let (status, elapsed) = (response.status().as_u16(), started.elapsed());
    state.metrics.record(&route, status, elapsed);
    state.figures.record(&route, status, elapsed);
    response
}

/// Routes and forwards one request; returns the route's metrics label with the response.
async fn forward(state: &AppState, request: Request, request_id: &str) -> (Arc<str>, Response) {
    let (parts, body) = request.into_parts();
    let peer = auth::peer_of(&parts.extensions);
    let caller = match admit(state, &parts, peer) {
        Ok(caller) => caller,
        Err(refusal) => return (state.no_route.clone(), refusal.respond(state, request_id)),
    };
    // A HEAD request is answered like a GET; hyper leaves the body out.
    let method = if parts.method == Method::HEAD {
        Method::GET.as_str()
    } else {
        parts.method.as_str()
    };
    let table = state.routes.borrow().clone();
    let Some(matched) = table.lookup(method, parts.uri.path()) else {
        let error = ProxyError::NoRoute {
            method: parts.method.to_string(),
            path: parts.uri.path().to_owned(),
        };
        error.log(request_id);
        return (state.no_route.clone(), error.into_response());
    };
    let route = matched.route;
    if let Err(refusal) = state.auth.authorize(&caller, &route.scopes) {
        return (
            route.url.clone(),
            Refusal::Auth(refusal).respond(state, request_id),
        );
    }
    // The caller's trace goes on (or one starts) in the span exported with --otlp-endpoint; the
    // node is sent this span's context, or the caller's unchanged when nothing is exported.
    let incoming = parts
        .headers
        .get(shared::trace::TRACEPARENT)
        .and_then(|value| value.to_str().ok());
    let traced = shared::trace::server_span(format_args!("{method} {}", route.path), incoming);
    let traceparent = shared::trace::outgoing(&traced, incoming);
    let response = match forward_to(
        state,
        route,
        matched.rest,
        method,
        &parts,
        body,
        caller,
        request_id,
        traceparent,
    )
    .instrument(traced)
    .await
    {
        Ok(response) => response,
        Err(error) => {
            error.log(request_id);
            error.into_response()
        }
    };
    (route.url.clone(), response)
}

/// Why a request is answered before it is routed.
enum Refusal {
    Auth(AuthError),
    /// Over the caller's rate limit, for this long.
    RateLimited(std::time::Duration),
}

impl Refusal {
    /// The answer, logged and counted.
    fn respond(self, state: &AppState, request_id: &str) -> Response {
        match self {
            Refusal::Auth(error) => {
                error.log(request_id);
                state.metrics.count_refusal(error.status().as_u16());
                error.into_response()
            }
            Refusal::RateLimited(wait) => {
                debug!(
                    status = 429,
                    request_id, "request refused: over the rate limit"
                );
                state.metrics.count_refusal(429);
                rate_limit::too_many_requests(wait)
            }
        }
    }
}

/// Establishes the caller and takes one request from its rate limit. A caller refused for its
/// token spends its address's allowance, so a flood of bad tokens is limited like any other.
fn admit(state: &AppState, parts: &Parts, peer: Option<SocketAddr>) -> Result<Caller, Refusal> {
    let caller = state
        .auth
        .authenticate(&parts.headers, parts.uri.query(), peer);
    if let Some(limiter) = &state.rate_limiter {
        let key = match &caller {
            Ok(caller) => caller.rate_key(),
            Err(_) => peer.map_or(RateKey::Unknown, |peer| RateKey::address(peer.ip())),
        };
        limiter.check(&key).map_err(Refusal::RateLimited)?;
    }
    caller.map_err(Refusal::Auth)
}

#[allow(clippy::too_many_arguments)]
async fn forward_to(
    state: &AppState,
    route: &Route,
    rest: Option<&str>,
    method: &str,
    parts: &Parts,
    body: Body,
    caller: Caller,
    request_id: &str,
    traceparent: Option<String>,
) -> Result<Response, ProxyError> {
    let params = request_params(parts, body, rest, state.config.max_body).await?;
    let stream = accepts_event_stream(&parts.headers);
    let packet = Packet {
        uri: route.path.clone(),
        method: method.to_owned(),
        params: Value::Object(params),
        stream,
        // The client hands each stream its own copy of a multicast event.
        multicast: stream,
        request_id: Some(request_id.to_owned()),
        auth: Some(caller.identity),
        traceparent,
        ..Packet::default()
    };
    // Only requests that may safely be sent twice are moved to another node; the request was
    // not written at all in that case, but only these methods are documented as retried.
    let retryable = matches!(
        parts.method,
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE
    );
    let timeout = state.config.request_timeout;
    let answer = tokio::time::timeout(timeout, send(state, route, packet, retryable))
        .await
        .map_err(|_| ProxyError::Timeout(timeout))??;
    match answer {
        Answer::Plain(packet) => plain_response(packet),
        Answer::Ended(end) if end.status() >= 400 => {
            let message = end.error.as_deref().unwrap_or("the stream failed");
            Ok(json_error(answer_status(end.status())?, message))
        }
        Answer::Ended(_) => Ok(sse::respond(None, None, state)),
        Answer::Stream(first, answers) => Ok(sse::respond(Some(first), Some(answers), state)),
    }
}

/// A node's first answer.
enum Answer {
    /// One packet, the whole answer.
    Plain(Packet<RawParams>),
    /// A stream that ended before its first event.
    Ended(Packet<RawParams>),
    /// The first event of a stream, and the rest of it.
    Stream(Packet<RawParams>, ResponseStream<RawParams>),
}

/// Sends `packet` to the route's nodes in rotation until one takes it.
async fn send(
    state: &AppState,
    route: &Route,
    packet: Packet,
    retryable: bool,
) -> Result<Answer, ProxyError> {
    try_in_turn(
        route.rotation(),
        packet,
        retryable,
        |node, packet| counted_call(state, node, packet),
        |node| node.addr.clone(),
    )
    .await?
    .ok_or_else(|| ProxyError::NoNode {
        route: route.url.to_string(),
    })
}

/// The retry rule: tries `nodes` in order with `call` until one takes the packet. Only a
/// `retryable` request whose node was not connected (so the request was not written) moves on to
/// the next node; any other failure is the request's answer. `None` when no node took it.
/// `addr` names a node in the log (called only when debug logging is on).
async fn try_in_turn<N, F, Fut>(
    nodes: impl Iterator<Item = N>,
    packet: Packet,
    retryable: bool,
    mut call: F,
    addr: impl Fn(N) -> String,
) -> Result<Option<Answer>, ProxyError>
where
    N: Copy,
    F: FnMut(N, Packet) -> Fut,
    Fut: std::future::Future<Output = Result<Answer, ClientError>>,
{
    let mut nodes = nodes.peekable();
    let mut packet = Some(packet);
    while let Some(node) = nodes.next() {
        let another = retryable && nodes.peek().is_some();
        // Cloning only when another node could still need the packet keeps the common case
        // (one attempt) free of copies.
        let attempt = if another {
            packet.clone()
        } else {
            packet.take()
        };
        let Some(attempt) = attempt else { break };
        match call(node, attempt).await {
            Err(ClientError::NotConnected) if another => {
                debug!(
                    node = addr(node),
                    "connection just dropped; trying the next node"
                );
            }
            Err(ClientError::NotConnected) => break,
            Err(ClientError::ConnectionClosed) => return Err(ProxyError::ConnectionClosed),
            Err(ClientError::Lagged) => {
                return Err(ProxyError::BadAnswer("more answers than expected".into()))
            }
            Err(ClientError::Encode(err)) => {
                return Err(ProxyError::BadRequest(format!(
                    "the request cannot be sent: {err}"
                )))
            }
            Ok(answer) => return Ok(Some(answer)),
        }
    }
    Ok(None)
}

/// [`call`], counted in the node's figures ([`crate::figures`]).
async fn counted_call(
    state: &AppState,
    node: &Node,
    packet: Packet,
) -> Result<Answer, ClientError> {
    let counted = state.figures.node_call(node);
    let answer = call(node, packet).await;
    match &answer {
        Err(ClientError::NotConnected) => counted.not_sent(),
        Err(_) => counted.answered(None),
        Ok(Answer::Plain(packet) | Answer::Ended(packet)) => {
            counted.answered(Some(packet.status()))
        }
        Ok(Answer::Stream(..)) => counted.answered(Some(200)),
    }
    answer
}

/// Sends one request to one node and waits for its first answer.
async fn call(node: &Node, packet: Packet) -> Result<Answer, ClientError> {
    match node.dialect {
        // Original-design nodes answer every request with one flat object; they know nothing
        // of streams or cancel packets.
        Dialect::Legacy => node.client.request(packet).await.map(Answer::Plain),
        Dialect::Packet => {
            let mut answers = node.client.call(packet).await?;
            let first = answers
                .next()
                .await
                .ok_or(ClientError::ConnectionClosed)??;
            Ok(if first.end {
                Answer::Ended(first)
            } else if first.stream {
                Answer::Stream(first, answers)
            } else {
                Answer::Plain(first)
            })
        }
    }
}

/// A plain answer as an HTTP response: its status, and its params (or error) as JSON.
fn plain_response(packet: Packet<RawParams>) -> Result<Response, ProxyError> {
    let status = answer_status(packet.status())?;
    if let Some(error) = &packet.error {
        return Ok(json_error(status, error));
    }
    if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok(status.into_response());
    }
    // The node's JSON text as it is: no parse, no rebuild, no copy.
    let body = packet.params.into_string();
    Ok((
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response())
}

/// The HTTP status for a packet status; informational and invalid ones are the node's fault.
fn answer_status(status: u16) -> Result<StatusCode, ProxyError> {
    StatusCode::from_u16(status)
        .ok()
        .filter(|status| status.as_u16() >= 200)
        .ok_or_else(|| ProxyError::BadAnswer(format!("status {status} is not a final HTTP status")))
}

/// The request's own id, or a new one.
fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(&X_REQUEST_ID)
        .and_then(|value| value.to_str().ok())
        .filter(|id| !id.is_empty() && id.len() <= MAX_REQUEST_ID_LEN)
        .map(str::to_owned)
        .unwrap_or_else(new_request_id)
}

/// A fresh id: a random prefix drawn once per process, then a counter. Unique like a random
/// id, without asking the kernel for randomness on every request.
fn new_request_id() -> String {
    static PREFIX: LazyLock<u64> = LazyLock::new(|| uuid::Uuid::new_v4().as_u64_pair().0);
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{:016x}{:016x}",
        *PREFIX,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn accepts_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|accept| accept.contains("text/event-stream"))
}

/// The packet's `params`: query fields, then body fields, then `params` (the rest of the path)
/// and `last_event_id`; later sources win when names collide. The token's `access_token` query
/// parameter is left out, and so is any `auth` field: who the caller is travels in the packet's
/// own `auth`, which only the gateway writes.
async fn request_params(
    parts: &Parts,
    body: Body,
    rest: Option<&str>,
    max_body: usize,
) -> Result<Map<String, Value>, ProxyError> {
    let mut params = Map::new();
    if let Some(query) = parts.uri.query() {
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            if name == ACCESS_TOKEN_PARAM {
                continue;
            }
            params.insert(name.into_owned(), Value::String(value.into_owned()));
        }
    }
    let body = read_body(body, &parts.headers, max_body).await?;
    if !body.is_empty() {
        merge_body(&mut params, &parts.headers, &body)?;
    }
    params.remove(AUTH_PARAM);
    if let Some(rest) = rest {
        let rest = percent_encoding::percent_decode_str(rest)
            .decode_utf8()
            .map_err(|_| {
                ProxyError::BadRequest("the path is not UTF-8 once percent-decoded".into())
            })?;
        params.insert("params".into(), Value::String(rest.into_owned()));
    }
    if let Some(last_event_id) = parts.headers.get(&LAST_EVENT_ID) {
        let last_event_id = last_event_id.to_str().map_err(|_| {
            ProxyError::BadRequest("the Last-Event-ID header is not plain text".into())
        })?;
        params.insert("last_event_id".into(), last_event_id.into());
    }
    Ok(params)
}

/// Reads the whole body, refusing it as soon as it is known to exceed `limit`, and with 408 when
/// it arrives too slowly (the HTTP edge paces every body: [`crate::http::PacedBody`]).
async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> Result<Bytes, ProxyError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    let mut chunks = body.into_data_stream();
    let mut first: Option<Bytes> = None;
    let mut collected = BytesMut::new();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(body_error)?;
        let total = first.as_ref().map_or(0, Bytes::len) + collected.len() + chunk.len();
        if total > limit {
            return Err(ProxyError::BodyTooLarge { limit });
        }
        // Most bodies arrive in one chunk, which is kept as it is.
        match first.take() {
            None if collected.is_empty() => first = Some(chunk),
            None => collected.extend_from_slice(&chunk),
            Some(earlier) => {
                collected.extend_from_slice(&earlier);
                collected.extend_from_slice(&chunk);
            }
        }
    }
    Ok(first.unwrap_or_else(|| collected.freeze()))
}

/// Why a body could not be read, as the caller's error.
fn body_error(err: axum::Error) -> ProxyError {
    if crate::http::BodyTooSlow::is_cause_of(&err) {
        ProxyError::BodyTooSlow
    } else {
        ProxyError::BadRequest(format!("could not read the request body: {err}"))
    }
}

/// How to read a body, by its Content-Type.
enum BodyKind {
    /// Declared JSON: it must parse.
    Json,
    /// No type, or curl's default for `-d`: JSON objects are taken as fields, anything else
    /// as text.
    Guess,
    /// Any other type: the body is text.
    Text,
}

fn body_kind(headers: &HeaderMap) -> BodyKind {
    let Some(content_type) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
    else {
        return BodyKind::Guess;
    };
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if mime == "application/json" || mime.ends_with("+json") {
        BodyKind::Json
    } else if mime.is_empty() || mime == "application/x-www-form-urlencoded" {
        BodyKind::Guess
    } else {
        BodyKind::Text
    }
}

fn merge_body(
    params: &mut Map<String, Value>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), ProxyError> {
    let value = match body_kind(headers) {
        BodyKind::Json => serde_json::from_slice(body).map_err(ProxyError::BadJson)?,
        BodyKind::Guess => match serde_json::from_slice::<Value>(body) {
            Ok(object @ Value::Object(_)) => object,
            _ => Value::String(body_text(body)?),
        },
        BodyKind::Text => Value::String(body_text(body)?),
    };
    match value {
        Value::Object(fields) => params.extend(fields),
        other => {
            params.insert("body".into(), other);
        }
    }
    Ok(())
}

fn body_text(body: &[u8]) -> Result<String, ProxyError> {
    String::from_utf8(body.to_vec()).map_err(|_| {
        ProxyError::BadRequest("the request body is neither JSON nor UTF-8 text".into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(content_type: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(content_type) = content_type {
            headers.insert(header::CONTENT_TYPE, content_type.parse().unwrap());
        }
        headers
    }

    fn merged(content_type: Option<&str>, body: &str) -> Result<Value, ProxyError> {
        let mut params = Map::new();
        merge_body(&mut params, &headers(content_type), body.as_bytes())?;
        Ok(Value::Object(params))
    }

    #[test]
    fn json_objects_become_fields() {
        let value = merged(Some("application/json; charset=utf-8"), r#"{"a":1}"#).unwrap();
        assert_eq!(value, serde_json::json!({"a": 1}));
    }

    #[test]
    fn other_json_values_become_the_body() {
        let value = merged(Some("application/json"), "[1,2]").unwrap();
        assert_eq!(value, serde_json::json!({"body": [1, 2]}));
    }

    #[test]
    fn malformed_declared_json_is_refused() {
        assert!(matches!(
            merged(Some("application/json"), "{nope"),
            Err(ProxyError::BadJson(_))
        ));
    }

    #[test]
    fn untyped_and_form_bodies_are_guessed() {
        let value = merged(None, "hello").unwrap();
        assert_eq!(value, serde_json::json!({"body": "hello"}));
        let value = merged(Some("application/x-www-form-urlencoded"), r#"{"v":"x"}"#).unwrap();
        assert_eq!(value, serde_json::json!({"v": "x"}));
        let value = merged(None, "42").unwrap();
        assert_eq!(value, serde_json::json!({"body": "42"}));
    }

    #[test]
    fn text_bodies_stay_text_even_when_they_look_like_json() {
        let value = merged(Some("text/plain"), r#"{"v":"x"}"#).unwrap();
        assert_eq!(value, serde_json::json!({"body": r#"{"v":"x"}"#}));
    }

    #[test]
    fn binary_bodies_are_refused() {
        let mut params = Map::new();
        let result = merge_body(&mut params, &headers(None), &[0xff, 0xfe, 0x00]);
        assert!(matches!(result, Err(ProxyError::BadRequest(_))));
    }

    /// A test node: its name, and the answer it gives.
    type TestNode = (&'static str, fn() -> Result<Answer, ClientError>);

    /// Runs the retry rule over `nodes`; returns the outcome and the nodes that were tried.
    async fn tried(
        nodes: &[TestNode],
        retryable: bool,
    ) -> (Result<Option<Answer>, ProxyError>, Vec<&'static str>) {
        let mut tried = Vec::new();
        let outcome = try_in_turn(
            nodes.iter(),
            Packet::request("PUT", "/kv", serde_json::json!({})),
            retryable,
            |(name, answer), _packet| {
                tried.push(*name);
                std::future::ready(answer())
            },
            |(name, _)| name.to_string(),
        )
        .await;
        (outcome, tried)
    }

    fn not_connected() -> Result<Answer, ClientError> {
        Err(ClientError::NotConnected)
    }

    fn closed() -> Result<Answer, ClientError> {
        Err(ClientError::ConnectionClosed)
    }

    fn answered() -> Result<Answer, ClientError> {
        Ok(Answer::Plain(Packet::default()))
    }

    #[tokio::test]
    async fn a_retryable_request_moves_past_a_node_whose_connection_just_dropped() {
        let (outcome, tried) = tried(&[("a", not_connected), ("b", answered)], true).await;
        assert!(matches!(outcome, Ok(Some(Answer::Plain(_)))));
        assert_eq!(tried, ["a", "b"]);
    }

    #[tokio::test]
    async fn other_requests_stop_at_the_first_node() {
        let (outcome, tried) = tried(&[("a", not_connected), ("b", answered)], false).await;
        assert!(matches!(outcome, Ok(None)));
        assert_eq!(tried, ["a"]);
    }

    #[tokio::test]
    async fn a_connection_closed_after_the_request_was_written_is_not_retried() {
        let (outcome, tried) = tried(&[("a", closed), ("b", answered)], true).await;
        assert!(matches!(outcome, Err(ProxyError::ConnectionClosed)));
        assert_eq!(tried, ["a"]);
    }

    #[tokio::test]
    async fn no_node_taking_the_request_is_none() {
        let (outcome, tried) = tried(&[("a", not_connected), ("b", not_connected)], true).await;
        assert!(matches!(outcome, Ok(None)));
        assert_eq!(tried, ["a", "b"]);
    }

    #[test]
    fn request_ids_are_kept_or_generated() {
        let mut headers = HeaderMap::new();
        headers.insert(&X_REQUEST_ID, "abc-123".parse().unwrap());
        assert_eq!(request_id(&headers), "abc-123");
        let generated = request_id(&HeaderMap::new());
        assert_eq!(generated.len(), 32);
        assert_ne!(generated, request_id(&HeaderMap::new()));
        headers.insert(&X_REQUEST_ID, "x".repeat(500).parse().unwrap());
        assert_eq!(request_id(&headers).len(), 32);
    }
}
