//! The consumer side shared by handler and pull styles: fetching under the prefetch bound,
//! batched acknowledgements, and an orderly close.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tokio::task::JoinHandle;

use crate::binder::{Consumer, ConsumerOptions, DeliveryTag, Received, StartFrom};
use crate::channel::Channel;
use crate::dead_letter::DeadLetter;
use crate::health::Status;
use crate::partition::partition_destination;
use crate::telemetry::measure::ConsumeMetrics;
use crate::{Error, Result};

/// Largest batch asked of a binder in one `receive`, whatever the prefetch.
const MAX_FETCH: usize = 1024;
/// Largest batch of tags given to one `ack`.
const MAX_ACK_BATCH: usize = 1024;
/// Failed acks of a batch tried again before its messages are left to redelivery.
const ACK_TRIES: u32 = 20;
/// Failed releases tried again before `close` is left to hand the deliveries back.
const RELEASE_TRIES: u32 = 3;

/// A running consumer: a fetch task feeding `deliveries`, an ack task draining `settle`.
pub(crate) struct Inbound {
    pub(crate) deliveries: mpsc::UnboundedReceiver<Received>,
    /// Whoever takes from `deliveries` keeps this up to date.
    pub(crate) backlog: Arc<Backlog>,
    /// Where every delivery taken from `deliveries` ends up, exactly once.
    pub(crate) settle: mpsc::UnboundedSender<Settlement>,
    pub(crate) members: Arc<Members>,
    pub(crate) stop: watch::Sender<bool>,
    /// True while the subscription is paused: nothing is fetched or started.
    pub(crate) paused: watch::Sender<bool>,
    pub(crate) fault: Arc<Fault>,
    pub(crate) dead_letter: Arc<DeadLetter>,
    pub(crate) fetcher: JoinHandle<Result<()>>,
    pub(crate) closer: Closer,
    pub(crate) status: Arc<Status>,
    pub(crate) metrics: Arc<ConsumeMetrics>,
    /// What the telemetry calls the consumer: binding, destination, group.
    pub(crate) names: Arc<Names>,
}

/// The names a consumer's spans carry.
#[derive(Debug)]
pub(crate) struct Names {
    pub(crate) binding: String,
    pub(crate) destination: String,
    pub(crate) group: String,
}

/// How a delivery left core. Each one holds a permit of the prefetch window until its
/// settlement reaches the ack loop.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Settlement {
    /// Handled (or dead-lettered): acknowledge it.
    Ack(DeliveryTag),
    /// Never reached a handler: hand it back without counting an attempt.
    Release(DeliveryTag),
    /// The binder no longer holds it ([`Consumer::holds`]): nothing to tell the broker.
    Drop(DeliveryTag),
}

/// The first error that ends a consumer from the inside (a dead letter that can never be
/// published), kept for the caller of `wait` or the stream's next item.
pub(crate) struct Fault {
    error: Mutex<Option<Error>>,
    stop: watch::Sender<bool>,
}

impl Fault {
    /// Records `error` (the first one wins) and stops the consumer.
    pub(crate) fn fail(&self, error: Error) {
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            tracing::error!(error = %error, "consumer stops");
            *slot = Some(error);
        }
        drop(slot);
        let _ = self.stop.send(true);
    }

    pub(crate) fn take(&self) -> Option<Error> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// What the fetch loop knows of the consuming side: deliveries fetched that could start now
/// but have not (queued for a free handler, or not yet taken from a stream; those held back
/// behind another delivery of their key do not count, since more of the window would not
/// start them any sooner), and how long handlers take.
///
/// A broker round trip costs about as much for a few deliveries as for many, so the fetch
/// loop does not ask for whatever single permit came back while the handlers still have
/// work; it waits for a good part of the window (see [`Window::next_batch`]).
#[derive(Debug, Default)]
pub(crate) struct Backlog {
    ready: AtomicUsize,
    emptied: Notify,
    /// Handling time in nanoseconds, divided by the handlers running side by side, and the
    /// number of deliveries it covers.
    handling_nanos: AtomicU64,
    handled: AtomicU64,
}

