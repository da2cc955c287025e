//! Operators' access to Kafka topics ([`stream_core::admin::Admin`]): reports, reads outside
//! any group, and removal, as the dead-letter tools and the `stream` command line use them.
//!
//! * [`inspect`](Admin::inspect): metadata, each partition's watermarks, and the consumer
//!   groups of the topic: every classic consumer group (`ListGroups`) with a member assigned
//!   to or subscribed to the topic, or with offsets committed on it. A group's committed
//!   offsets are read by a client with its `group.id` that never joins it nor commits, so a
//!   report costs one short-lived client per consumer group of the cluster. A group's lag is
//!   counted as the `stream_consumer_lag` gauge counts it ([`crate::lag`]). Kafka tells
//!   neither what a member holds nor how long it has been idle: `pending`, `held` and
//!   `idle` are `None`.
//! * [`read`](Admin::read): a client of its own, without `group.id`, assigns the partitions
//!   (it never subscribes) at the cursor's offsets and commits nothing. A read stops at the
//!   high watermarks as they were when it began, or at `max` messages. Records become
//!   messages exactly as a consumer sees them ([`crate::record::converted`]).
//! * Removal is `DeleteRecords`: Kafka only deletes a partition's records before an offset,
//!   so removing a message removes every earlier one of its partition ([`Removal::UpTo`]).
//!
//! Every operation finishes within the binder's `connect-timeout`, all its requests
//! together; librdkafka's calls run on blocking threads.
//!
//! A [`Position`] is `PARTITION:OFFSET`. A [`Cursor`] is the next offset of each partition,
//! `PARTITION=OFFSET` pairs joined by commas (`0=12,1=40,2=7`); a partition it leaves out
//! (one added since) is read from its oldest retained record, and an offset the partition
//! no longer holds (retention, or a topic made anew) from the oldest one too.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::{Client, DefaultClientContext};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::KafkaError;
use rdkafka::groups::GroupMemberInfo;
use rdkafka::message::Message as _;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaErrorCode;
use stream_core::admin::{
    Admin, ConsumerReport, Cursor, DestinationReport, GroupReport, Position, Read, ReadFrom,
    Removal, Stored,
};
use stream_core::{Error, ErrorKind, Result};

use crate::config::KafkaConfig;
use crate::election::through_election;
use crate::error::kind_of;
use crate::lag::next_offset;

/// The [`Admin`] of a [`KafkaBinder`](crate::KafkaBinder), on the binder's admin client.
pub(crate) struct KafkaAdmin {
    config: Arc<KafkaConfig>,
    client: Arc<AdminClient<DefaultClientContext>>,
}

impl KafkaAdmin {
    pub(crate) fn new(
        config: Arc<KafkaConfig>,
        client: Arc<AdminClient<DefaultClientContext>>,
    ) -> KafkaAdmin {
        KafkaAdmin { config, client }
    }

    /// When the operation starting now must be over.
    fn deadline(&self) -> Deadline {
        Deadline(Instant::now() + self.config.connect_timeout)
    }

    /// The partitions and watermarks of `topic`, or None if it does not exist.
    async fn marks(&self, topic: &str, deadline: Deadline) -> Result<Option<Vec<Marks>>> {
        let client = self.client.clone();
        let config = self.config.clone();
        let topic = topic.to_owned();
        blocking(move || {
            let client = client.inner();
            let Some(partitions) = partitions(client, &topic, deadline)
                .map_err(|e| failed(&config, e, format!("metadata of Kafka topic `{topic}`")))?
            else {
                return Ok(None);
            };
            watermarks(client, &topic, &partitions, deadline)
                .map(Some)
                .map_err(|e| failed(&config, e, format!("watermarks of Kafka topic `{topic}`")))
        })
        .await?
    }

