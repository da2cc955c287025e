//! Consuming: one librdkafka consumer per group member, polled by a thread of its own, and
//! committing only contiguously acknowledged offsets.
//!
//! The poller thread ([`crate::poller`]) owns the librdkafka client. It polls all the time,
//! whatever core's prefetch window holds, so the member never exceeds
//! `max.poll.interval.ms` and rebalances never wait for it; it fills a bounded buffer that
//! [`Consumer::receive`] drains, and pauses fetching while the buffer stays full. Nothing on
//! this side touches librdkafka: `receive`, `ack` and `holds` only take a short lock, and
//! dropping the consumer only tells the thread to close.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaErrorCode;
use stream_core::{
    Consumer, ConsumerOptions, DeliveryTag, Error, ErrorKind, Received, Result, StartFrom,
};
use tokio::sync::{oneshot, Notify};

use crate::config::KafkaConfig;
use crate::election::through_election;
use crate::error::{convert, kind_of};
use crate::lag::LagReader;
use crate::offsets::{Delivery, OffsetTracker};
use crate::poller::{self, Reports, Start};

/// How long one `receive` waits for a first message before returning an empty batch.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Bounds blocking calls made while the consumer starts (offset lookups, commits).
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `close` waits for the final commit and for leaving the group.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the consumer side and the poller thread share.
pub(crate) struct Shared {
    pub(crate) topic: String,
    /// Group members track deliveries and commit; an anonymous consumer does neither.
    pub(crate) tracks_offsets: bool,
    limits: Limits,
    state: Mutex<State>,
    /// Wakes the poller: room in the buffer, a started delivery of a partition being revoked
    /// acknowledged, a stop.
    wake_poller: Condvar,
    /// Wakes `receive`: deliveries, an error, or the end of the consumer.
    ready: Notify,
}

/// Bounds of the buffer between the poller and `receive`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) messages: usize,
    pub(crate) bytes: usize,
}

pub(crate) struct State {
    /// Fetched deliveries `receive` has not returned, with their sizes.
    buffer: VecDeque<(Received, usize)>,
    buffered_bytes: usize,
    /// Returned by the next `receive`, after what was fetched before it.
    error: Option<Error>,
    /// The poller has stopped: `receive` returns [`ErrorKind::Closed`] once the buffer is
    /// empty.
    ended: bool,
    /// The consumer is closing or dropped: the poller commits and leaves.
    stop: bool,
    /// The poller is waiting for `receive` to make room.
    poller_waits_for_room: bool,
    pub(crate) tracker: OffsetTracker,
}

/// What the buffer has room for, as the poller sees it.
pub(crate) enum Room {
    /// This many more messages, and this many more bytes (at least one message fits,
    /// whatever its size).
    Free { messages: usize, bytes: usize },
    /// None, after the grace period.
    Full,
    /// The consumer is stopping.
    Stop,
}

