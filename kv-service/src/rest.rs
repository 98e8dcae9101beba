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
//! | `PUT /kv/{key}?ttl=`| 200 `{key,value,version,revision,expires_at}`; 409 on `if_version`|
//! | `POST /kv?ttl=`     | 201 `{key,value,version,revision,expires_at}`; 409 when it exists |
//! | `GET /kv/{key}`     | 200 `{key,value,version,revision,expires_at}`; 404                |
//! | `DELETE /kv/{key}`  | 200 `{key,deleted:true,revision}`; 404                            |
//! | `GET /kv?prefix=&after=&limit=` | 200 `{items:[...],next,revision}`                     |
//! | `GET /kv/{key}?watch=1`, `GET /kv?prefix=&watch=1` | events `put`, `delete`, `expire`   |
//! | `POST /txn`         | 200 `{succeeded,revision,results}`; 400 naming the bad element    |
//!
//! `GET /kv` is a stream route that answers once unless `watch` is set (the runtime sends the
//! answer of a stream that never opened as a one-shot answer).
//!
//! Reads and watches need the scope `kv:read`, writes and transactions `kv:write` (`admin`
//! implies both); a caller without it is answered 403 by the runtime before any handler runs.

use std::{
    future::Future,
    time::{Duration, UNIX_EPOCH},
};

use futures::FutureExt;
use serde_json::{json, Map, Value};
use shared::service::{with_state, Created, Event, EventSink, Json, Request, Router, ServiceError};
use tracing::{debug, warn};

use crate::{
    core::{Kv, KvError, Page, Written, DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT},
    store::{
        Compare, Condition, Item, KeyFilter, Op, OpResult, StoreError, StoreFailure, Test, Txn,
        TxnOutcome, Versioned,
    },
    watch::WatchEvent,
    READ_SCOPE, WRITE_SCOPE,
};

/// The default of `--watch-max-lag`: a watcher that falls this many revisions further behind
/// the newest one than it has been since it started is ended with a `lagged` event. What it is
/// sent waits in bounded queues, and one that cannot keep up resumes from its last revision
/// rather than holding an ever longer backlog.
pub const MAX_WATCH_LAG: u64 = 10_000;

/// The service's routes with the default [`MAX_WATCH_LAG`] ([`router_with_max_lag`]).
pub fn router(kv: Kv) -> Router {
    router_with_max_lag(kv, MAX_WATCH_LAG)
}

/// The service's routes; they register as `DELETE/kv`, `GET/kv`, `POST/kv`, `PUT/kv` and
/// `POST/txn`, reads with the scope `kv:read` and writes with `kv:write`, which the runtime
/// checks against the caller's identity (a request a cluster member makes itself carries none
/// and is trusted). Watchers that fall `max_lag` revisions behind are ended as lagged.
pub fn router_with_max_lag(kv: Kv, max_lag: u64) -> Router {
    let watching = kv.clone();
    let max_lag = i64::try_from(max_lag).unwrap_or(i64::MAX);
    Router::new()
        .stream("GET", "/kv", move |request, sink| {
            get_or_watch(watching.clone(), request, sink, max_lag)
        })
        .scope(READ_SCOPE)
        .route("PUT", "/kv", with_state(kv.clone(), put))
        .scope(WRITE_SCOPE)
        .route("POST", "/kv", with_state(kv.clone(), create))
        .scope(WRITE_SCOPE)
        .route("DELETE", "/kv", with_state(kv.clone(), delete))
        .scope(WRITE_SCOPE)
        .route("POST", "/txn", with_state(kv, txn))
        .scope(WRITE_SCOPE)
}

