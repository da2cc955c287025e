//! `SkipSeenLayer` in front of real subscriptions: a message id handled once is acknowledged
//! without running the handler again.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use stream_core::{handler_fn, Envelope};
use stream_examples::idempotency::SkipSeenLayer;
use tower::ServiceBuilder;

#[tokio::test]
async fn a_message_id_seen_before_is_acknowledged_without_handling() {
    // Two groups read the same entries, so each id comes twice: once per group. With one
    // layer in front of both handlers, the second delivery of each id is skipped (as a
    // redelivery to this process would be).
    let streams = stream_examples::config::builder()
        .env(Vec::<(String, String)>::new())
        .load_str(
            r#"
            default-binder = "memory"
            [binders.memory]
            type = "memory"
            [bindings.out]
            destination = "events"
            [bindings.first]
            destination = "events"
            group = "first"
            [bindings.second]
            destination = "events"
            group = "second"
            "#,
        )
        .unwrap();
    let layer = SkipSeenLayer::new(100);
    let handled = Arc::new(AtomicUsize::new(0));
    let subscribe = |binding: &'static str| {
        let handled = handled.clone();
        let handler = ServiceBuilder::new()
            .layer(layer.clone())
            .service(handler_fn(move |_: Envelope<u64>| {
                handled.fetch_add(1, Ordering::SeqCst);
                async { Ok::<(), std::io::Error>(()) }
            }));
        let sink = streams.sink::<u64>(binding).unwrap();
        async move { sink.subscribe_service(handler).await.unwrap() }
    };
    let source = streams.source::<u64>("out").await.unwrap();
    for n in 0..10u64 {
        source.send(&n).await.unwrap();
    }
    // The first group handles every id; then the second group gets the same ids.
    let first = subscribe("first").await;
    wait(
        || handled.load(Ordering::SeqCst) == 10,
        "the first group handled all 10",
    )
    .await;
    let second = subscribe("second").await;
    wait(
        || layer.skipped() == 10,
        "the second group's deliveries are all skipped",
    )
    .await;
    first.shutdown().await.unwrap();
    second.shutdown().await.unwrap();
    assert_eq!(handled.load(Ordering::SeqCst), 10, "each id handled once");
}

async fn wait(condition: impl Fn() -> bool, what: &str) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting until {what}"));
}
