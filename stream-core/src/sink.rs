//! [`Sink`]: the typed consumer of one binding, handler style or pull style.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tower_service::Service;

use crate::batch::Batch;
use crate::channel::Channel;
use crate::codec::Codec;
use crate::dedup::Dedup;
use crate::deliveries::Deliveries;
use crate::engine::batch::{dispatch_batches, BatchWorker};
use crate::engine::dispatch::{dispatch, Feed};
use crate::engine::inbound::Inbound;
use crate::engine::supervise::supervise;
use crate::engine::worker::{DeadLetters, Worker};
use crate::handler::{layered, FnHandle, Handle, ServiceHandle};
use crate::health::{Status, SubscriptionState};
use crate::{BoxError, Error, ErrorKind, Message, Result};

/// Consumes values of `T` from one binding.
///
/// * [`subscribe`](Sink::subscribe): a handler per message; `Ok` acknowledges, `Err` retries
///   with backoff and finally dead-letters. Keys keep their order, other keys run
///   concurrently up to the binding's `concurrency`.
/// * [`subscribe_service`](Sink::subscribe_service): the same with a `tower` service, for
///   handlers wrapped in layers.
/// * [`subscribe_batch`](Sink::subscribe_batch): a handler per batch of messages.
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
    pub(crate) fn new(payload: T, message: Arc<Message>, attempt: u32) -> Self {
        Envelope {
            payload,
            message,
            attempt,
        }
    }

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

