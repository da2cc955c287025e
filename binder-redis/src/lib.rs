//! A Redis Streams binder for `stream-core`, selected by `type = "redis"`.
//!
//! A destination is a stream key. Publishing is `XADD` (optionally trimming); a group is a
//! Redis consumer group read with `XREADGROUP`, acknowledged with `XACK`, and a member that
//! dies holding deliveries has them taken over by another member with `XAUTOCLAIM` once they
//! have been idle for the binding's `claim-idle`. Retry, dead-letter, codecs, per-key order
//! and the prefetch bound come from `stream-core`; this crate moves entries and acks.
//!
//! Building the binder does no network I/O, so a configuration loads without Redis running;
//! the first producer or consumer connects, with a bounded retry:
//!
//! ```
//! use stream_core::{ErrorKind, Streams};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> stream_core::Result<()> {
//! let streams = Streams::builder()
//!     .register(binder_redis::register)
//!     .env(Vec::<(String, String)>::new())
//!     .load_str(r#"
//!         default-binder = "redis"
//!         [binders.redis]
//!         type = "redis"
//!         url = "redis://:secret@127.0.0.1:1"   # nothing listens on port 1
//!         connect-attempts = 2
//!         connect-timeout = "200ms"
//!         [bindings.orders-out]
//!         destination = "order-events"
//!     "#)?;
//!
//! let err = streams.source::<String>("orders-out").await.unwrap_err();
//! assert_eq!(err.kind(), ErrorKind::Connection);
//! // The error names the address, never the password.
//! assert!(err.message().contains("redis://:***@127.0.0.1:1"), "{err}");
//! assert!(!err.to_string().contains("secret"));
//! # Ok(())
//! # }
//! ```
//!
//! With Redis running, publishing and consuming look the same as on any other binder:
//!
//! ```no_run
//! use std::sync::Arc;
//! use binder_redis::{RedisBinder, RedisConfig};
//! use stream_core::{Binder, BindingConfig, Channel};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> stream_core::Result<()> {
//! let binder = RedisBinder::new(RedisConfig::with_url("redis://127.0.0.1:6379"))?;
//! let channel = Channel::new(
//!     "greetings",
//!     Arc::new(binder) as Arc<dyn Binder>,
//!     BindingConfig::new("greetings").group("greeter"),
//! );
//! let subscription = channel
//!     .sink::<String>()
//!     .subscribe(|name: String| async move {
//!         println!("hello, {name}");
//!         Ok::<(), String>(())
//!     })
//!     .await?;
//! channel.source::<String>().await?.send(&"ada".to_owned()).await?;
//! subscription.shutdown().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Entry layout
//!
//! A message is one stream entry: the payload under field `p`, the key (if any) under `k`,
//! each header under `h:<name>` (repeated names repeat). The message id is the entry id
//! (`1700000000000-0`). Fields other producers wrote come back as headers of the same name.
//!
//! A batch (`send_batch`) goes as `MULTI`, one `XADD` per message, `EXEC`, in transactions of
//! up to 1024 entries: all of a transaction's entries are appended, or none.
//!
//! # Redis Cluster
//!
//! `nodes = ["redis://10.0.0.1:6379", ...]` (seed nodes; see [`RedisConfig::nodes`]) instead
//! of `url` connects to a Redis Cluster through redis-rs's cluster client: each command goes
//! to the master that serves its stream key's slot, `MOVED`/`ASK` redirects are followed,
//! and a node that went away is reconnected in the background. Every command of the binder
//! names one stream key, so no command is ever cross-slot, and each destination (each
//! partition's stream, for a partitioned binding) lives wholly on the master of its slot.
//!
//! * Batches stay transactions: redis-rs sends a `MULTI`/`EXEC` pipeline to the master of
//!   its key's slot. It does not follow a redirect of a transaction (it comes back as
//!   `EXECABORT` listing the `MOVED` errors); since such a transaction ran nothing, the
//!   producer asks the cluster where the slot lives now and sends it again, within
//!   `command-timeout`. During a slot migration (`ASK`) it is sent again until the
//!   migration has finished.
//! * Each consumer reads through a cluster connection of its own, so that its blocking
//!   `XREADGROUP` holds up nothing else; acks and group administration share the binder's.
//! * `MOVED`, `ASK`, `TRYAGAIN`, `CLUSTERDOWN` and lost connections are temporary errors:
//!   redis-rs retries them with backoff within `command-timeout`, then core or the caller
//!   does. After a dropped connection redis-rs sends the command again, so an `XADD` whose
//!   reply was lost in a crash may be appended twice (a duplicate, never a loss).
//!
//! # Delivery
//!
//! * A consumer joins its group under a name of its own (`XGROUP CREATE`, then `XGROUP
//!   CREATECONSUMER`). Each `receive` first finishes a pass over its own pending list, then
//!   sweeps the group's pending list with `XAUTOCLAIM` every `claim-interval` (default:
//!   half of `claim-idle`), then reads new entries (`XREADGROUP ... BLOCK`).
//! * A live member keeps what it holds, however long its handlers take (slow handlers,
//!   long backoffs, a full prefetch window): a task re-claims the entries it has handed out
//!   and not yet acknowledged with `XCLAIM ... JUSTID` every `min(claim-idle / 3, 10s)`, so
//!   no other member's sweep finds them idle. It re-claims only entries still pending for
//!   this consumer; one another member has taken meanwhile (after Redis was out of reach,
//!   or this process stalled, for longer than `claim-idle`) is dropped before its handler
//!   starts (`Consumer::holds`), or, if its handler has started, may be handled twice.
//! * Redis's delivery count of an entry is core's attempt count (`Received::attempt`): the
//!   deliveries that reached a handler, or may have. A new read and a takeover from another
//!   member count one; a retry in process is recorded before it starts (`XCLAIM ...
//!   RETRYCOUNT n JUSTID`), so attempts survive a crash; deliveries core hands back without
//!   handling them (`Consumer::release`: prefetched and never started at close) lose the
//!   count they added and become claimable by other members at once, so a rolling restart
//!   uses up no attempts. The own pending pass and the own sweep change no count. A
//!   message that keeps crashing its consumers therefore reaches the retry limit and the
//!   dead-letter stream.
//! * `ack` returns once the ids are queued. The consumer's next `XREADGROUP` carries them
//!   (`XACK` and `XREADGROUP` in one pipeline: one round trip, and one fsync on a server
//!   with `appendfsync always`); when no read comes within a few milliseconds, a task of the
//!   consumer sends them alone. Until Redis confirms, this consumer keeps the entries and
//!   does not hand them out again; a failed `XACK` is sent again for as long as the
//!   consumer lives. When Redis refuses it for good (`NOPERM`, say), the next `receive`
//!   fails with that error, which ends the subscription. A process that dies with
//!   acknowledgements queued leaves those entries pending: they are delivered again, as
//!   any un-acknowledged entry is.
//! * On close, a durable consumer first records its queued acknowledgements, then hands
//!   what it did not acknowledge back to the group (immediately claimable by other members,
//!   counts kept) and, if nothing was pending, deletes its consumer name. Entries Redis
//!   handed to a `receive` that was dropped before returning them (core stops fetching
//!   that way, and a blocked read is still served) go back uncounted, as released ones do.
//!   Entries whose `XACK` Redis did not confirm are not handed back (they would be handled
//!   again at once): they stay pending under the closed consumer, and `close` returns an
//!   error saying how many. An anonymous group is destroyed.
//! * Live members clean up after dead ones. At most every quarter of `consumer-expiry`
//!   (default 5 min), a sweep removes the group's consumers that hold nothing and were not
//!   seen for `consumer-expiry`, and destroys the stream's anonymous groups (`anonymous.*`,
//!   the names core gives them) whose consumers were all unseen that long, or that have no
//!   consumer and left entries unread without moving for that long. Every live consumer
//!   shows itself at least every `min(claim-idle / 3, consumer-expiry / 10, 10s)`.
//! * A pending entry that was deleted or trimmed from the stream is acknowledged and
//!   reported with a warning, never delivered as an empty message; one trimmed while a
//!   consumer holds it was read whole and is still handled. An entry that is not a
//!   faithful message (a field name, value or key that is not UTF-8, no payload field) is
//!   delivered with a defect, which core dead-letters as undecodable.
//! * Dead letters are never trimmed: the binder's `trim` rule applies to every stream but
//!   the dead-letter ones.
//! * After a dropped connection or a Redis restart, commands fail with temporary errors
//!   (which core retries) until the connection is back; the consumer then re-creates its
//!   group if Redis lost it and re-reads its own pending entries before new ones.
//!
//! # Health and lag
//!
//! * [`Binder::ping`] (what `Streams::health` calls) is a `PING` on the command connection,
//!   made with one attempt if nothing has made it yet, within [`MAX_PING_WAIT`] (or
//!   `command-timeout`, if shorter). Any failure is a temporary
//!   [`ErrorKind::Connection`] error naming the address, password hidden. On a Redis
//!   Cluster the `PING` goes to every master of the slot map, and all must answer.
//! * [`Consumer::lag`] (the `stream_consumer_lag` gauge) is
//!   group-wide, the same on every member: the entries the group has not acknowledged,
//!   `XINFO GROUPS`' `lag` (never delivered) plus `pending` (delivered, not acknowledged,
//!   released ones included), read in one script. Where Redis's `lag` is wrong or nil the
//!   binder corrects it: entries trimmed before the group read them do not count (a group
//!   whose position is below the first entry lags by the stream's length); when entries
//!   after the position were deleted with `XDEL` (Redis says nil) the entries on the
//!   shorter side of the position are counted, up to 1,000 on each side, past which the
//!   sample fails with a temporary error and core tries again at the next interval. A
//!   group that does not exist yet lags by the stream's length (`start-from = "earliest"`)
//!   or by 0 (`"latest"`), as the consumer's next read makes it; a deleted stream by 0.
//!
//! A binding with a `group` must have a `claim-idle` of at least 30 ms (three keepalive
//! rounds at their shortest) and longer than its `retry.max-backoff` (both checked at
//! load): a member that dies while a message waits out its backoff stops keeping it, and
//! another member must not take it over and retry it sooner than the backoff promised.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod acks;
mod admin;
mod cleanup;
mod config;
mod connection;
mod consumer;
mod dedup;
mod entry;
mod holdings;
mod lag;
mod producer;
mod retention;

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use stream_core::{
    Binder, BindingConfig, Consumer, ConsumerOptions, Error, ErrorKind, Producer, Registry, Result,
};
use tokio::sync::OnceCell;

