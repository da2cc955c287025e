//! The batch dispatcher: gathers up to `batch-size` deliveries or what arrived within
//! `batch-wait`, calls the batch handler, retries the items that failed before it takes the
//! next batch, and dead-letters those whose attempts are used up.
//!
//! Batches run one at a time, and the failed items of a batch are retried before anything
//! newer is started: that is what keeps each key in order across batches.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use tracing::Instrument;

use crate::batch::{Batch, BatchError};
use crate::binder::{DeliveryTag, Received};
use crate::codec::Codec;
use crate::config::RetryConfig;
use crate::dead_letter::Cause;
use crate::engine::dispatch::{AckBuffer, Feed, Gates};
use crate::engine::inbound::{Members, Names, Settlement};
use crate::engine::worker::{call_guarded, decode, DeadLetters, NextStep};
use crate::handler::Handle;
use crate::sink::Envelope;
use crate::telemetry::measure::ConsumeMetrics;
use crate::telemetry::trace::{self, AttemptOutcome};
use crate::{BoxError, Message};

/// Calls the batch handler on the batches the dispatcher gathers.
pub(crate) struct BatchWorker<T> {
    pub(crate) codec: Arc<dyn Codec<T>>,
    pub(crate) handler: Arc<dyn Handle<Batch<T>>>,
    pub(crate) retry: RetryConfig,
    pub(crate) dead_letters: DeadLetters,
    pub(crate) members: Arc<Members>,
    pub(crate) stopping: watch::Receiver<bool>,
    pub(crate) metrics: Arc<ConsumeMetrics>,
    pub(crate) names: Arc<Names>,
    pub(crate) size: usize,
    pub(crate) wait: Duration,
}

/// A delivery on its way through the attempts of its batches.
struct Item {
    tag: DeliveryTag,
    message: Arc<Message>,
    attempt: u32,
    first_failure: Option<SystemTime>,
}

/// Gathers and runs batches until stopped; what it did not start is released.
pub(crate) async fn dispatch_batches<T: Send + 'static>(worker: Arc<BatchWorker<T>>, feed: Feed) {
    let Feed {
        mut deliveries,
        backlog,
        members,
        mut acks,
        gates: Gates {
            mut stopping,
            mut paused,
        },
    } = feed;
    'batches: loop {
        acks.flush();
        let first = tokio::select! {
            biased;
            _ = stopping.wait_for(|s| *s) => break,
            received = deliveries.recv() => match received {
                Some(received) => received,
                None => break,
            },
        };
        backlog.take();
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + worker.wait;
        while batch.len() < worker.size {
            let received = match deliveries.try_recv() {
                Ok(received) => Some(received),
                Err(_) => tokio::select! {
                    biased;
                    _ = stopping.wait_for(|s| *s) => None,
                    _ = tokio::time::sleep_until(deadline) => None,
                    received = deliveries.recv() => received,
                },
            };
            let Some(received) = received else { break };
            backlog.take();
            batch.push(received);
        }
        if *paused.borrow() {
            let resumed = tokio::select! {
                biased;
                _ = stopping.wait_for(|s| *s) => false,
                _ = paused.wait_for(|p| !*p) => true,
            };
            if !resumed {
                release(batch, &acks);
                break 'batches;
            }
        }
        if *stopping.borrow() {
            release(batch, &acks);
            break;
        }
        let started = Instant::now();
        let count = batch.len();
        worker.process(batch, &members, &mut acks).await;
        backlog.handled_together(started.elapsed(), count);
    }
    acks.flush();
    while let Some(received) = deliveries.recv().await {
        backlog.take();
        acks.settle_now(Settlement::Release(received.tag));
    }
}

fn release(batch: Vec<Received>, acks: &AckBuffer) {
    for received in batch {
        acks.settle_now(Settlement::Release(received.tag));
    }
}

