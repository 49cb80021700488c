//! Optional OpenTelemetry trace export (OTLP over HTTP, protobuf).
//!
//! Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set,
//! and `OTEL_SDK_DISABLED=true` turns it off again: the standard OpenTelemetry variables, so
//! a collector is configured the way operators already know (`OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_BSP_SCHEDULE_DELAY`, …).
//! Spans are batched on a thread of their own; an unreachable collector costs dropped spans,
//! never a stalled request.
//!
//! The W3C `traceparent` header carries the trace across a hop: [`inject`] on the client
//! side (the bridge calling the API), [`extract`] on the server side.

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::registry::LookupSpan;

/// Flushes and stops the exporter when dropped (keep it alive until the process ends).
pub struct Guard(SdkTracerProvider);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Err(e) = self.0.shutdown() {
            // The subscriber may already be gone; stderr still reaches the journal.
            eprintln!("OpenTelemetry: could not flush spans at exit: {e}");
        }
    }
}

/// Whether the environment asks for trace export.
pub fn enabled(env: impl Fn(&str) -> Option<std::ffi::OsString>) -> bool {
    let set = |name: &str| env(name).is_some_and(|v| !v.is_empty());
    let disabled = env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// A `tracing` layer exporting spans as service `service` (unless `OTEL_SERVICE_NAME` says
/// otherwise), or `None` when export is off. An endpoint that cannot be used (bad URL) is
/// an error: the operator asked for export and should hear why there is none.
pub fn layer<S>(
    service: &'static str,
) -> Result<Option<(impl tracing_subscriber::Layer<S>, Guard)>, String>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    if !enabled(|name| std::env::var_os(name)) {
        return Ok(None);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|e| format!("OpenTelemetry exporter: {e}"))?;
    // The builder's default detectors read OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES;
    // our name only fills in when neither names the service.
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service);
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    let tracer = provider.tracer(service);
    Ok(Some((
        tracing_opentelemetry::layer().with_tracer(tracer),
        Guard(provider),
    )))
}

/// The W3C trace-context headers (`traceparent`, `tracestate`) of the current span; empty
/// when export is off or there is no span.
pub fn inject() -> Vec<(String, String)> {
    struct Headers(Vec<(String, String)>);
    impl Injector for Headers {
        fn set(&mut self, key: &str, value: String) {
            self.0.push((key.to_owned(), value));
        }
    }
    let mut headers = Headers(Vec::new());
    let context = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&context, &mut headers);
    headers.0
}

/// Makes `span` a child of the trace named by the incoming headers, if any.
pub fn extract(span: &tracing::Span, get: impl Fn(&str) -> Option<String>) {
    struct Headers(HashMap<&'static str, String>);
    impl Extractor for Headers {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).map(String::as_str)
        }
        fn keys(&self) -> Vec<&str> {
            self.0.keys().copied().collect()
        }
    }
    let mut found = HashMap::new();
    for name in ["traceparent", "tracestate"] {
        if let Some(v) = get(name) {
            found.insert(name, v);
        }
    }
    if found.contains_key("traceparent") {
        let parent = TraceContextPropagator::new().extract(&Headers(found));
        // Fails only when no OpenTelemetry layer is installed: nothing to join then.
        let _ = span.set_parent(parent);
    }
}

#[cfg(test)]
mod tests {
    use super::enabled;

    fn env(
        pairs: &'static [(&'static str, &'static str)],
    ) -> impl Fn(&str) -> Option<std::ffi::OsString> {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.into())
        }
    }

    #[test]
    fn export_is_opt_in_and_can_be_disabled() {
        assert!(!enabled(env(&[])));
        assert!(!enabled(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "")])));
        assert!(enabled(env(&[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http://127.0.0.1:4318"
        )])));
        assert!(enabled(env(&[(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://c:4318/v1/traces"
        )])));
        assert!(!enabled(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
            ("OTEL_SDK_DISABLED", "TRUE"),
        ])));
    }
}
