//! Following one request across processes: the W3C trace context (`traceparent`), carried from
//! the gateway to the service in the packet's `traceparent` field, and the spans exported over
//! OTLP when `--otlp-endpoint` is set ([`crate::telemetry`]).
//!
//! The spans meant for export are `tracing` spans with the target [`TARGET`]: the gateway opens
//! one per proxied request ([`server_span`]), the service runtime one per request it handles. Only
//! the OpenTelemetry layer listens to that target, and it is installed only with an endpoint:
//! without one no layer wants these spans, `tracing` turns their call sites off once, and nothing
//! is recorded or slowed down. The trace context is still passed on unchanged, so a trace that
//! began before the gateway goes on after it (`traceparent` header → packet).
//!
//! `traceparent` is `00-<32 hex trace id>-<16 hex parent span id>-<2 hex flags>`
//! (<https://www.w3.org/TR/trace-context/>); a value that is not valid is ignored, as the
//! recommendation says, and a new trace starts.

use opentelemetry::{
    trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState},
    Context,
};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The target of the spans that are exported; nothing else listens to it.
pub const TARGET: &str = "otel";

/// The HTTP header, and the packet field, that carry the trace context.
pub const TRACEPARENT: &str = "traceparent";

/// The span context a `traceparent` value names, if it is valid.
pub fn parse(traceparent: &str) -> Option<SpanContext> {
    let mut fields = traceparent.trim().split('-');
    let (version, trace_id, span_id, flags) = (
        fields.next()?,
        fields.next()?,
        fields.next()?,
        fields.next()?,
    );
    let is_hex = |text: &str, len: usize| {
        text.len() == len && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    // Version 00 has exactly four fields; a later version may add more after them.
    if !is_hex(version, 2) || version == "ff" || (version == "00" && fields.next().is_some()) {
        return None;
    }
    if !is_hex(trace_id, 32) || !is_hex(span_id, 16) || !is_hex(flags, 2) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace_id).ok()?;
    let span_id = SpanId::from_hex(span_id).ok()?;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags) & TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    ))
}

/// `traceparent` for a span context.
pub fn format(context: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        context.trace_id(),
        context.span_id(),
        context.trace_flags().to_u8()
    )
}

/// The span of one request a process serves, named `name` (`PUT /kv`), continuing the trace of
/// `traceparent` when it is valid. A disabled span (no OTLP endpoint) when nothing exports.
pub fn server_span(name: std::fmt::Arguments<'_>, traceparent: Option<&str>) -> Span {
    let span = tracing::info_span!(target: TARGET, "request", otel.name = %name,
        otel.kind = "server");
    if span.is_disabled() {
        return span;
    }
    if let Some(parent) = traceparent.and_then(parse) {
        let _ = span.set_parent(Context::new().with_remote_span_context(parent));
    }
    span
}

/// The `traceparent` to send on for a request served under `span`: the span's own context when
/// it is exported, else the incoming value when it is valid (the trace goes on through this
/// process without a span of its own).
pub fn outgoing(span: &Span, incoming: Option<&str>) -> Option<String> {
    if !span.is_disabled() {
        let context = span.context();
        let own = context.span().span_context().clone();
        if own.is_valid() {
            return Some(format(&own));
        }
    }
    incoming.and_then(parse).map(|context| format(&context))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_round_trips() {
        let context = parse(VALID).unwrap();
        assert!(context.is_remote() && context.is_sampled());
        assert_eq!(
            context.trace_id(),
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
        );
        assert_eq!(format(&context), VALID);
    }

    #[test]
    fn invalid_traceparents_are_ignored() {
        for bad in [
            "",
            "00",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bz-01",
        ] {
            assert!(parse(bad).is_none(), "{bad:?}");
        }
        // A later version may carry more fields; the first four are read.
        assert!(parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more").is_some());
    }

    #[test]
    fn without_an_exporter_the_incoming_context_goes_on_unchanged() {
        let span = server_span(format_args!("GET /kv"), Some(VALID));
        assert!(span.is_disabled());
        assert_eq!(outgoing(&span, Some(VALID)).as_deref(), Some(VALID));
        assert_eq!(outgoing(&span, Some("garbage")), None);
        assert_eq!(outgoing(&span, None), None);
    }
}
