//! The REST door: handlers for the routes the gateway sends to `kv`, on shared's service
//! runtime. Each reads its params, calls the core and answers with what the core returned; the
//! core's errors get their statuses in one place, `From<KvError> for ServiceError`.
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

use serde_json::{json, Map, Value};
use shared::service::{with_state, Created, Json, Request, Router, ServiceError};
use tracing::{debug, warn};

use crate::{
    core::{Kv, KvError, Page, DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT},
    store::{Condition, StoreError, StoreFailure},
    READ_SCOPE, WRITE_SCOPE,
};

/// The service's routes; they register as `DELETE/kv`, `GET/kv`, `POST/kv` and `PUT/kv`, reads
/// with the scope `kv:read` and writes with `kv:write`, which the runtime checks against the
/// caller's identity (a request a cluster member makes itself carries none and is trusted).
pub fn router(kv: Kv) -> Router {
    Router::new()
        .route("GET", "/kv", with_state(kv.clone(), get_or_list))
        .scope(READ_SCOPE)
        .route("PUT", "/kv", with_state(kv.clone(), put))
        .scope(WRITE_SCOPE)
        .route("POST", "/kv", with_state(kv.clone(), create))
        .scope(WRITE_SCOPE)
        .route("DELETE", "/kv", with_state(kv, delete))
        .scope(WRITE_SCOPE)
}

/// The status of each core error. Store failures are logged here and answered without their
/// internals.
impl From<KvError> for ServiceError {
    fn from(err: KvError) -> ServiceError {
        match err {
            KvError::InvalidKey(_) | KvError::ValueTooLong(_) | KvError::InvalidLimit(_) => {
                ServiceError::BadRequest(err.to_string())
            }
            KvError::KeyExists(_) | KvError::VersionMismatch { .. } => {
                ServiceError::Conflict(err.to_string())
            }
            // An unavailable store is reported once by the readiness probe, not per request.
            KvError::Store(StoreError::Failed(failure @ StoreFailure::Unavailable(_))) => {
                debug!(err = %failure, "store unavailable");
                (&failure).into()
            }
            KvError::Store(err) => {
                warn!(%err, "store error");
                match &err {
                    StoreError::Failed(failure) => failure.into(),
                    _ => ServiceError::Internal("the store failed; try again".into()),
                }
            }
        }
    }
}

/// `GET /kv/{key}` reads a key; `GET /kv` lists them.
async fn get_or_list(kv: Kv, request: Request) -> Result<Json<Value>, ServiceError> {
    let params = KvParams::of(&request)?;
    let Some(key) = params.path_key() else {
        return Ok(Json(json!(list(&kv, &params).await?)));
    };
    let found = kv.get(key).await?.ok_or_else(|| not_found(key))?;
    Ok(Json(json!({
        "key": key,
        "value": found.value,
        "version": found.version,
    })))
}

async fn list(kv: &Kv, params: &KvParams<'_>) -> Result<Page, ServiceError> {
    let prefix = params.string("prefix")?.unwrap_or("");
    let after = params.string("after")?.filter(|after| !after.is_empty());
    let limit = params.number("limit")?.unwrap_or(DEFAULT_LIST_LIMIT as i64);
    let limit = usize::try_from(limit).map_err(|_| {
        ServiceError::BadRequest(format!(
            "limit must be between 1 and {MAX_LIST_LIMIT} (got {limit})"
        ))
    })?;
    Ok(kv.list(prefix, after, limit).await?)
}
async fn put(kv: Kv, request: Request) -> Result<Json<Value>, ServiceError> {
    let params = KvParams::of(&request)?;
    let condition = match params.number("if_version")? {
        Some(version) => Condition::IfVersion(version),
        None => Condition::Always,
    };
    let written = write(&kv, params.key()?, params.value()?, condition).await?;
    Ok(Json(written))
}

async fn create(kv: Kv, request: Request) -> Result<Created<Value>, ServiceError> {
    let params = KvParams::of(&request)?;
    let written = write(&kv, params.key()?, params.value()?, Condition::IfAbsent).await?;
    Ok(Created(written))
}

/// Writes `value` under `key` and says what is stored now.
async fn write(
    kv: &Kv,
    key: &str,
    value: &str,
    condition: Condition,
) -> Result<Value, ServiceError> {
    let version = kv.put(key, value.to_owned(), condition).await?;
    Ok(json!({ "key": key, "value": value, "version": version }))
}

async fn delete(kv: Kv, request: Request) -> Result<Json<Value>, ServiceError> {
    let params = KvParams::of(&request)?;
    let key = params.key()?;
    if !kv.delete(key).await? {
        return Err(not_found(key));
    }
    Ok(Json(json!({ "key": key, "deleted": true })))
}

fn not_found(key: &str) -> ServiceError {
    ServiceError::NotFound(format!("no such key: {key}"))
}

/// A request's params object, read field by field with a 400 for each kind of mistake.
struct KvParams<'a> {
    fields: Option<&'a Map<String, Value>>,
}

impl<'a> KvParams<'a> {
    fn of(request: &'a Request) -> Result<KvParams<'a>, ServiceError> {
        match &request.params {
            Value::Object(fields) => Ok(KvParams {
                fields: Some(fields),
            }),
            Value::Null => Ok(KvParams { fields: None }),
            _ => Err(ServiceError::BadRequest(
                "params must be a JSON object".into(),
            )),
        }
    }

    fn get(&self, name: &str) -> Option<&'a Value> {
        self.fields?.get(name).filter(|value| !value.is_null())
    }

    fn string(&self, name: &str) -> Result<Option<&'a str>, ServiceError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(text)) => Ok(Some(text)),
            Some(_) => Err(ServiceError::BadRequest(format!("{name} must be a string"))),
        }
    }

    /// A whole number, given as a JSON number or a numeric string (query fields are strings).
    fn number(&self, name: &str) -> Result<Option<i64>, ServiceError> {
        let number = match self.get(name) {
            None => return Ok(None),
            Some(Value::Number(number)) => number.as_i64(),
            Some(Value::String(text)) => text.trim().parse().ok(),
            Some(_) => None,
        };
        number
            .map(Some)
            .ok_or_else(|| ServiceError::BadRequest(format!("{name} must be a whole number")))
    }

    /// The key in `/kv/{key}`, if the path had one.
    fn path_key(&self) -> Option<&'a str> {
        match self.get("params") {
            Some(Value::String(key)) if !key.is_empty() => Some(key),
            _ => None,
        }
    }

    /// The key from the path, else from a `key` field.
    fn key(&self) -> Result<&'a str, ServiceError> {
        if let Some(key) = self.path_key() {
            return Ok(key);
        }
        match self.string("key")? {
            Some(key) => Ok(key),
            None => Err(ServiceError::BadRequest(
                "missing key: use /kv/{key} or a \"key\" field".into(),
            )),
        }
    }

    /// The value from a `value` field, else a plain text body.
    fn value(&self) -> Result<&'a str, ServiceError> {
        if let Some(value) = self.string("value")? {
            return Ok(value);
        }
        match self.string("body")? {
            Some(value) => Ok(value),
            None => Err(ServiceError::BadRequest(
                "missing value: send {\"value\": \"...\"} or a plain text body".into(),
            )),
        }
    }
}