impl Backlog {
    /// `n` more deliveries can start.
    pub(crate) fn add(&self, n: usize) {
        self.ready.fetch_add(n, Ordering::AcqRel);
    }

    /// One delivery started, or can no longer start by itself.
    pub(crate) fn take(&self) {
        if self.ready.fetch_sub(1, Ordering::AcqRel) == 1 {
            // Every fetch loop (one per partition) waits on this; each registers before it
            // looks at the count, so none misses the wake-up.
            self.emptied.notify_waiters();
        }
    }

    /// A delivery was handled in `took` by one of `slots` handlers that run side by side.
    pub(crate) fn handled(&self, took: Duration, slots: usize) {
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX) / slots.max(1) as u64;
        self.handling_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.handled.fetch_add(1, Ordering::Relaxed);
    }

    /// `count` deliveries were handled together, as one batch, in `took`.
    pub(crate) fn handled_together(&self, took: Duration, count: usize) {
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.handling_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.handled.fetch_add(count as u64, Ordering::Relaxed);
    }

    fn is_empty(&self) -> bool {
        self.ready.load(Ordering::Acquire) == 0
    }
}

/// Time per delivery on both sides of the window, in nanoseconds, smoothed.
#[derive(Debug, Default)]
struct Pace {
    /// A `receive` that filled its whole batch, divided by the batch.
    fetch: Option<u64>,
    /// Handling, from [`Backlog`]; `None` where nobody measures it (pull-style streams).
    handling: Option<u64>,
    /// The [`Backlog`] totals when `handling` was last updated.
    seen: (u64, u64),
}

/// Deliveries handled between two updates of [`Pace::handling`], so one slow delivery does
/// not decide alone.
const PACE_SAMPLE: u64 = 16;

impl Pace {
    fn smooth(old: Option<u64>, sample: u64) -> Option<u64> {
        Some(match old {
            Some(old) => (old * 3 + sample) / 4,
            None => sample,
        })
    }

    fn fetched(&mut self, took: Duration, asked: usize, got: usize) {
        // A short batch means the broker ran out of entries: its time says nothing of the
        // broker's speed (a blocking read waits for new entries).
        if got == 0 || got < asked {
            return;
        }
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX) / got as u64;
        self.fetch = Self::smooth(self.fetch, nanos);
    }

    fn update(&mut self, backlog: &Backlog) {
        let now = (
            backlog.handling_nanos.load(Ordering::Relaxed),
            backlog.handled.load(Ordering::Relaxed),
        );
        let handled = now.1.saturating_sub(self.seen.1);
        if handled >= PACE_SAMPLE {
            let nanos = now.0.saturating_sub(self.seen.0) / handled;
            self.handling = Self::smooth(self.handling, nanos);
            self.seen = now;
        }
    }

    /// How long the fetch loop waits for `missing` more permits before fetching with fewer:
    /// about twice the time handlers take to free them, so a steady stream of acks fills the
    /// batch, and never long when they are not coming.
    fn refill_patience(&self, missing: usize) -> Duration {
        const UNKNOWN: Duration = Duration::from_millis(20);
        const MIN: Duration = Duration::from_millis(1);
        const MAX: Duration = Duration::from_millis(100);
        match self.handling {
            None => UNKNOWN,
            Some(nanos) => {
                Duration::from_nanos(nanos.saturating_mul(missing as u64 * 2)).clamp(MIN, MAX)
            }
        }
    }

    /// Whether the next fetch should wait for the whole window rather than half of it.
    ///
    /// Half the window lets the next fetch run while handlers work through the other half,
    /// so neither side waits for the other. When handlers get through deliveries several
    /// times faster than the broker hands them out, that overlap hides little, and reading
    /// the whole window in one round trip instead of two halves the broker's fixed cost per
    /// delivery (on Redis with `appendfsync always`, an fsync per read). Slower handlers
    /// keep half: they would sit idle through every round trip. Without measurements, half.
    fn whole_window(&self) -> bool {
        matches!((self.fetch, self.handling), (Some(fetch), Some(handling)) if handling.saturating_mul(4) < fetch)
    }
}

