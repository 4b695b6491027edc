//! Logs and traces of every binary: the tracing subscriber (stderr, text or
//! JSON, `RUST_LOG`), and span export by OTLP when the standard
//! `OTEL_EXPORTER_OTLP_*` variables ask for it, not otherwise.
//!
//! ```text
//!  tracing spans/events ─▶ EnvFilter ─┬─▶ fmt (stderr)
//!                                     └─▶ tracing-opentelemetry ─▶ batch ─▶ OTLP/HTTP collector
//!                                          (only with an endpoint set)
//! ```
//!
//! Export is on when `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, unless `OTEL_SDK_DISABLED=true` or
//! `OTEL_TRACES_EXPORTER=none`. The exporter reads the rest of the standard
//! variables itself (`…_HEADERS`, `…_TIMEOUT`, `…_COMPRESSION`,
//! `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`,
//! `OTEL_BSP_*`); the protocol (`…_PROTOCOL`) is `http/protobuf` (default)
//! or `http/json`; `grpc` is refused with a clear error, since every
//! collector also takes OTLP/HTTP (port 4318).
//!
//! [`continue_trace`] joins a span to a W3C trace received from upstream
//! (HTTP header, Kafka header) and gives the `traceparent` to pass on; the
//! span's `trace_id` field puts the trace id in every log line under it,
//! exported or not.

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use outbox_record::trace::TraceParent;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::LogFormat;

/// Keeps span export running; dropping it (at the end of `main`) sends the
/// spans still buffered.
#[must_use = "dropping the guard stops span export"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(e) = provider.shutdown() {
                eprintln!("cannot send the last spans: {e}");
            }
        }
    }
}

/// Why export could not be set up: bad `OTEL_*` configuration.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("{var}={value:?}: {why}")]
    Setting {
        var: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("cannot set up the OTLP exporter")]
    Exporter(#[source] opentelemetry_otlp::ExporterBuildError),
}

/// What the environment asks of span export.
#[derive(Debug, PartialEq, Eq)]
enum Export {
    Off,
    Otlp(Protocol),
}

/// Reads the standard variables (`var` looks one up; tests pass a map).
fn export_from(var: impl Fn(&str) -> Option<String>) -> Result<Export, TelemetryError> {
    let set = |name: &str| var(name).filter(|v| !v.trim().is_empty());
    if set("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return Ok(Export::Off);
    }
    if let Some(exporter) = set("OTEL_TRACES_EXPORTER") {
        match exporter.trim() {
            "none" => return Ok(Export::Off),
            "otlp" => {}
            _ => {
                return Err(TelemetryError::Setting {
                    var: "OTEL_TRACES_EXPORTER",
                    value: exporter,
                    why: "only otlp (or none) is built in",
                })
            }
        }
    }
    if set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none()
        && set("OTEL_EXPORTER_OTLP_ENDPOINT").is_none()
    {
        return Ok(Export::Off);
    }
    let (var, value) = match set("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") {
        Some(v) => ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", v),
        None => match set("OTEL_EXPORTER_OTLP_PROTOCOL") {
            Some(v) => ("OTEL_EXPORTER_OTLP_PROTOCOL", v),
            None => return Ok(Export::Otlp(Protocol::HttpBinary)),
        },
    };
    match value.trim() {
        "http/protobuf" => Ok(Export::Otlp(Protocol::HttpBinary)),
        "http/json" => Ok(Export::Otlp(Protocol::HttpJson)),
        "grpc" => Err(TelemetryError::Setting {
            var,
            value,
            why: "gRPC is not built in: use http/protobuf (the collector's port 4318)",
        }),
        _ => Err(TelemetryError::Setting {
            var,
            value,
            why: "expected http/protobuf or http/json",
        }),
    }
}

/// Installs the global subscriber: logs on stderr (stdout is left to what a
/// command prints, e.g. loadgen's report), filtered by `RUST_LOG` (default
/// `info`), text or one JSON object per line; and span export when the
/// environment asks for it, as service `name` unless `OTEL_SERVICE_NAME`
/// says otherwise.
pub fn init(name: &str, format: LogFormat) -> Result<Telemetry, TelemetryError> {
    let export = export_from(|v| std::env::var(v).ok())?;
    let provider = match export {
        Export::Off => None,
        Export::Otlp(protocol) => Some(provider(name, protocol)?),
    };
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: log files and pipes get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let text = (format == LogFormat::Text).then(|| {
        tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
    });
    let json = (format == LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
    });
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(name.to_owned())));
    tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .with(otel)
        .init();
    Ok(Telemetry { provider })
}