/// The status of each core error. Store failures are logged here and answered without their
/// internals.
impl From<KvError> for ServiceError {
    fn from(err: KvError) -> ServiceError {
        match err {
            KvError::InvalidKey(_)
            | KvError::ValueTooLong(_)
            | KvError::InvalidLimit(_)
            | KvError::InvalidTxn(_) => ServiceError::BadRequest(err.to_string()),
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

/// `GET /kv...?watch=1` watches; any other `GET /kv` answers once. The request is checked
/// here, so the future that lives as long as a watch holds only what the watch needs.
fn get_or_watch(
    kv: Kv,
    request: Request,
    sink: EventSink,
    max_lag: i64,
) -> impl Future<Output = Result<Json<Value>, ServiceError>> {
    match watch_request(&request) {
        Ok(Some((filter, from))) => watch(kv, filter, from, sink, max_lag)
            .left_future()
            .left_future(),
        Ok(None) => async move { get_or_list(kv, request).await }
            .right_future()
            .left_future(),
        Err(refusal) => std::future::ready(Err(refusal)).right_future(),
    }
}

/// What a watch request asks for: its keys and where to resume (`None`: not a watch).
fn watch_request(request: &Request) -> Result<Option<(KeyFilter, Option<i64>)>, ServiceError> {
    let params = KvParams::of(request)?;
    if !params.flag("watch")? {
        return Ok(None);
    }
    let filter = match params.path_key() {
        Some(key) => KeyFilter::Key(key.to_owned()),
        None => KeyFilter::Prefix(params.string("prefix")?.unwrap_or("").to_owned()),
    };
    // `from_revision` as asked; else the `Last-Event-ID` an EventSource resends by itself.
    let from = match params.number("from_revision")? {
        Some(from) => Some(from),
        None => params.number("last_event_id")?,
    };
    if from.is_some_and(|from| from < 0) {
        return Err(ServiceError::BadRequest(
            "from_revision must be 0 or more".into(),
        ));
    }
    Ok(Some((filter, from)))
}

/// Streams the changes `filter` matches until the caller goes away or falls too far behind:
/// `max_lag` revisions further behind the newest one than the closest it has been. A watcher
/// resuming from far back starts behind and catches up at its own pace; only falling further
/// behind ends it (measured from where it started, it would be ended again at once on every
/// resume, never getting anywhere).
async fn watch(
    kv: Kv,
    filter: KeyFilter,
    from: Option<i64>,
    sink: EventSink,
    max_lag: i64,
) -> Result<Json<Value>, ServiceError> {
    let mut watcher = kv.watch(filter, from).await?;
    // Accepted: tell the caller now (the gateway then sends its HTTP headers).
    if sink.open().await.is_err() {
        return Ok(Json(Value::Null));
    }
    let mut closest = watcher.lag();
    loop {
        let lag = watcher.lag();
        closest = closest.min(lag);
        if lag - closest > max_lag {
            let revision = watcher.cursor();
            let lagged = Event {
                id: None,
                event: Some("lagged".into()),
                data: json!({ "revision": revision }),
            };
            let _ = sink.send(lagged).await;
            return Ok(Json(json!({ "ended": "lagged", "revision": revision })));
        }
        for event in watcher.next().await? {
            if sink.send(watch_event(event)).await.is_err() {
                return Ok(Json(Value::Null));
            }
        }
    }
}

fn watch_event(event: WatchEvent) -> Event {
    match event {
        WatchEvent::Change(change) => {
            let mut data = json!({
                "key": change.key,
                "version": change.version,
                "revision": change.revision,
            });
            if let Some(value) = change.value {
                data["value"] = Value::String(value);
            }
            Event {
                id: Some(json!(change.revision)),
                event: Some(change.kind.name().into()),
                data,
            }
        }
        // No id: a browser keeps its Last-Event-ID until the next change brings one.
        WatchEvent::Reset {
            oldest_revision,
            current_revision,
        } => Event {
            id: None,
            event: Some("reset".into()),
            data: json!({
                "oldest_revision": oldest_revision,
                "current_revision": current_revision,
            }),
        },
    }
}

/// `GET /kv/{key}` reads a key; `GET /kv` lists them.
async fn get_or_list(kv: Kv, request: Request) -> Result<Json<Value>, ServiceError> {
    let params = KvParams::of(&request)?;
    let Some(key) = params.path_key() else {
        return Ok(Json(page_json(list(&kv, &params).await?)));
    };
    let found = kv.get(key).await?.ok_or_else(|| not_found(key))?;
    Ok(Json(versioned_json(key, &found)))
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
    let written = write(&kv, &params, condition).await?;
    Ok(Json(written))
}

async fn create(kv: Kv, request: Request) -> Result<Created<Value>, ServiceError> {
    let params = KvParams::of(&request)?;
    let written = write(&kv, &params, Condition::IfAbsent).await?;
    Ok(Created(written))
}

/// Writes the request's value under its key and says what is stored now.
async fn write(
    kv: &Kv,
    params: &KvParams<'_>,
    condition: Condition,
) -> Result<Value, ServiceError> {
    let (key, value) = (params.key()?, params.value()?);
    let ttl = params.ttl("ttl")?;
    let Written {
        version,
        revision,
        expires_at,
    } = kv.put(key, value.to_owned(), condition, ttl).await?;
    Ok(json!({
        "key": key,
        "value": value,
        "version": version,
        "revision": revision,
        "expires_at": expires_at.map(rfc3339),
    }))
}

async fn delete(kv: Kv, request: Request) -> Result<Json<Value>, ServiceError> {
    let params = KvParams::of(&request)?;
    let key = params.key()?;
    let revision = kv.delete(key).await?.ok_or_else(|| not_found(key))?;
    Ok(Json(
        json!({ "key": key, "deleted": true, "revision": revision }),
    ))
}

async fn txn(kv: Kv, request: Request) -> Result<Json<Value>, ServiceError> {
    let params = KvParams::of(&request)?;
    let txn = parse_txn(&params)?;
    Ok(Json(txn_json(kv.txn(txn).await?)))
}

fn not_found(key: &str) -> ServiceError {
    ServiceError::NotFound(format!("no such key: {key}"))
}

/// An expiry time (ms since the epoch) as RFC 3339, to the millisecond.
fn rfc3339(expires_at: i64) -> String {
    let since = Duration::from_millis(u64::try_from(expires_at).unwrap_or(0));
    humantime::format_rfc3339_millis(UNIX_EPOCH + since).to_string()
}

fn versioned_json(key: &str, found: &Versioned) -> Value {
    json!({
        "key": key,
        "value": found.value,
        "version": found.version,
        "revision": found.revision,
        "expires_at": found.expires_at.map(rfc3339),
    })
}

fn item_json(item: Item) -> Value {
    json!({
        "key": item.key,
        "value": item.value,
        "version": item.version,
        "revision": item.revision,
        "expires_at": item.expires_at.map(rfc3339),
    })
}

fn page_json(page: Page) -> Value {
    json!({
        "items": page.items.into_iter().map(item_json).collect::<Vec<_>>(),
        "next": page.next,
        "revision": page.revision,
    })
}

fn txn_json(outcome: TxnOutcome) -> Value {
    let results: Vec<Value> = outcome
        .results
        .into_iter()
        .map(|result| match result {
            OpResult::Put {
                key,
                version,
                revision,
                expires_at,
            } => json!({"put": {
                "key": key,
                "version": version,
                "revision": revision,
                "expires_at": expires_at.map(rfc3339),
            }}),
            OpResult::Delete { key, deleted } => {
                json!({"delete": {"key": key, "deleted": deleted}})
            }
            OpResult::Get {
                key,
                found: Some(found),
            } => json!({ "get": versioned_json(&key, &found) }),
            OpResult::Get { key, found: None } => json!({"get": {"key": key, "found": false}}),
        })
        .collect();
    json!({
        "succeeded": outcome.succeeded,
        "revision": outcome.revision,
        "results": results,
    })
}

/// Reads a transaction body, naming the element at fault in every refusal
/// (`success[1].put.value must be a string`).
fn parse_txn(params: &KvParams<'_>) -> Result<Txn, ServiceError> {
    let compare = array(params.get("compare"), "compare")?
        .iter()
        .enumerate()
        .map(|(i, element)| parse_compare(element, &format!("compare[{i}]")))
        .collect::<Result<_, _>>()?;
    let ops = |branch: &str| -> Result<Vec<Op>, ServiceError> {
        array(params.get(branch), branch)?
            .iter()
            .enumerate()
            .map(|(i, element)| parse_op(element, &format!("{branch}[{i}]")))
            .collect()
    };
    Ok(Txn {
        compare,
        success: ops("success")?,
        failure: ops("failure")?,
    })
}

fn bad(message: String) -> ServiceError {
    ServiceError::BadRequest(message)
}

/// An optional array field: absent means empty.
fn array<'v>(value: Option<&'v Value>, name: &str) -> Result<&'v [Value], ServiceError> {
    match value {
        None => Ok(&[]),
        Some(Value::Array(elements)) => Ok(elements),
        Some(_) => Err(bad(format!("{name} must be an array"))),
    }
}

/// An object's fields, refusing any not in `allowed`.
fn fields<'v>(
    value: &'v Value,
    at: &str,
    allowed: &[&str],
) -> Result<&'v Map<String, Value>, ServiceError> {
    let Value::Object(fields) = value else {
        return Err(bad(format!("{at} must be an object")));
    };
    if let Some(unknown) = fields.keys().find(|name| !allowed.contains(&name.as_str())) {
        return Err(bad(format!(
            "{at} has an unknown field {unknown:?} (expected {})",
            allowed.join(", ")
        )));
    }
    Ok(fields)
}

