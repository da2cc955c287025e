//! The Kafka binder against rdkafka used by hand: FutureProducer, StreamConsumer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord};
use stream_core::{Binder, BindingConfig, Channel, Codec, Json};

use crate::report::{
    compare_latency, compare_timed, lagging_consumer_rss, latency_through, paced,
    subscribe_counting, Payload, Report, Row, Samples, Settings, Stamped, BATCH,
};

/// Messages sent to a new topic before a publish run is timed.
const WARM_UP: usize = 5 * BATCH;

pub async fn run(settings: &Settings, report: &mut Report, brokers: &str) {
    ADMIN.get_or_init(|| {
        ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()
            .expect("admin client")
    });
    let binder = binder(brokers);
    let producer = raw_producer(brokers);
    for &size in &settings.sizes {
        let n = settings.kafka_publish_messages;
        let value = Payload::of_size(size);
        if settings.wants("publish") {
            let (ours, raw) = compare_timed(
                settings.runs,
                || publish_ours(&binder, n, &value),
                || publish_raw(&binder, &producer, n, &value),
            )
            .await;
            report.add(Row::ratio("kafka", "publish", size, ours, raw));
        }
        if settings.wants("publish-pipelined") {
            let n = settings.kafka_pipelined_messages;
            for (metric, pattern) in [
                ("publish, 10,000 sends in flight", Pipelined::Sends),
                ("publish, 20 batches of 500 in flight", Pipelined::Batches),
            ] {
                let (ours, raw) = compare_timed(
                    settings.runs,
                    || publish_pipelined_ours(&binder, n, &value, pattern),
                    || publish_ceiling(&binder, brokers, n, &value),
                )
                .await;
                report.add(Row::ratio("kafka", metric, size, ours, raw));
            }
        }
        if !settings.wants("consume") {
            continue;
        }
        // One backlog per size, read by a new group each run.
        let n = settings.kafka_consume_messages;
        let payload = Json::<Payload>::new().encode(&value).unwrap().to_vec();
        // Records as a `Source` writes them, then records without headers: what reading
        // our three headers costs a consumer that must read them.
        for (metric, headers) in [
            ("consume+ack", Headers::Ours),
            ("consume+ack, records without headers", Headers::None),
        ] {
            let topic = fresh_topic(&binder, "con").await;
            produce(&producer, &topic, n, || payload.clone(), headers).await;
            let (ours, raw) = compare_timed(
                settings.runs,
                || consume_ours(&binder, &topic, n),
                || consume_raw(brokers, &topic, n),
            )
            .await;
            report.add(Row::ratio("kafka", metric, size, ours, raw));
            drop_topic(&topic).await;
        }
    }
    if settings.wants("latency") {
        compare_latency(
            report,
            "kafka",
            64,
            settings.runs,
            || latency_ours(settings, &binder, 64),
            || latency_raw(settings, &binder, &producer, brokers, 64),
        )
        .await;
    }
    if settings.wants("rss") {
        backlog_rss(settings, report, &binder, &producer).await;
    }
}

pub fn binder(brokers: &str) -> Arc<dyn Binder> {
    let streams = stream_core::Streams::builder()
        .register(binder_kafka::register)
        .env(Vec::<(String, String)>::new())
        .load_str(&format!(
            "[binders.kafka]\ntype = \"kafka\"\nbrokers = \"{brokers}\"\n"
        ))
        .expect("bench configuration");
    streams.binder("kafka").expect("declared")
}

pub fn raw_producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .expect("producer")
}

/// A hand-written at-least-once consumer (offsets stored after processing, auto-commit),
/// with the same memory bound as the binder's defaults: librdkafka's default would buffer up
/// to 64 MiB (100,000 messages a partition) ahead of the application, and time spent
/// draining that buffer is not comparable with a consumer whose memory stays flat.
fn raw_consumer(brokers: &str, group: &str) -> StreamConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("queued.max.messages.kbytes", "1024")
        .set("fetch.queue.backoff.ms", "1")
        .create()
        .expect("consumer")
}

/// Deletes bench topics once measured: a full run writes tens of gigabytes otherwise.
static ADMIN: std::sync::OnceLock<
    rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext>,
> = std::sync::OnceLock::new();