pub use config::{RedisConfig, TrimConfig};

/// The metrics this binder records beside stream-core's (`stream_core::telemetry::names`).
pub mod names {
    pub use crate::retention::{
        TRIMMED as RETENTION_TRIMMED, UNREAD_DROPPED as RETENTION_UNREAD_DROPPED,
    };
}

use connection::{Conn, Endpoint};
use consumer::{ReadSettings, RedisConsumer};
use producer::{RedisProducer, Retention, TrimRule};

/// The binder `type` this crate registers.
pub const KIND: &str = "redis";

/// The longest [`Binder::ping`] waits, connecting included (less if `command-timeout` is
/// shorter): three quarters of [`stream_core::PING_TIMEOUT`] (1.5 s), the most
/// `Streams::health` waits for a binder, so that a silent Redis is reported by this
/// binder's error, which names the address, rather than by a bare timeout.
pub const MAX_PING_WAIT: Duration =
    Duration::from_millis(stream_core::PING_TIMEOUT.as_millis() as u64 / 4 * 3);

/// Registers the `redis` binder type:
/// `Streams::builder().register(binder_redis::register)`.
pub fn register(registry: &mut Registry) {
    registry.register(KIND, |settings| {
        let config: RedisConfig = settings.parse()?;
        Ok(Arc::new(RedisBinder::new(config)?))
    });
}

