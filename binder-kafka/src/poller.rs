//! The thread that owns a consumer's librdkafka client.
//!
//! librdkafka must be polled continuously: a member that does not poll for
//! `max.poll.interval.ms` is taken out of its group, rebalances of the whole group wait for
//! it, and rebalance callbacks run only inside a poll. Core asks for messages only while its
//! prefetch window has room, which with slow handlers may be never for minutes, so polling
//! cannot hang on `receive`. The poller polls all the time instead, on a thread of its own so
//! that nothing it does (rebalance callbacks, synchronous commits, leaving the group) ever
//! blocks an async worker:
//!
//! * fetched records go into a buffer bounded by `prefetch` messages and `fetch-queue-kbytes`
//!   bytes that `receive` drains; when it stays full for [`PAUSE_GRACE`], the poller pauses
//!   the fetch of every assigned partition and goes on polling for events only, and resumes
//!   once `receive` has drained half of it. librdkafka drops what it prefetched for a paused
//!   partition and resumes after the last record this thread took, so nothing is lost or
//!   skipped;
//! * on a revoke it stops handing out deliveries of the partitions that go, drops their
//!   buffered ones, waits (at most half of `max.poll.interval.ms`) for the started ones to be
//!   acknowledged, and commits what is contiguous before the partitions move; on a lost
//!   assignment (eviction) it commits nothing and lets go at once;
//! * it commits acknowledged positions every `commit-interval`;
//! * an anonymous consumer assigns the topic's partitions itself and adds partitions that
//!   appear later, from their first message;
//! * on stop it commits, leaves the group and destroys the client; `close` waits for that
//!   with a bound, and a stop that takes longer finishes in the background.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer as _, ConsumerContext, RebalanceProtocol,
};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use stream_core::{Error, ErrorKind, Result};
use tokio::sync::oneshot;

use crate::config::KafkaConfig;
use crate::consumer::{self, group_moved_on, is_recovering, offset_list, Room, Shared};
use crate::error::convert;
use crate::offsets::Delivery;
use crate::record;

/// Longest wait in one poll while fetching: bounds how late the poller sees a stop or a due
/// commit.
const POLL_WAIT: Duration = Duration::from_millis(100);
/// Poll wait while fetching is paused: bounds how late fetching resumes once `receive` has
/// drained the buffer.
const PAUSED_POLL_WAIT: Duration = Duration::from_millis(20);
/// How long the buffer may stay full before fetching pauses.
pub(crate) const PAUSE_GRACE: Duration = Duration::from_millis(50);
/// Most records taken in one go before they are handed to `receive`.
const MAX_BATCH: usize = 1024;
/// librdkafka's default `max.poll.interval.ms`.
const DEFAULT_MAX_POLL_INTERVAL: Duration = Duration::from_secs(300);
/// librdkafka's default `topic.metadata.refresh.interval.ms`.
const DEFAULT_METADATA_REFRESH: Duration = Duration::from_secs(300);

/// How the poller behaves, from the binder's settings and the client's properties.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    commit_interval: Duration,
    /// Longest wait for started deliveries of a partition being revoked: half of
    /// `max.poll.interval.ms`, since the poller does not poll meanwhile.
    revoke_wait: Duration,
    /// How often an anonymous consumer looks for partitions added to its topic: as often as
    /// librdkafka refreshes metadata for a group member (`topic.metadata.refresh.interval.ms`);
    /// None when that is switched off.
    partition_check: Option<Duration>,
}

impl Settings {
    pub(crate) fn from_client(client: &ClientConfig, config: &KafkaConfig) -> Settings {
        let millis = |name: &str| {
            client
                .get(name)
                .and_then(|value| value.trim().parse::<i64>().ok())
        };
        let max_poll_interval = millis("max.poll.interval.ms")
            .and_then(|ms| u64::try_from(ms).ok())
            .map_or(DEFAULT_MAX_POLL_INTERVAL, Duration::from_millis);
        let partition_check = match millis("topic.metadata.refresh.interval.ms") {
            None => Some(DEFAULT_METADATA_REFRESH),
            Some(ms) => u64::try_from(ms)
                .ok()
                .filter(|ms| *ms > 0)
                .map(Duration::from_millis),
        };
        Settings {
            commit_interval: config.commit_interval,
            revoke_wait: max_poll_interval / 2,
            partition_check,
        }
    }
}

