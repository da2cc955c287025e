//! Publishing: one idempotent librdkafka producer per binder, shared by every destination.
//!
//! Delivery reports come back on librdkafka's polling thread. Each `send` or `send_batch`
//! owns a [`Reports`] that the reports of its messages fill in; the task awaiting it is woken
//! once, when the last report arrives, rather than once per message as with rdkafka's
//! `FutureProducer` (a channel and a wake-up per message cost more than librdkafka's own
//! work when thousands of messages are in flight).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Message as _, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer as _, ProducerContext, ThreadedProducer,
};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientContext;
use stream_core::{Error, ErrorKind, Message, Producer, Result};

use crate::error::convert;

/// The librdkafka producer behind every [`KafkaProducer`] of one binder: one connection pool
/// and one batching queue, whatever the number of destinations.
pub(crate) struct SharedProducer {
    pub(crate) inner: ThreadedProducer<DeliveryRouter>,
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

/// Hands each delivery report to the [`Reports`] its message belongs to.
///
/// A message carries only a number through librdkafka (its slot here), not an allocation of
/// its own: an allocation made on the sending thread and freed on librdkafka's polling
/// thread defeats the allocator's per-thread caches, and cost more than librdkafka's work
/// per message.
#[derive(Default)]
pub(crate) struct DeliveryRouter {
    slots: Mutex<Slots>,
}

#[derive(Default)]
struct Slots {
    /// The reports and the index in them of each message in flight.
    taken: Vec<Option<(Arc<Reports>, usize)>>,
    free: Vec<usize>,
}

impl DeliveryRouter {
    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        // Only plain assignments happen under this lock: a panic cannot leave it half-done.
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot for a message whose report goes to `reports` at `index`.
    fn slot(&self, reports: Arc<Reports>, index: usize) -> usize {
        let mut slots = self.lock();
        match slots.free.pop() {
            Some(slot) => {
                slots.taken[slot] = Some((reports, index));
                slot
            }
            None => {
                slots.taken.push(Some((reports, index)));
                slots.taken.len() - 1
            }
        }
    }

    /// Reports the outcome of the message in `slot` and frees the slot.
    fn report(&self, slot: usize, outcome: Outcome) {
        let taken = {
            let mut slots = self.lock();
            let taken = slots.taken.get_mut(slot).and_then(Option::take);
            if taken.is_some() {
                slots.free.push(slot);
            }
            taken
        };
        if let Some((reports, index)) = taken {
            reports.fill(index, outcome);
        }
    }
}

impl Drop for DeliveryRouter {
    /// Whatever librdkafka never reported still ends its sender's wait, as not delivered.
    fn drop(&mut self) {
        let slots = std::mem::take(&mut *self.lock());
        for (reports, index) in slots.taken.into_iter().flatten() {
            reports.fill(index, Err(KafkaError::Canceled));
        }
    }
}

impl ClientContext for DeliveryRouter {}

impl ProducerContext for DeliveryRouter {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, slot: usize) {
        self.report(
            slot,
            match result {
                Ok(message) => Ok((message.partition(), message.offset())),
                Err((error, _)) => Err(error.clone()),
            },
        );
    }
}

/// Partition and offset, or why the message was not delivered.
type Outcome = std::result::Result<(i32, i64), KafkaError>;

/// The delivery reports of one `send` or `send_batch`, in the order of its messages.
#[derive(Default)]
struct Reports {
    state: Mutex<ReportsState>,
}

#[derive(Default)]
struct ReportsState {
    outcomes: Vec<Option<Outcome>>,
    /// Reports still to come for messages librdkafka accepted.
    outstanding: usize,
    waker: Option<Waker>,
}