fn provider(name: &str, protocol: Protocol) -> Result<SdkTracerProvider, TelemetryError> {
    // Endpoint, headers, timeout and compression come from the standard
    // variables, read by the builder.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(protocol)
        .build()
        .map_err(TelemetryError::Exporter)?;
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(name.to_owned());
    }
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// Makes `span` continue the trace `incoming` (a new trace if `None`) and
/// returns the `traceparent` to pass downstream: the same trace id with
/// `span` as the parent. With export on, that is the exported span's own
/// id; without, a fresh id. Records the trace id in `span`'s `trace_id`
/// field (declare it `tracing::field::Empty`) so log lines under it carry it.
pub fn continue_trace(span: &tracing::Span, incoming: Option<&TraceParent>) -> TraceParent {
    if let Some(parent) = incoming {
        let remote = SpanContext::new(
            TraceId::from_bytes(parent.trace_id),
            SpanId::from_bytes(parent.parent_id),
            TraceFlags::new(parent.flags),
            true,
            TraceState::default(),
        );
        // Fails when nothing is exported (no layer): nothing to join then.
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
    }
    let cx = span.context();
    let exported = cx.span().span_context().clone();
    let next = if exported.is_valid() {
        TraceParent {
            trace_id: exported.trace_id().to_bytes(),
            parent_id: exported.span_id().to_bytes(),
            flags: exported.trace_flags().to_u8(),
        }
    } else {
        incoming.map_or_else(TraceParent::root, TraceParent::child)
    };
    span.record("trace_id", next.trace_id_hex());
    next
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn export(vars: &[(&str, &str)]) -> Result<Export, TelemetryError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        export_from(|k| map.get(k).cloned())
    }

    #[test]
    fn export_needs_an_endpoint_and_defaults_to_protobuf() {
        assert_eq!(export(&[]).unwrap(), Export::Off);
        assert_eq!(
            export(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]).unwrap(),
            Export::Off
        );
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318");
        assert_eq!(
            export(&[endpoint]).unwrap(),
            Export::Otlp(Protocol::HttpBinary)
        );
        assert_eq!(
            export(&[(
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://c:4318/v1/traces"
            )])
            .unwrap(),
            Export::Otlp(Protocol::HttpBinary)
        );
        assert_eq!(
            export(&[endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]).unwrap(),
            Export::Otlp(Protocol::HttpJson)
        );
        // The per-signal variable wins.
        assert_eq!(
            export(&[
                endpoint,
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
            ])
            .unwrap(),
            Export::Otlp(Protocol::HttpBinary)
        );
    }

    #[test]
    fn export_can_be_switched_off() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318");
        assert_eq!(
            export(&[endpoint, ("OTEL_SDK_DISABLED", "true")]).unwrap(),
            Export::Off
        );
        assert_eq!(
            export(&[endpoint, ("OTEL_TRACES_EXPORTER", "none")]).unwrap(),
            Export::Off
        );
    }

    #[test]
    fn unsupported_settings_are_refused_by_name() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317");
        let err = export(&[endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]).unwrap_err();
        assert!(
            err.to_string()
                .contains("OTEL_EXPORTER_OTLP_PROTOCOL=\"grpc\""),
            "{err}"
        );
        assert!(err.to_string().contains("4318"), "{err}");
        let err = export(&[endpoint, ("OTEL_TRACES_EXPORTER", "zipkin")]).unwrap_err();
        assert!(err.to_string().contains("only otlp"), "{err}");
        let err = export(&[endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "udp")]).unwrap_err();
        assert!(err.to_string().contains("expected http/protobuf"), "{err}");
    }

    #[test]
    fn without_export_a_trace_is_continued_with_a_new_parent() {
        let incoming =
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        let span = tracing::Span::none();
        let next = continue_trace(&span, Some(&incoming));
        assert_eq!(next.trace_id, incoming.trace_id);
        assert_ne!(next.parent_id, incoming.parent_id);
        let fresh = continue_trace(&span, None);
        assert_ne!(fresh.trace_id, incoming.trace_id);
    }
}
