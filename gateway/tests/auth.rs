//! Authentication and authorization at the gateway: bearer tokens, scopes, anonymous grants,
//! protected mode, the identity sent to the nodes, rate limits, and the cluster secret towards
//! the nodes. Real distributor, real service nodes and the gateway in-process, over TCP on
//! 127.0.0.1; the start-up rules and `mint-token` against the real `gateway` binary.

mod common;

use std::{
    io::{BufRead, BufReader},
    num::NonZeroU32,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use common::{Distributor, Gateway, Service, PROMPTLY};
use e2e::sse::EventStream;
use gateway::{
    rate_limit::{RateLimit, RateLimiter},
    Config,
};
use reqwest::{header, StatusCode};
use serde_json::{json, Value};
use shared::{
    cluster::ClusterSecret,
    packet::{NodeInfo, PROTOCOL_VERSION},
    service::{serve, Event, Request, Response, Router, ServiceConfig},
    token::TokenVerifier,
};
use tokio::{net::TcpListener, sync::watch, time::timeout};
use tokio_util::sync::CancellationToken;

const SECRET: &[u8] = b"the gateway's test key";

/// A token for `sub` with `scopes`, valid for a minute, signed with [`SECRET`].
fn token(sub: &str, scopes: &[&str]) -> String {
    shared::testing::hs256_token(SECRET, sub, scopes, Duration::from_secs(60))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token made by a standard JWT library rather than by `mint`, with any claims.
fn signed(claims: &Value, key: &[u8]) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(key),
    )
    .unwrap()
}

/// Answers with the params and the caller the node received.
fn echo(request: Request) -> std::future::Ready<Response> {
    std::future::ready(Response::ok(json!({
        "params": request.params,
        "auth": request.auth,
    })))
}

/// Routes with and without scopes, and a stream that sends what it received twice.
fn scoped_router() -> Router {
    Router::new()
        .route("GET", "/things", echo)
        .scope("things:read")
        .route("PUT", "/things", echo)
        .scope("things:write")
        .route("GET", "/open", echo)
        .stream("GET", "/ticks", |request, sink| async move {
            for n in 1..=2u64 {
                let event = Event {
                    id: Some(n.into()),
                    event: Some("tick".into()),
                    data: json!({"params": request.params, "auth": request.auth}),
                };
                if sink.send(event).await.is_err() {
                    break;
                }
            }
            Response::ok(Value::Null)
        })
        .scope("things:read")
}

/// A distributor, one node of [`scoped_router`], and a gateway verifying tokens with
/// [`SECRET`] (further settings from `adjust`), its routes known.
struct Setup {
    gateway: Gateway,
    admin: String,
    _service: Service,
    _distributor: Distributor,
}

impl Setup {
    async fn start(adjust: impl FnOnce(&mut Config)) -> Setup {
        let distributor = Distributor::start().await;
        let service = Service::start("things", scoped_router(), distributor.addr).await;
        let gateway = Gateway::start(distributor.addr, |config| {
            config.tokens = Some(Arc::new(TokenVerifier::from_secret(SECRET)));
            adjust(config);
        })
        .await;
        let admin = token("root", &["admin"]);
        wait_for_route(&gateway, Some(&admin), "PUT/things").await;
        Setup {
            gateway,
            admin,
            _service: service,
            _distributor: distributor,
        }
    }

    /// `method path` with `token` as a bearer token (none when `None`).
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
    ) -> reqwest::Response {
        let mut request = self.gateway.http.request(method, self.gateway.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.unwrap()
    }

    async fn get(&self, path: &str, token: Option<&str>) -> reqwest::Response {
        self.send(reqwest::Method::GET, path, token).await
    }
}

/// What the tests need of a gateway to talk to it.
trait Front {
    fn http(&self) -> &reqwest::Client;
    fn url(&self, path: &str) -> String;
}

