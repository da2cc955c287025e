//! The conformance suite: one set of behaviour tests that every binder runs against its
//! real broker.
//!
//! A binder crate implements [`Harness`] and expands [`conformance_suite!`](crate::conformance_suite)
//! in an integration test; every case becomes its own test named `conformance::<case>`:
//!
//! ```ignore
//! struct MemoryHarness;
//!
//! #[async_trait::async_trait]
//! impl stream_core::testing::Harness for MemoryHarness {
//!     async fn binder(&self) -> std::sync::Arc<dyn stream_core::Binder> {
//!         std::sync::Arc::new(binder_memory::MemoryBinder::new())
//!     }
//!     fn capabilities(&self) -> stream_core::testing::Capabilities {
//!         stream_core::testing::Capabilities::default()
//!     }
//! }
//!
//! stream_core::conformance_suite!(Some(MemoryHarness));
//! ```
//!
//! Brokers reached over the network are found through environment variables:
//! [`service_env`] skips a case with a visible message when the variable is unset, and fails
//! it under `CI=true`.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::{
    Binder, BindingConfig, Channel, Consumer, ConsumerOptions, DeliveryTag, Producer, Received,
    Result, RetryConfig,
};

pub mod cases;
mod counting;
mod faults;
mod handling;
pub mod observe;
mod operations;

pub use counting::CountingBinder;
pub use faults::{
    FailingSends, Refusal, RefusingDeadLetters, ShortReceives, REFUSAL, SEND_FAILURE,
};
pub use handling::dedup_on_store;

/// What a binder under test can do; cases that need more are skipped with a message.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Capabilities {
    /// [`Harness::restart_broker`] works: the broker can be killed and restarted in a test.
    pub restart: bool,
    /// [`Received::attempt`](crate::Received) comes from a count the broker keeps per message.
    pub counts_deliveries: bool,
    /// Idle time after which a dead member's deliveries are taken over; the suite sets it on
    /// its bindings and waits at least this long for takeovers.
    pub claim_idle: Duration,
    /// The longest a case waits for an expected delivery.
    pub patience: Duration,
    /// Messages with one key are handled in publish order across the members of a group,
    /// not only within one consumer: the broker gives each key to one member at a time
    /// (Kafka partitions).
    pub orders_keys_across_members: bool,
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities {
            restart: false,
            counts_deliveries: true,
            claim_idle: Duration::from_millis(500),
            patience: Duration::from_secs(30),
            orders_keys_across_members: false,
        }
    }
}

impl Capabilities {
    /// Declares whether the broker can be restarted.
    pub fn restart(mut self, restart: bool) -> Self {
        self.restart = restart;
        self
    }

    /// Declares whether delivery counts come from the broker.
    pub fn counts_deliveries(mut self, counts: bool) -> Self {
        self.counts_deliveries = counts;
        self
    }

    /// Sets the takeover idle time the suite uses.
    pub fn claim_idle(mut self, idle: Duration) -> Self {
        self.claim_idle = idle;
        self
    }

    /// Declares whether one key stays in order across the members of a group.
    pub fn orders_keys_across_members(mut self, ordered: bool) -> Self {
        self.orders_keys_across_members = ordered;
        self
    }

    /// Sets how long a case waits for an expected delivery.
    pub fn patience(mut self, patience: Duration) -> Self {
        self.patience = patience;
        self
    }
}

/// Connects the suite to one binder and its broker.
#[async_trait]
pub trait Harness: Send + Sync + 'static {
    /// A new binder connected to the broker under test. Each call may share the broker but
    /// should be an independent client.
    async fn binder(&self) -> Arc<dyn Binder>;

    /// What the binder can do.
    fn capabilities(&self) -> Capabilities;

    /// Kills the broker and starts it again on the same address with its data, returning
    /// once it accepts connections.
    async fn restart_broker(&self) -> Result<()> {
        Err(crate::Error::new(
            crate::ErrorKind::Broker,
            "this harness cannot restart its broker",
        ))
    }
}

