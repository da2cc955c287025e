//! ruststream 0.7.7 with its Redis broker (ruststream-fred 0.7.1, Redis Streams) and its Kafka
//! broker (ruststream-rdkafka 0.7.1), used as their docs show: a connected broker's publisher
//! with the typed `message(..).to(..).publish()` (the default JSON codec), an owned transaction
//! (`MULTI` / `EXEC`) for Redis batches, and an application (`RustStream::start`) whose
//! `Handle` implementation receives the decoded payload: sequential dispatch (the default), or
//! a slice handler with `.batch(n)`, each also with `.pipeline()` on Redis (settles sent
//! together, one `XACK` per read).

use std::future::{Future, ready};
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Instant;

use ruststream::ConnectedBroker as _;
use ruststream::prelude::*;
use ruststream_fred::prelude::RedisPipelineSteps as _;
use ruststream_fred::{ConnectedRedisBroker, RedisBroker, RedisStream, StreamStart};
use ruststream_rdkafka::{
    Commit, ConnectedKafkaBroker, KafkaBroker, KafkaPublish, KafkaTopic, StartOffset,
};

use crate::common::{
    CONSUME_BATCH, Counter, KAFKA_IN_FLIGHT, Payload, REDIS_BATCH, REDIS_IN_FLIGHT, Timed,
    in_flight,
};

pub const NAME: &str = "ruststream 0.7.7";

// What `#[derive(Outgoing)]` with no `name` writes: the call site names the stream or topic.
impl OutgoingDestination for Payload {
    type Form = CallerName;
}

impl MessageHeaders for Payload {
    type Contract = NoHeaders;
}

/// Counts the decoded payloads it is handed.
struct Count(Arc<Counter>);

impl Handle<Payload> for Count {
    fn handle(
        &self,
        message: &Payload,
        _outs: &(),
        _ctx: &mut Context<'_>,
    ) -> impl Future<Output = Result<(), HandlerOutcome>> {
        std::hint::black_box(message.data.len());
        self.0.add(1);
        ready(Ok(()))
    }
}

impl Handle<[Payload]> for Count {
    fn handle(
        &self,
        messages: &[Payload],
        _outs: &(),
        _ctx: &mut Context<'_>,
    ) -> impl Future<Output = Result<(), Vec<HandlerOutcome>>> {
        for message in messages {
            std::hint::black_box(message.data.len());
        }
        self.0.add(messages.len());
        ready(Ok(()))
    }
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn app_info() -> AppInfo {
    AppInfo::new("peers-bench", "0.1.0")
}

/// Runs `app` until `counter` has seen its target, then shuts it down.
async fn run_app(app: impl App, counter: &Counter) -> Timed {
    let running = app.start().await.map_err(|e| format!("start: {e}"))?;
    let result = counter.wait().await;
    if let Err(e) = running.shutdown().await {
        eprintln!("    ruststream shutdown: {e}");
    }
    result
}

fn batch_size() -> NonZeroUsize {
    NonZeroUsize::new(CONSUME_BATCH).unwrap()
}

// ----------------------------------------------------------------------------------------------
// Redis Streams
// ----------------------------------------------------------------------------------------------

pub struct RedisPeer {
    url: String,
    connected: ConnectedRedisBroker,
    publisher: ruststream_fred::RedisPublisher,
}

impl RedisPeer {
    pub async fn connect(url: &str) -> Result<RedisPeer, String> {
        let connected = RedisBroker::standalone(url).connect().await.map_err(err)?;
        let publisher = connected.publisher();
        Ok(RedisPeer {
            url: url.to_owned(),
            connected,
            publisher,
        })
    }

    /// `n` single publishes (`XADD`), [`REDIS_IN_FLIGHT`] at a time.
    pub async fn publish_concurrent(&self, stream: &str, n: usize, value: &Payload) -> Timed {
        let start = Instant::now();
        in_flight(
            REDIS_IN_FLIGHT,
            (0..n).map(|_| self.publisher.message(value).to(stream).publish()),
        )
        .await?;
        Ok((n, start.elapsed()))
    }

    /// Owned transactions of [`REDIS_BATCH`] publishes (one `MULTI` / `EXEC` each), one after
    /// the other.
    pub async fn publish_batches(&self, stream: &str, n: usize, value: &Payload) -> Timed {
        let start = Instant::now();
        let mut sent = 0;
        while sent < n {
            let k = (n - sent).min(REDIS_BATCH);
            let mut tx = self.publisher.owned_transaction().await.map_err(err)?;
            for _ in 0..k {
                tx.publish(stream, value).await.map_err(err)?;
            }
            tx.commit().await.map_err(err)?;
            sent += k;
        }
        Ok((n, start.elapsed()))
    }

