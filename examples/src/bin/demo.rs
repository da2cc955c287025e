//! Runs the order and payment services in one process, places orders, waits until every
//! order is paid or cancelled, and prints a summary.
//!
//! `demo [--config FILE] [--orders N] [--limit CENTS]`; `STREAM_CONFIG=FILE` works too.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use stream_examples::config::{self, Args};
use stream_examples::orders::OrderService;
use stream_examples::payments::PaymentService;

#[tokio::main]
async fn main() {
    let args = Args::parse("demo [--config FILE] [--orders N] [--limit CENTS]");
    // Logs only: spans of every order of both services in one process would bury the
    // summary; the two service binaries export them.
    let telemetry = stream_examples::telemetry::init("demo", false);
    let result = run(&args).await;
    telemetry.shutdown();
    if let Err(e) = result {
        eprintln!("demo failed: {e}");
        std::process::exit(1);
    }
}

async fn run(args: &Args) -> stream_core::Result<()> {
    let orders_to_place = args.number("orders", 20);
    let limit = args.number("limit", 10_000);
    let services = config::open(args.config().as_deref()).await?;
    let streams = services.streams;
    let run_id = stream_core::unique_suffix();

    // Anonymous consumers of the dead-letter destinations, only to count them.
    let dead_lettered = Arc::new(AtomicUsize::new(0));
    let mut watchers = Vec::new();
    for binding in ["order-events-dlq", "payment-events-dlq"] {
        let count = dead_lettered.clone();
        watchers.push(
            streams
                .channel(binding)?
                .sink_with(stream_core::Raw)
                .subscribe(move |_| {
                    count.fetch_add(1, Ordering::SeqCst);
                    async { Ok::<(), String>(()) }
                })
                .await?,
        );
    }

    let payments = PaymentService::new(limit);
    let orders = OrderService::open(&streams, services.database.as_deref()).await?;
    let running = [
        payments.start(&streams).await?,
        orders.start(&streams).await?,
    ];

    for i in 0..orders_to_place {
        // Amounts spread over both sides of the limit, deterministically.
        let amount = 500 + (i * 2_900) % (limit * 2);
        orders
            .place_order(
                &format!("{run_id}-{i}"),
                &format!("customer-{}", i % 7),
                amount,
            )
            .await?;
    }
    let settled = tokio::time::timeout(Duration::from_secs(60), orders.all_settled()).await;

    for subscription in running.into_iter().chain(watchers) {
        subscription.shutdown().await?;
    }
    orders.stop().await?;
    let summary = orders.summary();
    println!("orders placed:        {orders_to_place}");
    println!("orders paid:          {}", summary.paid);
    println!("orders cancelled:     {}", summary.cancelled);
    println!("orders still pending: {}", summary.pending);
    println!(
        "order-events:         {orders_to_place} published, {} consumed by payments",
        payments.orders_seen()
    );
    println!(
        "payment-events:       {} published, {} consumed by orders",
        payments.published(),
        orders.payment_events_seen()
    );
    println!(
        "dead-lettered:        {}",
        dead_lettered.load(Ordering::SeqCst)
    );
    streams.close().await?;
    if settled.is_err() || summary.pending > 0 {
        return Err(stream_core::Error::new(
            stream_core::ErrorKind::Timeout,
            format!(
                "{} orders did not reach a final state in 60 s",
                summary.pending
            ),
        ));
    }
    println!("every order reached a final state");
    Ok(())
}
