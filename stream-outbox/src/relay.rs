//! The relay: publishes what an outbox store holds through the bindings of a [`Streams`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use serde::Deserialize;
use stream_core::config::duration;
use stream_core::{Error, ErrorKind, Message, Raw, Result, Source, Streams};
use tokio::sync::{watch, Mutex};
use tokio::task::JoinHandle;

/// An event waiting in an outbox: the binding it goes to and the message.
#[derive(Debug, Clone)]
pub struct Pending {
    /// The binding (in the relay's [`Streams`]) to publish through.
    pub binding: String,
    /// The message, with its key, headers and message id.
    pub message: Message,
}

impl Pending {
    /// An event for `binding`.
    pub fn new(binding: impl Into<String>, message: Message) -> Pending {
        Pending {
            binding: binding.into(),
            message,
        }
    }
}

/// An event of a batch that can never be published as it is (its binding does not exist,
/// its payload is over the binding's limit). The store keeps it, marked failed with the
/// reason, out of later batches, so that one bad row does not hold up the others.
#[derive(Debug, Clone)]
pub struct Rejected {
    /// Its position in the batch.
    pub index: usize,
    /// Why, for operators.
    pub reason: String,
}

/// Publishes a claimed batch: what a [`Relay`] gives an [`OutboxStore`].
#[async_trait]
pub trait Publisher: Send + Sync {
    /// Publishes `batch`, in order within each binding, and returns the events rejected for
    /// good. An error means nothing of the batch may be marked sent (some of it may have
    /// been published: it is published again, with the same message ids).
    async fn publish(&self, batch: &[Pending]) -> Result<Vec<Rejected>>;
}

/// Where a [`Relay`] reads committed events: [`OutboxReader`](crate::OutboxReader)
/// (PostgreSQL) or [`MemoryOutbox`](crate::MemoryOutbox).
#[async_trait]
pub trait OutboxStore: Send + Sync + 'static {
    /// Claims up to about `limit` committed, unsent events (the events of one key in the
    /// order they were committed, and no key that another relay holds), hands them to
    /// `publisher`, and marks them sent if it succeeds. Returns how many were claimed.
    async fn relay(&self, limit: usize, publisher: &dyn Publisher) -> Result<usize>;

    /// Returns when events may have been committed since the last [`relay`](Self::relay),
    /// or after `timeout`, whichever comes first.
    async fn wait_for_rows(&self, timeout: Duration);

    /// Deletes events sent more than `older_than` ago; returns how many.
    async fn remove_sent(&self, older_than: Duration) -> Result<u64>;
}

/// How a [`Relay`] runs. Also a serde type, for services that keep it in their own
/// configuration files.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RelayConfig {
    /// How many events one claim takes at most. Default: 500.
    #[serde(default = "defaults::batch_size")]
    pub batch_size: usize,
    /// How long the relay waits for a notification before it looks anyway (the fallback
    /// when notifications are lost, e.g. while the listening connection is down). Default:
    /// 1 s.
    #[serde(default = "defaults::poll_interval", with = "duration")]
    pub poll_interval: Duration,
    /// How long sent events stay in the store (for audits and replays) before they are
    /// removed. Default: 1 h.
    #[serde(default = "defaults::keep_sent", with = "duration")]
    pub keep_sent: Duration,
    /// How often sent events older than `keep-sent` are removed. Default: 1 min.
    #[serde(default = "defaults::cleanup_interval", with = "duration")]
    pub cleanup_interval: Duration,
    /// The longest pause after failures (the pause doubles from 100 ms). Default: 5 s.
    #[serde(default = "defaults::max_backoff", with = "duration")]
    pub max_backoff: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            batch_size: defaults::batch_size(),
            poll_interval: defaults::poll_interval(),
            keep_sent: defaults::keep_sent(),
            cleanup_interval: defaults::cleanup_interval(),
            max_backoff: defaults::max_backoff(),
        }
    }
}

mod defaults {
    use std::time::Duration;
    pub fn batch_size() -> usize {
        500
    }
    pub fn poll_interval() -> Duration {
        Duration::from_secs(1)
    }
    pub fn keep_sent() -> Duration {
        Duration::from_secs(3600)
    }
    pub fn cleanup_interval() -> Duration {
        Duration::from_secs(60)
    }
    pub fn max_backoff() -> Duration {
        Duration::from_secs(5)
    }
}

/// Publishes the events of an outbox through the bindings of a [`Streams`], as they are
/// committed: a task inside the service ([`spawn`](Relay::spawn)), or the `stream relay`
/// command.
///
/// ```no_run
/// # async fn doc(streams: stream_core::Streams) -> stream_core::Result<()> {
/// use stream_outbox::{Outbox, Relay};
///
/// let reader = Outbox::new().reader("postgres://app@db.internal/orders")?;
/// let relay = Relay::new(reader, streams).spawn();
/// // ... on shutdown: finishes the batch in hand.
/// relay.shutdown().await?;
/// # Ok(()) }
/// ```
pub struct Relay {
    store: Arc<dyn OutboxStore>,
    publisher: Arc<Sources>,
    config: RelayConfig,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// A relay from `store` to the bindings of `streams`, with [`RelayConfig::default`].
    pub fn new(store: impl OutboxStore, streams: Streams) -> Relay {
        Relay {
            store: Arc::new(store),
            publisher: Arc::new(Sources {
                streams,
                sources: Mutex::new(HashMap::new()),
            }),
            config: RelayConfig::default(),
        }
    }

