//! One request, one trace: the gateway continues (or starts) a W3C trace, carries it to the
//! service in the packet, and both export their spans over OTLP/HTTP to a receiver inside the
//! test, which decodes them with the OpenTelemetry protobuf types. The distributor exports the
//! spans of the requests it serves too.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{body::Bytes, extract::State, http::StatusCode, routing::post, Router};
use e2e::{Stack, StackOptions};
use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest, common::v1::any_value::Value as AnyValue,
    trace::v1::Span,
};
use prost::Message;

/// The spans received so far, each with the `service.name` of the process that sent it.
#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<(String, Span)>>>);

async fn receive(State(received): State<Received>, body: Bytes) -> StatusCode {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return StatusCode::BAD_REQUEST;
    };
    let mut spans = received.0.lock().unwrap();
    for resource_spans in request.resource_spans {
        let service = resource_spans
            .resource
            .iter()
            .flat_map(|resource| &resource.attributes)
            .find(|attribute| attribute.key == "service.name")
            .and_then(
                |attribute| match attribute.value.as_ref()?.value.as_ref()? {
                    AnyValue::StringValue(name) => Some(name.clone()),
                    _ => None,
                },
            )
            .unwrap_or_default();
        for scope_spans in resource_spans.scope_spans {
            spans.extend(
                scope_spans
                    .spans
                    .into_iter()
                    .map(|span| (service.clone(), span)),
            );
        }
    }
    StatusCode::OK
}

/// An OTLP/HTTP receiver on a free loopback port: its base url and what it received.
async fn receiver() -> (String, Received) {
    let received = Received::default();
    let app = Router::new()
        .route("/v1/traces", post(receive))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, received)
}

/// Waits until the receiver holds a span for which `wanted(service name, span)` holds.
async fn wait_for_span(
    received: &Received,
    what: &str,
    wanted: impl Fn(&str, &Span) -> bool,
) -> Span {
    for _ in 0..300 {
        let found = received
            .0
            .lock()
            .unwrap()
            .iter()
            .find(|(from, span)| wanted(from, span))
            .map(|(_, span)| span.clone());
        if let Some(span) = found {
            return span;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no span arrived: {what}");
}

/// Waits until the receiver holds a span of `service` in trace `trace_id`.
async fn span_of(received: &Received, service: &str, trace_id: &[u8]) -> Span {
    wait_for_span(
        received,
        &format!("{service} in the trace"),
        |from, span| from == service && span.trace_id == trace_id,
    )
    .await
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn a_put_is_one_trace_across_the_gateway_and_kv_service() {
    // Exported batches go out every 200 ms rather than every 5 s (the SDK reads this variable;
    // each test runs in a process of its own, and the stack's children inherit it).
    std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "200");
    let (url, received) = receiver().await;
    let exporting = vec!["--otlp-endpoint".to_owned(), url];
    let stack = Stack::start(StackOptions {
        notice: false,
        extra_flags: [
            ("gateway".to_owned(), exporting.clone()),
            ("kv-0".to_owned(), exporting.clone()),
            ("distributor".to_owned(), exporting),
        ]
        .into_iter()
        .collect(),
        ..StackOptions::default()
    })
    .await;

    // A trace the caller started: the gateway's span is the child of the caller's.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let put = stack
        .http
        .put(stack.url("/kv/x"))
        .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
        .body("traced")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    let trace_bytes: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&trace_id[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let gateway = span_of(&received, "gateway", &trace_bytes).await;
    let kv = span_of(&received, "kv", &trace_bytes).await;
    assert_eq!(hex(&gateway.parent_span_id), caller_span);
    assert_eq!(
        kv.parent_span_id, gateway.span_id,
        "kv's span is the gateway's child"
    );
    assert_eq!(gateway.name, "PUT /kv");
    assert_eq!(kv.name, "PUT /kv");

    // No traceparent: the gateway starts the trace, and kv-service continues it.
    let put = stack
        .http
        .put(stack.url("/kv/y"))
        .body("traced too")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    let root = wait_for_span(&received, "the gateway's root span", |from, span| {
        from == "gateway" && span.parent_span_id.is_empty() && span.name == "PUT /kv"
    })
    .await;
    let child = span_of(&received, "kv", &root.trace_id).await;
    assert_eq!(child.parent_span_id, root.span_id);
    // An invalid traceparent is ignored: a new trace starts rather than an error.
    let put = stack
        .http
        .put(stack.url("/kv/z"))
        .header("traceparent", "00-not-a-trace-01")
        .body("still fine")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);

    // The distributor's requests are spans too: kv-service's registration among them.
    wait_for_span(
        &received,
        "the distributor's registration span",
        |from, span| from == "distributor" && span.name == "POST /distributes",
    )
    .await;
}
