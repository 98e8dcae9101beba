//! Relaying a node's stream to the HTTP client as Server-Sent Events.
//!
//! Each event packet becomes one event: `id:` from the packet's `id`, `event:` from its `event`,
//! `data:` its `params`, the JSON text as the node wrote it (params are [`RawParams`], never
//! parsed here), written again on one line only if the node spread them over several. Empty
//! events (the packet a node sends to say the stream has started) are not forwarded. The end
//! packet closes the response; if it carries an error, or the node's connection drops, or the
//! client reads too slowly to keep up, a final `event: error` with `{"error", "status"}` says why
//! before it closes.
//!
//! The relay owns the node-side [`ResponseStream`]: when the HTTP client goes away, hyper drops
//! the body, the body drops the relay, and dropping the stream sends the node the cancel packet
//! that frees the subscription. Idle streams get a comment line every
//! [`crate::Config::keep_alive`]; the gateway's shutdown ends every stream, so that graceful
//! shutdown never waits on a subscription that would never end by itself.

use std::convert::Infallible;

use axum::response::{
    sse::{Event, KeepAlive, Sse},
    IntoResponse, Response,
};
use serde_json::{json, Value};
use shared::{ClientError, Packet, RawParams, ResponseStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::{metrics::GaugeGuard, AppState};

/// The state of one relayed stream.
struct Relay {
    /// The first event, already received while the request waited for its answer. Boxed: the
    /// relay lives as long as the stream and this is empty after the first poll.
    first: Option<Box<Packet<RawParams>>>,
    /// `None` once the stream has ended.
    answers: Option<ResponseStream<RawParams>>,
    shutdown: CancellationToken,
    _open: GaugeGuard,
}

/// The `text/event-stream` response relaying `answers`, starting with `first`.
pub(crate) fn respond(
    first: Option<Packet<RawParams>>,
    answers: Option<ResponseStream<RawParams>>,
    state: &AppState,
) -> Response {
    let relay = Relay {
        first: first.map(Box::new),
        answers,
        shutdown: state.shutdown.clone(),
        _open: state.metrics.open_stream(),
    };
    let events = futures::stream::unfold(relay, next_event);
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(state.config.keep_alive))
        .into_response()
}

async fn next_event(mut relay: Relay) -> Option<(Result<Event, Infallible>, Relay)> {
    loop {
        let answer = match relay.first.take() {
            Some(first) => Ok(*first),
            None => {
                let answers = relay.answers.as_mut()?;
                tokio::select! {
                    _ = relay.shutdown.cancelled() => {
                        debug!("closing an event stream for shutdown");
                        return None;
                    }
                    answer = answers.next() => answer?,
                }
            }
        };
        let event = match answer {
            Ok(packet) if packet.end => {
                relay.answers = None;
                if packet.status() < 400 && packet.error.is_none() {
                    return None;
                }
                let message = packet.error.as_deref().unwrap_or("the stream failed");
                error_event(message, packet.status())
            }
            Ok(packet) if packet.is_empty_event() => continue,
            Ok(packet) => to_event(packet),
            Err(ClientError::Lagged) => {
                relay.answers = None;
                warn!("event stream cut off: the client read too slowly");
                error_event(
                    "the client read too slowly; the stream was stopped and events were lost",
                    503,
                )
            }
            Err(err) => {
                relay.answers = None;
                warn!(%err, "event stream cut off");
                error_event("the service's connection closed", 502)
            }
        };
        return Some((Ok(event), relay));
    }
}

/// One event packet as an SSE event.
fn to_event(packet: Packet<RawParams>) -> Event {
    // Fields are written in the order they are set: `id` and `event` first, as people expect.
    let mut event = Event::default();
    if let Some(id) = packet.id {
        let id = match id {
            Value::String(id) => id,
            other => other.to_string(),
        };
        // A line break would end the field early and let the id forge other fields.
        if is_field_safe(&id) {
            event = event.id(id);
        } else {
            warn!(?id, "event id with a line break or NUL; sent without it");
        }
    }
    if let Some(name) = packet.event {
        if is_field_safe(&name) {
            event = event.event(name);
        } else {
            warn!(
                ?name,
                "event name with a line break or NUL; sent without it"
            );
        }
    }
    let data = packet.params.get();
    if data.contains(['\n', '\r']) {
        // A node that pretty-printed its params: written out again on one line, as documented.
        return event
            .json_data(packet.params.to_value())
            .expect("a JSON value always serializes");
    }
    // The node's JSON text as it is, without parsing it into values and writing it out again.
    event.data(data)
}

fn error_event(message: &str, status: u16) -> Event {
    Event::default()
        .event("error")
        .json_data(json!({ "error": message, "status": status }))
        .expect("a JSON value always serializes")
}

fn is_field_safe(value: &str) -> bool {
    !value.contains(['\r', '\n', '\0'])
}
