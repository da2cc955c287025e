//! Benchmarks every binder against its raw client in the same run (BRIEF section 8).
//!
//! `bench [--quick] [--json FILE] [--only memory,redis,kafka]`
//!
//! Redis and Kafka rows need `STREAM_TEST_REDIS_URL` / `STREAM_TEST_KAFKA_BROKERS`
//! (`scripts/bench.sh` starts the services and sets them).

mod memory;
mod report;

use report::{Report, Settings};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let json = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1).cloned());
    let only: Option<Vec<String>> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|list| list.split(',').map(str::to_owned).collect());
    let wants = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == name));
    let settings = Settings::new(quick);
    let mut report = Report::new(&settings);

    if wants("memory") {
        memory::run(&settings, &mut report).await;
        memory::latency(&settings, &mut report).await;
    }
    report.print();
    if let Some(path) = json {
        report.write_json(&path).expect("write JSON results");
        eprintln!("results written to {path}");
    }
}
