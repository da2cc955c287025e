//! An in-process broker for `stream-core`: what services use in their unit tests.
//!
//! It keeps the delivery contract of a real broker — a retained log per destination,
//! consumer groups with their own positions, redelivery of what a consumer did not
//! acknowledge, dead-lettering through the core policies — inside the process, with test
//! helpers to feed a destination and read what a service published.
//!
//! ```
//! use std::time::Duration;
//! use serde::{Deserialize, Serialize};
//! use binder_memory::MemoryBinder;
//! use stream_core::Streams;
//!
//! #[derive(Debug, Serialize, Deserialize, PartialEq)]
//! struct Greeting { to: String }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> stream_core::Result<()> {
//! let broker = MemoryBinder::new();
//! let streams = Streams::builder()
//!     .register(binder_memory::register)
//!     .binder("memory", broker.clone()) // keep a handle for the test helpers
//!     .load_str(r#"
//!         default-binder = "memory"
//!         [bindings.greetings-out]
//!         destination = "greetings"
//!         [bindings.greetings-in]
//!         destination = "greetings"
//!         group = "greeter"
//!         [bindings.replies-out]
//!         destination = "replies"
//!     "#)?;
//!
//! // A service: answers every greeting.
//! let replies = streams.source::<Greeting>("replies-out").await?;
//! let subscription = streams
//!     .sink::<Greeting>("greetings-in")?
//!     .subscribe(move |g: Greeting| {
//!         let replies = replies.clone();
//!         async move { replies.send(&Greeting { to: format!("re: {}", g.to) }).await.map(drop) }
//!     })
//!     .await?;
//!
//! // The test: feed an event in, assert what the service published.
//! streams.source::<Greeting>("greetings-out").await?.send(&Greeting { to: "ada".into() }).await?;
//! let out: Vec<Greeting> = broker.wait_for_json("replies", 1, Duration::from_secs(5)).await?;
//! assert_eq!(out, vec![Greeting { to: "re: ada".into() }]);
//! subscription.shutdown().await?;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod binder;
mod config;
mod log;

use std::sync::Arc;

pub use binder::MemoryBinder;
pub use config::MemoryConfig;
use stream_core::Registry;

/// Registers the `memory` binder type.
pub fn register(registry: &mut Registry) {
    registry.register("memory", |settings| {
        let config: MemoryConfig = settings.parse()?;
        Ok(Arc::new(MemoryBinder::with_config(config)))
    });
}
