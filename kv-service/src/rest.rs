//! The REST door: handlers for the routes the gateway sends to `kv`, on shared's service
//! runtime. They turn request params into core calls and core results into statuses.
//!
//! The gateway builds `params` from the query string, the JSON body's fields, `params` (the rest
//! of the path: the key in `/kv/{key}`) and `body` (a body that is not JSON). Query fields arrive
//! as strings, so numbers are accepted either as JSON numbers or as numeric strings.
//!
//! | route               | answer                                                            |
//! |---------------------|-------------------------------------------------------------------|
//! | `PUT /kv/{key}`     | 200 `{key,value,version}`; 409 when `if_version` is not current   |
//! | `POST /kv`          | 201 `{key,value,version}`; 409 when the key exists                |
//! | `GET /kv/{key}`     | 200 `{key,value,version}`; 404                                    |
//! | `DELETE /kv/{key}`  | 200 `{key,deleted:true}`; 404                                     |
//! | `GET /kv?prefix=&after=&limit=` | 200 `{items:[{key,value,version}],next}`              |
//!
//! Reads need the scope `kv:read`, writes `kv:write` (`admin` implies both); a caller without it
//! is answered 403 by the runtime before any handler runs.

use futures::{future::UnwrapOrElse, TryFuture, TryFutureExt};
use serde_json::{json, Map, Value};
use shared::service::{Request, Response, Router};
use tracing::warn;

use crate::{
    core::{Kv, KvError, DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT},
    store::Condition,
    READ_SCOPE, WRITE_SCOPE,
};

/// The service's routes; they register as `DELETE/kv`, `GET/kv`, `POST/kv` and `PUT/kv`, reads
/// with the scope `kv:read` and writes with `kv:write`, which the runtime checks against the
/// caller's identity (a request a cluster member makes itself carries none and is trusted).
pub fn router(kv: Kv) -> Router {
    Router::new()
        .route("GET", "/kv", handler(kv.clone(), get_or_list))
        .scope(READ_SCOPE)
        .route("PUT", "/kv", handler(kv.clone(), put))
        .scope(WRITE_SCOPE)
        .route("POST", "/kv", handler(kv.clone(), create))
        .scope(WRITE_SCOPE)
        .route("DELETE", "/kv", handler(kv, delete))
        .scope(WRITE_SCOPE)
}

/// A handler answers `Err` with the 400 for a malformed parameter, so it can stop at the first
/// one with `?`; the route answers either way.
type Answer = Result<Response, Response>;

fn handler<F, Fut>(
    kv: Kv,
    f: F,
) -> impl Fn(Request) -> UnwrapOrElse<Fut, fn(Response) -> Response> + Send + Sync + 'static
where
    F: Fn(Kv, Request) -> Fut + Send + Sync + 'static,
    Fut: TryFuture<Ok = Response, Error = Response>,
{
    move |request| f(kv.clone(), request).unwrap_or_else(std::convert::identity)
}

async fn get_or_list(kv: Kv, request: Request) -> Answer {
    let params = Params::of(&request)?;
    let Some(key) = params.path_key() else {
        return list(&kv, &params).await;
    };
    Ok(match kv.get(key).await {
        Ok(Some(found)) => Response::ok(json!({
            "key": key,
            "value": found.value,
            "version": found.version,
        })),
        Ok(None) => not_found(key),
        Err(err) => failure(err),
    })
}

async fn list(kv: &Kv, params: &Params<'_>) -> Answer {
    let prefix = params.string("prefix")?.unwrap_or("");
    let after = params.string("after")?.filter(|after| !after.is_empty());
    let limit = params.number("limit")?.unwrap_or(DEFAULT_LIST_LIMIT as i64);
    let Ok(limit) = usize::try_from(limit) else {
        return Err(Response::error(
            400,
            format!("limit must be between 1 and {MAX_LIST_LIMIT} (got {limit})"),
        ));
    };
    Ok(match kv.list(prefix, after, limit).await {
        Ok(page) => Response::ok(page),
        Err(err) => failure(err),
    })
}