fn string_field(fields: &Map<String, Value>, at: &str, name: &str) -> Result<String, ServiceError> {
    match fields.get(name) {
        Some(Value::String(text)) => Ok(text.clone()),
        Some(_) => Err(bad(format!("{at}.{name} must be a string"))),
        None => Err(bad(format!("{at}.{name} is missing"))),
    }
}

fn parse_compare(element: &Value, at: &str) -> Result<Compare, ServiceError> {
    let fields = fields(element, at, &["key", "version", "exists", "value"])?;
    let key = string_field(fields, at, "key")?;
    let tests: Vec<&str> = ["version", "exists", "value"]
        .into_iter()
        .filter(|name| fields.contains_key(*name))
        .collect();
    let test = match tests.as_slice() {
        ["version"] => match fields["version"].as_i64() {
            Some(version) => Test::Version(version),
            None => return Err(bad(format!("{at}.version must be a whole number"))),
        },
        ["exists"] => match fields["exists"].as_bool() {
            Some(exists) => Test::Exists(exists),
            None => return Err(bad(format!("{at}.exists must be true or false"))),
        },
        ["value"] => Test::Value(string_field(fields, at, "value")?),
        _ => {
            return Err(bad(format!(
                "{at} needs exactly one of \"version\", \"exists\" or \"value\""
            )))
        }
    };
    Ok(Compare { key, test })
}

