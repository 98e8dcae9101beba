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
//! that frees the subscription. A stream that sent nothing for a whole
//! [`crate::Config::keep_alive`] period gets a comment line; the gateway's shutdown ends every
//! stream, so that graceful shutdown never waits on a subscription that would never end by
//! itself.
//!
//! Each event is written out here, straight into one buffer, rather than through axum's `Sse`:
//! a notice goes to thousands of streams at once, and axum's keep-alive moves its timer forward
//! after every event of every stream. Here an event only notes the time; the timer is moved
//! when it fires, to a period after the last event, and sends the comment only if that has
//! passed. So a stream is never silent for longer than a period, which the idle timeout relies
//! on.

use std::{convert::Infallible, time::Duration};

use axum::{
    body::Body,
    http::header,
    response::{IntoResponse, Response},
};
use bytes::{BufMut, Bytes, BytesMut};
use serde_json::{json, Value};
use shared::{ClientError, Packet, RawParams, ResponseStream};
use tokio::time::{Instant, Sleep};
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
    keep_alive: KeepAlive,
    _open: GaugeGuard,
}

/// When a stream next needs a comment line to keep it open.
struct KeepAlive {
    period: Duration,
    last_sent: Instant,
    /// Boxed: a timer must not move, and the relay does.
    timer: std::pin::Pin<Box<Sleep>>,
}

impl KeepAlive {
    fn new(period: Duration) -> KeepAlive {
        let period = period.max(Duration::from_millis(1));
        let now = Instant::now();
        KeepAlive {
            period,
            last_sent: now,
            timer: Box::pin(tokio::time::sleep_until(now + period)),
        }
    }

    /// Something went out on the stream now.
    fn sent(&mut self) {
        self.last_sent = Instant::now();
    }

    /// Called when the timer fired: whether a whole period passed without anything sent (the
    /// comment is then due and counts as sent). Sets the timer to a period after the last send.
    fn due(&mut self) -> bool {
        let now = Instant::now();
        let due = now >= self.last_sent + self.period;
        if due {
            self.last_sent = now;
        }
        self.timer.as_mut().reset(self.last_sent + self.period);
        due
    }
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
        keep_alive: KeepAlive::new(state.config.keep_alive),
        _open: state.metrics.open_stream(),
    };
    let events = futures::stream::unfold(relay, next_event);
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(events),
    )
        .into_response()
}

async fn next_event(mut relay: Relay) -> Option<(Result<Bytes, Infallible>, Relay)> {
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
                    _ = &mut relay.keep_alive.timer => {
                        if !relay.keep_alive.due() {
                            continue;
                        }
                        return Some((Ok(Bytes::from_static(b":\n\n")), relay));
                    }
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
        relay.keep_alive.sent();
        return Some((Ok(event), relay));
    }
}

/// One event packet as an SSE event: `id:`, `event:` and `data:` lines and a blank line.
fn to_event(packet: Packet<RawParams>) -> Bytes {
    let id = packet.id.map(|id| match id {
        Value::String(id) => id,
        other => other.to_string(),
    });
    // A line break would end a field early and let the id or name forge other fields.
    let id = id.filter(|id| {
        let safe = is_field_safe(id);
        if !safe {
            warn!(?id, "event id with a line break or NUL; sent without it");
        }
        safe
    });
    let name = packet.event.filter(|name| {
        let safe = is_field_safe(name);
        if !safe {
            warn!(
                ?name,
                "event name with a line break or NUL; sent without it"
            );
        }
        safe
    });
    let data = packet.params.get();
    if data.contains(['\n', '\r']) {
        // A node that pretty-printed its params: written out again on one line, as documented.
        let data = packet.params.to_value().to_string();
        return event_bytes(id.as_deref(), name.as_deref(), &data);
    }
    // The node's JSON text as it is, without parsing it into values and writing it out again.
    event_bytes(id.as_deref(), name.as_deref(), data)
}

fn error_event(message: &str, status: u16) -> Bytes {
    let data = json!({ "error": message, "status": status }).to_string();
    event_bytes(None, Some("error"), &data)
}

/// The text of one event; `data` holds no line break.
fn event_bytes(id: Option<&str>, name: Option<&str>, data: &str) -> Bytes {
    let fields = [("id: ", id), ("event: ", name), ("data: ", Some(data))];
    let len = fields
        .iter()
        .map(|(field, value)| value.map_or(0, |value| field.len() + value.len() + 1))
        .sum::<usize>();
    let mut text = BytesMut::with_capacity(len + 1);
    for (field, value) in fields {
        if let Some(value) = value {
            text.put_slice(field.as_bytes());
            text.put_slice(value.as_bytes());
            text.put_u8(b'\n');
        }
    }
    text.put_u8(b'\n');
    text.freeze()
}

fn is_field_safe(value: &str) -> bool {
    !value.contains(['\r', '\n', '\0'])
}