impl Shared {
    pub(crate) fn new(topic: &str, tracks_offsets: bool, limits: Limits) -> Shared {
        Shared {
            topic: topic.to_owned(),
            tracks_offsets,
            limits,
            state: Mutex::new(State {
                buffer: VecDeque::new(),
                buffered_bytes: 0,
                error: None,
                ended: false,
                stop: false,
                poller_waits_for_room: false,
                tracker: OffsetTracker::new(),
            }),
            wake_poller: Condvar::new(),
            ready: Notify::new(),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn room_in(&self, state: &State) -> Option<Room> {
        let bytes = self.limits.bytes.saturating_sub(state.buffered_bytes);
        let messages = self.limits.messages.saturating_sub(state.buffer.len());
        (bytes > 0 && messages > 0).then_some(Room::Free { messages, bytes })
    }

    /// The room in the buffer. When there is none and fetching is not paused, waits up to
    /// `grace` for `receive` to make some: a consumer that keeps up never pauses, since a
    /// pause drops what librdkafka prefetched for the paused partitions (it is fetched again
    /// on resume).
    pub(crate) fn room(&self, paused: bool, grace: Duration) -> Room {
        let mut state = self.lock();
        let deadline = Instant::now() + grace;
        loop {
            if state.stop {
                return Room::Stop;
            }
            if let Some(room) = self.room_in(&state) {
                return room;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if paused || left.is_zero() {
                return Room::Full;
            }
            state.poller_waits_for_room = true;
            state = self
                .wake_poller
                .wait_timeout(state, left)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
            state.poller_waits_for_room = false;
        }
    }

    /// Whether a paused consumer has drained enough of the buffer to fetch again. Half, so
    /// that a slow consumer does not pause and resume (each a refetch) per message.
    pub(crate) fn may_resume(&self) -> bool {
        let state = self.lock();
        state.buffer.len() <= self.limits.messages / 2
            && state.buffered_bytes <= self.limits.bytes / 2
    }

    /// Gives fetched deliveries to `receive`.
    pub(crate) fn deliver(&self, batch: Vec<(Received, usize)>) {
        let mut state = self.lock();
        for (received, size) in batch {
            state.buffered_bytes += size;
            state.buffer.push_back((received, size));
        }
        drop(state);
        self.ready.notify_one();
    }

    /// Reports `error` through the next `receive`; a later one is only logged while the first
    /// waits.
    pub(crate) fn report(&self, error: Error) {
        let mut state = self.lock();
        if state.error.is_none() {
            state.error = Some(error);
        } else {
            tracing::debug!(topic = %self.topic, error = %error, "consumer error while another waits to be reported");
        }
        drop(state);
        self.ready.notify_one();
    }

    /// Drops buffered deliveries of `partitions`: they are no longer this member's to hand
    /// out.
    pub(crate) fn forget_buffered(state: &mut State, partitions: &[i32]) {
        let mut freed = 0;
        state.buffer.retain(|(received, size)| {
            let keep = !partitions.contains(&Delivery::of(received.tag).partition);
            if !keep {
                freed += size;
            }
            keep
        });
        state.buffered_bytes -= freed;
    }

    /// Waits, at most until `deadline`, until every started delivery of the partitions being
    /// revoked is acknowledged; returns how many are not.
    pub(crate) fn wait_for_started<'a>(
        &'a self,
        mut state: MutexGuard<'a, State>,
        deadline: Instant,
    ) -> (MutexGuard<'a, State>, usize) {
        loop {
            let pending = state.tracker.started_while_revoking();
            let left = deadline.saturating_duration_since(Instant::now());
            if pending == 0 || left.is_zero() || state.stop {
                return (state, pending);
            }
            state = self
                .wake_poller
                .wait_timeout(state, left)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }

    /// Asks the poller to commit, leave the group and end.
    pub(crate) fn request_stop(&self) {
        self.lock().stop = true;
        self.wake_poller.notify_all();
    }

    /// The poller has ended: `receive` returns what is buffered, then an error.
    pub(crate) fn end(&self, error: Option<Error>) {
        let mut state = self.lock();
        state.ended = true;
        if let Some(error) = error {
            state.error.get_or_insert(error);
        }
        drop(state);
        self.ready.notify_one();
    }
}

/// One member of a consumer group (or an anonymous consumer) of one topic.
pub(crate) struct KafkaConsumer {
    shared: Arc<Shared>,
    /// The group's lag; `None` for an anonymous consumer, which commits nothing.
    lag: Option<LagReader>,
    /// How the poller reports the end of a close; taken by the first `close`.
    closing: Mutex<Option<CloseReports>>,
}

/// The final commit's outcome, then the end of leaving the group.
type CloseReports = (oneshot::Receiver<Result<()>>, oneshot::Receiver<()>);

impl KafkaConsumer {
    /// Creates the member and starts its poller thread, which joins the group, or assigns
    /// the partitions of a static or anonymous consumer, before this returns.
    ///
    /// Cancel safety: dropping the future before it completes leaves the poller to close
    /// the client by itself.
    pub(crate) async fn open(
        config: &KafkaConfig,
        topic: &str,
        partitions: &[i32],
        options: &ConsumerOptions,
    ) -> Result<KafkaConsumer> {
        let mut client = config.consumer_config();
        // librdkafka wants a group even for a manual assignment; an anonymous one never
        // joins it nor commits to it.
        client.set("group.id", &options.group);
        // `start-from` decides only where a new group starts, which `pin_new_group_at_end`
        // takes care of. Everything else without a usable committed offset (a partition
        // added later, an offset retention deleted) starts from the oldest retained message:
        // skipping retained messages silently is never right for a durable group.
        client.set("auto.offset.reset", "earliest");
        let latest = options.start_from == StartFrom::Latest;
        let start = match (&options.partitions, options.durable) {
            (_, false) => Start::Anonymous {
                partitions: partitions.to_vec(),
            },
            // Assigned by configuration (instance-index of instance-count): the member reads
            // exactly these, from the group's committed offsets, and no rebalance ever moves
            // them.
            (Some(mine), true) => Start::Assign {
                partitions: static_assignment(topic, partitions, mine)?,
                pin_latest: latest.then(|| partitions.to_vec()),
            },
            (None, true) => Start::Subscribe {
                pin_latest: latest.then(|| partitions.to_vec()),
            },
        };
        let settings = poller::Settings::from_client(&client, config);
        let limits = Limits {
            messages: options.prefetch.max(1),
            bytes: config.fetch_queue_kbytes as usize * 1024,
        };
        let shared = Arc::new(Shared::new(topic, options.durable, limits));
        let consumer: BaseConsumer<poller::Context> = client
            .create_with_context(poller::Context::new(shared.clone(), &settings))
            .map_err(|e| config.client_error(e))?;
        let (started, started_rx) = oneshot::channel();
        let (committed, committed_rx) = oneshot::channel();
        let (left, left_rx) = oneshot::channel();
        poller::spawn(
            consumer,
            shared.clone(),
            start,
            settings,
            Reports {
                started,
                committed,
                left,
            },
        )?;
        // Made before the wait, so that dropping this future stops the poller (through
        // `Drop`) whether or not it has started yet.
        let opened = KafkaConsumer {
            shared,
            lag: options
                .durable
                .then(|| LagReader::new(config, topic, &options.group)),
            closing: Mutex::new(Some((committed_rx, left_rx))),
        };
        match started_rx.await {
            Ok(Ok(())) => Ok(opened),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::new(
                ErrorKind::Broker,
                format!("the consumer of Kafka topic `{topic}` ended while it started"),
            )),
        }
    }

    fn closed(&self) -> Error {
        Error::new(
            ErrorKind::Closed,
            format!(
                "the consumer of Kafka topic `{}` is closed",
                self.shared.topic
            ),
        )
    }
}

#[async_trait]
impl Consumer for KafkaConsumer {
    /// Cancel safety: deliveries leave the buffer only in the poll that returns them, with
    /// no await point after, so a dropped future loses nothing.
    async fn receive(&self, max: usize) -> Result<Vec<Received>> {
        let deadline = tokio::time::Instant::now() + POLL_INTERVAL;
        loop {
            {
                let mut state = self.shared.lock();
                if !state.buffer.is_empty() {
                    let take = max.max(1).min(state.buffer.len());
                    let mut batch = Vec::with_capacity(take);
                    let mut freed = 0;
                    for (received, size) in state.buffer.drain(..take) {
                        freed += size;
                        batch.push(received);
                    }
                    state.buffered_bytes -= freed;
                    let wake = state.poller_waits_for_room;
                    drop(state);
                    if wake {
                        self.shared.wake_poller.notify_all();
                    }
                    return Ok(batch);
                }
                if let Some(error) = state.error.take() {
                    return Err(error);
                }
                if state.ended {
                    return Err(self.closed());
                }
            }
            // A notification from a batch taken earlier only makes this look again.
            if tokio::time::timeout_at(deadline, self.shared.ready.notified())
                .await
                .is_err()
            {
                return Ok(Vec::new());
            }
        }
    }

    /// Records acknowledgements; the poller commits what they make contiguous every
    /// `commit-interval`, when partitions are revoked, and when the consumer closes.
    async fn ack(&self, tags: &[DeliveryTag]) -> Result<()> {
        if !self.shared.tracks_offsets {
            return Ok(());
        }
        let acked = self
            .shared
            .lock()
            .tracker
            .acked(tags.iter().map(|&tag| Delivery::of(tag)));
        if acked.revoking_progress {
            self.shared.wake_poller.notify_all();
        }
        Ok(())
    }

    /// False for deliveries of partitions revoked or lost since they were fetched (their
    /// new owner delivers them); a true answer records that the delivery started, so a
    /// revoke waits for its acknowledgement before handing the partition over.
    fn holds(&self, tag: DeliveryTag) -> bool {
        if !self.shared.tracks_offsets {
            // Anonymous consumers assign their partitions themselves and never lose them.
            return true;
        }
        self.shared.lock().tracker.start(Delivery::of(tag))
    }

    /// Group-wide, over every partition of the topic (see [`crate::lag`]), read by a client
    /// of its own that never joins the group; `None` for an anonymous consumer, which keeps
    /// no commits to measure from.
    async fn lag(&self) -> Result<Option<u64>> {
        match &self.lag {
            Some(reader) => reader.lag().await.map(Some),
            None => Ok(None),
        }
    }

    /// Commits what was acknowledged and leaves the group, waiting at most 10 s. A commit
    /// that does not finish in time is an [`ErrorKind::Timeout`] error; leaving the group
    /// goes on in the background either way.
    ///
    /// Cancel safety: the close goes on in the background if the future is dropped.
    async fn close(&self) -> Result<()> {
        let reports = self
            .closing
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        let Some((committed, left)) = reports else {
            return Ok(());
        };
        self.shared.request_stop();
        let deadline = tokio::time::Instant::now() + CLOSE_TIMEOUT;
        match tokio::time::timeout_at(deadline, committed).await {
            Ok(Ok(result)) => result?,
            // The poller ended before it could close (it failed, and said so through
            // `receive`): there is nothing it could still commit.
            Ok(Err(_)) => {}
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "the final commit of the consumer of Kafka topic `{}` did not finish within {CLOSE_TIMEOUT:?}; what was acknowledged since the last commit will be delivered again",
                        self.shared.topic
                    ),
                ))
            }
        }
        if tokio::time::timeout_at(deadline, left).await.is_err() {
            tracing::warn!(topic = %self.shared.topic, "leaving the consumer group takes longer than {CLOSE_TIMEOUT:?}; it goes on in the background");
        }
        Ok(())
    }
}

