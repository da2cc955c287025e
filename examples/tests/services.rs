//! Unit tests of each service on the in-memory binder, the way a service author writes them:
//! feed an event in, assert what the service published.

use std::time::Duration;

use binder_memory::MemoryBinder;
use stream_core::Streams;
use stream_examples::events::{OrderCreated, PaymentEvent};
use stream_examples::orders::{OrderService, OrderStatus};
use stream_examples::payments::PaymentService;

const WAIT: Duration = Duration::from_secs(10);

/// The built-in configuration, with a broker handle kept for the test helpers.
fn streams(broker: &MemoryBinder) -> Streams {
    stream_examples::config::builder()
        .binder("memory", broker.clone())
        .env(Vec::<(String, String)>::new())
        .load_str(stream_examples::config::BUILT_IN)
        .expect("built-in configuration loads")
}

fn order(id: &str, amount_cents: u64) -> OrderCreated {
    OrderCreated {
        order_id: id.to_owned(),
        customer: "ada".to_owned(),
        amount_cents,
    }
}

#[tokio::test]
async fn payment_service_completes_orders_under_the_limit_and_fails_the_rest() {
    let broker = MemoryBinder::new();
    let streams = streams(&broker);
    let payments = PaymentService::new(10_000);
    let subscription = payments.start(&streams).await.unwrap();

    broker.send_json("order-events", &order("o-1", 9_999));
    broker.send_json("order-events", &order("o-2", 10_001));
    let published: Vec<PaymentEvent> = broker
        .wait_for_json("payment-events", 2, WAIT)
        .await
        .unwrap();
    subscription.shutdown().await.unwrap();

    assert_eq!(
        published[0],
        PaymentEvent::PaymentCompleted {
            order_id: "o-1".into(),
            payment_id: "pay-o-1".into()
        }
    );
    assert!(
        matches!(&published[1], PaymentEvent::PaymentFailed { order_id, .. } if order_id == "o-2")
    );
    assert_eq!(
        broker.messages("payment-events")[0].key(),
        Some("o-1"),
        "keyed by order"
    );
}

#[tokio::test]
async fn payment_service_charges_a_redelivered_order_once() {
    let broker = MemoryBinder::new();
    let streams = streams(&broker);
    let payments = PaymentService::new(10_000);
    let subscription = payments.start(&streams).await.unwrap();

    broker.send_json("order-events", &order("o-1", 100));
    broker.send_json("order-events", &order("o-1", 100)); // the same event again
    let published: Vec<PaymentEvent> = broker
        .wait_for_json("payment-events", 2, WAIT)
        .await
        .unwrap();
    subscription.shutdown().await.unwrap();

    assert_eq!(payments.decided(), 1, "one decision for one order");
    assert_eq!(
        published[0], published[1],
        "the recorded outcome is repeated, not redecided"
    );
}

#[tokio::test]
async fn order_service_publishes_order_created_keyed_by_order() {
    let broker = MemoryBinder::new();
    let streams = streams(&broker);
    let orders = OrderService::new(&streams).await.unwrap();

    orders.place_order("o-9", "bob", 4_200).await.unwrap();

    let published: Vec<OrderCreated> = broker.wait_for_json("order-events", 1, WAIT).await.unwrap();
    assert_eq!(
        published,
        vec![OrderCreated {
            order_id: "o-9".into(),
            customer: "bob".into(),
            amount_cents: 4_200
        }]
    );
    assert_eq!(broker.messages("order-events")[0].key(), Some("o-9"));
    assert_eq!(orders.status("o-9"), Some(OrderStatus::Pending));
}

#[tokio::test]
async fn order_service_marks_paid_cancels_on_failure_and_ignores_repeats() {
    let broker = MemoryBinder::new();
    let streams = streams(&broker);
    let orders = OrderService::new(&streams).await.unwrap();
    let subscription = orders.start(&streams).await.unwrap();
    orders.place_order("paid", "ada", 100).await.unwrap();
    orders.place_order("refused", "ada", 100).await.unwrap();

    broker.send_json(
        "payment-events",
        &PaymentEvent::PaymentCompleted {
            order_id: "paid".into(),
            payment_id: "p".into(),
        },
    );
    broker.send_json(
        "payment-events",
        &PaymentEvent::PaymentFailed {
            order_id: "refused".into(),
            reason: "card declined".into(),
        },
    );
    // A late, contradictory duplicate must not reopen a settled order.
    broker.send_json(
        "payment-events",
        &PaymentEvent::PaymentFailed {
            order_id: "paid".into(),
            reason: "late duplicate".into(),
        },
    );
    tokio::time::timeout(WAIT, orders.all_settled())
        .await
        .expect("orders settle");
    // The duplicate was published last; once it is handled, its effect (none) is visible.
    let deadline = tokio::time::Instant::now() + WAIT;
    while orders.payment_events_seen() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "all three events handled"
        );
        tokio::task::yield_now().await;
    }
    subscription.shutdown().await.unwrap();

    assert_eq!(orders.status("paid"), Some(OrderStatus::Paid));
    assert_eq!(orders.status("refused"), Some(OrderStatus::Cancelled));
}

#[tokio::test]
async fn a_malformed_payment_event_is_dead_lettered_and_the_saga_goes_on() {
    let broker = MemoryBinder::new();
    let streams = streams(&broker);
    let orders = OrderService::new(&streams).await.unwrap();
    let subscription = orders.start(&streams).await.unwrap();
    orders.place_order("o-1", "ada", 100).await.unwrap();

    broker.send_message(
        "payment-events",
        stream_core::Message::new(&b"{\"type\":\"PaymentRefunded\"}"[..])
            .with_header("content-type", "application/json"),
    );
    broker.send_json(
        "payment-events",
        &PaymentEvent::PaymentCompleted {
            order_id: "o-1".into(),
            payment_id: "p".into(),
        },
    );
    tokio::time::timeout(WAIT, orders.all_settled())
        .await
        .expect("the order settles");
    let dead = broker
        .wait_for_messages("payment-events.dlq", 1, WAIT)
        .await
        .unwrap();
    subscription.shutdown().await.unwrap();

    assert_eq!(dead[0].headers().get("x-error-kind"), Some("decode"));
    assert_eq!(orders.status("o-1"), Some(OrderStatus::Paid));
}
