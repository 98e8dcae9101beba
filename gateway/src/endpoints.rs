//! The gateway's own endpoints, answered without any node: health, metrics, the routing view,
//! and the status page.
//!
//! Only GET (and HEAD) is answered here; other methods on these paths go through the proxy like
//! any request.

use std::sync::Arc;

use axum::{
    extract::State,
    http::{header, HeaderValue},
    response::{Html, IntoResponse, Response},
    Json,
};
use serde_json::json;

use crate::AppState;

/// `GET /healthz`: the process is up and serving HTTP.
pub(crate) async fn healthz() -> Response {
    Json(json!({ "status": "ok" })).into_response()
}

/// `GET /metrics`: Prometheus text exposition.
pub(crate) async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let table = state.routes.borrow().clone();
    let text = state.metrics.render(&table);
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}

/// `GET /_/topology`: every route with its nodes and their connection state, and every node.
pub(crate) async fn topology(State(state): State<Arc<AppState>>) -> Response {
    let table = state.routes.borrow().clone();
    let snapshot = table.snapshot();
    Json(json!({
        "distributor": state.config.distributor,
        "routes": snapshot.routes,
        "nodes": snapshot.nodes,
    }))
    .into_response()
}

/// `GET /`: the status page.
pub(crate) async fn status_page() -> Html<&'static str> {
    Html(include_str!("status_page.html"))
}