/// How a consumer starts reading.
pub(crate) enum Start {
    /// Joins the group; its coordinator assigns partitions. A new group whose start is
    /// "latest" first commits the ends of these partitions.
    Subscribe { pin_latest: Option<Vec<i32>> },
    /// Reads exactly `partitions`, from the group's committed offsets.
    Assign {
        partitions: Vec<i32>,
        pin_latest: Option<Vec<i32>>,
    },
    /// Reads every partition from its end now, and partitions added later from their start.
    Anonymous { partitions: Vec<i32> },
}

/// What the poller tells the consumer side.
pub(crate) struct Reports {
    /// The consumer is reading, or why it cannot.
    pub(crate) started: oneshot::Sender<Result<()>>,
    /// The final commit is done (or refused).
    pub(crate) committed: oneshot::Sender<Result<()>>,
    /// The client left its group and is destroyed.
    pub(crate) left: oneshot::Sender<()>,
}

/// The librdkafka context of a consumer: rebalance and commit callbacks, which librdkafka
/// runs inside polls, so on the poller thread.
pub(crate) struct Context {
    shared: Arc<Shared>,
    /// Whether the fetch of every assigned partition is paused; only the poller changes it.
    paused: AtomicBool,
    /// Set when the consumer stops: a revoke then waits for nothing.
    closing: AtomicBool,
    revoke_wait: Duration,
}

impl Context {
    pub(crate) fn new(shared: Arc<Shared>, settings: &Settings) -> Context {
        Context {
            shared,
            paused: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            revoke_wait: settings.revoke_wait,
        }
    }

    fn partitions_of(&self, list: &TopicPartitionList) -> Vec<i32> {
        list.elements_for_topic(&self.shared.topic)
            .iter()
            .map(|element| element.partition())
            .collect()
    }

    /// Gives newly assigned partitions the pause state of the others: a pause outlives a
    /// partition's unassignment in librdkafka, so one reassigned later would otherwise stay
    /// paused for good.
    fn align_pause(&self, consumer: &BaseConsumer<Self>, list: &TopicPartitionList) {
        let result = if self.paused.load(Ordering::Relaxed) {
            consumer.pause(list)
        } else {
            consumer.resume(list)
        };
        if let Err(e) = result {
            tracing::warn!(topic = %self.shared.topic, error = %e, "could not pause or resume newly assigned partitions");
        }
    }

    fn assign(&self, consumer: &BaseConsumer<Self>, list: &TopicPartitionList) {
        let partitions = self.partitions_of(list);
        if self.shared.tracks_offsets {
            let mut state = self.shared.lock();
            for &partition in &partitions {
                state.tracker.assign(partition);
            }
        }
        let assigned = match consumer.rebalance_protocol() {
            RebalanceProtocol::Cooperative => consumer.incremental_assign(list),
            _ => consumer.assign(list),
        };
        match assigned {
            Ok(()) => self.align_pause(consumer, list),
            Err(e) => {
                tracing::error!(topic = %self.shared.topic, error = %e, ?partitions, "librdkafka refused an assignment")
            }
        }
    }