impl Front for Gateway {
    fn http(&self) -> &reqwest::Client {
        &self.http
    }
    fn url(&self, path: &str) -> String {
        Gateway::url(self, path)
    }
}

/// A gateway run by the test itself, reached at `addr`.
struct Reached {
    addr: std::net::SocketAddr,
    http: reqwest::Client,
}

impl Front for Reached {
    fn http(&self) -> &reqwest::Client {
        &self.http
    }
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// Waits until the gateway routes `url` to a connected node, reading the topology with `token`.
async fn wait_for_route(gateway: &impl Front, token: Option<&str>, url: &str) {
    let routed = timeout(PROMPTLY, async {
        loop {
            let mut request = gateway.http().get(gateway.url("/_/topology"));
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            let topology: Value = response.json().await.unwrap();
            let connected = topology["routes"].as_array().unwrap().iter().any(|route| {
                route["url"] == url
                    && route["nodes"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|node| node["connected"] == true)
            });
            if connected {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(routed.is_ok(), "{url} never got a connected node");
}

fn challenge(response: &reqwest::Response) -> String {
    response
        .headers()
        .get(header::WWW_AUTHENTICATE)
        .map(|value| value.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

async fn error_of(response: reqwest::Response) -> String {
    let body: Value = response.json().await.unwrap();
    body["error"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn no_token_is_401_with_a_bearer_challenge() {
    let setup = Setup::start(|_| {}).await;
    for path in ["/things", "/open", "/nothing/here"] {
        let response = setup.get(path, None).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(challenge(&response), "Bearer", "{path}");
        assert!(error_of(response).await.contains("bearer token"));
    }
}

#[tokio::test]
async fn a_bad_foreign_or_expired_token_is_401_invalid_token() {
    let setup = Setup::start(|_| {}).await;
    let now = unix_now();
    let foreign = signed(
        &json!({"sub": "mallory", "scope": "admin", "exp": now + 60}),
        b"another key",
    );
    let expired = signed(
        &json!({"sub": "alice", "scope": "things:read", "exp": now - 3600}),
        SECRET,
    );
    let no_expiry = signed(&json!({"sub": "alice", "scope": "things:read"}), SECRET);
    let not_yet = signed(
        &json!({"sub": "alice", "scope": "things:read", "exp": now + 7200, "nbf": now + 3600}),
        SECRET,
    );
    for (what, bad) in [
        ("garbage", "not.a.token"),
        ("another key", foreign.as_str()),
        ("expired", expired.as_str()),
        ("no expiry", no_expiry.as_str()),
        ("not yet valid", not_yet.as_str()),
    ] {
        let response = setup.get("/things", Some(bad)).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{what}");
        assert_eq!(
            challenge(&response),
            r#"Bearer error="invalid_token""#,
            "{what}"
        );
        let error = error_of(response).await;
        assert!(
            error.starts_with("the bearer token was refused"),
            "{what}: {error}"
        );
        assert!(!error.contains(bad), "{what}: the error repeats the token");
    }
    // A scheme other than Bearer is refused the same way.
    let response = setup
        .gateway
        .http
        .get(setup.gateway.url("/things"))
        .basic_auth("alice", Some("pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(challenge(&response), r#"Bearer error="invalid_token""#);
}

#[tokio::test]
async fn a_token_from_a_standard_library_with_the_same_key_is_accepted() {
    let setup = Setup::start(|_| {}).await;
    let standard = signed(
        &json!({"sub": "carol", "scope": "things:read other", "exp": unix_now() + 60}),
        SECRET,
    );
    let response = setup.get("/things", Some(&standard)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["auth"],
        json!({"sub": "carol", "scopes": ["things:read", "other"]})
    );
}

#[tokio::test]
async fn a_token_without_the_route_scope_is_403_naming_it() {
    let setup = Setup::start(|_| {}).await;
    let reader = token("alice", &["things:read"]);
    let response = setup
        .send(reqwest::Method::PUT, "/things/k", Some(&reader))
        .await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        challenge(&response),
        r#"Bearer error="insufficient_scope", scope="things:write""#
    );
    assert!(error_of(response).await.contains("\"things:write\""));
    // The same token reads.
    let response = setup.get("/things/k", Some(&reader)).await;
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn the_node_receives_the_verified_caller_and_never_a_client_sent_auth() {
    let setup = Setup::start(|_| {}).await;
    let writer = token("alice", &["things:write"]);
    let response = setup
        .gateway
        .http
        .put(setup.gateway.url("/things/k?auth=forged&x=1"))
        .bearer_auth(&writer)
        .json(&json!({"value": "v", "auth": {"sub": "root", "scopes": ["admin"]}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["auth"],
        json!({"sub": "alice", "scopes": ["things:write"]})
    );
    assert_eq!(
        body["params"],
        json!({"x": "1", "value": "v", "params": "k"}),
        "no auth field reaches the node"
    );
}

#[tokio::test]
async fn admin_implies_every_scope() {
    let setup = Setup::start(|_| {}).await;
    for (method, path) in [
        (reqwest::Method::GET, "/things"),
        (reqwest::Method::PUT, "/things/k"),
        (reqwest::Method::GET, "/open"),
    ] {
        let response = setup.send(method.clone(), path, Some(&setup.admin)).await;
        assert_eq!(response.status(), StatusCode::OK, "{method} {path}");
    }
}

#[tokio::test]
async fn a_route_without_a_scope_needs_any_valid_token() {
    let setup = Setup::start(|_| {}).await;
    let nobody = token("dave", &[]);
    let response = setup.get("/open", Some(&nobody)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["auth"], json!({"sub": "dave", "scopes": []}));
    let response = setup.get("/things", Some(&nobody)).await;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn anonymous_scopes_grant_requests_without_a_token() {
    let setup = Setup::start(|config| {
        config.anonymous_scopes = vec!["things:read".into()];
    })
    .await;
    let response = setup.get("/things/k", None).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["auth"], json!({"scopes": ["things:read"]}));

    let response = setup.send(reqwest::Method::PUT, "/things/k", None).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(challenge(&response), "Bearer");
    assert!(error_of(response).await.contains("\"things:write\""));
    // A route without a scope needs a real token.
    let response = setup.get("/open", None).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    // A token still counts as itself, not as the anonymous grant.
    let writer = token("alice", &["things:write"]);
    let response = setup
        .send(reqwest::Method::PUT, "/things/k", Some(&writer))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn the_query_token_opens_an_event_stream_and_is_not_forwarded() {
    let setup = Setup::start(|_| {}).await;
    let reader = token("erin", &["things:read"]);
    let response = setup
        .gateway
        .http
        .get(
            setup
                .gateway
                .url(&format!("/ticks?topic=a&access_token={reader}")),
        )
        .header(header::ACCEPT, "text/event-stream")
        .send()
        .await
        .unwrap();
    let mut stream = EventStream::from_response(response).await.unwrap();
    let events = stream.rest_within(PROMPTLY).await.unwrap();
    assert_eq!(events.len(), 2);
    for event in &events {
        let data = event.json();
        assert_eq!(data["params"], json!({"topic": "a"}), "the token stays out");
        assert_eq!(
            data["auth"],
            json!({"sub": "erin", "scopes": ["things:read"]})
        );
    }
    // A plain request too.
    let response = setup
        .get(&format!("/things?access_token={reader}&x=1"), None)
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["params"], json!({"x": "1"}));
    // And a bad one in the query is refused like one in the header.
    let response = setup.get("/ticks?access_token=nope", None).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(challenge(&response), r#"Bearer error="invalid_token""#);
}

/// The value of `series` (a line prefix) in a metrics text.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|line| line.starts_with(series))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in the metrics:\n{text}"))
}

#[tokio::test]
async fn metrics_and_topology_need_admin_and_refusals_are_counted() {
    let setup = Setup::start(|_| {}).await;
    let reader = token("alice", &["things:read"]);
    for path in ["/metrics", "/_/topology"] {
        let response = setup.get(path, None).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(challenge(&response), "Bearer");
        let response = setup.get(path, Some(&reader)).await;
        assert_eq!(response.status(), StatusCode::FORBIDDEN, "{path}");
        assert!(error_of(response).await.contains("\"admin\""));
        let response = setup.get(path, Some(&setup.admin)).await;
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
    for path in ["/healthz", "/"] {
        let response = setup.get(path, None).await;
        assert_eq!(response.status(), StatusCode::OK, "{path} is open");
    }
    let _ = setup.get("/things", None).await;
    let text = setup
        .get("/metrics", Some(&setup.admin))
        .await
        .text()
        .await
        .unwrap();
    // Two 401s from the endpoints and one proxied; one 403 per endpoint.
    assert_eq!(
        metric(&text, "gateway_refused_total{reason=\"unauthenticated\"}"),
        3.0
    );
    assert_eq!(
        metric(&text, "gateway_refused_total{reason=\"forbidden\"}"),
        2.0
    );
    assert_eq!(
        metric(&text, "gateway_refused_total{reason=\"rate_limited\"}"),
        0.0
    );
    assert!(text.contains("gateway_handshake_failures_total"));
}

#[tokio::test]
async fn over_the_rate_limit_is_429_with_retry_after_per_caller() {
    let setup = Setup::start(|config| {
        config.rate_limit = Some(RateLimit {
            rate: "1/m".parse().unwrap(),
            burst: NonZeroU32::new(2),
        });
        config.anonymous_scopes = vec!["things:read".into()];
    })
    .await;
    let alice = token("alice", &["things:read"]);
    for _ in 0..2 {
        assert_eq!(
            setup.get("/things", Some(&alice)).await.status(),
            StatusCode::OK
        );
    }
    let response = setup.get("/things", Some(&alice)).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = response.headers()[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    // A new token for the same subject shares the bucket.
    let again = token("alice", &["things:read", "more"]);
    assert_eq!(
        setup.get("/things", Some(&again)).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    // Another subject, and a caller without a token (by address), have their own.
    let bob = token("bob", &["things:read"]);
    assert_eq!(
        setup.get("/things", Some(&bob)).await.status(),
        StatusCode::OK
    );
    assert_eq!(setup.get("/things", None).await.status(), StatusCode::OK);
    let text = setup
        .get("/metrics", Some(&setup.admin))
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric(&text, "gateway_refused_total{reason=\"rate_limited\"}"),
        2.0
    );
}

#[tokio::test]
async fn bad_tokens_spend_their_address_allowance() {
    let setup = Setup::start(|config| {
        config.rate_limit = Some(RateLimit {
            rate: "1/m".parse().unwrap(),
            burst: NonZeroU32::new(2),
        });
    })
    .await;
    for _ in 0..2 {
        let response = setup.get("/things", Some("forged")).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    let response = setup.get("/things", Some("forged")).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
}

#[test]
fn the_rate_limiter_forgets_callers_it_no_longer_needs() {
    let limiter = RateLimiter::new(RateLimit {
        rate: "1000000/s".parse().unwrap(),
        burst: NonZeroU32::new(1),
    });
    for i in 0..1000u32 {
        let key = gateway::rate_limit::RateKey::Subject(format!("caller-{i}").into());
        assert!(limiter.check(&key).is_ok());
    }
    assert_eq!(limiter.callers(), 1000);
    std::thread::sleep(Duration::from_millis(50));
    limiter.forget_idle();
    assert_eq!(limiter.callers(), 0);
}

#[tokio::test]
async fn protected_mode_serves_loopback_callers_with_every_scope() {
    let distributor = Distributor::start().await;
    let _service = Service::start("things", scoped_router(), distributor.addr).await;
    // No token key: loopback callers (this test) may do everything, without a token.
    let gateway = Gateway::start(distributor.addr, |_| {}).await;
    wait_for_route(&gateway, None, "PUT/things").await;
    let response = gateway
        .http
        .put(gateway.url("/things/k"))
        .body("v")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["auth"], json!({"scopes": ["admin"]}));
    let response = gateway
        .http
        .get(gateway.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

/// A node of [`scoped_router`] that requires `secret` of every connection, serving nothing but
/// that node; and a gateway fed a topology naming it, with `gateway_secret`.
async fn gateway_before_a_secret_node(
    secret: &[u8],
    gateway_secret: &[u8],
) -> (Reached, CancellationToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let config = ServiceConfig {
        name: "things".into(),
        distributor: None,
        cluster: shared::cluster::ClusterPolicy {
            secret: Some(ClusterSecret::new(secret.to_vec())),
            allow_legacy: false,
        },
        ..ServiceConfig::default()
    };
    tokio::spawn(serve(listener, scoped_router(), config, stop.child_token()));
    let node = NodeInfo {
        host: addr.ip().to_string(),
        port: addr.port(),
        name: "things".into(),
        urls: scoped_router().urls(),
        protocol: Some(PROTOCOL_VERSION),
        scopes: scoped_router().scopes(),
        ready: true,
    };
    let (_topology_tx, topology) = watch::channel(Arc::new(vec![node]));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway_addr = listener.local_addr().unwrap();
    let config = Config {
        distributor: None,
        cluster_secret: Some(ClusterSecret::new(gateway_secret.to_vec())),
        ..Config::default()
    };
    let gateway_stop = stop.child_token();
    tokio::spawn(async move {
        let _keep_the_topology = _topology_tx;
        gateway::run_with_topology(listener, config, topology, gateway_stop).await
    });
    let gateway = Reached {
        addr: gateway_addr,
        http: reqwest::Client::builder()
            .timeout(PROMPTLY)
            .build()
            .unwrap(),
    };
    (gateway, stop)
}

#[tokio::test]
async fn the_gateway_proves_the_cluster_secret_to_the_nodes() {
    let (gateway, stop) = gateway_before_a_secret_node(b"cluster", b"cluster").await;
    wait_for_route(&gateway, None, "GET/things").await;
    let response = gateway
        .http
        .get(gateway.url("/things/k"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    stop.cancel();
}

#[tokio::test]
async fn a_node_with_another_secret_is_never_connected_and_the_failures_are_counted() {
    let (gateway, stop) = gateway_before_a_secret_node(b"cluster", b"not the secret").await;
    let counted = timeout(PROMPTLY, async {
        loop {
            let text = gateway
                .http
                .get(gateway.url("/metrics"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            if metric(&text, "gateway_handshake_failures_total") >= 1.0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(counted.is_ok(), "the failed handshake is counted");
    let response = gateway
        .http
        .get(gateway.url("/things/k"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    stop.cancel();
}

// The fuzz of the token parser: whatever arrives in the header or the query, verification never
// panics and never accepts a token that is not exactly one that was signed.
mod fuzz {
    use axum::http::{HeaderMap, HeaderValue};
    use gateway::auth::Authenticator;
    use proptest::prelude::*;

    use super::*;

    fn authenticator() -> Authenticator {
        Authenticator::new(
            Some(Arc::new(TokenVerifier::from_secret(SECRET))),
            Vec::new(),
        )
    }

    fn with_header(value: &str) -> Option<HeaderMap> {
        let mut headers = HeaderMap::new();
        headers.insert(
            axum::http::header::AUTHORIZATION,
            HeaderValue::from_str(value).ok()?,
        );
        Some(headers)
    }

    fn peer() -> Option<std::net::SocketAddr> {
        Some("127.0.0.1:1".parse().unwrap())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn random_text_is_never_a_token(text in ".{0,300}", dotted in "[A-Za-z0-9_\\-]{0,40}\\.[A-Za-z0-9_\\-]{0,80}\\.[A-Za-z0-9_\\-]{0,50}") {
            let auth = authenticator();
            for candidate in [&text, &dotted] {
                if let Some(headers) = with_header(&format!("Bearer {candidate}")) {
                    prop_assert!(auth.authenticate(&headers, None, peer()).is_err());
                }
                if let Some(headers) = with_header(candidate) {
                    prop_assert!(auth.authenticate(&headers, None, peer()).is_err());
                }
                let query = format!("access_token={candidate}");
                prop_assert!(auth.authenticate(&HeaderMap::new(), Some(&query), peer()).is_err());
            }
        }

        #[test]
        fn a_mutated_token_is_refused(
            position in any::<prop::sample::Index>(),
            replacement in prop::sample::select(
                "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ ".chars().collect::<Vec<_>>()),
            kind in 0..4u8,
        ) {
            let auth = authenticator();
            let original = token("alice", &["things:read"]);
            let mut chars: Vec<char> = original.chars().collect();
            let at = position.index(chars.len());
            match kind {
                0 => chars[at] = replacement,
                1 => { chars.insert(at, replacement); }
                2 => { chars.remove(at); }
                _ => chars.truncate(at),
            }
            let mutated: String = chars.into_iter().collect();
            // Spaces added before or after the token leave it whole: `Bearer` may be followed
            // by one space or more (RFC 6750), and a header value's edges are not part of it.
            prop_assume!(mutated.trim() != original);
            if let Some(headers) = with_header(&format!("Bearer {mutated}")) {
                prop_assert!(
                    auth.authenticate(&headers, None, peer()).is_err(),
                    "accepted a mutated token"
                );
            }
        }
    }

    #[test]
    fn the_unmutated_token_is_accepted() {
        let headers = with_header(&format!("Bearer {}", token("alice", &["x"]))).unwrap();
        assert!(authenticator().authenticate(&headers, None, peer()).is_ok());
    }
}

// ---- The real binary ----

/// A `gateway` process, killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn gateway_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_gateway"));
    // Nothing listens on port 1: the gateway keeps trying in the background, which is all these
    // tests need of a distributor.
    command
        .args(["--distributor", "127.0.0.1:1"])
        .env_remove("JWT_SECRET_FILE")
        .env_remove("JWT_PUBLIC_KEY_FILE")
        .env_remove("GATEWAY_ANONYMOUS_SCOPES")
        .env_remove("GATEWAY_LISTEN")
        .env_remove("CLUSTER_SECRET_FILE")
        // No topology cache file left in the crate's directory.
        .env("GATEWAY_TOPOLOGY_CACHE", "")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    command
}

/// Drops terminal escape sequences, in case the log is coloured anyway.
fn plain(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Starts the gateway with `args` and waits for it to log where it listens; returns the
/// process, the port, and a channel of its further stderr lines.
fn start_binary(args: &[&str]) -> (Process, u16, std::sync::mpsc::Receiver<String>) {
    let mut child = gateway_command()
        .args(args)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let process = Process(child);
    let (lines_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(plain(&line)).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + PROMPTLY;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = lines
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("the gateway never said it listens:\n{}", seen.join("\n")));
        if line.contains("gateway listening") {
            let port = line
                .split_whitespace()
                .find_map(|field| field.strip_prefix("addr="))
                .and_then(|addr| addr.rsplit(':').next())
                .and_then(|port| port.parse().ok())
                .unwrap_or_else(|| panic!("no address in {line:?}"));
            let mut earlier = seen;
            earlier.push(line);
            let (again_tx, again) = std::sync::mpsc::channel();
            for line in earlier {
                again_tx.send(line).unwrap();
            }
            std::thread::spawn(move || {
                while let Ok(line) = lines.recv() {
                    if again_tx.send(line).is_err() {
                        break;
                    }
                }
            });
            return (process, port, again);
        }
        seen.push(line);
    }
}

#[test]
fn the_binary_refuses_a_public_address_without_a_key_or_anonymous_scopes() {
    let output = gateway_command()
        .args(["--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!output.status.success(), "it must not start");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--jwt-secret-file"), "{stderr}");
    assert!(stderr.contains("--anonymous-scopes"), "{stderr}");
}

#[tokio::test]
async fn with_anonymous_scopes_it_starts_on_a_public_address_and_warns() {
    let (_process, port, lines) =
        start_binary(&["--listen", "0.0.0.0:0", "--anonymous-scopes", "*"]);
    let response = reqwest::get(format!("http://127.0.0.1:{port}/healthz"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let log: Vec<String> = lines.try_iter().collect();
    assert!(
        log.iter()
            .any(|line| line.contains("WARN") && line.contains("no token key")),
        "{log:#?}"
    );
}

#[test]
fn the_default_listen_address_is_loopback() {
    let output = gateway_command().arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(help.contains("127.0.0.1:8000"), "{help}");
}

#[tokio::test]
async fn tokens_never_reach_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("jwt.key");
    std::fs::write(&key, SECRET).unwrap();
    let (process, port, lines) = start_binary(&[
        "--listen",
        "127.0.0.1:0",
        "--jwt-secret-file",
        key.to_str().unwrap(),
    ]);
    let http = reqwest::Client::new();
    let good = token("alice", &["admin"]);
    let expired = signed(
        &json!({"sub": "alice", "scope": "admin", "exp": unix_now() - 3600}),
        SECRET,
    );
    let url = |path: &str| format!("http://127.0.0.1:{port}{path}");
    for secret in [&good, &expired] {
        http.get(url(&format!("/kv/x?access_token={secret}")))
            .send()
            .await
            .unwrap();
        http.get(url("/kv/x"))
            .bearer_auth(secret)
            .send()
            .await
            .unwrap();
        http.get(url("/_/topology"))
            .bearer_auth(secret)
            .send()
            .await
            .unwrap();
    }
    // The logs of these requests are written by now; the process's end closes its stderr.
    drop(process);
    let log: Vec<String> = lines.iter().collect();
    let text = log.join("\n");
    assert!(
        text.contains("request refused"),
        "the refusals are logged:\n{text}"
    );
    for secret in [&good, &expired] {
        // The signature alone is enough to find a token in a log.
        let signature = secret.rsplit('.').next().unwrap();
        assert!(!text.contains(signature), "a token is in the log:\n{text}");
    }
}

#[test]
fn mint_token_prints_a_token_the_gateway_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("jwt.key");
    std::fs::write(&key, b"minting key\n").unwrap();
    let output = gateway_command()
        .args([
            "mint-token",
            "--jwt-secret-file",
            key.to_str().unwrap(),
            "--sub",
            "alice",
            "--scope",
            "kv:read kv:write",
            "--ttl",
            "10m",
            "--audience",
            "api",
        ])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let printed = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(lines.len(), 1, "only the token: {printed:?}");
    // The key is the file's bytes less the trailing newline.
    let identity = TokenVerifier::from_secret(b"minting key")
        .restricted_to(Some("api"), None)
        .verify(lines[0])
        .unwrap();
    assert_eq!(identity.sub.as_deref(), Some("alice"));
    assert_eq!(identity.scopes, ["kv:read", "kv:write"]);
    assert!(TokenVerifier::from_secret(b"another key")
        .verify(lines[0])
        .is_err());

    let output = gateway_command()
        .args(["mint-token", "--sub", "alice", "--scope", "x"])
        .output()
        .unwrap();
    assert!(!output.status.success(), "the key file is required");
}
