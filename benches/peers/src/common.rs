//! What both peers share: the payload, run settings, the handled-message counter, fresh names,
//! and the untimed set-up against the servers (deleting streams, creating and deleting topics).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use serde::{Deserialize, Serialize};

/// Partitions of every Kafka topic: binder-kafka's default (`partitions = 3`), which the
/// project's bench gets through `fresh_topic`.
pub const KAFKA_PARTITIONS: i32 = 3;
/// Single publishes kept in flight on Redis.
pub const REDIS_IN_FLIGHT: usize = 64;
/// Messages per Redis publish batch.
pub const REDIS_BATCH: usize = 100;
/// Publishes (or messages in batches) kept in flight on Kafka, and per Kafka batch.
pub const KAFKA_IN_FLIGHT: usize = 500;
/// Untimed messages sent to a new topic before a Kafka publish run.
pub const KAFKA_WARM_UP: usize = 2_500;
/// Messages per batch in the consume rows' batch mode (shove's default `max_batch_size`, and
/// the project's bench's raw XREADGROUP COUNT).
pub const CONSUME_BATCH: usize = 500;
/// A consume run that handles nothing new for this long has failed.
pub const STALL: Duration = Duration::from_secs(60);

/// The JSON payload of about `size` bytes the project's bench sends (`Payload::of_size`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Payload {
    pub data: String,
}

impl Payload {
    pub fn of_size(size: usize) -> Self {
        // `{"data":""}` is 11 bytes.
        Payload {
            data: "x".repeat(size.saturating_sub(11)),
        }
    }
}

/// What one run moved, and how long its timed part took.
pub type Timed = Result<(usize, Duration), String>;

/// Counts handled messages: the time of the first, and a signal at the `target`th.
pub struct Counter {
    target: usize,
    handled: AtomicUsize,
    /// When the first message (or batch) was handled, and how many it was.
    first: OnceLock<(Instant, usize)>,
    last: OnceLock<Instant>,
    done: tokio::sync::Notify,
}

impl Counter {
    pub fn new(target: usize) -> Arc<Counter> {
        Arc::new(Counter {
            target,
            handled: AtomicUsize::new(0),
            first: OnceLock::new(),
            last: OnceLock::new(),
            done: tokio::sync::Notify::new(),
        })
    }

    /// `k` more messages were handled (decoded by the peer and given to the handler).
    pub fn add(&self, k: usize) {
        self.first.get_or_init(|| (Instant::now(), k));
        let before = self.handled.fetch_add(k, Ordering::AcqRel);
        if before < self.target && before + k >= self.target {
            let _ = self.last.set(Instant::now());
            self.done.notify_one();
        }
    }

    pub fn handled(&self) -> usize {
        self.handled.load(Ordering::Acquire)
    }

    /// Waits for the `target`th message: the messages handled after the first call of the
    /// handler, and the time from that call to the last message (so a first batch of 500 is not
    /// counted as handled in no time). Fails when nothing new was handled for [`STALL`].
    pub async fn wait(&self) -> Timed {
        let mut seen = 0;
        loop {
            match tokio::time::timeout(STALL, self.done.notified()).await {
                Ok(()) => break,
                Err(_) => {
                    let now = self.handled();
                    if now == seen {
                        return Err(format!(
                            "stalled: {now} of {} messages handled, none in the last {STALL:?}",
                            self.target
                        ));
                    }
                    seen = now;
                }
            }
        }
        let (first, first_k) = *self.first.get().expect("a message was handled");
        let last = *self.last.get().expect("the last message was handled");
        // From the first message to the last: subscribing and joining are set-up.
        Ok((self.target - first_k.min(self.target), last - first))
    }
}

