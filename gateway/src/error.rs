//! What can go wrong with a proxied request, and the HTTP answer for each case.
//!
//! Every gateway error is answered as JSON `{"error": "..."}` with the status below; the message
//! says what the caller can act on and nothing about the gateway's internals. [`ProxyError::log`]
//! records each one with the id of the request it ended.

use std::time::Duration;

use axum::{
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// 404: no node registered this method and path (nor a prefix of it).
    #[error("no route for {method} {path}")]
    NoRoute { method: String, path: String },
    /// 503: the route exists, but none of its nodes is connected.
    #[error("no node of {route} is reachable")]
    NoNode { route: String },
    /// 504: the node did not answer within the request timeout.
    #[error("the service did not answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// 502: the node's connection closed while the request waited for its answer.
    #[error("the service's connection closed before it answered")]
    ConnectionClosed,
    /// 502: the node answered something that cannot be turned into an HTTP response.
    #[error("the service sent an invalid answer: {0}")]
    BadAnswer(String),
    /// 400: a body sent as JSON that does not parse.
    #[error("the request body is not valid JSON: {0}")]
    BadJson(#[source] serde_json::Error),
    /// 400: anything else wrong with the request itself.
    #[error("{0}")]
    BadRequest(String),
    /// 413: a body over `--max-body`.
    #[error("the request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    /// 408: a body that stalled, or came slower than the gateway accepts
    /// (see [`crate::http::PacedBody`]).
    #[error("the request body arrived too slowly")]
    BodyTooSlow,
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ProxyError::NoNode { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::ConnectionClosed | ProxyError::BadAnswer(_) => StatusCode::BAD_GATEWAY,
            ProxyError::BadJson(_) | ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::BodyTooSlow => StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// Logs the error with the id of the request it ended: 5xx as warnings (something is wrong
    /// on the service side), 4xx at debug level (the caller's mistake).
    pub fn log(&self, request_id: &str) {
        let status = self.status().as_u16();
        if self.status().is_server_error() {
            tracing::warn!(status, request_id, error = %self, "request failed");
        } else {
            tracing::debug!(status, request_id, error = %self, "request refused");
        }
    }
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        json_error(self.status(), &self.to_string())
    }
}

/// A JSON `{"error": message}` response.
pub fn json_error(status: StatusCode, message: &str) -> Response {
    #[derive(Serialize)]
    struct ErrorBody<'a> {
        error: &'a str,
    }
    let body =
        serde_json::to_vec(&ErrorBody { error: message }).expect("a string always serializes");
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}