    /// Hands revoked partitions back once their started deliveries are acknowledged (or
    /// half the poll interval has passed), with what they acknowledged committed.
    fn revoke(&self, consumer: &BaseConsumer<Self>, partitions: &[i32]) {
        let mut state = self.shared.lock();
        for &partition in partitions {
            state.tracker.begin_revoke(partition);
        }
        Shared::forget_buffered(&mut state, partitions);
        let wait = if self.closing.load(Ordering::Relaxed) {
            Duration::ZERO
        } else {
            self.revoke_wait
        };
        let (mut state, unfinished) = self.shared.wait_for_started(state, Instant::now() + wait);
        if unfinished > 0 {
            tracing::warn!(topic = %self.shared.topic, ?partitions, unfinished, "handlers of revoked partitions did not finish within half of max.poll.interval.ms; the next owner delivers their messages again");
        }
        let positions: Vec<(i32, i64)> = partitions
            .iter()
            .filter_map(|&partition| state.tracker.revoke(partition).map(|p| (partition, p)))
            .collect();
        drop(state);
        if positions.is_empty() {
            return;
        }
        // Synchronous, so the next owner starts exactly after what was acknowledged.
        if let Err(e) = consumer.commit(
            &offset_list(&self.shared.topic, &positions),
            CommitMode::Sync,
        ) {
            tracing::warn!(topic = %self.shared.topic, error = %e, "commit on revoke failed; the next owner delivers some messages again");
        }
    }

    /// Lets go of partitions the group took away without a revoke (this member was evicted,
    /// or its session expired): the new owner may be reading them already, so nothing is
    /// committed and nothing more of them is handed out.
    fn lose(&self, partitions: &[i32]) {
        let mut state = self.shared.lock();
        for &partition in partitions {
            let _ = state.tracker.revoke(partition);
        }
        Shared::forget_buffered(&mut state, partitions);
        drop(state);
        tracing::warn!(topic = %self.shared.topic, lost_partitions = ?partitions, "this member lost partitions to its group (evicted, or its session expired): their deliveries that have not started are dropped, later acknowledgements of them are not committed, and the new owner delivers everything after the last commit again");
    }

    fn unassign(&self, consumer: &BaseConsumer<Self>, list: &TopicPartitionList) {
        let unassigned = match consumer.rebalance_protocol() {
            RebalanceProtocol::Cooperative => consumer.incremental_unassign(list),
            _ => consumer.unassign(),
        };
        if let Err(e) = unassigned {
            tracing::error!(topic = %self.shared.topic, error = %e, "librdkafka refused an unassignment");
        }
    }
}

impl ClientContext for Context {}

impl ConsumerContext for Context {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        list: &mut TopicPartitionList,
    ) {
        let partitions = self.partitions_of(list);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => self.assign(consumer, list),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                if consumer.assignment_lost() {
                    self.lose(&partitions);
                } else {
                    self.revoke(consumer, &partitions);
                }
                self.unassign(consumer, list);
            }
            _ => {
                // What librdkafka's default handler does: give the partitions up.
                tracing::warn!(topic = %self.shared.topic, error = ?err, "rebalance failed");
                self.lose(&partitions);
                self.unassign(consumer, list);
            }
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        let Err(error) = result else {
            return;
        };
        if group_moved_on(&error) {
            tracing::debug!(topic = %self.shared.topic, error = %error, "commit refused while the group rebalances; retried with the next one");
        } else {
            tracing::warn!(topic = %self.shared.topic, error = %error, "commit failed; retried with the next one");
        }
        let mut state = self.shared.lock();
        for element in offsets.elements_for_topic(&self.shared.topic) {
            if let Offset::Offset(position) = element.offset() {
                state.tracker.commit_failed(element.partition(), position);
            }
        }
    }
}

/// Starts the poller thread of `consumer`.
pub(crate) fn spawn(
    consumer: BaseConsumer<Context>,
    shared: Arc<Shared>,
    start: Start,
    settings: Settings,
    reports: Reports,
) -> Result<()> {
    let topic = shared.topic.clone();
    std::thread::Builder::new()
        .name("stream-kafka-consumer".to_owned())
        .spawn(move || {
            Poller {
                consumer,
                shared,
                settings,
                anonymous: None,
                copies: Default::default(),
            }
            .run(start, reports)
        })
        .map(drop)
        .map_err(|e| {
            Error::new(
                ErrorKind::Broker,
                format!("cannot start the poller thread of the consumer of Kafka topic `{topic}`"),
            )
            .with_source(e)
        })
}