async fn drop_topic(topic: &str) {
    if let Some(admin) = ADMIN.get() {
        // A topic left behind only costs disk: not worth failing the run for.
        let _ = admin
            .delete_topics(&[topic], &rdkafka::admin::AdminOptions::new())
            .await;
    }
}

/// A new topic, created through the binder so both sides get the same partitions.
async fn fresh_topic(binder: &Arc<dyn Binder>, name: &str) -> String {
    let topic = format!("bench-{name}-{}", stream_core::unique_suffix());
    let producer = binder.producer(&topic).await.expect("topic created");
    producer.close().await.unwrap();
    topic
}

async fn publish_ours(binder: &Arc<dyn Binder>, n: usize, value: &Payload) -> (usize, Duration) {
    let topic = fresh_topic(binder, "pub").await;
    let source = Channel::new("bench", binder.clone(), BindingConfig::new(&topic))
        .source::<Payload>()
        .await
        .unwrap();
    let batch: Vec<Payload> = vec![value.clone(); BATCH];
    // A new topic's first thousands of messages are slow on both sides (metadata, the
    // idempotent producer's per-partition state, new log segments): warm up untimed.
    for _ in 0..WARM_UP / BATCH {
        source.send_batch(&batch).await.unwrap();
    }
    let start = Instant::now();
    let mut sent = 0;
    while sent < n {
        let k = (n - sent).min(BATCH);
        source.send_batch(&batch[..k]).await.unwrap();
        sent += k;
    }
    let elapsed = start.elapsed();
    drop_topic(&topic).await;
    (n, elapsed)
}

/// How many messages the pipelined rows keep in flight.
const IN_FLIGHT: usize = 10_000;

/// How a service publishing a stream keeps [`IN_FLIGHT`] messages in flight.
#[derive(Clone, Copy)]
enum Pipelined {
    /// As many `Source::send` calls, each resolving on its own delivery report.
    Sends,
    /// `Source::send_batch` calls of [`BATCH`] messages.
    Batches,
}

async fn publish_pipelined_ours(
    binder: &Arc<dyn Binder>,
    n: usize,
    value: &Payload,
    pattern: Pipelined,
) -> (usize, Duration) {
    use futures::StreamExt as _;
    let topic = fresh_topic(binder, "pipe").await;
    let source = Channel::new("bench", binder.clone(), BindingConfig::new(&topic))
        .source::<Payload>()
        .await
        .unwrap();
    let batch: Vec<Payload> = vec![value.clone(); BATCH];
    let (source, batch) = (&source, &batch);
    let send_all = |count: usize| async move {
        match pattern {
            Pipelined::Sends => {
                futures::stream::iter(0..count)
                    .map(|_| source.send(value))
                    .buffer_unordered(IN_FLIGHT)
                    .for_each(|sent| {
                        sent.expect("delivered");
                        async {}
                    })
                    .await
            }
            Pipelined::Batches => {
                futures::stream::iter(0..count / BATCH)
                    .map(|_| source.send_batch(batch))
                    .buffer_unordered(IN_FLIGHT / BATCH)
                    .for_each(|sent| {
                        sent.expect("delivered");
                        async {}
                    })
                    .await
            }
        }
    };
    send_all(WARM_UP).await;
    let start = Instant::now();
    send_all(n).await;
    let elapsed = start.elapsed();
    drop_topic(&topic).await;
    (n, elapsed)
}

