//! [`MemoryBinder`] and its producer and consumer.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{de::DeserializeOwned, Serialize};
use stream_core::{
    header, Binder, Consumer, ConsumerOptions, DeliveryTag, Error, ErrorKind, Message, Producer,
    Received, Result,
};

use crate::config::MemoryConfig;
use crate::log::{Log, Logs};

/// An in-process broker with the delivery contract of a real one: a retained log per
/// destination, consumer groups with their own positions, un-acknowledged deliveries that
/// come back when their consumer goes away, earliest/latest start for new groups.
///
/// Clones share one broker, so a test can keep a clone to feed and inspect destinations
/// while the service under test uses another through its configuration. Each clone is a
/// client of its own: [`Binder::close`] closes that handle only.
#[derive(Default)]
pub struct MemoryBinder {
    broker: Arc<Broker>,
    /// Per handle, not per broker: closing the service's handle leaves a test's clone open.
    closed: AtomicBool,
}

impl Clone for MemoryBinder {
    /// Another handle on the same broker, open whatever the state of this one.
    fn clone(&self) -> Self {
        MemoryBinder {
            broker: self.broker.clone(),
            closed: AtomicBool::new(false),
        }
    }
}

#[derive(Default)]
struct Broker {
    config: MemoryConfig,
    logs: Logs,
    next_consumer: AtomicU64,
}

impl fmt::Debug for MemoryBinder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBinder")
            .field("config", &self.broker.config)
            .finish_non_exhaustive()
    }
}

impl MemoryBinder {
    /// A new, empty broker with default settings.
    pub fn new() -> Self {
        MemoryBinder::default()
    }

    /// A new, empty broker.
    pub fn with_config(config: MemoryConfig) -> Self {
        MemoryBinder {
            broker: Arc::new(Broker {
                config,
                ..Broker::default()
            }),
            closed: AtomicBool::new(false),
        }
    }

    fn append(&self, destination: &str, message: Message) -> String {
        self.append_all(destination, vec![message])
            .pop()
            .unwrap_or_default()
    }

    /// Appends under one lock and wakes consumers once.
    fn append_all(&self, destination: &str, messages: Vec<Message>) -> Vec<String> {
        let log = self.broker.logs.get(destination);
        let ids = {
            let mut state = log.lock();
            messages
                .into_iter()
                .map(|m| state.append(m, self.broker.config.retention).to_string())
                .collect()
        };
        log.changed.notify_waiters();
        ids
    }

    /// Test helper: publishes `value` as JSON to `destination`, as a service's source would.
    pub fn send_json<T: Serialize>(&self, destination: &str, value: &T) -> String {
        let payload = serde_json::to_vec(value).expect("value serializes to JSON");
        self.send_message(
            destination,
            Message::new(payload).with_header(header::CONTENT_TYPE, "application/json"),
        )
    }

    /// Test helper: publishes a prepared message to `destination`.
    pub fn send_message(&self, destination: &str, message: Message) -> String {
        self.append(destination, message)
    }

    /// Test helper: every message retained in `destination`, oldest first.
    pub fn messages(&self, destination: &str) -> Vec<Message> {
        self.broker.logs.get(destination).lock().snapshot()
    }