impl Drop for KafkaConsumer {
    /// Only tells the poller thread to commit and leave: nothing here blocks.
    fn drop(&mut self) {
        self.shared.request_stop();
    }
}

/// Whether `error`, taken from the consumer queue, only reports something librdkafka is
/// already recovering from by itself: a broker connection that dropped or was refused, a
/// leader or coordinator being looked up again, a request that timed out. librdkafka queues
/// one such report per failed attempt and meanwhile keeps fetching from the brokers that are
/// up. Returned as receive failures, they made core back off once per report, so after a
/// broker died the messages of partitions that had already failed over to live brokers
/// waited behind a growing queue of reports (a stall of a minute and more on a cluster).
pub(crate) fn is_recovering(error: &KafkaError) -> bool {
    matches!(error, KafkaError::MessageConsumption(_))
        && matches!(kind_of(error), ErrorKind::Connection | ErrorKind::Timeout)
}

/// Whether a commit was refused because the group has a newer generation than this member
/// (it rebalanced, or dropped the member): retrying cannot succeed.
pub(crate) fn group_moved_on(error: &KafkaError) -> bool {
    matches!(
        error,
        KafkaError::ConsumerCommit(
            RDKafkaErrorCode::IllegalGeneration
                | RDKafkaErrorCode::UnknownMemberId
                | RDKafkaErrorCode::RebalanceInProgress
        )
    )
}

