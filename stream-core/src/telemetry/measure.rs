//! Metric handles, registered once per source or consumer so that each message only bumps
//! them (a no-op without a recorder).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics::{Counter, Gauge, Histogram, Label};

use crate::message::{header, Message};
use crate::ErrorKind;

/// The metric names, as documented in [`crate::telemetry`].
pub mod names {
    /// Counter: messages the broker accepted.
    pub const PUBLISHED: &str = "stream_published_total";
    /// Counter: messages a send failed for; label `kind`.
    pub const PUBLISH_FAILURES: &str = "stream_publish_failures_total";
    /// Counter: deliveries fetched from the broker.
    pub const RECEIVED: &str = "stream_received_total";
    /// Counter: deliveries handled successfully.
    pub const HANDLED: &str = "stream_handled_total";
    /// Counter: failed attempts (an error, a panic, a nack).
    pub const HANDLER_ERRORS: &str = "stream_handler_errors_total";
    /// Counter: attempts after the first.
    pub const RETRIES: &str = "stream_retries_total";
    /// Counter: messages published to the dead-letter destination; label `reason`.
    pub const DEAD_LETTERED: &str = "stream_dead_lettered_total";
    /// Counter: deliveries whose payload did not decode.
    pub const UNDECODABLE: &str = "stream_undecodable_total";
    /// Histogram: seconds in the handler, per attempt.
    pub const HANDLER_DURATION: &str = "stream_handler_duration_seconds";
    /// Histogram: seconds from the send to the handler's success.
    pub const END_TO_END_LATENCY: &str = "stream_end_to_end_latency_seconds";
    /// Gauge: deliveries in a handler right now.
    pub const IN_FLIGHT: &str = "stream_in_flight_deliveries";
    /// Gauge: deliveries held un-acknowledged.
    pub const WINDOW_USED: &str = "stream_prefetch_window_used";
    /// Gauge: messages the group has not acknowledged yet, group-wide.
    pub const LAG: &str = "stream_consumer_lag";
}

/// The label set of one source.
fn source_labels(binding: &str, destination: &str) -> Vec<Label> {
    vec![
        Label::new("binding", binding.to_owned()),
        Label::new("destination", destination.to_owned()),
    ]
}

/// The metrics of one source.
#[derive(Clone)]
pub(crate) struct SourceMetrics {
    labels: Vec<Label>,
    published: Counter,
}

impl SourceMetrics {
    pub(crate) fn new(binding: &str, destination: &str) -> Self {
        let labels = source_labels(binding, destination);
        SourceMetrics {
            published: metrics::counter!(names::PUBLISHED, labels.iter()),
            labels,
        }
    }

    pub(crate) fn published(&self, count: usize) {
        self.published.increment(count as u64);
    }

    pub(crate) fn failed(&self, count: usize, kind: ErrorKind) {
        let mut labels = self.labels.clone();
        labels.push(Label::new("kind", kind_label(kind)));
        metrics::counter!(names::PUBLISH_FAILURES, labels).increment(count as u64);
    }
}

fn kind_label(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::Config => "config",
        ErrorKind::UnknownBinderType => "unknown_binder_type",
        ErrorKind::MissingBinding => "missing_binding",
        ErrorKind::Connection => "connection",
        ErrorKind::Timeout => "timeout",
        ErrorKind::Broker => "broker",
        ErrorKind::Codec => "codec",
        ErrorKind::PayloadTooLarge => "payload_too_large",
        ErrorKind::DestinationNotFound => "destination_not_found",
        ErrorKind::Closed => "closed",
    }
}

/// Why a message was dead-lettered, as the `reason` label says it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum DeadLetterReason {
    Handler,
    Rejected,
    Decode,
}