    /// Test helper: waits until `destination` holds at least `count` messages and returns
    /// the first `count`, or fails with [`ErrorKind::Timeout`] saying how many arrived.
    pub async fn wait_for_messages(
        &self,
        destination: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<Message>> {
        let log = self.broker.logs.get(destination);
        let wait = async {
            loop {
                let changed = log.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                {
                    let state = log.lock();
                    let all = state.snapshot();
                    if all.len() >= count {
                        return all.into_iter().take(count).collect::<Vec<_>>();
                    }
                }
                changed.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.map_err(|_| {
            Error::new(
                ErrorKind::Timeout,
                format!(
                    "`{destination}` holds {} messages after {timeout:?}; expected {count}",
                    self.messages(destination).len()
                ),
            )
        })
    }

    /// Test helper: like [`wait_for_messages`](Self::wait_for_messages), decoding each
    /// payload as JSON.
    pub async fn wait_for_json<T: DeserializeOwned>(
        &self,
        destination: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<Vec<T>> {
        self.wait_for_messages(destination, count, timeout)
            .await?
            .iter()
            .map(|m| {
                serde_json::from_slice(m.payload()).map_err(|e| {
                    Error::new(
                        ErrorKind::Codec,
                        format!("message {} is not the expected JSON", m.id()),
                    )
                    .with_source(e)
                })
            })
            .collect()
    }

    /// Test helper: the messages of a dead-letter destination (`<destination>.dlq` unless the
    /// binding names another).
    pub fn dead_letters(&self, dead_letter_destination: &str) -> Vec<Message> {
        self.messages(dead_letter_destination)
    }

    /// Test helper: deliveries of `group` on `destination` not yet acknowledged.
    pub fn pending(&self, destination: &str, group: &str) -> usize {
        self.broker.logs.get(destination).lock().pending(group)
    }
}

#[async_trait]
impl Binder for MemoryBinder {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn producer(&self, destination: &str) -> Result<Box<dyn Producer>> {
        self.check_open()?;
        Ok(Box::new(MemoryProducer {
            binder: self.clone(),
            destination: destination.to_owned(),
            closed: AtomicBool::new(false),
        }))
    }

    async fn consumer(
        &self,
        destination: &str,
        options: &ConsumerOptions,
    ) -> Result<Box<dyn Consumer>> {
        self.check_open()?;
        let log = self.broker.logs.get(destination);
        log.lock().join(&options.group, options.start_from);
        Ok(Box::new(MemoryConsumer {
            log,
            group: options.group.clone(),
            durable: options.durable,
            id: self.broker.next_consumer.fetch_add(1, Ordering::Relaxed),
            closed: AtomicBool::new(false),
        }))
    }

    /// Refused: the broker lives inside the process that made it, so another process (the
    /// `stream` command line, say) has nothing to connect to. Tests inspect it through
    /// [`MemoryBinder::messages`] and its other helpers instead.
    async fn admin(&self) -> Result<Arc<dyn stream_core::admin::Admin>> {
        Err(stream_core::Error::new(
            stream_core::ErrorKind::Unsupported,
            "the memory binder's messages live inside the process that made them; another \
             process cannot inspect them (use a Redis or Kafka binding for that)",
        ))
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        Ok(())
    }
}

impl MemoryBinder {
    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::new(ErrorKind::Closed, "the memory binder is closed"));
        }
        Ok(())
    }
}

struct MemoryProducer {
    binder: MemoryBinder,
    destination: String,
    closed: AtomicBool,
}

#[async_trait]
impl Producer for MemoryProducer {
    async fn send(&self, message: Message) -> Result<String> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::new(
                ErrorKind::Closed,
                format!("producer for `{}` is closed", self.destination),
            ));
        }
        self.check_open()?;
        Ok(self.binder.append(&self.destination, message))
    }

    async fn send_batch(&self, messages: Vec<Message>) -> Result<Vec<String>> {
        self.check_open()?;
        Ok(self.binder.append_all(&self.destination, messages))
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        Ok(())
    }
}

impl MemoryProducer {
    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::new(
                ErrorKind::Closed,
                format!("producer for `{}` is closed", self.destination),
            ));
        }
        Ok(())
    }
}

struct MemoryConsumer {
    log: Arc<Log>,
    group: String,
    durable: bool,
    id: u64,
    closed: AtomicBool,
}

#[async_trait]
impl Consumer for MemoryConsumer {
    async fn receive(&self, max: usize) -> Result<Vec<Received>> {
        loop {
            if self.closed.load(Ordering::Acquire) {
                return Err(Error::new(ErrorKind::Closed, "consumer is closed"));
            }
            // Registered before looking, so an append between the look and the wait wakes us.
            let changed = self.log.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            // Taking happens without an await, so dropping this future loses nothing.
            let taken = self.log.lock().take(&self.group, self.id, max);
            if !taken.is_empty() {
                return Ok(taken
                    .into_iter()
                    .map(|t| Received::new(t.message, DeliveryTag(0, t.offset), t.attempt))
                    .collect());
            }
            changed.await;
        }
    }

    async fn ack(&self, tags: &[DeliveryTag]) -> Result<()> {
        self.log
            .lock()
            .ack(&self.group, self.id, tags.iter().map(|t| t.1));
        Ok(())
    }

    async fn release(&self, tags: &[DeliveryTag]) -> Result<()> {
        self.log
            .lock()
            .release(&self.group, self.id, tags.iter().map(|t| t.1));
        self.log.changed.notify_waiters();
        Ok(())
    }

    async fn lag(&self) -> Result<Option<u64>> {
        Ok(Some(self.log.lock().unfinished(&self.group)))
    }

    async fn retrying(&self, tag: DeliveryTag, attempt: u32) -> Result<()> {
        self.log
            .lock()
            .record_attempt(&self.group, self.id, tag.1, attempt);
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        self.leave();
        Ok(())
    }
}

impl MemoryConsumer {
    fn leave(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            self.log.lock().leave(&self.group, self.id, self.durable);
            self.log.changed.notify_waiters();
        }
    }
}

impl Drop for MemoryConsumer {
    // A consumer dropped without close is a crashed member: its deliveries go back.
    fn drop(&mut self) {
        self.leave();
    }
}
