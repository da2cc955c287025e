//! The attempts of one delivery: decode, call the handler, retry with backoff, dead-letter.

use std::error::Error as StdError;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::FutureExt;
use tokio::sync::watch;
use tracing::Instrument;

use crate::binder::{DeliveryTag, Received};
use crate::codec::{decode_message, Codec};
use crate::config::RetryConfig;
use crate::dead_letter::{Cause, DeadLetter};
use crate::engine::inbound::{Fault, Inbound, Members, Names};
use crate::handler::{action_of, Action, Handle};
use crate::sink::Envelope;
use crate::telemetry::measure::ConsumeMetrics;
use crate::telemetry::trace::{self, AttemptOutcome};
use crate::{BoxError, Error, Message};

/// Calls one delivery's handler until it succeeds, or dead-letters it.
pub(crate) struct Worker<T> {
    pub(crate) codec: Arc<dyn Codec<T>>,
    pub(crate) handler: Arc<dyn Handle<Envelope<T>>>,
    pub(crate) retry: RetryConfig,
    pub(crate) dead_letters: DeadLetters,
    pub(crate) members: Arc<Members>,
    pub(crate) stopping: watch::Receiver<bool>,
    pub(crate) metrics: Arc<ConsumeMetrics>,
    pub(crate) names: Arc<Names>,
}

/// How the worker finished with a delivery.
pub(crate) enum Outcome {
    /// Handled or dead-lettered: acknowledge it.
    Ack(DeliveryTag),
    /// The binder gave it to another member during a retry backoff; that member handles it.
    Drop(DeliveryTag),
    /// Shutdown interrupted it; the broker delivers it again.
    Interrupted,
}

impl Outcome {
    pub(crate) fn acked_if(done: bool, tag: DeliveryTag) -> Outcome {
        if done {
            Outcome::Ack(tag)
        } else {
            Outcome::Interrupted
        }
    }
}

/// What comes after a failed attempt.
pub(crate) enum NextStep {
    /// Try again after this wait.
    RetryIn(Duration),
    /// Dead-letter now, for this reason.
    GiveUp(Cause),
}

impl NextStep {
    /// What the retry policy says after `attempt` failed with `error`.
    pub(crate) fn after(
        retry: &RetryConfig,
        attempt: u32,
        error: &(dyn StdError + 'static),
    ) -> Self {
        match action_of(error) {
            Action::Reject => NextStep::GiveUp(Cause::Rejected),
            _ if attempt >= retry.max_attempts => NextStep::GiveUp(Cause::Handler),
            Action::RetryAfter(delay) => NextStep::RetryIn(delay),
            _ => NextStep::RetryIn(retry.backoff(attempt)),
        }
    }
}

impl<T: Send + 'static> Worker<T> {
    /// Handles one delivery to the end: success, or retries and dead letter. `started` is
    /// when the dispatcher took it; returns what became of it and when the handler ended
    /// (one clock read per message serves the duration, the latency and the pace).
    pub(crate) async fn process(&self, received: Received, started: Instant) -> (Outcome, Instant) {
        let (outcome, ended) = self.attempts(received, started).await;
        (outcome, ended.unwrap_or_else(Instant::now))
    }

    async fn attempts(&self, received: Received, started: Instant) -> (Outcome, Option<Instant>) {
        let mut started = started;
        let tag = received.tag;
        let message = Arc::new(received.message);
        let mut attempt = received.attempt.max(1);
        let mut first_failure = None;
        if let Some(defect) = received.defect {
            self.metrics.undecodable.increment(1);
            let done = self
                .dead_letters
                .publish(
                    &message,
                    attempt,
                    Cause::Decode,
                    &*BoxError::from(defect),
                    SystemTime::now(),
                )
                .await;
            return (Outcome::acked_if(done, tag), None);
        }
        if attempt > self.retry.max_attempts {
            let done = self.dead_letters.exhausted(&message, attempt).await;
            return (Outcome::acked_if(done, tag), None);
        }
        loop {
            let payload = match decode(&*self.codec, &message) {
                Ok(payload) => payload,
                Err(e) => {
                    self.metrics.undecodable.increment(1);
                    let first = first_failure.unwrap_or_else(SystemTime::now);
                    let done = self
                        .dead_letters
                        .publish(&message, attempt, Cause::Decode, &*e, first)
                        .await;
                    return (Outcome::acked_if(done, tag), None);
                }
            };
            let span = trace::handle_span(
                &self.names.binding,
                &self.names.destination,
                &self.names.group,
                message.id(),
                message.key(),
                attempt,
            );
            trace::adopt_parent(&span, message.headers());
            if attempt > 1 {
                self.metrics.retries.increment(1);
            }
            let envelope = Envelope::new(payload, message.clone(), attempt);
            self.metrics.in_flight.increment(1.0);
            let (outcome, span) = call_guarded(&*self.handler, envelope, span).await;
            self.metrics.in_flight.decrement(1.0);
            let ended = Instant::now();
            self.metrics
                .handler_duration
                .record(ended.saturating_duration_since(started).as_secs_f64());
            let error = match outcome {
                Ok(()) => {
                    self.metrics.handled.increment(1);
                    self.metrics.arrived(&message, ended);
                    AttemptOutcome::Ok.record(&span);
                    return (Outcome::Ack(tag), Some(ended));
                }
                Err(error) => error,
            };
            self.metrics.handler_errors.increment(1);
            span.record("error", tracing::field::display(&error));
            let first = *first_failure.get_or_insert_with(SystemTime::now);
            let wait = match NextStep::after(&self.retry, attempt, &*error) {
                NextStep::GiveUp(cause) => {
                    AttemptOutcome::DeadLetter.record(&span);
                    let done = self
                        .dead_letters
                        .publish(&message, attempt, cause, &*error, first)
                        .instrument(span)
                        .await;
                    return (Outcome::acked_if(done, tag), None);
                }
                NextStep::RetryIn(wait) => wait,
            };
            tracing::debug!(parent: &span, id = %message.id(), attempt, retry_in = ?wait, error = %error, "handler failed; retrying");
            let mut stopping = self.stopping.clone();
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                // The message stays un-acknowledged in the broker, which redelivers it.
                _ = stopping.wait_for(|s| *s) => {
                    AttemptOutcome::Interrupted.record(&span);
                    return (Outcome::Interrupted, None);
                }
            }
            AttemptOutcome::Retry.record(&span);
            drop(span);
            if !self.members.holds(tag) {
                // Moved to another member during the backoff (a Kafka rebalance that could
                // not wait for it): that member tries it next; trying here too would run it
                // twice at once and break its key's order.
                return (Outcome::Drop(tag), None);
            }
            attempt += 1;
            self.members.retrying(tag, attempt).await;
            started = Instant::now();
        }
    }
}

