//! Consuming: one librdkafka consumer per group member, committing only contiguously
//! acknowledged offsets.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::{FutureExt, StreamExt};
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Headers as _, Message as _};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaErrorCode;
use stream_core::{
    Consumer, ConsumerOptions, DeliveryTag, Error, ErrorKind, Headers, Message, Received, Result,
    StartFrom,
};

use crate::config::KafkaConfig;
use crate::error::{convert, kind_of};
use crate::offsets::OffsetTracker;

/// How long one `receive` waits for a first message before returning an empty batch.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Bounds blocking calls made while the consumer starts and stops (offset lookups, commits).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// State shared by the consumer and the rebalance callbacks librdkafka runs inside `poll`.
pub(crate) struct Tracking {
    topic: String,
    /// Anonymous consumers commit nothing, so they track nothing.
    durable: bool,
    offsets: Mutex<OffsetTracker>,
}

impl Tracking {
    fn tracker(&self) -> std::sync::MutexGuard<'_, OffsetTracker> {
        self.offsets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn list(&self, positions: &[(i32, i64)]) -> TopicPartitionList {
        let mut list = TopicPartitionList::with_capacity(positions.len());
        for &(partition, offset) in positions {
            // Only fails for a sentinel offset, which positions never are.
            let _ = list.add_partition_offset(&self.topic, partition, Offset::Offset(offset));
        }
        list
    }

    fn partitions_of<'a>(&'a self, list: &'a TopicPartitionList) -> impl Iterator<Item = i32> + 'a {
        list.elements_for_topic(&self.topic)
            .into_iter()
            .map(|element| element.partition())
    }
}

/// The librdkafka context of a consumer: keeps offset tracking in step with rebalances.
pub(crate) struct Context {
    tracking: Arc<Tracking>,
}

impl ClientContext for Context {}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                let mut tracker = self.tracking.tracker();
                for partition in self.tracking.partitions_of(list) {
                    tracker.assign(partition);
                }
            }
            Rebalance::Revoke(list) => {
                let positions: Vec<(i32, i64)> = {
                    let mut tracker = self.tracking.tracker();
                    let revoked: Vec<i32> = self.tracking.partitions_of(list).collect();
                    revoked
                        .into_iter()
                        .filter_map(|p| tracker.revoke(p).map(|offset| (p, offset)))
                        .collect()
                };
                if positions.is_empty() || !self.tracking.durable {
                    return;
                }
                if consumer.assignment_lost() {
                    // The group moved on without us: a commit would be refused, and the new
                    // owner starts from the last commit, redelivering what we did since.
                    tracing::warn!(topic = %self.tracking.topic, "partitions lost before their offsets were committed; their recent messages will be delivered again");
                    return;
                }
                // Synchronous, so the next owner starts exactly after what we acknowledged.
                if let Err(e) = consumer.commit(&self.tracking.list(&positions), CommitMode::Sync) {
                    tracing::warn!(topic = %self.tracking.topic, error = %e, "commit on revoke failed; the next owner may see some messages again");
                }
            }
            Rebalance::Error(e) => {
                tracing::warn!(topic = %self.tracking.topic, error = %e, "rebalance failed");
            }
        }
    }
}

type Inner = StreamConsumer<Context>;

/// One member of a consumer group (or an anonymous consumer) of one topic.
pub(crate) struct KafkaConsumer {
    inner: Mutex<Option<Arc<Inner>>>,
    tracking: Arc<Tracking>,
}