fn parse_op(element: &Value, at: &str) -> Result<Op, ServiceError> {
    let ops = fields(element, at, &["put", "delete", "get"])?;
    let mut named = ops.iter();
    let (Some((name, body)), None) = (named.next(), named.next()) else {
        return Err(bad(format!(
            "{at} needs exactly one of \"put\", \"delete\" or \"get\""
        )));
    };
    let at = format!("{at}.{name}");
    Ok(match name.as_str() {
        "put" => {
            let fields = fields(body, &at, &["key", "value", "ttl"])?;
            let ttl = match fields.get("ttl") {
                None | Some(Value::Null) => None,
                Some(Value::String(text)) => Some(parse_ttl(text, &format!("{at}.ttl"))?),
                Some(_) => return Err(bad(format!("{at}.ttl must be a string such as \"10s\""))),
            };
            Op::Put {
                key: string_field(fields, &at, "key")?,
                value: string_field(fields, &at, "value")?,
                expires_at: ttl.map(crate::store::expiry_after),
            }
        }
        "delete" => Op::Delete {
            key: string_field(fields(body, &at, &["key"])?, &at, "key")?,
        },
        _ => Op::Get {
            key: string_field(fields(body, &at, &["key"])?, &at, "key")?,
        },
    })
}

/// A time to live as people write it (`500ms`, `30s`, `10m`, `1h`, `1h 30m`), more than zero.
fn parse_ttl(text: &str, name: &str) -> Result<Duration, ServiceError> {
    match humantime::parse_duration(text.trim()) {
        Ok(ttl) if ttl >= Duration::from_millis(1) => Ok(ttl),
        Ok(_) => Err(bad(format!("{name} must be at least 1ms (got {text:?})"))),
        Err(_) => Err(bad(format!(
            "{name} must be a duration such as 500ms, 30s, 10m or 1h (got {text:?})"
        ))),
    }
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

    /// A switch such as `watch=1`: absent, `0`, `false` or empty is off; `1`, `true` or
    /// `yes` is on.
    fn flag(&self, name: &str) -> Result<bool, ServiceError> {
        match self.get(name) {
            None => Ok(false),
            Some(Value::Bool(on)) => Ok(*on),
            Some(Value::Number(number)) => Ok(number.as_i64() != Some(0)),
            Some(Value::String(text)) => match text.trim() {
                "" | "0" | "false" | "no" => Ok(false),
                "1" | "true" | "yes" => Ok(true),
                _ => Err(bad(format!("{name} must be 1 or 0 (got {text:?})"))),
            },
            Some(_) => Err(bad(format!("{name} must be 1 or 0"))),
        }
    }

    /// A time to live ([`parse_ttl`]).
    fn ttl(&self, name: &str) -> Result<Option<Duration>, ServiceError> {
        self.string(name)?
            .map(|text| parse_ttl(text, name))
            .transpose()
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
