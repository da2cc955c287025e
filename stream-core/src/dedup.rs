//! Idempotent consumers: a delivery whose message id its group already handled is
//! acknowledged without calling the handler again (binding key `dedup`, see
//! [`DedupConfig`](crate::config::DedupConfig)).
//!
//! The check and the mark are a layer around the handler, like the timeout: the engine
//! knows nothing of them.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::FutureExt;

use crate::handler::{Attempt, Handle};
use crate::sink::Envelope;
use crate::Result;

/// Where an idempotent consumer keeps the message ids its group handled.
#[async_trait]
pub trait DedupStore: Send + Sync + 'static {
    /// Whether `id` was marked handled in `scope` (a group on a destination) and has not
    /// expired.
    async fn handled(&self, scope: &str, id: &str) -> Result<bool>;

    /// Marks `id` handled in `scope` for `ttl`.
    async fn mark(&self, scope: &str, id: &str, ttl: Duration) -> Result<()>;
}

/// The scope under which a group's handled ids are kept: ids are remembered per group
/// and destination, so two groups of one destination each handle every message once.
pub fn scope(group: &str, destination: &str) -> String {
    format!("{group}/{destination}")
}

/// Ids kept in this process's memory: for tests and single-instance services. Shared by
/// every binding of the process that names `store = "memory"`.
#[derive(Debug, Default)]
pub struct MemoryDedup {
    ids: Mutex<Ids>,
}

#[derive(Debug, Default)]
struct Ids {
    until: HashMap<(String, String), Instant>,
    /// The size at which expired ids are next swept out: twice what the last sweep left,
    /// so that sweeping costs O(1) per mark however many ids are kept.
    sweep_at: usize,
}

/// The process's [`MemoryDedup`].
pub(crate) static MEMORY: LazyLock<Arc<MemoryDedup>> = LazyLock::new(Arc::default);

#[async_trait]
impl DedupStore for MemoryDedup {
    async fn handled(&self, scope: &str, id: &str) -> Result<bool> {
        let ids = self
            .ids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = (scope.to_owned(), id.to_owned());
        Ok(ids
            .until
            .get(&key)
            .is_some_and(|until| *until > Instant::now()))
    }

    async fn mark(&self, scope: &str, id: &str, ttl: Duration) -> Result<()> {
        let mut ids = self
            .ids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        // Expired ids go when new ones come, so the map holds about `ttl` worth of ids.
        if ids.until.len() >= ids.sweep_at {
            ids.until.retain(|_, until| *until > now);
            ids.sweep_at = (2 * ids.until.len()).max(1024);
        }
        ids.until
            .insert((scope.to_owned(), id.to_owned()), now + ttl);
        Ok(())
    }
}

/// The layer: skips handled ids, marks successes.
pub(crate) struct Dedup<T> {
    pub(crate) inner: Arc<dyn Handle<Envelope<T>>>,
    pub(crate) store: Arc<dyn DedupStore>,
    pub(crate) scope: Arc<str>,
    pub(crate) ttl: Duration,
}

impl<T: Send + 'static> Handle<Envelope<T>> for Dedup<T> {
    fn handle(&self, envelope: Envelope<T>) -> Attempt {
        let Some(id) = envelope.message().message_id().map(str::to_owned) else {
            // A message from a producer that sets no id cannot be told apart: handled as is.
            return self.inner.handle(envelope);
        };
        let (store, scope, ttl) = (self.store.clone(), self.scope.clone(), self.ttl);
        let inner = self.inner.clone();
        async move {
            if store.handled(&scope, &id).await? {
                tracing::debug!(%id, scope = %scope, "already handled; acknowledged without handling");
                return Ok(());
            }
            inner.handle(envelope).await?;
            if let Err(e) = store.mark(&scope, &id, ttl).await {
                // The handler's work is done: failing now would run it again. The id goes
                // unmarked, so a later copy of the message is handled again.
                tracing::warn!(%id, scope = %scope, error = %e, "could not mark the message handled");
            }
            Ok(())
        }
        .boxed()
    }
}
