//! The order service alone: places orders, waits until each is paid or cancelled, prints a
//! summary and exits. Run `payment-service` with the same configuration beside it.
//!
//! `order-service --config FILE [--orders N] [--limit CENTS] [--timeout SECS]`

use std::time::Duration;

use stream_examples::config::{self, Args};
use stream_examples::orders::OrderService;

#[tokio::main]
async fn main() {
    let args =
        Args::parse("order-service --config FILE [--orders N] [--limit CENTS] [--timeout SECS]");
    match run(&args).await {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("order-service failed: {e}");
            std::process::exit(1);
        }
    }
}

async fn run(args: &Args) -> stream_core::Result<bool> {
    let count = args.number("orders", 20);
    let limit = args.number("limit", 10_000);
    let timeout = Duration::from_secs(args.number("timeout", 60));
    let streams = config::load(args.config().as_deref())?;
    let orders = OrderService::new(&streams).await?;
    let subscription = orders.start(&streams).await?;
    let run_id = stream_core::unique_suffix();
    for i in 0..count {
        let amount = 500 + (i * 2_900) % (limit * 2);
        orders
            .place_order(
                &format!("{run_id}-{i}"),
                &format!("customer-{}", i % 7),
                amount,
            )
            .await?;
    }
    let settled = tokio::time::timeout(timeout, orders.all_settled())
        .await
        .is_ok();
    subscription.shutdown().await?;
    streams.close().await?;
    let s = orders.summary();
    println!(
        "order-service: {count} placed, {} paid, {} cancelled, {} pending",
        s.paid, s.cancelled, s.pending
    );
    Ok(settled)
}