    /// Deletes the records of `topic` before `upto`'s offset in each of its partitions, and
    /// returns the partitions' oldest retained offsets afterwards.
    async fn delete_before(
        &self,
        topic: &str,
        upto: &BTreeMap<i32, i64>,
        deadline: Deadline,
    ) -> Result<BTreeMap<i32, i64>> {
        if upto.is_empty() {
            return Ok(BTreeMap::new());
        }
        let mut list = TopicPartitionList::with_capacity(upto.len());
        for (&partition, &offset) in upto {
            list.add_partition_offset(topic, partition, Offset::Offset(offset))
                .map_err(|e| failed(&self.config, e, "listing the records to delete"))?;
        }
        let left = deadline.left();
        let options = AdminOptions::new()
            .request_timeout(Some(left))
            .operation_timeout(Some(left));
        // The request ends by itself at its timeout; this only keeps a lost answer from
        // holding the caller beyond it.
        let done = tokio::time::timeout(
            left + Duration::from_millis(500),
            self.client.delete_records(&list, &options),
        )
        .await
        .map_err(|_| {
            Error::new(
                ErrorKind::Timeout,
                format!(
                    "Kafka at {} did not answer deleting records of topic `{topic}` within {:?} \
                     (connect-timeout)",
                    self.config.brokers, self.config.connect_timeout
                ),
            )
            .temporary(true)
        })?
        .map_err(|e| {
            failed(
                &self.config,
                e,
                format!("deleting records of Kafka topic `{topic}`"),
            )
        })?;
        let mut lows = BTreeMap::new();
        for element in done.elements_for_topic(topic) {
            let partition = element.partition();
            if let Err(e) = element.error() {
                let wanted = upto.get(&partition).copied().unwrap_or_default();
                let why = match e.rdkafka_error_code() {
                    Some(RDKafkaErrorCode::OffsetOutOfRange) => format!(
                        "offset {wanted} is beyond the end of partition {partition} (a position \
                         that was never written)"
                    ),
                    _ => self.config.redact(&e.to_string()),
                };
                return Err(Error::new(
                    kind_of(&e),
                    format!(
                        "deleting records of Kafka topic `{topic}` before offset {wanted} of \
                         partition {partition}: {why}"
                    ),
                )
                .with_source(e));
            }
            if let Offset::Offset(low) = element.offset() {
                lows.insert(partition, low);
            }
        }
        Ok(lows)
    }
}

/// The end of one operation: every request it makes is bounded by what is left.
#[derive(Debug, Clone, Copy)]
struct Deadline(Instant);

impl Deadline {
    /// What is left, at least a millisecond: librdkafka takes a zero timeout as "do not
    /// wait at all", and a request that cannot wait fails rather than hangs.
    fn left(self) -> Duration {
        self.0
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    }

    fn passed(self) -> bool {
        Instant::now() >= self.0
    }
}

/// One partition: its id, oldest retained offset and high watermark.
#[derive(Debug, Clone, Copy)]
struct Marks {
    partition: i32,
    low: i64,
    high: i64,
}

impl Marks {
    fn held(&self) -> u64 {
        u64::try_from(self.high - self.low).unwrap_or(0)
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::new(ErrorKind::Broker, "blocking Kafka call failed").with_source(e))
}

/// `error` as a library error that starts with `context` and names the brokers, secrets
/// hidden; connection
/// troubles and timeouts may pass, so they are temporary.
fn failed(config: &KafkaConfig, error: KafkaError, context: impl std::fmt::Display) -> Error {
    let kind = kind_of(&error);
    Error::new(
        kind,
        format!(
            "{context} (Kafka at {}): {}",
            config.brokers,
            config.redact(&error.to_string())
        ),
    )
    .temporary(matches!(kind, ErrorKind::Connection | ErrorKind::Timeout))
    .with_source(error)
}

/// The `group.id` prefix of the clients that read records: librdkafka refuses a manual
/// assignment without a group, though they never join it nor commit to it, so the broker
/// never learns of it.
pub(crate) const READER_GROUP_PREFIX: &str = "stream-admin-reader.";

