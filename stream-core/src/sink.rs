//! [`Sink`]: the typed consumer of one binding, handler style or pull style.

use std::fmt::{self, Display};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::binder::{DeliveryTag, Received};
use crate::channel::Channel;
use crate::codec::{decode_message, Codec};
use crate::config::RetryConfig;
use crate::dead_letter::{Cause, DeadLetter};
use crate::deliveries::Deliveries;
use crate::dispatch::KeyedQueue;
use crate::health::{Status, SubscriptionState};
use crate::inbound::{Backlog, Fault, Inbound, Members, Names, Settlement};
use crate::telemetry::measure::ConsumeMetrics;
use crate::telemetry::trace::{self, AttemptOutcome};
use crate::{Error, ErrorKind, Message, Result};

/// Consumes values of `T` from one binding.
///
/// * [`subscribe`](Sink::subscribe): a handler per message; `Ok` acknowledges, `Err` retries
///   with backoff and finally dead-letters. Keys keep their order, other keys run
///   concurrently up to the binding's `concurrency`.
/// * [`stream`](Sink::stream): a stream of [`Delivery`](crate::Delivery) values to
///   acknowledge yourself.
pub struct Sink<T> {
    channel: Channel,
    codec: Arc<dyn Codec<T>>,
}

impl<T> fmt::Debug for Sink<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sink")
            .field("channel", &self.channel)
            .finish()
    }
}

/// A decoded message handed to a handler, with what the broker knows about it.
#[derive(Debug)]
pub struct Envelope<T> {
    payload: T,
    message: Arc<Message>,
    attempt: u32,
}

impl<T> Envelope<T> {
    /// The decoded value.
    pub fn payload(&self) -> &T {
        &self.payload
    }

    /// The decoded value, by value.
    pub fn into_payload(self) -> T {
        self.payload
    }

    /// The message as received: id, key, headers, raw payload.
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// Which attempt this is, from 1: how many times a handler of this group has been
    /// given the message, this time included, on this consumer or on one that stopped or
    /// crashed during an earlier attempt. Deliveries that a closing consumer handed back
    /// unstarted do not count (see [`Consumer`](crate::Consumer)).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

type BoxHandler<T> =
    Arc<dyn Fn(Envelope<T>) -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

impl<T: Send + 'static> Sink<T> {
    pub(crate) fn new(channel: Channel, codec: Arc<dyn Codec<T>>) -> Self {
        Sink { channel, codec }
    }

    /// Runs `handler` for every message until the returned [`Subscription`] is shut down.
    pub async fn subscribe<F, Fut, E>(&self, handler: F) -> Result<Subscription>
    where
        F: Fn(T) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Display + Send + 'static,
    {
        self.subscribe_envelope(move |envelope: Envelope<T>| handler(envelope.into_payload()))
            .await
    }

    /// Like [`subscribe`](Sink::subscribe), with the key, headers and attempt number.
    pub async fn subscribe_envelope<F, Fut, E>(&self, handler: F) -> Result<Subscription>
    where
        F: Fn(Envelope<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Display + Send + 'static,
    {
        let handler: BoxHandler<T> = Arc::new(move |envelope| {
            let fut = handler(envelope);
            async move { fut.await.map_err(|e| e.to_string()) }.boxed()
        });
        let inbound = Inbound::open(&self.channel).await?;
        let (stopping_tx, stopping) = (inbound.stop.clone(), inbound.stop.subscribe());
        let (paused, status) = (inbound.paused.clone(), inbound.status.clone());
        let worker = Arc::new(Worker {
            codec: self.codec.clone(),
            handler,
            retry: self.channel.config.retry.clone(),
            dead_letter: inbound.dead_letter.clone(),
            members: inbound.members.clone(),
            fault: inbound.fault.clone(),
            stopping,
            metrics: inbound.metrics.clone(),
            names: inbound.names.clone(),
        });
        let supervisor = tokio::spawn(supervise(
            inbound,
            worker,
            self.channel.config.concurrency,
            self.channel.config.prefetch,
        ));
        Ok(Subscription {
            stop: stopping_tx,
            paused,
            status,
            supervisor: Some(supervisor),
        })
    }

    /// Opens a pull-style stream of deliveries.
    pub async fn stream(&self) -> Result<Deliveries<T>> {
        let inbound = Inbound::open(&self.channel).await?;
        Ok(Deliveries::new(
            inbound,
            self.codec.clone(),
            self.channel.config.retry.clone(),
        ))
    }
}

/// A running handler. [`shutdown`](Subscription::shutdown) stops it gracefully; dropping it
/// starts the same shutdown in the background.
///
/// A subscription ends only when it is shut down or with an error that says why: a handler
/// that returns an error or panics is a failed attempt of its message, never the end of the
/// subscription.
pub struct Subscription {
    stop: watch::Sender<bool>,
    paused: watch::Sender<bool>,
    status: Arc<Status>,
    supervisor: Option<JoinHandle<Result<()>>>,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("state", &self.status.get())
            .field("stopping", &*self.stop.borrow())
            .finish()
    }
}

