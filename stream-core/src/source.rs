//! [`Source`]: the typed publisher of one binding.

use std::fmt;
use std::sync::Arc;

use tracing::Instrument;

use crate::binder::Producer;
use crate::codec::Codec;
use crate::message::{header, Headers, Message};
use crate::telemetry::measure::{now_millis, SourceMetrics};
use crate::telemetry::trace;
use crate::{Error, ErrorKind, Result};

/// Publishes values of `T` to one destination. Cheap to clone; clones share the producer.
///
/// Every send returns once the broker has accepted the message, or with an error: a message
/// is never dropped silently.
pub struct Source<T> {
    producer: Arc<dyn Producer>,
    codec: Arc<dyn Codec<T>>,
    binding: Arc<str>,
    destination: Arc<str>,
    metrics: SourceMetrics,
    max_payload_bytes: usize,
    /// The content-type header, built once and shared by every message.
    headers: Headers,
    /// Gives values sent without an explicit key theirs.
    key_of: Option<Arc<KeyFn<T>>>,
    /// Gives values their message id instead of a generated one.
    id_of: Option<Arc<KeyFn<T>>>,
    /// [`header::SENT_AT`] and [`header::MESSAGE_ID`], made once: a `&str` name would be
    /// copied into a new string on every send.
    sent_at_name: Arc<str>,
    message_id_name: Arc<str>,
}

type KeyFn<T> = dyn Fn(&T) -> String + Send + Sync;

impl<T> Clone for Source<T> {
    fn clone(&self) -> Self {
        Source {
            producer: self.producer.clone(),
            codec: self.codec.clone(),
            binding: self.binding.clone(),
            destination: self.destination.clone(),
            metrics: self.metrics.clone(),
            max_payload_bytes: self.max_payload_bytes,
            headers: self.headers.clone(),
            key_of: self.key_of.clone(),
            id_of: self.id_of.clone(),
            sent_at_name: self.sent_at_name.clone(),
            message_id_name: self.message_id_name.clone(),
        }
    }
}

impl<T: 'static> fmt::Debug for Source<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Source")
            .field("destination", &self.destination)
            .field("content_type", &self.codec.content_type())
            .finish()
    }
}

