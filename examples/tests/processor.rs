//! A processor whose input and output are on different brokers: orders come in on Redis,
//! payment events go out on Kafka, one unit per order.

use std::collections::HashMap;
use std::time::Duration;

use futures::StreamExt;
use stream_core::testing::service_env;
use stream_core::{header, Streams};
use stream_examples::events::{OrderCreated, PaymentEvent};
use stream_examples::payments::PaymentService;

fn streams(redis: &str, kafka: &str, run: &str) -> Streams {
    stream_examples::config::builder()
        .env(Vec::<(String, String)>::new())
        .load_str(&format!(
            r#"
            [binders.redis]
            type = "redis"
            url = "{redis}"

            [binders.kafka]
            type = "kafka"
            brokers = "{kafka}"

            [bindings.order-events-out]
            binder = "redis"
            destination = "orders-{run}"

            [bindings.order-events-in]
            binder = "redis"
            destination = "orders-{run}"
            group = "payment-service"

            [bindings.payment-events-out]
            binder = "kafka"
            destination = "payments-{run}"

            [bindings.payment-events-in]
            binder = "kafka"
            destination = "payments-{run}"
            group = "reader"
            "#
        ))
        .expect("configuration loads")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_processor_reads_redis_and_publishes_to_kafka() {
    let (Some(redis), Some(kafka)) = (
        service_env("STREAM_TEST_REDIS_URL"),
        service_env("STREAM_TEST_KAFKA_BROKERS"),
    ) else {
        return;
    };
    let run = stream_core::unique_suffix();
    let streams = streams(&redis, &kafka, &run);
    let payments = PaymentService::new(10_000);
    let processor = payments.start(&streams).await.unwrap();

    let orders = streams
        .source::<OrderCreated>("order-events-out")
        .await
        .unwrap();
    let mut ids = HashMap::new();
    for i in 0..20u64 {
        let order = OrderCreated {
            order_id: format!("o-{i}"),
            customer: "ada".into(),
            amount_cents: 500 + i * 1_000,
        };
        let id = orders
            .send_keyed(order.order_id.clone(), &order)
            .await
            .unwrap();
        ids.insert(order.order_id, id);
    }

    let mut events = streams
        .sink::<PaymentEvent>("payment-events-in")
        .unwrap()
        .stream()
        .await
        .unwrap();
    let mut seen: HashMap<String, usize> = HashMap::new();
    while seen.len() < ids.len() {
        let delivery = tokio::time::timeout(Duration::from_secs(60), events.next())
            .await
            .expect("every payment event arrives on Kafka")
            .expect("the stream goes on")
            .expect("no error");
        let order_id = delivery.payload().order_id().to_owned();
        let message = delivery.message();
        assert_eq!(
            message.key(),
            Some(order_id.as_str()),
            "keyed like its order"
        );
        assert_eq!(
            message.headers().get(header::INPUT_ID),
            Some(ids[&order_id].as_str()),
            "names the Redis entry it came from"
        );
        *seen.entry(order_id).or_default() += 1;
        delivery.ack();
    }
    events.close().await.unwrap();
    processor.shutdown().await.unwrap();
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    eprintln!("processor across brokers: 20 orders, 20 events, duplicates {duplicates}");
    assert_eq!(payments.decided(), 20);
    streams.close().await.unwrap();
}
