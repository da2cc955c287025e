//! Binder wrappers that make a real binder misbehave in one controlled way, so the suite can
//! check how core copes on every binder.

use std::sync::Arc;

use async_trait::async_trait;

use crate::{
    Binder, BindingConfig, Consumer, ConsumerOptions, DeliveryTag, Error, ErrorKind, Message,
    Producer, Received, Result,
};

/// Wraps a binder so that one `receive` returns at most `limit` deliveries, as a broker
/// that hands out what one partition fetched does (Kafka across several brokers).
#[derive(Clone)]
pub struct ShortReceives {
    inner: Arc<dyn Binder>,
    limit: usize,
}

impl ShortReceives {
    /// Wraps `inner`, returning at most `limit` (at least 1) deliveries per receive.
    pub fn new(inner: Arc<dyn Binder>, limit: usize) -> Self {
        ShortReceives {
            inner,
            limit: limit.max(1),
        }
    }
}

#[async_trait]
impl Binder for ShortReceives {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    async fn producer(&self, destination: &str) -> Result<Box<dyn Producer>> {
        self.inner.producer(destination).await
    }

    async fn dead_letter_producer(&self, destination: &str) -> Result<Box<dyn Producer>> {
        self.inner.dead_letter_producer(destination).await
    }

    fn check_binding(&self, name: &str, binding: &BindingConfig) -> Result<()> {
        self.inner.check_binding(name, binding)
    }

    async fn consumer(
        &self,
        destination: &str,
        options: &ConsumerOptions,
    ) -> Result<Box<dyn Consumer>> {
        Ok(Box::new(ShortConsumer {
            inner: self.inner.consumer(destination, options).await?,
            limit: self.limit,
        }))
    }

    async fn prepare_partitions(&self, destination: &str, partitions: u32) -> Result<bool> {
        self.inner.prepare_partitions(destination, partitions).await
    }

    async fn ping(&self) -> Result<()> {
        self.inner.ping().await
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

struct ShortConsumer {
    inner: Box<dyn Consumer>,
    limit: usize,
}

#[async_trait]
impl Consumer for ShortConsumer {
    async fn receive(&self, max: usize) -> Result<Vec<Received>> {
        self.inner.receive(max.min(self.limit)).await
    }

    async fn ack(&self, tags: &[DeliveryTag]) -> Result<()> {
        self.inner.ack(tags).await
    }

    fn holds(&self, tag: DeliveryTag) -> bool {
        self.inner.holds(tag)
    }

    async fn release(&self, tags: &[DeliveryTag]) -> Result<()> {
        self.inner.release(tags).await
    }

    async fn retrying(&self, tag: DeliveryTag, attempt: u32) -> Result<()> {
        self.inner.retrying(tag, attempt).await
    }

    async fn lag(&self) -> Result<Option<u64>> {
        self.inner.lag().await
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

/// How [`RefusingDeadLetters`] refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The dead-letter producer cannot be made (a missing destination that may not be
    /// created, say).
    Open,
    /// Every dead letter is refused for good (too large for the destination, say).
    Publish,
}

/// Wraps a binder so that its dead-letter destination refuses with a permanent error.
#[derive(Clone)]
pub struct RefusingDeadLetters {
    inner: Arc<dyn Binder>,
    refusal: Refusal,
}

impl RefusingDeadLetters {
    /// Wraps `inner`; dead letters are refused as `refusal` says.
    pub fn new(inner: Arc<dyn Binder>, refusal: Refusal) -> Self {
        RefusingDeadLetters { inner, refusal }
    }
}

/// The error every refusal carries.
pub const REFUSAL: &str = "the dead-letter destination refuses this message for good";

#[async_trait]
impl Binder for RefusingDeadLetters {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    async fn producer(&self, destination: &str) -> Result<Box<dyn Producer>> {
        self.inner.producer(destination).await
    }

    async fn dead_letter_producer(&self, destination: &str) -> Result<Box<dyn Producer>> {
        match self.refusal {
            Refusal::Open => Err(Error::new(
                ErrorKind::DestinationNotFound,
                format!("{REFUSAL}: `{destination}`"),
            )),
            Refusal::Publish => Ok(Box::new(RefusingProducer)),
        }
    }

    fn check_binding(&self, name: &str, binding: &BindingConfig) -> Result<()> {
        self.inner.check_binding(name, binding)
    }

    async fn consumer(
        &self,
        destination: &str,
        options: &ConsumerOptions,
    ) -> Result<Box<dyn Consumer>> {
        self.inner.consumer(destination, options).await
    }

    async fn prepare_partitions(&self, destination: &str, partitions: u32) -> Result<bool> {
        self.inner.prepare_partitions(destination, partitions).await
    }

    async fn ping(&self) -> Result<()> {
        self.inner.ping().await
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

struct RefusingProducer;

#[async_trait]
impl Producer for RefusingProducer {
    async fn send(&self, _message: Message) -> Result<String> {
        Err(Error::new(ErrorKind::PayloadTooLarge, REFUSAL))
    }
}

/// Wraps a binder so that its producers' first `failures` sends fail with a temporary
/// [`ErrorKind::Connection`] error before reaching the broker, as a broker that is briefly
/// unreachable does.
#[derive(Clone)]
pub struct FailingSends {
    inner: Arc<dyn Binder>,
    left: Arc<std::sync::atomic::AtomicUsize>,
}

impl FailingSends {
    /// Wraps `inner`; the first `failures` sends (of any of its producers) fail.
    pub fn new(inner: Arc<dyn Binder>, failures: usize) -> Self {
        FailingSends {
            inner,
            left: Arc::new(std::sync::atomic::AtomicUsize::new(failures)),
        }
    }

    fn fails_now(&self) -> bool {
        use std::sync::atomic::Ordering;
        self.left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

/// The error a [`FailingSends`] send fails with.
pub const SEND_FAILURE: &str = "the broker did not answer (a test fault)";

#[async_trait]
impl Binder for FailingSends {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    async fn producer(&self, destination: &str) -> Result<Box<dyn Producer>> {
        Ok(Box::new(FailingProducer {
            inner: self.inner.producer(destination).await?,
            faults: self.clone(),
        }))
    }

    async fn dead_letter_producer(&self, destination: &str) -> Result<Box<dyn Producer>> {
        self.inner.dead_letter_producer(destination).await
    }

    fn check_binding(&self, name: &str, binding: &BindingConfig) -> Result<()> {
        self.inner.check_binding(name, binding)
    }

    async fn consumer(
        &self,
        destination: &str,
        options: &ConsumerOptions,
    ) -> Result<Box<dyn Consumer>> {
        self.inner.consumer(destination, options).await
    }

    async fn prepare_partitions(&self, destination: &str, partitions: u32) -> Result<bool> {
        self.inner.prepare_partitions(destination, partitions).await
    }

    async fn ping(&self) -> Result<()> {
        self.inner.ping().await
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

struct FailingProducer {
    inner: Box<dyn Producer>,
    faults: FailingSends,
}

impl FailingProducer {
    fn fault(&self) -> Result<()> {
        if self.faults.fails_now() {
            return Err(Error::new(ErrorKind::Connection, SEND_FAILURE));
        }
        Ok(())
    }
}

#[async_trait]
impl Producer for FailingProducer {
    async fn send(&self, message: Message) -> Result<String> {
        self.fault()?;
        self.inner.send(message).await
    }

    async fn send_batch(&self, messages: Vec<Message>) -> Result<Vec<String>> {
        self.fault()?;
        self.inner.send_batch(messages).await
    }

    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}