impl Subscription {
    /// Stops fetching, lets running handlers finish and acknowledges them, then leaves the
    /// group. Deliveries fetched but not started are handed back without counting as
    /// attempts and go to another member (or this group's next consumer). Returns an error
    /// if the consumer had failed, or if handlers were still running when the binding's
    /// `shutdown-timeout` ran out.
    ///
    /// Cancel safety: dropping this future does not stop the shutdown, which goes on in the
    /// background exactly as if the subscription had been dropped; only its result is lost.
    pub async fn shutdown(mut self) -> Result<()> {
        let _ = self.stop.send(true);
        self.wait().await
    }

    /// Waits until the subscription ends by itself, which only a failure does (a consumer
    /// that cannot go on, a dead-letter destination that refuses a message for good), and
    /// returns that failure. Once it has returned, later calls and
    /// [`shutdown`](Subscription::shutdown) return `Ok(())` at once.
    ///
    /// Cancel safe: `select! { _ = signal => {}, r = sub.wait() => ... }` followed by
    /// `sub.shutdown()` shuts down as if `wait` had never been called.
    pub async fn wait(&mut self) -> Result<()> {
        let Some(handle) = self.supervisor.as_mut() else {
            return Ok(());
        };
        // Polled in place, not taken: a `wait` dropped half-way leaves the handle here.
        let ended = handle.await;
        self.supervisor = None;
        ended.unwrap_or_else(|e| {
            Err(Error::new(ErrorKind::Closed, "subscription task failed").with_source(e))
        })
    }

