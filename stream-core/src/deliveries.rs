//! Pull-style consumption: a stream of deliveries acknowledged by the caller.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use futures::Stream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::binder::{DeliveryTag, Received};
use crate::codec::Codec;
use crate::config::RetryConfig;
use crate::dead_letter::{Cause, DeadLetter};
use crate::engine::inbound::{Backlog, Closer, Fault, Inbound, Members, Names, Settlement};
use crate::engine::worker::{dead_letter_refused, decode, exhausted_error, NextStep};
use crate::handler::HandlerError;
use crate::telemetry::measure::ConsumeMetrics;
use crate::telemetry::trace::{self, AttemptOutcome};
use crate::{BoxError, Error, ErrorKind, Message, Result};

/// A stream of [`Delivery`] values from [`Sink::stream`](crate::Sink::stream).
///
/// Payloads that do not decode never appear: they go to the dead-letter destination. The
/// stream yields in the order the binder delivers; a nacked delivery comes back after its
/// backoff, behind what was yielded meanwhile. Code that needs per-key order across failures
/// uses [`Sink::subscribe`](crate::Sink::subscribe), which holds a key back while it retries.
///
/// The stream ends (yields `None`) only after [`close`](Deliveries::close) began or after it
/// yielded an error that says why it cannot go on.
pub struct Deliveries<T> {
    deliveries: mpsc::UnboundedReceiver<Received>,
    backlog: Arc<Backlog>,
    retries: mpsc::UnboundedReceiver<Pending>,
    codec: Arc<dyn Codec<T>>,
    settle: Arc<Settle>,
    stop: tokio::sync::watch::Sender<bool>,
    fetcher: Option<JoinHandle<Result<()>>>,
    closer: Option<Closer>,
    /// An error was yielded; nothing more is.
    ended: bool,
}

/// One message from a [`Deliveries`] stream. Call [`ack`](Delivery::ack) when done or
/// [`nack`](Delivery::nack) to have it delivered again; dropping it counts as a nack.
pub struct Delivery<T> {
    payload: T,
    pending: Option<Pending>,
    settle: Arc<Settle>,
    /// The `stream.handle` span of this attempt.
    span: tracing::Span,
    yielded: std::time::Instant,
}

/// Acknowledges, schedules retries and dead-letters; independent of the payload type.
struct Settle {
    retry: RetryConfig,
    dead_letter: Arc<DeadLetter>,
    settlements: mpsc::UnboundedSender<Settlement>,
    members: Arc<Members>,
    fault: Arc<Fault>,
    retry_tx: mpsc::UnboundedSender<Pending>,
    metrics: Arc<ConsumeMetrics>,
    names: Arc<Names>,
}

/// A delivery on its way through attempts.
struct Pending {
    message: Message,
    tag: DeliveryTag,
    attempt: u32,
    first_failure: Option<SystemTime>,
}

impl<T: Send + 'static> Deliveries<T> {
    pub(crate) fn new(inbound: Inbound, codec: Arc<dyn Codec<T>>, retry: RetryConfig) -> Self {
        let (retry_tx, retries) = mpsc::unbounded_channel();
        let settle = Arc::new(Settle {
            retry,
            dead_letter: inbound.dead_letter,
            settlements: inbound.settle,
            members: inbound.members,
            fault: inbound.fault,
            retry_tx,
            metrics: inbound.metrics,
            names: inbound.names,
        });
        Deliveries {
            deliveries: inbound.deliveries,
            backlog: inbound.backlog,
            retries,
            codec,
            settle,
            stop: inbound.stop,
            fetcher: Some(inbound.fetcher),
            closer: Some(inbound.closer),
            ended: false,
        }
    }

    /// Stops fetching, hands back the deliveries fetched but not yet yielded (they are not
    /// counted as attempts), waits (up to the binding's `shutdown-timeout`) for deliveries
    /// already handed out to be acknowledged or dropped, then leaves the group.
    ///
    /// Cancel safety: the close runs in a task of its own; dropping this future does not
    /// stop it, only loses its result.
    pub async fn close(mut self) -> Result<()> {
        let Some(closing) = self.finish() else {
            return Ok(());
        };
        drop(self);
        closing.await.unwrap_or_else(|e| {
            Err(Error::new(ErrorKind::Closed, "closing the consumer failed").with_source(e))
        })
    }
}

impl<T> Deliveries<T> {
    /// Starts the close in a task of its own; `None` if it started before or there is no
    /// runtime to run it (then the binder's own drop hands everything back).
    fn finish(&mut self) -> Option<JoinHandle<Result<()>>> {
        let _ = self.stop.send(true);
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let closer = self.closer.take()?;
        let fetcher = self.fetcher.take();
        let (_, closed) = mpsc::unbounded_channel();
        let mut deliveries = std::mem::replace(&mut self.deliveries, closed);
        let backlog = self.backlog.clone();
        let settlements = self.settle.settlements.clone();
        Some(runtime.spawn(async move {
            let fetched = match fetcher {
                Some(fetcher) => fetcher.await.unwrap_or(Ok(())),
                None => Ok(()),
            };
            // The fetcher has ended, so this drains what it sent and stops.
            while let Some(received) = deliveries.recv().await {
                backlog.take();
                let _ = settlements.send(Settlement::Release(received.tag));
            }
            drop(settlements);
            let closed = closer.close().await;
            match (fetched, closed) {
                (Err(e), closed) => {
                    if let Err(also) = closed {
                        tracing::warn!(error = %also, "closing the consumer failed too");
                    }
                    Err(e)
                }
                (Ok(()), closed) => closed,
            }
        }))
    }
}

