//! The transport contract a broker crate implements.
//!
//! A binder moves messages and acknowledgements; it has no retry, dead-letter, codec or
//! concurrency logic of its own. Those policies live once in this crate, on top of these
//! three traits, so every broker gets the same behaviour.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::{BindingConfig, Message, Result};

/// One broker connection: makes producers and consumers.
#[async_trait]
pub trait Binder: Send + Sync + 'static {
    /// The binder's `type` in configuration files (`"memory"`, `"redis"`, `"kafka"`).
    fn kind(&self) -> &'static str;

    /// A producer that publishes to `destination`.
    async fn producer(&self, destination: &str) -> Result<Box<dyn Producer>>;

    /// A producer for a binding's dead-letter destination. Core makes it when a consumer
    /// starts, so a dead-letter destination that cannot be written fails the start instead
    /// of the first dead letter.
    ///
    /// Dead letters are kept until someone handles them: a binder whose producers apply a
    /// retention rule (Redis trimming) leaves it off here. The default is
    /// [`producer`](Binder::producer).
    async fn dead_letter_producer(&self, destination: &str) -> Result<Box<dyn Producer>> {
        self.producer(destination).await
    }

    /// Checks a binding against what this binder can do, when a configuration is loaded and
    /// again when a source or consumer is made from a binding built in code. An error of kind
    /// [`ErrorKind::Config`](crate::ErrorKind::Config) names what to change. The default
    /// accepts every binding.
    fn check_binding(&self, name: &str, binding: &BindingConfig) -> Result<()> {
        let _ = (name, binding);
        Ok(())
    }

    /// A consumer of `destination` as a member of `options.group`.
    async fn consumer(
        &self,
        destination: &str,
        options: &ConsumerOptions,
    ) -> Result<Box<dyn Consumer>>;

    /// Readies `destination` to hold `partitions` partitions of the broker's own (a Kafka
    /// topic with at least that many) and returns true. The default returns false: the
    /// broker has no partitions, and core lays a partitioned binding out as one destination
    /// per partition ([`partition_destination`](crate::partition_destination)).
    ///
    /// A binder that returns true sends each message to its
    /// [`Message::partition`], and reads the partitions of
    /// [`ConsumerOptions::partitions`] when that is set.
    async fn prepare_partitions(&self, destination: &str, partitions: u32) -> Result<bool> {
        let _ = (destination, partitions);
        Ok(false)
    }

    /// Checks that the broker answers (Redis `PING`, a Kafka metadata request), for health
    /// checks: cheap, bounded in time, and without side effects. The default answers at once:
    /// a binder without a remote broker is always reachable.
    async fn ping(&self) -> Result<()> {
        Ok(())
    }

    /// A store of handled message ids for idempotent consumers (binding key `dedup` naming
    /// this binder), if the broker can keep one. The default keeps none.
    fn dedup_store(&self) -> Option<Arc<dyn crate::dedup::DedupStore>> {
        None
    }

    /// Administrative access to the broker, for operators and the `stream` command line
    /// ([`Admin`](crate::admin::Admin)). The default fails with
    /// [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported).
    async fn admin(&self) -> Result<std::sync::Arc<dyn crate::admin::Admin>> {
        Err(crate::Error::new(
            crate::ErrorKind::Unsupported,
            format!("the {} binder offers no administrative access", self.kind()),
        ))
    }

    /// Releases connections. Afterwards [`producer`](Binder::producer),
    /// [`dead_letter_producer`](Binder::dead_letter_producer) and
    /// [`consumer`](Binder::consumer) fail with [`ErrorKind::Closed`](crate::ErrorKind::Closed);
    /// producers and consumers already made stay usable until they are closed.
    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

#[async_trait]
impl<B: Binder + ?Sized> Binder for Arc<B> {
    fn kind(&self) -> &'static str {
        (**self).kind()
    }
    async fn producer(&self, destination: &str) -> Result<Box<dyn Producer>> {
        (**self).producer(destination).await
    }
    async fn dead_letter_producer(&self, destination: &str) -> Result<Box<dyn Producer>> {
        (**self).dead_letter_producer(destination).await
    }
    fn check_binding(&self, name: &str, binding: &BindingConfig) -> Result<()> {
        (**self).check_binding(name, binding)
    }
    async fn consumer(
        &self,
        destination: &str,
        options: &ConsumerOptions,
    ) -> Result<Box<dyn Consumer>> {
        (**self).consumer(destination, options).await
    }
    async fn prepare_partitions(&self, destination: &str, partitions: u32) -> Result<bool> {
        (**self).prepare_partitions(destination, partitions).await
    }
    async fn ping(&self) -> Result<()> {
        (**self).ping().await
    }
    fn dedup_store(&self) -> Option<Arc<dyn crate::dedup::DedupStore>> {
        (**self).dedup_store()
    }
    async fn admin(&self) -> Result<Arc<dyn crate::admin::Admin>> {
        (**self).admin().await
    }
    async fn close(&self) -> Result<()> {
        (**self).close().await
    }
}