impl KafkaConsumer {
    /// Creates the member and joins its group, or, for an anonymous consumer, assigns every
    /// partition at its current end.
    pub(crate) async fn open(
        config: &KafkaConfig,
        topic: &str,
        partitions: &[i32],
        options: &ConsumerOptions,
    ) -> Result<KafkaConsumer> {
        // librdkafka's queue is bounded by `fetch-queue-kbytes`; its message-count threshold
        // (`queued.min.messages`) stays at librdkafka's default. Set to the prefetch, it
        // stopped fetching whenever 512 small messages were queued: drained in half a
        // millisecond, then nothing until the next fetch, at 16-64 B about 40% of the time.
        let mut client = config.consumer_config();
        // librdkafka wants a group even for a manual assignment; an anonymous one never
        // joins it nor commits to it.
        client.set("group.id", &options.group);
        if options.durable {
            client.set("enable.auto.commit", "true").set(
                "auto.offset.reset",
                match options.start_from {
                    StartFrom::Earliest => "earliest",
                    StartFrom::Latest => "latest",
                },
            );
        }
        let tracking = Arc::new(Tracking {
            topic: topic.to_owned(),
            durable: options.durable,
            offsets: Mutex::new(OffsetTracker::new()),
        });
        let inner: Inner = client
            .create_with_context(Context {
                tracking: tracking.clone(),
            })
            .map_err(|e| config.client_error(e))?;
        let inner = Arc::new(inner);
        if options.durable {
            if options.start_from == StartFrom::Latest {
                let (inner, topic, partitions) =
                    (inner.clone(), topic.to_owned(), partitions.to_vec());
                blocking(move || pin_new_group_at_end(&inner, &topic, &partitions)).await??;
            }
            match &options.partitions {
                // Assigned by configuration (instance-index of instance-count): the member
                // reads exactly these, from the group's committed offsets, and no rebalance
                // ever moves them.
                Some(mine) => {
                    let list = static_assignment(topic, partitions, mine)?;
                    {
                        let mut tracker = tracking.tracker();
                        for element in list.elements() {
                            tracker.assign(element.partition());
                        }
                    }
                    inner
                        .assign(&list)
                        .map_err(|e| convert(e, format!("assigning Kafka topic `{topic}`")))?;
                }
                None => inner
                    .subscribe(&[topic])
                    .map_err(|e| convert(e, format!("subscribing to Kafka topic `{topic}`")))?,
            }
        } else {
            let (handle, topic_name, partitions) =
                (inner.clone(), topic.to_owned(), partitions.to_vec());
            let ends = blocking(move || ends(&*handle, &topic_name, &partitions)).await??;
            let mut list = TopicPartitionList::with_capacity(ends.len());
            for (partition, end) in ends {
                list.add_partition_offset(topic, partition, Offset::Offset(end))
                    .map_err(|e| convert(e, "building an assignment"))?;
            }
            inner
                .assign(&list)
                .map_err(|e| convert(e, format!("assigning Kafka topic `{topic}`")))?;
        }
        Ok(KafkaConsumer {
            inner: Mutex::new(Some(inner)),
            tracking,
        })
    }

    fn handle(&self) -> Result<Arc<Inner>> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Closed,
                    format!(
                        "the consumer of Kafka topic `{}` is closed",
                        self.tracking.topic
                    ),
                )
            })
    }

    /// Copies a message out of librdkafka and starts tracking its offset.
    fn take(&self, message: &BorrowedMessage<'_>) -> Received {
        let (partition, offset) = (message.partition(), message.offset());
        if self.tracking.durable {
            self.tracking.tracker().delivered(partition, offset);
        }
        let mut headers = Headers::new();
        if let Some(native) = message.headers() {
            for header in native.iter() {
                let value = header
                    .value
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default();
                headers.append(header.key, value);
            }
        }
        let mut out = Message::new(message.payload().unwrap_or_default().to_vec())
            .with_headers(headers)
            .with_id(delivery_id(partition, offset))
            // Never negative on a delivered message.
            .with_partition(partition as u32);
        if let Some(key) = message.key() {
            out = out.with_key(String::from_utf8_lossy(key));
        }
        // Partitions and offsets are never negative on delivered messages.
        Received::new(out, DeliveryTag(partition as u64, offset as u64), 1)
    }

    fn note_recovering(&self, error: &KafkaError) {
        // librdkafka logs these itself (through `tracing`, as errors of the client).
        tracing::debug!(topic = %self.tracking.topic, error = %error, "librdkafka is recovering; consuming on");
    }

    fn receive_error(&self, error: KafkaError) -> Error {
        let fatal = matches!(error, KafkaError::MessageConsumptionFatal(_));
        // librdkafka reconnects and rejoins by itself; only a fatal error ends the consumer.
        convert(
            error,
            format!("consuming Kafka topic `{}`", self.tracking.topic),
        )
        .temporary(!fatal)
    }
}