/// Calls `handler` inside `span`, turning a panic in the call or in its future into a
/// failed attempt. Gives the span back.
pub(crate) async fn call_guarded<R: 'static>(
    handler: &dyn Handle<R>,
    request: R,
    span: tracing::Span,
) -> (Result<(), BoxError>, tracing::Span) {
    // Both halves can panic: the closure before it returns its future, and the future.
    let called =
        span.in_scope(|| std::panic::catch_unwind(AssertUnwindSafe(|| handler.handle(request))));
    let (outcome, span) = match called {
        Ok(handling) => {
            // The span goes into the future and comes back out of it: cloning it would cost
            // a registry update per message when spans are on.
            let mut handling = AssertUnwindSafe(handling).catch_unwind().instrument(span);
            let outcome = (&mut handling).await;
            let span = std::mem::replace(handling.span_mut(), tracing::Span::none());
            (outcome, span)
        }
        Err(panic) => (Err(panic), span),
    };
    let outcome = match outcome {
        Ok(done) => done,
        Err(panic) => Err(format!("handler panicked: {}", panic_text(&*panic)).into()),
    };
    (outcome, span)
}

/// Publishes dead letters for a subscription: retries temporary broker failures until it
/// worked or shutdown began; a permanent failure stops the subscription with that error,
/// since retrying it would hold the key (and, at concurrency 1, the binding) forever.
pub(crate) struct DeadLetters {
    pub(crate) dead_letter: Arc<DeadLetter>,
    pub(crate) fault: Arc<Fault>,
    pub(crate) stopping: watch::Receiver<bool>,
    pub(crate) metrics: Arc<ConsumeMetrics>,
}

impl DeadLetters {
    pub(crate) fn of(inbound: &Inbound) -> Self {
        DeadLetters {
            dead_letter: inbound.dead_letter.clone(),
            fault: inbound.fault.clone(),
            stopping: inbound.stop.subscribe(),
            metrics: inbound.metrics.clone(),
        }
    }

    /// Returns whether the original may be acknowledged.
    pub(crate) async fn publish(
        &self,
        message: &Message,
        attempts: u32,
        cause: Cause,
        error: &(dyn StdError + Send + Sync + 'static),
        first_failure: SystemTime,
    ) -> bool {
        let mut failures = 0;
        loop {
            match self
                .dead_letter
                .publish(message, attempts, cause, error, first_failure)
                .await
            {
                Ok(()) => {
                    self.metrics.dead_lettered(cause.reason());
                    return true;
                }
                Err(e) if !e.is_temporary() => {
                    self.fault
                        .fail(dead_letter_refused(&self.dead_letter, message, e));
                    return false;
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, id = %message.id(), "dead-letter publish failed; retrying");
                    let mut stopping = self.stopping.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(crate::engine::inbound::reconnect_backoff(failures)) => {}
                        _ = stopping.wait_for(|s| *s) => return false,
                    }
                }
            }
        }
    }

    /// Dead-letters a delivery whose every attempt ended without an outcome: earlier
    /// consumers stopped or died during each, and calling the handler again could crash
    /// this one too.
    pub(crate) async fn exhausted(&self, message: &Message, attempt: u32) -> bool {
        let made = attempt - 1;
        let error = exhausted_error(made);
        self.publish(message, made, Cause::Handler, &*error, SystemTime::now())
            .await
    }
}

/// The error of a delivery whose `made` attempts all ended without an outcome.
pub(crate) fn exhausted_error(made: u32) -> BoxError {
    format!(
        "{made} earlier attempts ended without an outcome (the consumer crashed or stopped during each)"
    )
    .into()
}

/// The error a subscription or stream ends with when its dead-letter destination refuses a
/// message for good.
pub(crate) fn dead_letter_refused(dead_letter: &DeadLetter, message: &Message, e: Error) -> Error {
    Error::new(
        e.kind(),
        format!(
            "dead-lettering message {} to `{}` failed for good, so the consumer stopped; the \
             message stays un-acknowledged",
            message.id(),
            dead_letter.destination()
        ),
    )
    .with_source(e)
}

/// Decodes, turning a codec that panics into a decode error rather than a dead consumer.
pub(crate) fn decode<T: 'static>(
    codec: &dyn Codec<T>,
    message: &Message,
) -> std::result::Result<T, BoxError> {
    match std::panic::catch_unwind(AssertUnwindSafe(|| decode_message(codec, message))) {
        Ok(Ok(payload)) => Ok(payload),
        Ok(Err(e)) => Err(e.into()),
        Err(panic) => Err(format!("codec panicked: {}", panic_text(&*panic)).into()),
    }
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("non-text panic payload")
}
