//! shove 0.16.0: Redis Streams (`redis-streams`) and Kafka (`kafka`), used as its docs and
//! examples show: a `Topic` with `JsonCodec`, `Broker::publisher`, `publish` /
//! `publish_batch`, a consumer group of one non-concurrent consumer with a
//! `MessageHandler`, and the `BatchConsumer` with a `BatchMessageHandler`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use shove::kafka::{KafkaConfig, KafkaConsumerGroupConfig};
use shove::redis::{RedisConfig, RedisConsumerGroupConfig, RedisMode};
use shove::{
    BatchConsumerOptions, BatchMessageHandler, Broker, ConsumerGroupConfig, JsonCodec, Kafka,
    MessageHandler, MessageMetadata, NotSequenced, Outcome, QueueTopology, Redis, Topic,
    TopologyBuilder,
};
use tokio_util::sync::CancellationToken;

use crate::common::{
    CONSUME_BATCH, Counter, KAFKA_IN_FLIGHT, Payload, REDIS_BATCH, REDIS_IN_FLIGHT, Timed,
    in_flight,
};

pub const NAME: &str = "shove 0.16.0";

// A shove `Topic` names its stream or topic through `fn topology() -> &'static QueueTopology`,
// a function of the type: fixed at compile time in shove's examples. Every run here uses a
// fresh name, so the one topic type reads the name of the run in progress; each distinct
// topology is built (and leaked) once.
static CURRENT: RwLock<Option<&'static QueueTopology>> = RwLock::new(None);

/// Points [`Bench`] at the stream or topic `name`.
fn use_topic(name: &str) {
    static BUILT: Mutex<Option<HashMap<String, &'static QueueTopology>>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap();
    let topology = *built
        .get_or_insert_with(HashMap::new)
        .entry(name.to_owned())
        .or_insert_with(|| Box::leak(Box::new(TopologyBuilder::new(name).build())));
    *CURRENT.write().unwrap() = Some(topology);
}

struct Bench;

impl Topic for Bench {
    type Message = Payload;
    type Codec = JsonCodec;

    fn topology() -> &'static QueueTopology {
        CURRENT.read().unwrap().expect("use_topic was called")
    }
}

impl NotSequenced for Bench {}

/// Decodes (shove does, before the handler) and counts.
#[derive(Clone)]
struct Count(Arc<Counter>);

impl MessageHandler<Bench> for Count {
    type Context = ();

    async fn handle(&self, message: Payload, _: MessageMetadata, _: &()) -> Outcome {
        std::hint::black_box(message.data.len());
        self.0.add(1);
        Outcome::Ack
    }
}

impl BatchMessageHandler<Bench> for Count {
    type Context = ();

    async fn handle_batch(&self, messages: Vec<(Payload, MessageMetadata)>, _: &()) -> Outcome {
        for (message, _) in &messages {
            std::hint::black_box(message.data.len());
        }
        self.0.add(messages.len());
        Outcome::Ack
    }
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

// ----------------------------------------------------------------------------------------------
// Redis Streams
// ----------------------------------------------------------------------------------------------

fn redis_config(url: &str) -> RedisConfig {
    RedisConfig::new(RedisMode::Standalone {
        url: url.to_owned(),
    })
}

pub struct RedisPeer {
    url: String,
    broker: Broker<Redis>,
    publisher: shove::Publisher<Redis>,
}

impl RedisPeer {
    pub async fn connect(url: &str) -> Result<RedisPeer, String> {
        let broker = Broker::<Redis>::new(redis_config(url)).await.map_err(err)?;
        let publisher = broker.publisher().await.map_err(err)?;
        Ok(RedisPeer {
            url: url.to_owned(),
            broker,
            publisher,
        })
    }

    /// `n` single `publish` calls, [`REDIS_IN_FLIGHT`] at a time.
    pub async fn publish_concurrent(&self, stream: &str, n: usize, value: &Payload) -> Timed {
        use_topic(stream);
        let start = Instant::now();
        in_flight(
            REDIS_IN_FLIGHT,
            (0..n).map(|_| self.publisher.publish::<Bench>(value)),
        )
        .await?;
        Ok((n, start.elapsed()))
    }

    /// `publish_batch` of [`REDIS_BATCH`] messages, one batch after the other.
    pub async fn publish_batches(&self, stream: &str, n: usize, value: &Payload) -> Timed {
        use_topic(stream);
        let batch = vec![value.clone(); REDIS_BATCH];
        let start = Instant::now();
        let mut sent = 0;
        while sent < n {
            let k = (n - sent).min(REDIS_BATCH);
            self.publisher
                .publish_batch::<Bench>(&batch[..k])
                .await
                .map_err(err)?;
            sent += k;
        }
        Ok((n, start.elapsed()))
    }

