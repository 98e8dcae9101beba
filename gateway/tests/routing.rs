//! Requests through the gateway to real service nodes found through a real distributor: which
//! node gets a request, which uri and params it sees, and what the HTTP client gets back.

mod common;

use common::{echo_router, Distributor, Gateway, Service};
use reqwest::StatusCode;
use serde_json::{json, Value};

#[tokio::test]
async fn requests_alternate_between_two_nodes() {
    let distributor = Distributor::start().await;
    let _a = Service::start("echo", echo_router("a"), distributor.addr).await;
    let _b = Service::start("echo", echo_router("b"), distributor.addr).await;
    let gateway = Gateway::start(distributor.addr, |_| {}).await;
    gateway.wait_for_nodes("GET/echo", 2).await;

    let answered_by = gateway.answering_nodes("/echo", 10).await;
    for pair in answered_by.windows(2) {
        assert_ne!(pair[0], pair[1], "round-robin alternates: {answered_by:?}");
    }
    assert_eq!(answered_by.iter().filter(|n| *n == "a").count(), 5);
}

#[tokio::test]
async fn a_node_that_goes_away_leaves_the_rotation_and_one_that_comes_back_rejoins() {
    let distributor = Distributor::start().await;
    let _a = Service::start("echo", echo_router("a"), distributor.addr).await;
    let mut b = Service::start("echo", echo_router("b"), distributor.addr).await;
    let gateway = Gateway::start(distributor.addr, |_| {}).await;
    gateway.wait_for_nodes("GET/echo", 2).await;

    b.stop().await;
    gateway.wait_for_nodes("GET/echo", 1).await;
    let nodes = gateway.answering_nodes("/echo", 6).await;
    assert!(
        nodes.iter().all(|node| node == "a"),
        "only a is left in rotation: {nodes:?}"
    );

    let _b = Service::start("echo", echo_router("b"), distributor.addr).await;
    gateway.wait_for_nodes("GET/echo", 2).await;
    let nodes = gateway.answering_nodes("/echo", 4).await;
    assert!(
        nodes.iter().any(|node| node == "b"),
        "b is back in rotation: {nodes:?}"
    );
}