    /// Whether the subscription has ended.
    pub fn is_finished(&self) -> bool {
        self.supervisor.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops fetching and starting deliveries, without leaving the group: handlers already
    /// running finish and are acknowledged; what was fetched and not started stays held (on
    /// Redis its entries stay claimed by this member; on Kafka the member keeps polling, its
    /// partitions' fetch paused, so no rebalance follows). Nothing is lost or handed to
    /// another member. Pausing a paused subscription does nothing.
    pub fn pause(&self) {
        if !self.paused.send_replace(true) && !self.is_finished() {
            self.status.set(SubscriptionState::Paused);
        }
    }

    /// Continues after [`pause`](Subscription::pause): what was held starts first, then
    /// fetching resumes.
    pub fn resume(&self) {
        if self.paused.send_replace(false) && !self.is_finished() {
            self.status.set(SubscriptionState::Running);
        }
    }

    /// What the subscription is doing now.
    pub fn state(&self) -> SubscriptionState {
        self.status.get()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

struct Worker<T> {
    codec: Arc<dyn Codec<T>>,
    handler: BoxHandler<T>,
    retry: RetryConfig,
    dead_letter: Arc<DeadLetter>,
    members: Arc<Members>,
    fault: Arc<Fault>,
    stopping: watch::Receiver<bool>,
    metrics: Arc<ConsumeMetrics>,
    names: Arc<Names>,
}

/// How the worker finished with a delivery.
enum Outcome {
    /// Handled or dead-lettered: acknowledge it.
    Ack(DeliveryTag),
    /// The binder gave it to another member during a retry backoff; that member handles it.
    Drop(DeliveryTag),
    /// Shutdown interrupted it; the broker delivers it again.
    Interrupted,
}

impl Outcome {
    fn acked_if(done: bool, tag: DeliveryTag) -> Outcome {
        if done {
            Outcome::Ack(tag)
        } else {
            Outcome::Interrupted
        }
    }
}

impl<T: Send + 'static> Worker<T> {
    /// Handles one delivery to the end: success, or retries and dead letter. `started` is
    /// when the dispatcher took it; returns what became of it and when the handler ended
    /// (one clock read per message serves the duration, the latency and the pace).
    async fn process(&self, received: Received, started: Instant) -> (Outcome, Instant) {
        let outcome = self.attempts(received, started).await;
        (outcome.0, outcome.1.unwrap_or_else(Instant::now))
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
                .dead_letter(&message, attempt, Cause::Decode, &defect, SystemTime::now())
                .await;
            return (Outcome::acked_if(done, tag), None);
        }
        if attempt > self.retry.max_attempts {
            // Earlier consumers stopped or died during every attempt they made; calling the
            // handler again could crash this one too.
            let made = attempt - 1;
            let error = format!(
                "{made} earlier attempts ended without an outcome (the consumer crashed or stopped during each)"
            );
            let done = self
                .dead_letter(&message, made, Cause::Handler, &error, SystemTime::now())
                .await;
            return (Outcome::acked_if(done, tag), None);
        }
        loop {
            let payload = match decode(&*self.codec, &message) {
                Ok(payload) => payload,
                Err(e) => {
                    self.metrics.undecodable.increment(1);
                    let first = first_failure.unwrap_or_else(SystemTime::now);
                    let done = self
                        .dead_letter(&message, attempt, Cause::Decode, &e, first)
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
            let envelope = Envelope {
                payload,
                message: message.clone(),
                attempt,
            };
            self.metrics.in_flight.increment(1.0);
            // Both halves can panic: the closure before it returns its future, and the
            // future. Either is a failed attempt.
            let called = span.in_scope(|| {
                std::panic::catch_unwind(AssertUnwindSafe(|| (self.handler)(envelope)))
            });
            let (outcome, span) = match called {
                Ok(handling) => {
                    // The span goes into the future and comes back out of it: cloning it
                    // would cost a registry update per message when spans are on.
                    let mut handling = AssertUnwindSafe(handling).catch_unwind().instrument(span);
                    let outcome = (&mut handling).await;
                    let span = std::mem::replace(handling.span_mut(), tracing::Span::none());
                    (outcome, span)
                }
                Err(panic) => (Err(panic), span),
            };
            self.metrics.in_flight.decrement(1.0);
            let ended = Instant::now();
            self.metrics
                .handler_duration
                .record(ended.saturating_duration_since(started).as_secs_f64());
            let error = match outcome {
                Ok(Ok(())) => {
                    self.metrics.handled.increment(1);
                    self.metrics.arrived(&message, ended);
                    AttemptOutcome::Ok.record(&span);
                    return (Outcome::Ack(tag), Some(ended));
                }
                Ok(Err(e)) => e,
                Err(panic) => format!("handler panicked: {}", panic_text(&*panic)),
            };
            self.metrics.handler_errors.increment(1);
            span.record("error", error.as_str());
            let first = *first_failure.get_or_insert_with(SystemTime::now);
            if attempt >= self.retry.max_attempts {
                AttemptOutcome::DeadLetter.record(&span);
                let done = self
                    .dead_letter(&message, attempt, Cause::Handler, &error, first)
                    .instrument(span)
                    .await;
                return (Outcome::acked_if(done, tag), None);
            }
            let wait = self.retry.backoff(attempt);
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

    /// Publishes to the dead-letter destination, retrying temporary broker failures until it
    /// worked or shutdown began. A permanent failure stops the subscription with that error:
    /// retrying it would hold the key (and, at concurrency 1, the binding) forever. Returns
    /// whether the original may be acknowledged.
    async fn dead_letter(
        &self,
        message: &Message,
        attempts: u32,
        cause: Cause,
        error: &str,
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
                        _ = tokio::time::sleep(crate::inbound::reconnect_backoff(failures)) => {}
                        _ = stopping.wait_for(|s| *s) => return false,
                    }
                }
            }
        }
    }
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
) -> std::result::Result<T, String> {
    match std::panic::catch_unwind(AssertUnwindSafe(|| decode_message(codec, message))) {
        Ok(Ok(payload)) => Ok(payload),
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => Err(format!("codec panicked: {}", panic_text(&*panic))),
    }
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("non-text panic payload")
}

async fn supervise<T: Send + 'static>(
    inbound: Inbound,
    worker: Arc<Worker<T>>,
    concurrency: usize,
    prefetch: usize,
) -> Result<()> {
    let Inbound {
        deliveries,
        backlog,
        settle,
        members,
        stop,
        paused,
        fault,
        fetcher,
        closer,
        status,
        ..
    } = inbound;
    let mut dispatcher = tokio::spawn(dispatch(
        worker,
        deliveries,
        backlog,
        members,
        AckBuffer::new(settle, prefetch),
        concurrency,
        Gates {
            stopping: stop.subscribe(),
            paused: paused.subscribe(),
        },
    ));
    let mut fetcher = fetcher;
    // The dispatcher ends before the fetcher only when it died: it runs until stopped and
    // then until the fetcher's channel closes.
    let mut dispatched = None;
    let fetched = tokio::select! {
        fetched = &mut fetcher => fetched,
        ended = &mut dispatcher => {
            dispatched = Some(ended);
            let _ = stop.send(true);
            fetcher.await
        }
    };
    let fetched = fetched
        .unwrap_or_else(|e| Err(Error::new(ErrorKind::Closed, "fetch task failed").with_source(e)));
    // A permanent fetch failure stops the dispatcher too.
    let _ = stop.send(true);
    let timeout = closer.timeout;
    let drained = match dispatched {
        Some(ended) => Some(ended),
        None => {
            let abort = dispatcher.abort_handle();
            match tokio::time::timeout(timeout, dispatcher).await {
                Ok(ended) => Some(ended),
                Err(_) => {
                    abort.abort();
                    tracing::warn!(?timeout, "handlers still running at the shutdown deadline; their messages will be delivered again");
                    None
                }
            }
        }
    };
    let closed = closer.close().await;
    // The first failure is the one to report; the others are logged, never dropped.
    let mut failures = Vec::new();
    if let Err(e) = fetched {
        failures.push(e);
    }
    if let Some(e) = fault.take() {
        failures.push(e);
    }
    match drained {
        Some(Ok(())) => {}
        Some(Err(e)) => failures.push(
            Error::new(
                ErrorKind::Closed,
                "the subscription's dispatcher died; deliveries it held will be delivered again",
            )
            .with_source(e),
        ),
        None => failures.push(Error::new(
            ErrorKind::Timeout,
            format!("handlers still running after the shutdown timeout of {timeout:?}; their messages stay un-acknowledged"),
        )),
    }
    if let Err(e) = closed {
        failures.push(e);
    }
    let mut failures = failures.into_iter();
    let result = match failures.next() {
        None => Ok(()),
        Some(first) => {
            for other in failures {
                tracing::warn!(error = %other, "subscription also failed");
            }
            Err(first)
        }
    };
    status.ended(&result);
    result
}

