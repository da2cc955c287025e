//! The order service alone: places orders, waits until each is paid or cancelled, prints a
//! summary and exits. Run `payment-service` with the same configuration beside it.
//!
//! `order-service --config FILE [--orders N] [--limit CENTS] [--timeout SECS] [--http ADDR]`
//!
//! With `--http ADDR` (or `SERVICE_HTTP_ADDR`) it serves `GET /metrics` and `GET /healthz`
//! there while it runs and prints `order-service: http on ADDR` with the bound address. Logs
//! go to stderr, filtered by `RUST_LOG` (default `info`); built with the `opentelemetry`
//! feature, each finished span is written to stderr too (`span trace_id=… span_id=…
//! parent_id=…`).

use std::time::Duration;

use stream_examples::config::{self, Args};
use stream_examples::http::{self, Endpoints};
use stream_examples::orders::OrderService;
use stream_examples::telemetry;

#[tokio::main]
async fn main() {
    let args = Args::parse(
        "order-service --config FILE [--orders N] [--limit CENTS] [--timeout SECS] [--http ADDR]",
    );
    let telemetry = telemetry::init("order-service", true);
    let result = run(&args).await;
    telemetry.shutdown();
    match result {
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
    let http_addr = args.http_addr();
    // Before the streams: stream-core registers a source's and a subscription's metrics
    // when they are made, with the recorder installed then.
    let metrics = match http_addr {
        Some(_) => Some(telemetry::install_prometheus()?),
        None => None,
    };
    let services = config::open(args.config().as_deref()).await?;
    let streams = services.streams;
    let orders = OrderService::open(&streams, services.database.as_deref()).await?;
    let subscription = orders.start(&streams).await?;
    let server = match (http_addr, metrics) {
        (Some(addr), Some(metrics)) => {
            let (bound, server) =
                http::start(&addr, Endpoints::new(streams.clone(), metrics)).await?;
            println!("order-service: http on {bound}");
            Some(server)
        }
        _ => None,
    };
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
    tracing::info!(count, "orders placed; waiting for their payments");
    let settled = tokio::time::timeout(timeout, orders.all_settled())
        .await
        .is_ok();
    subscription.shutdown().await?;
    orders.stop().await?;
    streams.close().await?;
    if let Some(server) = server {
        server.abort();
    }
    let s = orders.summary();
    println!(
        "order-service: {count} placed, {} paid, {} cancelled, {} pending",
        s.paid, s.cancelled, s.pending
    );
    Ok(settled)
}
