//! The saga on real brokers: both services in one process, and in two processes.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{config_file, isolated_env};
use stream_core::testing::service_env;
use stream_examples::orders::OrderService;
use stream_examples::payments::PaymentService;

async fn saga_in_one_process(file: &str, env: Vec<(String, String)>) {
    let services = stream_examples::config::open_file(&config_file(file), env)
        .await
        .expect("configuration loads");
    let streams = services.streams;
    let payments = PaymentService::new(10_000);
    let orders = OrderService::open(&streams, services.database.as_deref())
        .await
        .unwrap();
    let run = stream_core::unique_suffix();
    let running = [
        payments.start(&streams).await.unwrap(),
        orders.start(&streams).await.unwrap(),
    ];
    let amounts: Vec<u64> = (0..30).map(|i| 500 + (i * 2_900) % 20_000).collect();
    for (i, amount) in amounts.iter().enumerate() {
        orders
            .place_order(&format!("o-{run}-{i}"), "ada", *amount)
            .await
            .unwrap();
    }
    tokio::time::timeout(Duration::from_secs(60), orders.all_settled())
        .await
        .expect("every order settles");
    for subscription in running {
        subscription.shutdown().await.unwrap();
    }
    orders.stop().await.unwrap();
    let over_limit = amounts.iter().filter(|a| **a > 10_000).count();
    assert_eq!(orders.summary().cancelled, over_limit);
    assert_eq!(orders.summary().paid, amounts.len() - over_limit);
    streams.close().await.unwrap();
}

/// Starts `payment-service`, runs `order-service` to completion, stops the payment service
/// with SIGTERM, and checks both outputs.
fn saga_in_two_processes(file: &str, env: Vec<(String, String)>) {
    let config = config_file(file);
    let mut payments = Command::new(env!("CARGO_BIN_EXE_payment-service"))
        .args(["--config".as_ref(), config.as_os_str()])
        .envs(env.iter().cloned())
        .stdout(Stdio::piped())
        .spawn()
        .expect("payment-service starts");
    let mut payment_out = BufReader::new(payments.stdout.take().unwrap()).lines();
    let first = payment_out.next().expect("payment-service prints").unwrap();
    assert_eq!(first, "payment-service: running");

    let orders = Command::new(env!("CARGO_BIN_EXE_order-service"))
        .args(["--config".as_ref(), config.as_os_str()])
        .args(["--orders", "12", "--timeout", "60"])
        .envs(env.iter().cloned())
        .output()
        .expect("order-service runs");
    let order_report = String::from_utf8_lossy(&orders.stdout);
    let stopped = Command::new("kill")
        .args(["-TERM", &payments.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(stopped.success());
    let payment_status = payments.wait().unwrap();
    let payment_report: Vec<String> = payment_out.map_while(Result::ok).collect();

    assert!(
        orders.status.success(),
        "order-service: {order_report} {}",
        String::from_utf8_lossy(&orders.stderr)
    );
    let amounts: Vec<u64> = (0..12).map(|i| 500 + (i * 2_900) % 20_000).collect();
    let cancelled = amounts.iter().filter(|a| **a > 10_000).count();
    assert!(
        order_report.contains(&format!(
            "12 placed, {} paid, {cancelled} cancelled, 0 pending",
            12 - cancelled
        )),
        "order-service said: {order_report}"
    );
    assert!(
        payment_status.success(),
        "payment-service exits cleanly on SIGTERM"
    );
    assert_eq!(
        payment_report.last().map(String::as_str),
        Some("payment-service: 12 orders decided")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saga_on_redis() {
    let Some(url) = service_env("STREAM_TEST_REDIS_URL") else {
        return;
    };
    saga_in_one_process("redis.toml", isolated_env("redis", "URL", &url)).await;
}

#[test]
fn saga_across_processes_on_redis() {
    let Some(url) = service_env("STREAM_TEST_REDIS_URL") else {
        return;
    };
    saga_in_two_processes("redis.toml", isolated_env("redis", "URL", &url));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saga_on_kafka() {
    let Some(brokers) = service_env("STREAM_TEST_KAFKA_BROKERS") else {
        return;
    };
    saga_in_one_process("kafka.toml", isolated_env("kafka", "BROKERS", &brokers)).await;
}

#[test]
fn saga_across_processes_on_kafka() {
    let Some(brokers) = service_env("STREAM_TEST_KAFKA_BROKERS") else {
        return;
    };
    saga_in_two_processes("kafka.toml", isolated_env("kafka", "BROKERS", &brokers));
}

/// Settings for `redis-postgres.toml` on destinations and a database schema of the test's
/// own; `None` (after a skip message) without Redis or PostgreSQL.
async fn redis_postgres_env() -> Option<Vec<(String, String)>> {
    let url = service_env("STREAM_TEST_REDIS_URL")?;
    let database = service_env("STREAM_TEST_POSTGRES_URL")?;
    let mut env = isolated_env("redis", "URL", &url);
    env.push((
        "DATABASE_URL".into(),
        common::isolated_database(&database).await,
    ));
    Some(env)
}

/// The saga of `examples/config/redis-postgres.toml`: orders in PostgreSQL, `OrderCreated`
/// through the transactional outbox, the payment service deduplicating in PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saga_on_redis_and_postgres() {
    let Some(env) = redis_postgres_env().await else {
        return;
    };
    saga_in_one_process("redis-postgres.toml", env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saga_across_processes_on_redis_and_postgres() {
    let Some(env) = redis_postgres_env().await else {
        return;
    };
    tokio::task::spawn_blocking(move || saga_in_two_processes("redis-postgres.toml", env))
        .await
        .unwrap();
}
