//! The spans of sends and handler attempts, and W3C Trace Context in message headers.

use tracing::field::Empty;
use tracing::Span;

use crate::message::Headers;

/// The span of one send (or one batch, then without a key).
pub(crate) fn send_span(binding: &str, destination: &str, key: Option<&str>) -> Span {
    // Text fields go as `Display`: `&str` fields are recorded as `Debug`, which a
    // formatting subscriber escapes character by character.
    tracing::debug_span!(
        "stream.send",
        binding = %binding,
        destination = %destination,
        message.key = key.map(tracing::field::display),
        message.id = Empty,
        error = Empty,
    )
}

/// The span of one attempt of a handler.
pub(crate) fn handle_span(
    binding: &str,
    destination: &str,
    group: &str,
    id: &str,
    key: Option<&str>,
    attempt: u32,
) -> Span {
    tracing::debug_span!(
        "stream.handle",
        binding = %binding,
        destination = %destination,
        group = %group,
        message.id = %id,
        message.key = key.map(tracing::field::display),
        attempt,
        outcome = Empty,
        error = Empty,
    )
}

/// The span of one attempt of a batch handler.
pub(crate) fn batch_span(
    binding: &str,
    destination: &str,
    group: &str,
    size: usize,
    attempt: u32,
) -> Span {
    tracing::debug_span!(
        "stream.handle_batch",
        binding = %binding,
        destination = %destination,
        group = %group,
        batch.size = size,
        attempt,
        outcome = Empty,
        failed = Empty,
        error = Empty,
    )
}

/// What became of an attempt, as the `outcome` field says it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum AttemptOutcome {
    Ok,
    Retry,
    DeadLetter,
    Interrupted,
    /// Some items of a batch failed, the others succeeded.
    Partial,
}

impl AttemptOutcome {
    pub(crate) fn record(self, span: &Span) {
        span.record(
            "outcome",
            tracing::field::display(match self {
                AttemptOutcome::Ok => "ok",
                AttemptOutcome::Retry => "retry",
                AttemptOutcome::DeadLetter => "dead_letter",
                AttemptOutcome::Interrupted => "interrupted",
                AttemptOutcome::Partial => "partial",
            }),
        );
    }
}

/// Writes the trace context of `span` into `headers`, unless they carry one already (a
/// no-op without the `opentelemetry` feature).
#[cfg(feature = "opentelemetry")]
pub(crate) fn inject(span: &Span, headers: &mut Headers) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    struct Injector<'a>(&'a mut Headers);
    impl opentelemetry::propagation::Injector for Injector<'_> {
        fn set(&mut self, key: &str, value: String) {
            self.0.insert(key, value);
        }
    }

    // A message that carries a context already keeps it: an outbox event carries the
    // context of the transaction that wrote it, a redriven dead letter its original one.
    if headers.get("traceparent").is_some() {
        return;
    }
    let context = span.context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut Injector(headers));
    });
}

#[cfg(not(feature = "opentelemetry"))]
pub(crate) fn inject(_span: &Span, _headers: &mut Headers) {}

#[cfg(feature = "opentelemetry")]
struct Extractor<'a>(&'a Headers);

#[cfg(feature = "opentelemetry")]
impl opentelemetry::propagation::Extractor for Extractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name).collect()
    }
}

/// Makes the trace context carried in `headers` the parent of `span` (a no-op without the
/// `opentelemetry` feature, or when the headers carry none).
#[cfg(feature = "opentelemetry")]
pub(crate) fn adopt_parent(span: &Span, headers: &Headers) {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    if span.is_disabled() {
        return;
    }
    let context = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&Extractor(headers))
    });
    if context.span().span_context().is_valid() {
        // Fails only when no OpenTelemetry layer is installed, when there is nothing to link.
        let _ = span.set_parent(context);
    }
}

#[cfg(not(feature = "opentelemetry"))]
pub(crate) fn adopt_parent(_span: &Span, _headers: &Headers) {}

/// Links `span` to the trace context carried in `headers`: a batch has many parents, which
/// OpenTelemetry records as links (a no-op without the `opentelemetry` feature).
#[cfg(feature = "opentelemetry")]
pub(crate) fn link(span: &Span, headers: &Headers) {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    if span.is_disabled() {
        return;
    }
    let context = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&Extractor(headers))
    });
    let linked = context.span().span_context().clone();
    if linked.is_valid() {
        span.add_link(linked);
    }
}

#[cfg(not(feature = "opentelemetry"))]
pub(crate) fn link(_span: &Span, _headers: &Headers) {}
