//! Metric handles, registered once per source or consumer so that each message only bumps
//! them (a no-op without a recorder).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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
        ErrorKind::Unsupported => "unsupported",
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
    wall: WallClock,
}

/// The wall clock read from the monotonic one: a handler's end time is at hand anyway, and
/// a second clock read per message cost more than the rest of the latency metric.
struct WallClock {
    base: Instant,
    /// Wall-clock nanoseconds since the epoch at `base`, as of the last re-reading.
    offset: AtomicU64,
    /// When (nanoseconds after `base`) the offset was last read from the wall clock.
    read_at: AtomicU64,
}

/// How long a wall-clock reading is trusted; re-reading it follows clock adjustments.
const WALL_CLOCK_REREAD: Duration = Duration::from_secs(1);

impl WallClock {
    fn new() -> Self {
        let clock = WallClock {
            base: Instant::now(),
            offset: AtomicU64::new(0),
            read_at: AtomicU64::new(0),
        };
        clock.reread(0);
        clock
    }

    fn reread(&self, since_base: u64) {
        let wall = nanos(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default(),
        );
        self.offset
            .store(wall.saturating_sub(since_base), Ordering::Relaxed);
        self.read_at.store(since_base, Ordering::Relaxed);
    }

    /// The wall-clock time at `at`, in nanoseconds since the epoch.
    fn at(&self, at: Instant) -> u64 {
        let since_base = nanos(at.saturating_duration_since(self.base));
        if since_base.saturating_sub(self.read_at.load(Ordering::Relaxed))
            > nanos(WALL_CLOCK_REREAD)
        {
            // Racing re-readings store near-equal values; any of them will do.
            self.reread(since_base);
        }
        self.offset.load(Ordering::Relaxed) + since_base
    }
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
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
            wall: WallClock::new(),
        }
    }

    pub(crate) fn dead_lettered(&self, reason: DeadLetterReason) {
        match reason {
            DeadLetterReason::Handler => self.dead_lettered_handler.increment(1),
            DeadLetterReason::Rejected => self.dead_lettered_rejected.increment(1),
            DeadLetterReason::Decode => self.dead_lettered_decode.increment(1),
        }
    }

    /// Records the time from the message's send to `handled` (its handler's end), when it
    /// carries its send time.
    pub(crate) fn arrived(&self, message: &Message, handled: Instant) {
        // Without a recorder the histogram drops the value; the header is parsed anyway,
        // which costs less than asking whether anyone listens.
        if let Some(sent) = sent_at_millis(message) {
            let now = self.wall.at(handled);
            if let Some(took) = now.checked_sub(sent.saturating_mul(1_000_000)) {
                self.latency.record(took as f64 / 1e9);
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

fn sent_at_millis(message: &Message) -> Option<u64> {
    message.headers().get(header::SENT_AT)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_time_round_trips_through_its_header() {
        let before = SystemTime::now();
        let stamped = Message::new(&b"x"[..]).with_header(header::SENT_AT, now_millis());
        let sent =
            UNIX_EPOCH + Duration::from_millis(sent_at_millis(&stamped).expect("a send time"));
        let after = SystemTime::now();
        let slack = Duration::from_millis(1);
        assert!(
            sent + slack >= before && sent <= after,
            "{sent:?} between {before:?} and {after:?}"
        );
        assert!(
            sent_at_millis(&Message::new(&b"x"[..]).with_header(header::SENT_AT, "soon")).is_none()
        );
    }

    #[test]
    fn the_wall_clock_read_from_the_monotonic_one_matches_the_real_one() {
        let clock = WallClock::new();
        let before = nanos(SystemTime::now().duration_since(UNIX_EPOCH).unwrap());
        let read = clock.at(Instant::now());
        let after = nanos(SystemTime::now().duration_since(UNIX_EPOCH).unwrap());
        // Within a millisecond: the header it is compared with counts milliseconds.
        let slack = 1_000_000;
        assert!(
            read + slack >= before && read <= after + slack,
            "{read} between {before} and {after}"
        );
    }
}
