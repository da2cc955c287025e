//! Processors: consume from one binding, transform, publish to another, as one unit.

use std::future::Future;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::handler::HandlerError;
use crate::message::{header, Headers};
use crate::sink::{Envelope, Sink, Subscription};
use crate::source::Source;
use crate::{BoxError, Error, Message, Result, Streams};

/// One message a processor publishes, with a key or headers of its own.
///
/// Without [`key`](Output::key), the output keeps the key of the input it came from, so a
/// key's order carries across the hop. Without [`id`](Output::id), its message id is the
/// input's followed by `/` and its index among the outputs: processing an input twice gives
/// the same ids.
#[derive(Debug, Clone)]
pub struct Output<O> {
    value: O,
    key: Option<String>,
    id: Option<String>,
    headers: Headers,
}

impl<O> Output<O> {
    /// `value`, keyed like its input.
    pub fn new(value: O) -> Self {
        Output {
            value,
            key: None,
            id: None,
            headers: Headers::new(),
        }
    }

    /// Publishes under `key` instead of the input's key.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Publishes with this message id ([`header::MESSAGE_ID`]) instead of the one made from
    /// the input's.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<Arc<str>>, value: impl Into<Arc<str>>) -> Self {
        self.headers.append(name, value);
        self
    }
}

impl Streams {
    /// Consumes from the `input` binding, calls `f` on each value and publishes what it
    /// returns to the `output` binding, until the returned [`Subscription`] is shut down.
    ///
    /// `f` returns zero, one or many outputs: `Option<O>`, `Vec<O>`, `[O; N]` or any other
    /// `IntoIterator`. The input is acknowledged only after the broker accepted every
    /// output: at-least-once across the hop (a crash in between publishes the outputs
    /// again). Each output keeps the input's key and carries the input's id in the
    /// [`x-input-id`](crate::header::INPUT_ID) header;
    /// [`processor_envelope`](Streams::processor_envelope) sets keys and headers of its
    /// own. The output binding may be on another binder than the input (Redis in, Kafka
    /// out).
    ///
    /// Failures follow the input binding's policy: an error from `f` or a temporary publish
    /// failure is a failed attempt (retried, then dead-lettered); an output that cannot be
    /// encoded or that the broker refuses for good (too large) rejects the input at once,
    /// since trying again would fail the same way.
    ///
    /// ```no_run
    /// # async fn run(streams: stream_core::Streams) -> stream_core::Result<()> {
    /// #[derive(serde::Serialize, serde::Deserialize)]
    /// struct Order { id: String, cents: u64 }
    /// #[derive(serde::Serialize, serde::Deserialize)]
    /// struct Charge { order: String, cents: u64 }
    ///
    /// let charging = streams
    ///     .processor("orders-in", "charges-out", |order: Order| async move {
    ///         // Free orders need no charge: no output.
    ///         let charge = (order.cents > 0).then(|| Charge { order: order.id, cents: order.cents });
    ///         Ok::<_, std::io::Error>(charge)
    ///     })
    ///     .await?;
    /// # charging.shutdown().await
    /// # }
    /// ```
    pub async fn processor<I, O, F, Fut, R, E>(
        &self,
        input: &str,
        output: &str,
        f: F,
    ) -> Result<Subscription>
    where
        I: Serialize + DeserializeOwned + Send + 'static,
        O: Serialize + DeserializeOwned + Send + Sync + 'static,
        F: Fn(I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<R, E>> + Send + 'static,
        R: IntoIterator<Item = O> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        let sink = self.sink::<I>(input)?;
        sink.process(self.source::<O>(output).await?, f).await
    }

    /// Like [`processor`](Streams::processor), with the input's [`Envelope`] (key, headers,
    /// attempt) and [`Output`]s that may set their own key and headers.
    pub async fn processor_envelope<I, O, F, Fut, R, E>(
        &self,
        input: &str,
        output: &str,
        f: F,
    ) -> Result<Subscription>
    where
        I: Serialize + DeserializeOwned + Send + 'static,
        O: Serialize + DeserializeOwned + Send + Sync + 'static,
        F: Fn(Envelope<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<R, E>> + Send + 'static,
        R: IntoIterator<Item = Output<O>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        let sink = self.sink::<I>(input)?;
        sink.process_envelope(self.source::<O>(output).await?, f)
            .await
    }
}

impl<I: Send + 'static> Sink<I> {
    /// The processor of [`Streams::processor`] on this sink, publishing to `output`.
    pub async fn process<O, F, Fut, R, E>(&self, output: Source<O>, f: F) -> Result<Subscription>
    where
        O: Send + Sync + 'static,
        F: Fn(I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<R, E>> + Send + 'static,
        R: IntoIterator<Item = O> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        self.process_envelope(output, move |envelope: Envelope<I>| {
            let outputs = f(envelope.into_payload());
            async move {
                let outputs = outputs.await?;
                Ok::<_, E>(outputs.into_iter().map(Output::new).collect::<Vec<_>>())
            }
        })
        .await
    }

    /// The processor of [`Streams::processor_envelope`] on this sink, publishing to
    /// `output`.
    pub async fn process_envelope<O, F, Fut, R, E>(
        &self,
        output: Source<O>,
        f: F,
    ) -> Result<Subscription>
    where
        O: Send + Sync + 'static,
        F: Fn(Envelope<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<R, E>> + Send + 'static,
        R: IntoIterator<Item = Output<O>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        let source = Arc::new(output);
        self.subscribe_envelope(move |envelope: Envelope<I>| {
            let source = source.clone();
            let input_id: Arc<str> = envelope.message().id().into();
            let input_message_id: Arc<str> = envelope
                .message()
                .message_id()
                .unwrap_or_else(|| envelope.message().id())
                .into();
            let input_key = envelope.message().key().map(str::to_owned);
            let outputs = f(envelope);
            async move {
                let outputs = outputs.await.map_err(Into::into)?;
                let mut messages = outputs
                    .into_iter()
                    .enumerate()
                    .map(|(index, output)| {
                        // Made from the input's id, so that processing an input again gives
                        // its outputs the same ids, which an idempotent consumer drops.
                        let id = format!("{input_message_id}/{index}");
                        encode(&source, output, &input_id, input_key.as_deref(), id)
                    })
                    .collect::<Result<Vec<_>>>()
                    .map_err(HandlerError::reject)?;
                let sent = match messages.len() {
                    0 => return Ok(()),
                    // One output gets the send span of one message (its key and id).
                    1 => {
                        let message = messages.pop().expect("one message");
                        source.send_message(message).await.map(drop)
                    }
                    _ => source.send_messages(messages).await.map(drop),
                };
                sent.map_err(|e| -> BoxError {
                    if e.is_temporary() {
                        e.into()
                    } else {
                        HandlerError::reject(e).into()
                    }
                })
            }
        })
        .await
    }
}

fn encode<O: 'static>(
    source: &Source<O>,
    output: Output<O>,
    input_id: &Arc<str>,
    input_key: Option<&str>,
    derived_id: String,
) -> std::result::Result<Message, Error> {
    let mut message = source.encode(&output.value)?;
    let id = output.id.unwrap_or(derived_id);
    message.headers_mut().insert(header::MESSAGE_ID, id);
    if let Some(key) = output.key.as_deref().or(input_key) {
        message = message.with_key(key);
    }
    let headers = message.headers_mut();
    for (name, value) in output.headers.iter() {
        headers.append(name, value);
    }
    headers.insert(header::INPUT_ID, input_id.clone());
    Ok(message)
}