/// Publishes to one destination.
#[async_trait]
pub trait Producer: Send + Sync + 'static {
    /// Publishes `message` and returns its broker id once the broker has accepted it.
    async fn send(&self, message: Message) -> Result<String>;

    /// Publishes several messages, in order, returning their ids. Binders override this to
    /// use one round trip where the broker allows.
    async fn send_batch(&self, messages: Vec<Message>) -> Result<Vec<String>> {
        let mut ids = Vec::with_capacity(messages.len());
        for message in messages {
            ids.push(self.send(message).await?);
        }
        Ok(ids)
    }

    /// Waits until everything sent so far is accepted by the broker.
    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// Flushes, then releases the producer's resources.
    async fn close(&self) -> Result<()> {
        self.flush().await
    }
}

/// Receives from one destination as a member of one group.
///
/// Core calls [`receive`](Consumer::receive) from one task and [`ack`](Consumer::ack) from
/// another, concurrently, so a binder can overlap the next fetch with the previous ack.
///
/// # Attempts
///
/// An *attempt* is a delivery that reached a handler. [`Received::attempt`] is the number the
/// next attempt of a delivery has: 1 plus the attempts the broker recorded for the message in
/// this group. Each binder keeps that record where a crash cannot lose it:
///
/// * a fresh delivery is recorded as an attempt at once, so a message that kills its
///   consumer counts, and keeps counting until it is dead-lettered;
/// * [`release`](Consumer::release) takes that back for deliveries that never reached a
///   handler (prefetched, queued, not yielded when the consumer closed): a rolling restart
///   does not use up attempts;
/// * [`retrying`](Consumer::retrying) records each further attempt of a delivery this
///   consumer retries itself.
///
/// A binder whose broker keeps no count per message (Kafka) reports 1 for every fresh
/// delivery and says in its documentation what it keeps instead.
#[async_trait]
pub trait Consumer: Send + Sync + 'static {
    /// Waits for deliveries and returns at most `max` of them. It may return an empty batch
    /// after an internal poll interval.
    ///
    /// Cancel safety: dropping the future must not lose messages. Anything the broker handed
    /// out but this call did not return stays un-acknowledged and is delivered again.
    async fn receive(&self, max: usize) -> Result<Vec<Received>>;

    /// Acknowledges deliveries: they are done and never delivered to this group again.
    ///
    /// A binder may return once the acknowledgement is on its way rather than recorded by
    /// the broker (Kafka stores offsets and commits them in the background; Redis carries
    /// `XACK` on its next read), so the next fetch need not wait a round trip. Such a binder
    /// must not hand these deliveries out again itself, must bound what it holds queued, and
    /// must record everything queued in [`close`](Consumer::close). A process that dies first
    /// leaves those deliveries un-acknowledged: they are delivered again, as at-least-once
    /// allows.
    async fn ack(&self, tags: &[DeliveryTag]) -> Result<()>;

    /// Whether this consumer still holds `tag`, asked just before the delivery goes to a
    /// handler. A binder whose broker moves deliveries between members (a Kafka partition
    /// revoked in a rebalance) answers false for deliveries it no longer owns: core then
    /// drops them without handling or acknowledging them, and the new owner delivers them.
    /// Called once per delivery, so it must be cheap and must not block. Default: true.
    fn holds(&self, tag: DeliveryTag) -> bool {
        let _ = tag;
        true
    }

    /// Hands deliveries that never reached a handler back to the group without counting
    /// them as attempts, so the next delivery of each has the [`Received::attempt`] this one
    /// had. Core calls it while stopping, before [`close`](Consumer::close), for what it
    /// fetched and never started. Default: nothing; `close` hands them back as it hands back
    /// every un-acknowledged delivery.
    async fn release(&self, tags: &[DeliveryTag]) -> Result<()> {
        let _ = tags;
        Ok(())
    }

    /// Records that `tag` is about to be tried again as attempt `attempt` (2 or more), so
    /// that a crash during it counts it. A binder that records attempts keeps the delivery
    /// held while it does (on Redis it also resets the idle time). Default: nothing.
    async fn retrying(&self, tag: DeliveryTag, attempt: u32) -> Result<()> {
        let _ = (tag, attempt);
        Ok(())
    }

    /// How many messages of the destination this member's group has not acknowledged yet,
    /// group-wide (never delivered, plus delivered and pending; Redis: the group's `lag`
    /// plus `pending`; Kafka: high watermark minus the group's committed offset over every
    /// partition), so every member of a group reports the same figure. Core samples it every
    /// binding's `lag-interval` for the `stream_consumer_lag` gauge, from its own task, so
    /// it may take a round trip but should be cheap.
    ///
    /// `Ok(None)` means the binder can never tell (an anonymous Kafka consumer commits
    /// nothing): core stops asking. A figure that cannot be had right now is an `Err`, and
    /// core asks again next time. Default: `None`.
    async fn lag(&self) -> Result<Option<u64>> {
        Ok(None)
    }

    /// Leaves the group, after recording every acknowledgement made so far. Un-acknowledged
    /// deliveries become available to other members, their attempts counted.
    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

