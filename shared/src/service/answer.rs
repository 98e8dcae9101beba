//! What a handler answers: [`IntoAnswer`], the packet runtime's counterpart of axum's
//! `IntoResponse`.
//!
//! A handler may build a [`Response`] by hand, but the services' handlers return
//! `Result<Json<T>, ServiceError>` (or [`Created`] / [`Accepted`] in place of [`Json`]), so that
//! a handler reads its params, calls its core and stops at the first error with `?`. Each
//! service converts its core's error into a [`ServiceError`] with one `From` impl, which is the
//! one place where that service decides which status each of its errors gets.

use serde::Serialize;
use serde_json::Value;

use crate::Packet;

/// An answer as the runtime sends it: a status, params, and an error message for a status
/// other than 2xx.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub status: u16,
    pub params: Value,
    pub error: Option<String>,
}

impl Response {
    pub fn ok(params: impl Serialize) -> Response {
        Response::with_status(200, params)
    }

    pub fn with_status(status: u16, params: impl Serialize) -> Response {
        match serde_json::to_value(params) {
            Ok(params) => Response {
                status,
                params,
                error: None,
            },
            Err(err) => {
                ServiceError::Internal(format!("could not encode the answer: {err}")).into_answer()
            }
        }
    }

    pub fn error(status: u16, message: impl Into<String>) -> Response {
        Response {
            status,
            params: Value::Null,
            error: Some(message.into()),
        }
    }

    /// The answer packet to `request`; 200 is the absence of a status on the wire.
    pub(super) fn into_packet(self, request: &Packet) -> Packet {
        Packet {
            status: (self.status != 200).then_some(self.status),
            error: self.error,
            ..Packet::reply_to(request, self.params)
        }
    }
}

/// Anything a handler may return: the runtime turns it into the answer packet.
pub trait IntoAnswer {
    fn into_answer(self) -> Response;
}

impl IntoAnswer for Response {
    fn into_answer(self) -> Response {
        self
    }
}

/// A 200 answer whose params are `T` serialized.
#[derive(Debug, Clone, PartialEq)]
pub struct Json<T>(pub T);

impl<T: Serialize> IntoAnswer for Json<T> {
    fn into_answer(self) -> Response {
        Response::with_status(200, self.0)
    }
}

/// A 201 answer: the request created `T`.
#[derive(Debug, Clone, PartialEq)]
pub struct Created<T>(pub T);

impl<T: Serialize> IntoAnswer for Created<T> {
    fn into_answer(self) -> Response {
        Response::with_status(201, self.0)
    }
}

/// A 202 answer: the request was taken and will be carried out later (a scheduled notice).
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted<T>(pub T);

impl<T: Serialize> IntoAnswer for Accepted<T> {
    fn into_answer(self) -> Response {
        Response::with_status(202, self.0)
    }
}

/// An answer or an error, so handlers can use `?` on anything that converts into a
/// [`ServiceError`].
impl<T: IntoAnswer, E: Into<ServiceError>> IntoAnswer for Result<T, E> {
    fn into_answer(self) -> Response {
        match self {
            Ok(answer) => answer.into_answer(),
            Err(err) => err.into().into_answer(),
        }
    }
}

/// Why a request was refused or failed, by the status it is answered with. The message is what
/// the caller reads in the answer's `error`: it never carries internals (store errors are logged
/// where they are converted into [`ServiceError::Internal`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    /// 400: the params are malformed or break a rule of the service.
    #[error("{0}")]
    BadRequest(String),
    /// 401: the caller has not proved who it is.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: the caller may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// 404: no such route, key or resource.
    #[error("{0}")]
    NotFound(String),
    /// 409: the request conflicts with what is stored (an existing key, a newer version).
    #[error("{0}")]
    Conflict(String),
    /// 500: the service failed; trying again may help.
    #[error("{0}")]
    Internal(String),
    /// 503: the service cannot take this now (full, or shutting down); try again later.
    #[error("{0}")]
    Unavailable(String),
}

impl ServiceError {
    /// The status the answer carries.
    pub fn status(&self) -> u16 {
        match self {
            ServiceError::BadRequest(_) => 400,
            ServiceError::Unauthorized(_) => 401,
            ServiceError::Forbidden(_) => 403,
            ServiceError::NotFound(_) => 404,
            ServiceError::Conflict(_) => 409,
            ServiceError::Internal(_) => 500,
            ServiceError::Unavailable(_) => 503,
        }
    }

    /// What the caller is told.
    pub fn message(&self) -> &str {
        match self {
            ServiceError::BadRequest(message)
            | ServiceError::Unauthorized(message)
            | ServiceError::Forbidden(message)
            | ServiceError::NotFound(message)
            | ServiceError::Conflict(message)
            | ServiceError::Internal(message)
            | ServiceError::Unavailable(message) => message,
        }
    }
}

impl IntoAnswer for ServiceError {
    fn into_answer(self) -> Response {
        Response::error(self.status(), self.message())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn each_named_error_answers_its_status_with_its_message() {
        for (error, status) in [
            (ServiceError::BadRequest("bad".into()), 400),
            (ServiceError::Unauthorized("who".into()), 401),
            (ServiceError::Forbidden("no".into()), 403),
            (ServiceError::NotFound("gone".into()), 404),
            (ServiceError::Conflict("taken".into()), 409),
            (ServiceError::Internal("failed".into()), 500),
            (ServiceError::Unavailable("full".into()), 503),
        ] {
            let message = error.message().to_owned();
            assert_eq!(error.to_string(), message);
            assert_eq!(
                error.into_answer(),
                Response::error(status, message),
                "{status}"
            );
        }
    }

    #[test]
    fn a_result_answers_its_success_or_its_error() {
        let ok: Result<Json<_>, ServiceError> = Ok(Json(json!({"n": 1})));
        assert_eq!(ok.into_answer(), Response::ok(json!({"n": 1})));
        let created: Result<_, ServiceError> = Ok(Created(json!({"id": 7})));
        assert_eq!(created.into_answer().status, 201);
        let accepted: Result<_, ServiceError> = Ok(Accepted(json!({"scheduled": true})));
        assert_eq!(accepted.into_answer().status, 202);
        let refused: Result<Json<()>, _> = Err(ServiceError::Conflict("taken".into()));
        assert_eq!(refused.into_answer(), Response::error(409, "taken"));
    }

    #[test]
    fn a_success_on_the_wire_has_no_status() {
        let request = Packet::request("GET", "/kv", Value::Null);
        let ok = Json("v").into_answer().into_packet(&request);
        assert_eq!((ok.status, ok.error), (None, None));
        let created = Created("v").into_answer().into_packet(&request);
        assert_eq!(created.status, Some(201));
    }
}