/// Marks the consumer ended when the poller stops, however it stops (a panic included), so
/// that `receive` never waits for a thread that is gone.
struct EndOnExit(Arc<Shared>);

impl Drop for EndOnExit {
    fn drop(&mut self) {
        let error = std::thread::panicking().then(|| {
            Error::new(
                ErrorKind::Broker,
                format!(
                    "the poller thread of the consumer of Kafka topic `{}` panicked",
                    self.0.topic
                ),
            )
        });
        self.0.end(error);
    }
}

struct Poller {
    consumer: BaseConsumer<Context>,
    shared: Arc<Shared>,
    settings: Settings,
    /// The partitions an anonymous consumer assigned itself.
    anonymous: Option<BTreeSet<i32>>,
    /// Where records are copied to, kept from one fetch to the next.
    copies: std::cell::RefCell<record::Copies>,
}

impl Poller {
    fn run(mut self, start: Start, reports: Reports) {
        let ended = EndOnExit(self.shared.clone());
        let Reports {
            started,
            committed,
            left,
        } = reports;
        match self.start(start) {
            Ok(()) => {
                if started.send(Ok(())).is_ok() {
                    self.poll_until_stopped();
                }
                // Else `open` was abandoned: nobody will read, so close at once.
            }
            Err(e) => {
                let _ = started.send(Err(e));
            }
        }
        drop(ended);
        self.close(committed, left);
    }

    fn start(&mut self, start: Start) -> Result<()> {
        let topic = self.shared.topic.clone();
        match start {
            Start::Subscribe { pin_latest } => {
                if let Some(partitions) = pin_latest {
                    consumer::pin_new_group_at_end(&self.consumer, &topic, &partitions)?;
                }
                self.consumer
                    .subscribe(&[&topic])
                    .map_err(|e| convert(e, format!("subscribing to Kafka topic `{topic}`")))
            }
            Start::Assign {
                partitions,
                pin_latest,
            } => {
                if let Some(all) = pin_latest {
                    consumer::pin_new_group_at_end(&self.consumer, &topic, &all)?;
                }
                {
                    let mut state = self.shared.lock();
                    for &partition in &partitions {
                        state.tracker.assign(partition);
                    }
                }
                let positions: Vec<(i32, Offset)> =
                    partitions.iter().map(|&p| (p, Offset::Stored)).collect();
                self.assign(&positions)
            }
            Start::Anonymous { partitions } => {
                let ends = consumer::ends(&self.consumer, &topic, &partitions)?;
                let positions: Vec<(i32, Offset)> = ends
                    .iter()
                    .map(|&(partition, end)| (partition, Offset::Offset(end)))
                    .collect();
                self.assign(&positions)?;
                self.anonymous = Some(partitions.into_iter().collect());
                Ok(())
            }
        }
    }

    /// Adds `positions` to the assignment of a consumer that assigns partitions itself.
    fn assign(&self, positions: &[(i32, Offset)]) -> Result<()> {
        let topic = &self.shared.topic;
        let mut list = TopicPartitionList::with_capacity(positions.len());
        for &(partition, offset) in positions {
            list.add_partition_offset(topic, partition, offset)
                .map_err(|e| convert(e, "building an assignment"))?;
        }
        self.consumer
            .incremental_assign(&list)
            .map_err(|e| convert(e, format!("assigning Kafka topic `{topic}`")))?;
        self.consumer.context().align_pause(&self.consumer, &list);
        Ok(())
    }

