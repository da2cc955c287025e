//! Publishes a few events and consumes them on the in-memory binder.

use std::time::Duration;

use binder_memory::MemoryBinder;
use serde::{Deserialize, Serialize};
use stream_core::Streams;

#[derive(Debug, Serialize, Deserialize)]
struct OrderCreated {
    id: u32,
    amount_cents: u64,
}

#[tokio::main]
async fn main() -> stream_core::Result<()> {
    let broker = MemoryBinder::new();
    let streams = Streams::builder()
        .register(binder_memory::register)
        .binder("memory", broker.clone())
        .load_str(
            r#"
            default-binder = "memory"
            [bindings.orders-out]
            destination = "order-events"
            [bindings.orders-in]
            destination = "order-events"
            group = "demo"
            "#,
        )?;
    let handled = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counter = handled.clone();
    let subscription = streams
        .sink::<OrderCreated>("orders-in")?
        .subscribe(move |order: OrderCreated| {
            println!("handled order {} ({} cents)", order.id, order.amount_cents);
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { Ok::<(), String>(()) }
        })
        .await?;
    let source = streams.source::<OrderCreated>("orders-out").await?;
    for id in 1..=5 {
        source
            .send_keyed(
                id.to_string(),
                &OrderCreated {
                    id,
                    amount_cents: 1000 * id as u64,
                },
            )
            .await?;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while handled.load(std::sync::atomic::Ordering::SeqCst) < 5
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    subscription.shutdown().await?;
    println!(
        "demo: {} of 5 orders handled",
        handled.load(std::sync::atomic::Ordering::SeqCst)
    );
    Ok(())
}
