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
use shared::service::{Event, EventSink, Request, Response, Router};
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::{
    feed::FeedEnd,
    hub::SubscribeError,
    notice::{format_time, validate_label, Interest, NewNotice, Whispers, MAX_TOPICS},
    service::{NoticeService, Published},
    store::{NoticeQuery, Selector, StoreError},
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
    let publish = service.clone();
    let list = service.clone();
    let stream = service.clone();
    let presence = service.clone();
    let kick = service;
    Router::new()
        .route("POST", "/notices", move |request| {
            publish_notice(publish.clone(), request)
        })
        .scope(PUBLISH_SCOPE)
        .route("GET", "/notices", move |request| {
            list_notices(list.clone(), request)
        })
        .scope(SUBSCRIBE_SCOPE)
        .stream("GET", "/notices/stream", move |request, sink| {
            streams.track_future(stream_notices(stream.clone(), request, sink))
        })
        .scope(SUBSCRIBE_SCOPE)
        .route("GET", "/notices/subscribers", move |request| {
            list_subscribers(presence.clone(), request)
        })
        .scope(NOTICE_ADMIN_SCOPE)
        .route("DELETE", "/notices/subscribers", move |request| {
            kick_subscribers(kick.clone(), request)
        })
        .scope(NOTICE_ADMIN_SCOPE)
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

/// The store's details stay in the logs; the caller learns only that it failed.
fn store_failure(err: StoreError) -> Response {
    match err {
        StoreError::Full(reason) => Response::error(503, reason),
        err => {
            warn!(%err, "notice store failed");
            Response::error(500, "the notice store is unavailable, try again later")
        }
    }
}

/// A route registered as `METHOD/notices` also receives `METHOD /notices/anything` (the
/// gateway's prefix routing); those paths do not exist.
fn no_extra_path(request: &Request) -> Result<(), Response> {
    match request.path_param() {
        Some(rest) if !rest.is_empty() => Err(Response::error(
            404,
            format!("no such resource: {}/{rest}", request.uri),
        )),
        _ => Ok(()),
    }
}

fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.is_empty())
}