/// A consumer client that never joins a group nor commits: with `group` (a group's
/// `group.id`) only to read the group's committed offsets, without it to read records by
/// assignment, under a group of its own ([`READER_GROUP_PREFIX`]).
fn reader(config: &KafkaConfig, group: Option<&str>) -> Result<BaseConsumer> {
    let mut client = config.consumer_config();
    match group {
        Some(group) => client.set("group.id", group),
        None => client.set(
            "group.id",
            format!("{READER_GROUP_PREFIX}{}", stream_core::unique_suffix()),
        ),
    };
    client
        // Whatever the `consumer` table says: an operator's look commits nothing for anyone.
        .set("enable.auto.commit", "false")
        // A read stops at the end of each partition; the end of a partition whose last
        // offsets hold no record (transaction markers, compaction) is only told this way.
        .set("enable.partition.eof", "true")
        // Records deleted between the watermarks and the fetch: go on with the oldest left.
        .set("auto.offset.reset", "earliest")
        .set("allow.auto.create.topics", "false")
        // Short-lived: the brokers closing its idle connections is expected.
        .set("log.connection.close", "false");
    client.create().map_err(|e| config.client_error(e))
}

/// The partitions of `topic`, sorted, or None if it does not exist.
fn partitions<C: rdkafka::ClientContext>(
    client: &Client<C>,
    topic: &str,
    deadline: Deadline,
) -> Result<Option<Vec<i32>>, KafkaError> {
    let metadata = client.fetch_metadata(Some(topic), deadline.left())?;
    let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Ok(None);
    };
    match found.error().map(RDKafkaErrorCode::from) {
        None => {}
        Some(RDKafkaErrorCode::UnknownTopicOrPartition) => return Ok(None),
        Some(code) => return Err(KafkaError::MetadataFetch(code)),
    }
    let mut partitions: Vec<i32> = found.partitions().iter().map(|p| p.id()).collect();
    partitions.sort_unstable();
    Ok(Some(partitions))
}

fn watermarks<C: rdkafka::ClientContext>(
    client: &Client<C>,
    topic: &str,
    partitions: &[i32],
    deadline: Deadline,
) -> Result<Vec<Marks>, KafkaError> {
    partitions
        .iter()
        .map(|&partition| {
            let (low, high) = through_election(deadline.0, |left| {
                client.fetch_watermarks(topic, partition, left)
            })?;
            Ok(Marks {
                partition,
                low,
                high,
            })
        })
        .collect()
}

/// The offsets committed on `partitions` of `topic` by the group of `reader` (a client with
/// the group's `group.id`); those without a commit are left out.
fn group_commits(
    reader: &BaseConsumer,
    topic: &str,
    partitions: &[i32],
    deadline: Deadline,
) -> Result<BTreeMap<i32, i64>, KafkaError> {
    let mut list = TopicPartitionList::with_capacity(partitions.len());
    for &partition in partitions {
        list.add_partition(topic, partition);
    }
    let list = reader.committed_offsets(list, deadline.left())?;
    let mut offsets = BTreeMap::new();
    for element in list.elements_for_topic(topic) {
        element.error()?;
        if let Offset::Offset(offset) = element.offset() {
            offsets.insert(element.partition(), offset);
        }
    }
    Ok(offsets)
}