    /// A new consumer group starting at the stream's first entry (`StreamStart::Beginning`)
    /// reads the backlog of `n` in `stream`: one message per handler call, sequential dispatch,
    /// or slices of up to [`CONSUME_BATCH`]; with `pipelined`, the subscription's settles leave
    /// in one pipeline per read (`.pipeline()`, one `XACK` per fetched batch under load) instead
    /// of one `XACK` round trip each.
    pub async fn consume(&self, stream: &str, n: usize, batch: bool, pipelined: bool) -> Timed {
        let group = crate::common::fresh("g");
        let counter = Counter::new(n);
        let source = RedisStream::new(stream)
            .group(group)
            .start_id(StreamStart::Beginning);
        let handler = Count(counter.clone());
        let broker = RedisBroker::standalone(&self.url);
        let app = RustStream::new(app_info()).with_broker(broker, |b| match (batch, pipelined) {
            (false, false) => {
                b.include(subscriber::<_, Payload, _, _, _, _, _>(source, handler).build());
            }
            (false, true) => {
                b.include(
                    subscriber::<_, Payload, _, _, _, _, _>(source, handler)
                        .pipeline()
                        .build(),
                );
            }
            (true, false) => {
                b.include(
                    subscriber::<_, [Payload], _, _, _, _, _>(source, handler)
                        .batch(batch_size())
                        .build(),
                );
            }
            (true, true) => {
                b.include(
                    subscriber::<_, [Payload], _, _, _, _, _>(source, handler)
                        .batch(batch_size())
                        .pipeline()
                        .build(),
                );
            }
        });
        run_app(app, &counter).await
    }

    /// Fills `stream` with `n` messages through ruststream's publisher, untimed.
    pub async fn prefill(&self, stream: &str, n: usize, value: &Payload) -> Result<(), String> {
        self.publish_concurrent(stream, n, value).await.map(|_| ())
    }

    pub async fn close(self) {
        if let Err(e) = self.connected.shutdown().await {
            eprintln!("ruststream redis shutdown: {e}");
        }
    }
}

// ----------------------------------------------------------------------------------------------
// Kafka
// ----------------------------------------------------------------------------------------------

pub struct KafkaPeer {
    brokers: String,
    connected: ConnectedKafkaBroker,
    publisher: ruststream_rdkafka::KafkaPublisher,
}

impl KafkaPeer {
    pub async fn connect(brokers: &str) -> Result<KafkaPeer, String> {
        let connected = KafkaBroker::new([brokers]).connect().await.map_err(err)?;
        let publisher = connected.publisher(KafkaPublish::default());
        Ok(KafkaPeer {
            brokers: brokers.to_owned(),
            connected,
            publisher,
        })
    }

    /// `n` single publishes, each awaiting its delivery report, [`KAFKA_IN_FLIGHT`] at a time.
    pub async fn publish_concurrent(&self, topic: &str, n: usize, value: &Payload) -> Timed {
        let start = Instant::now();
        in_flight(
            KAFKA_IN_FLIGHT,
            (0..n).map(|_| self.publisher.message(value).to(topic).publish()),
        )
        .await?;
        Ok((n, start.elapsed()))
    }

    /// A new consumer group starting at the earliest offset reads the backlog of `n` in
    /// `topic`, one message per handler call, sequential dispatch, with `Commit::Tracked`
    /// (an ack stores the position, librdkafka's auto-commit sends it: at-least-once).
    pub async fn consume(&self, topic: &str, n: usize) -> Timed {
        let group = crate::common::fresh("g");
        let counter = Counter::new(n);
        let source = KafkaTopic::new(topic)
            .group(group)
            .start(StartOffset::Earliest)
            .commit(Commit::Tracked);
        let handler = Count(counter.clone());
        let broker = KafkaBroker::new([self.brokers.as_str()]);
        let app = RustStream::new(app_info()).with_broker(broker, |b| {
            b.include(subscriber::<_, Payload, _, _, _, _, _>(source, handler).build());
        });
        run_app(app, &counter).await
    }

    /// Fills `topic` with `n` messages through ruststream's publisher, untimed.
    pub async fn prefill(&self, topic: &str, n: usize, value: &Payload) -> Result<(), String> {
        self.publish_concurrent(topic, n, value).await.map(|_| ())
    }

    pub async fn close(self) {
        if let Err(e) = self.connected.shutdown().await {
            eprintln!("ruststream kafka shutdown: {e}");
        }
    }
}