    fn poll_until_stopped(&mut self) {
        let mut next_commit = Instant::now() + self.settings.commit_interval;
        let mut next_partition_check = self
            .settings
            .partition_check
            .filter(|_| self.anonymous.is_some())
            .map(|every| (every, Instant::now() + every));
        loop {
            let paused = self.consumer.context().paused.load(Ordering::Relaxed);
            let (messages, bytes) = match self.shared.room(paused, PAUSE_GRACE) {
                Room::Stop => return,
                Room::Free { messages, bytes } => (messages, bytes),
                Room::Full => (0, 0),
            };
            if messages == 0 && !paused {
                self.set_paused(true);
            } else if paused && self.shared.may_resume() {
                self.set_paused(false);
            }
            let paused = self.consumer.context().paused.load(Ordering::Relaxed);
            let wait = if paused { PAUSED_POLL_WAIT } else { POLL_WAIT };
            // Paused, polls serve events; a record fetched before the pause took effect is
            // still taken, and the buffer goes over its bound by that much.
            if !self.fetch(wait, messages.clamp(1, MAX_BATCH), bytes.max(1)) {
                return;
            }
            let now = Instant::now();
            if self.shared.tracks_offsets && now >= next_commit {
                self.commit_acknowledged();
                next_commit = now + self.settings.commit_interval;
            }
            if let Some((every, at)) = next_partition_check.as_mut() {
                if now >= *at {
                    self.follow_new_partitions();
                    *at = Instant::now() + *every;
                }
            }
        }
    }

    /// Pauses or resumes the fetch of every assigned partition.
    fn set_paused(&self, paused: bool) {
        let context = self.consumer.context();
        context.paused.store(paused, Ordering::Relaxed);
        let assignment = match self.consumer.assignment() {
            Ok(assignment) => assignment,
            Err(e) => {
                tracing::warn!(topic = %self.shared.topic, error = %e, "cannot read the assignment to pause or resume it");
                return;
            }
        };
        if assignment.count() > 0 {
            context.align_pause(&self.consumer, &assignment);
        }
        tracing::trace!(topic = %self.shared.topic, paused, "fetching paused or resumed");
    }

    /// Polls for up to `limit` records or `bytes` of payload and key (the last record may go
    /// over), waiting at most `wait` for the first, and hands them to `receive`. False once
    /// the consumer cannot go on (a fatal error).
    fn fetch(&self, wait: Duration, limit: usize, bytes: usize) -> bool {
        let mut messages: Vec<BorrowedMessage<'_>> = Vec::with_capacity(limit);
        let mut wait = wait;
        let mut budget = bytes;
        let mut go_on = true;
        while messages.len() < limit && budget > 0 {
            match self.consumer.poll(wait) {
                None => break,
                Some(Ok(message)) => {
                    budget = budget.saturating_sub(message.payload_len() + message.key_len());
                    messages.push(message);
                }
                Some(Err(e)) if is_recovering(&e) => {
                    // librdkafka logs these itself (through `tracing`).
                    tracing::debug!(topic = %self.shared.topic, error = %e, "librdkafka is recovering; consuming on");
                }
                Some(Err(e)) => {
                    let fatal = matches!(e, KafkaError::MessageConsumptionFatal(_));
                    let error =
                        convert(e, format!("consuming Kafka topic `{}`", self.shared.topic))
                            .temporary(!fatal);
                    if fatal {
                        self.shared.end(Some(error));
                        go_on = false;
                    } else {
                        // librdkafka reconnects and rejoins by itself: reported, not fatal.
                        self.shared.report(error);
                    }
                    break;
                }
            }
            wait = Duration::ZERO;
        }
        if !messages.is_empty() {
            self.hand_over(&messages);
        }
        go_on
    }