/// The binder consumers behind one sink: one, or one per partition destination.
///
/// With several, each delivery's tag is swapped for one of core's own on the way in, and
/// swapped back on the way to `ack`: tags are only unique within one binder consumer (two
/// Redis streams hand out the same entry ids).
pub(crate) struct Members {
    consumers: Vec<Arc<dyn Consumer>>,
    /// Core's tag → (member, the member's tag); unused with one member.
    routes: Mutex<HashMap<DeliveryTag, (usize, DeliveryTag)>>,
    next_tag: AtomicU64,
}

impl Members {
    fn new(consumers: Vec<Arc<dyn Consumer>>) -> Members {
        Members {
            consumers,
            routes: Mutex::default(),
            next_tag: AtomicU64::new(0),
        }
    }

    fn routed(&self) -> bool {
        self.consumers.len() > 1
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<DeliveryTag, (usize, DeliveryTag)>> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives deliveries of `member` core's tags.
    fn admit(&self, member: usize, batch: &mut [Received]) {
        if !self.routed() {
            return;
        }
        let mut routes = self.lock();
        for received in batch {
            let tag = DeliveryTag(self.next_tag.fetch_add(1, Ordering::Relaxed), 0);
            routes.insert(tag, (member, received.tag));
            received.tag = tag;
        }
    }

    /// The member holding core's `tag`, and its own tag for it.
    fn find(&self, tag: DeliveryTag) -> Option<(usize, DeliveryTag)> {
        if self.routed() {
            self.lock().get(&tag).copied()
        } else {
            Some((0, tag))
        }
    }

    /// See [`Consumer::holds`]; false for a tag core already settled.
    pub(crate) fn holds(&self, tag: DeliveryTag) -> bool {
        self.find(tag)
            .is_some_and(|(member, own)| self.consumers[member].holds(own))
    }

    /// See [`Consumer::retrying`]. A failure is logged, not returned: the attempt goes ahead,
    /// and only a crash during it would leave the broker's count one short.
    pub(crate) async fn retrying(&self, tag: DeliveryTag, attempt: u32) {
        let Some((member, own)) = self.find(tag) else {
            return;
        };
        if let Err(e) = self.consumers[member].retrying(own, attempt).await {
            tracing::warn!(error = %e, attempt, "could not record the attempt with the broker; a crash during it would not count it");
        }
    }

    /// The lag of the group over every member's destination, if every member can tell.
    async fn lag(&self) -> Result<Option<u64>> {
        let mut total = 0u64;
        for consumer in &self.consumers {
            match consumer.lag().await? {
                Some(lag) => total = total.saturating_add(lag),
                None => return Ok(None),
            }
        }
        Ok(Some(total))
    }

    /// Forgets core's tags of deliveries dropped without a word to the broker.
    fn forget(&self, tags: &[DeliveryTag]) {
        if self.routed() {
            let mut routes = self.lock();
            for tag in tags {
                routes.remove(tag);
            }
        }
    }

    /// Splits core's tags into each member's own; only called when [`Members::routed`].
    fn route(&self, tags: &[DeliveryTag]) -> Vec<(usize, Vec<DeliveryTag>)> {
        let mut by_member: Vec<Vec<DeliveryTag>> = vec![Vec::new(); self.consumers.len()];
        let mut routes = self.lock();
        for tag in tags {
            if let Some((member, own)) = routes.remove(tag) {
                by_member[member].push(own);
            }
        }
        by_member
            .into_iter()
            .enumerate()
            .filter(|(_, tags)| !tags.is_empty())
            .collect()
    }

    async fn close(&self) -> Result<()> {
        let results =
            futures::future::join_all(self.consumers.iter().map(|consumer| consumer.close())).await;
        results.into_iter().collect()
    }
}

/// What is left to do after the fetcher stopped and every ack sender is gone.
pub(crate) struct Closer {
    members: Arc<Members>,
    acker: JoinHandle<()>,
    dead_letter: Arc<DeadLetter>,
    pub(crate) timeout: Duration,
}

impl Inbound {
    pub(crate) async fn open(channel: &Channel) -> Result<Inbound> {
        let config = &channel.config;
        // A binding built in code has not been through the file's checks.
        config.validate(&channel.name)?;
        channel.binder.check_binding(&channel.name, config)?;
        let options = match &config.group {
            Some(group) => ConsumerOptions::new(group.clone()).start_from(config.start_from),
            None => ConsumerOptions::new(format!(
                "{}{}",
                crate::ANONYMOUS_GROUP_PREFIX,
                crate::unique_suffix()
            ))
            .anonymous()
            .start_from(StartFrom::Latest),
        }
        .prefetch(config.prefetch)
        .claim_idle(config.claim_idle);
        // (partition of the destination read, if core laid it out, and its consumer)
        let mut opened: Vec<(Option<u32>, Arc<dyn Consumer>)> = Vec::new();
        match (config.partitions, config.assigned_partitions()) {
            (Some(count), Some(assigned))
                if !channel
                    .binder
                    .prepare_partitions(&config.destination, count)
                    .await? =>
            {
                for partition in assigned {
                    let destination = partition_destination(&config.destination, partition);
                    match channel.binder.consumer(&destination, &options).await {
                        Ok(consumer) => opened.push((Some(partition), consumer.into())),
                        Err(e) => {
                            // Leaves the groups joined so far instead of stranding them.
                            for (_, consumer) in &opened {
                                let _ = consumer.close().await;
                            }
                            return Err(e);
                        }
                    }
                }
            }
            (_, assigned) => {
                let options = match assigned {
                    Some(assigned) if config.instance_count > 1 => {
                        options.clone().partitions(assigned)
                    }
                    _ => options.clone(),
                };
                let consumer = channel
                    .binder
                    .consumer(&config.destination, &options)
                    .await?;
                opened.push((None, consumer.into()));
            }
        }
        // Made now, so a dead-letter destination that cannot be written fails the start
        // rather than the first message that needs it.
        let dead_letter = match DeadLetter::open(
            &*channel.binder,
            config.dead_letter_destination(),
            &config.destination,
            &options.group,
        )
        .await
        {
            Ok(dead_letter) => Arc::new(dead_letter),
            Err(e) => {
                for (_, consumer) in &opened {
                    let _ = consumer.close().await;
                }
                return Err(e);
            }
        };
        let permits = Arc::new(Semaphore::new(config.prefetch));
        let (deliveries_tx, deliveries) = mpsc::unbounded_channel();
        let (settle, settle_rx) = mpsc::unbounded_channel();
        let (stop, stop_rx) = watch::channel(false);
        let (paused, paused_rx) = watch::channel(false);
        let status = Arc::new(Status::new(&channel.name, &options.group));
        if let Some(registry) = &channel.subscriptions {
            registry.add(&status);
        }
        let metrics = Arc::new(ConsumeMetrics::new(
            &channel.name,
            &config.destination,
            &options.group,
        ));
        let names = Arc::new(Names {
            binding: channel.name.to_string(),
            destination: config.destination.clone(),
            group: options.group.clone(),
        });
        let fault = Arc::new(Fault {
            error: Mutex::new(None),
            stop: stop.clone(),
        });
        let backlog = Arc::new(Backlog::default());
        let members = Arc::new(Members::new(
            opened
                .iter()
                .map(|(_, consumer)| consumer.clone())
                .collect(),
        ));
        let observed = Observed {
            status: status.clone(),
            metrics: metrics.clone(),
            held: Arc::default(),
        };
        // Each partition's loop asks for its share of the window, so an idle partition
        // blocked in a read does not hold the window the busy ones need.
        let share = config.prefetch.div_ceil(opened.len()).max(1);
        let loops = opened.iter().enumerate().map(|(index, (partition, _))| {
            fetch_loop(
                Fetcher {
                    members: members.clone(),
                    index,
                    partition: *partition,
                },
                Window::new(permits.clone(), share, backlog.clone()),
                deliveries_tx.clone(),
                Signals {
                    stop: stop_rx.clone(),
                    paused: paused_rx.clone(),
                },
                observed.clone(),
            )
        });
        // One failing loop ends them all: the sink reports the error and closes.
        let loops = futures::future::try_join_all(loops);
        drop(deliveries_tx);
        let fetcher = tokio::spawn(async move { loops.await.map(drop) });
        if !config.lag_interval.is_zero() {
            tokio::spawn(sample_lag(
                members.clone(),
                metrics.clone(),
                config.lag_interval,
                stop_rx.clone(),
            ));
        }
        let acker = tokio::spawn(ack_loop(members.clone(), permits, settle_rx, observed));
        Ok(Inbound {
            deliveries,
            backlog,
            settle,
            members: members.clone(),
            stop,
            paused,
            status,
            metrics,
            names,
            fault,
            dead_letter: dead_letter.clone(),
            fetcher,
            closer: Closer {
                members,
                acker,
                dead_letter,
                timeout: config.shutdown_timeout,
            },
        })
    }
}

impl Closer {
    /// Waits (bounded) for pending acks to reach the broker, then leaves the group.
    pub(crate) async fn close(self) -> Result<()> {
        if tokio::time::timeout(self.timeout, self.acker)
            .await
            .is_err()
        {
            tracing::warn!("acknowledgements still outstanding at shutdown; those messages will be delivered again");
        }
        self.dead_letter.close().await;
        self.members.close().await
    }
}

/// The prefetch window as the fetch loop sees it.
struct Window {
    /// One per delivery that may be held; each delivery holds one until acknowledged.
    permits: Arc<Semaphore>,
    /// The most one fetch asks for.
    size: usize,
    backlog: Arc<Backlog>,
}

impl Window {
    fn new(permits: Arc<Semaphore>, prefetch: usize, backlog: Arc<Backlog>) -> Window {
        Window {
            permits,
            size: prefetch.min(MAX_FETCH),
            backlog,
        }
    }

