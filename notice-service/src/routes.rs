//! The packet routes: parsing and checking each request's params, calling the service, and
//! turning the outcome into the statuses the API promises. docs/HTTP.md describes
//! them from the client's side.
//!
//! Through the gateway, query-string values arrive as strings, so numeric params accept both
//! `5` and `"5"`; an empty query value (`?topic=`) counts as absent.
//!
//! Who the caller is comes from `request.auth`, which only the gateway sets (from a verified
//! token, or the scopes it grants anonymous callers) on a link the cluster secret
//! authenticates. The runtime checks each route's scope; the routes add what depends on the
//! caller: a verified subject subscribes under its own name, sees only its own whispers, and
//! is recorded as the `from` of what it publishes. A request without `auth` comes from a
//! cluster member calling directly and is trusted like `notice:admin`.

use std::future::Future;

use chrono::{DateTime, Utc};
use futures::FutureExt;
use serde::Deserialize;
use serde_json::{json, Value};
use shared::service::{
    with_state, Accepted, Created, Event, EventSink, IntoAnswer, Json, Request, Response, Router,
    ServiceError,
};
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::{
    feed::FeedEnd,
    hub::{Membership, NameClaim, SubscribeError},
    notice::{format_time, validate_label, Interest, NewNotice, Whispers, MAX_TOPICS},
    service::{JoinError, NoticeService, Published},
    store::{NoticeQuery, Selector, StoreError, StoreFailure},
};

/// Publishing a notice (`POST /notices`).
pub const PUBLISH_SCOPE: &str = "notice:publish";
/// Listing notices and subscribing to them (`GET /notices`, `GET /notices/stream`).
pub const SUBSCRIBE_SCOPE: &str = "notice:subscribe";
/// Presence and kick, subscribing under any name, and reading every whisper.
pub const NOTICE_ADMIN_SCOPE: &str = "notice:admin";

/// The default and largest page of `GET /notices`.
const DEFAULT_LIMIT: u32 = 100;
const MAX_LIMIT: u32 = 1000;

/// `streams` tracks the running subscriptions, so shutdown can wait for their final events.
pub fn router(service: NoticeService, streams: TaskTracker) -> Router {
    let stream = service.clone();
    Router::new()
        .route(
            "POST",
            "/notices",
            with_state(service.clone(), publish_notice),
        )
        .scope(PUBLISH_SCOPE)
        .route("GET", "/notices", with_state(service.clone(), list_notices))
        .scope(SUBSCRIBE_SCOPE)
        .stream("GET", "/notices/stream", move |request, sink| {
            streams.track_future(stream_notices(stream.clone(), request, sink))
        })
        .scope(SUBSCRIBE_SCOPE)
        .route(
            "GET",
            "/notices/subscribers",
            with_state(service.clone(), list_subscribers),
        )
        .scope(NOTICE_ADMIN_SCOPE)
        .route(
            "DELETE",
            "/notices/subscribers",
            with_state(service.clone(), kick_subscribers),
        )
        .scope(NOTICE_ADMIN_SCOPE)
        // `notice:admin`, or a subject renaming itself: the handler decides.
        .route(
            "POST",
            "/notices/subscribers",
            with_state(service, rename_subscribers),
        )
        .scope(SUBSCRIBE_SCOPE)
}

/// A full store refuses for now; any other failure stays in the logs, and the caller learns
/// only that the store failed.
impl From<StoreError> for ServiceError {
    fn from(err: StoreError) -> ServiceError {
        match err {
            StoreError::Full(reason) => ServiceError::Unavailable(reason),
            // An unavailable store is reported once by the readiness probe, not per request.
            StoreError::Failed(failure @ StoreFailure::Unavailable(_)) => {
                debug!(err = %failure, "notice store unavailable");
                (&failure).into()
            }
            StoreError::Failed(failure) => {
                warn!(err = %failure, "notice store failed");
                (&failure).into()
            }
            err => {
                warn!(%err, "notice store failed");
                ServiceError::Internal("the notice store is unavailable, try again later".into())
            }
        }
    }
}