/// `positions` of `topic` as a list to commit.
pub(crate) fn offset_list(topic: &str, positions: &[(i32, i64)]) -> TopicPartitionList {
    let mut list = TopicPartitionList::with_capacity(positions.len());
    for &(partition, offset) in positions {
        // Only fails for a sentinel offset, which positions never are.
        let _ = list.add_partition_offset(topic, partition, Offset::Offset(offset));
    }
    list
}

/// Runs blocking librdkafka calls off the async worker threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::new(ErrorKind::Broker, "blocking Kafka call failed").with_source(e))
}

/// The high watermark (offset of the next message) of each partition, asked again while a
/// partition's leader is being elected (a topic created a moment ago), within
/// [`CALL_TIMEOUT`].
pub(crate) fn ends<C: ConsumerContext, K: rdkafka::consumer::Consumer<C>>(
    consumer: &K,
    topic: &str,
    partitions: &[i32],
) -> Result<Vec<(i32, i64)>> {
    let deadline = Instant::now() + CALL_TIMEOUT;
    partitions
        .iter()
        .map(|&partition| {
            through_election(deadline, |left| {
                consumer.fetch_watermarks(topic, partition, left)
            })
            .map(|(_, high)| (partition, high))
            .map_err(|e| convert(e, format!("end offsets of Kafka topic `{topic}`")))
        })
        .collect()
}