#[tokio::test]
async fn the_longest_prefix_routes_and_the_rest_of_the_path_becomes_params() {
    let distributor = Distributor::start().await;
    let _a = Service::start("echo", echo_router("a"), distributor.addr).await;
    let gateway = Gateway::start(distributor.addr, |_| {}).await;
    gateway.wait_for_nodes("GET/echo", 1).await;

    let (status, body) = gateway.get("/echo").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["uri"], "/echo");
    assert_eq!(body["params"], json!({}));

    let (_, body) = gateway.get("/echo/deeper").await;
    assert_eq!(
        body["uri"], "/echo/deeper",
        "an exact url wins over its prefix"
    );

    let (_, body) = gateway.get("/echo/deeper/x/y").await;
    assert_eq!(body["uri"], "/echo/deeper");
    assert_eq!(body["params"]["params"], "x/y");

    let (_, body) = gateway.get("/echo/a%20b%2Fc%C3%A9").await;
    assert_eq!(body["uri"], "/echo");
    assert_eq!(
        body["params"]["params"], "a b/cé",
        "the rest is percent-decoded"
    );

    let delete = gateway
        .http
        .delete(gateway.url("/echo/7"))
        .send()
        .await
        .unwrap();
    let body: Value = delete.json().await.unwrap();
    assert_eq!(body["method"], "DELETE");
    assert_eq!(body["uri"], "/echo");
    assert_eq!(body["params"], json!({"params": "7"}));

    let invalid = gateway
        .http
        .get(gateway.url("/echo/%FF"))
        .send()
        .await
        .unwrap();
    assert_eq!(invalid.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn query_and_body_fields_are_merged_into_params() {
    let distributor = Distributor::start().await;
    let _a = Service::start("echo", echo_router("a"), distributor.addr).await;
    let gateway = Gateway::start(distributor.addr, |_| {}).await;
    gateway.wait_for_nodes("PUT/echo", 1).await;

    let body: Value = gateway
        .http
        .put(gateway.url("/echo/k1?x=1&shared=query&word=a+b"))
        .json(&json!({"value": {"nested": true}, "shared": "body"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        body["params"],
        json!({
            "x": "1",
            "word": "a b",
            "value": {"nested": true},
            "shared": "body",
            "params": "k1",
        })
    );

    // `curl -X PUT .../echo/k2 -d hello`
    let body: Value = gateway
        .http
        .put(gateway.url("/echo/k2"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("hello")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["params"], json!({"body": "hello", "params": "k2"}));

    // A JSON body that is not an object is passed whole.
    let body: Value = gateway
        .http
        .post(gateway.url("/echo"))
        .json(&json!([1, 2, 3]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["params"], json!({"body": [1, 2, 3]}));
}

#[tokio::test]
async fn request_ids_travel_to_the_node_and_back() {
    let distributor = Distributor::start().await;
    let _a = Service::start("echo", echo_router("a"), distributor.addr).await;
    let gateway = Gateway::start(distributor.addr, |_| {}).await;
    gateway.wait_for_nodes("GET/echo", 1).await;

    let response = gateway
        .http
        .get(gateway.url("/echo"))
        .header("x-request-id", "trace-me-42")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "trace-me-42");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["request_id"], "trace-me-42");

    let response = gateway.http.get(gateway.url("/echo")).send().await.unwrap();
    let generated = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(!generated.is_empty());
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["request_id"], generated.as_str());
}

#[tokio::test]
async fn head_follows_the_get_route() {
    let distributor = Distributor::start().await;
    let _a = Service::start("echo", echo_router("a"), distributor.addr).await;
    let gateway = Gateway::start(distributor.addr, |_| {}).await;
    gateway.wait_for_nodes("GET/echo", 1).await;

    let head = gateway
        .http
        .head(gateway.url("/echo/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(head.headers()["content-type"], "application/json");
    assert!(head.bytes().await.unwrap().is_empty());

    let missing = gateway
        .http
        .head(gateway.url("/nothing"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn the_gateway_answers_its_own_endpoints() {
    let distributor = Distributor::start().await;
    let service = Service::start("a", echo_router("a"), distributor.addr).await;
    let gateway = Gateway::start(distributor.addr, |_| {}).await;
    gateway.wait_for_nodes("GET/echo", 1).await;

    let (status, health) = gateway.get("/healthz").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(health["status"], "ok");

    let topology = gateway.topology().await;
    let route = topology["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|route| route["url"] == "GET/echo")
        .unwrap();
    assert_eq!(
        route["nodes"],
        json!([{"addr": service.addr.to_string(), "name": "a", "connected": true}])
    );
    assert_eq!(topology["distributor"], distributor.addr.to_string());
    let nodes = topology["nodes"].as_array().unwrap();
    assert_eq!(
        nodes.len(),
        1,
        "the gateway itself has no urls and is not routed to"
    );
    assert_eq!(nodes[0]["protocol"], 2);

    gateway.get("/echo").await;
    gateway.get("/nowhere").await;
    let metrics = gateway
        .http
        .get(gateway.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert!(metrics.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let text = metrics.text().await.unwrap();
    assert!(
        text.contains(r#"gateway_requests_total{route="GET/echo",status="200"} 1"#),
        "{text}"
    );
    assert!(text.contains(r#"gateway_requests_total{route="none",status="404"} 1"#));
    assert!(text.contains(r#"gateway_request_duration_seconds_count{route="GET/echo"} 1"#));
    assert!(text.contains(r#"gateway_route_nodes{route="PUT/echo"} 1"#));
    assert!(text.contains("gateway_requests_in_flight 0"));

    let page = gateway.http.get(gateway.url("/")).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert!(page.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));

    // Other methods on the gateway's own paths are ordinary requests: nothing routes them here.
    let post = gateway
        .http
        .post(gateway.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), StatusCode::NOT_FOUND);
    let body: Value = post.json().await.unwrap();
    assert!(body["error"].is_string());
}