/// A message as a consumer received it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Received {
    /// The message, with its broker id set.
    pub message: Message,
    /// What to pass to [`Consumer::ack`].
    pub tag: DeliveryTag,
    /// The attempt this delivery is, if it reaches a handler: 1 plus the attempts the broker
    /// recorded for this message in this group (see [`Consumer`]'s section on attempts).
    /// Binders without a count per message report 1.
    pub attempt: u32,
    /// Why the broker's record could not be turned into a message faithfully (a header name
    /// that is not UTF-8, say), when it could not. Core never hands such a delivery to a
    /// handler: it goes to the dead-letter destination as undecodable, with this text.
    pub defect: Option<String>,
}

impl Received {
    /// A delivery of `message`, acknowledged with `tag`, as attempt `attempt`.
    pub fn new(message: Message, tag: DeliveryTag, attempt: u32) -> Self {
        Received {
            message,
            tag,
            attempt,
            defect: None,
        }
    }

    /// Marks the delivery as one that cannot be handled, for the reason given: it is
    /// dead-lettered as undecodable (see [`Received::defect`]).
    pub fn with_defect(mut self, defect: impl Into<String>) -> Self {
        self.defect = Some(defect.into());
        self
    }
}

/// Identifies a delivery to the binder that made it: a memory offset, a Redis entry id, a
/// Kafka partition and offset. Core treats it as opaque.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeliveryTag(pub u64, pub u64);

/// Where a consumer group that does not exist yet starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StartFrom {
    /// From the oldest retained message.
    #[default]
    Earliest,
    /// Only messages published after the group was created.
    Latest,
}

/// The prefix of the groups core makes up for consumers without a `group`
/// (`anonymous.<unique suffix>`). Configured groups may not use it, so a binder may treat
/// such groups as throwaway (delete those of dead processes).
pub const ANONYMOUS_GROUP_PREFIX: &str = "anonymous.";

/// How core asks a binder for a consumer.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConsumerOptions {
    /// The consumer group. Every group gets every message; members of a group share them.
    pub group: String,
    /// False for an anonymous group that lives only as long as its one consumer.
    pub durable: bool,
    /// Start position when the group is new.
    pub start_from: StartFrom,
    /// The most deliveries core will hold un-acknowledged; binders size fetches by it.
    pub prefetch: usize,
    /// How long another member's un-acknowledged delivery may sit idle before this member
    /// takes it over (for binders that recover pending work by idle time).
    pub claim_idle: Duration,
    /// On a binder with partitions of its own: the partitions this member reads, assigned
    /// by configuration (`instance-index` of `instance-count`). `None` leaves the assignment
    /// to the broker's balancing of the group.
    pub partitions: Option<Vec<u32>>,
}

impl ConsumerOptions {
    /// Options for `group` with the defaults: durable, earliest, prefetch 512, 30 s idle.
    pub fn new(group: impl Into<String>) -> Self {
        ConsumerOptions {
            group: group.into(),
            durable: true,
            start_from: StartFrom::Earliest,
            prefetch: crate::config::defaults::prefetch(),
            claim_idle: Duration::from_secs(30),
            partitions: None,
        }
    }

    /// Sets the start position of a new group.
    pub fn start_from(mut self, start_from: StartFrom) -> Self {
        self.start_from = start_from;
        self
    }

    /// Sets the prefetch bound.
    pub fn prefetch(mut self, prefetch: usize) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// Sets the idle time after which a dead member's deliveries are taken over.
    pub fn claim_idle(mut self, idle: Duration) -> Self {
        self.claim_idle = idle;
        self
    }

    /// Sets the partitions this member reads (see [`ConsumerOptions::partitions`]).
    pub fn partitions(mut self, partitions: Vec<u32>) -> Self {
        self.partitions = Some(partitions);
        self
    }

    /// Marks the group anonymous (not durable).
    pub fn anonymous(mut self) -> Self {
        self.durable = false;
        self
    }
}