#[async_trait]
impl Consumer for KafkaConsumer {
    async fn receive(&self, max: usize) -> Result<Vec<Received>> {
        let inner = self.handle()?;
        // Cancel safety: `recv` takes a message out of librdkafka only in the poll that
        // returns it, and everything after it below runs without an await point, so a
        // dropped future never loses a message it had taken.
        let deadline = tokio::time::Instant::now() + POLL_INTERVAL;
        let first = loop {
            match tokio::time::timeout_at(deadline, inner.recv()).await {
                Err(_) => return Ok(Vec::new()),
                Ok(Ok(message)) => break message,
                Ok(Err(e)) if is_recovering(&e) => self.note_recovering(&e),
                Ok(Err(e)) => return Err(self.receive_error(e)),
            }
        };
        let mut batch = Vec::with_capacity(max.clamp(1, 256));
        batch.push(self.take(&first));
        drop(first);
        let mut stream = inner.stream();
        while batch.len() < max {
            match stream.next().now_or_never() {
                Some(Some(Ok(message))) => batch.push(self.take(&message)),
                Some(Some(Err(e))) if is_recovering(&e) => self.note_recovering(&e),
                Some(Some(Err(e))) => {
                    // Reported on the next call if it persists; these messages go out now.
                    tracing::debug!(topic = %self.tracking.topic, error = %e, "consumer error after a partial batch");
                    break;
                }
                // Nothing more ready right now.
                _ => break,
            }
        }
        Ok(batch)
    }

    async fn ack(&self, tags: &[DeliveryTag]) -> Result<()> {
        if !self.tracking.durable {
            return Ok(());
        }
        let inner = self.handle()?;
        // Held while storing so a revoke sees either the stored offset or none of these acks.
        let mut tracker = self.tracking.tracker();
        let positions = tracker.acked(tags.iter().map(|tag| (tag.0 as i32, tag.1 as i64)));
        if positions.is_empty() {
            return Ok(());
        }
        match inner.store_offsets(&self.tracking.list(&positions)) {
            Ok(()) => Ok(()),
            // Revoked in the meantime; the new owner redelivers. Not an error of this ack.
            Err(KafkaError::StoreOffset(RDKafkaErrorCode::State))
            | Err(KafkaError::StoreOffset(RDKafkaErrorCode::UnknownPartition)) => Ok(()),
            Err(e) => Err(convert(
                e,
                format!("storing offsets of Kafka topic `{}`", self.tracking.topic),
            )),
        }
    }

    async fn close(&self) -> Result<()> {
        let Some(inner) = self
            .inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
        else {
            return Ok(());
        };
        let tracking = self.tracking.clone();
        blocking(move || {
            if tracking.durable {
                let positions = tracking.tracker().positions();
                if !positions.is_empty() {
                    match inner.commit(&tracking.list(&positions), CommitMode::Sync) {
                        Ok(()) => {}
                        Err(e) if group_moved_on(&e) => {
                            // Members closing side by side rebalance the group under each
                            // other; a commit from the old generation is refused and cannot
                            // be made good. Nothing is lost: the next owner starts from the
                            // last commit and delivers what came after it again.
                            tracing::warn!(topic = %tracking.topic, error = %e, "the group rebalanced while this member closed; its last acknowledgements were not committed and will be delivered again");
                        }
                        Err(e) => {
                            return Err(convert(
                                e,
                                format!("committing offsets of Kafka topic `{}`", tracking.topic),
                            ))
                        }
                    }
                }
            }
            // Dropping the last handle leaves the group; librdkafka blocks until it has.
            drop(inner);
            Ok(())
        })
        .await?
    }
}

impl Drop for KafkaConsumer {
    fn drop(&mut self) {
        let inner = self
            .inner
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        // Leaving the group blocks; keep it off the async worker threads when possible.
        if let (Some(inner), Ok(runtime)) = (inner, tokio::runtime::Handle::try_current()) {
            runtime.spawn_blocking(move || drop(inner));
        }
    }
}