    /// Takes up to `max` more permits that are free right now; returns how many.
    fn take_free(&self, max: usize) -> usize {
        let mut taken = 0;
        while taken < max {
            match self.permits.try_acquire() {
                Ok(permit) => {
                    permit.forget();
                    taken += 1;
                }
                Err(_) => break,
            }
        }
        taken
    }

    /// Takes the permits for the next fetch: at least one, as many as are free, and, while
    /// handlers still have deliveries to start, up to `target`, waiting at most `patience`
    /// for those. `None` once stopped.
    ///
    /// The wait is bounded because a short receive (Kafka hands out what one partition has
    /// fetched) can leave the window part full while every handler is busy: the backlog
    /// then never empties and the missing permits only come back as handlers finish, which
    /// may be never (held handlers). Without the bound, fetching stopped below `prefetch`.
    async fn next_batch(
        &self,
        target: usize,
        patience: Duration,
        stop: &mut watch::Receiver<bool>,
    ) -> Option<usize> {
        let first = tokio::select! {
            permit = self.permits.acquire() => permit,
            _ = stop.wait_for(|stopped| *stopped) => return None,
        };
        first.expect("the semaphore is never closed").forget();
        let mut taken = 1 + self.take_free(self.size - 1);
        let deadline = tokio::time::Instant::now() + patience;
        while taken < target {
            // Registered before the look at the count, so an emptying in between still wakes.
            let emptied = self.backlog.emptied.notified();
            let mut emptied = std::pin::pin!(emptied);
            emptied.as_mut().enable();
            if self.backlog.is_empty() {
                break;
            }
            let missing = u32::try_from(target - taken).unwrap_or(u32::MAX);
            tokio::select! {
                more = self.permits.acquire_many(missing) => {
                    more.expect("the semaphore is never closed").forget();
                    taken = target;
                }
                _ = emptied => {}
                _ = tokio::time::sleep_until(deadline) => {
                    taken += self.take_free(self.size - taken);
                    break;
                }
                _ = stop.wait_for(|stopped| *stopped) => {
                    self.permits.add_permits(taken);
                    return None;
                }
            }
            taken += self.take_free(self.size - taken);
        }
        Some(taken)
    }
}

/// Which member a fetch loop reads.
struct Fetcher {
    members: Arc<Members>,
    index: usize,
    /// The partition its destination holds, when core laid the partitions out.
    partition: Option<u32>,
}

/// What tells a fetch loop to stop or wait.
struct Signals {
    stop: watch::Receiver<bool>,
    paused: watch::Receiver<bool>,
}

/// Where a consumer's loops report what they see.
#[derive(Clone)]
struct Observed {
    status: Arc<Status>,
    metrics: Arc<ConsumeMetrics>,
    /// Deliveries fetched and not yet settled (the permits a pending receive holds are not
    /// deliveries).
    held: Arc<AtomicUsize>,
}

impl Observed {
    fn fetched(&self, count: usize) {
        let held = self.held.fetch_add(count, Ordering::Relaxed) + count;
        self.metrics.window_used.set(held as f64);
    }