/// Reads the environment variable that locates a test broker. When it is unset, prints a
/// visible skip message and returns `None`; under `CI=true` it panics instead, so that a CI
/// run never passes by skipping a broker suite.
pub fn service_env(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(value) if !value.trim().is_empty() => Some(value),
        _ => {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
            assert!(
                !ci,
                "{var} is not set but CI=true: the broker suite must not be skipped in CI \
                 (run scripts/test.sh, which starts the brokers)"
            );
            skip(&format!(
                "{var} is not set (scripts/test.sh starts the broker and sets it)"
            ));
            None
        }
    }
}

/// Prints a skip notice that `cargo test` shows even for passing tests.
pub fn skip(reason: &str) {
    // Written to the real stderr: the test harness captures print macros only.
    let _ = writeln!(std::io::stderr(), "SKIPPED: {reason}");
}

/// Expands one `#[tokio::test]` per conformance case into a module named `conformance`.
///
/// `$harness` is an expression of type `Option<impl Harness>`, evaluated in each test;
/// `None` skips the test (after [`service_env`] printed why).
#[macro_export]
macro_rules! conformance_suite {
    ($harness:expr) => {
        mod conformance {
            #[allow(unused_imports)]
            use super::*;
            $crate::conformance_suite!(@cases $harness;
                publish_subscribe_keeps_payload_headers_and_key,
                destinations_are_isolated,
                competing_consumers_share_a_group,
                every_group_gets_every_message,
                nack_redelivers,
                retry_then_dead_letter_while_others_flow,
                undecodable_payload_goes_to_dead_letter,
                per_key_order_under_concurrency,
                prefetch_bounds_unacked_deliveries,
                close_and_reopen_in_batches_loses_nothing,
                crashed_member_work_is_taken_over,
                graceful_shutdown_finishes_in_flight,
                concurrent_open_close_loses_nothing,
                producer_close_flushes,
                oversized_payload_is_rejected,
                new_group_start_position,
                partitioned_instances_split_keys_in_order,
                partitioned_single_instance_reads_every_partition,
                broker_restart_mid_stream,
                short_receives_fill_the_window,
                close_and_reopen_keeps_attempts_at_one,
                panicking_handler_is_retried_then_dead_lettered,
                refused_dead_letter_stops_the_subscription_with_the_error,
                refused_dead_letter_stops_the_stream_with_the_error,
                subscription_wait_is_cancel_safe,
                closed_binder_refuses_new_clients,
                slow_handlers_keep_their_deliveries,
                metrics_count_what_happened,
                pause_holds_deliveries_until_resume,
                health_reports_brokers_and_subscriptions,
                trace_context_crosses_the_broker,
                rejected_message_skips_its_remaining_attempts,
                retry_after_replaces_the_backoff,
                handler_timeout_fails_the_attempt,
                service_handlers_run_inside_their_middleware,
                batch_handler_gets_full_batches_in_key_order,
                batch_items_fail_alone_and_keys_stay_in_order,
                failed_batches_dead_letter_each_message,
                processor_publishes_then_acknowledges,
                pulled_deliveries_can_be_rejected,
                admin_reads_without_joining_a_group,
                dead_letters_are_listed_and_sent_back,
                message_ids_stay_with_their_message,
                dedup_skips_ids_its_group_handled,
            );
        }
    };
    (@cases $harness:expr; $($case:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let exclusive = stringify!($case) == "broker_restart_mid_stream";
                let _broker = $crate::testing::broker_lock(exclusive).await;
                if let Some(harness) = $harness {
                    $crate::testing::cases::$case(&harness).await;
                }
            }
        )*
    };
}

