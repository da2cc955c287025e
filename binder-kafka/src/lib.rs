//! Apache Kafka binder for `stream-core`, over librdkafka (the `rdkafka` crate).
//!
//! Selected by `type = "kafka"` in a configuration file once [`register`]ed. It implements
//! transport only; retry, dead-lettering, codecs, per-key order and shutdown come from
//! `stream-core`.
//!
//! * Producers are idempotent with `acks=all`: `send` returns `partition@offset` once every
//!   in-sync replica has the message; retries inside librdkafka neither reorder nor
//!   duplicate. Keys and headers map to Kafka's.
//! * A consumer is a member of the binding's group (`group.id`), polled continuously by a
//!   thread of its own whatever core's prefetch window holds, so slow handlers never get it
//!   evicted (`max.poll.interval.ms`) nor hold up a rebalance. Fetched records wait in a
//!   buffer of at most `prefetch` messages (and `fetch-queue-kbytes`); while it stays full,
//!   the fetch of the member's partitions is paused. On a revoke, deliveries of the revoked
//!   partitions that no handler started are dropped ([`Consumer::holds`] answers false) and
//!   started ones are waited for, at most half of `max.poll.interval.ms`.
//! * An acknowledgement moves a partition's commit position only when every earlier delivery
//!   of it is acknowledged too, so an out-of-order acknowledgement never commits past a
//!   message still being handled. Positions are committed every `commit-interval`,
//!   synchronously when partitions are revoked, and when the consumer closes. A member that
//!   dies leaves its un-acknowledged messages to the member that takes its partitions over.
//! * `start-from` decides only where a new group starts; anything else without a usable
//!   committed offset starts at the oldest retained message.
//! * Kafka keeps no delivery count: [`Received::attempt`] is always 1, and attempts are not
//!   kept across a crash or a rebalance.
//! * Keys and header values that are not UTF-8 are converted lossily (U+FFFD for each invalid
//!   sequence; equal bytes still give equal keys). A record with a header name that is not
//!   UTF-8 is dead-lettered as undecodable: rdkafka panics reading such a name, and the
//!   binder catches the panic, which a program built with `panic = "abort"` cannot (see the
//!   README's known limits).
//! * Topics are created on first use with `partitions`, `replication-factor` (unset: the
//!   brokers' `default.replication.factor`) and a `max.message.bytes` that carries core's
//!   default 1 MiB payload and its dead-letter copy, unless `create-topics = false`, in which
//!   case a missing topic is an [`ErrorKind::DestinationNotFound`] error. A partitioned
//!   binding needs a topic with exactly its `partitions`.
//! * A broker that dies is survived as long as the remaining in-sync replicas satisfy the
//!   topic's `min.insync.replicas`: librdkafka follows leaders and the group coordinator to
//!   the brokers that take over, and the connection errors it reports meanwhile are logged,
//!   not returned, so consumers keep reading the partitions whose leaders are up.
//!
//! * [`Binder::ping`] (what `Streams::health` calls) is one metadata request through the
//!   admin client, on a blocking thread, answered by any broker, within [`MAX_PING_WAIT`]
//!   (or `connect-timeout`, if shorter); no answer is a temporary
//!   [`ErrorKind::Connection`] error naming the brokers. It creates no topic.
//! * [`Consumer::lag`] (the `stream_consumer_lag` gauge) is group-wide, the same on every
//!   member: over every partition of the topic, the high watermark less the group's
//!   committed offset, or less the low watermark where the group has no commit the
//!   partition still holds (where `auto.offset.reset = earliest` makes it read from). It
//!   counts committed acknowledgements only, so it reaches 0 one `commit-interval` after
//!   the last acknowledgement. A reader client of the member's own, which never joins the
//!   group, asks for it on a blocking thread (5 s at most); the poller is not involved. An
//!   anonymous consumer commits nothing and reports `None`.
//! * [`Binder::admin`] (operators' access: the dead-letter tools and the `stream` command
//!   line) reports watermarks and consumer groups, reads without joining a group or
//!   committing, and removes with `DeleteRecords`, which deletes only a partition's records
//!   before an offset; Kafka does not tell what a member holds nor how long it was idle.
//!
//! The crate's README describes polling, revocation, attempts, payload limits, health and lag
//! in full.
//!
//! [`Consumer::holds`]: stream_core::Consumer::holds
//! [`Consumer::lag`]: stream_core::Consumer::lag
//! [`Received::attempt`]: stream_core::Received::attempt
//!
//! ```no_run
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> stream_core::Result<()> {
//! use std::sync::Arc;
//! use stream_core::{Binder, BindingConfig, Channel};
//!
//! let binder = binder_kafka::KafkaBinder::new(binder_kafka::KafkaConfig::new("127.0.0.1:9092"))?;
//! let channel = Channel::new(
//!     "orders",
//!     Arc::new(binder) as Arc<dyn Binder>,
//!     BindingConfig::new("order-events").group("billing").concurrency(4),
//! );
//! let subscription = channel
//!     .sink::<String>()
//!     .subscribe(|order| async move {
//!         println!("{order}");
//!         Ok::<(), String>(())
//!     })
//!     .await?;
//! channel.source::<String>().await?.send(&"order 7".to_owned()).await?;
//! subscription.shutdown().await?;
//! # Ok(())
//! # }
//! ```
//!
//! From a configuration file (building the binder checks its settings, without connecting):
//!
//! ```
//! # fn main() -> stream_core::Result<()> {
//! let streams = stream_core::Streams::builder()
//!     .register(binder_kafka::register)
//!     .env(Vec::<(String, String)>::new())
//!     .load_str(r#"
//!         [binders.kafka]
//!         type = "kafka"
//!         brokers = "127.0.0.1:9092"
//!         linger = "10ms"
//!         [binders.kafka.producer]
//!         "compression.type" = "lz4"
//!
//!         [bindings.orders-out]
//!         destination = "order-events"
//!     "#)?;
//! assert_eq!(streams.binder("kafka").unwrap().kind(), "kafka");
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod admin;
mod config;
mod consumer;
mod election;
mod error;
mod inspect;
mod lag;
mod offsets;
mod poller;
mod producer;
mod record;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::producer::ThreadedProducer;
use stream_core::{Binder, BindingConfig, ConsumerOptions, Error, ErrorKind, Registry, Result};
use tokio::sync::OnceCell;

use crate::admin::Admin;
use crate::producer::{DeliveryRouter, KafkaProducer, SharedProducer};

pub use crate::config::{KafkaConfig, Property};

/// The binder `type` this crate registers.
pub const KIND: &str = "kafka";

/// The longest [`Binder::ping`] waits (less if `connect-timeout` is shorter): three
/// quarters of [`stream_core::PING_TIMEOUT`] (1.5 s), the most `Streams::health` waits for a
/// binder, so that a silent cluster is reported by this binder's error, which names the
/// brokers, rather than by a bare timeout.
pub const MAX_PING_WAIT: Duration =
    Duration::from_millis(stream_core::PING_TIMEOUT.as_millis() as u64 / 4 * 3);

/// Adds the Kafka binder to `registry` under `type = "kafka"`.
pub fn register(registry: &mut Registry) {
    registry.register(KIND, |settings| {
        let config: KafkaConfig = settings.parse()?;
        Ok(Arc::new(KafkaBinder::new(config)?) as Arc<dyn Binder>)
    });
}

/// A connection to one Kafka cluster. Clients are made on first use: building the binder
/// checks the settings and touches no network.
pub struct KafkaBinder {
    config: Arc<KafkaConfig>,
    admin: OnceCell<Admin>,
    producer: OnceCell<Arc<SharedProducer>>,
    closed: AtomicBool,
}

impl fmt::Debug for KafkaBinder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaBinder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl KafkaBinder {
    /// A binder for `config`, after checking it (including every passthrough property, which
    /// librdkafka validates without connecting).
    pub fn new(config: KafkaConfig) -> Result<KafkaBinder> {
        config.validate()?;
        Ok(KafkaBinder {
            config: Arc::new(config),
            admin: OnceCell::new(),
            producer: OnceCell::new(),
            closed: AtomicBool::new(false),
        })
    }

    /// The settings.
    pub fn config(&self) -> &KafkaConfig {
        &self.config
    }

    /// The committed offset (the next offset the group reads) of each partition of `topic`
    /// for `group`; partitions the group never committed are absent. For operations and
    /// tests: the reader does not join the group.
    pub async fn committed_offsets(&self, topic: &str, group: &str) -> Result<BTreeMap<i32, i64>> {
        consumer::group_offsets(&self.config, topic, group).await
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::new(
                ErrorKind::Closed,
                format!("the Kafka binder for {} is closed", self.config.brokers),
            ));
        }
        Ok(())
    }

    async fn topic_admin(&self) -> Result<&Admin> {
        self.admin
            .get_or_try_init(|| async { Admin::new(self.config.clone()) })
            .await
    }

    async fn shared_producer(&self) -> Result<&Arc<SharedProducer>> {
        self.producer
            .get_or_try_init(|| async {
                let inner: ThreadedProducer<DeliveryRouter> = self
                    .config
                    .producer_config()
                    .create_with_context(DeliveryRouter::default())
                    .map_err(|e| self.config.client_error(e))?;
                Ok(Arc::new(SharedProducer {
                    inner,
                    delivery_timeout: self.config.delivery_timeout,
                }))
            })
            .await
    }
}