impl From<SubscribeError> for ServiceError {
    fn from(err: SubscribeError) -> ServiceError {
        match err {
            SubscribeError::Full(_) | SubscribeError::ShuttingDown => {
                ServiceError::Unavailable(err.to_string())
            }
            SubscribeError::NameTaken(_) => ServiceError::Conflict(err.to_string()),
        }
    }
}

impl From<JoinError> for ServiceError {
    fn from(err: JoinError) -> ServiceError {
        match err {
            JoinError::Refused(refused) => refused.into(),
            JoinError::Store(failed) => failed.into(),
        }
    }
}

/// True for a caller that may act for anyone: a cluster member calling directly (no `auth`),
/// or a verified caller holding `notice:admin` (which `admin` implies).
fn is_admin(request: &Request) -> bool {
    request.allows(NOTICE_ADMIN_SCOPE)
}

/// The whispers the caller may read: every one for an admin, its own for a verified subject,
/// none for an anonymous caller.
fn readable_whispers(request: &Request) -> Whispers {
    if is_admin(request) {
        Whispers::All
    } else {
        Whispers::To(request.subject().map(str::to_string))
    }
}

/// A route registered as `METHOD/notices` also receives `METHOD /notices/anything` (the
/// gateway's prefix routing); those paths do not exist.
fn no_extra_path(request: &Request) -> Result<(), ServiceError> {
    match request.path_param() {
        Some(rest) if !rest.is_empty() => Err(ServiceError::NotFound(format!(
            "no such resource: {}/{rest}",
            request.uri
        ))),
        _ => Ok(()),
    }
}

fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.is_empty())
}

/// A non-negative integer param given as a number or a numeric string.
fn integer_param(field: &str, value: Option<&Value>) -> Result<Option<i64>, ServiceError> {
    let parsed = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) if s.is_empty() => return Ok(None),
        Some(Value::String(s)) => s.trim().parse::<i64>().ok(),
        Some(Value::Number(n)) => n.as_i64(),
        Some(_) => None,
    };
    match parsed {
        Some(n) if n >= 0 => Ok(Some(n)),
        _ => Err(ServiceError::BadRequest(format!(
            "{field} must be a non-negative integer"
        ))),
    }
}

#[derive(Deserialize)]
struct PublishParams {
    message: Option<String>,
    topic: Option<String>,
    to: Option<String>,
    at: Option<String>,
    /// Set by the gateway when the body was not JSON.
    body: Option<Value>,
    /// Only read to refuse it: the sender is the verified caller, never what a client claims.
    from: Option<Value>,
}

/// 201 with the stored notice, or 202 with the time a scheduled one will be published.
impl IntoAnswer for Published {
    fn into_answer(self) -> Response {
        match self {
            Published::Stored(notice) => Created(notice).into_answer(),
            Published::Scheduled(at) => {
                Accepted(json!({"scheduled": true, "at": format_time(&at)})).into_answer()
            }
        }
    }
}

async fn publish_notice(
    service: NoticeService,
    request: Request,
) -> Result<Published, ServiceError> {
    no_extra_path(&request)?;
    let params: PublishParams = request.params_as()?;
    if params.message.is_none() && params.body.is_some() {
        return Err(ServiceError::BadRequest(
            "message is required: send a JSON body like {\"message\": \"hello\"}".into(),
        ));
    }
    if params.from.is_some() {
        return Err(ServiceError::BadRequest(
            "from cannot be set: it is the subject of the publisher's token".into(),
        ));
    }
    let notice = NewNotice::new(params.message, params.topic, params.to)
        .map_err(ServiceError::BadRequest)?
        .sent_by(request.subject().map(str::to_string));
    let at = match non_empty(params.at) {
        None => None,
        Some(at) => Some(
            DateTime::parse_from_rfc3339(&at)
                .map_err(|err| {
                    ServiceError::BadRequest(format!(
                        "at must be an RFC 3339 time like 2030-01-01T12:00:00Z ({err})"
                    ))
                })?
                .with_timezone(&Utc),
        ),
    };
    Ok(service.publish(notice, at).await?)
}

