//! The gateway's own endpoints, answered without any node: health, metrics, the routing view,
//! and the status page.
//!
//! Only GET (and HEAD) is answered here; other methods on these paths go through the proxy like
//! any request. `/metrics` and `/_/topology` tell how the system is built, so they need the
//! `admin` scope; `/healthz` and the status page's HTML are open (the page asks for a token when
//! the gateway needs one).

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::{header, HeaderValue},
    response::{Html, IntoResponse, Response},
    Json,
};
use serde_json::json;
use shared::packet::ADMIN_SCOPE;

use crate::{auth, auth::AuthError, AppState};

/// The refusal of a request without the `admin` scope; `None` when it has it.
pub(crate) fn refusal_unless_admin(state: &AppState, request: &Request) -> Option<Response> {
    let peer = auth::peer_of(request.extensions());
    let error: AuthError = state
        .auth
        .require(request.headers(), request.uri().query(), peer, ADMIN_SCOPE)
        .err()?;
    tracing::debug!(status = error.status().as_u16(), path = request.uri().path(),
        error = %error, "request refused");
    state.metrics.count_refusal(error.status().as_u16());
    Some(error.into_response())
}

/// `GET /healthz`: the process is up and serving HTTP.
pub(crate) async fn healthz() -> Response {
    Json(json!({ "status": "ok" })).into_response()
}

/// `GET /metrics`: Prometheus text exposition.
pub(crate) async fn metrics(State(state): State<Arc<AppState>>, request: Request) -> Response {
    if let Some(refused) = refusal_unless_admin(&state, &request) {
        return refused;
    }
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

/// `GET /_/topology`: where the topology came from (`source`), every route with its nodes and
/// their connection state and readiness, and every node.
pub(crate) async fn topology(State(state): State<Arc<AppState>>, request: Request) -> Response {
    if let Some(refused) = refusal_unless_admin(&state, &request) {
        return refused;
    }
    let table = state.routes.borrow().clone();
    let snapshot = table.snapshot();
    let source = *state.topology_source.borrow();
    Json(json!({
        "distributor": state.config.distributor,
        "source": source,
        "routes": snapshot.routes,
        "nodes": snapshot.nodes,
    }))
    .into_response()
}

/// `GET /`: the status page.
pub(crate) async fn status_page() -> Html<&'static str> {
    Html(include_str!("status_page.html"))
}
