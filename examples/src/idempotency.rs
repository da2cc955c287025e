//! A `tower` layer of the examples' own: skips deliveries whose message id was already
//! handled, so a redelivered message (after a crash between handling and the ack, or a
//! takeover by another member) does not run the handler twice in this process.
//!
//! ```
//! use stream_core::{handler_fn, Envelope};
//! use stream_examples::idempotency::SkipSeenLayer;
//! use tower::ServiceBuilder;
//!
//! let handler = ServiceBuilder::new()
//!     .layer(SkipSeenLayer::new(10_000))
//!     .service(handler_fn(|event: Envelope<String>| async move {
//!         println!("{}", event.payload());
//!         Ok::<(), std::io::Error>(())
//!     }));
//! // sink.subscribe_service(handler).await?
//! # let _ = handler;
//! ```
//!
//! A set in memory is per process: a real service keeps the ids where its results are (the
//! same database transaction), which is what the outbox and dedup work of the roadmap does.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use stream_core::{BoxError, Envelope};
use tower_layer::Layer;
use tower_service::Service;

/// Wraps a handler in [`SkipSeen`].
#[derive(Debug, Clone)]
pub struct SkipSeenLayer {
    seen: Arc<Mutex<Seen>>,
}

impl SkipSeenLayer {
    /// Remembers the last `capacity` handled ids.
    pub fn new(capacity: usize) -> Self {
        SkipSeenLayer {
            seen: Arc::new(Mutex::new(Seen {
                ids: HashSet::new(),
                order: VecDeque::new(),
                capacity: capacity.max(1),
                skipped: 0,
            })),
        }
    }

    /// Deliveries skipped so far because their id was handled before.
    pub fn skipped(&self) -> usize {
        self.seen.lock().unwrap().skipped
    }
}

impl<S> Layer<S> for SkipSeenLayer {
    type Service = SkipSeen<S>;

    fn layer(&self, inner: S) -> SkipSeen<S> {
        SkipSeen {
            inner,
            seen: self.seen.clone(),
        }
    }
}

/// The ids handled, oldest first out.
#[derive(Debug)]
struct Seen {
    ids: HashSet<Arc<str>>,
    order: VecDeque<Arc<str>>,
    capacity: usize,
    skipped: usize,
}

impl Seen {
    fn remember(&mut self, id: Arc<str>) {
        if self.ids.insert(id.clone()) {
            self.order.push_back(id);
            if self.order.len() > self.capacity {
                if let Some(oldest) = self.order.pop_front() {
                    self.ids.remove(&oldest);
                }
            }
        }
    }
}

/// A handler that runs only for message ids it has not handled successfully before; a
/// seen id is acknowledged without calling it. Clones share the set.
#[derive(Debug, Clone)]
pub struct SkipSeen<S> {
    inner: S,
    seen: Arc<Mutex<Seen>>,
}

impl<S, T> Service<Envelope<T>> for SkipSeen<S>
where
    S: Service<Envelope<T>, Response = ()>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = ();
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<(), BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, envelope: Envelope<T>) -> Self::Future {
        let id: Arc<str> = envelope.message().id().into();
        {
            let mut seen = self.seen.lock().unwrap();
            if seen.ids.contains(&id) {
                seen.skipped += 1;
                tracing::debug!(%id, "already handled; acknowledged without handling again");
                return Box::pin(async { Ok(()) });
            }
        }
        let handled = self.inner.call(envelope);
        let seen = self.seen.clone();
        Box::pin(async move {
            handled.await.map_err(Into::into)?;
            // Only a success is remembered: a failed attempt must run again.
            seen.lock().unwrap().remember(id);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_ids_are_forgotten_past_the_capacity() {
        let mut seen = Seen {
            ids: HashSet::new(),
            order: VecDeque::new(),
            capacity: 2,
            skipped: 0,
        };
        for id in ["a", "b", "a", "c"] {
            seen.remember(id.into());
        }
        assert!(!seen.ids.contains("a") && seen.ids.contains("b") && seen.ids.contains("c"));
        assert_eq!(seen.order.len(), 2);
    }
}