/// A name no earlier run used: `peers-{what}-{hex time}{counter}`.
pub fn fresh(what: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros();
    format!(
        "peers-{what}-{micros:x}{:02x}",
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs `futures`, at most `in_flight` at a time, until the first error.
pub async fn in_flight<F, E>(
    in_flight: usize,
    futures: impl Iterator<Item = F>,
) -> Result<(), String>
where
    F: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    use futures::StreamExt as _;
    let mut results = futures::stream::iter(futures).buffer_unordered(in_flight);
    while let Some(result) = results.next().await {
        result.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// A plain redis-rs connection for the untimed set-up: PING, consumer groups, DEL.
#[derive(Clone)]
pub struct RedisAdmin {
    conn: redis::aio::MultiplexedConnection,
}

impl RedisAdmin {
    pub async fn connect(url: &str) -> Result<RedisAdmin, String> {
        let client = redis::Client::open(url).map_err(|e| e.to_string())?;
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| e.to_string())?;
        let pong: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        if pong != "PONG" {
            return Err(format!("PING answered {pong}"));
        }
        Ok(RedisAdmin { conn })
    }

    pub async fn len(&self, stream: &str) -> usize {
        redis::cmd("XLEN")
            .arg(stream)
            .query_async(&mut self.conn.clone())
            .await
            .unwrap_or(0)
    }

    /// A new consumer group on `stream` that starts at its first entry.
    pub async fn group_from_start(&self, stream: &str, group: &str) -> Result<(), String> {
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream)
            .arg(group)
            .arg("0")
            .query_async::<()>(&mut self.conn.clone())
            .await
            .map_err(|e| e.to_string())
    }

    /// Deletes `key` (and what a peer keeps beside it, under the same prefix).
    pub async fn delete(&self, key: &str) {
        let mut conn = self.conn.clone();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{key}*"))
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        if !keys.is_empty() {
            let _ = redis::cmd("UNLINK")
                .arg(&keys)
                .query_async::<i64>(&mut conn)
                .await;
        }
    }
}

/// Topic creation and deletion, and a metadata wait, with rdkafka's own clients.
pub struct KafkaAdmin {
    admin: AdminClient<DefaultClientContext>,
    metadata: Arc<BaseConsumer>,
}

impl KafkaAdmin {
    pub fn new(brokers: &str) -> Result<KafkaAdmin, String> {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", brokers);
        Ok(KafkaAdmin {
            admin: config.create().map_err(|e| e.to_string())?,
            metadata: Arc::new(config.create().map_err(|e| e.to_string())?),
        })
    }

    /// Metadata answers: the brokers are up.
    pub async fn ping(&self) -> Result<(), String> {
        let metadata = self.metadata.clone();
        tokio::task::spawn_blocking(move || {
            metadata
                .fetch_metadata(None, Duration::from_secs(10))
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// A new topic of [`KAFKA_PARTITIONS`] partitions, returned once every partition has a
    /// leader in the metadata.
    pub async fn create(&self, what: &str) -> Result<String, String> {
        let topic = fresh(what);
        let results = self
            .admin
            .create_topics(
                &[NewTopic::new(
                    &topic,
                    KAFKA_PARTITIONS,
                    TopicReplication::Fixed(1),
                )],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
            )
            .await
            .map_err(|e| e.to_string())?;
        for result in results {
            result.map_err(|(t, code)| format!("create topic {t}: {code}"))?;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let metadata = self.metadata.clone();
            let name = topic.clone();
            let ready = tokio::task::spawn_blocking(move || {
                metadata
                    .fetch_metadata(Some(&name), Duration::from_secs(5))
                    .map(|m| {
                        m.topics().iter().any(|t| {
                            t.error().is_none()
                                && t.partitions().len() == KAFKA_PARTITIONS as usize
                                && t.partitions()
                                    .iter()
                                    .all(|p| p.error().is_none() && p.leader() >= 0)
                        })
                    })
                    .unwrap_or(false)
            })
            .await
            .unwrap_or(false);
            if ready {
                return Ok(topic);
            }
            if Instant::now() > deadline {
                return Err(format!("topic {topic} has no leaders after 30 s"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Deletes `topic`: left behind, every run's records stay on the broker's disk.
    pub async fn delete(&self, topic: &str) {
        let deleted = self
            .admin
            .delete_topics(&[topic], &AdminOptions::new())
            .await;
        match deleted {
            Ok(results) => {
                for result in results {
                    if let Err((t, code)) = result {
                        eprintln!("    delete topic {t}: {code}");
                    }
                }
            }
            Err(e) => eprintln!("    delete topic {topic}: {e}"),
        }
    }
}