#[derive(Deserialize)]
struct ListParams {
    topic: Option<String>,
    after: Option<Value>,
    limit: Option<Value>,
}

async fn list_notices(
    service: NoticeService,
    request: Request,
) -> Result<Json<Value>, ServiceError> {
    let items = service.list(&list_query(&request)?).await?;
    Ok(Json(json!({ "items": items })))
}

fn list_query(request: &Request) -> Result<NoticeQuery, ServiceError> {
    no_extra_path(request)?;
    let params: ListParams = request.params_as()?;
    let after = integer_param("after", params.after.as_ref())?.unwrap_or(0);
    let limit = match integer_param("limit", params.limit.as_ref())? {
        None => DEFAULT_LIMIT,
        Some(limit) if (1..=i64::from(MAX_LIMIT)).contains(&limit) => limit as u32,
        Some(_) => {
            return Err(ServiceError::BadRequest(format!(
                "limit must be between 1 and {MAX_LIMIT}"
            )))
        }
    };
    let selector = match non_empty(params.topic) {
        Some(topic) => Selector::Topic(topic),
        None => Selector::All,
    };
    Ok(NoticeQuery {
        after,
        limit,
        selector,
        whispers: readable_whispers(request),
    })
}

#[derive(Deserialize)]
struct StreamParams {
    topics: Option<Value>,
    name: Option<String>,
    after: Option<Value>,
    /// The gateway passes the `Last-Event-ID` header here.
    last_event_id: Option<Value>,
    /// `1`/`true`: also receive `join` and `leave` events for the subscription's topics.
    presence: Option<Value>,
    /// What a browser tab sends to share a name chosen without a token with its other tabs.
    client: Option<String>,
}

/// What a subscription asks for: what it receives, how it takes part in presence, and from
/// which id to replay (`None`: live notices only).
#[derive(Debug)]
struct Subscribing {
    interest: Interest,
    membership: Membership,
    after: Option<i64>,
}

fn subscription(request: &Request) -> Result<Subscribing, ServiceError> {
    let params: StreamParams = request.params_as()?;
    let topics: Vec<String> = match &params.topics {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(list)) => list.split(',').map(|t| t.trim().to_string()).collect(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| item.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| ServiceError::BadRequest("topics must be strings".into()))?,
        Some(_) => {
            return Err(ServiceError::BadRequest(
                "topics must be a comma-separated string or a list of strings".into(),
            ))
        }
    };
    let mut topics: Vec<String> = topics.into_iter().filter(|t| !t.is_empty()).collect();
    topics.sort();
    topics.dedup();
    if topics.len() > MAX_TOPICS {
        return Err(ServiceError::BadRequest(format!(
            "at most {MAX_TOPICS} topics per subscription"
        )));
    }
    for topic in &topics {
        validate_label("topic", topic).map_err(ServiceError::BadRequest)?;
    }
    let name = non_empty(params.name);
    if let Some(name) = &name {
        validate_label("name", name).map_err(ServiceError::BadRequest)?;
    }
    let name = subscriber_name(request, name)?;
    // A reconnecting EventSource sends Last-Event-ID with its original URL: the header wins.
    let after = match integer_param("last_event_id", params.last_event_id.as_ref())? {
        Some(last) => Some(last),
        None => integer_param("after", params.after.as_ref())?,
    };
    let presence = flag_param("presence", params.presence.as_ref())?;
    let client = non_empty(params.client);
    if let Some(client) = &client {
        validate_label("client", client).map_err(ServiceError::BadRequest)?;
    }
    // A name taken through the gateway without a token is one the caller chose: unique to its
    // client. A token's subject is entitled to its name, and so is a cluster member calling
    // directly (no `auth`), which the authenticated link vouches for.
    let claim = match (&name, &request.auth) {
        (Some(_), Some(auth)) if auth.sub.is_none() => NameClaim::Chosen { client },
        _ => NameClaim::Entitled,
    };
    Ok(Subscribing {
        interest: Interest { name, topics },
        membership: Membership { presence, claim },
        after,
    })
}

