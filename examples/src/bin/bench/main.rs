//! Benchmarks every binder against its raw client in the same run (BRIEF section 8).
//!
//! `bench [--quick] [--json FILE] [--only memory,redis,kafka]`
//!
//! The Redis and Kafka rows need `STREAM_TEST_REDIS_URL` and `STREAM_TEST_KAFKA_BROKERS`;
//! `scripts/bench.sh` starts both services, sets them, runs this and stops them.

mod kafka;
mod memory;
mod redis;
mod report;

use report::{Report, Settings};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value_of = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let quick = args.iter().any(|a| a == "--quick");
    let only: Option<Vec<String>> =
        value_of("--only").map(|list| list.split(',').map(str::to_owned).collect());
    let wants = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == name));
    let settings = Settings::new(quick);
    let mut report = Report::new(&settings);

    if wants("memory") {
        eprintln!("memory...");
        memory::run(&settings, &mut report).await;
    }
    if wants("redis") {
        match std::env::var("STREAM_TEST_REDIS_URL") {
            Ok(url) => {
                eprintln!("redis at {url}...");
                redis::run(&settings, &mut report, &url).await;
            }
            Err(_) => eprintln!("SKIPPED redis: STREAM_TEST_REDIS_URL is not set"),
        }
    }
    if wants("kafka") {
        match std::env::var("STREAM_TEST_KAFKA_BROKERS") {
            Ok(brokers) => {
                eprintln!("kafka at {brokers}...");
                kafka::run(&settings, &mut report, &brokers).await;
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