async fn put(kv: Kv, request: Request) -> Answer {
    let params = Params::of(&request)?;
    let condition = match params.number("if_version")? {
        Some(version) => Condition::IfVersion(version),
        None => Condition::Always,
    };
    Ok(write(&kv, params.key()?, params.value()?, condition, 200).await)
}

async fn create(kv: Kv, request: Request) -> Answer {
    let params = Params::of(&request)?;
    Ok(write(
        &kv,
        params.key()?,
        params.value()?,
        Condition::IfAbsent,
        201,
    )
    .await)
}

async fn write(kv: &Kv, key: &str, value: &str, condition: Condition, status: u16) -> Response {
    match kv.put(key, value.to_owned(), condition).await {
        Ok(version) => Response::with_status(
            status,
            json!({ "key": key, "value": value, "version": version }),
        ),
        Err(err) => failure(err),
    }
}

async fn delete(kv: Kv, request: Request) -> Answer {
    let params = Params::of(&request)?;
    let key = params.key()?;
    Ok(match kv.delete(key).await {
        Ok(true) => Response::ok(json!({ "key": key, "deleted": true })),
        Ok(false) => not_found(key),
        Err(err) => failure(err),
    })
}

fn not_found(key: &str) -> Response {
    Response::error(404, format!("no such key: {key}"))
}

/// The status and message for a core error. Store failures are logged here and answered
/// without their internals.
fn failure(err: KvError) -> Response {
    match err {
        KvError::InvalidKey(_) | KvError::ValueTooLong(_) | KvError::InvalidLimit(_) => {
            Response::error(400, err.to_string())
        }
        KvError::KeyExists(_) | KvError::VersionMismatch { .. } => {
            Response::error(409, err.to_string())
        }
        KvError::Store(err) => {
            warn!(%err, "store error");
            Response::error(500, "the store failed; try again")
        }
    }
}

/// A request's params object, read field by field with a 400 for each kind of mistake.
struct Params<'a> {
    fields: Option<&'a Map<String, Value>>,
}

impl<'a> Params<'a> {
    fn of(request: &'a Request) -> Result<Params<'a>, Response> {
        match &request.params {
            Value::Object(fields) => Ok(Params {
                fields: Some(fields),
            }),
            Value::Null => Ok(Params { fields: None }),
            _ => Err(Response::error(400, "params must be a JSON object")),
        }
    }

    fn get(&self, name: &str) -> Option<&'a Value> {
        self.fields?.get(name).filter(|value| !value.is_null())
    }

    fn string(&self, name: &str) -> Result<Option<&'a str>, Response> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(text)) => Ok(Some(text)),
            Some(_) => Err(Response::error(400, format!("{name} must be a string"))),
        }
    }

    /// A whole number, given as a JSON number or a numeric string (query fields are strings).
    fn number(&self, name: &str) -> Result<Option<i64>, Response> {
        let number = match self.get(name) {
            None => return Ok(None),
            Some(Value::Number(number)) => number.as_i64(),
            Some(Value::String(text)) => text.trim().parse().ok(),
            Some(_) => None,
        };
        number
            .map(Some)
            .ok_or_else(|| Response::error(400, format!("{name} must be a whole number")))
    }

    /// The key in `/kv/{key}`, if the path had one.
    fn path_key(&self) -> Option<&'a str> {
        match self.get("params") {
            Some(Value::String(key)) if !key.is_empty() => Some(key),
            _ => None,
        }
    }

    /// The key from the path, else from a `key` field.
    fn key(&self) -> Result<&'a str, Response> {
        if let Some(key) = self.path_key() {
            return Ok(key);
        }
        match self.string("key")? {
            Some(key) => Ok(key),
            None => Err(Response::error(
                400,
                "missing key: use /kv/{key} or a \"key\" field",
            )),
        }
    }

    /// The value from a `value` field, else a plain text body.
    fn value(&self) -> Result<&'a str, Response> {
        if let Some(value) = self.string("value")? {
            return Ok(value);
        }
        match self.string("body")? {
            Some(value) => Ok(value),
            None => Err(Response::error(
                400,
                "missing value: send {\"value\": \"...\"} or a plain text body",
            )),
        }
    }
}
