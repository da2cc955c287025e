//! Shared by the Kafka test binaries: finding the broker, test-sized settings, accounting,
//! and writing records whose bytes rdkafka cannot write ([`wire`]).
#![allow(dead_code)]

pub mod wire;

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

/// The member ids a consumer group had, sampled every 100 ms by a client that does not join
/// it. A member that is evicted and joins again comes back under a new id, so more ids than
/// members means someone was thrown out of the group.
pub struct GroupWatch {
    seen: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sampler: std::thread::JoinHandle<()>,
}

impl GroupWatch {
    pub fn start(brokers: &str, group: &str) -> GroupWatch {
        use rdkafka::consumer::{BaseConsumer, Consumer as _};
        use std::sync::atomic::Ordering;
        let client: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()
            .expect("a metadata client");
        let seen = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sampler = {
            let (seen, stop, group) = (seen.clone(), stop.clone(), group.to_owned());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(groups) =
                        client.fetch_group_list(Some(&group), Duration::from_secs(2))
                    {
                        let mut seen = seen.lock().unwrap();
                        for info in groups.groups() {
                            for member in info.members() {
                                seen.insert(member.id().to_owned());
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        GroupWatch {
            seen,
            stop,
            sampler,
        }
    }

    /// Every member id seen so far.
    pub fn members(&self) -> std::collections::BTreeSet<String> {
        self.seen.lock().unwrap().clone()
    }

    /// Stops sampling and returns every member id seen.
    pub fn finish(self) -> std::collections::BTreeSet<String> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.sampler.join();
        let seen = self.seen.lock().unwrap().clone();
        seen
    }
}

/// Adds partitions to `topic` until it has `total`, and waits until metadata shows them all.
pub async fn grow_topic(brokers: &str, topic: &str, total: usize) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("an admin client");
    let results = admin
        .create_partitions(&[NewPartitions::new(topic, total)], &AdminOptions::new())
        .await
        .expect("create partitions");
    for result in results {
        result.expect("partitions added");
    }
    assert!(
        eventually(Duration::from_secs(30), || async {
            partition_count(brokers, topic).await == total
        })
        .await,
        "{topic} never showed {total} partitions"
    );
}

/// The partitions `topic` has, as metadata reports them (0 when it does not exist).
pub async fn partition_count(brokers: &str, topic: &str) -> usize {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    let client: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("a metadata client");
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        client
            .fetch_metadata(Some(&topic), Duration::from_secs(5))
            .map(|metadata| {
                metadata
                    .topics()
                    .iter()
                    .filter(|t| t.name() == topic && t.error().is_none())
                    .map(|t| t.partitions().len())
                    .sum()
            })
            .unwrap_or(0)
    })
    .await
    .unwrap()
}
