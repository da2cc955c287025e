//! A binder wrapper that observes what core asks of the transport.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;

use crate::{
    Binder, BindingConfig, Consumer, ConsumerOptions, DeliveryTag, Producer, Received, Result,
};

/// Wraps a binder and counts, over all its consumers, deliveries received, acknowledged and
/// released, the most held un-acknowledged at once, and acks seen before each consumer
/// closed.
#[derive(Clone)]
pub struct CountingBinder {
    inner: Arc<dyn Binder>,
    counts: Arc<Counts>,
}

#[derive(Default)]
struct Counts {
    received: AtomicUsize,
    acked: AtomicUsize,
    max_outstanding: AtomicUsize,
    acked_at_close: AtomicUsize,
    released: AtomicUsize,
    closed: AtomicUsize,
}

impl CountingBinder {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Binder>) -> Self {
        CountingBinder {
            inner,
            counts: Arc::default(),
        }
    }

    /// Deliveries received.
    pub fn received(&self) -> usize {
        self.counts.received.load(Ordering::SeqCst)
    }

    /// Deliveries acknowledged.
    pub fn acked(&self) -> usize {
        self.counts.acked.load(Ordering::SeqCst)
    }

    /// Deliveries handed back unstarted ([`Consumer::release`]).
    pub fn released(&self) -> usize {
        self.counts.released.load(Ordering::SeqCst)
    }

    /// Consumer closes that have returned.
    pub fn closed(&self) -> usize {
        self.counts.closed.load(Ordering::SeqCst)
    }

    /// The most deliveries held un-acknowledged at one time by one consumer.
    pub fn max_outstanding(&self) -> usize {
        self.counts.max_outstanding.load(Ordering::SeqCst)
    }

    /// Acknowledgements sent before the last consumer close began.
    pub fn acked_at_close(&self) -> usize {
        self.counts.acked_at_close.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Binder for CountingBinder {
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
        let inner = self.inner.consumer(destination, options).await?;
        Ok(Box::new(CountingConsumer {
            inner,
            counts: self.counts.clone(),
            outstanding: AtomicUsize::new(0),
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

struct CountingConsumer {
    inner: Box<dyn Consumer>,
    counts: Arc<Counts>,
    outstanding: AtomicUsize,
}

#[async_trait]
impl Consumer for CountingConsumer {
    async fn receive(&self, max: usize) -> Result<Vec<Received>> {
        let batch = self.inner.receive(max).await?;
        let now = self.outstanding.fetch_add(batch.len(), Ordering::SeqCst) + batch.len();
        self.counts
            .received
            .fetch_add(batch.len(), Ordering::SeqCst);
        self.counts.max_outstanding.fetch_max(now, Ordering::SeqCst);
        Ok(batch)
    }

    async fn ack(&self, tags: &[DeliveryTag]) -> Result<()> {
        self.inner.ack(tags).await?;
        self.outstanding.fetch_sub(tags.len(), Ordering::SeqCst);
        self.counts.acked.fetch_add(tags.len(), Ordering::SeqCst);
        Ok(())
    }

    fn holds(&self, tag: DeliveryTag) -> bool {
        self.inner.holds(tag)
    }

    async fn release(&self, tags: &[DeliveryTag]) -> Result<()> {
        self.inner.release(tags).await?;
        self.outstanding.fetch_sub(tags.len(), Ordering::SeqCst);
        self.counts.released.fetch_add(tags.len(), Ordering::SeqCst);
        Ok(())
    }

    async fn retrying(&self, tag: DeliveryTag, attempt: u32) -> Result<()> {
        self.inner.retrying(tag, attempt).await
    }

    async fn lag(&self) -> Result<Option<u64>> {
        self.inner.lag().await
    }

    async fn close(&self) -> Result<()> {
        self.counts
            .acked_at_close
            .store(self.counts.acked.load(Ordering::SeqCst), Ordering::SeqCst);
        let closed = self.inner.close().await;
        self.counts.closed.fetch_add(1, Ordering::SeqCst);
        closed
    }
}