    fn settled(&self, count: usize) {
        let held = self.held.fetch_sub(count, Ordering::Relaxed) - count;
        self.metrics.window_used.set(held as f64);
    }
}

async fn fetch_loop(
    fetcher: Fetcher,
    window: Window,
    deliveries: mpsc::UnboundedSender<Received>,
    signals: Signals,
    observed: Observed,
) -> Result<()> {
    let Signals {
        mut stop,
        mut paused,
    } = signals;
    let permits = window.permits.clone();
    let mut pace = Pace::default();
    let mut failures = 0u32;
    loop {
        if *paused.borrow() {
            // Held work stays held (the binder keeps it claimed); nothing new is fetched.
            tokio::select! {
                _ = paused.wait_for(|paused| !*paused) => {}
                _ = stop.wait_for(|stopped| *stopped) => return Ok(()),
            }
        }
        pace.update(&window.backlog);
        let target = if pace.whole_window() {
            window.size
        } else {
            window.size.div_ceil(2)
        };
        // Each delivery holds a permit until acknowledged: at most `prefetch` are in memory.
        let patience = pace.refill_patience(target);
        let Some(taken) = window.next_batch(target, patience, &mut stop).await else {
            return Ok(());
        };
        let started = Instant::now();
        let received = tokio::select! {
            received = fetcher.members.consumers[fetcher.index].receive(taken) => received,
            _ = stop.wait_for(|stopped| *stopped) => {
                permits.add_permits(taken);
                return Ok(());
            }
        };
        match received {
            Ok(mut batch) => {
                if failures > 0 {
                    observed.status.reconnected();
                }
                failures = 0;
                observed.metrics.received.increment(batch.len() as u64);
                pace.fetched(started.elapsed(), taken, batch.len());
                fetcher.members.admit(fetcher.index, &mut batch);
                if let Some(partition) = fetcher.partition {
                    for received in &mut batch {
                        let message = std::mem::take(&mut received.message);
                        received.message = message.with_partition(partition);
                    }
                }
                permits.add_permits(taken.saturating_sub(batch.len()));
                observed.fetched(batch.len());
                window.backlog.add(batch.len());
                for delivery in batch {
                    if deliveries.send(delivery).is_err() {
                        return Ok(());
                    }
                }
            }
            Err(e) if e.is_temporary() => {
                permits.add_permits(taken);
                observed.status.reconnecting(&e);
                failures += 1;
                let wait = reconnect_backoff(failures);
                tracing::warn!(error = %e, retry_in = ?wait, "receive failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.wait_for(|stopped| *stopped) => return Ok(()),
                }
            }
            Err(e) => {
                permits.add_permits(taken);
                tracing::error!(error = %e, "receive failed permanently; consumer stops");
                return Err(e);
            }
        }
    }
}

/// Samples the group's lag every `interval` until the consumer stops.
async fn sample_lag(
    members: Arc<Members>,
    metrics: Arc<ConsumeMetrics>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
        // Inside the select too: a sample may take a round trip, and a stopping consumer
        // should not be kept open for it.
        let sampled = tokio::select! {
            sampled = members.lag() => sampled,
            _ = stop.wait_for(|stopped| *stopped) => return,
        };
        match sampled {
            Ok(Some(lag)) => metrics.lag.set(lag as f64),
            Ok(None) => return,
            Err(e) => tracing::debug!(error = %e, "could not sample the consumer's lag"),
        }
    }
}

