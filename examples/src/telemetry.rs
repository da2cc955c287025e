//! Logging, metrics and trace export for the services, set up the way a service using this
//! library would: `tracing-subscriber` for logs, `metrics-exporter-prometheus` as the
//! `metrics` recorder, and (with this crate's `opentelemetry` feature) an OpenTelemetry
//! pipeline fed by `tracing-opentelemetry`, with W3C Trace Context carried in message headers
//! by stream-core.
//!
//! Without a real tracing backend to send spans to, the pipeline here writes each finished
//! span as one line on stderr with its trace id, span id and parent id (see
//! [`SPAN_LINE_PREFIX`]); swap in `opentelemetry-otlp`'s exporter to send them to Jaeger or
//! Tempo instead, nothing else changes.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use stream_core::{Error, ErrorKind, Result};
use tracing_subscriber::filter::{EnvFilter, LevelFilter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// How each exported span line starts, so that it can be told apart from log lines.
pub const SPAN_LINE_PREFIX: &str = "span ";

/// Histogram buckets for the `_seconds` metrics: a millisecond to ten seconds, so that
/// `histogram_quantile` works across instances (the exporter's default, summaries, cannot
/// be aggregated).
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Installs the Prometheus recorder as the global `metrics` recorder and returns the handle
/// that renders it, with a task that runs the recorder's upkeep (histogram maintenance) on
/// the current runtime.
///
/// Call it before making sources and subscriptions: stream-core registers their metrics
/// when they are made, with whatever recorder is installed then.
pub fn install_prometheus() -> Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .and_then(PrometheusBuilder::install_recorder)
        .map_err(|e| {
            Error::new(ErrorKind::Config, "cannot install the Prometheus recorder").with_source(e)
        })?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// What [`init`] set up; [`Telemetry::shutdown`] flushes it.
#[must_use = "call shutdown before exiting so that the last spans are written"]
pub struct Telemetry {
    #[cfg(feature = "opentelemetry")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Writes spans still buffered and stops the trace pipeline.
    pub fn shutdown(self) {
        #[cfg(feature = "opentelemetry")]
        if let Some(provider) = self.provider {
            if let Err(e) = provider.shutdown() {
                tracing::warn!(error = %e, "stopping the trace pipeline failed");
            }
        }
    }
}

/// Installs the global `tracing` subscriber: log lines on stderr filtered by `RUST_LOG`
/// (`info` when unset), and with the `opentelemetry` feature and `export_spans`, the trace
/// pipeline of [`SPAN_LINE_PREFIX`] lines for `service`.
pub fn init(service: &'static str, export_spans: bool) -> Telemetry {
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(
            EnvFilter::builder()
                .with_default_directive(LevelFilter::INFO.into())
                .from_env_lossy(),
        );
    #[cfg(feature = "opentelemetry")]
    {
        let (traces, provider) = if export_spans {
            let (layer, provider) = otel::layer(service);
            (Some(layer), Some(provider))
        } else {
            (None, None)
        };
        tracing_subscriber::registry()
            .with(logs)
            .with(traces)
            .init();
        Telemetry { provider }
    }
    #[cfg(not(feature = "opentelemetry"))]
    {
        let _ = (service, export_spans);
        tracing_subscriber::registry().with(logs).init();
        Telemetry {}
    }
}

#[cfg(feature = "opentelemetry")]
mod otel {
    use std::fmt::Write as _;
    use std::io::Write as _;

    use opentelemetry::trace::{Status, TracerProvider as _};
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
    use opentelemetry_sdk::Resource;
    use tracing_subscriber::filter::EnvFilter;
    use tracing_subscriber::registry::LookupSpan;
    use tracing_subscriber::Layer;

    /// The `tracing-opentelemetry` layer and the provider behind it.
    pub(super) fn layer<S>(service: &'static str) -> (impl Layer<S>, SdkTracerProvider)
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    {
        // stream-core writes and reads `traceparent`/`tracestate` through the global
        // propagator; without one installed, nothing crosses the broker.
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        // The simple processor exports each span as it ends, on the thread that ended it:
        // no background task to flush at exit, which suits a demonstration that writes to
        // stderr. A service sending spans over the network would use a batch processor.
        let provider = SdkTracerProvider::builder()
            .with_resource(Resource::builder().with_service_name(service).build())
            .with_simple_exporter(LineExporter::default())
            .build();
        let layer = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("stream-examples"))
            // Keep the span lines to what a reader needs: the ids and the span's own fields.
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_target(false)
            // stream-core's `stream.send` and `stream.handle` spans (and stream-outbox's
            // `stream.outbox`) are DEBUG so that services logging at INFO pay nothing for
            // them; this layer wants them, and the services' own INFO spans, whatever
            // RUST_LOG says about log lines.
            .with_filter(EnvFilter::new("info,stream_core=debug,stream_outbox=debug"));
        (layer, provider)
    }

    /// Writes each finished span as one line on stderr:
    ///
    /// `span trace_id=… span_id=… parent_id=… [parent_remote=true] service=… name=… duration_ms=… field=value…`
    ///
    /// `parent_id` is `-` for a root span; `parent_remote=true` marks a parent that came
    /// from another process, through the message's `traceparent` header.
    #[derive(Debug, Default)]
    struct LineExporter {
        service: String,
    }

    impl SpanExporter for LineExporter {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            let mut out = String::new();
            for span in &batch {
                line(&mut out, &self.service, span);
            }
            // One write for the batch, so that lines do not interleave with log lines
            // written by other threads.
            let _ = std::io::stderr().lock().write_all(out.as_bytes());
            Ok(())
        }

        fn set_resource(&mut self, resource: &Resource) {
            if let Some(name) = resource.get(&opentelemetry::Key::new("service.name")) {
                self.service = name.to_string();
            }
        }
    }

    fn line(out: &mut String, service: &str, span: &SpanData) {
        let context = &span.span_context;
        let _ = write!(
            out,
            "{}trace_id={} span_id={} parent_id=",
            super::SPAN_LINE_PREFIX,
            context.trace_id(),
            context.span_id(),
        );
        if span.parent_span_id == opentelemetry::trace::SpanId::INVALID {
            out.push('-');
        } else {
            let _ = write!(out, "{}", span.parent_span_id);
        }
        if span.parent_span_is_remote {
            out.push_str(" parent_remote=true");
        }
        let took = span
            .end_time
            .duration_since(span.start_time)
            .unwrap_or_default();
        let _ = write!(
            out,
            " service={service} name={} duration_ms={:.3}",
            span.name,
            took.as_secs_f64() * 1e3
        );
        for attribute in &span.attributes {
            let _ = write!(out, " {}=", attribute.key);
            value(out, &attribute.value.as_str());
        }
        if let Status::Error { description } = &span.status {
            out.push_str(" status=error status_message=");
            value(out, description);
        }
        out.push('\n');
    }

    /// A value as is when it is one word, quoted otherwise, so that lines split on spaces.
    fn value(out: &mut String, value: &str) {
        if !value.is_empty()
            && value
                .chars()
                .all(|c| !c.is_whitespace() && !c.is_control() && c != '"' && c != '=')
        {
            out.push_str(value);
        } else {
            let _ = write!(out, "{value:?}");
        }
    }
}
