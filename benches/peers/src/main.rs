//! Measures two peer Rust messaging libraries, shove and ruststream, on the same Redis and
//! Kafka as the project's bench (`examples/src/bin/bench`), with its payloads and patterns, so
//! that BENCHMARKS.md can set them beside the project's numbers from the same run.
//!
//! `peers [--quick] [--full] [--runs R] [--sizes 64,1024] [--only redis,kafka]
//!        [--peers shove,ruststream] [--redis-messages N] [--kafka-publish-messages N]
//!        [--kafka-consume-messages N] [--json FILE]`
//!
//! Needs `STREAM_TEST_REDIS_URL` and `STREAM_TEST_KAFKA_BROKERS`; `scripts/bench-peers.sh`
//! starts both services, sets them, builds and runs this, and stops them.
//!
//! Rows, per payload size and peer:
//! - redis publish, 64 single publishes in flight;
//! - redis publish, batches of 100, one after the other (the peer's batch or transaction API);
//! - redis consume+ack, concurrency 1, and in batches of up to 500: a new consumer group reads a
//!   backlog the peer's own publisher wrote beforehand (a new one each run), timed from the
//!   first handled message to the last; ruststream also with `.pipeline()` (one `XACK` per
//!   read instead of one per message);
//! - kafka publish, 500 single publishes in flight (and shove's `publish_batch` of 500), on a
//!   new topic of 3 partitions after 2,500 untimed messages;
//! - kafka consume+commit, concurrency 1, new group over a backlog, timed from the first message.

mod common;
mod report;
mod ruststream_peer;
mod shove_peer;

use common::{KafkaAdmin, Payload, RedisAdmin, Timed};
use report::Report;

const SHOVE: &str = shove_peer::NAME;
const RUSTSTREAM: &str = ruststream_peer::NAME;

/// What differs from the project's bench in how the peers run, by their own defaults.
const NOTES: &[&str] = &[
    "Kafka producers: shove sets acks=all and enable.idempotence=true; ruststream-rdkafka \
     keeps librdkafka's defaults (acks=all, no idempotence); both linger 5 ms (librdkafka's \
     default), as the project's bench does.",
    "Kafka consumers: neither peer bounds librdkafka's fetch queue (queued.max.messages.kbytes, \
     64 MiB by default), so a consume row largely drains records fetched while the group \
     joined; the project's binder and raw consumer bound it to 1 MiB.",
    "shove Kafka consume: registering the group declares the shove-owned topology, which \
     expands the 3-partition topic to shove's default of 8 (the backlog stays in the first 3); \
     commits run every 500 ms.",
    "ruststream Kafka consume: Commit::Tracked (an ack stores the offset, auto-commit sends it); \
     its default, Commit::Auto, stores each offset as the record is handed to the application.",
    "shove Redis consume, concurrency 1: concurrent processing off (shove's default) clamps \
     the read to XREADGROUP COUNT 1. shove's Redis publish_batch sends its XADDs one after the \
     other, each awaited.",
    "ruststream Redis consume: without .pipeline() every settle is an XACK round trip of its \
     own, batches included; the pipelined rows send one XACK per read.",
    "ruststream Redis batches of 100 are owned transactions (MULTI / EXEC); its consumer group \
     starts at the stream's first entry (StreamStart::Beginning). shove's groups are created at \
     0 with XGROUP CREATE beforehand (shove's own declaration creates them at $).",
];
struct Settings {
    runs: usize,
    sizes: Vec<usize>,
    redis_messages: usize,
    kafka_publish_messages: usize,
    kafka_consume_messages: usize,
    shove: bool,
    ruststream: bool,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // shove warns at every Kafka declaration that replication factor 1 cannot meet
                // acks=all on a cluster with min.insync.replicas >= 2: true, and not this one.
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new(
                        "warn,shove::backends::kafka::topology=error",
                    )
                }),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    // Multi-threaded, one worker per core, as `#[tokio::main]` gives the project's bench.
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(run());
}

