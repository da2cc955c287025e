//! Benchmarks every binder against its raw client in the same run (BRIEF section 8).
//!
//! `bench [--quick] [--json FILE] [--only memory,redis,kafka]
//!        [--metrics publish,publish-concurrent,publish-pipelined,consume,latency,rss,
//!                   retention-cost,retention,outbox,dedup]
//!        [--sizes 16,64,256,1024] [--side ours|raw] [--prefetch N]`
//!
//! `--metrics`, `--sizes` and `--side ours|raw` narrow a run down, for profiling one path;
//! `--prefetch` sets the consume rows' prefetch (default: the binding default);
//! `--telemetry metrics|info|debug` installs a Prometheus recorder and, from `info`, a
//! `tracing` subscriber at that level for the library: `info` is a service in production
//! (the library's per-message spans, at DEBUG, filtered out), `debug` traces every message
//! (see [`telemetry`]).
//!
//! The Redis and Kafka rows need `STREAM_TEST_REDIS_URL` and `STREAM_TEST_KAFKA_BROKERS`;
//! `scripts/bench.sh` starts both services, sets them, runs this and stops them.

mod kafka;
mod memory;
mod outbox;
mod redis;
mod report;
mod telemetry;

use report::{Report, Settings};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value_of = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1).cloned())
    };
    if let Some(at) = args.iter().position(|a| a == report::LAGGING_CONSUMER) {
        let [binder, destination, count] = [1, 2, 3].map(|i| args[at + i].clone());
        let binder = match binder.as_str() {
            "redis" => redis::binder(&std::env::var("STREAM_TEST_REDIS_URL").unwrap()),
            _ => kafka::binder(&std::env::var("STREAM_TEST_KAFKA_BROKERS").unwrap()),
        };
        let count = count.parse().expect("a message count");
        report::run_lagging_consumer(binder, &destination, count).await;
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    if let Some(level) = value_of("--telemetry") {
        telemetry::install(
            level
                .parse()
                .expect("--telemetry takes metrics, info or debug"),
        );
    }
    let only: Option<Vec<String>> =
        value_of("--only").map(|list| list.split(',').map(str::to_owned).collect());
    let wants = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == name));
    if let Some(prefetch) = value_of("--prefetch") {
        report::PREFETCH
            .set(prefetch.parse().expect("--prefetch takes a count"))
            .unwrap();
    }
    if let Some(side) = value_of("--side") {
        report::ONLY_SIDE.set(side).unwrap();
    }
    let mut settings = Settings::new(quick);
    settings.metrics =
        value_of("--metrics").map(|list| list.split(',').map(str::to_owned).collect());
    if let Some(sizes) = value_of("--sizes") {
        settings.sizes = sizes
            .split(',')
            .map(|s| s.parse().expect("--sizes takes byte counts"))
            .collect();
    }
    let started = std::time::Instant::now();
    let lap = |name: &str| eprintln!("{name} done at {:.0?}", started.elapsed());
    let mut report = Report::new(&settings);

    if wants("memory") {
        eprintln!("memory...");
        memory::run(&settings, &mut report).await;
        lap("memory");
    }
    if wants("redis") {
        match std::env::var("STREAM_TEST_REDIS_URL") {
            Ok(url) => {
                eprintln!("redis at {url}...");
                redis::run(&settings, &mut report, &url).await;
                lap("redis");
            }
            Err(_) => eprintln!("SKIPPED redis: STREAM_TEST_REDIS_URL is not set"),
        }
    }
    if wants("kafka") {
        match std::env::var("STREAM_TEST_KAFKA_BROKERS") {
            Ok(brokers) => {
                eprintln!("kafka at {brokers}...");
                kafka::run(&settings, &mut report, &brokers).await;
                lap("kafka");
            }
            Err(_) => eprintln!("SKIPPED kafka: STREAM_TEST_KAFKA_BROKERS is not set"),
        }
    }
    let postgres = std::env::var("STREAM_TEST_POSTGRES_URL").ok();
    let (redis_url, kafka_brokers) = (
        std::env::var("STREAM_TEST_REDIS_URL")
            .ok()
            .filter(|_| wants("redis")),
        std::env::var("STREAM_TEST_KAFKA_BROKERS")
            .ok()
            .filter(|_| wants("kafka")),
    );
    if settings.wants("outbox") {
        match &postgres {
            Some(pg) => {
                let n = if quick { 10_000 } else { 50_000 };
                let value = report::Payload::of_size(64);
                if let Some(url) = &redis_url {
                    eprintln!("outbox through redis...");
                    let conn = ::redis::Client::open(url.as_str())
                        .unwrap()
                        .get_multiplexed_async_connection_with_config(&redis::no_timeout())
                        .await
                        .unwrap();
                    outbox::outbox_row(
                        &settings,
                        &mut report,
                        "redis",
                        redis::binder(url),
                        pg,
                        n,
                        |n| redis::publish_raw(conn.clone(), n, &value),
                    )
                    .await;
                }
                if let Some(brokers) = &kafka_brokers {
                    eprintln!("outbox through kafka...");
                    let binder = kafka::binder(brokers);
                    let producer = kafka::raw_producer(brokers);
                    outbox::outbox_row(
                        &settings,
                        &mut report,
                        "kafka",
                        binder.clone(),
                        pg,
                        n,
                        |n| {
                            let (binder, producer, value) =
                                (binder.clone(), producer.clone(), value.clone());
                            async move { kafka::publish_raw(&binder, &producer, n, &value).await }
                        },
                    )
                    .await;
                }
                lap("outbox");
            }
            None => eprintln!("SKIPPED outbox: STREAM_TEST_POSTGRES_URL is not set"),
        }
    }
    if settings.wants("dedup") {
        eprintln!("dedup...");
        let n = if quick { 20_000 } else { 100_000 };
        let redis = redis_url.as_deref().map(|url| (redis::binder(url), url));
        outbox::dedup_rows(&settings, &mut report, redis, postgres.as_deref(), n).await;
        lap("dedup");
    }
    report.print();
    if let Some(path) = value_of("--json") {
        report.write_json(&path).expect("write JSON results");
        eprintln!("results written to {path}");
    }
}