/// A connection to one Redis server or to a Redis Cluster, making producers and consumers of
/// its streams.
///
/// Cheap to clone; clones share connections. The first producer or consumer connects.
#[derive(Clone)]
pub struct RedisBinder {
    inner: Arc<Inner>,
}

struct Inner {
    config: RedisConfig,
    endpoint: Endpoint,
    trim: Option<TrimRule>,
    retention: Option<Retention>,
    /// Publishing, acks and group administration of every producer and consumer, multiplexed
    /// on one connection; made on first use.
    commands: OnceCell<Conn>,
    closed: AtomicBool,
}

impl RedisBinder {
    /// A binder for `config`. Checks the settings without connecting.
    pub fn new(config: RedisConfig) -> Result<RedisBinder> {
        config.validate()?;
        let endpoint = Endpoint::new(&config)?;
        let (trim, retention) = match &config.trim {
            Some(trim) => (
                trim.strategy()?.map(|bound| TrimRule {
                    trim: bound,
                    approximate: trim.approximate,
                }),
                trim.acknowledged.then_some(Retention {
                    interval: trim.interval,
                    approximate: trim.approximate,
                }),
            ),
            None => (None, None),
        };
        Ok(RedisBinder {
            inner: Arc::new(Inner {
                config,
                endpoint,
                trim,
                retention,
                commands: OnceCell::new(),
                closed: AtomicBool::new(false),
            }),
        })
    }