impl<T: Send + 'static> BatchWorker<T> {
    /// Runs one batch to the end: every item acknowledged, dead-lettered, dropped (moved to
    /// another member) or, when shutdown interrupts a retry, left for redelivery.
    async fn process(&self, batch: Vec<Received>, members: &Members, acks: &mut AckBuffer) {
        let mut items = Vec::with_capacity(batch.len());
        for received in batch {
            let tag = received.tag;
            if !members.holds(tag) {
                acks.settle_now(Settlement::Drop(tag));
                continue;
            }
            let message = Arc::new(received.message);
            let attempt = received.attempt.max(1);
            if let Some(defect) = received.defect {
                self.metrics.undecodable.increment(1);
                let error = BoxError::from(defect);
                self.give_up(
                    acks,
                    tag,
                    &message,
                    attempt,
                    Cause::Decode,
                    &*error,
                    SystemTime::now(),
                )
                .await;
                continue;
            }
            if attempt > self.retry.max_attempts {
                if self.dead_letters.exhausted(&message, attempt).await {
                    acks.push(tag);
                }
                continue;
            }
            items.push(Item {
                tag,
                message,
                attempt,
                first_failure: None,
            });
        }
        while !items.is_empty() {
            let retrying = self.attempt(items, acks).await;
            if retrying.is_empty() {
                return;
            }
            // The items left are retried, as a batch of their own, before anything newer.
            let wait = retrying
                .iter()
                .map(|item| item.retry_in)
                .max()
                .unwrap_or_default();
            let mut stopping = self.stopping.clone();
            acks.flush();
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                // Un-acknowledged in the broker, which redelivers them.
                _ = stopping.wait_for(|s| *s) => return,
            }
            let mut next = Vec::with_capacity(retrying.len());
            for mut retrying in retrying {
                if !self.members.holds(retrying.item.tag) {
                    acks.settle_now(Settlement::Drop(retrying.item.tag));
                    continue;
                }
                retrying.item.attempt += 1;
                self.members
                    .retrying(retrying.item.tag, retrying.item.attempt)
                    .await;
                next.push(retrying.item);
            }
            items = next;
        }
    }

    /// One call of the handler on `items`; returns the items to retry.
    async fn attempt(&self, items: Vec<Item>, acks: &mut AckBuffer) -> Vec<Retrying> {
        let mut envelopes = Vec::with_capacity(items.len());
        let mut called = Vec::with_capacity(items.len());
        for item in items {
            match decode(&*self.codec, &item.message) {
                Ok(payload) => {
                    envelopes.push(Envelope::new(payload, item.message.clone(), item.attempt));
                    called.push(item);
                }
                Err(error) => {
                    self.metrics.undecodable.increment(1);
                    let first = item.first_failure.unwrap_or_else(SystemTime::now);
                    self.give_up(
                        acks,
                        item.tag,
                        &item.message,
                        item.attempt,
                        Cause::Decode,
                        &*error,
                        first,
                    )
                    .await;
                }
            }
        }
        if called.is_empty() {
            return Vec::new();
        }
        let attempt = called.iter().map(|item| item.attempt).max().unwrap_or(1);
        let span = trace::batch_span(
            &self.names.binding,
            &self.names.destination,
            &self.names.group,
            called.len(),
            attempt,
        );
        for item in &called {
            trace::link(&span, item.message.headers());
            if item.attempt > 1 {
                self.metrics.retries.increment(1);
            }
        }
        let count = called.len() as f64;
        self.metrics.in_flight.increment(count);
        let started = Instant::now();
        let (outcome, span) = call_guarded(&*self.handler, Batch::new(envelopes), span).await;
        self.metrics.in_flight.decrement(count);
        let ended = Instant::now();
        self.metrics
            .handler_duration
            .record(ended.saturating_duration_since(started).as_secs_f64());
        let mut failures: Vec<Option<Failure>> = (0..called.len()).map(|_| None).collect();
        let mut shared = None;
        match outcome {
            Ok(()) => {}
            Err(error) => match error.downcast::<BatchError>() {
                Ok(partial) => {
                    for (index, error) in partial.into_failed() {
                        if let Some(slot @ None) = failures.get_mut(index) {
                            *slot = Some(Failure::Own(error));
                        }
                    }
                }
                Err(error) => {
                    failures
                        .iter_mut()
                        .for_each(|slot| *slot = Some(Failure::Shared));
                    shared = Some(error);
                }
            },
        }
        let failed = failures.iter().filter(|f| f.is_some()).count();
        if failed == 0 {
            AttemptOutcome::Ok.record(&span);
        } else {
            span.record("failed", failed);
            let first_error = failures.iter().find_map(|failure| match failure {
                Some(Failure::Own(error)) => Some(error),
                _ => None,
            });
            if let Some(error) = shared.as_ref().or(first_error) {
                span.record("error", tracing::field::display(error));
            }
            if failed == called.len() {
                AttemptOutcome::Retry.record(&span);
            } else {
                AttemptOutcome::Partial.record(&span);
            }
        }
        // Keys with an item waiting for a retry: later items of those keys wait behind it,
        // even if they succeeded, so that each key is finished in order.
        let mut retrying_keys: HashSet<String> = HashSet::new();
        let mut retrying = Vec::new();
        for (item, failure) in called.into_iter().zip(failures) {
            let waits_behind = item
                .message
                .key()
                .is_some_and(|key| retrying_keys.contains(key));
            let error: &(dyn std::error::Error + Send + Sync + 'static) = match &failure {
                None if waits_behind => {
                    retrying.push(Retrying {
                        item,
                        retry_in: Duration::ZERO,
                    });
                    continue;
                }
                None => {
                    self.metrics.handled.increment(1);
                    self.metrics.arrived(&item.message, ended);
                    acks.push(item.tag);
                    continue;
                }
                Some(Failure::Own(error)) => &**error,
                Some(Failure::Shared) => {
                    &**shared.as_ref().expect("a shared failure has its error")
                }
            };
            self.metrics.handler_errors.increment(1);
            let mut item = item;
            let first = *item.first_failure.get_or_insert_with(SystemTime::now);
            match NextStep::after(&self.retry, item.attempt, error) {
                NextStep::GiveUp(cause) => {
                    self.give_up(
                        acks,
                        item.tag,
                        &item.message,
                        item.attempt,
                        cause,
                        error,
                        first,
                    )
                    .instrument(span.clone())
                    .await;
                }
                NextStep::RetryIn(retry_in) => {
                    if let Some(key) = item.message.key() {
                        retrying_keys.insert(key.to_owned());
                    }
                    retrying.push(Retrying { item, retry_in });
                }
            }
        }
        retrying
    }

    #[allow(clippy::too_many_arguments)]
    async fn give_up(
        &self,
        acks: &mut AckBuffer,
        tag: DeliveryTag,
        message: &Message,
        attempts: u32,
        cause: Cause,
        error: &(dyn std::error::Error + Send + Sync + 'static),
        first_failure: SystemTime,
    ) {
        if self
            .dead_letters
            .publish(message, attempts, cause, error, first_failure)
            .await
        {
            acks.push(tag);
        }
    }
}

/// An item that failed and waits for its next attempt.
struct Retrying {
    item: Item,
    retry_in: Duration,
}

/// Why an item of a batch failed.
enum Failure {
    /// Its own error, from a [`BatchError`].
    Own(BoxError),
    /// The error that failed the whole batch.
    Shared,
}