/// `partition@offset`, written without `format!`: this runs once per received message, and
/// the formatting machinery cost more than the rest of the id.
fn delivery_id(partition: i32, offset: i64) -> Arc<str> {
    fn push_decimal(out: &mut [u8; 41], mut len: usize, value: i64) -> usize {
        let mut digits = [0u8; 20];
        let mut n = value.unsigned_abs();
        let mut count = 0;
        loop {
            digits[count] = b'0' + (n % 10) as u8;
            count += 1;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        if value < 0 {
            out[len] = b'-';
            len += 1;
        }
        for &digit in digits[..count].iter().rev() {
            out[len] = digit;
            len += 1;
        }
        len
    }
    let mut out = [0u8; 41];
    let mut len = push_decimal(&mut out, 0, i64::from(partition));
    out[len] = b'@';
    len = push_decimal(&mut out, len + 1, offset);
    // Only ASCII digits, '-' and '@' were written.
    Arc::from(std::str::from_utf8(&out[..len]).unwrap_or_default())
}

/// Whether `error`, taken from the consumer queue, only reports something librdkafka is
/// already recovering from by itself: a broker connection that dropped or was refused, a
/// leader or coordinator being looked up again, a request that timed out. librdkafka queues
/// one such report per failed attempt and meanwhile keeps fetching from the brokers that are
/// up. Returned as receive failures, they made core back off once per report, so after a
/// broker died the messages of partitions that had already failed over to live brokers
/// waited behind a growing queue of reports (a stall of a minute and more on a cluster).
fn is_recovering(error: &KafkaError) -> bool {
    matches!(error, KafkaError::MessageConsumption(_))
        && matches!(kind_of(error), ErrorKind::Connection | ErrorKind::Timeout)
}

/// Whether a commit was refused because the group has a newer generation than this member
/// (it rebalanced, or dropped the member): retrying cannot succeed.
fn group_moved_on(error: &KafkaError) -> bool {
    matches!(
        error,
        KafkaError::ConsumerCommit(
            RDKafkaErrorCode::IllegalGeneration
                | RDKafkaErrorCode::UnknownMemberId
                | RDKafkaErrorCode::RebalanceInProgress
        )
    )
}

/// Runs blocking librdkafka calls off the async worker threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::new(ErrorKind::Broker, "blocking Kafka call failed").with_source(e))
}

/// The high watermark (offset of the next message) of each partition.
fn ends<C: rdkafka::consumer::Consumer<Context>>(
    consumer: &C,
    topic: &str,
    partitions: &[i32],
) -> Result<Vec<(i32, i64)>> {
    partitions
        .iter()
        .map(|&partition| {
            consumer
                .fetch_watermarks(topic, partition, CALL_TIMEOUT)
                .map(|(_, high)| (partition, high))
                .map_err(|e| convert(e, format!("end offsets of Kafka topic `{topic}`")))
        })
        .collect()
}

/// Makes "latest" mean the end at the time the group is created, not whenever librdkafka
/// gets round to resolving it after the first assignment (messages published in between
/// would be skipped): partitions the group never committed get their current end committed
/// before the member subscribes.
fn pin_new_group_at_end(consumer: &Inner, topic: &str, partitions: &[i32]) -> Result<()> {
    let committed = committed(consumer, topic, Some(partitions))?;
    let missing: Vec<i32> = partitions
        .iter()
        .copied()
        .filter(|p| !committed.contains_key(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let ends = ends(consumer, topic, &missing)?;
    let mut list = TopicPartitionList::with_capacity(ends.len());
    for (partition, end) in ends {
        list.add_partition_offset(topic, partition, Offset::Offset(end))
            .map_err(|e| convert(e, "building an offset list"))?;
    }
    if let Err(e) = consumer.commit(&list, CommitMode::Sync) {
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
        None => {
            let metadata = consumer
                .fetch_metadata(Some(topic), CALL_TIMEOUT)
                .map_err(|e| convert(e, format!("metadata of Kafka topic `{topic}`")))?;
            metadata
                .topics()
                .iter()
                .filter(|t| t.name() == topic)
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect()
        }
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
    blocking(move || committed(&reader, &topic, None)).await?
}

/// The partitions `mine` of `topic`, each to start from the group's committed offset (or the
/// group's start position when it has none).
fn static_assignment(topic: &str, partitions: &[i32], mine: &[u32]) -> Result<TopicPartitionList> {
    let mut list = TopicPartitionList::with_capacity(mine.len());
    for &partition in mine {
        let partition = i32::try_from(partition).unwrap_or(i32::MAX);
        if !partitions.contains(&partition) {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "partition {partition} of Kafka topic `{topic}` does not exist (it has {})",
                    partitions.len()
                ),
            ));
        }
        list.add_partition_offset(topic, partition, Offset::Stored)
            .map_err(|e| convert(e, "building an assignment"))?;
    }
    Ok(list)
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
    fn delivery_ids_are_partition_at_offset() {
        for (partition, offset) in [(0, 0), (3, 1_234_567), (i32::MAX, i64::MAX), (-1, i64::MIN)] {
            assert_eq!(
                &*delivery_id(partition, offset),
                format!("{partition}@{offset}")
            );
        }
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
}