fn inspect(
    config: &KafkaConfig,
    client: &Client<DefaultClientContext>,
    topic: &str,
    known_groups: &[String],
    deadline: Deadline,
) -> Result<DestinationReport> {
    let mut report = DestinationReport::default();
    let Some(partitions) = partitions(client, topic, deadline)
        .map_err(|e| failed(config, e, format!("metadata of Kafka topic `{topic}`")))?
    else {
        return Ok(report);
    };
    report.exists = true;
    let listed =
        through_election(deadline.0, |left| client.fetch_group_list(None, left)).map_err(|e| {
            failed(
                config,
                e,
                "listing the consumer groups of the Kafka cluster",
            )
        })?;
    let mut groups = Vec::new();
    for group in listed.groups() {
        // Classic consumer groups, and groups that only ever committed offsets (no members,
        // no protocol); Connect workers and others have other assignment formats.
        if !matches!(group.protocol_type(), "consumer" | "") {
            continue;
        }
        let members: Vec<ConsumerReport> = group
            .members()
            .iter()
            .filter(|member| reads_topic(member, topic))
            .map(member_report)
            .collect();
        // Each group's commits take a client of its own: only the groups known to read the
        // topic and those with members on it, not every group of the cluster.
        if members.is_empty() && !known_groups.iter().any(|known| known == group.name()) {
            continue;
        }
        let reader = reader(config, Some(group.name()))?;
        let committed = match group_commits(&reader, topic, &partitions, deadline) {
            Ok(committed) => committed,
            // A group these credentials may not describe is not reported, rather than
            // failing the report of every other group.
            Err(e)
                if e.rdkafka_error_code() == Some(RDKafkaErrorCode::GroupAuthorizationFailed) =>
            {
                tracing::debug!(
                    group = group.name(),
                    "not authorized to read the group's offsets"
                );
                continue;
            }
            Err(e) => {
                return Err(failed(
                    config,
                    e,
                    format!(
                        "committed offsets of group `{}` on Kafka topic `{topic}`",
                        group.name()
                    ),
                ))
            }
        };
        if members.is_empty() && committed.is_empty() {
            continue;
        }
        groups.push((group.name().to_owned(), members, committed));
    }
    // The watermarks after the commits: a high watermark only grows, so it is never below an
    // offset committed before it was read, and no lag comes out negative.
    let marks = watermarks(client, topic, &partitions, deadline)
        .map_err(|e| failed(config, e, format!("watermarks of Kafka topic `{topic}`")))?;
    report.length = marks.iter().map(Marks::held).sum();
    report.partitions = marks
        .iter()
        .map(|m| {
            // Partition ids and watermarks of an existing partition are never negative.
            let unsigned = |n: i64| u64::try_from(n).unwrap_or(0);
            (
                m.partition.unsigned_abs(),
                unsigned(m.low),
                unsigned(m.high),
            )
        })
        .collect();
    for (name, consumers, committed) in groups {
        let lag = marks
            .iter()
            .map(|m| {
                let next = next_offset(committed.get(&m.partition).copied(), m.low, m.high);
                u64::try_from(m.high - next).unwrap_or(0)
            })
            .sum();
        let mut group = GroupReport::default();
        group.name = name;
        group.lag = Some(lag);
        group.consumers = consumers;
        report.groups.push(group);
    }
    Ok(report)
}

/// A member as the report names it: its member id (the client id and a suffix the
/// coordinator gave it, so that members of one client id are told apart) and its host.
fn member_report(member: &GroupMemberInfo) -> ConsumerReport {
    let mut report = ConsumerReport::default();
    report.name = format!(
        "{}@{}",
        member.id(),
        member.client_host().trim_start_matches('/')
    );
    report
}

/// Whether `member` has partitions of `topic` assigned, or subscribed to it (a member
/// between rebalances has a subscription and no assignment yet).
fn reads_topic(member: &GroupMemberInfo, topic: &str) -> bool {
    let named = |topics: Option<Vec<String>>| topics.is_some_and(|t| t.iter().any(|t| t == topic));
    named(member.assignment().and_then(assigned_topics))
        || named(member.metadata().and_then(subscribed_topics))
}

/// Reads the classic consumer protocol's big-endian encoding, as far as topic names go.
struct Wire<'a>(&'a [u8]);

impl Wire<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn i16(&mut self) -> Option<i16> {
        Some(i16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }

    fn i32(&mut self) -> Option<i32> {
        Some(i32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }

    fn string(&mut self) -> Option<String> {
        let len = usize::try_from(self.i16()?).ok()?;
        Some(String::from_utf8_lossy(self.take(len)?).into_owned())
    }

    /// An array's length; a null array (-1) is empty.
    fn count(&mut self) -> Option<usize> {
        Some(usize::try_from(self.i32()?).unwrap_or(0))
    }
}

/// The topics of a `ConsumerProtocolAssignment` (every version starts with version, then
/// `[topic, [partition]]`).
fn assigned_topics(bytes: &[u8]) -> Option<Vec<String>> {
    let mut wire = Wire(bytes);
    wire.i16()?;
    let topics = wire.count()?;
    let mut names = Vec::new();
    for _ in 0..topics {
        names.push(wire.string()?);
        let partitions = wire.count()?;
        wire.take(partitions.checked_mul(4)?)?;
    }
    Some(names)
}

/// The topics of a `ConsumerProtocolSubscription` (every version starts with version, then
/// `[topic]`).
fn subscribed_topics(bytes: &[u8]) -> Option<Vec<String>> {
    let mut wire = Wire(bytes);
    wire.i16()?;
    let topics = wire.count()?;
    (0..topics).map(|_| wire.string()).collect()
}

/// `0=12,1=40`: the next offset of each partition.
fn format_cursor(next: &BTreeMap<i32, i64>) -> Cursor {
    let pairs: Vec<String> = next.iter().map(|(p, o)| format!("{p}={o}")).collect();
    Cursor(pairs.join(","))
}

fn parse_cursor(text: &str) -> Result<BTreeMap<i32, i64>> {
    let bad = || {
        Error::new(
            ErrorKind::Config,
            format!("`{text}` is not a Kafka read cursor (PARTITION=OFFSET,...)"),
        )
    };
    text.split(',')
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (partition, offset) = pair.split_once('=').ok_or_else(bad)?;
            let partition: i32 = partition.trim().parse().map_err(|_| bad())?;
            let offset: i64 = offset.trim().parse().map_err(|_| bad())?;
            if partition < 0 || offset < 0 {
                return Err(bad());
            }
            Ok((partition, offset))
        })
        .collect()
}

