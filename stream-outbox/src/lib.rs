//! Exactly-once effects on at-least-once delivery, on PostgreSQL.
//!
//! - **Transactional outbox.** [`Outbox::send`] writes an event in the service's own
//!   database transaction; a [`Relay`] publishes committed events through any binding of a
//!   [`Streams`](stream_core::Streams), in commit order per key, and marks them sent. An
//!   event exists if and only if its transaction committed. A relay killed mid-batch
//!   publishes that batch again when it (or another instance) comes back, with the same
//!   message ids; several relays share one table without publishing a row twice.
//! - **Idempotent consumer with the handler's transaction.** [`PgDedup::subscribe`] runs a
//!   handler in the transaction that claims the message id for the group: the handler's
//!   writes and the mark commit together. [`PgDedup`] is also a plain
//!   [`DedupStore`](stream_core::dedup::DedupStore) for the binding key `dedup`.
//! - **In memory.** [`MemoryOutbox`] has the outbox contract without a database, for unit
//!   tests and demos.
//!
//! The PostgreSQL client is `tokio-postgres` (pooled by `deadpool-postgres` for the dedup
//! store): the caller's transaction is a `tokio_postgres` one, which services on `sqlx`
//! can't pass; see the README for why. Connections are made without TLS.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> stream_core::Result<()> {
//! use stream_outbox::{MemoryOutbox, Relay};
//!
//! let streams = stream_core::Streams::builder()
//!     .register(binder_memory::register)
//!     .load_str(r#"
//!         [binders.memory]
//!         type = "memory"
//!         [bindings.orders-out]
//!         destination = "orders"
//!     "#)?;
//! let outbox = MemoryOutbox::new();
//! let relay = Relay::new(outbox.clone(), streams.clone()).spawn();
//!
//! let mut tx = outbox.transaction();
//! tx.send("orders-out", "order-7", &"placed")?;
//! tx.commit(); // published from here on
//! # relay.shutdown().await
//! # }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod dedup;
mod memory;
mod outbox;
mod postgres;
mod reader;
mod relay;

pub use dedup::{PgDedup, PgDedupConfig, Tx};
pub use memory::{MemoryOutbox, MemoryTransaction};
pub use outbox::{Outbox, DEFAULT_TABLE};
pub use reader::OutboxReader;
pub use relay::{OutboxStore, Pending, Publisher, Rejected, Relay, RelayConfig, RelayHandle};

use serde::Serialize;
use stream_core::{header, Error, ErrorKind, Message, Result};

/// `event` as a JSON message, as [`Streams::source`](stream_core::Streams::source) would
/// encode it.
fn json_message<T: Serialize + ?Sized>(event: &T) -> Result<Message> {
    Ok(Message::new(json(event)?).with_headers(json_headers()))
}

/// `event` as JSON bytes.
fn json<T: Serialize + ?Sized>(event: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(event).map_err(|e| {
        Error::new(ErrorKind::Codec, "cannot encode an outbox event as JSON").with_source(e)
    })
}

/// The headers of a JSON event: its `content-type`.
fn json_headers() -> stream_core::Headers {
    stream_core::Headers::from_iter([(header::CONTENT_TYPE, "application/json")])
}

/// The `stream.outbox` span of writing `message`: the trace context it carries to the
/// consumers is this span's, a child of the caller's (the transaction that wrote it), not
/// the relay's.
fn write_span(binding: &str, message: &mut Message, message_id: &str) -> tracing::Span {
    let span = tracing::debug_span!(
        "stream.outbox",
        binding = %binding,
        message.key = message.key().map(tracing::field::display),
        message.id = %message_id,
    );
    stream_core::telemetry::inject_context(&span, message.headers_mut());
    span
}

/// The message's own id, or a new UUIDv7.
fn message_id_of(message: &Message) -> String {
    match message.message_id() {
        Some(id) => id.to_owned(),
        None => stream_core::new_message_id(),
    }
}