impl<T: Send + 'static> Sink<T> {
    pub(crate) fn new(channel: Channel, codec: Arc<dyn Codec<T>>) -> Self {
        Sink { channel, codec }
    }

    /// The binding this sink consumes.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Runs `handler` for every message until the returned [`Subscription`] is shut down.
    ///
    /// `Ok` acknowledges the message. Any error is a failed attempt, retried with the
    /// binding's backoff and dead-lettered once `retry.max-attempts` are used; a
    /// [`HandlerError`](crate::HandlerError) asks for a given delay or rejects the message
    /// at once. Keys keep their order; other keys run concurrently up to the binding's
    /// `concurrency`. The binding's `handler-timeout` bounds each attempt.
    pub async fn subscribe<F, Fut, E>(&self, handler: F) -> Result<Subscription>
    where
        F: Fn(T) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        self.subscribe_envelope(move |envelope: Envelope<T>| handler(envelope.into_payload()))
            .await
    }

    /// Like [`subscribe`](Sink::subscribe), with the key, headers and attempt number.
    pub async fn subscribe_envelope<F, Fut, E>(&self, handler: F) -> Result<Subscription>
    where
        F: Fn(Envelope<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        self.run(FnHandle(handler)).await
    }

    /// Like [`subscribe_envelope`](Sink::subscribe_envelope), with a [`tower_service::Service`]
    /// as the handler: wrap it with `tower` layers (timeout, rate limit, concurrency limit,
    /// your own). Each delivery is handled by a clone of `service`, made ready first, as
    /// `tower` expects; state shared by clones (a concurrency limit's permits) is shared
    /// across deliveries.
    ///
    /// ```no_run
    /// # async fn run(sink: stream_core::Sink<String>) -> stream_core::Result<()> {
    /// use stream_core::{handler_fn, Envelope};
    ///
    /// let service = handler_fn(|order: Envelope<String>| async move {
    ///     println!("{}", order.payload());
    ///     Ok::<(), std::io::Error>(())
    /// });
    /// // Any tower layer goes around it here, e.g. `ServiceBuilder::new().rate_limit(..)`.
    /// let subscription = sink.subscribe_service(service).await?;
    /// # subscription.shutdown().await
    /// # }
    /// ```
    pub async fn subscribe_service<S>(&self, service: S) -> Result<Subscription>
    where
        S: Service<Envelope<T>, Response = ()> + Clone + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        self.run(ServiceHandle::new(service)).await
    }

    /// Runs `handler` on batches: up to the binding's `batch-size` messages, or what arrived
    /// within `batch-wait` of the first, for sinks that pay per call (database inserts).
    ///
    /// `Ok` acknowledges the whole batch. A [`BatchError`](crate::BatchError) names the
    /// items that failed: only those are retried (or dead-lettered), each by its own error.
    /// Any other error fails the whole batch. Failed items are retried, as a batch of their
    /// own after the backoff, before the next batch starts, and a key's later messages wait
    /// behind its failed one: each key stays in order across batches. Batches run one at a
    /// time; `concurrency` does not apply.
    ///
    /// ```no_run
    /// # async fn run(sink: stream_core::Sink<String>) -> stream_core::Result<()> {
    /// use stream_core::{Batch, BatchError};
    ///
    /// let subscription = sink
    ///     .subscribe_batch(|batch: Batch<String>| async move {
    ///         let mut failed = BatchError::new();
    ///         for (index, row) in batch.payloads().enumerate() {
    ///             if row.is_empty() {
    ///                 failed.fail(index, "empty row");
    ///             }
    ///         }
    ///         if failed.is_empty() { Ok(()) } else { Err(failed) }
    ///     })
    ///     .await?;
    /// # subscription.shutdown().await
    /// # }
    /// ```
    pub async fn subscribe_batch<F, Fut, E>(&self, handler: F) -> Result<Subscription>
    where
        F: Fn(Batch<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        self.run_batches(FnHandle(handler)).await
    }

    /// Like [`subscribe_batch`](Sink::subscribe_batch), with a [`tower_service::Service`] of
    /// [`Batch<T>`](crate::Batch) as the handler.
    pub async fn subscribe_batch_service<S>(&self, service: S) -> Result<Subscription>
    where
        S: Service<Batch<T>, Response = ()> + Clone + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        self.run_batches(ServiceHandle::new(service)).await
    }

    async fn run(&self, handler: impl Handle<Envelope<T>>) -> Result<Subscription> {
        let config = &self.channel.config;
        let handler = layered(handler, config.handler_timeout);
        let inbound = Inbound::open(&self.channel).await?;
        let handler = self.deduplicated(handler, &inbound)?;
        let worker = Arc::new(Worker {
            codec: self.codec.clone(),
            handler,
            retry: config.retry.clone(),
            dead_letters: DeadLetters::of(&inbound),
            members: inbound.members.clone(),
            stopping: inbound.stop.subscribe(),
            metrics: inbound.metrics.clone(),
            names: inbound.names.clone(),
        });
        let concurrency = config.concurrency;
        Ok(Subscription::start(inbound, config.prefetch, move |feed| {
            dispatch(worker, feed, concurrency)
        }))
    }

    /// The handler behind the binding's `dedup` layer, when it has one.
    fn deduplicated(
        &self,
        handler: Arc<dyn Handle<Envelope<T>>>,
        inbound: &Inbound,
    ) -> Result<Arc<dyn Handle<Envelope<T>>>> {
        let Some(dedup) = &self.channel.config.dedup else {
            return Ok(handler);
        };
        let Some(store) = self.channel.dedup.clone() else {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "bindings.{}: dedup store `{}` is not set up on this channel",
                    self.channel.name, dedup.store
                ),
            ));
        };
        let names = &inbound.names;
        Ok(Arc::new(Dedup {
            inner: handler,
            store,
            scope: crate::dedup::scope(&names.group, &names.destination).into(),
            ttl: dedup.ttl,
        }))
    }

    async fn run_batches(&self, handler: impl Handle<Batch<T>>) -> Result<Subscription> {
        let config = &self.channel.config;
        if config.batch_size > config.prefetch {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "bindings.{}: `batch-size` {} is above `prefetch` {}: a batch cannot be \
                     larger than what the consumer may hold",
                    self.channel.name, config.batch_size, config.prefetch
                ),
            ));
        }
        let handler = layered(handler, config.handler_timeout);
        let inbound = Inbound::open(&self.channel).await?;
        let worker = Arc::new(BatchWorker {
            codec: self.codec.clone(),
            handler,
            retry: config.retry.clone(),
            dead_letters: DeadLetters::of(&inbound),
            members: inbound.members.clone(),
            stopping: inbound.stop.subscribe(),
            metrics: inbound.metrics.clone(),
            names: inbound.names.clone(),
            size: config.batch_size,
            wait: config.batch_wait,
        });
        Ok(Subscription::start(inbound, config.prefetch, move |feed| {
            dispatch_batches(worker, feed)
        }))
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
    fn start<D, Fut>(inbound: Inbound, prefetch: usize, dispatcher: D) -> Subscription
    where
        D: FnOnce(Feed) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let stop = inbound.stop.clone();
        let (paused, status) = (inbound.paused.clone(), inbound.status.clone());
        let supervisor = tokio::spawn(supervise(inbound, prefetch, dispatcher));
        Subscription {
            stop,
            paused,
            status,
            supervisor: Some(supervisor),
        }
    }

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