/// A yes/no param: `1`/`true`/`yes` or `0`/`false`/`no` (absent or empty: no).
fn flag_param(field: &str, value: Option<&Value>) -> Result<bool, ServiceError> {
    match value {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(flag)) => Ok(*flag),
        Some(Value::Number(n)) if n.as_u64() == Some(0) => Ok(false),
        Some(Value::Number(n)) if n.as_u64() == Some(1) => Ok(true),
        Some(Value::String(text)) => match text.as_str() {
            "" | "0" | "false" | "no" => Ok(false),
            "1" | "true" | "yes" => Ok(true),
            _ => Err(ServiceError::BadRequest(format!(
                "{field} must be 1 or 0 (or true/false)"
            ))),
        },
        Some(_) => Err(ServiceError::BadRequest(format!(
            "{field} must be 1 or 0 (or true/false)"
        ))),
    }
}

/// The name a subscription gets, which decides whose whispers it receives. A verified subject
/// subscribes as itself; only an admin may take another name (to watch a user's whispers, or
/// for a service subscribing on someone's behalf). Callers without a subject (cluster members,
/// anonymous callers the gateway granted `notice:subscribe`) name themselves freely.
fn subscriber_name(
    request: &Request,
    asked: Option<String>,
) -> Result<Option<String>, ServiceError> {
    let Some(subject) = request.subject() else {
        // A verified caller without a subject (anonymous, granted scopes by the gateway) has no
        // name of its own: taking someone else's would hand it their whispers.
        return match asked {
            Some(name) if request.auth.is_some() && !is_admin(request) => Err(ServiceError::Forbidden(
                format!(
                    "name {name:?} is not yours: an anonymous caller cannot take a name;                      that needs a token for it, or the scope {NOTICE_ADMIN_SCOPE:?}"
                ),
            )),
            asked => Ok(asked),
        };
    };
    match asked {
        None => Ok(Some(subject.to_string())),
        Some(name) if name == subject || is_admin(request) => Ok(Some(name)),
        Some(name) => Err(ServiceError::Forbidden(format!(
            "name {name:?} is not yours: a subscription takes the name of its token's \
                 subject ({subject:?}); another name needs the scope {NOTICE_ADMIN_SCOPE:?}"
        ))),
    }
}

/// Checks the request now, so that the future that lives as long as the subscription holds
/// only what the subscription needs, not the request.
fn stream_notices(
    service: NoticeService,
    request: Request,
    sink: EventSink,
) -> impl Future<Output = Result<Json<Value>, ServiceError>> {
    match no_extra_path(&request).and_then(|()| subscription(&request)) {
        Ok(subscribing) => send_notices(service, subscribing, sink).left_future(),
        Err(refusal) => std::future::ready(Err(refusal)).right_future(),
    }
}