impl<T> Drop for Deliveries<T> {
    fn drop(&mut self) {
        if let Some(closing) = self.finish() {
            tokio::spawn(async move {
                if let Ok(Err(e)) = closing.await {
                    tracing::warn!(error = %e, "closing consumer failed");
                }
            });
        }
    }
}

impl<T: Send + 'static> Stream for Deliveries<T> {
    type Item = Result<Delivery<T>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.ended {
                return Poll::Ready(None);
            }
            if let Some(e) = this.settle.fault.take() {
                this.ended = true;
                return Poll::Ready(Some(Err(e)));
            }
            let pending = match this.retries.poll_recv(cx) {
                Poll::Ready(Some(pending)) => pending,
                _ => match this.deliveries.poll_recv(cx) {
                    Poll::Ready(Some(received)) => {
                        this.backlog.take();
                        let pending = Pending {
                            attempt: received.attempt.max(1),
                            message: received.message,
                            tag: received.tag,
                            first_failure: None,
                        };
                        if let Some(defect) = received.defect {
                            this.settle.metrics.undecodable.increment(1);
                            let settle = this.settle.clone();
                            tokio::spawn(async move {
                                let attempts = pending.attempt;
                                settle
                                    .give_up(pending, attempts, Cause::Decode, defect.into())
                                    .await;
                            });
                            continue;
                        }
                        pending
                    }
                    Poll::Ready(None) => {
                        // The fetcher ended: say why if it failed, once.
                        if let Some(fetcher) = this.fetcher.as_mut() {
                            let result = match Pin::new(fetcher).poll(cx) {
                                Poll::Ready(result) => result,
                                Poll::Pending => return Poll::Pending,
                            };
                            this.fetcher = None;
                            if let Ok(Err(e)) = result {
                                this.ended = true;
                                return Poll::Ready(Some(Err(e)));
                            }
                        }
                        if let Some(e) = this.settle.fault.take() {
                            this.ended = true;
                            return Poll::Ready(Some(Err(e)));
                        }
                        return Poll::Ready(None);
                    }
                    Poll::Pending => return Poll::Pending,
                },
            };
            if !this.settle.members.holds(pending.tag) {
                // The binder gave it to another member meanwhile, which delivers it.
                let _ = this.settle.settlements.send(Settlement::Drop(pending.tag));
                continue;
            }
            if pending.attempt > this.settle.retry.max_attempts {
                // Earlier consumers stopped or died during every attempt; do not hand it to
                // this one.
                let made = pending.attempt - 1;
                let error = exhausted_error(made);
                let settle = this.settle.clone();
                tokio::spawn(async move {
                    settle.give_up(pending, made, Cause::Handler, error).await;
                });
                continue;
            }
            match decode(&*this.codec, &pending.message) {
                Ok(payload) => {
                    let settle = &this.settle;
                    let span = trace::handle_span(
                        &settle.names.binding,
                        &settle.names.destination,
                        &settle.names.group,
                        pending.message.id(),
                        pending.message.key(),
                        pending.attempt,
                    );
                    trace::adopt_parent(&span, pending.message.headers());
                    if pending.attempt > 1 {
                        settle.metrics.retries.increment(1);
                    }
                    settle.metrics.in_flight.increment(1.0);
                    return Poll::Ready(Some(Ok(Delivery {
                        payload,
                        pending: Some(pending),
                        settle: this.settle.clone(),
                        span,
                        yielded: std::time::Instant::now(),
                    })));
                }
                Err(e) => {
                    this.settle.metrics.undecodable.increment(1);
                    let settle = this.settle.clone();
                    tokio::spawn(async move {
                        let attempts = pending.attempt;
                        settle.give_up(pending, attempts, Cause::Decode, e).await;
                    });
                }
            }
        }
    }
}

impl<T> Delivery<T> {
    /// The decoded value.
    pub fn payload(&self) -> &T {
        &self.payload
    }

    /// The message as received.
    pub fn message(&self) -> &Message {
        &self.pending().message
    }

    /// Which attempt this is, from 1, with the meaning of
    /// [`Envelope::attempt`](crate::Envelope::attempt).
    pub fn attempt(&self) -> u32 {
        self.pending().attempt
    }

    fn pending(&self) -> &Pending {
        self.pending.as_ref().expect("pending until ack or nack")
    }

