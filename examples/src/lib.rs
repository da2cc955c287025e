//! An order service and a payment service that talk only through events, on whichever
//! broker the configuration file names (BRIEF section 7).
//!
//! The order service publishes `OrderCreated` to `order-events`; the payment service charges
//! it and publishes `PaymentCompleted` or `PaymentFailed` to `payment-events`; the order
//! service marks the order paid or cancels it. Both handlers are idempotent.
//!
//! What an operator sees of them is set up in [`telemetry`] (logs through
//! `tracing-subscriber`, metrics through `metrics-exporter-prometheus`, and with the
//! `opentelemetry` feature one trace per order across both services) and served by [`http`]
//! (`GET /metrics`, `GET /healthz`).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> stream_core::Result<()> {
//! use stream_examples::{config, orders::OrderService, payments::PaymentService};
//!
//! let streams = config::load(None)?; // the built-in in-memory configuration
//! let payments = PaymentService::new(10_000);
//! let orders = OrderService::new(&streams).await?;
//! let running = (payments.start(&streams).await?, orders.start(&streams).await?);
//! orders.place_order("o-1", "ada", 2_500).await?;
//! orders.place_order("o-2", "bob", 25_000).await?;
//! orders.all_settled().await;
//! assert_eq!((orders.summary().paid, orders.summary().cancelled), (1, 1));
//! running.0.shutdown().await?;
//! running.1.shutdown().await?;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod config;
pub mod events;
pub mod http;
pub mod idempotency;
pub mod orders;
pub mod payments;
pub mod telemetry;