#[async_trait]
impl Binder for KafkaBinder {
    fn kind(&self) -> &'static str {
        KIND
    }

    async fn producer(&self, destination: &str) -> Result<Box<dyn stream_core::Producer>> {
        self.check_open()?;
        let admin = self.topic_admin().await?;
        if !admin.is_ready(destination) {
            admin.ensure_topic(destination).await?;
        }
        let shared = self.shared_producer().await?;
        Ok(Box::new(KafkaProducer::new(shared.clone(), destination)))
    }

    async fn consumer(
        &self,
        destination: &str,
        options: &ConsumerOptions,
    ) -> Result<Box<dyn stream_core::Consumer>> {
        self.check_open()?;
        let partitions = self.topic_admin().await?.ensure_topic(destination).await?;
        let consumer =
            consumer::KafkaConsumer::open(&self.config, destination, &partitions, options).await?;
        Ok(Box::new(consumer))
    }

    /// Refuses a `max-payload-bytes` that a message, or its dead-letter copy with the
    /// headers core adds, would not fit into with this binder's `message.max.bytes` (the
    /// default carries core's default of 1 MiB).
    fn check_binding(&self, name: &str, binding: &BindingConfig) -> Result<()> {
        let carried = self.config.max_payload_bytes();
        if binding.max_payload_bytes > carried {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "bindings.{name}: `max-payload-bytes` = {} is more than this Kafka binder \
                     carries: {carried} bytes, its producers' librdkafka `message.max.bytes` \
                     ({}) less {} for the key, the headers and the headers of a dead-letter \
                     copy; lower `max-payload-bytes`, or raise `\"message.max.bytes\"` in the \
                     binder's `producer` table",
                    binding.max_payload_bytes,
                    self.config.message_max_bytes(),
                    config::MESSAGE_HEADROOM,
                ),
            ));
        }
        Ok(())
    }

    /// Kafka topics have partitions of their own: the topic gets (or must already have)
    /// exactly `partitions`, and core sets each message's partition.
    async fn prepare_partitions(&self, destination: &str, partitions: u32) -> Result<bool> {
        self.check_open()?;
        let exactly = i32::try_from(partitions).map_err(|_| {
            Error::new(
                ErrorKind::Config,
                format!("{partitions} partitions are more than Kafka allows"),
            )
        })?;
        self.topic_admin()
            .await?
            .ensure_partitioned_topic(destination, exactly)
            .await?;
        Ok(true)
    }

    /// One metadata request through the binder's admin client (made now if nothing has made
    /// it yet), on a blocking thread, answered by any broker of the cluster: about one topic
    /// the binder uses, or before it uses any, about all topics. Waits at most
    /// [`MAX_PING_WAIT`] (or `connect-timeout`, if shorter); no answer in that time is an
    /// [`ErrorKind::Connection`] error naming the brokers. After [`close`](Binder::close) it
    /// is [`ErrorKind::Closed`].
    async fn ping(&self) -> Result<()> {
        self.check_open()?;
        let bound = self.config.connect_timeout.min(MAX_PING_WAIT);
        self.topic_admin().await?.ping(bound).await
    }

    /// Operators' access to topics ([`stream_core::admin::Admin`]) on the binder's admin
    /// client (made now if nothing has made it yet): watermarks and consumer groups, reads
    /// that join no group and commit nothing, and removal with `DeleteRecords`, which only
    /// deletes a partition's records before an offset
    /// ([`Removal::UpTo`](stream_core::admin::Removal::UpTo)). Kafka does not tell what a
    /// member holds nor how long it has been idle. Positions are `PARTITION:OFFSET`, read
    /// cursors `PARTITION=OFFSET,...`; every call finishes within `connect-timeout`. After
    /// [`close`](Binder::close) it is [`ErrorKind::Closed`].
    async fn admin(&self) -> Result<Arc<dyn stream_core::admin::Admin>> {
        self.check_open()?;
        let client = self.topic_admin().await?.client();
        Ok(Arc::new(inspect::KafkaAdmin::new(
            self.config.clone(),
            client,
        )))
    }

    /// Flushes the shared producer. Afterwards no new producer or consumer is made (they
    /// fail with [`ErrorKind::Closed`]); those made before keep working until closed.
    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        match self.producer.get() {
            Some(producer) => producer.flush().await,
            None => Ok(()),
        }
    }
}