fn parse_position(position: &Position) -> Result<(i32, i64)> {
    let bad = || {
        Error::new(
            ErrorKind::Config,
            format!("`{position}` is not a Kafka position (PARTITION:OFFSET)"),
        )
    };
    let (partition, offset) = position.0.split_once(':').ok_or_else(bad)?;
    let partition: i32 = partition.parse().map_err(|_| bad())?;
    let offset: i64 = offset.parse().map_err(|_| bad())?;
    if partition < 0 || offset < 0 {
        return Err(bad());
    }
    Ok((partition, offset))
}

fn read(
    config: &KafkaConfig,
    client: &Client<DefaultClientContext>,
    topic: &str,
    from: &ReadFrom,
    max: usize,
    deadline: Deadline,
) -> Result<Read> {
    let asked = match from {
        ReadFrom::Cursor(Cursor(text)) => parse_cursor(text)?,
        _ => BTreeMap::new(),
    };
    let Some(partitions) = partitions(client, topic, deadline)
        .map_err(|e| failed(config, e, format!("metadata of Kafka topic `{topic}`")))?
    else {
        // Nothing there (a dead-letter topic nothing was sent to yet): an empty read.
        return Ok(Read {
            messages: Vec::new(),
            next: format_cursor(&asked),
        });
    };
    let marks = watermarks(client, topic, &partitions, deadline)
        .map_err(|e| failed(config, e, format!("watermarks of Kafka topic `{topic}`")))?;
    let mut next = BTreeMap::new();
    // Where each partition's read stops: its end when the read began, so a busy topic
    // cannot keep a read going.
    let mut stop = BTreeMap::new();
    for m in &marks {
        let start = match from {
            ReadFrom::Earliest => m.low,
            ReadFrom::Latest => m.high,
            ReadFrom::Cursor(_) => next_offset(asked.get(&m.partition).copied(), m.low, m.high),
        };
        next.insert(m.partition, start);
        stop.insert(m.partition, m.high);
    }
    let mut pending: BTreeSet<i32> = marks
        .iter()
        .filter(|m| next[&m.partition] < m.high)
        .map(|m| m.partition)
        .collect();
    let mut messages = Vec::new();
    if pending.is_empty() || max == 0 {
        return Ok(Read {
            messages,
            next: format_cursor(&next),
        });
    }
    let reader = reader(config, None)?;
    let mut list = TopicPartitionList::with_capacity(pending.len());
    for &partition in &pending {
        list.add_partition_offset(topic, partition, Offset::Offset(next[&partition]))
            .map_err(|e| failed(config, e, "listing the partitions to read"))?;
    }
    reader.assign(&list).map_err(|e| {
        failed(
            config,
            e,
            format!("assigning Kafka topic `{topic}` to a reader"),
        )
    })?;
    while !pending.is_empty() && messages.len() < max && !deadline.passed() {
        match reader.poll(deadline.left()) {
            None => {}
            Some(Ok(record)) => {
                let (partition, offset) = (record.partition(), record.offset());
                if !pending.contains(&partition) || offset < next[&partition] {
                    continue;
                }
                if offset >= stop[&partition] {
                    // Published after the read began: the next read takes it.
                    pending.remove(&partition);
                    continue;
                }
                // A record with a defect (a header name that is not UTF-8) is shown with the
                // headers that could be read: an operator still sees it.
                let (message, _defect, _size) =
                    crate::record::converted(&record, &mut Default::default());
                messages.push(Stored {
                    position: Position(format!("{partition}:{offset}")),
                    stored_at: record
                        .timestamp()
                        .to_millis()
                        .and_then(|ms| u64::try_from(ms).ok())
                        .map(|ms| UNIX_EPOCH + Duration::from_millis(ms)),
                    message,
                });
                next.insert(partition, offset + 1);
                if offset + 1 >= stop[&partition] {
                    pending.remove(&partition);
                }
            }
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                pending.remove(&partition);
            }
            Some(Err(e)) if matches!(kind_of(&e), ErrorKind::Connection) => {
                // librdkafka reconnects and fetches again by itself; the deadline bounds it.
                tracing::debug!(topic, error = %config.redact(&e.to_string()), "reader connection trouble");
            }
            Some(Err(e)) => {
                return Err(failed(config, e, format!("reading Kafka topic `{topic}`")));
            }
        }
    }
    if messages.is_empty() && !pending.is_empty() {
        // Nothing arrived from partitions that hold records: saying "nothing more" would
        // be wrong.
        let waiting: Vec<String> = pending.iter().map(i32::to_string).collect();
        return Err(Error::new(
            ErrorKind::Timeout,
            format!(
                "reading Kafka topic `{topic}` at {}: partitions {} sent nothing within {:?} \
                 (connect-timeout)",
                config.brokers,
                waiting.join(", "),
                config.connect_timeout
            ),
        )
        .temporary(true));
    }
    Ok(Read {
        messages,
        next: format_cursor(&next),
    })
}

