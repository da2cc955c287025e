//! An outbox in this process's memory, for unit tests and the demo: the same contract as the
//! PostgreSQL one (events appear when their transaction commits, are relayed in commit
//! order per key, and are kept until sent), without a database and without durability.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::Serialize;
use stream_core::{Message, Result};
use tokio::sync::Notify;

use crate::relay::{OutboxStore, Pending, Publisher};

/// An outbox in memory. Clones share the events.
///
/// ```
/// # fn doc() -> stream_core::Result<()> {
/// let outbox = stream_outbox::MemoryOutbox::new();
/// let mut tx = outbox.transaction();
/// tx.send("orders-out", "7", &"placed")?;
/// assert_eq!(outbox.unsent(), 0); // not committed yet
/// tx.commit();
/// assert_eq!(outbox.unsent(), 1);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
pub struct MemoryOutbox {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    events: Mutex<Vec<Event>>,
    committed: Notify,
    /// One relay at a time: enough for a single process.
    relaying: tokio::sync::Mutex<()>,
}

#[derive(Debug)]
struct Event {
    pending: Pending,
    sent_at: Option<Instant>,
    failure: Option<String>,
}

impl MemoryOutbox {
    /// An empty outbox.
    pub fn new() -> MemoryOutbox {
        MemoryOutbox::default()
    }

    /// Starts a transaction: what it sends appears at [`commit`](MemoryTransaction::commit),
    /// all at once, or never if it is dropped.
    pub fn transaction(&self) -> MemoryTransaction {
        MemoryTransaction {
            outbox: self.clone(),
            events: Vec::new(),
        }
    }

    /// How many committed events wait to be published (failed ones not counted).
    pub fn unsent(&self) -> usize {
        self.events()
            .iter()
            .filter(|e| e.sent_at.is_none() && e.failure.is_none())
            .count()
    }

    /// The events that can never be published, with the reason.
    pub fn failed(&self) -> Vec<(Pending, String)> {
        self.events()
            .iter()
            .filter_map(|e| Some((e.pending.clone(), e.failure.clone()?)))
            .collect()
    }

    fn events(&self) -> std::sync::MutexGuard<'_, Vec<Event>> {
        self.shared
            .events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Events written together, appearing together. Dropping it discards them (a rollback).
#[derive(Debug)]
pub struct MemoryTransaction {
    outbox: MemoryOutbox,
    events: Vec<Pending>,
}

impl MemoryTransaction {
    /// Like [`Outbox::send`](crate::Outbox::send): `event` as JSON under `key`, for
    /// `binding`. Returns its message id.
    pub fn send<T: Serialize + ?Sized>(
        &mut self,
        binding: &str,
        key: &str,
        event: &T,
    ) -> Result<String> {
        let message = crate::json_message(event)?.with_key(key);
        Ok(self.send_message(binding, message))
    }

    /// Like [`Outbox::send_message`](crate::Outbox::send_message).
    pub fn send_message(&mut self, binding: &str, mut message: Message) -> String {
        let id = crate::message_id_of(&message);
        let _ = crate::write_span(binding, &mut message, &id);
        let message = if message.message_id().is_none() {
            message.with_header(stream_core::header::MESSAGE_ID, id.clone())
        } else {
            message
        };
        self.events.push(Pending::new(binding, message));
        id
    }

    /// Makes the events visible to relays.
    pub fn commit(self) {
        if self.events.is_empty() {
            return;
        }
        self.outbox
            .events()
            .extend(self.events.into_iter().map(|pending| Event {
                pending,
                sent_at: None,
                failure: None,
            }));
        self.outbox.shared.committed.notify_one();
    }
}

#[async_trait]
impl OutboxStore for MemoryOutbox {
    async fn relay(&self, limit: usize, publisher: &dyn Publisher) -> Result<usize> {
        let _one_relay = self.shared.relaying.lock().await;
        let (positions, batch): (Vec<usize>, Vec<Pending>) = self
            .events()
            .iter()
            .enumerate()
            .filter(|(_, e)| e.sent_at.is_none() && e.failure.is_none())
            .take(limit)
            .map(|(position, e)| (position, e.pending.clone()))
            .unzip();
        if batch.is_empty() {
            return Ok(0);
        }
        let rejected = publisher.publish(&batch).await?;
        let now = Instant::now();
        let mut events = self.events();
        for &position in &positions {
            events[position].sent_at = Some(now);
        }
        for rejection in rejected {
            let event = &mut events[positions[rejection.index]];
            event.sent_at = None;
            event.failure = Some(rejection.reason);
        }
        Ok(batch.len())
    }

    async fn wait_for_rows(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.shared.committed.notified()).await;
    }

    async fn remove_sent(&self, older_than: Duration) -> Result<u64> {
        // Removing shifts positions: under the relay lock, so no batch holds them.
        let _one_relay = self.shared.relaying.lock().await;
        let mut events = self.events();
        let before = events.len();
        events.retain(|e| e.sent_at.is_none_or(|at| at.elapsed() < older_than));
        Ok((before - events.len()) as u64)
    }
}
