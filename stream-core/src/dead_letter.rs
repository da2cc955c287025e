//! Routing of messages that cannot be handled to the binding's dead-letter destination.

use std::error::Error as StdError;
use std::time::SystemTime;

use crate::binder::{Binder, Producer};
use crate::message::{header, Message};
use crate::Result;

/// Longest error text kept in the `x-error` header; brokers cap header sizes.
const MAX_ERROR_LEN: usize = 2048;
/// Longest text kept in the `x-error-chain` header.
const MAX_CHAIN_LEN: usize = 4096;

/// Why a message is dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    /// The payload never reached a handler.
    Decode,
    /// The handler failed on the last attempt.
    Handler,
    /// The handler rejected the message.
    Rejected,
}

impl Cause {
    pub(crate) fn reason(self) -> crate::telemetry::measure::DeadLetterReason {
        use crate::telemetry::measure::DeadLetterReason;
        match self {
            Cause::Decode => DeadLetterReason::Decode,
            Cause::Handler => DeadLetterReason::Handler,
            Cause::Rejected => DeadLetterReason::Rejected,
        }
    }

    fn header_value(self) -> &'static str {
        match self {
            Cause::Decode => "decode",
            Cause::Handler => "handler",
            Cause::Rejected => "rejected",
        }
    }
}

/// Publishes dead letters for one binding.
pub(crate) struct DeadLetter {
    destination: String,
    origin: String,
    group: String,
    producer: Box<dyn Producer>,
}

impl DeadLetter {
    /// Makes the dead-letter producer; fails if the destination cannot be written.
    pub(crate) async fn open(
        binder: &dyn Binder,
        destination: String,
        origin: &str,
        group: &str,
    ) -> Result<Self> {
        let producer = binder.dead_letter_producer(&destination).await?;
        Ok(DeadLetter {
            destination,
            origin: origin.to_owned(),
            group: group.to_owned(),
            producer,
        })
    }

    /// The dead-letter destination.
    pub(crate) fn destination(&self) -> &str {
        &self.destination
    }

    /// Publishes a copy of `message` with the dead-letter headers and returns once the broker
    /// accepted it. The caller acks the original only after this succeeded, so a crash in
    /// between duplicates the dead letter rather than losing the message.
    pub(crate) async fn publish(
        &self,
        message: &Message,
        attempts: u32,
        cause: Cause,
        error: &(dyn StdError + Send + Sync + 'static),
        first_failure: SystemTime,
    ) -> Result<()> {
        let text = error.to_string();
        let mut headers = message.headers().clone();
        headers.insert(header::ORIGINAL_DESTINATION, self.origin.as_str());
        headers.insert(header::ORIGINAL_GROUP, self.group.as_str());
        headers.insert(header::ORIGINAL_ID, message.id());
        headers.insert(header::ATTEMPTS, attempts.to_string());
        headers.insert(header::ERROR, truncate(&text, MAX_ERROR_LEN));
        headers.insert(
            header::ERROR_CHAIN,
            truncate(&crate::handler::chain_text(error), MAX_CHAIN_LEN),
        );
        headers.insert(header::ERROR_KIND, cause.header_value());
        headers.insert(
            header::FIRST_FAILURE,
            humantime::format_rfc3339_millis(first_failure).to_string(),
        );
        let mut copy = Message::new(message.payload().clone()).with_headers(headers);
        if let Some(key) = message.key() {
            copy = copy.with_key(key);
        }
        self.producer.send(copy).await?;
        tracing::warn!(
            destination = %self.origin,
            group = %self.group,
            id = %message.id(),
            attempts,
            dead_letter = %self.destination,
            reason = cause.header_value(),
            error = %text,
            "message dead-lettered"
        );
        Ok(())
    }

    pub(crate) async fn close(&self) {
        if let Err(e) = self.producer.close().await {
            tracing::warn!(dead_letter = %self.destination, error = %e, "closing dead-letter producer failed");
        }
    }
}

fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}