async fn ack_loop(
    members: Arc<Members>,
    permits: Arc<Semaphore>,
    mut settlements: mpsc::UnboundedReceiver<Settlement>,
    observed: Observed,
) {
    let mut batch = Vec::with_capacity(MAX_ACK_BATCH);
    let (mut acks, mut releases, mut dropped) = (Vec::new(), Vec::new(), Vec::new());
    // Settlements that arrive while one batch is on its way are gathered into the next.
    while settlements.recv_many(&mut batch, MAX_ACK_BATCH).await > 0 {
        for settlement in batch.drain(..) {
            match settlement {
                Settlement::Ack(tag) => acks.push(tag),
                Settlement::Release(tag) => releases.push(tag),
                Settlement::Drop(tag) => dropped.push(tag),
            }
        }
        let settled = acks.len() + releases.len() + dropped.len();
        if !acks.is_empty() {
            settle_all(&members, &acks, Op::Ack).await;
        }
        if !releases.is_empty() {
            settle_all(&members, &releases, Op::Release).await;
        }
        members.forget(&dropped);
        observed.settled(settled);
        permits.add_permits(settled);
        acks.clear();
        releases.clear();
        dropped.clear();
    }
}

#[derive(Clone, Copy)]
enum Op {
    Ack,
    Release,
}

