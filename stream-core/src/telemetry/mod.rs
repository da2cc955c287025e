//! What the library reports about itself: metrics through the [`metrics`] facade, spans
//! through [`tracing`], and (with the `opentelemetry` feature) W3C Trace Context carried in
//! message headers.
//!
//! Nothing here needs setting up: without a `metrics` recorder or a `tracing` subscriber the
//! calls cost next to nothing. A service installs what it already uses (for example
//! `metrics-exporter-prometheus` and `tracing-subscriber`) and gets the names below.
//!
//! # Metrics
//!
//! Every metric carries the labels `binding` and `destination`; consumer metrics also carry
//! `group`. Names follow Prometheus conventions (`_total` counters, `_seconds` histograms).
//!
//! | name | type | extra labels | what |
//! |---|---|---|---|
//! | `stream_published_total` | counter | | messages the broker accepted |
//! | `stream_publish_failures_total` | counter | `kind` | messages a send failed for, by [`ErrorKind`](crate::ErrorKind) |
//! | `stream_received_total` | counter | | deliveries fetched from the broker |
//! | `stream_handled_total` | counter | | deliveries whose handler returned `Ok` (or that were acked) |
//! | `stream_handler_errors_total` | counter | | failed attempts: an error, a panic, a nack |
//! | `stream_retries_total` | counter | | attempts after the first |
//! | `stream_dead_lettered_total` | counter | `reason` (`handler`, `rejected`, `decode`) | messages published to the dead-letter destination |
//! | `stream_undecodable_total` | counter | | deliveries whose payload did not decode |
//! | `stream_handler_duration_seconds` | histogram | | time in the handler, per attempt |
//! | `stream_end_to_end_latency_seconds` | histogram | | from the send (the `x-sent-at` header) to the handler's success |
//! | `stream_in_flight_deliveries` | gauge | | deliveries in a handler right now |
//! | `stream_prefetch_window_used` | gauge | | deliveries held un-acknowledged, of `prefetch` |
//! | `stream_consumer_lag` | gauge | | messages of the destination the group has not acknowledged, group-wide, sampled every `lag-interval`, where the binder can tell ([`Consumer::lag`](crate::Consumer::lag)) |
//!
//! Every member of a group reports the same lag: aggregate it with `max` by group. One
//! exception: a partitioned binding on a binder without partitions of its own (Redis,
//! memory) with `instance-count` above 1 reads, and so reports, only its instance's
//! partition streams: aggregate those with `sum`.
//!
//! # Spans
//!
//! * `stream.send` (DEBUG) around each send: `binding`, `destination`, `message.key`,
//!   `message.id` (once the broker accepted it), `error` (when it failed).
//! * `stream.handle` (DEBUG) around each attempt of a subscription's handler, the handler
//!   running inside it: `binding`, `destination`, `group`, `message.id`, `message.key`,
//!   `attempt`, `outcome` (`ok`, `retry`, `dead_letter`, `interrupted`) and `error`.
//! * `stream.handle_batch` (DEBUG) around each call of a batch handler: `binding`,
//!   `destination`, `group`, `batch.size`, `attempt` (the highest of its items), `outcome`
//!   (`ok`, `retry` when every item failed, `partial`), `failed` (how many items) and
//!   `error`. A batch has as many parents as items: with the `opentelemetry` feature the
//!   span is linked to the trace context of each item.
//!
//! Spans are at DEBUG so that a service logging at INFO pays nothing per message; enable
//! `stream_core=debug` (or give a tracing-opentelemetry layer a filter that lets them
//! through) to see them.
//!
//! # Trace propagation
//!
//! With the `opentelemetry` feature, a send writes the context of its `stream.send` span into
//! the message's `traceparent` (and `tracestate`) headers through the globally installed
//! OpenTelemetry propagator, and each `stream.handle` span takes the context read from the
//! delivery's headers as its parent: one trace spans producer, broker and consumer, on any
//! binder, across retries, and the dead-lettered copy keeps the headers.

pub(crate) mod measure;
pub(crate) mod trace;

pub use measure::names;

/// Writes the trace context of `span` into `headers` (W3C `traceparent`/`tracestate`,
/// through the global propagator) unless they carry one already; a no-op without the
/// `opentelemetry` feature. For messages that reach a broker later, by another way than a
/// [`Source`](crate::Source) send in this span: an outbox event keeps the context of the
/// transaction that wrote it, and a [`Source`](crate::Source) that publishes it later keeps
/// that context instead of its own.
pub fn inject_context(span: &tracing::Span, headers: &mut crate::Headers) {
    trace::inject(span, headers);
}