async fn send_notices(
    service: NoticeService,
    Subscribing {
        interest,
        membership,
        after,
    }: Subscribing,
    sink: EventSink,
) -> Result<Json<Value>, ServiceError> {
    let (after, reset) = service.resume_start(after).await?;
    let mut feed = service.subscribe(interest, membership, after).await?;
    feed.go_direct_when_caught_up(sink.address());
    // Accepted: tell the caller now (the gateway then sends its HTTP headers), not only when
    // the first notice comes.
    if sink.open().await.is_err() {
        return Ok(Json(Value::Null));
    }
    if let Some(reset) = reset {
        // No id: a browser keeps its Last-Event-ID until the replay's first notice brings one.
        let event = Event {
            id: None,
            event: Some("reset".into()),
            data: json!(reset),
        };
        if sink.send(event).await.is_err() {
            return Ok(Json(Value::Null));
        }
    }
    loop {
        match feed.next().await {
            Ok(live) => {
                if sink.send(live.event()).await.is_err() {
                    // The caller is gone; dropping the feed frees the subscription.
                    return Ok(Json(Value::Null));
                }
            }
            Err(FeedEnd::Ended(reason)) => {
                let name = reason.event_name();
                let event = Event {
                    id: None,
                    event: Some(name.into()),
                    data: json!({"reason": name, "last_event_id": feed.last_sent()}),
                };
                drop(feed);
                let _ = sink.send(event).await;
                return Ok(Json(json!({ "ended": name })));
            }
            Err(FeedEnd::Store(err)) => return Err(err.into()),
        }
    }
}

async fn list_subscribers(
    service: NoticeService,
    request: Request,
) -> Result<Json<Value>, ServiceError> {
    no_extra_path(&request)?;
    let topic = non_empty(
        request
            .params
            .get("topic")
            .and_then(Value::as_str)
            .map(str::to_string),
    );
    let items = service.presence(topic.as_deref()).await?;
    Ok(Json(json!({ "items": items })))
}

#[derive(Deserialize)]
struct RenameParams {
    to: Option<String>,
}

/// `POST /notices/subscribers/{name}/rename` `{"to":"newname"}`.
async fn rename_subscribers(
    service: NoticeService,
    request: Request,
) -> Result<Json<Value>, ServiceError> {
    let from = request
        .path_param()
        .and_then(|rest| rest.strip_suffix("/rename"))
        .filter(|name| !name.is_empty() && !name.contains('/'))
        .ok_or_else(|| {
            ServiceError::NotFound(
                "no such resource: rename is POST /notices/subscribers/{name}/rename".into(),
            )
        })?;
    if !(is_admin(&request) || request.subject() == Some(from)) {
        return Err(ServiceError::Forbidden(format!(
            "renaming {from:?} needs the scope {NOTICE_ADMIN_SCOPE:?}, or a token for {from:?}"
        )));
    }
    let params: RenameParams = request.params_as()?;
    let to = non_empty(params.to)
        .ok_or_else(|| ServiceError::BadRequest("to is required: {\"to\":\"newname\"}".into()))?;
    validate_label("to", &to).map_err(ServiceError::BadRequest)?;
    if to == from {
        return Err(ServiceError::BadRequest(format!(
            "to must differ from the current name {from:?}"
        )));
    }
    match service.rename(from, &to).await? {
        0 => Err(ServiceError::NotFound(format!(
            "no subscriber named {from:?}"
        ))),
        renamed => Ok(Json(json!({ "renamed": renamed, "name": to }))),
    }
}

