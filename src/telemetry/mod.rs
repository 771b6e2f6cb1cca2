//! Logs and traces. Logs: `tracing` to stderr, human-readable by default, JSON with
//! `log_format = "json"`. Traces: when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (standard OTel
//! variables), one span per ingested event (`agentwire.ingest`: resolve and publish) and one per
//! socket write of an event (`agentwire.deliver`) are exported over OTLP/HTTP, continuing the
//! producer's W3C `traceparent`. Without the variable no span is created on the event path and
//! nothing waits on a collector. Repeated warnings go through a [`Throttle`].

mod throttle;

pub use throttle::Throttle;

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::Context;
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider,
};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Span;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{Config, LogFormat};
use crate::protocol::event::Event;
use crate::protocol::{ChannelKind, ChannelName};

/// The target of the exported spans; logs never show it.
const TRACE_TARGET: &str = "agentwire::trace";

static TRACING: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported (set once at start).
pub fn tracing_enabled() -> bool {
    TRACING.load(Ordering::Relaxed)
}

/// Keeps the exporter alive; [`Telemetry::shutdown`] flushes the last spans.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown()
        {
            eprintln!("agentwire: flushing traces failed: {error}");
        }
    }
}

/// Installs the global subscriber. `RUST_LOG`, when set, wins over `log_level` (both were checked
/// when the configuration was loaded). Text logs are coloured only when stderr is a terminal. Must
/// run outside the tokio runtime: the OTLP/HTTP exporter owns a blocking client.
pub fn init(config: &Config) -> Telemetry {
    let directives = config.log_filter();
    let filter = EnvFilter::try_new(format!("{directives},{TRACE_TARGET}=off"))
        .unwrap_or_else(|_| EnvFilter::new(format!("info,{TRACE_TARGET}=off")));
    let logs = match config.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .boxed(),
    }
    .with_filter(filter);

    let provider = std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").and_then(|_| match exporter() {
        Ok(provider) => Some(provider),
        Err(error) => {
            eprintln!("agentwire: OTLP export is off: {error}");
            None
        }
    });
    let traces = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("agentwire"))
            .with_filter(Targets::new().with_target(TRACE_TARGET, tracing::Level::INFO))
    });
    TRACING.store(provider.is_some(), Ordering::Relaxed);
    if let Err(error) = tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()
    {
        eprintln!("agentwire: logging was already set up: {error}");
    }
    Telemetry { provider }
}

fn exporter() -> anyhow::Result<SdkTracerProvider> {
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .build()?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("agentwire")
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// What a delivery span needs from its event: the parent it continues and its attributes.
#[derive(Debug)]
pub struct TraceInfo {
    parent: SpanContext,
    run_id: Option<String>,
    channel: ChannelName,
}

/// The span of one ingested event; a no-op span when tracing is off.
pub fn ingest_span(event: &Event) -> Span {
    if !tracing_enabled() {
        return Span::none();
    }
    let span = tracing::info_span!(
        target: TRACE_TARGET,
        "agentwire.ingest",
        run_id = event.run_id.as_deref(),
        kind = event.kind.as_str(),
        event_id = event.event_id.as_deref(),
        channel = Empty,
        thread_id = Empty,
        seq = Empty,
    );
    if let Some(parent) = event.traceparent.as_deref().and_then(parse_traceparent) {
        let _ = span.set_parent(Context::new().with_remote_span_context(parent));
    }
    span
}

/// Records where the event landed on its ingest span and returns what its deliveries continue:
/// the producer's span when it sent a `traceparent`, else the ingest span.
pub fn published(
    span: &Span,
    event: &Event,
    channel: &ChannelName,
    seq: u64,
) -> Option<Box<TraceInfo>> {
    if !tracing_enabled() {
        return None;
    }
    span.record("channel", channel.as_str());
    span.record("thread_id", thread_id(channel));
    span.record("seq", seq);
    let parent = event
        .traceparent
        .as_deref()
        .and_then(parse_traceparent)
        .or_else(|| {
            Some(span.context().span().span_context().clone()).filter(SpanContext::is_valid)
        })?;
    Some(Box::new(TraceInfo {
        parent,
        run_id: event.run_id.clone(),
        channel: channel.clone(),
    }))
}

/// One span per socket write of a traced event, as a child of the producer's span.
pub fn delivered(info: &TraceInfo, seq: u64, connection_id: impl std::fmt::Display) {
    let span = tracing::info_span!(
        target: TRACE_TARGET,
        "agentwire.deliver",
        run_id = info.run_id.as_deref(),
        thread_id = thread_id(&info.channel),
        channel = info.channel.as_str(),
        seq,
        %connection_id,
    );
    let _ = span.set_parent(Context::new().with_remote_span_context(info.parent.clone()));
}

fn thread_id(channel: &ChannelName) -> Option<&str> {
    (channel.kind() == ChannelKind::Thread).then(|| channel.id())
}

/// `00-<trace id>-<span id>-<flags>` (W3C Trace Context, version 00).
pub fn parse_traceparent(text: &str) -> Option<SpanContext> {
    let mut parts = text.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00"
        || parts.next().is_some()
        || trace.len() != 32
        || span.len() != 16
        || flags.len() != 2
    {
        return None;
    }
    let context = SpanContext::new(
        TraceId::from_hex(trace).ok()?,
        SpanId::from_hex(span).ok()?,
        TraceFlags::new(u8::from_str_radix(flags, 16).ok()?),
        true,
        TraceState::default(),
    );
    context.is_valid().then_some(context)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_w3c_traceparent() {
        let context =
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(
            context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(context.span_id().to_string(), "00f067aa0ba902b7");
        assert!(context.is_sampled());
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-xyz-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
    }
}