    /// Runs with `config`.
    pub fn with_config(mut self, config: RelayConfig) -> Relay {
        self.config = config;
        self
    }

    /// Publishes one batch, if there is one; returns how many events it claimed.
    ///
    /// Cancelling it while it publishes leaves the batch unmarked: it is published again.
    pub async fn relay_once(&self) -> Result<usize> {
        self.store
            .relay(self.config.batch_size, &*self.publisher)
            .await
    }

    /// Runs the relay on a task until [`RelayHandle::shutdown`]: batches back to back
    /// while events wait, then a wait for the next notification (or `poll-interval`);
    /// pauses that double up to `max-backoff` while publishing or the database fails;
    /// sent events removed every `cleanup-interval`.
    pub fn spawn(self) -> RelayHandle {
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(self.run(stopped));
        RelayHandle { stop, task }
    }

    async fn run(self, mut stopped: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(100);
        let mut last_cleanup = Instant::now();
        while !*stopped.borrow() {
            match self.relay_once().await {
                Ok(claimed) => {
                    backoff = Duration::from_millis(100);
                    if claimed < self.config.batch_size {
                        tokio::select! {
                            _ = stopped.changed() => {}
                            _ = self.store.wait_for_rows(self.config.poll_interval) => {}
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "outbox relay failed; retrying");
                    tokio::select! {
                        _ = stopped.changed() => {}
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(self.config.max_backoff);
                }
            }
            if last_cleanup.elapsed() >= self.config.cleanup_interval {
                last_cleanup = Instant::now();
                match self.store.remove_sent(self.config.keep_sent).await {
                    Ok(0) => {}
                    Ok(removed) => tracing::debug!(removed, "removed sent outbox events"),
                    Err(e) => tracing::warn!(error = %e, "could not remove sent outbox events"),
                }
            }
        }
        self.publisher.flush().await;
    }
}

/// A running [`Relay`].
#[derive(Debug)]
pub struct RelayHandle {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl RelayHandle {
    /// Stops after the batch in hand is published and marked, and flushes the producers.
    pub async fn shutdown(self) -> Result<()> {
        let _ = self.stop.send(true);
        self.task.await.map_err(|e| {
            Error::new(ErrorKind::Closed, "the outbox relay task panicked").with_source(e)
        })
    }

    /// Whether the relay task ended (it ends only when shut down, or if it panicked).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

/// The relay's producers, one per binding, made on first use.
struct Sources {
    streams: Streams,
    sources: Mutex<HashMap<String, Source<Bytes>>>,
}

impl Sources {
    async fn source(&self, binding: &str) -> Result<Source<Bytes>> {
        let mut sources = self.sources.lock().await;
        if let Some(source) = sources.get(binding) {
            return Ok(source.clone());
        }
        let source = self.streams.channel(binding)?.source_with(Raw).await?;
        sources.insert(binding.to_owned(), source.clone());
        Ok(source)
    }

    async fn flush(&self) {
        for (binding, source) in self.sources.lock().await.iter() {
            if let Err(e) = source.flush().await {
                tracing::warn!(binding, error = %e, "could not flush the relay's producer");
            }
        }
    }
}

#[async_trait]
impl Publisher for Sources {
    async fn publish(&self, batch: &[Pending]) -> Result<Vec<Rejected>> {
        let mut rejected = Vec::new();
        // Per binding, in batch order (which keeps each key's order).
        let mut per_binding: Vec<(&str, Vec<usize>)> = Vec::new();
        for (index, pending) in batch.iter().enumerate() {
            match per_binding.iter_mut().find(|(b, _)| *b == pending.binding) {
                Some((_, indexes)) => indexes.push(index),
                None => per_binding.push((&pending.binding, vec![index])),
            }
        }
        let mut sends = Vec::new();
        for (binding, indexes) in per_binding {
            let channel = match self.streams.channel(binding) {
                Ok(channel) => channel,
                Err(e) if e.kind() == ErrorKind::MissingBinding => {
                    rejected.extend(indexes.into_iter().map(|index| Rejected {
                        index,
                        reason: e.to_string(),
                    }));
                    continue;
                }
                Err(e) => return Err(e),
            };
            let limit = channel.config().max_payload_bytes;
            let mut messages = Vec::with_capacity(indexes.len());
            for index in indexes {
                let size = batch[index].message.payload().len();
                if size > limit {
                    rejected.push(Rejected {
                        index,
                        reason: format!(
                            "payload of {size} bytes is over binding `{binding}`'s limit of \
                             {limit} bytes (max-payload-bytes)"
                        ),
                    });
                } else {
                    messages.push(batch[index].message.clone());
                }
            }
            if messages.is_empty() {
                continue;
            }
            let source = self.source(binding).await?;
            sends.push(async move { source.send_messages(messages).await });
        }
        for result in futures::future::join_all(sends).await {
            result?;
        }
        for rejection in &rejected {
            tracing::error!(
                binding = %batch[rejection.index].binding,
                reason = %rejection.reason,
                "outbox event can never be published; kept, marked failed"
            );
        }
        Ok(rejected)
    }
}