/// The metrics of one consumer.
pub(crate) struct ConsumeMetrics {
    pub(crate) received: Counter,
    pub(crate) handled: Counter,
    pub(crate) handler_errors: Counter,
    pub(crate) retries: Counter,
    dead_lettered_handler: Counter,
    dead_lettered_rejected: Counter,
    dead_lettered_decode: Counter,
    pub(crate) undecodable: Counter,
    pub(crate) handler_duration: Histogram,
    latency: Histogram,
    pub(crate) in_flight: Gauge,
    pub(crate) window_used: Gauge,
    pub(crate) lag: Gauge,
}

impl ConsumeMetrics {
    pub(crate) fn new(binding: &str, destination: &str, group: &str) -> Self {
        let mut labels = source_labels(binding, destination);
        labels.push(Label::new("group", group.to_owned()));
        let with = |key: &'static str, value: &'static str| {
            let mut labels = labels.clone();
            labels.push(Label::new(key, value));
            labels
        };
        ConsumeMetrics {
            received: metrics::counter!(names::RECEIVED, labels.iter()),
            handled: metrics::counter!(names::HANDLED, labels.iter()),
            handler_errors: metrics::counter!(names::HANDLER_ERRORS, labels.iter()),
            retries: metrics::counter!(names::RETRIES, labels.iter()),
            dead_lettered_handler: metrics::counter!(
                names::DEAD_LETTERED,
                with("reason", "handler")
            ),
            dead_lettered_rejected: metrics::counter!(
                names::DEAD_LETTERED,
                with("reason", "rejected")
            ),
            dead_lettered_decode: metrics::counter!(names::DEAD_LETTERED, with("reason", "decode")),
            undecodable: metrics::counter!(names::UNDECODABLE, labels.iter()),
            handler_duration: metrics::histogram!(names::HANDLER_DURATION, labels.iter()),
            latency: metrics::histogram!(names::END_TO_END_LATENCY, labels.iter()),
            in_flight: metrics::gauge!(names::IN_FLIGHT, labels.iter()),
            window_used: metrics::gauge!(names::WINDOW_USED, labels.iter()),
            lag: metrics::gauge!(names::LAG, labels.iter()),
        }
    }

    pub(crate) fn dead_lettered(&self, reason: DeadLetterReason) {
        match reason {
            DeadLetterReason::Handler => self.dead_lettered_handler.increment(1),
            DeadLetterReason::Rejected => self.dead_lettered_rejected.increment(1),
            DeadLetterReason::Decode => self.dead_lettered_decode.increment(1),
        }
    }

    /// Records the time from the message's send to now, when it carries its send time.
    pub(crate) fn arrived(&self, message: &Message) {
        // Without a recorder the histogram drops the value; the header is parsed anyway,
        // which costs less than asking whether anyone listens.
        if let Some(sent) = sent_at(message) {
            if let Ok(took) = SystemTime::now().duration_since(sent) {
                self.latency.record(took.as_secs_f64());
            }
        }
    }
}

/// Milliseconds since the Unix epoch, as [`header::SENT_AT`] carries them. Written without
/// `format!`: every send pays for it.
pub(crate) fn now_millis() -> std::sync::Arc<str> {
    let mut millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (millis % 10) as u8;
        millis /= 10;
        if millis == 0 {
            break;
        }
    }
    // Only ASCII digits were written.
    std::sync::Arc::from(std::str::from_utf8(&digits[start..]).unwrap_or("0"))
}

fn sent_at(message: &Message) -> Option<SystemTime> {
    let millis: u64 = message.headers().get(header::SENT_AT)?.parse().ok()?;
    UNIX_EPOCH.checked_add(Duration::from_millis(millis))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_time_round_trips_through_its_header() {
        let before = SystemTime::now();
        let stamped = Message::new(&b"x"[..]).with_header(header::SENT_AT, now_millis());
        let sent = sent_at(&stamped).expect("a send time");
        let after = SystemTime::now();
        let slack = Duration::from_millis(1);
        assert!(
            sent + slack >= before && sent <= after,
            "{sent:?} between {before:?} and {after:?}"
        );
        assert!(sent_at(&Message::new(&b"x"[..]).with_header(header::SENT_AT, "soon")).is_none());
    }
}