/// Held by every case for its whole run: shared by ordinary cases, exclusive by cases that
/// restart the broker, so that a restart never fails a case running beside it.
pub enum BrokerGuard {
    /// Other ordinary cases may run.
    Shared(tokio::sync::RwLockReadGuard<'static, ()>),
    /// Nothing else runs.
    Exclusive(tokio::sync::RwLockWriteGuard<'static, ()>),
}

/// Takes the process-wide broker lock; see [`BrokerGuard`]. Test files that restart a
/// broker take it exclusively too.
pub async fn broker_lock(exclusive: bool) -> BrokerGuard {
    static LOCK: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());
    if exclusive {
        BrokerGuard::Exclusive(LOCK.write().await)
    } else {
        BrokerGuard::Shared(LOCK.read().await)
    }
}

/// A destination or group name no other test run uses.
pub fn unique(name: &str) -> String {
    format!("conf-{name}-{}", crate::unique_suffix())
}

/// The binding the cases start from: fast retries, the harness's takeover time.
pub fn test_binding(destination: &str, caps: &Capabilities) -> BindingConfig {
    BindingConfig::new(destination)
        .retry(RetryConfig {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(100),
            multiplier: 2.0,
        })
        .claim_idle(caps.claim_idle)
        .shutdown_timeout(Duration::from_secs(20))
}

/// A channel on `binder` for `config`.
pub fn channel(binder: &Arc<dyn Binder>, config: BindingConfig) -> Channel {
    Channel::new("conformance", binder.clone(), config)
}

/// Polls `condition` every 5 ms until it holds, panicking with `what` after `timeout`.
pub async fn wait_until(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Counts how often each message number was handled, to prove nothing was lost and to
/// report duplicates.
#[derive(Default, Clone)]
pub struct Tally {
    seen: Arc<Mutex<HashMap<u64, u32>>>,
    total: Arc<AtomicUsize>,
}

impl Tally {
    /// A new, empty tally.
    pub fn new() -> Self {
        Tally::default()
    }

    /// Records one handling of `n`.
    pub fn record(&self, n: u64) {
        *self.seen.lock().unwrap().entry(n).or_default() += 1;
        self.total.fetch_add(1, Ordering::SeqCst);
    }

    /// Distinct numbers recorded.
    pub fn distinct(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// Whether every number in `expected` was recorded at least once.
    pub fn has_all(&self, expected: impl IntoIterator<Item = u64>) -> bool {
        let seen = self.seen.lock().unwrap();
        expected.into_iter().all(|n| seen.contains_key(&n))
    }

    /// Asserts that nothing in `expected` was lost and nothing unexpected appeared; prints
    /// and returns the number of duplicate handlings.
    pub fn assert_complete(&self, case: &str, expected: impl IntoIterator<Item = u64>) -> usize {
        let expected: HashSet<u64> = expected.into_iter().collect();
        let seen = self.seen.lock().unwrap();
        let lost: Vec<u64> = expected
            .iter()
            .filter(|n| !seen.contains_key(n))
            .copied()
            .collect();
        let foreign: Vec<u64> = seen
            .keys()
            .filter(|n| !expected.contains(n))
            .copied()
            .collect();
        let duplicates: usize = seen.values().map(|c| (*c as usize).saturating_sub(1)).sum();
        let _ = writeln!(
            std::io::stderr(),
            "{case}: expected {}, handled {} distinct, lost {}, duplicates {duplicates}",
            expected.len(),
            seen.len(),
            lost.len()
        );
        assert!(
            lost.is_empty(),
            "{case}: lost {} messages: {lost:?}",
            lost.len()
        );
        assert!(
            foreign.is_empty(),
            "{case}: unexpected messages {foreign:?}"
        );
        duplicates
    }
}

/// Receives from a raw consumer until `want` deliveries arrived or `timeout` passed.
pub async fn receive_at_least(
    consumer: &dyn Consumer,
    want: usize,
    timeout: Duration,
) -> Vec<Received> {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(timeout, async {
        while got.len() < want {
            got.extend(consumer.receive(want - got.len()).await.unwrap_or_default());
        }
    })
    .await;
    got
}

/// Acknowledges raw deliveries.
pub async fn ack_all(consumer: &dyn Consumer, received: &[Received]) {
    let tags: Vec<DeliveryTag> = received.iter().map(|r| r.tag).collect();
    consumer.ack(&tags).await.expect("ack");
}

/// Opens a raw consumer in `group`.
pub async fn raw_consumer(
    binder: &Arc<dyn Binder>,
    destination: &str,
    group: &str,
    caps: &Capabilities,
) -> Box<dyn Consumer> {
    binder
        .consumer(
            destination,
            &ConsumerOptions::new(group)
                .claim_idle(caps.claim_idle)
                .prefetch(64),
        )
        .await
        .expect("consumer opens")
}

/// Opens a raw producer.
pub async fn raw_producer(binder: &Arc<dyn Binder>, destination: &str) -> Box<dyn Producer> {
    binder.producer(destination).await.expect("producer opens")
}
