//! Shared by the outbox and dedup tests: the brokers and the database under test, and the
//! accounting of what a consumer saw.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use stream_core::testing::service_env;
use stream_core::{Envelope, Streams};
use tokio_postgres::{Client, NoTls};

/// A broker the tests publish through: its name and the body of its `[binders.broker]`.
pub struct Broker {
    pub name: &'static str,
    pub binder: String,
}

/// Memory always; Redis and Kafka when the test environment has them (skipped with a
/// message otherwise, and a failure under `CI=true`).
pub fn brokers() -> Vec<Broker> {
    let mut brokers = vec![Broker {
        name: "memory",
        binder: r#"type = "memory""#.into(),
    }];
    if let Some(url) = service_env("STREAM_TEST_REDIS_URL") {
        brokers.push(Broker {
            name: "redis",
            binder: format!("type = \"redis\"\nurl = \"{url}\"\nclaim-interval = \"500ms\""),
        });
    }
    if let Some(servers) = service_env("STREAM_TEST_KAFKA_BROKERS") {
        brokers.push(Broker {
            name: "kafka",
            binder: format!(
                "type = \"kafka\"\nbrokers = \"{servers}\"\npartitions = 2\n\
                 consumer = {{ \"session.timeout.ms\" = \"6000\", \"heartbeat.interval.ms\" = \"1000\" }}"
            ),
        });
    }
    brokers
}

/// The database under test, or `None` (skipped with a message; a failure under CI).
pub fn postgres() -> Option<String> {
    service_env("STREAM_TEST_POSTGRES_URL")
}

pub async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

/// A table name no other test uses.
pub fn unique_table(prefix: &str) -> String {
    format!("{prefix}_{}", stream_core::unique_suffix())
}

/// `orders-out` publishes to a fresh destination; `orders-in` (group `payments`) and
/// `audit` (group `audit`) consume it.
pub fn streams(broker: &Broker) -> (Streams, String) {
    let destination = format!("outbox-{}", stream_core::unique_suffix());
    let config = format!(
        r#"
        default-binder = "broker"
        [binders.broker]
        {binder}
        [bindings.orders-out]
        destination = "{destination}"
        [bindings.orders-in]
        destination = "{destination}"
        group = "payments"
        concurrency = 8
        [bindings.audit]
        destination = "{destination}"
        group = "audit"
        concurrency = 8
        "#,
        binder = broker.binder,
    );
    let streams = Streams::builder()
        .register(binder_memory::register)
        .register(binder_redis::register)
        .register(binder_kafka::register)
        .env(Vec::<(String, String)>::new())
        .load_str(&config)
        .unwrap();
    (streams, destination)
}

/// An event of the tests: which key, and its place in that key's sequence.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Placed {
    pub key: String,
    pub n: u64,
}

/// What a consumer saw: deliveries per message id, and each key's sequence in arrival order.
#[derive(Default)]
pub struct Seen {
    pub by_id: HashMap<String, usize>,
    pub by_key: HashMap<String, Vec<u64>>,
}

impl Seen {
    pub fn record(seen: &Arc<Mutex<Seen>>, envelope: &Envelope<Placed>) {
        let mut seen = seen.lock().unwrap();
        let id = envelope.message().message_id().unwrap().to_owned();
        *seen.by_id.entry(id).or_default() += 1;
        let event = envelope.payload();
        seen.by_key
            .entry(event.key.clone())
            .or_default()
            .push(event.n);
    }

    pub fn distinct(&self) -> usize {
        self.by_id.len()
    }

    pub fn duplicates(&self) -> usize {
        self.by_id.values().map(|n| n - 1).sum()
    }

    /// Whether each key's events first arrived in their order: a copy may repeat what came
    /// before (a relay publishing a batch again), but nothing arrives ahead of its turn.
    pub fn first_arrivals_in_order(&self) -> Result<(), String> {
        for (key, ns) in &self.by_key {
            let mut next = 0;
            for &n in ns {
                if n > next {
                    return Err(format!("key {key}: {n} arrived before {next}: {ns:?}"));
                }
                if n == next {
                    next += 1;
                }
            }
        }
        Ok(())
    }
}

pub async fn wait_for(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