/// Per partition, the first offset of a record stamped at or after `before`, or the high
/// watermark where none is.
fn first_offsets_from(
    config: &KafkaConfig,
    topic: &str,
    marks: &[Marks],
    before: i64,
    deadline: Deadline,
) -> Result<BTreeMap<i32, i64>> {
    let reader = reader(config, None)?;
    let mut list = TopicPartitionList::with_capacity(marks.len());
    for m in marks {
        list.add_partition_offset(topic, m.partition, Offset::Offset(before))
            .map_err(|e| failed(config, e, "listing the partitions to purge"))?;
    }
    let found = reader
        .offsets_for_times(list, deadline.left())
        .map_err(|e| {
            failed(
                config,
                e,
                format!("offsets by time of Kafka topic `{topic}`"),
            )
        })?;
    let mut firsts = BTreeMap::new();
    for m in marks {
        let offset = found
            .find_partition(topic, m.partition)
            .map(|element| {
                element
                    .error()
                    .map_err(|e| {
                        failed(
                            config,
                            e,
                            format!("offsets by time of Kafka topic `{topic}`"),
                        )
                    })
                    .map(|()| element.offset())
            })
            .transpose()?;
        let first = match offset {
            Some(Offset::Offset(offset)) => offset.min(m.high),
            // `End`: no record is that new.
            _ => m.high,
        };
        firsts.insert(m.partition, first);
    }
    Ok(firsts)
}

#[async_trait]
impl Admin for KafkaAdmin {
    async fn inspect(
        &self,
        destination: &str,
        known_groups: &[String],
    ) -> Result<DestinationReport> {
        let deadline = self.deadline();
        let (config, client) = (self.config.clone(), self.client.clone());
        let (topic, known) = (destination.to_owned(), known_groups.to_vec());
        blocking(move || inspect(&config, client.inner(), &topic, &known, deadline)).await?
    }

    async fn read(&self, destination: &str, from: &ReadFrom, max: usize) -> Result<Read> {
        let deadline = self.deadline();
        let (config, client) = (self.config.clone(), self.client.clone());
        let (topic, from) = (destination.to_owned(), from.clone());
        blocking(move || read(&config, client.inner(), &topic, &from, max, deadline)).await?
    }

    fn removal(&self) -> Removal {
        Removal::UpTo
    }