impl Reports {
    fn with_capacity(count: usize) -> Arc<Reports> {
        Arc::new(Reports {
            state: Mutex::new(ReportsState {
                outcomes: Vec::with_capacity(count),
                ..ReportsState::default()
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ReportsState> {
        // Only plain assignments happen under this lock: a panic cannot leave it half-done.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Room for the report of one more message, before it is handed to librdkafka: its
    /// index.
    fn expect_one(&self) -> usize {
        let mut state = self.lock();
        state.outcomes.push(None);
        state.outstanding += 1;
        state.outcomes.len() - 1
    }

    fn fill(&self, index: usize, outcome: Outcome) {
        let waker = {
            let mut state = self.lock();
            state.outcomes[index] = Some(outcome);
            state.outstanding -= 1;
            if state.outstanding == 0 {
                state.waker.take()
            } else {
                None
            }
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Waits for every report. Cancel-safe: dropping it leaves the reports to fill a value
    /// nobody reads.
    async fn all(&self) -> Vec<Option<Outcome>> {
        std::future::poll_fn(|cx| {
            let mut state = self.lock();
            if state.outstanding == 0 {
                Poll::Ready(std::mem::take(&mut state.outcomes))
            } else {
                state.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}

/// A record on its way to librdkafka.
type Record<'a> = BaseRecord<'a, str, [u8], usize>;

/// What became of a record offered to librdkafka.
enum Offer<'a> {
    Taken,
    /// Refused for good; the refusal is in the record's slot.
    Refused,
    /// The queue is full: the record is handed back.
    Full(Record<'a>),
}

/// How long a send waits before trying a full librdkafka queue again.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(1);

/// `partition@offset`, the id of a delivered message.
fn delivery_id(partition: i32, offset: i64) -> String {
    crate::record::delivery_id_in(&mut [0u8; 41], partition, offset).to_owned()
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

    fn router(&self) -> &DeliveryRouter {
        self.shared.inner.context()
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

    fn record<'a>(&'a self, message: &'a Message, slot: usize) -> Record<'a> {
        let mut record =
            BaseRecord::with_opaque_to(&self.topic, slot).payload(message.payload().as_ref());
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

    /// Hands `messages` to librdkafka in order, each with a slot in `reports`. A message
    /// librdkafka refuses gets its error as its report, and the ones after it are not sent
    /// (a gap would break the order the caller asked for).
    async fn enqueue(&self, messages: &[Message], reports: &Arc<Reports>) {
        for message in messages {
            let slot = self.router().slot(reports.clone(), reports.expect_one());
            match self.offer(self.record(message, slot)) {
                Offer::Taken => {}
                Offer::Refused => return,
                // Boxed: the wait is rare, and inline it would make every send's future
                // several times larger (thousands of them may be in flight).
                Offer::Full(record) => {
                    if !Box::pin(self.offer_when_room(record)).await {
                        return;
                    }
                }
            }
        }
    }

    /// Hands one record to librdkafka; a refusal is reported in the record's slot.
    fn offer<'a>(&self, record: Record<'a>) -> Offer<'a> {
        match self.shared.inner.send(record) {
            Ok(()) => Offer::Taken,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                Offer::Full(back)
            }
            Err((e, back)) => {
                self.router().report(back.delivery_opaque, Err(e));
                Offer::Refused
            }
        }
    }

    /// Offers `record` again until librdkafka's queue has room (it frees room as deliveries
    /// complete), for at most the delivery timeout. True once it is taken.
    async fn offer_when_room(&self, mut record: Record<'_>) -> bool {
        let deadline = Instant::now() + self.shared.delivery_timeout;
        loop {
            // A millisecond is far shorter than a produce round trip.
            tokio::time::sleep(QUEUE_FULL_PAUSE).await;
            record = match self.offer(record) {
                Offer::Taken => return true,
                Offer::Refused => return false,
                Offer::Full(back) if Instant::now() >= deadline => {
                    self.router().report(
                        back.delivery_opaque,
                        Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)),
                    );
                    return false;
                }
                Offer::Full(back) => back,
            };
        }
    }

    fn outcome(&self, outcome: Option<Outcome>) -> Result<String> {
        match outcome {
            Some(Ok((partition, offset))) => Ok(delivery_id(partition, offset)),
            Some(Err(e)) => Err(self.error(e)),
            None => Err(Error::new(
                ErrorKind::Broker,
                format!("no delivery report for a message to `{}`", self.topic),
            )),
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
        let reports = Reports::with_capacity(1);
        self.enqueue(std::slice::from_ref(&message), &reports).await;
        drop(message);
        let outcome = reports.all().await.pop().flatten();
        self.outcome(outcome)
    }

    async fn send_batch(&self, messages: Vec<Message>) -> Result<Vec<String>> {
        self.check_open()?;
        // Everything is queued before anything is awaited, so librdkafka batches the lot;
        // idempotence keeps them in order per partition even across retries.
        let reports = Reports::with_capacity(messages.len());
        self.enqueue(&messages, &reports).await;
        drop(messages);
        reports
            .all()
            .await
            .into_iter()
            .map(|outcome| self.outcome(outcome))
            .collect()
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
