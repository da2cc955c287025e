//! Publishing: one idempotent librdkafka producer per binder, shared by every destination.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer as _};
use rdkafka::types::RDKafkaErrorCode;
use stream_core::{Error, ErrorKind, Message, Producer, Result};

use crate::error::convert;

/// The librdkafka producer behind every [`KafkaProducer`] of one binder: one connection pool
/// and one batching queue, whatever the number of destinations.
pub(crate) struct SharedProducer {
    pub(crate) inner: FutureProducer,
    /// Bounds a flush; also the delivery timeout, so a flush outlives every queued message.
    pub(crate) delivery_timeout: Duration,
}

impl SharedProducer {
    /// Waits until everything queued is delivered or failed.
    pub(crate) async fn flush(&self) -> Result<()> {
        let producer = self.inner.clone();
        // A little over the delivery timeout: by then every message has a delivery report.
        let timeout = self.delivery_timeout + Duration::from_secs(1);
        tokio::task::spawn_blocking(move || producer.flush(timeout))
            .await
            .map_err(|e| Error::new(ErrorKind::Broker, "flush task failed").with_source(e))?
            .map_err(|e| convert(e, "flushing the Kafka producer"))
    }
}

/// Publishes to one topic. `send` returns once the broker acknowledged the message to every
/// in-sync replica (`acks=all`); ids are `partition@offset`.
pub(crate) struct KafkaProducer {
    shared: Arc<SharedProducer>,
    topic: String,
    closed: AtomicBool,
}

impl KafkaProducer {
    pub(crate) fn new(shared: Arc<SharedProducer>, topic: &str) -> Self {
        KafkaProducer {
            shared,
            topic: topic.to_owned(),
            closed: AtomicBool::new(false),
        }
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::new(
                ErrorKind::Closed,
                format!("the producer of Kafka topic `{}` is closed", self.topic),
            ));
        }
        Ok(())
    }

    fn record<'a>(&'a self, message: &'a Message) -> FutureRecord<'a, str, [u8]> {
        let mut record = FutureRecord::to(&self.topic).payload(message.payload().as_ref());
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        if let Some(partition) = message.partition() {
            // Core picked it (a partitioned binding) with the hash librdkafka's
            // `murmur2_random` partitioner uses, so keyed messages land where Kafka's own
            // partitioner would put them.
            record = record.partition(i32::try_from(partition).unwrap_or(i32::MAX));
        }
        if !message.headers().is_empty() {
            let headers = message.headers().iter().fold(
                OwnedHeaders::new_with_capacity(message.headers().len()),
                |h, (name, value)| {
                    h.insert(Header {
                        key: name,
                        value: Some(value),
                    })
                },
            );
            record = record.headers(headers);
        }
        record
    }

    /// Queues `message` in librdkafka. A full queue is waited out: first on this batch's
    /// oldest pending delivery (which frees room), else inside librdkafka.
    async fn enqueue(
        &self,
        message: &Message,
        pending: &mut VecDeque<DeliveryFuture>,
        done: &mut Vec<Result<String>>,
    ) -> Result<Option<DeliveryFuture>> {
        let mut record = self.record(message);
        loop {
            match self.shared.inner.send_result(record) {
                Ok(delivery) => return Ok(Some(delivery)),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    match pending.pop_front() {
                        Some(oldest) => done.push(self.report(oldest.await)),
                        None => {
                            // Queue filled by other senders: let librdkafka wait for room,
                            // bounded by the delivery timeout.
                            let result = self
                                .shared
                                .inner
                                .send(record, self.shared.delivery_timeout)
                                .await;
                            done.push(self.outcome(result));
                            return Ok(None);
                        }
                    }
                }
                Err((e, _)) => return Err(self.error(e)),
            }
        }
    }

    fn report(
        &self,
        delivery: Result<OwnedDeliveryResult, futures::channel::oneshot::Canceled>,
    ) -> Result<String> {
        match delivery {
            Ok(result) => self.outcome(result),
            Err(_) => Err(Error::new(
                ErrorKind::Closed,
                format!(
                    "the Kafka producer was dropped before `{}` confirmed delivery",
                    self.topic
                ),
            )),
        }
    }

    fn outcome(&self, result: OwnedDeliveryResult) -> Result<String> {
        match result {
            Ok(delivery) => Ok(format!("{}@{}", delivery.partition, delivery.offset)),
            Err((e, _)) => Err(self.error(e)),
        }
    }

    fn error(&self, error: KafkaError) -> Error {
        convert(error, format!("publishing to Kafka topic `{}`", self.topic))
    }
}

#[async_trait]
impl Producer for KafkaProducer {
    async fn send(&self, message: Message) -> Result<String> {
        self.check_open()?;
        let mut pending = VecDeque::new();
        let mut done = Vec::new();
        match self.enqueue(&message, &mut pending, &mut done).await? {
            Some(delivery) => self.report(delivery.await),
            // `enqueue` reported the outcome itself.
            None => done.pop().unwrap_or_else(|| {
                Err(Error::new(
                    ErrorKind::Broker,
                    format!("no delivery report for a message to `{}`", self.topic),
                ))
            }),
        }
    }

    async fn send_batch(&self, messages: Vec<Message>) -> Result<Vec<String>> {
        self.check_open()?;
        // Everything is queued before anything is awaited, so librdkafka batches the lot;
        // idempotence keeps them in order per partition even across retries.
        let mut pending: VecDeque<DeliveryFuture> = VecDeque::with_capacity(messages.len());
        let mut done: Vec<Result<String>> = Vec::with_capacity(messages.len());
        let mut failure = None;
        for message in &messages {
            match self.enqueue(message, &mut pending, &mut done).await {
                Ok(Some(delivery)) => pending.push_back(delivery),
                Ok(None) => {}
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        // Awaited even after a failure, so no report is left behind.
        for delivery in pending {
            done.push(self.report(delivery.await));
        }
        if let Some(e) = failure {
            return Err(e);
        }
        done.into_iter().collect()
    }

    async fn flush(&self) -> Result<()> {
        self.shared.flush().await
    }

    async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.shared.flush().await
    }
}
