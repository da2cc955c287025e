//! A group's lag on its topic, for core's `stream_consumer_lag` gauge: over every partition
//! of the topic, the end of the partition less the offset the group reads next.
//!
//! A member cannot ask its own client: the poller thread owns it and must not be held up.
//! Each member has a reader of its own instead, a librdkafka client with the group's
//! `group.id` that never joins the group (it only asks the coordinator for the group's
//! committed offsets, and the partition leaders for their watermarks). It is made on the
//! first sample and kept, so a consumer whose lag is never sampled (`lag-interval = "0s"`)
//! costs nothing, and each sample is a few requests with one deadline, made on a blocking
//! thread.
//!
//! Per partition, the group reads next:
//!
//! * its committed offset, when the partition still holds it (low watermark ≤ committed ≤
//!   high watermark);
//! * the low watermark otherwise: a partition the group never committed starts at the
//!   oldest retained message, as does one whose committed offset retention removed
//!   (`auto.offset.reset = earliest`). A new group with `start-from = "latest"` committed
//!   the ends of the partitions before its first member joined, so it has commits.
//!
//! The end is the high watermark as the group's consumers see it: with librdkafka's default
//! `isolation.level = read_committed`, the last stable offset. The lag counts offsets, so
//! transaction markers and the holes compaction leaves count as messages.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::KafkaError;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaErrorCode;
use stream_core::{Error, ErrorKind, Result};

use crate::config::KafkaConfig;
use crate::election::through_election;

/// The longest one sample takes, all its requests together.
pub(crate) const LAG_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads the lag of one group on one topic.
pub(crate) struct LagReader {
    topic: String,
    group: String,
    /// The reader's settings: the binder's consumer settings with the group's `group.id`.
    client: ClientConfig,
    /// For errors about the settings, with secrets hidden.
    config: Arc<KafkaConfig>,
    /// Made on the first sample; shared with the blocking task of a sample under way.
    reader: Arc<Mutex<Option<Arc<BaseConsumer>>>>,
}

impl LagReader {
    pub(crate) fn new(config: &KafkaConfig, topic: &str, group: &str) -> LagReader {
        let mut client = config.consumer_config();
        client.set("group.id", group);
        // Used once per `lag-interval`, its connections sit idle in between and brokers
        // close them (`connections.max.idle.ms`): expected, not worth an error in the log.
        client.set("log.connection.close", "false");
        LagReader {
            topic: topic.to_owned(),
            group: group.to_owned(),
            client,
            config: Arc::new(config.clone()),
            reader: Arc::default(),
        }
    }

    /// The messages of the topic the group has not acknowledged: the sum over its
    /// partitions of the high watermark less the offset the group reads next.
    pub(crate) async fn lag(&self) -> Result<u64> {
        let deadline = Instant::now() + LAG_TIMEOUT;
        let slot = self.reader.clone();
        let client = self.client.clone();
        let config = self.config.clone();
        let (topic, group) = (self.topic.clone(), self.group.clone());
        tokio::task::spawn_blocking(move || {
            let reader = {
                let mut slot = slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                match &*slot {
                    Some(reader) => reader.clone(),
                    None => {
                        let reader: Arc<BaseConsumer> =
                            Arc::new(client.create().map_err(|e| config.client_error(e))?);
                        *slot = Some(reader.clone());
                        reader
                    }
                }
            };
            measure(&reader, &topic, deadline).map_err(|e| {
                let kind = crate::error::kind_of(&e);
                Error::new(
                    kind,
                    format!(
                        "reading the lag of group `{group}` on Kafka topic `{topic}`: {}",
                        config.redact(&e.to_string())
                    ),
                )
                .temporary(true)
                .with_source(e)
            })
        })
        .await
        .map_err(|e| Error::new(ErrorKind::Broker, "the lag task failed").with_source(e))?
    }
}

impl Drop for LagReader {
    /// Destroying a librdkafka client joins its threads: done on a thread of its own, so
    /// that dropping a consumer never blocks an async worker. A sample under way holds the
    /// reader too, and the last of them destroys it.
    fn drop(&mut self) {
        let reader = self
            .reader
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(reader) = reader {
            let spawned = std::thread::Builder::new()
                .name("stream-kafka-lag-drop".to_owned())
                .spawn(move || drop(reader));
            if let Err(e) = spawned {
                // The reader went with the failed closure, here: blocking, but destroyed.
                tracing::debug!(error = %e, "no thread to destroy the lag reader on");
            }
        }
    }
}

/// The lag of the reader's group on `topic`, every request finished by `deadline`. The
/// committed offsets are read before the watermarks: a high watermark only grows, so it is
/// never below an offset committed before it was read.
fn measure(reader: &BaseConsumer, topic: &str, deadline: Instant) -> Result<u64, KafkaError> {
    // At least a millisecond: librdkafka takes a zero timeout as "do not wait at all".
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let metadata = reader.fetch_metadata(Some(topic), left())?;
    let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Ok(0);
    };
    match found.error().map(RDKafkaErrorCode::from) {
        None => {}
        // Deleted: nothing is left to read. The consumer reports the missing topic itself.
        Some(RDKafkaErrorCode::UnknownTopicOrPartition) => return Ok(0),
        Some(code) => return Err(KafkaError::MetadataFetch(code)),
    }
    let partitions: Vec<i32> = found.partitions().iter().map(|p| p.id()).collect();
    let committed = committed(reader, topic, &partitions, left())?;
    let mut lag = 0u64;
    for partition in partitions {
        let (low, high) = through_election(deadline, |left| {
            reader.fetch_watermarks(topic, partition, left)
        })?;
        let next = next_offset(committed.get(&partition).copied(), low, high);
        lag = lag.saturating_add(u64::try_from(high - next).unwrap_or(0));
    }
    Ok(lag)
}

/// The committed offsets of `partitions`; those without a commit are left out.
fn committed(
    reader: &BaseConsumer,
    topic: &str,
    partitions: &[i32],
    timeout: Duration,
) -> Result<BTreeMap<i32, i64>, KafkaError> {
    let mut list = TopicPartitionList::with_capacity(partitions.len());
    for &partition in partitions {
        list.add_partition(topic, partition);
    }
    let list = reader.committed_offsets(list, timeout)?;
    let mut offsets = BTreeMap::new();
    for element in list.elements_for_topic(topic) {
        element.error()?;
        if let Offset::Offset(offset) = element.offset() {
            offsets.insert(element.partition(), offset);
        }
    }
    Ok(offsets)
}

/// Where the group reads a partition next: its committed offset while the partition holds
/// it, else the oldest retained message (`auto.offset.reset = earliest`, which the binder
/// sets for every consumer).
pub(crate) fn next_offset(committed: Option<i64>, low: i64, high: i64) -> i64 {
    match committed {
        Some(offset) if (low..=high).contains(&offset) => offset,
        _ => low,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_group_reads_from_its_commit_or_from_the_oldest_retained_message() {
        assert_eq!(next_offset(Some(7), 0, 10), 7);
        assert_eq!(next_offset(Some(10), 0, 10), 10);
        // Never committed: from the start, whatever start-from said (a latest group
        // committed the ends before it joined).
        assert_eq!(next_offset(None, 3, 10), 3);
        // Retention removed the committed offset, or the topic was made anew: reset to
        // the oldest retained message.
        assert_eq!(next_offset(Some(1), 3, 10), 3);
        assert_eq!(next_offset(Some(12), 3, 10), 3);
    }
}
