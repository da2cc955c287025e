//! Typed event streams whose broker is chosen by a configuration file.
//!
//! `stream-core` holds what every broker shares: the [`Message`] model and [`Codec`]s, the
//! narrow [`Binder`] transport trait, and the policies written once on top of it — retry with
//! backoff, dead-lettering, per-key order under concurrency, the prefetch bound and graceful
//! shutdown. Broker crates (`binder-memory`, `binder-redis`, `binder-kafka`) implement only
//! transport and register a `type` that configuration files name.
//!
//! A service asks [`Streams`] for a named binding and gets a [`Source`] to publish or a
//! [`Sink`] to consume; the file decides which broker is behind it.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> stream_core::Result<()> {
//! use stream_core::{ErrorKind, Streams};
//!
//! // With no binder crate registered, a binding cannot be built, and the error says why.
//! let err = Streams::builder()
//!     .env(Vec::<(String, String)>::new())
//!     .load_str(r#"
//!         default-binder = "memory"
//!         [bindings.orders-out]
//!         destination = "order-events"
//!     "#)
//!     .unwrap_err();
//! assert_eq!(err.kind(), ErrorKind::Config);
//! assert!(err.message().contains("registered type"));
//! # Ok(())
//! # }
//! ```
//!
//! The `binder-memory` crate shows a full publish and consume round trip.
//!
//! # Delivery contract
//!
//! At-least-once: a message is acknowledged only after its handler returned `Ok` or after it
//! was published to the dead-letter destination. A failing handler is retried with
//! exponential backoff while the message stays un-acknowledged in the broker; later messages
//! with the same key wait, others keep flowing. Undecodable payloads never reach a handler.
//!
//! An attempt is a delivery that reached a handler: a handler that returns an error or
//! panics has failed one, a consumer that crashes during one has used it up, and a delivery
//! handed back unstarted when a consumer stops does not count ([`Consumer`] has the details
//! a binder implements). A [`Subscription`] ends only when shut down or with an error that
//! says why.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
mod batch;
mod binder;
mod channel;
mod codec;
pub mod config;
mod dead_letter;
pub mod dedup;
mod deliveries;
pub mod dlq;
mod engine;
mod error;
mod handler;
mod health;
mod message;
mod partition;
mod processor;
mod registry;
mod sink;
mod source;
mod streams;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;

pub use batch::{Batch, BatchError};
pub use binder::{
    Binder, Consumer, ConsumerOptions, DeliveryTag, Producer, Received, StartFrom,
    ANONYMOUS_GROUP_PREFIX,
};
pub use channel::Channel;
pub use codec::{Codec, Json, Raw};
pub use config::{BindingConfig, Config, DedupConfig, RetryConfig};
pub use deliveries::{Deliveries, Delivery};
pub use error::{BoxError, Error, ErrorKind, Result};
pub use handler::{handler_fn, Action, HandlerError, HandlerFn};
pub use health::{BinderHealth, Health, SubscriptionHealth, SubscriptionState};
pub use message::{header, new_message_id, HeaderReuse, Headers, Message};
pub use partition::{partition_destination, partition_for};
pub use processor::Output;
pub use registry::{BinderSettings, Registry};
pub use sink::{Envelope, Sink, Subscription};
pub use source::Source;
pub use streams::{Streams, StreamsBuilder, ENV_PREFIX, PING_TIMEOUT};

/// A string unique to this process run, for anonymous groups and consumer names.
pub fn unique_suffix() -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // RandomState is seeded randomly per process; hashing a counter gives distinct values.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}
