//! Shared by the Kafka test binaries: finding the broker, test-sized settings, accounting.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::time::{Duration, Instant};

use binder_kafka::{KafkaBinder, KafkaConfig};

/// The broker under test, from `STREAM_TEST_KAFKA_BROKERS`. Unset: the test is skipped with a
/// message, except under `CI=true`, where that is a failure.
pub fn brokers(test: &str) -> Option<String> {
    match std::env::var("STREAM_TEST_KAFKA_BROKERS") {
        Ok(brokers) if !brokers.trim().is_empty() => Some(brokers),
        _ => {
            skip_or_fail(test, "STREAM_TEST_KAFKA_BROKERS is not set");
            None
        }
    }
}

/// Reports a skipped test; under `CI=true` a skip is a failure.
pub fn skip_or_fail(test: &str, why: &str) {
    if std::env::var("CI").is_ok_and(|ci| ci == "true" || ci == "1") {
        panic!("{test}: {why}, and CI=true does not allow skipping (run scripts/test.sh)");
    }
    // Straight to stderr: the test harness captures `eprintln!` of passing tests.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: kafka test {test}: {why} (scripts/test.sh starts a broker and sets it)"
    );
}

/// Settings for tests: small session timeouts so departures are noticed fast, frequent
/// commits so committed offsets are observable quickly.
pub fn config(brokers: &str) -> KafkaConfig {
    let mut config = KafkaConfig::new(brokers)
        .consumer_property("session.timeout.ms", "6000")
        .consumer_property("heartbeat.interval.ms", "1000");
    config.commit_interval = Duration::from_millis(100);
    config.partitions = 2;
    config
}

pub fn binder(brokers: &str) -> KafkaBinder {
    KafkaBinder::new(config(brokers)).expect("valid test settings")
}

/// A topic or group name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", stream_core::unique_suffix())
}

/// Polls `check` until it returns true or `limit` passes; returns whether it did.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How often each expected id was seen: lost ones (0) and duplicates (> 1).
pub struct Accounting {
    pub lost: Vec<u64>,
    pub duplicates: usize,
    pub unexpected: usize,
}

pub fn account(expected: impl IntoIterator<Item = u64>, seen: &BTreeMap<u64, usize>) -> Accounting {
    let expected: Vec<u64> = expected.into_iter().collect();
    let lost = expected
        .iter()
        .copied()
        .filter(|id| seen.get(id).copied().unwrap_or(0) == 0)
        .collect();
    let duplicates = seen.values().map(|n| n.saturating_sub(1)).sum();
    let unexpected = seen.keys().filter(|id| !expected.contains(id)).count();
    Accounting {
        lost,
        duplicates,
        unexpected,
    }
}
