//! Traces end to end: a producer's `traceparent` is the parent of the exported delivery span.
//! The collector is this test: an OTLP/HTTP receiver that decodes the protobuf export requests.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::json;

use crate::support::{Client, Process, http};

type Received = Arc<Mutex<Vec<Span>>>;

/// Starts the receiver; returns its address and what it has received.
async fn receiver() -> (std::net::SocketAddr, Received) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received: Received = Arc::default();
    let spans = Arc::clone(&received);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let spans = Arc::clone(&spans);
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let spans = Arc::clone(&spans);
                    async move {
                        assert_eq!(request.uri().path(), "/v1/traces");
                        let body = request.into_body().collect().await?.to_bytes();
                        let export = ExportTraceServiceRequest::decode(body)
                            .expect("an OTLP protobuf export");
                        let mut spans = spans.lock().unwrap();
                        for resource in export.resource_spans {
                            for scope in resource.scope_spans {
                                spans.extend(scope.spans);
                            }
                        }
                        Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::new())))
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, received)
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    let value = span
        .attributes
        .iter()
        .find(|kv| kv.key == key)?
        .value
        .as_ref()?
        .value
        .as_ref()?;
    Some(match value {
        AnyValue::StringValue(text) => text.clone(),
        AnyValue::IntValue(n) => n.to_string(),
        other => format!("{other:?}"),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_traceparent_is_the_parent_of_the_delivery_span() {
    let (collector, received) = receiver().await;
    let endpoint = format!("http://{collector}");
    let process = Process::start(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ])
    .await;
    let mut client = Client::hello(process.addr, "u_1").await;
    client.subscribe("t_traced", None).await;

    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let event = json!({"type": "tool_executing", "run_id": "run_tr", "thread_id": "t_traced", "traceparent": traceparent,
                       "payload": {"tool_call_id": "call_1"}});
    let (status, _) = http(
        process.internal,
        "POST",
        "/v1/events",
        Some(("application/json", &event.to_string())),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(client.recv().await["traceparent"], traceparent);

    let mut spans = Vec::new();
    for _ in 0..100 {
        spans = received.lock().unwrap().clone();
        if spans.iter().any(|s| s.name == "agentwire.deliver")
            && spans.iter().any(|s| s.name == "agentwire.ingest")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deliver = spans
        .iter()
        .find(|s| s.name == "agentwire.deliver")
        .expect("a delivery span was exported");
    assert_eq!(hex(&deliver.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(hex(&deliver.parent_span_id), "00f067aa0ba902b7");
    assert_eq!(attribute(deliver, "run_id").as_deref(), Some("run_tr"));
    assert_eq!(attribute(deliver, "thread_id").as_deref(), Some("t_traced"));
    assert_eq!(attribute(deliver, "seq").as_deref(), Some("1"));

    let ingest = spans
        .iter()
        .find(|s| s.name == "agentwire.ingest")
        .expect("an ingest span was exported");
    assert_eq!(hex(&ingest.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(hex(&ingest.parent_span_id), "00f067aa0ba902b7");
    assert_eq!(
        attribute(ingest, "channel").as_deref(),
        Some("thread:t_traced")
    );
}