    /// A new consumer group (created at the stream's first entry: shove's own declaration
    /// creates it at `$`, for new entries only) reads the backlog of `n` in `stream`, through a
    /// consumer group of one consumer with concurrent processing off (shove's default), or
    /// through the batch consumer.
    pub async fn consume(
        &self,
        admin: &crate::common::RedisAdmin,
        stream: &str,
        n: usize,
        batch: bool,
    ) -> Timed {
        use_topic(stream);
        let group = crate::common::fresh("g");
        admin.group_from_start(stream, &group).await?;
        let broker = Broker::<Redis>::new(redis_config(&self.url).with_group(&group))
            .await
            .map_err(err)?;
        let counter = Counter::new(n);
        let handler = Count(counter.clone());
        let result = if batch {
            let token = CancellationToken::new();
            let consumer = broker.batch_consumer();
            let options = BatchConsumerOptions::<Redis>::new()
                .with_max_batch_size(CONSUME_BATCH)
                .with_shutdown(token.clone());
            let run = consumer.run::<Bench, _>(handler, (), options);
            tokio::pin!(run);
            let result = tokio::select! {
                result = counter.wait() => result,
                stopped = &mut run => Err(format!("batch consumer stopped: {stopped:?}")),
            };
            token.cancel();
            if tokio::time::timeout(Duration::from_secs(30), run)
                .await
                .is_err()
            {
                eprintln!("    shove batch consumer did not stop within 30 s");
            }
            result
        } else {
            let mut group_runner = broker.consumer_group();
            group_runner
                .register::<Bench, _>(
                    ConsumerGroupConfig::new(RedisConsumerGroupConfig::new(1..=1)),
                    move || handler.clone(),
                )
                .await
                .map_err(err)?;
            let stop = Arc::new(tokio::sync::Notify::new());
            let s = stop.clone();
            let running = tokio::spawn(
                group_runner
                    .run_until_timeout(async move { s.notified().await }, Duration::from_secs(30)),
            );
            let result = counter.wait().await;
            stop.notify_one();
            let _ = running.await;
            result
        };
        broker.close().await;
        result
    }

    /// Fills `stream` with `n` messages through shove's publisher, untimed.
    pub async fn prefill(&self, stream: &str, n: usize, value: &Payload) -> Result<(), String> {
        self.publish_concurrent(stream, n, value).await.map(|_| ())
    }

    pub async fn close(self) {
        self.broker.close().await;
    }
}

// ----------------------------------------------------------------------------------------------
// Kafka
// ----------------------------------------------------------------------------------------------

pub struct KafkaPeer {
    brokers: String,
    broker: Broker<Kafka>,
    publisher: shove::Publisher<Kafka>,
}

impl KafkaPeer {
    pub async fn connect(brokers: &str) -> Result<KafkaPeer, String> {
        let broker = Broker::<Kafka>::new(KafkaConfig::new(brokers))
            .await
            .map_err(err)?;
        let publisher = broker.publisher().await.map_err(err)?;
        Ok(KafkaPeer {
            brokers: brokers.to_owned(),
            broker,
            publisher,
        })
    }

    /// `n` single `publish` calls, [`KAFKA_IN_FLIGHT`] at a time.
    pub async fn publish_concurrent(&self, topic: &str, n: usize, value: &Payload) -> Timed {
        use_topic(topic);
        let start = Instant::now();
        in_flight(
            KAFKA_IN_FLIGHT,
            (0..n).map(|_| self.publisher.publish::<Bench>(value)),
        )
        .await?;
        Ok((n, start.elapsed()))
    }

    /// `publish_batch` of [`KAFKA_IN_FLIGHT`] messages, one batch after the other (each call
    /// enqueues the whole batch and awaits every delivery report).
    pub async fn publish_batches(&self, topic: &str, n: usize, value: &Payload) -> Timed {
        use_topic(topic);
        let batch = vec![value.clone(); KAFKA_IN_FLIGHT];
        let start = Instant::now();
        let mut sent = 0;
        while sent < n {
            let k = (n - sent).min(KAFKA_IN_FLIGHT);
            self.publisher
                .publish_batch::<Bench>(&batch[..k])
                .await
                .map_err(err)?;
            sent += k;
        }
        Ok((n, start.elapsed()))
    }

    /// A new consumer group (shove's default `auto.offset.reset` is earliest) of one
    /// non-concurrent consumer reads the backlog of `n` in `topic`; shove commits what the
    /// handler completed on its 500 ms interval.
    ///
    /// The topology is shove-owned, as in its examples, so registering the group declares it:
    /// shove expands the topic from 3 partitions to its default of 8 (the backlog stays in the
    /// first 3). An infra-owned topology (`TopologyBuilder::external`) would leave the topic
    /// alone but switches shove to in-place retries, where a single-permit consumer pauses
    /// and re-fetches the assignment for every record: 25 msgs/s on this machine.
    pub async fn consume(&self, topic: &str, n: usize) -> Timed {
        use_topic(topic);
        let group = crate::common::fresh("g");
        // A broker of its own: stopping a consumer group cancels its client's shutdown token.
        let broker = Broker::<Kafka>::new(KafkaConfig::new(&self.brokers))
            .await
            .map_err(err)?;
        let counter = Counter::new(n);
        let handler = Count(counter.clone());
        let mut group_runner = broker.consumer_group();
        group_runner
            .register::<Bench, _>(
                // Prefetch 1: what concurrent processing off clamps shove's default of 10 to
                // anyway, set here so that shove does not warn about the clamp every run.
                ConsumerGroupConfig::new(
                    KafkaConsumerGroupConfig::new(1..=1)
                        .with_prefetch_count(1)
                        .with_group_id(group),
                ),
                move || handler.clone(),
            )
            .await
            .map_err(err)?;
        let stop = Arc::new(tokio::sync::Notify::new());
        let s = stop.clone();
        let running = tokio::spawn(
            group_runner
                .run_until_timeout(async move { s.notified().await }, Duration::from_secs(30)),
        );
        let result = counter.wait().await;
        stop.notify_one();
        let _ = running.await;
        broker.close().await;
        result
    }

    /// Fills `topic` with `n` messages through shove's publisher, untimed.
    pub async fn prefill(&self, topic: &str, n: usize, value: &Payload) -> Result<(), String> {
        self.publish_concurrent(topic, n, value).await.map(|_| ())
    }

    pub async fn close(self) {
        self.broker.close().await;
    }
}