    /// The `stream.handle` span of this attempt (see [`crate::telemetry`]): enter it, or
    /// instrument the work with it, so that what you do with the message joins its trace.
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }

    /// Marks the message handled; it is never delivered to this group again.
    pub fn ack(mut self) {
        if let Some(pending) = self.pending.take() {
            let now = self.finished();
            self.settle.metrics.handled.increment(1);
            self.settle.metrics.arrived(&pending.message, now);
            AttemptOutcome::Ok.record(&self.span);
            let _ = self.settle.settlements.send(Settlement::Ack(pending.tag));
        }
    }

    /// Marks the attempt failed: the message comes back after the retry backoff, or goes to
    /// the dead-letter destination with `error` once the binding's attempts are used up. A
    /// [`HandlerError`] in `error`'s chain asks for another delay, or rejects the message at
    /// once, as it does for a handler.
    pub fn nack(mut self, error: impl Into<BoxError>) {
        if let Some(pending) = self.pending.take() {
            self.failed(pending, error.into());
        }
    }

    /// Sends the message to the dead-letter destination now, with `error`, whatever
    /// attempts are left: `nack(HandlerError::reject(error))`.
    pub fn reject(self, error: impl Into<BoxError>) {
        self.nack(HandlerError::reject(error));
    }

    /// Records the end of the attempt; returns when that was.
    fn finished(&self) -> std::time::Instant {
        let metrics = &self.settle.metrics;
        metrics.in_flight.decrement(1.0);
        let now = std::time::Instant::now();
        metrics
            .handler_duration
            .record(now.saturating_duration_since(self.yielded).as_secs_f64());
        now
    }

    fn failed(&self, pending: Pending, error: BoxError) {
        self.finished();
        self.settle.metrics.handler_errors.increment(1);
        self.span.record("error", tracing::field::display(&error));
        let next = NextStep::after(&self.settle.retry, pending.attempt, &*error);
        match next {
            NextStep::GiveUp(_) => AttemptOutcome::DeadLetter,
            NextStep::RetryIn(_) => AttemptOutcome::Retry,
        }
        .record(&self.span);
        self.settle.clone().nack(pending, error, next);
    }
}

impl<T> Drop for Delivery<T> {
    fn drop(&mut self) {
        if let Some(pending) = self.pending.take() {
            self.failed(pending, "delivery dropped without ack or nack".into());
        }
    }
}

impl<T: fmt::Debug> fmt::Debug for Delivery<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("payload", &self.payload)
            .field("message", &self.pending.as_ref().map(|p| &p.message))
            .finish()
    }
}

impl<T> fmt::Debug for Deliveries<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deliveries").finish_non_exhaustive()
    }
}

impl Settle {
    fn nack(self: Arc<Self>, mut pending: Pending, error: BoxError, next: NextStep) {
        pending.first_failure.get_or_insert_with(SystemTime::now);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // Without a runtime nothing can be scheduled; the broker redelivers it.
            return;
        };
        let wait = match next {
            NextStep::GiveUp(cause) => {
                runtime.spawn(async move {
                    let attempts = pending.attempt;
                    self.give_up(pending, attempts, cause, error).await;
                });
                return;
            }
            NextStep::RetryIn(wait) => wait,
        };
        tracing::debug!(id = %pending.message.id(), attempt = pending.attempt, retry_in = ?wait, %error, "nacked; retrying");
        runtime.spawn(async move {
            tokio::time::sleep(wait).await;
            if self.retry_tx.is_closed() {
                // The stream is gone: the message stays un-acknowledged and is redelivered.
                return;
            }
            pending.attempt += 1;
            self.members.retrying(pending.tag, pending.attempt).await;
            let _ = self.retry_tx.send(pending);
        });
    }

    /// Dead-letters, then acknowledges. Temporary broker failures are retried while the
    /// stream lives; after that the message stays un-acknowledged and the broker delivers it
    /// again. A permanent failure ends the stream with that error.
    async fn give_up(&self, pending: Pending, attempts: u32, cause: Cause, error: BoxError) {
        let first = pending.first_failure.unwrap_or_else(SystemTime::now);
        let mut failures = 0;
        loop {
            match self
                .dead_letter
                .publish(&pending.message, attempts, cause, &*error, first)
                .await
            {
                Ok(()) => {
                    self.metrics.dead_lettered(cause.reason());
                    let _ = self.settlements.send(Settlement::Ack(pending.tag));
                    return;
                }
                Err(e) if !e.is_temporary() => {
                    self.fault
                        .fail(dead_letter_refused(&self.dead_letter, &pending.message, e));
                    return;
                }
                Err(e) if !self.retry_tx.is_closed() => {
                    failures += 1;
                    tracing::warn!(error = %e, id = %pending.message.id(), "dead-letter publish failed; retrying");
                    tokio::time::sleep(crate::engine::inbound::reconnect_backoff(failures)).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, id = %pending.message.id(), "dead-letter publish failed; message left for redelivery");
                    return;
                }
            }
        }
    }
}