/// The ceiling: librdkafka driven its fastest way, a `ThreadedProducer` (its own poll
/// thread) fed without waiting, each delivery report counted in the callback, and only a
/// full queue waited out. Idempotence and `acks=all` as on our side, and the same records:
/// the payload and the three headers every message of ours carries (content type, message
/// id, send time), since on the wire they are most of a 64-byte message.
async fn publish_ceiling(
    binder: &Arc<dyn Binder>,
    brokers: &str,
    n: usize,
    value: &Payload,
) -> (usize, Duration) {
    use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counting {
        delivered: AtomicUsize,
        done: tokio::sync::Notify,
        target: AtomicUsize,
    }
    struct Context(Arc<Counting>);
    impl rdkafka::ClientContext for Context {}
    impl ProducerContext for Context {
        type DeliveryOpaque = ();
        fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
            result.as_ref().map_err(|(e, _)| e).expect("delivered");
            let delivered = self.0.delivered.fetch_add(1, Ordering::AcqRel) + 1;
            if delivered == self.0.target.load(Ordering::Acquire) {
                self.0.done.notify_one();
            }
        }
    }

    let topic = fresh_topic(binder, "pipe-raw").await;
    let counting = Arc::new(Counting {
        delivered: AtomicUsize::new(0),
        done: tokio::sync::Notify::new(),
        target: AtomicUsize::new(WARM_UP),
    });
    let producer: ThreadedProducer<Context> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create_with_context(Context(counting.clone()))
        .expect("producer");
    let codec = Json::<Payload>::new();
    let produce = |count: usize| {
        let sent_at = crate::report::sent_at_text();
        for _ in 0..count {
            let bytes = codec.encode(value).unwrap();
            let mut record = BaseRecord::<(), [u8]>::to(&topic).payload(bytes.as_ref());
            record = record.headers(our_headers(&sent_at));
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((
                        rdkafka::error::KafkaError::MessageProduction(
                            rdkafka::types::RDKafkaErrorCode::QueueFull,
                        ),
                        back,
                    )) => {
                        record = back;
                        std::thread::sleep(Duration::from_micros(100));
                    }
                    Err((e, _)) => panic!("produce failed: {e}"),
                }
            }
        }
    };
    let warmed = counting.done.notified();
    produce(WARM_UP);
    warmed.await;
    counting.delivered.store(0, Ordering::Release);
    counting.target.store(n, Ordering::Release);
    let done = counting.done.notified();
    let start = Instant::now();
    produce(n);
    done.await;
    let elapsed = start.elapsed();
    drop_topic(&topic).await;
    (n, elapsed)
}

/// The three headers every message of ours carries (content type, message id, send time),
/// for raw sides that send the same records as ours: at 64 bytes they are most of a record.
fn our_headers(sent_at: &str) -> rdkafka::message::OwnedHeaders {
    let id = stream_core::new_message_id();
    let header = |key, value| rdkafka::message::Header {
        key,
        value: Some(value),
    };
    rdkafka::message::OwnedHeaders::new_with_capacity(3)
        .insert(header(
            stream_core::header::CONTENT_TYPE,
            "application/json",
        ))
        .insert(header(stream_core::header::MESSAGE_ID, id.as_str()))
        .insert(header(stream_core::header::SENT_AT, sent_at))
}

/// What a produced record carries besides its payload.
#[derive(Clone, Copy)]
enum Headers {
    /// Our three headers, as a `Source` writes them.
    Ours,
    /// None.
    None,
}

/// Enqueues a batch of records, then awaits every delivery report, like the binder's
/// `send_batch`.
async fn produce(
    producer: &FutureProducer,
    topic: &str,
    n: usize,
    payload: impl Fn() -> Vec<u8>,
    headers: Headers,
) {
    let sent_at = crate::report::sent_at_text();
    let mut sent = 0;
    while sent < n {
        let k = (n - sent).min(BATCH);
        let mut reports = Vec::with_capacity(k);
        for _ in 0..k {
            let bytes = payload();
            let record = FutureRecord::<(), _>::to(topic).payload(&bytes);
            let record = match headers {
                Headers::Ours => record.headers(our_headers(&sent_at)),
                Headers::None => record,
            };
            reports.push(
                producer
                    .send_result(record)
                    .map_err(|(e, _)| e)
                    .expect("queued"),
            );
        }
        for report in reports {
            report
                .await
                .expect("not cancelled")
                .map_err(|(e, _)| e)
                .expect("delivered");
        }
        sent += k;
    }
}

pub async fn publish_raw(
    binder: &Arc<dyn Binder>,
    producer: &FutureProducer,
    n: usize,
    value: &Payload,
) -> (usize, Duration) {
    let topic = fresh_topic(binder, "pub-raw").await;
    let codec = Json::<Payload>::new();
    produce(
        producer,
        &topic,
        WARM_UP,
        || codec.encode(value).unwrap().to_vec(),
        Headers::Ours,
    )
    .await;
    let start = Instant::now();
    produce(
        producer,
        &topic,
        n,
        || codec.encode(value).unwrap().to_vec(),
        Headers::Ours,
    )
    .await;
    let elapsed = start.elapsed();
    drop_topic(&topic).await;
    (n, elapsed)
}