/// What makes the dispatcher stop starting deliveries: stopping for good, or a pause.
struct Gates {
    stopping: watch::Receiver<bool>,
    paused: watch::Receiver<bool>,
}

/// Acknowledgements on their way from the handlers to the ack loop, sent in bursts.
///
/// Sent one by one, each acknowledgement tended to find the ack loop asleep and woke it:
/// a thread wake-up per message, which on two cores cost more than the handler. They are
/// held only while the dispatcher has more work it can do at once: they go out when the
/// deliveries run dry, before awaiting a handler that did not finish at its first poll (a
/// slow or stuck handler must not hold earlier messages un-acknowledged; on Redis they would
/// be claimed by another member after `claim-idle`), and after `burst` of them.
struct AckBuffer {
    sender: mpsc::UnboundedSender<Settlement>,
    pending: Vec<DeliveryTag>,
    /// At most a quarter of the prefetch, so held acks never keep the fetch loop from
    /// overlapping the next fetch with handling.
    burst: usize,
}

impl AckBuffer {
    fn new(sender: mpsc::UnboundedSender<Settlement>, prefetch: usize) -> Self {
        let burst = (prefetch / 4).clamp(1, 32);
        AckBuffer {
            sender,
            pending: Vec::with_capacity(burst),
            burst,
        }
    }