async fn run() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value_of = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let has = |flag: &str| args.iter().any(|a| a == flag);
    let count = |flag: &str, default: usize| {
        value_of(flag).map_or(default, |v| {
            v.replace('_', "")
                .parse()
                .unwrap_or_else(|_| panic!("{flag} takes a count"))
        })
    };
    let list = |flag: &str| -> Option<Vec<String>> {
        value_of(flag).map(|l| l.split(',').map(str::to_owned).collect())
    };
    let quick = has("--quick");
    let scale = if quick { 5 } else { 1 };
    let peers = list("--peers");
    let wants_peer = |p: &str| peers.as_ref().is_none_or(|l| l.iter().any(|x| x == p));
    let settings = Settings {
        runs: count("--runs", if has("--full") { 5 } else { 3 }),
        sizes: value_of("--sizes").map_or(vec![64, 1024], |s| {
            s.split(',')
                .map(|x| x.parse().expect("--sizes takes byte counts"))
                .collect()
        }),
        redis_messages: count("--redis-messages", 100_000 / scale),
        kafka_publish_messages: count("--kafka-publish-messages", 100_000 / scale),
        kafka_consume_messages: count("--kafka-consume-messages", 300_000 / scale),
        shove: wants_peer("shove"),
        ruststream: wants_peer("ruststream"),
    };
    let only = list("--only");
    let wants = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == name));

    let mut report = Report::new(format!(
        "{} mode; peers: {SHOVE}; {RUSTSTREAM} (ruststream-fred 0.7.1, ruststream-rdkafka 0.7.1); \
         messages per run: redis {}, kafka publish {} (after {} untimed), kafka consume {}; \
         {} runs, peers alternating; {} Kafka partitions; medians, spread = (max-min)/median",
        if quick {
            "quick"
        } else if has("--full") {
            "full"
        } else {
            "default"
        },
        settings.redis_messages,
        settings.kafka_publish_messages,
        common::KAFKA_WARM_UP,
        settings.kafka_consume_messages,
        settings.runs,
        common::KAFKA_PARTITIONS,
    ));
    report.notes = NOTES.to_vec();
    let started = std::time::Instant::now();

    if wants("redis") {
        match std::env::var("STREAM_TEST_REDIS_URL") {
            Ok(url) => {
                eprintln!("redis at {url}...");
                redis_rows(&settings, &mut report, &url).await;
                eprintln!("redis done at {:.0?}", started.elapsed());
            }
            Err(_) => eprintln!("SKIPPED redis: STREAM_TEST_REDIS_URL is not set"),
        }
    }
    if wants("kafka") {
        match std::env::var("STREAM_TEST_KAFKA_BROKERS") {
            Ok(brokers) => {
                eprintln!("kafka at {brokers}...");
                kafka_rows(&settings, &mut report, &brokers).await;
                eprintln!("kafka done at {:.0?}", started.elapsed());
            }
            Err(_) => eprintln!("SKIPPED kafka: STREAM_TEST_KAFKA_BROKERS is not set"),
        }
    }

    report.print();
    if let Some(path) = value_of("--json") {
        report.write_json(&path).expect("write JSON results");
        eprintln!("results written to {path}");
    }
}

/// Runs `run` for the row unless an earlier run of it failed, and records the outcome.
async fn measure(
    report: &mut Report,
    peer: &'static str,
    broker: &'static str,
    metric: &str,
    size: usize,
    run: impl Future<Output = Timed>,
) {
    if report.failed(peer, broker, metric, size) {
        return;
    }
    let outcome = run.await;
    report.record(peer, broker, metric, size, outcome);
}

const PUB_CONCURRENT_REDIS: &str = "publish, 64 concurrent sends";
const PUB_BATCH_REDIS: &str = "publish, batches of 100";
const CONSUME_ONE: &str = "consume+ack, concurrency 1";
const CONSUME_BATCH: &str = "consume+ack, batches of up to 500";
const CONSUME_ONE_PIPELINED: &str = "consume+ack, concurrency 1, pipelined acks";
const CONSUME_BATCH_PIPELINED: &str = "consume+ack, batches of up to 500, pipelined acks";
const PUB_CONCURRENT_KAFKA: &str = "publish, 500 concurrent sends";
const PUB_BATCH_KAFKA: &str = "publish, batches of 500";
const CONSUME_KAFKA: &str = "consume+commit, concurrency 1";

/// The peer `connect` makes when `wanted`; a failure is reported as every row of `peer` on
/// `broker` skipped.
async fn connected<P, E: std::fmt::Display>(
    wanted: bool,
    report: &mut Report,
    peer: &'static str,
    broker: &'static str,
    connect: impl std::future::Future<Output = Result<P, E>>,
) -> Option<P> {
    if !wanted {
        return None;
    }
    match connect.await {
        Ok(p) => Some(p),
        Err(e) => {
            report.skip(peer, broker, "all", &format!("connect failed: {e}"));
            None
        }
    }
}

