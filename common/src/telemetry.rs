//! Logging and tracing set-up shared by the agent and the coordinator: one
//! structured line per event on stderr (text or JSON), and, when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans exported over OTLP/gRPC. Trace
//! context (W3C `traceparent`) crosses process boundaries in job messages and
//! gRPC metadata, so the agent's spans join the coordinator's trace.

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Keeps the exporter alive; flushes spans on drop.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            // Shutdown blocks on the export; never on a runtime worker.
            let _ = std::thread::spawn(move || p.shutdown()).join();
        }
    }
}

/// Sets up logs (level from `DATASAVER_LOG`, default info) and, if
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set, trace export as `service`. Must run
/// inside the tokio runtime (the gRPC exporter uses it). Returns a warning to
/// log if the exporter could not be set up (logging works regardless).
pub fn init(service: &'static str, json: bool) -> (Telemetry, Option<String>) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DATASAVER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
        .ok()
        .filter(|s| !s.trim().is_empty());
    let mut warning = None;
    let provider = match endpoint {
        None => None,
        Some(ep) => match opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(ep.clone())
            .build()
        {
            Ok(exporter) => Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(
                        opentelemetry_sdk::Resource::builder()
                            .with_service_name(service)
                            .build(),
                    )
                    .build(),
            ),
            Err(e) => {
                warning = Some(format!(
                    "OTEL_EXPORTER_OTLP_ENDPOINT: traces are not exported: {e}"
                ));
                None
            }
        },
    };
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let otel = provider.as_ref().map(|p| {
        opentelemetry::global::set_tracer_provider(p.clone());
        tracing_opentelemetry::layer().with_tracer(p.tracer(service))
    });
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    if json {
        registry.with(fmt.json()).init();
    } else {
        registry.with(fmt.with_ansi(false)).init();
    }
    (Telemetry { provider }, warning)
}

struct MapCarrier<'a>(&'a mut HashMap<String, String>);

impl Injector for MapCarrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_string(), value);
    }
}

struct MapReader<'a>(&'a HashMap<String, String>);

impl Extractor for MapReader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// The trace context of `span`, to send along with a job.
pub fn context_of(span: &tracing::Span) -> HashMap<String, String> {
    let mut map = HashMap::new();
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut MapCarrier(&mut map))
    });
    map
}

/// Makes `span` a child of the remote context in `carrier` (if any).
pub fn set_parent(span: &tracing::Span, carrier: &HashMap<String, String>) {
    if carrier.is_empty() {
        return;
    }
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&MapReader(carrier)));
    let _ = span.set_parent(cx);
}

/// Puts the current span's trace context into gRPC request metadata.
pub fn inject_metadata(span: &tracing::Span, md: &mut tonic::metadata::MetadataMap) {
    for (k, v) in context_of(span) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(k.as_bytes()),
            v.parse(),
        ) {
            md.insert(k, v);
        }
    }
}

/// The trace context carried in gRPC request metadata.
pub fn from_metadata(md: &tonic::metadata::MetadataMap) -> HashMap<String, String> {
    ["traceparent", "tracestate"]
        .iter()
        .filter_map(|k| {
            md.get(*k)
                .and_then(|v| v.to_str().ok())
                .map(|v| (k.to_string(), v.to_string()))
        })
        .collect()
}