async fn consume_ours(binder: &Arc<dyn Binder>, topic: &str, n: usize) -> (usize, Duration) {
    let group = format!("g-{}", stream_core::unique_suffix());
    let channel = Channel::new(
        "bench",
        binder.clone(),
        crate::report::consume_binding(topic, &group),
    );
    let first = Arc::new(std::sync::OnceLock::new());
    let f = first.clone();
    let (sub, done) = subscribe_counting(&channel, n, move |_| {
        f.get_or_init(Instant::now);
    })
    .await;
    done.notified().await;
    // From the first message to the last: joining and leaving the group are set-up.
    let elapsed = first.get().expect("a message was handled").elapsed();
    sub.shutdown().await.unwrap();
    (n - 1, elapsed)
}

async fn consume_raw(brokers: &str, topic: &str, n: usize) -> (usize, Duration) {
    let codec = Json::<Payload>::new();
    let consumer = raw_consumer(brokers, &format!("g-{}", stream_core::unique_suffix()));
    consumer.subscribe(&[topic]).unwrap();
    let mut start = None;
    for _ in 0..n {
        let m = consumer.recv().await.unwrap();
        start.get_or_insert_with(Instant::now);
        let _p: Payload = codec.decode(m.payload().unwrap_or_default()).unwrap();
        consumer.store_offset_from_message(&m).unwrap();
    }
    let elapsed = start.expect("a message was consumed").elapsed();
    consumer
        .commit_consumer_state(rdkafka::consumer::CommitMode::Sync)
        .unwrap();
    (n - 1, elapsed)
}

async fn latency_ours(settings: &Settings, binder: &Arc<dyn Binder>, size: usize) -> (f64, f64) {
    let topic = fresh_topic(binder, "lat").await;
    let channel = Channel::new(
        "bench",
        binder.clone(),
        BindingConfig::new(&topic).group("g"),
    );
    latency_through(&channel, settings, size).await
}

async fn latency_raw(
    settings: &Settings,
    binder: &Arc<dyn Binder>,
    producer: &FutureProducer,
    brokers: &str,
    size: usize,
) -> (f64, f64) {
    let topic = fresh_topic(binder, "lat-raw").await;
    let samples = Samples::new(settings.latency_messages);
    let consumer = raw_consumer(brokers, &format!("g-{}", stream_core::unique_suffix()));
    consumer.subscribe(&[&topic]).unwrap();
    let s = samples.clone();
    let reader = tokio::spawn(async move {
        let codec = Json::<Stamped>::new();
        loop {
            let m = consumer.recv().await.unwrap();
            s.record(&codec.decode(m.payload().unwrap_or_default()).unwrap());
            consumer.store_offset_from_message(&m).unwrap();
        }
    });
    let codec = Json::<Stamped>::new();
    paced(settings, size, &samples, |m| {
        let bytes = codec.encode(&m).unwrap();
        let delivery = producer
            .send_result(FutureRecord::<(), _>::to(&topic).payload(bytes.as_ref()))
            .map_err(|(e, _)| e)
            .expect("queued");
        async move {
            delivery
                .await
                .expect("not cancelled")
                .map_err(|(e, _)| e)
                .expect("delivered");
        }
    })
    .await;
    let result = samples.percentiles().await;
    reader.abort();
    result
}

/// A consumer working through a backlog: RSS before and at its peak.
async fn backlog_rss(
    settings: &Settings,
    report: &mut Report,
    binder: &Arc<dyn Binder>,
    producer: &FutureProducer,
) {
    let topic = fresh_topic(binder, "backlog").await;
    let backlog = settings.backlog;
    let payload = Json::<Payload>::new()
        .encode(&Payload::of_size(64))
        .unwrap()
        .to_vec();
    produce(producer, &topic, backlog, || payload.clone(), Headers::Ours).await;
    let consume = backlog.min(settings.backlog_consumed);
    let rss = lagging_consumer_rss("kafka", &topic, consume).await;
    report.rss("kafka", backlog, consume, rss);
    drop_topic(&topic).await;
}