async fn redis_rows(settings: &Settings, report: &mut Report, url: &str) {
    const REDIS: &str = "redis";
    let admin = match RedisAdmin::connect(url).await {
        Ok(admin) => admin,
        Err(e) => {
            eprintln!("SKIPPED redis: {url} does not answer: {e}");
            return;
        }
    };
    let shove = connected(
        settings.shove,
        report,
        SHOVE,
        REDIS,
        shove_peer::RedisPeer::connect(url),
    )
    .await;
    let rs = connected(
        settings.ruststream,
        report,
        RUSTSTREAM,
        REDIS,
        ruststream_peer::RedisPeer::connect(url),
    )
    .await;
    let n = settings.redis_messages;
    for &size in &settings.sizes {
        let value = Payload::of_size(size);
        eprintln!("  redis {size} B: publish");
        for _ in 0..settings.runs {
            for batched in [false, true] {
                let metric = if batched {
                    PUB_BATCH_REDIS
                } else {
                    PUB_CONCURRENT_REDIS
                };
                if let Some(p) = &shove {
                    let stream = common::fresh("pub");
                    let run = async {
                        if batched {
                            p.publish_batches(&stream, n, &value).await
                        } else {
                            p.publish_concurrent(&stream, n, &value).await
                        }
                    };
                    measure(report, SHOVE, REDIS, metric, size, run).await;
                    admin.delete(&stream).await;
                }
                if let Some(p) = &rs {
                    let stream = common::fresh("pub");
                    let run = async {
                        if batched {
                            p.publish_batches(&stream, n, &value).await
                        } else {
                            p.publish_concurrent(&stream, n, &value).await
                        }
                    };
                    measure(report, RUSTSTREAM, REDIS, metric, size, run).await;
                    admin.delete(&stream).await;
                }
            }
        }

        // A backlog per run, written untimed by the peer's own publisher and read by a new
        // group: shove trims a stream once every group has acknowledged its entries (its
        // maintenance sidecar, `XTRIM MINID`), so a backlog read by an earlier group may be gone.
        eprintln!("  redis {size} B: consume backlogs of {n}");
        for _ in 0..settings.runs {
            for (metric, batch, pipelined) in [
                (CONSUME_ONE, false, false),
                (CONSUME_ONE_PIPELINED, false, true),
                (CONSUME_BATCH, true, false),
                (CONSUME_BATCH_PIPELINED, true, true),
            ] {
                if let Some(p) = &shove {
                    if pipelined {
                        report.skip(
                            SHOVE,
                            REDIS,
                            metric,
                            "shove has no pipelined-settle mode for Redis Streams",
                        );
                    } else {
                        let stream = common::fresh("con");
                        let run = async {
                            p.prefill(&stream, n, &value).await?;
                            check_backlog(&admin, &stream, n).await?;
                            p.consume(&admin, &stream, n, batch).await
                        };
                        measure(report, SHOVE, REDIS, metric, size, run).await;
                        admin.delete(&stream).await;
                    }
                }
                if let Some(p) = &rs {
                    let stream = common::fresh("con");
                    let run = async {
                        p.prefill(&stream, n, &value).await?;
                        check_backlog(&admin, &stream, n).await?;
                        p.consume(&stream, n, batch, pipelined).await
                    };
                    measure(report, RUSTSTREAM, REDIS, metric, size, run).await;
                    admin.delete(&stream).await;
                }
            }
        }
    }
    if let Some(p) = shove {
        p.close().await;
    }
    if let Some(p) = rs {
        p.close().await;
    }
}

/// The backlog holds its `n` entries.
async fn check_backlog(admin: &RedisAdmin, stream: &str, n: usize) -> Result<(), String> {
    match admin.len(stream).await {
        len if len == n => Ok(()),
        len => Err(format!("backlog {stream} holds {len} entries, not {n}")),
    }
}