async fn kick_subscribers(
    service: NoticeService,
    request: Request,
) -> Result<Json<Value>, ServiceError> {
    let name = non_empty(request.path_param().map(str::to_string)).or_else(|| {
        non_empty(
            request
                .params
                .get("name")
                .and_then(Value::as_str)
                .map(str::to_string),
        )
    });
    let name = name.ok_or_else(|| {
        ServiceError::BadRequest("name is required: DELETE /notices/subscribers/{name}".into())
    })?;
    match service.kick(&name).await? {
        0 => Err(ServiceError::NotFound(format!(
            "no subscriber named {name:?}"
        ))),
        kicked => Ok(Json(json!({ "kicked": kicked }))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(params: Value) -> Request {
        Request {
            uri: "/notices/stream".into(),
            method: "GET".into(),
            params,
            request_id: None,
            auth: None,
        }
    }

    /// A request as the gateway forwards it for a verified caller.
    fn as_caller(params: Value, sub: Option<&str>, scopes: &[&str]) -> Request {
        Request {
            auth: Some(shared::packet::Identity {
                sub: sub.map(str::to_string),
                scopes: scopes.iter().map(|s| s.to_string()).collect(),
            }),
            ..request(params)
        }
    }

    fn name_of(request: &Request) -> Result<Option<String>, u16> {
        subscription(request)
            .map(|subscribing| subscribing.interest.name)
            .map_err(|refusal| refusal.status())
    }

    #[test]
    fn a_verified_subscriber_subscribes_as_itself() {
        let alice = |params| as_caller(params, Some("alice"), &[SUBSCRIBE_SCOPE]);
        assert_eq!(name_of(&alice(json!({}))), Ok(Some("alice".into())));
        assert_eq!(
            name_of(&alice(json!({"name": "alice"}))),
            Ok(Some("alice".into()))
        );
        assert_eq!(name_of(&alice(json!({"name": "bob"}))), Err(403));
        // An admin may subscribe under any name; `admin` implies `notice:admin`.
        for scope in [NOTICE_ADMIN_SCOPE, shared::packet::ADMIN_SCOPE] {
            let admin = as_caller(json!({"name": "bob"}), Some("root"), &[scope]);
            assert_eq!(name_of(&admin), Ok(Some("bob".into())));
        }
        // No subject (an anonymous caller the gateway granted scopes): no name of its own, and
        // none of anyone else's unless it holds notice:admin.
        let anonymous = as_caller(json!({"name": "bob"}), None, &[SUBSCRIBE_SCOPE]);
        assert_eq!(name_of(&anonymous), Err(403));
        let anonymous_admin = as_caller(json!({"name": "bob"}), None, &[NOTICE_ADMIN_SCOPE]);
        assert_eq!(name_of(&anonymous_admin), Ok(Some("bob".into())));
        // No verified caller at all (a cluster member): the name is the one asked for.
        assert_eq!(
            name_of(&as_caller(json!({}), None, &[SUBSCRIBE_SCOPE])),
            Ok(None)
        );
        assert_eq!(
            name_of(&request(json!({"name": "bob"}))),
            Ok(Some("bob".into()))
        );
        // The name is still checked first.
        assert_eq!(name_of(&alice(json!({"name": "a,b"}))), Err(400));
    }

    #[test]
    fn the_listing_shows_whispers_to_their_addressee_and_admins_only() {
        let whispers = |request: Request| list_query(&request).unwrap().whispers;
        assert_eq!(whispers(request(json!({}))), Whispers::All);
        assert_eq!(
            whispers(as_caller(json!({}), Some("alice"), &[SUBSCRIBE_SCOPE])),
            Whispers::To(Some("alice".into()))
        );
        assert_eq!(
            whispers(as_caller(json!({}), None, &[SUBSCRIBE_SCOPE])),
            Whispers::To(None)
        );
        assert_eq!(
            whispers(as_caller(json!({}), Some("alice"), &[NOTICE_ADMIN_SCOPE])),
            Whispers::All
        );
    }

    #[test]
    fn stream_params_accept_gateway_and_packet_shapes() {
        let Subscribing {
            interest,
            membership,
            after,
        } = subscription(&as_caller(
            json!({
                "topics": "a, b,", "name": "alice", "after": "7", "presence": "1", "client": "tab-1"
            }),
            // What a loopback caller of a development stack without a key is granted.
            None,
            &[NOTICE_ADMIN_SCOPE],
        ))
        .unwrap();
        assert_eq!(interest.name.as_deref(), Some("alice"));
        assert_eq!(interest.topics.iter().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(after, Some(7));
        assert_eq!(
            membership,
            Membership {
                presence: true,
                claim: NameClaim::Chosen {
                    client: Some("tab-1".into())
                }
            }
        );
        let Subscribing {
            interest,
            membership,
            after,
        } = subscription(&request(
            json!({"topics": ["x"], "after": 3, "last_event_id": "9", "presence": 0}),
        ))
        .unwrap();
        assert_eq!(interest.name, None);
        assert_eq!(after, Some(9), "Last-Event-ID wins over after");
        assert_eq!(membership, Membership::default());
        assert_eq!(subscription(&request(json!({}))).unwrap().after, None);
        // Topics are kept distinct and in order, however they were listed.
        let topics = subscription(&request(json!({"topics": "b,a,b, a"})))
            .unwrap()
            .interest
            .topics;
        assert_eq!(topics, ["a", "b"]);
        // A token's subject is entitled to its name: no claim to defend.
        let subject = as_caller(json!({"client": "x"}), Some("alice"), &[SUBSCRIBE_SCOPE]);
        let membership = subscription(&subject).unwrap().membership;
        assert_eq!(membership.claim, NameClaim::Entitled);
    }

    #[test]
    fn bad_stream_params_get_a_400_with_the_reason() {
        for (params, reason) in [
            (json!({"after": "x"}), "after must be"),
            (json!({"last_event_id": -1}), "last_event_id must be"),
            (json!({"topics": 5}), "topics must be"),
            (json!({"topics": [1]}), "topics must be"),
            (json!({"name": "a\nb"}), "name must not"),
            (json!({"presence": "maybe"}), "presence must be"),
            (json!({"client": "a\nb"}), "client must not"),
            (json!("oops"), "invalid parameters"),
        ] {
            let refusal = subscription(&request(params)).unwrap_err();
            assert_eq!(refusal.status(), 400);
            assert!(
                refusal.message().contains(reason),
                "{refusal:?} should say {reason}"
            );
        }
    }

    #[test]
    fn the_routes_register_the_documented_urls() {
        let service = NoticeService::new(
            std::sync::Arc::new(crate::store::NoticeBackend::Memory(Default::default())),
            crate::hub::Hub::new(8, 8, None),
            None,
            Default::default(),
        );
        assert_eq!(
            router(service, TaskTracker::new()).urls(),
            [
                "DELETE/notices/subscribers",
                "GET/notices",
                "GET/notices/stream",
                "GET/notices/subscribers",
                "POST/notices",
                "POST/notices/subscribers",
            ]
        );
    }

    #[test]
    fn every_route_declares_its_scope() {
        let service = NoticeService::new(
            std::sync::Arc::new(crate::store::NoticeBackend::Memory(Default::default())),
            crate::hub::Hub::new(8, 8, None),
            None,
            Default::default(),
        );
        let scopes = router(service, TaskTracker::new()).scopes();
        let expected = [
            ("DELETE/notices/subscribers", NOTICE_ADMIN_SCOPE),
            ("GET/notices", SUBSCRIBE_SCOPE),
            ("GET/notices/stream", SUBSCRIBE_SCOPE),
            ("GET/notices/subscribers", NOTICE_ADMIN_SCOPE),
            ("POST/notices", PUBLISH_SCOPE),
            ("POST/notices/subscribers", SUBSCRIBE_SCOPE),
        ];
        let scopes: Vec<(&str, &str)> = scopes
            .iter()
            .map(|(url, scope)| (url.as_str(), scope.as_str()))
            .collect();
        assert_eq!(scopes, expected);
    }

    #[test]
    fn list_params_are_checked() {
        let query = list_query(&request(json!({"topic": "", "after": "", "limit": "5"}))).unwrap();
        assert!(matches!(query.selector, Selector::All));
        assert_eq!((query.after, query.limit), (0, 5));
        let bad = list_query(&request(json!({"limit": "0"}))).unwrap_err();
        assert_eq!(bad.status(), 400);
        let extra = list_query(&request(json!({"params": "7"}))).unwrap_err();
        assert_eq!(extra.status(), 404);
    }
}