/// A non-negative integer param given as a number or a numeric string.
fn integer_param(field: &str, value: Option<&Value>) -> Result<Option<i64>, Response> {
    let parsed = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) if s.is_empty() => return Ok(None),
        Some(Value::String(s)) => s.trim().parse::<i64>().ok(),
        Some(Value::Number(n)) => n.as_i64(),
        Some(_) => None,
    };
    match parsed {
        Some(n) if n >= 0 => Ok(Some(n)),
        _ => Err(Response::error(
            400,
            format!("{field} must be a non-negative integer"),
        )),
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

async fn publish_notice(service: NoticeService, request: Request) -> Response {
    if let Err(response) = no_extra_path(&request) {
        return response;
    }
    let params: PublishParams = match request.parse() {
        Ok(params) => params,
        Err(response) => return response,
    };
    if params.message.is_none() && params.body.is_some() {
        return Response::error(
            400,
            "message is required: send a JSON body like {\"message\": \"hello\"}",
        );
    }
    if params.from.is_some() {
        return Response::error(
            400,
            "from cannot be set: it is the subject of the publisher's token",
        );
    }
    let notice = match NewNotice::new(params.message, params.topic, params.to) {
        Ok(notice) => notice.sent_by(request.subject().map(str::to_string)),
        Err(reason) => return Response::error(400, reason),
    };
    let at = match non_empty(params.at).map(|at| DateTime::parse_from_rfc3339(&at)) {
        None => None,
        Some(Ok(at)) => Some(at.with_timezone(&Utc)),
        Some(Err(err)) => {
            return Response::error(
                400,
                format!("at must be an RFC 3339 time like 2030-01-01T12:00:00Z ({err})"),
            )
        }
    };
    match service.publish(notice, at).await {
        Ok(Published::Stored(notice)) => Response::with_status(201, notice),
        Ok(Published::Scheduled(at)) => {
            Response::with_status(202, json!({"scheduled": true, "at": format_time(&at)}))
        }
        Err(err) => store_failure(err),
    }
}

#[derive(Deserialize)]
struct ListParams {
    topic: Option<String>,
    after: Option<Value>,
    limit: Option<Value>,
}

async fn list_notices(service: NoticeService, request: Request) -> Response {
    let query = match list_query(&request) {
        Ok(query) => query,
        Err(response) => return response,
    };
    match service.list(&query).await {
        Ok(items) => Response::ok(json!({ "items": items })),
        Err(err) => store_failure(err),
    }
}

fn list_query(request: &Request) -> Result<NoticeQuery, Response> {
    no_extra_path(request)?;
    let params: ListParams = request.parse()?;
    let after = integer_param("after", params.after.as_ref())?.unwrap_or(0);
    let limit = match integer_param("limit", params.limit.as_ref())? {
        None => DEFAULT_LIMIT,
        Some(limit) if (1..=i64::from(MAX_LIMIT)).contains(&limit) => limit as u32,
        Some(_) => {
            return Err(Response::error(
                400,
                format!("limit must be between 1 and {MAX_LIMIT}"),
            ))
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
}

/// Who subscribes and from which id to replay (`None`: live notices only).
fn subscription(request: &Request) -> Result<(Interest, Option<i64>), Response> {
    let params: StreamParams = request.parse()?;
    let topics: Vec<String> = match &params.topics {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(list)) => list.split(',').map(|t| t.trim().to_string()).collect(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| item.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| Response::error(400, "topics must be strings"))?,
        Some(_) => {
            return Err(Response::error(
                400,
                "topics must be a comma-separated string or a list of strings",
            ))
        }
    };
    let mut topics: Vec<String> = topics.into_iter().filter(|t| !t.is_empty()).collect();
    topics.sort();
    topics.dedup();
    if topics.len() > MAX_TOPICS {
        return Err(Response::error(
            400,
            format!("at most {MAX_TOPICS} topics per subscription"),
        ));
    }
    for topic in &topics {
        validate_label("topic", topic).map_err(|reason| Response::error(400, reason))?;
    }
    let name = non_empty(params.name);
    if let Some(name) = &name {
        validate_label("name", name).map_err(|reason| Response::error(400, reason))?;
    }
    let name = subscriber_name(request, name)?;
    // A reconnecting EventSource sends Last-Event-ID with its original URL: the header wins.
    let after = match integer_param("last_event_id", params.last_event_id.as_ref())? {
        Some(last) => Some(last),
        None => integer_param("after", params.after.as_ref())?,
    };
    Ok((Interest { name, topics }, after))
}

/// The name a subscription gets, which decides whose whispers it receives. A verified subject
/// subscribes as itself; only an admin may take another name (to watch a user's whispers, or
/// for a service subscribing on someone's behalf). Callers without a subject (cluster members,
/// anonymous callers the gateway granted `notice:subscribe`) name themselves freely.
fn subscriber_name(request: &Request, asked: Option<String>) -> Result<Option<String>, Response> {
    let Some(subject) = request.subject() else {
        // A verified caller without a subject (anonymous, granted scopes by the gateway) has no
        // name of its own: taking someone else's would hand it their whispers.
        return match asked {
            Some(name) if request.auth.is_some() && !is_admin(request) => Err(Response::error(
                403,
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
        Some(name) => Err(Response::error(
            403,
            format!(
                "name {name:?} is not yours: a subscription takes the name of its token's \
                 subject ({subject:?}); another name needs the scope {NOTICE_ADMIN_SCOPE:?}"
            ),
        )),
    }
}

/// Checks the request now, so that the future that lives as long as the subscription holds
/// only what the subscription needs, not the request.
fn stream_notices(
    service: NoticeService,
    request: Request,
    sink: EventSink,
) -> impl Future<Output = Response> {
    match no_extra_path(&request).and_then(|()| subscription(&request)) {
        Ok((interest, after)) => send_notices(service, interest, after, sink).left_future(),
        Err(response) => std::future::ready(response).right_future(),
    }
}

async fn send_notices(
    service: NoticeService,
    interest: Interest,
    after: Option<i64>,
    sink: EventSink,
) -> Response {
    let mut feed = match service.subscribe(interest, after) {
        Ok(feed) => feed,
        Err(err @ (SubscribeError::Full(_) | SubscribeError::ShuttingDown)) => {
            return Response::error(503, err.to_string())
        }
    };
    // Accepted: tell the caller now (the gateway then sends its HTTP headers), not only when
    // the first notice comes.
    if sink.open().await.is_err() {
        return Response::ok(Value::Null);
    }
    loop {
        match feed.next().await {
            Ok(notice) => {
                let event = Event {
                    id: Some(notice.id.into()),
                    event: Some("notice".into()),
                    data: &notice.json,
                };
                if sink.send(event).await.is_err() {
                    // The caller is gone; dropping the feed frees the subscription.
                    return Response::ok(Value::Null);
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
                return Response::ok(json!({ "ended": name }));
            }
            Err(FeedEnd::Store(err)) => return store_failure(err),
        }
    }
}

async fn list_subscribers(service: NoticeService, request: Request) -> Response {
    if let Err(response) = no_extra_path(&request) {
        return response;
    }
    match service.presence().await {
        Ok(items) => Response::ok(json!({ "items": items })),
        Err(err) => store_failure(err),
    }
}

async fn kick_subscribers(service: NoticeService, request: Request) -> Response {
    let name = non_empty(request.path_param().map(str::to_string)).or_else(|| {
        non_empty(
            request
                .params
                .get("name")
                .and_then(Value::as_str)
                .map(str::to_string),
        )
    });
    let Some(name) = name else {
        return Response::error(400, "name is required: DELETE /notices/subscribers/{name}");
    };
    match service.kick(&name).await {
        Ok(0) => Response::error(404, format!("no subscriber named {name:?}")),
        Ok(kicked) => Response::ok(json!({ "kicked": kicked })),
        Err(err) => store_failure(err),
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
            .map(|(interest, _)| interest.name)
            .map_err(|response| response.status)
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
        let (interest, after) = subscription(&request(
            json!({"topics": "a, b,", "name": "alice", "after": "7"}),
        ))
        .unwrap();
        assert_eq!(interest.name.as_deref(), Some("alice"));
        assert_eq!(interest.topics.iter().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(after, Some(7));
        let (interest, after) = subscription(&request(
            json!({"topics": ["x"], "after": 3, "last_event_id": "9"}),
        ))
        .unwrap();
        assert_eq!(interest.name, None);
        assert_eq!(after, Some(9), "Last-Event-ID wins over after");
        let (_, after) = subscription(&request(json!({}))).unwrap();
        assert_eq!(after, None);
        // Topics are kept distinct and in order, however they were listed.
        let (interest, _) = subscription(&request(json!({"topics": "b,a,b, a"}))).unwrap();
        assert_eq!(interest.topics, ["a", "b"]);
    }

    #[test]
    fn bad_stream_params_get_a_400_with_the_reason() {
        for (params, reason) in [
            (json!({"after": "x"}), "after must be"),
            (json!({"last_event_id": -1}), "last_event_id must be"),
            (json!({"topics": 5}), "topics must be"),
            (json!({"topics": [1]}), "topics must be"),
            (json!({"name": "a\nb"}), "name must not"),
            (json!("oops"), "invalid parameters"),
        ] {
            let response = subscription(&request(params)).unwrap_err();
            assert_eq!(response.status, 400);
            assert!(
                response.error.as_deref().unwrap().contains(reason),
                "{response:?} should say {reason}"
            );
        }
    }

    #[test]
    fn the_routes_register_the_documented_urls() {
        let service = NoticeService::new(
            std::sync::Arc::new(crate::store::MemoryStore::default()),
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
            ]
        );
    }

    #[test]
    fn every_route_declares_its_scope() {
        let service = NoticeService::new(
            std::sync::Arc::new(crate::store::MemoryStore::default()),
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
        assert_eq!(bad.status, 400);
        let extra = list_query(&request(json!({"params": "7"}))).unwrap_err();
        assert_eq!(extra.status, 404);
    }
}
