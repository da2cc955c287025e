//! What `Streams::health` reports: whether each binder's broker answers, and what each
//! subscription is doing.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use crate::{Error, ErrorKind};

/// What a subscription is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SubscriptionState {
    /// Fetching and handling.
    Running,
    /// Paused by [`Subscription::pause`](crate::Subscription::pause): nothing new is
    /// fetched or started; what it holds stays held.
    Paused,
    /// The broker failed a fetch with a temporary error; the consumer retries with backoff.
    Reconnecting {
        /// When the first of the failures in a row happened.
        since: SystemTime,
        /// The last failure.
        reason: String,
    },
    /// Shut down.
    Stopped,
    /// Ended by an error (the one [`Subscription::wait`](crate::Subscription::wait) returns).
    Failed {
        /// The error's kind.
        kind: ErrorKind,
        /// The error, as text.
        error: String,
    },
}

/// A subscription's state as health checks see it, shared with the subscription's tasks.
#[derive(Debug)]
pub(crate) struct Status {
    binding: String,
    group: String,
    state: Mutex<SubscriptionState>,
}

impl Status {
    pub(crate) fn new(binding: &str, group: &str) -> Status {
        Status {
            binding: binding.to_owned(),
            group: group.to_owned(),
            state: Mutex::new(SubscriptionState::Running),
        }
    }

    pub(crate) fn get(&self) -> SubscriptionState {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn set(&self, state: SubscriptionState) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = state;
    }

    /// A fetch failed with a temporary error: reconnecting, since the first failure in a row.
    pub(crate) fn reconnecting(&self, error: &Error) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let since = match &*state {
            SubscriptionState::Reconnecting { since, .. } => *since,
            _ => SystemTime::now(),
        };
        *state = SubscriptionState::Reconnecting {
            since,
            reason: error.to_string(),
        };
    }

    /// A fetch worked: back to running, unless paused meanwhile.
    pub(crate) fn reconnected(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(*state, SubscriptionState::Reconnecting { .. }) {
            *state = SubscriptionState::Running;
        }
    }

    pub(crate) fn ended(&self, result: &crate::Result<()>) {
        self.set(match result {
            Ok(()) => SubscriptionState::Stopped,
            Err(e) => SubscriptionState::Failed {
                kind: e.kind(),
                error: e.to_string(),
            },
        });
    }

    fn health(&self) -> SubscriptionHealth {
        SubscriptionHealth {
            binding: self.binding.clone(),
            group: self.group.clone(),
            state: self.get(),
        }
    }
}

/// The subscriptions made through one [`Streams`](crate::Streams), for health checks.
#[derive(Debug, Default)]
pub(crate) struct Subscriptions {
    statuses: Mutex<Vec<Weak<Status>>>,
}

impl Subscriptions {
    pub(crate) fn add(&self, status: &Arc<Status>) {
        let mut statuses = self.statuses.lock().unwrap_or_else(|p| p.into_inner());
        statuses.retain(|status| status.strong_count() > 0);
        statuses.push(Arc::downgrade(status));
    }

    pub(crate) fn health(&self) -> Vec<SubscriptionHealth> {
        let mut statuses = self.statuses.lock().unwrap_or_else(|p| p.into_inner());
        statuses.retain(|status| status.strong_count() > 0);
        statuses
            .iter()
            .filter_map(Weak::upgrade)
            .map(|status| status.health())
            .collect()
    }
}

/// The health of every binder and subscription of a [`Streams`](crate::Streams).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Health {
    /// One per binder, in name order.
    pub binders: Vec<BinderHealth>,
    /// One per live subscription made through the `Streams`.
    pub subscriptions: Vec<SubscriptionHealth>,
}

impl Health {
    /// Whether every broker answered and no subscription is reconnecting or failed: what a
    /// readiness probe wants.
    pub fn is_healthy(&self) -> bool {
        self.binders.iter().all(|b| b.error.is_none())
            && self.subscriptions.iter().all(|s| {
                !matches!(
                    s.state,
                    SubscriptionState::Reconnecting { .. } | SubscriptionState::Failed { .. }
                )
            })
    }
}

/// Whether one binder's broker answered.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct BinderHealth {
    /// The binder's name in the configuration.
    pub name: String,
    /// Its type (`memory`, `redis`, `kafka`).
    pub kind: &'static str,
    /// How long the check took.
    pub latency: Duration,
    /// Why the broker did not answer; `None` when it did.
    pub error: Option<String>,
}

/// What one subscription is doing.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SubscriptionHealth {
    /// The binding it consumes.
    pub binding: String,
    /// Its consumer group.
    pub group: String,
    /// What it is doing.
    pub state: SubscriptionState,
}