async fn settle_all(members: &Members, tags: &[DeliveryTag], op: Op) {
    if members.routed() {
        let routed = members.route(tags);
        futures::future::join_all(
            routed
                .iter()
                .map(|(member, tags)| settle_with_retries(&*members.consumers[*member], tags, op)),
        )
        .await;
    } else {
        settle_with_retries(&*members.consumers[0], tags, op).await;
    }
}

async fn settle_with_retries(consumer: &dyn Consumer, tags: &[DeliveryTag], op: Op) {
    let mut tries = 0;
    loop {
        let result = match op {
            Op::Ack => consumer.ack(tags).await,
            Op::Release => consumer.release(tags).await,
        };
        let limit = match op {
            Op::Ack => ACK_TRIES,
            Op::Release => RELEASE_TRIES,
        };
        match result {
            Ok(()) => return,
            Err(e) if e.is_temporary() && tries < limit => {
                tries += 1;
                let wait = reconnect_backoff(tries);
                tracing::warn!(error = %e, retry_in = ?wait, "settling deliveries failed; retrying");
                tokio::time::sleep(wait).await;
            }
            Err(e) => {
                match op {
                    Op::Ack => {
                        tracing::error!(error = %e, count = tags.len(), "ack failed; these messages will be delivered again")
                    }
                    Op::Release => {
                        tracing::warn!(error = %e, count = tags.len(), "could not hand back deliveries that no handler saw; closing hands them back counted as attempts")
                    }
                }
                return;
            }
        }
    }
}

/// 50 ms doubling to 5 s: for broker reconnects, not for handler retries.
pub(crate) fn reconnect_backoff(failures: u32) -> Duration {
    let ms = 50u64.saturating_mul(1 << failures.min(7).saturating_sub(1));
    Duration::from_millis(ms.min(5_000))
}