/// Makes "latest" mean the end at the time the group is created, not whenever librdkafka
/// gets round to resolving it after the first assignment (messages published in between
/// would be skipped): partitions the group never committed get their current end committed
/// before the member joins. A group that exists keeps its commits.
pub(crate) fn pin_new_group_at_end<C: ConsumerContext, K: rdkafka::consumer::Consumer<C>>(
    consumer: &K,
    topic: &str,
    partitions: &[i32],
) -> Result<()> {
    let committed = committed(consumer, topic, Some(partitions))?;
    if !committed.is_empty() {
        return Ok(());
    }
    let ends = ends(consumer, topic, partitions)?;
    if let Err(e) = consumer.commit(&offset_list(topic, &ends), CommitMode::Sync) {
        // A group with live members refuses commits from outside; it is not new, and its
        // members' commits decide where it reads.
        tracing::debug!(topic, error = %e, "group already active; not pinning its start");
    }
    Ok(())
}

/// The committed offsets of `topic` (all partitions the consumer knows, or `partitions`)
/// for the consumer's group; partitions without a commit are left out.
pub(crate) fn committed<C: ConsumerContext, K: rdkafka::consumer::Consumer<C>>(
    consumer: &K,
    topic: &str,
    partitions: Option<&[i32]>,
) -> Result<BTreeMap<i32, i64>> {
    let partitions: Vec<i32> = match partitions {
        Some(p) => p.to_vec(),
        None => topic_partitions(consumer, topic)?,
    };
    let mut list = TopicPartitionList::with_capacity(partitions.len());
    for partition in partitions {
        list.add_partition(topic, partition);
    }
    let list = consumer
        .committed_offsets(list, CALL_TIMEOUT)
        .map_err(|e| convert(e, format!("committed offsets of Kafka topic `{topic}`")))?;
    Ok(list
        .elements_for_topic(topic)
        .into_iter()
        .filter_map(|element| match element.offset() {
            Offset::Offset(offset) => Some((element.partition(), offset)),
            _ => None,
        })
        .collect())
}

/// The partitions of `topic` as metadata reports them now.
pub(crate) fn topic_partitions<C: ConsumerContext, K: rdkafka::consumer::Consumer<C>>(
    consumer: &K,
    topic: &str,
) -> Result<Vec<i32>> {
    let metadata = consumer
        .fetch_metadata(Some(topic), CALL_TIMEOUT)
        .map_err(|e| convert(e, format!("metadata of Kafka topic `{topic}`")))?;
    Ok(metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect())
}