impl<T: 'static> Source<T> {
    pub(crate) fn new(
        producer: Arc<dyn Producer>,
        codec: Arc<dyn Codec<T>>,
        binding: &str,
        destination: &str,
        max_payload_bytes: usize,
    ) -> Self {
        let headers = Headers::from_iter([(header::CONTENT_TYPE, codec.content_type())]);
        Source {
            producer,
            codec,
            binding: binding.into(),
            destination: destination.into(),
            metrics: SourceMetrics::new(binding, destination),
            max_payload_bytes,
            headers,
            key_of: None,
            id_of: None,
            sent_at_name: header::SENT_AT.into(),
            message_id_name: header::MESSAGE_ID.into(),
        }
    }

    /// Keys every value that [`send`](Source::send) and [`send_batch`](Source::send_batch)
    /// publish with `key_of(value)`, so values with one key are handled in order and, on a
    /// partitioned binding, land in one partition.
    ///
    /// ```
    /// # async fn doc(source: stream_core::Source<(u64, String)>) -> stream_core::Result<()> {
    /// let orders = source.keyed_by(|(order_id, _): &(u64, String)| order_id.to_string());
    /// orders.send(&(7, "created".into())).await?; // key "7"
    /// # Ok(()) }
    /// ```
    pub fn keyed_by(mut self, key_of: impl Fn(&T) -> String + Send + Sync + 'static) -> Self {
        self.key_of = Some(Arc::new(key_of));
        self
    }

    /// Gives every value [`send`](Source::send) and [`send_batch`](Source::send_batch)
    /// publish the message id `id_of(value)` ([`header::MESSAGE_ID`]) instead of a generated
    /// one: an id from the domain (the order id and the event) makes a value published twice
    /// (a retried request, a replayed job) the same message to an idempotent consumer.
    pub fn identified_by(mut self, id_of: impl Fn(&T) -> String + Send + Sync + 'static) -> Self {
        self.id_of = Some(Arc::new(id_of));
        self
    }

    /// The destination this source publishes to.
    pub fn destination(&self) -> &str {
        &self.destination
    }

    /// Encodes `value` into a message with its `content-type` header and its key, if the
    /// source is [`keyed_by`](Source::keyed_by) a function, to add a key or headers
    /// before [`send_message`](Source::send_message).
    pub fn encode(&self, value: &T) -> Result<Message> {
        let payload = self.codec.encode(value)?;
        let mut message = Message::new(payload).with_headers(self.headers.clone());
        if let Some(id_of) = &self.id_of {
            message = message.with_header(header::MESSAGE_ID, id_of(value));
        }
        Ok(match &self.key_of {
            Some(key_of) => message.with_key(key_of(value)),
            None => message,
        })
    }

    /// Publishes `value`, keyed if the source is [`keyed_by`](Source::keyed_by) a function.
    pub async fn send(&self, value: &T) -> Result<String> {
        self.send_message(self.encode(value)?).await
    }

    /// Publishes `value` under `key`; messages with one key are handled in order. The key
    /// given here wins over [`keyed_by`](Source::keyed_by).
    pub async fn send_keyed(&self, key: impl Into<String>, value: &T) -> Result<String> {
        self.send_message(self.encode(value)?.with_key(key)).await
    }

    /// Publishes a prepared message. It gets the `x-sent-at` header (and, with the
    /// `opentelemetry` feature, the trace context of its `stream.send` span).
    pub async fn send_message(&self, mut message: Message) -> Result<String> {
        let span = trace::send_span(&self.binding, &self.destination, message.key());
        if let Err(e) = self.check_size(&message) {
            return Err(self.failed(&span, 1, e));
        }
        self.stamp(&span, &mut message, &now_millis());
        match self.producer.send(message).instrument(span.clone()).await {
            Ok(id) => {
                span.record("message.id", id.as_str());
                self.metrics.published(1);
                Ok(id)
            }
            Err(e) => Err(self.failed(&span, 1, e)),
        }
    }

    /// Publishes several values in order, in as few round trips as the binder allows.
    pub async fn send_batch<'a, I>(&self, values: I) -> Result<Vec<String>>
    where
        I: IntoIterator<Item = &'a T>,
        T: 'a,
    {
        let messages = values
            .into_iter()
            .map(|v| self.encode(v))
            .collect::<Result<Vec<_>>>()?;
        self.send_messages(messages).await
    }

    /// Publishes several prepared messages in order, under one `stream.send` span.
    pub async fn send_messages(&self, mut messages: Vec<Message>) -> Result<Vec<String>> {
        let span = trace::send_span(&self.binding, &self.destination, None);
        for message in &messages {
            if let Err(e) = self.check_size(message) {
                return Err(self.failed(&span, messages.len(), e));
            }
        }
        let sent_at = now_millis();
        for message in &mut messages {
            self.stamp(&span, message, &sent_at);
        }
        let count = messages.len();
        match self
            .producer
            .send_batch(messages)
            .instrument(span.clone())
            .await
        {
            Ok(ids) => {
                self.metrics.published(count);
                Ok(ids)
            }
            Err(e) => Err(self.failed(&span, count, e)),
        }
    }

    /// Sets the message id unless the message has one, the send time (shared by the
    /// messages of one batch: one clock read per batch) and, with the `opentelemetry`
    /// feature, the trace context.
    fn stamp(&self, span: &tracing::Span, message: &mut Message, sent_at: &Arc<str>) {
        let id = message.message_id().is_none().then(new_message_id);
        let headers = message.headers_mut();
        headers.reserve(2);
        if let Some(id) = id {
            headers.append(self.message_id_name.clone(), id);
        }
        headers.insert(self.sent_at_name.clone(), sent_at.clone());
        trace::inject(span, headers);
    }

    fn failed(&self, span: &tracing::Span, count: usize, error: Error) -> Error {
        span.record("error", tracing::field::display(&error));
        self.metrics.failed(count, error.kind());
        error
    }

    /// Waits until everything sent is accepted by the broker.
    pub async fn flush(&self) -> Result<()> {
        self.producer.flush().await
    }

    /// Flushes and releases the producer; later sends fail.
    pub async fn close(&self) -> Result<()> {
        self.producer.close().await
    }

    fn check_size(&self, message: &Message) -> Result<()> {
        let size = message.payload().len();
        if size > self.max_payload_bytes {
            return Err(Error::new(
                ErrorKind::PayloadTooLarge,
                format!(
                    "payload of {size} bytes for `{}` is over the binding's limit of {} bytes \
                     (max-payload-bytes)",
                    self.destination, self.max_payload_bytes
                ),
            ));
        }
        Ok(())
    }
}

/// A new message id, as [`Arc<str>`] for the header.
fn new_message_id() -> Arc<str> {
    let mut text = uuid::Uuid::encode_buffer();
    Arc::from(
        &*crate::message::message_uuid()
            .hyphenated()
            .encode_lower(&mut text),
    )
}