    /// Records `messages` as fetched, copies them out of librdkafka and buffers them.
    fn hand_over(&self, messages: &[BorrowedMessage<'_>]) {
        let mut copies = self.copies.borrow_mut();
        copies.reserve(messages.iter().map(|m| m.payload_len()).sum());
        let deliveries: Vec<Option<Delivery>> = if self.shared.tracks_offsets {
            let mut state = self.shared.lock();
            messages
                .iter()
                .map(|m| state.tracker.delivered(m.partition(), m.offset()))
                .collect()
        } else {
            messages
                .iter()
                .map(|m| {
                    Some(Delivery {
                        partition: m.partition(),
                        epoch: 0,
                        offset: m.offset(),
                    })
                })
                .collect()
        };
        let batch = messages
            .iter()
            .zip(deliveries)
            // A record of a partition that is no longer ours (fetched just before it was
            // lost) is the new owner's to deliver.
            .filter_map(|(message, delivery)| {
                Some(record::received(message, delivery?.tag(), &mut copies))
            })
            .collect();
        self.shared.deliver(batch);
    }

    /// Commits acknowledged positions that moved, without waiting for the answer; a failure
    /// comes back through [`Context::commit_callback`] and is retried next time.
    fn commit_acknowledged(&self) {
        let positions = self.shared.lock().tracker.take_uncommitted();
        if positions.is_empty() {
            return;
        }
        if let Err(e) = self.consumer.commit(
            &offset_list(&self.shared.topic, &positions),
            CommitMode::Async,
        ) {
            tracing::debug!(topic = %self.shared.topic, error = %e, "commit not sent; retried next time");
            let mut state = self.shared.lock();
            for (partition, position) in positions {
                state.tracker.commit_failed(partition, position);
            }
        }
    }

    /// Assigns an anonymous consumer the partitions added to its topic since it looked last,
    /// from their first message: all of it was published after the consumer started.
    fn follow_new_partitions(&mut self) {
        let topic = self.shared.topic.clone();
        let partitions = match consumer::topic_partitions(&self.consumer, &topic) {
            Ok(partitions) => partitions,
            Err(e) => {
                tracing::debug!(topic, error = %e, "cannot look for new partitions; trying again later");
                return;
            }
        };
        let known = self.anonymous.get_or_insert_with(BTreeSet::new);
        let new: Vec<(i32, Offset)> = partitions
            .into_iter()
            .filter(|p| !known.contains(p))
            .map(|p| (p, Offset::Beginning))
            .collect();
        if new.is_empty() {
            return;
        }
        match self.assign(&new) {
            Ok(()) => {
                tracing::info!(topic, partitions = ?new.iter().map(|(p, _)| p).collect::<Vec<_>>(), "reading partitions added to the topic");
                if let Some(known) = self.anonymous.as_mut() {
                    known.extend(new.iter().map(|(p, _)| *p));
                }
            }
            Err(e) => {
                tracing::warn!(topic, error = %e, "cannot read partitions added to the topic; trying again later")
            }
        }
    }

    /// Commits what was acknowledged, leaves the group and destroys the client, reporting
    /// each step. Leaving may take long when the group or the cluster is in trouble; it runs
    /// here, on this thread, whoever waits for it.
    fn close(self, committed: oneshot::Sender<Result<()>>, left: oneshot::Sender<()>) {
        let context = self.consumer.context();
        context.closing.store(true, Ordering::Relaxed);
        let result = if self.shared.tracks_offsets {
            self.commit_before_leaving()
        } else {
            Ok(())
        };
        let _ = committed.send(result);
        // rdkafka's drop leaves the group, serving the rebalance callbacks that takes, and
        // destroys the client.
        drop(self.consumer);
        let _ = left.send(());
    }

    fn commit_before_leaving(&self) -> Result<()> {
        let positions = self.shared.lock().tracker.take_uncommitted();
        if positions.is_empty() {
            return Ok(());
        }
        let topic = &self.shared.topic;
        match self
            .consumer
            .commit(&offset_list(topic, &positions), CommitMode::Sync)
        {
            Ok(()) => Ok(()),
            Err(e) if group_moved_on(&e) => {
                // Members closing side by side rebalance the group under each other; a
                // commit from the old generation is refused and cannot be made good. Nothing
                // is lost: the next owner starts from the last commit and delivers what came
                // after it again.
                tracing::warn!(topic = %topic, error = %e, "the group rebalanced while this member closed; its last acknowledgements were not committed and will be delivered again");
                Ok(())
            }
            Err(e) => Err(convert(
                e,
                format!("committing offsets of Kafka topic `{topic}`"),
            )),
        }
    }
}