    /// Deletes, in each partition named, the records up to and including the newest
    /// position of that partition. Positions already deleted are skipped; a missing topic
    /// has nothing to delete.
    async fn remove(&self, destination: &str, positions: &[Position]) -> Result<()> {
        let mut upto: BTreeMap<i32, i64> = BTreeMap::new();
        for position in positions {
            let (partition, offset) = parse_position(position)?;
            let before = upto.entry(partition).or_insert(0);
            *before = (*before).max(offset + 1);
        }
        if upto.is_empty() {
            return Ok(());
        }
        let deadline = self.deadline();
        let Some(marks) = self.marks(destination, deadline).await? else {
            return Ok(());
        };
        // Already gone: nothing to ask the broker for.
        upto.retain(|partition, before| {
            marks
                .iter()
                .find(|m| m.partition == *partition)
                .is_none_or(|m| *before > m.low)
        });
        self.delete_before(destination, &upto, deadline).await?;
        Ok(())
    }

    /// Deletes, in each partition, the records before the first one stamped at or after
    /// `before` (record timestamps: the producer's create time unless the topic says
    /// `LogAppendTime`), and counts what the oldest retained offsets moved by.
    async fn purge(&self, destination: &str, before: SystemTime) -> Result<Option<u64>> {
        let deadline = self.deadline();
        let Some(marks) = self.marks(destination, deadline).await? else {
            return Ok(Some(0));
        };
        let millis = before
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let (config, topic, found) = (self.config.clone(), destination.to_owned(), marks.clone());
        let firsts =
            blocking(move || first_offsets_from(&config, &topic, &found, millis, deadline))
                .await??;
        let mut upto = BTreeMap::new();
        let mut lows = BTreeMap::new();
        for m in &marks {
            lows.insert(m.partition, m.low);
            if firsts[&m.partition] > m.low {
                upto.insert(m.partition, firsts[&m.partition]);
            }
        }
        let after = self.delete_before(destination, &upto, deadline).await?;
        let removed = after
            .iter()
            .map(|(partition, low)| {
                let was = lows.get(partition).copied().unwrap_or(*low);
                u64::try_from(low - was).unwrap_or(0)
            })
            .sum();
        Ok(Some(removed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_are_partition_offset_pairs() {
        let next = BTreeMap::from([(0, 12), (1, 40), (2, 7)]);
        let cursor = format_cursor(&next);
        assert_eq!(cursor.0, "0=12,1=40,2=7");
        assert_eq!(parse_cursor(&cursor.0).unwrap(), next);
        assert!(parse_cursor("").unwrap().is_empty());
        for bad in ["0:12", "x=1", "0=-1", "0=1,1"] {
            let err = parse_cursor(bad).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Config, "{bad}");
            assert!(err.message().contains(bad), "{err}");
        }
    }

    #[test]
    fn positions_are_partition_colon_offset() {
        assert_eq!(parse_position(&Position("2:15".into())).unwrap(), (2, 15));
        for bad in ["2@15", "2:", ":1", "-1:3", "a:b"] {
            assert_eq!(
                parse_position(&Position(bad.into())).unwrap_err().kind(),
                ErrorKind::Config
            );
        }
    }

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as i16).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    #[test]
    fn member_assignments_and_subscriptions_name_their_topics() {
        // Assignment v1: version, [topic, [partition]], user data.
        let mut assignment = 1i16.to_be_bytes().to_vec();
        assignment.extend_from_slice(&2i32.to_be_bytes());
        string(&mut assignment, "orders");
        assignment.extend_from_slice(&2i32.to_be_bytes());
        assignment.extend_from_slice(&0i32.to_be_bytes());
        assignment.extend_from_slice(&3i32.to_be_bytes());
        string(&mut assignment, "payments");
        assignment.extend_from_slice(&0i32.to_be_bytes());
        assignment.extend_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(
            assigned_topics(&assignment).unwrap(),
            ["orders".to_owned(), "payments".to_owned()]
        );
        // Cut short: not trusted.
        assert_eq!(assigned_topics(&assignment[..9]), None);

        let mut subscription = 3i16.to_be_bytes().to_vec();
        subscription.extend_from_slice(&1i32.to_be_bytes());
        string(&mut subscription, "orders");
        subscription.extend_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(
            subscribed_topics(&subscription).unwrap(),
            ["orders".to_owned()]
        );
        assert_eq!(subscribed_topics(&[]), None);
    }
}