async fn kafka_rows(settings: &Settings, report: &mut Report, brokers: &str) {
    const KAFKA: &str = "kafka";
    let admin = match KafkaAdmin::new(brokers) {
        Ok(admin) => admin,
        Err(e) => {
            eprintln!("SKIPPED kafka: {e}");
            return;
        }
    };
    if let Err(e) = admin.ping().await {
        eprintln!("SKIPPED kafka: {brokers} does not answer: {e}");
        return;
    }
    let shove = connected(
        settings.shove,
        report,
        SHOVE,
        KAFKA,
        shove_peer::KafkaPeer::connect(brokers),
    )
    .await;
    let rs = if settings.ruststream {
        report.skip(
            RUSTSTREAM,
            KAFKA,
            PUB_BATCH_KAFKA,
            "ruststream-rdkafka has no non-transactional batch publish (its batches are \
             Kafka transactions, KafkaTransactionalPublish, a different guarantee); its \
             publisher sends one record per call",
        );
        connected(
            true,
            report,
            RUSTSTREAM,
            KAFKA,
            ruststream_peer::KafkaPeer::connect(brokers),
        )
        .await
    } else {
        None
    };
    let n = settings.kafka_publish_messages;
    let warm_up = common::KAFKA_WARM_UP;
    for &size in &settings.sizes {
        let value = Payload::of_size(size);
        eprintln!("  kafka {size} B: publish");
        for _ in 0..settings.runs {
            for batched in [false, true] {
                let metric = if batched {
                    PUB_BATCH_KAFKA
                } else {
                    PUB_CONCURRENT_KAFKA
                };
                if let Some(p) = &shove {
                    let topic = admin.create("pub").await;
                    let run = async {
                        let topic = topic.as_ref().map_err(|e| format!("topic: {e}"))?;
                        if batched {
                            p.publish_batches(topic, warm_up, &value).await?;
                            p.publish_batches(topic, n, &value).await
                        } else {
                            p.publish_concurrent(topic, warm_up, &value).await?;
                            p.publish_concurrent(topic, n, &value).await
                        }
                    };
                    measure(report, SHOVE, KAFKA, metric, size, run).await;
                    if let Ok(topic) = &topic {
                        admin.delete(topic).await;
                    }
                }
                if let (Some(p), false) = (&rs, batched) {
                    let topic = admin.create("pub").await;
                    let run = async {
                        let topic = topic.as_ref().map_err(|e| format!("topic: {e}"))?;
                        p.publish_concurrent(topic, warm_up, &value).await?;
                        p.publish_concurrent(topic, n, &value).await
                    };
                    measure(report, RUSTSTREAM, KAFKA, metric, size, run).await;
                    if let Ok(topic) = &topic {
                        admin.delete(topic).await;
                    }
                }
            }
        }

        let n = settings.kafka_consume_messages;
        eprintln!("  kafka {size} B: consume backlogs of {n}");
        let shove_backlog = match &shove {
            Some(p) => {
                let filled = async {
                    let topic = admin.create("con").await?;
                    p.prefill(&topic, n, &value).await.map(|()| topic)
                };
                match filled.await {
                    Ok(topic) => Some(topic),
                    Err(e) => {
                        report.fail(SHOVE, KAFKA, CONSUME_KAFKA, size, format!("backlog: {e}"));
                        None
                    }
                }
            }
            None => None,
        };
        let rs_backlog = match &rs {
            Some(p) => {
                let filled = async {
                    let topic = admin.create("con").await?;
                    p.prefill(&topic, n, &value).await.map(|()| topic)
                };
                match filled.await {
                    Ok(topic) => Some(topic),
                    Err(e) => {
                        report.fail(
                            RUSTSTREAM,
                            KAFKA,
                            CONSUME_KAFKA,
                            size,
                            format!("backlog: {e}"),
                        );
                        None
                    }
                }
            }
            None => None,
        };
        for _ in 0..settings.runs {
            if let (Some(p), Some(topic)) = (&shove, &shove_backlog) {
                measure(
                    report,
                    SHOVE,
                    KAFKA,
                    CONSUME_KAFKA,
                    size,
                    p.consume(topic, n),
                )
                .await;
            }
            if let (Some(p), Some(topic)) = (&rs, &rs_backlog) {
                measure(
                    report,
                    RUSTSTREAM,
                    KAFKA,
                    CONSUME_KAFKA,
                    size,
                    p.consume(topic, n),
                )
                .await;
            }
        }
        for topic in [&shove_backlog, &rs_backlog].into_iter().flatten() {
            admin.delete(topic).await;
        }
    }
    if let Some(p) = shove {
        p.close().await;
    }
    if let Some(p) = rs {
        p.close().await;
    }
}