/// Committed offsets of `topic` for `group`, read by a short-lived client that does not join
/// the group.
pub(crate) async fn group_offsets(
    config: &KafkaConfig,
    topic: &str,
    group: &str,
) -> Result<BTreeMap<i32, i64>> {
    let mut client: ClientConfig = config.consumer_config();
    client.set("group.id", group);
    let reader: BaseConsumer = client.create().map_err(|e| config.client_error(e))?;
    let topic = topic.to_owned();
    // The reader never joins the group, so dropping it (in the blocking task too) is quick.
    blocking(move || committed(&reader, &topic, None)).await?
}

/// The partitions `mine` of `topic`, checked against those it has.
fn static_assignment(topic: &str, partitions: &[i32], mine: &[u32]) -> Result<Vec<i32>> {
    mine.iter()
        .map(|&partition| {
            let partition = i32::try_from(partition).unwrap_or(i32::MAX);
            if partitions.contains(&partition) {
                Ok(partition)
            } else {
                Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "partition {partition} of Kafka topic `{topic}` does not exist (it has {})",
                        partitions.len()
                    ),
                ))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_refused_for_an_old_generation_are_told_apart() {
        for code in [
            RDKafkaErrorCode::IllegalGeneration,
            RDKafkaErrorCode::UnknownMemberId,
            RDKafkaErrorCode::RebalanceInProgress,
        ] {
            assert!(group_moved_on(&KafkaError::ConsumerCommit(code)));
        }
        assert!(!group_moved_on(&KafkaError::ConsumerCommit(
            RDKafkaErrorCode::BrokerTransportFailure
        )));
        assert!(!group_moved_on(&KafkaError::ConsumerCommit(
            RDKafkaErrorCode::GroupAuthorizationFailed
        )));
    }

    #[test]
    fn connection_reports_are_consumed_past_and_other_errors_are_returned() {
        for code in [
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::NotCoordinator,
            RDKafkaErrorCode::RequestTimedOut,
        ] {
            assert!(
                is_recovering(&KafkaError::MessageConsumption(code)),
                "{code:?}"
            );
        }
        // A fatal error ends the consumer, whatever its code; a missing topic or a refused
        // authorization does not go away by reconnecting.
        for error in [
            KafkaError::MessageConsumptionFatal(RDKafkaErrorCode::BrokerTransportFailure),
            KafkaError::MessageConsumption(RDKafkaErrorCode::UnknownTopicOrPartition),
            KafkaError::MessageConsumption(RDKafkaErrorCode::TopicAuthorizationFailed),
        ] {
            assert!(!is_recovering(&error), "{error:?}");
        }
    }

    fn received(partition: i32, offset: i64) -> (Received, usize) {
        let tag = Delivery {
            partition,
            epoch: 0,
            offset,
        }
        .tag();
        (
            Received::new(stream_core::Message::new(&b"12345"[..]), tag, 1),
            5,
        )
    }

    #[test]
    fn the_buffer_is_bounded_in_messages_and_bytes_and_revokes_empty_it() {
        let shared = Shared::new(
            "t",
            true,
            Limits {
                messages: 4,
                bytes: 12,
            },
        );
        assert!(matches!(
            shared.room(false, Duration::ZERO),
            Room::Free {
                messages: 4,
                bytes: 12
            }
        ));
        shared.deliver(vec![received(0, 0), received(1, 0)]);
        assert!(matches!(
            shared.room(false, Duration::ZERO),
            Room::Free {
                messages: 2,
                bytes: 2
            }
        ));
        shared.deliver(vec![received(0, 1)]);
        // 15 bytes are over the 12 allowed, though a message would still fit.
        assert!(matches!(shared.room(false, Duration::ZERO), Room::Full));
        assert!(!shared.may_resume());
        Shared::forget_buffered(&mut shared.lock(), &[0]);
        assert!(shared.may_resume());
        assert!(matches!(
            shared.room(true, Duration::ZERO),
            Room::Free {
                messages: 3,
                bytes: 7
            }
        ));
        shared.request_stop();
        assert!(matches!(shared.room(false, Duration::ZERO), Room::Stop));
    }
}
