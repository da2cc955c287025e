//! The whole saga, both services in one process, on the in-memory binder.

use std::time::Duration;

use stream_examples::orders::OrderService;
use stream_examples::payments::PaymentService;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_order_is_paid_or_cancelled_on_memory() {
    let streams = stream_examples::config::builder()
        .env(Vec::<(String, String)>::new())
        .load_str(stream_examples::config::BUILT_IN)
        .unwrap();
    let payments = PaymentService::new(10_000);
    let orders = OrderService::new(&streams).await.unwrap();
    let running = [
        payments.start(&streams).await.unwrap(),
        orders.start(&streams).await.unwrap(),
    ];
    let amounts: Vec<u64> = (0..50).map(|i| 500 + (i * 2_900) % 20_000).collect();
    for (i, amount) in amounts.iter().enumerate() {
        orders
            .place_order(&format!("o-{i}"), "ada", *amount)
            .await
            .unwrap();
    }
    tokio::time::timeout(Duration::from_secs(30), orders.all_settled())
        .await
        .expect("every order settles");
    for subscription in running {
        subscription.shutdown().await.unwrap();
    }
    let summary = orders.summary();
    let over_limit = amounts.iter().filter(|a| **a > 10_000).count();
    assert_eq!(summary.cancelled, over_limit);
    assert_eq!(summary.paid, amounts.len() - over_limit);
    assert_eq!(payments.decided(), amounts.len());
}