    fn push(&mut self, tag: DeliveryTag) {
        self.pending.push(tag);
        if self.pending.len() >= self.burst {
            self.flush();
        }
    }

    /// Settles what the worker did with a delivery.
    fn settle(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Ack(tag) => self.push(tag),
            Outcome::Drop(tag) => self.settle_now(Settlement::Drop(tag)),
            Outcome::Interrupted => {}
        }
    }

    /// Settles a delivery that was not handled: released, or dropped.
    fn settle_now(&self, settlement: Settlement) {
        // The ack loop outlives every dispatcher; a send fails only at teardown.
        let _ = self.sender.send(settlement);
    }

    fn flush(&mut self) {
        for tag in self.pending.drain(..) {
            let _ = self.sender.send(Settlement::Ack(tag));
        }
    }
}

impl Drop for AckBuffer {
    fn drop(&mut self) {
        // Handled messages are acknowledged whatever way the dispatcher ends.
        self.flush();
    }
}

/// Deliveries the single-handler loop takes in a row before it yields to other tasks.
const MAX_STREAK: u32 = 512;

/// Feeds deliveries to the worker: at most `concurrency` at once, one at a time per key.
/// Once stopping, it starts nothing more: what it has not started is released (handed back
/// without counting an attempt) while running handlers finish.
async fn dispatch<T: Send + 'static>(
    worker: Arc<Worker<T>>,
    mut deliveries: mpsc::UnboundedReceiver<Received>,
    backlog: Arc<Backlog>,
    members: Arc<Members>,
    mut acks: AckBuffer,
    concurrency: usize,
    gates: Gates,
) {
    let Gates {
        mut stopping,
        mut paused,
    } = gates;
    if concurrency == 1 {
        // One at a time is per-key order already; no scheduling needed. This loop runs once
        // per message, so it avoids what it can: while deliveries are waiting it takes them
        // without a `select!`, and a handler that starts right after the previous one ended
        // starts at that one's end time (one clock read per message, not two).
        let mut previous_end = None;
        let mut streak = 0;
        loop {
            if streak >= MAX_STREAK {
                // `try_recv` never yields: without this, handlers that never wait would keep
                // the thread from other tasks for as long as deliveries keep coming.
                // tokio's `consume_budget` per message did the same but cost a tenth of
                // the in-memory binder's throughput.
                streak = 0;
                tokio::task::yield_now().await;
            }
            let (received, started) = match deliveries.try_recv() {
                Ok(received) if !*stopping.borrow() => {
                    streak += 1;
                    (received, previous_end.unwrap_or_else(Instant::now))
                }
                Ok(received) => {
                    backlog.take();
                    acks.settle_now(Settlement::Release(received.tag));
                    break;
                }
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) => {
                    streak = 0;
                    acks.flush();
                    let received = tokio::select! {
                        biased;
                        _ = stopping.wait_for(|s| *s) => break,
                        received = deliveries.recv() => received,
                    };
                    let Some(received) = received else { break };
                    (received, Instant::now())
                }
            };
            if *paused.borrow() {
                acks.flush();
                let resumed = tokio::select! {
                    biased;
                    _ = stopping.wait_for(|s| *s) => false,
                    _ = paused.wait_for(|p| !*p) => true,
                };
                if !resumed {
                    backlog.take();
                    acks.settle_now(Settlement::Release(received.tag));
                    break;
                }
            }
            backlog.take();
            if !members.holds(received.tag) {
                acks.settle_now(Settlement::Drop(received.tag));
                continue;
            }
            let mut handling = std::pin::pin!(worker.process(received, started));
            let (outcome, ended) = match futures::poll!(handling.as_mut()) {
                std::task::Poll::Ready(done) => done,
                std::task::Poll::Pending => {
                    acks.flush();
                    handling.await
                }
            };
            backlog.handled(ended.saturating_duration_since(started), 1);
            previous_end = Some(ended);
            acks.settle(outcome);
        }
        acks.flush();
        release_rest(&mut deliveries, &backlog, &acks).await;
        return;
    }
    let mut queue = KeyedQueue::<Received>::new();
    let mut running = FuturesUnordered::new();
    let mut open = true;
    let mut fed = true;
    loop {
        while open && !*paused.borrow() && running.len() < concurrency {
            let Some((slot, received)) = queue.pop() else {
                break;
            };
            backlog.take();
            if !members.holds(received.tag) {
                acks.settle_now(Settlement::Drop(received.tag));
                if queue.done(slot) {
                    backlog.add(1);
                }
                continue;
            }
            let worker = worker.clone();
            running.push(async move {
                let started = Instant::now();
                let (outcome, ended) = worker.process(received, started).await;
                (slot, outcome, ended.saturating_duration_since(started))
            });
        }
        if !open && running.is_empty() && !fed {
            return;
        }
        // Once stopping, the deliveries are no longer drained: flush every time.
        if !open || deliveries.is_empty() {
            acks.flush();
        }
        tokio::select! {
            Some((slot, outcome, took)) = running.next(), if !running.is_empty() => {
                backlog.handled(took, concurrency);
                if queue.done(slot) {
                    backlog.add(1);
                }
                acks.settle(outcome);
            }
            received = deliveries.recv(), if fed => match received {
                Some(received) if open => {
                    let slot = queue.slot(received.message.key());
                    if !queue.push(slot, received) {
                        // Held back behind its key; `done` counts it again when released.
                        backlog.take();
                    }
                }
                Some(received) => {
                    // Fetched as the consumer stopped: never started.
                    backlog.take();
                    acks.settle_now(Settlement::Release(received.tag));
                }
                None => {
                    fed = false;
                    if open {
                        open = false;
                        release_queued(&mut queue, &backlog, &acks);
                    }
                }
            },
            _ = stopping.wait_for(|s| *s), if open => {
                open = false;
                release_queued(&mut queue, &backlog, &acks);
            }
            // A pause or resume: the loop above looks at it again.
            Ok(()) = paused.changed(), if open => {}
        }
    }
}

/// Releases what the dispatcher queued and never started.
fn release_queued(queue: &mut KeyedQueue<Received>, backlog: &Backlog, acks: &AckBuffer) {
    for (ready, received) in queue.drain() {
        if ready {
            backlog.take();
        }
        acks.settle_now(Settlement::Release(received.tag));
    }
}

/// Releases what is still on its way from the fetch loop, until the loop has ended.
async fn release_rest(
    deliveries: &mut mpsc::UnboundedReceiver<Received>,
    backlog: &Backlog,
    acks: &AckBuffer,
) {
    while let Some(received) = deliveries.recv().await {
        backlog.take();
        acks.settle_now(Settlement::Release(received.tag));
    }
}
