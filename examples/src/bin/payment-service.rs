//! The payment service alone: charges orders until SIGINT or SIGTERM, then shuts down
//! gracefully.
//!
//! `payment-service --config FILE [--limit CENTS]`

use stream_examples::config::{self, Args};
use stream_examples::payments::PaymentService;
use tokio::signal::unix::{signal, SignalKind};

#[tokio::main]
async fn main() {
    let args = Args::parse("payment-service --config FILE [--limit CENTS]");
    if let Err(e) = run(&args).await {
        eprintln!("payment-service failed: {e}");
        std::process::exit(1);
    }
}

async fn run(args: &Args) -> stream_core::Result<()> {
    let streams = config::load(args.config().as_deref())?;
    let payments = PaymentService::new(&streams, args.number("limit", 10_000)).await?;
    let mut subscription = payments.start(&streams).await?;
    println!("payment-service: running");
    let mut terminate = signal(SignalKind::terminate()).expect("SIGTERM handler");
    // `wait` is cancel-safe: when a signal wins, `shutdown` below still closes everything.
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
        ended = subscription.wait() => ended?,
    }
    subscription.shutdown().await?;
    streams.close().await?;
    println!("payment-service: {} orders decided", payments.decided());
    Ok(())
}
