//! The payment service alone: charges orders until SIGINT or SIGTERM, then shuts down
//! gracefully.
//!
//! `payment-service --config FILE [--limit CENTS] [--http ADDR]`
//!
//! With `--http ADDR` (or `SERVICE_HTTP_ADDR`) it serves `GET /metrics` and `GET /healthz`
//! there and prints `payment-service: http on ADDR` with the bound address. Logs go to
//! stderr, filtered by `RUST_LOG` (default `info`); built with the `opentelemetry` feature,
//! each finished span is written to stderr too (`span trace_id=… span_id=… parent_id=…`).

use stream_examples::config::{self, Args};
use stream_examples::http::{self, Endpoints};
use stream_examples::payments::PaymentService;
use stream_examples::telemetry;
use tokio::signal::unix::{signal, SignalKind};

#[tokio::main]
async fn main() {
    let args = Args::parse("payment-service --config FILE [--limit CENTS] [--http ADDR]");
    let telemetry = telemetry::init("payment-service", true);
    let result = run(&args).await;
    telemetry.shutdown();
    if let Err(e) = result {
        eprintln!("payment-service failed: {e}");
        std::process::exit(1);
    }
}

async fn run(args: &Args) -> stream_core::Result<()> {
    let http_addr = args.http_addr();
    // Before the streams: stream-core registers a source's and a subscription's metrics
    // when they are made, with the recorder installed then.
    let metrics = match http_addr {
        Some(_) => Some(telemetry::install_prometheus()?),
        None => None,
    };
    let services = config::open(args.config().as_deref()).await?;
    let streams = services.streams;
    let payments = PaymentService::new(args.number("limit", 10_000));
    let mut subscription = payments.start(&streams).await?;
    let server = match (http_addr, metrics) {
        (Some(addr), Some(metrics)) => {
            let (bound, server) =
                http::start(&addr, Endpoints::new(streams.clone(), metrics)).await?;
            println!("payment-service: http on {bound}");
            Some(server)
        }
        _ => None,
    };
    println!("payment-service: running");
    tracing::info!("payment-service running");
    let mut terminate = signal(SignalKind::terminate()).expect("SIGTERM handler");
    // `wait` is cancel-safe: when a signal wins, `shutdown` below still closes everything.
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
        ended = subscription.wait() => ended?,
    }
    tracing::info!("payment-service stopping");
    subscription.shutdown().await?;
    streams.close().await?;
    if let Some(server) = server {
        server.abort();
    }
    println!("payment-service: {} orders decided", payments.decided());
    Ok(())
}