    /// The settings this binder was made with.
    pub fn config(&self) -> &RedisConfig {
        &self.inner.config
    }

    async fn commands(&self) -> Result<Conn> {
        self.command_connection(self.inner.config.connect_attempts)
            .await
    }

    /// The shared command connection, made now with `attempts` at first contact if nothing
    /// has made it yet.
    async fn command_connection(&self, attempts: u32) -> Result<Conn> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Error::new(
                ErrorKind::Closed,
                format!("redis binder for {} is closed", self.inner.endpoint.address),
            ));
        }
        let endpoint = &self.inner.endpoint;
        let timeout = self.inner.config.command_timeout;
        let conn = self
            .inner
            .commands
            .get_or_try_init(|| async move {
                if attempts <= 1 {
                    endpoint.connect_once(timeout).await
                } else {
                    endpoint.connect(timeout).await
                }
            })
            .await?;
        Ok(conn.clone())
    }
}

impl fmt::Debug for RedisBinder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBinder")
            .field("config", &self.inner.config)
            .field("connected", &self.inner.commands.initialized())
            .finish()
    }
}

#[async_trait]
impl Binder for RedisBinder {
    fn kind(&self) -> &'static str {
        KIND
    }

    async fn producer(&self, destination: &str) -> Result<Box<dyn Producer>> {
        let conn = self.commands().await?;
        Ok(Box::new(RedisProducer::new(
            conn,
            destination,
            self.inner.trim,
            self.inner.retention,
            self.inner.config.command_timeout,
        )))
    }

    async fn dead_letter_producer(&self, destination: &str) -> Result<Box<dyn Producer>> {
        let conn = self.commands().await?;
        // No trim rule and no retention: dead letters stay until someone handles them,
        // however many messages the binder's streams keep.
        Ok(Box::new(RedisProducer::new(
            conn,
            destination,
            None,
            None,
            self.inner.config.command_timeout,
        )))
    }

    fn check_binding(&self, name: &str, binding: &BindingConfig) -> Result<()> {
        if binding.group.is_some() && binding.claim_idle < holdings::MIN_CLAIM_IDLE {
            // Below that, the keepalive cannot re-claim held entries often enough: another
            // member would take over entries a live member holds.
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "bindings.{name}: `claim-idle` ({:?}) must be at least {:?} on a redis                      binder: a live member re-claims what it holds every third of                      `claim-idle`, and no more often than every {:?}",
                    binding.claim_idle,
                    holdings::MIN_CLAIM_IDLE,
                    holdings::MIN_CLAIM_IDLE / 3
                ),
            ));
        }
        if binding.group.is_some() && binding.claim_idle <= binding.retry.max_backoff {
            // Live members keep what they hold whatever the backoff (the keepalive). A
            // member that dies while a message waits out its backoff stops that, and the
            // message must not be taken over and retried sooner than the backoff promised.
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "bindings.{name}: `claim-idle` ({:?}) must be longer than \
                     `retry.max-backoff` ({:?}) on a redis binder: when a member dies while a \
                     message waits out its backoff, another member takes the message over \
                     after `claim-idle`, which must not come before the backoff ends; raise \
                     `claim-idle` or lower `retry.max-backoff`",
                    binding.claim_idle, binding.retry.max_backoff
                ),
            ));
        }
        Ok(())
    }

    async fn consumer(
        &self,
        destination: &str,
        options: &ConsumerOptions,
    ) -> Result<Box<dyn Consumer>> {
        let commands = self.commands().await?;
        let config = &self.inner.config;
        let read = self
            .inner
            .endpoint
            .connect(config.block.saturating_add(config.command_timeout))
            .await?;
        let settings = ReadSettings {
            block: config.block,
            claim_interval: config.claim_interval,
            consumer_expiry: config.consumer_expiry,
            consumer_prefix: config.consumer_prefix.clone(),
            command_timeout: config.command_timeout,
        };
        let consumer = RedisConsumer::open(commands, read, destination, options, &settings).await?;
        Ok(Box::new(consumer))
    }

    /// `PING` on the binder's command connection, the one producers, acks and group
    /// administration share (made now, with one attempt, if nothing has made it yet). On a Redis Cluster the
    /// `PING` goes to every master of the slot map, and fails unless all of them answer: a
    /// master that is down leaves its slots' streams unserved. Waits at most
    /// [`MAX_PING_WAIT`] (or `command-timeout`, if shorter). Redis not answering, or not as
    /// a healthy server does (`LOADING` after a restart, say), is an
    /// [`ErrorKind::Connection`] error naming the address, its password hidden; after
    /// [`close`](Binder::close) it is [`ErrorKind::Closed`].
    async fn ping(&self) -> Result<()> {
        let endpoint = &self.inner.endpoint;
        let bound = self.inner.config.command_timeout.min(MAX_PING_WAIT);
        let ping = async {
            // One attempt if it connects: a refusal is reported at once with its reason, and
            // the next check tries again.
            let mut conn = self.command_connection(1).await?;
            redis::cmd("PING")
                .query_async::<()>(&mut conn)
                .await
                .map_err(|e| endpoint.ping_failed(e))
        };
        tokio::time::timeout(bound, ping)
            .await
            .unwrap_or_else(|_| Err(endpoint.ping_unanswered(bound)))
    }

    /// Handled ids as keys with a TTL (`SET PX`, `EXISTS`), on the command connection.
    fn dedup_store(&self) -> Option<Arc<dyn stream_core::dedup::DedupStore>> {
        Some(Arc::new(dedup::RedisDedup {
            binder: self.clone(),
        }))
    }

    /// `XINFO`, `XRANGE`, `XDEL` and `XTRIM` on the command connection.
    async fn admin(&self) -> Result<Arc<dyn stream_core::admin::Admin>> {
        Ok(Arc::new(admin::RedisAdmin {
            conn: self.commands().await?,
        }))
    }

    async fn close(&self) -> Result<()> {
        // Producers and consumers hold their own handles to the connections and stay usable
        // until closed; the connections go when the last of them does.
        self.inner.closed.store(true, Ordering::Release);
        Ok(())
    }
}
