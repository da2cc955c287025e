//! Kafka-specific behaviour against a real broker (`STREAM_TEST_KAFKA_BROKERS`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use binder_kafka::{KafkaBinder, KafkaConfig};
use common::wire::{self, RawRecord};
use common::{account, binder, brokers, config, eventually, unique};
use stream_core::{
    Binder, BindingConfig, Channel, Consumer, ConsumerOptions, DeliveryTag, Envelope, ErrorKind,
    Message, Received, StartFrom, Subscription,
};

/// Receives until `count` deliveries arrived or `limit` passed.
async fn receive_n(consumer: &dyn Consumer, count: usize, limit: Duration) -> Vec<Received> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    while got.len() < count && tokio::time::Instant::now() < deadline {
        got.extend(consumer.receive(count - got.len()).await.expect("receive"));
    }
    got
}

fn numbered(id: u64) -> Message {
    Message::new(id.to_string().into_bytes())
        .with_key(format!("key-{}", id % 7))
        .with_header("seq", id.to_string())
}

fn id_of(received: &Received) -> u64 {
    std::str::from_utf8(received.message.payload())
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_headers_and_ids_survive_the_round_trip() {
    let Some(brokers) = brokers("keys_headers_and_ids_survive_the_round_trip") else {
        return;
    };
    let binder = binder(&brokers);
    let topic = unique("roundtrip");
    let consumer = binder
        .consumer(&topic, &ConsumerOptions::new(unique("g")))
        .await
        .unwrap();
    let producer = binder.producer(&topic).await.unwrap();
    let sent = Message::new(&b"payload"[..])
        .with_key("order-7")
        .with_header("trace-id", "abc")
        .with_header("trace-id", "second");
    let id = producer.send(sent.clone()).await.unwrap();
    let (partition, offset) = id.split_once('@').expect("id is partition@offset");
    let got = receive_n(consumer.as_ref(), 1, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 1);
    let received = &got[0];
    assert_eq!(received.message.id(), id);
    assert_eq!(
        received.message.partition(),
        Some(partition.parse().unwrap())
    );
    assert_eq!(received.tag.1, offset.parse::<u64>().unwrap());
    assert_eq!(received.message.key(), Some("order-7"));
    assert_eq!(received.message.payload(), sent.payload());
    assert_eq!(received.message.headers(), sent.headers());
    assert_eq!(received.attempt, 1);
    consumer.ack(&[received.tag]).await.unwrap();
    consumer.close().await.unwrap();
    producer.close().await.unwrap();
    let err = producer.send(Message::new(&b"late"[..])).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_batch_returns_ids_in_order() {
    let Some(brokers) = brokers("send_batch_returns_ids_in_order") else {
        return;
    };
    let binder = binder(&brokers);
    let topic = unique("batch");
    let producer = binder.producer(&topic).await.unwrap();
    // One key: one partition, so offsets must rise in the order given.
    let messages: Vec<Message> = (0..500)
        .map(|i| Message::new(format!("{i}").into_bytes()).with_key("k"))
        .collect();
    let ids = producer.send_batch(messages).await.unwrap();
    assert_eq!(ids.len(), 500);
    let offsets: Vec<i64> = ids
        .iter()
        .map(|id| id.split_once('@').unwrap().1.parse().unwrap())
        .collect();
    assert!(offsets.windows(2).all(|w| w[1] == w[0] + 1), "{offsets:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_beyond_a_full_producer_queue_wait_for_room_and_all_arrive_in_order() {
    let Some(brokers) = brokers("sends_beyond_a_full_producer_queue_wait_for_room") else {
        return;
    };
    // librdkafka holds 50 messages at most, so nearly every send finds the queue full.
    let binder =
        KafkaBinder::new(config(&brokers).producer_property("queue.buffering.max.messages", "50"))
            .unwrap();
    let topic = unique("full-queue");
    let producer: Arc<dyn stream_core::Producer> = binder.producer(&topic).await.unwrap().into();
    let batch: Vec<Message> = (0..1_000)
        .map(|i| Message::new(format!("b{i}").into_bytes()).with_key("k"))
        .collect();
    let concurrent = futures::future::join_all((0..1_000).map(|i| {
        let producer = producer.clone();
        async move {
            producer
                .send(Message::new(format!("s{i}").into_bytes()).with_key("k"))
                .await
        }
    }));
    let (batch_ids, send_ids) = tokio::join!(producer.send_batch(batch), concurrent);
    let batch_ids = batch_ids.expect("the whole batch delivered");
    let send_ids: Vec<String> = send_ids
        .into_iter()
        .collect::<stream_core::Result<_>>()
        .expect("every send delivered");
    let offset = |id: &String| -> i64 { id.split_once('@').unwrap().1.parse().unwrap() };
    // One key, one partition: the batch in the order given, and 2,000 distinct offsets.
    let batch_offsets: Vec<i64> = batch_ids.iter().map(offset).collect();
    assert!(
        batch_offsets.windows(2).all(|w| w[1] > w[0]),
        "{batch_offsets:?}"
    );
    let all: BTreeSet<i64> = batch_offsets
        .iter()
        .copied()
        .chain(send_ids.iter().map(offset))
        .collect();
    assert_eq!(all.len(), 2_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_topic_without_creation_names_the_topic() {
    let Some(brokers) = brokers("missing_topic_without_creation_names_the_topic") else {
        return;
    };
    let mut settings = config(&brokers);
    settings.create_topics = false;
    let binder = KafkaBinder::new(settings).unwrap();
    let topic = unique("absent");
    let err = binder.producer(&topic).await.err().expect("no such topic");
    assert_eq!(err.kind(), ErrorKind::DestinationNotFound, "{err}");
    assert!(err.message().contains(&topic), "{err}");
    let err = binder
        .consumer(&topic, &ConsumerOptions::new("g"))
        .await
        .err()
        .expect("no such topic");
    assert_eq!(err.kind(), ErrorKind::DestinationNotFound, "{err}");
    // The check itself must not have created it through broker auto-creation.
    let err = binder.producer(&topic).await.err().expect("still absent");
    assert_eq!(err.kind(), ErrorKind::DestinationNotFound, "{err}");
}

// Needs no broker: nothing listens on port 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_broker_is_a_connection_error_naming_the_address() {
    let mut settings = KafkaConfig::new("127.0.0.1:1");
    settings.connect_timeout = Duration::from_secs(2);
    let binder = KafkaBinder::new(settings).unwrap();
    let started = std::time::Instant::now();
    let err = binder
        .producer("anything")
        .await
        .err()
        .expect("unreachable");
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    assert!(err.message().contains("127.0.0.1:1"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "bounded: {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_payload_is_payload_too_large() {
    let Some(brokers) = brokers("oversized_payload_is_payload_too_large") else {
        return;
    };
    let binder = binder(&brokers);
    let producer = binder.producer(&unique("big")).await.unwrap();
    let err = producer
        .send(Message::new(vec![7u8; 3 * 1024 * 1024]))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PayloadTooLarge, "{err}");
    // The producer is still usable.
    producer.send(Message::new(&b"small"[..])).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_group_sees_only_messages_published_after_it_was_created() {
    let Some(brokers) = brokers("latest_group_sees_only_messages_published_after_it_was_created")
    else {
        return;
    };
    let binder = binder(&brokers);
    let topic = unique("latest");
    let producer = binder.producer(&topic).await.unwrap();
    for i in 0..10 {
        producer.send(numbered(i)).await.unwrap();
    }
    for options in [
        ConsumerOptions::new(unique("g")).start_from(StartFrom::Latest),
        ConsumerOptions::new(unique("anon")).anonymous(),
    ] {
        let consumer = binder.consumer(&topic, &options).await.unwrap();
        // Published right after creation: a lazily resolved "latest" would skip these.
        let base = if options.durable { 100 } else { 200 };
        for i in base..base + 5 {
            producer.send(numbered(i)).await.unwrap();
        }
        let got = receive_n(consumer.as_ref(), 5, Duration::from_secs(30)).await;
        let ids: BTreeSet<u64> = got.iter().map(id_of).collect();
        assert_eq!(
            ids,
            (base..base + 5).collect(),
            "durable = {}",
            options.durable
        );
        consumer.close().await.unwrap();
    }
    // Earliest sees everything.
    let consumer = binder
        .consumer(&topic, &ConsumerOptions::new(unique("g")))
        .await
        .unwrap();
    let got = receive_n(consumer.as_ref(), 20, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 20);
}

/// Acks arrive concurrently and out of order with two messages un-acknowledged: the committed
/// offset stops at the first of them, and a new member resumes there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_acks_never_commit_past_a_gap() {
    let Some(brokers) = brokers("out_of_order_acks_never_commit_past_a_gap") else {
        return;
    };
    let mut settings = config(&brokers);
    settings.partitions = 1;
    let binder = KafkaBinder::new(settings).unwrap();
    let topic = unique("gap");
    let group = unique("g");
    let producer = binder.producer(&topic).await.unwrap();
    producer
        .send_batch((0..20).map(numbered).collect())
        .await
        .unwrap();
    let consumer: Arc<dyn Consumer> = binder
        .consumer(&topic, &ConsumerOptions::new(&group))
        .await
        .unwrap()
        .into();
    let got = receive_n(consumer.as_ref(), 20, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 20);
    let offsets: Vec<u64> = got.iter().map(|r| r.tag.1).collect();
    assert_eq!(offsets, (0..20).collect::<Vec<_>>());
    // Everything but offsets 6 and 13, acked from several tasks at once, newest first.
    let (gap, second_gap) = (6u64, 13u64);
    let mut tasks = Vec::new();
    for chunk in got
        .iter()
        .rev()
        .map(|r| r.tag)
        .collect::<Vec<_>>()
        .chunks(3)
    {
        let tags: Vec<DeliveryTag> = chunk
            .iter()
            .copied()
            .filter(|t| t.1 != gap && t.1 != second_gap)
            .collect();
        let consumer = consumer.clone();
        tasks.push(tokio::spawn(async move {
            for tag in tags {
                consumer.ack(&[tag]).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let committed = || async { binder.committed_offsets(&topic, &group).await.unwrap() };
    assert!(
        eventually(Duration::from_secs(15), || async {
            committed().await.get(&0) == Some(&(gap as i64))
        })
        .await,
        "committed offset should reach the gap at {gap}: {:?}",
        committed().await
    );
    // Several commit intervals later it has still not passed the gap.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(committed().await.get(&0), Some(&(gap as i64)));
    }
    // Closing the first gap moves the commit to the second one, not beyond.
    consumer.ack(&[got[gap as usize].tag]).await.unwrap();
    assert!(
        eventually(Duration::from_secs(15), || async {
            committed().await.get(&0) == Some(&(second_gap as i64))
        })
        .await,
        "{:?}",
        committed().await
    );
    // A member that leaves with the second gap open hands it to the next one, which resumes
    // exactly there.
    consumer.close().await.unwrap();
    assert_eq!(committed().await.get(&0), Some(&(second_gap as i64)));
    let next = binder
        .consumer(&topic, &ConsumerOptions::new(&group))
        .await
        .unwrap();
    let again = receive_n(next.as_ref(), 7, Duration::from_secs(30)).await;
    let offsets: Vec<u64> = again.iter().map(|r| r.tag.1).collect();
    assert_eq!(offsets, (13..20).collect::<Vec<_>>());
    next.close().await.unwrap();
}

/// A member dies without acknowledging anything: the survivor of its group gets every message
/// the dead member had received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_dropped_without_acking_hands_its_messages_to_the_survivor() {
    let Some(brokers) = brokers("member_dropped_without_acking_hands_its_messages_to_the_survivor")
    else {
        return;
    };
    let binder = binder(&brokers);
    let topic = unique("takeover");
    let group = unique("g");
    let producer = binder.producer(&topic).await.unwrap();
    let options = ConsumerOptions::new(&group);
    let dying = binder.consumer(&topic, &options).await.unwrap();
    let survivor: Arc<dyn Consumer> = binder.consumer(&topic, &options).await.unwrap().into();

    // The survivor acks everything it gets, and records which ids (partition@offset) it saw.
    let seen_by_survivor = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let survivor_task = {
        let (survivor, seen, stop) = (survivor.clone(), seen_by_survivor.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let batch = survivor.receive(64).await.unwrap();
                let tags: Vec<DeliveryTag> = batch.iter().map(|r| r.tag).collect();
                for r in &batch {
                    *seen
                        .lock()
                        .unwrap()
                        .entry(r.message.id().to_owned())
                        .or_default() += 1;
                }
                survivor.ack(&tags).await.unwrap();
            }
        })
    };

    // Publish until the dying member holds some messages (it owns one of two partitions
    // once the group settles).
    let mut held: Vec<Received> = Vec::new();
    let mut next_id = 0u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
    while held.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the dying member never received anything"
        );
        producer
            .send_batch((next_id..next_id + 20).map(numbered).collect())
            .await
            .unwrap();
        next_id += 20;
        held.extend(dying.receive(64).await.unwrap());
    }
    // Drain what it can still get of what was published, without acknowledging any of it.
    held.extend(receive_n(dying.as_ref(), 1000, Duration::from_millis(500)).await);
    let held_tags: BTreeSet<String> = held.iter().map(|r| r.message.id().to_owned()).collect();

    drop(dying);

    let covered = eventually(Duration::from_secs(45), || async {
        let seen = seen_by_survivor.lock().unwrap();
        held_tags.iter().all(|tag| seen.contains_key(tag))
    })
    .await;
    let seen = seen_by_survivor.lock().unwrap().clone();
    let missing: Vec<_> = held_tags
        .iter()
        .filter(|t| !seen.contains_key(*t))
        .collect();
    assert!(
        covered,
        "un-acked messages of the dropped member never reached the survivor: {missing:?}"
    );

    // Every published message was acknowledged by the survivor: lost = 0.
    let all_ids = next_id;
    assert!(
        eventually(Duration::from_secs(30), || async {
            seen_by_survivor.lock().unwrap().len() as u64 >= all_ids
        })
        .await
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    survivor_task.await.unwrap();
    let seen = seen_by_survivor.lock().unwrap().clone();
    let duplicates: u64 = seen.values().map(|n| n - 1).sum();
    eprintln!(
        "takeover: {} published, {} held by the dropped member, survivor saw {} distinct, {duplicates} duplicates",
        all_ids,
        held_tags.len(),
        seen.len()
    );
    assert_eq!(seen.len() as u64, all_ids);
    survivor.close().await.unwrap();
}

/// Publishes the next `count` ids, keyed over 16 keys.
async fn publish(source: &stream_core::Source<u64>, next: &mut u64, count: u64) {
    for id in *next..*next + count {
        source
            .send_keyed(format!("key-{}", id % 16), &id)
            .await
            .unwrap();
    }
    *next += count;
}

struct Member {
    name: &'static str,
    subscription: Option<Subscription>,
}

/// Two members share a topic; a third joins, one leaves, while messages flow. Every message
/// is handled (lost = 0); duplicates are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_while_members_join_and_leave_loses_nothing() {
    let Some(brokers) = brokers("rebalance_while_members_join_and_leave_loses_nothing") else {
        return;
    };
    let mut settings = config(&brokers);
    settings.partitions = 4;
    let binder: Arc<dyn Binder> = Arc::new(KafkaBinder::new(settings).unwrap());
    let topic = unique("rebalance");
    let group = unique("g");
    let binding = BindingConfig::new(&topic).group(&group).concurrency(4);
    let channel = Channel::new("rebalance", binder.clone(), binding);
    let source = channel.source::<u64>().await.unwrap();

    // id -> times handled; member -> ids handled.
    let handled = Arc::new(Mutex::new(BTreeMap::<u64, usize>::new()));
    let by_member = Arc::new(Mutex::new(BTreeMap::<&'static str, usize>::new()));
    let join = |name: &'static str| {
        let (channel, handled, by_member) = (channel.clone(), handled.clone(), by_member.clone());
        async move {
            let subscription = channel
                .sink::<u64>()
                .subscribe(move |id: u64| {
                    let (handled, by_member) = (handled.clone(), by_member.clone());
                    async move {
                        *handled.lock().unwrap().entry(id).or_default() += 1;
                        *by_member.lock().unwrap().entry(name).or_default() += 1;
                        Ok::<(), String>(())
                    }
                })
                .await
                .unwrap();
            Member {
                name,
                subscription: Some(subscription),
            }
        }
    };
    let handled_by = |name: &'static str| by_member.lock().unwrap().get(name).copied().unwrap_or(0);
    let mut next = 0u64;

    let mut a = join("a").await;
    let b = join("b").await;
    // Both first members are working before anything changes.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while handled_by("a") == 0 || handled_by("b") == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a and b never both handled messages: {:?}",
            by_member.lock().unwrap()
        );
        publish(&source, &mut next, 20).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A third member joins while messages flow, and gets work.
    let c = join("c").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while handled_by("c") == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "c never handled messages: {:?}",
            by_member.lock().unwrap()
        );
        publish(&source, &mut next, 20).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // One leaves (graceful shutdown) while messages flow.
    let leaving = tokio::spawn(a.subscription.take().unwrap().shutdown());
    publish(&source, &mut next, 100).await;
    leaving.await.unwrap().unwrap();
    let a_total = handled_by(a.name);
    publish(&source, &mut next, 100).await;

    let published = next;
    let complete = eventually(Duration::from_secs(60), || async {
        handled.lock().unwrap().len() as u64 >= published
    })
    .await;
    let result = account(0..published, &handled.lock().unwrap());
    eprintln!(
        "rebalance: {published} published, lost {}, duplicates {}, per member {:?}",
        result.lost.len(),
        result.duplicates,
        by_member.lock().unwrap()
    );
    assert!(
        complete && result.lost.is_empty(),
        "lost: {:?}",
        result.lost
    );
    assert_eq!(result.unexpected, 0);
    assert_eq!(handled_by("a"), a_total, "a handled messages after it left");
    for member in [b, c] {
        member.subscription.unwrap().shutdown().await.unwrap();
    }
}

/// Core's `partition_for` agrees with librdkafka's Java-compatible `murmur2_random`
/// partitioner, so a partitioned binding and any other Kafka client put one key in one
/// partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_for_matches_the_java_compatible_partitioner() {
    let Some(brokers) = brokers("partition_for_matches_the_java_compatible_partitioner") else {
        return;
    };
    const PARTITIONS: u32 = 6;
    let binder =
        KafkaBinder::new(config(&brokers).producer_property("partitioner", "murmur2_random"))
            .unwrap();
    let topic = unique("hash");
    assert!(binder.prepare_partitions(&topic, PARTITIONS).await.unwrap());
    let producer = binder.producer(&topic).await.unwrap();
    let keys: Vec<String> = (0..200).map(|i| format!("order-{i}")).collect();
    // No partition set: librdkafka's partitioner chooses.
    let ids = producer
        .send_batch(
            keys.iter()
                .map(|k| Message::new(&b"x"[..]).with_key(k.clone()))
                .collect(),
        )
        .await
        .unwrap();
    let used: BTreeSet<u32> = ids
        .iter()
        .map(|id| id.split_once('@').unwrap().0.parse().unwrap())
        .collect();
    assert_eq!(
        used.len(),
        PARTITIONS as usize,
        "keys spread over every partition"
    );
    for (key, id) in keys.iter().zip(&ids) {
        let chosen: u32 = id.split_once('@').unwrap().0.parse().unwrap();
        assert_eq!(
            stream_core::partition_for(key, PARTITIONS),
            chosen,
            "partition of {key}"
        );
    }
}

/// A partitioned binding never quietly uses a topic with fewer partitions than it names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_with_too_few_partitions_is_a_config_error() {
    let Some(brokers) = brokers("topic_with_too_few_partitions_is_a_config_error") else {
        return;
    };
    let binder = binder(&brokers);
    let topic = unique("few");
    // Created with the binder's default of 2 (see common::config).
    binder.producer(&topic).await.unwrap();
    let err = binder.prepare_partitions(&topic, 4).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.message().contains("has 2 partitions"), "{err}");
    assert!(binder.prepare_partitions(&topic, 2).await.unwrap());
}

/// Writes `record` to partition 0 of `topic` with the tests' own Kafka protocol client, off
/// the runtime: rdkafka only writes header names that are UTF-8.
async fn produce_raw(brokers: &str, topic: &str, record: RawRecord<'static>) {
    let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || wire::produce(&brokers, &topic, 0, &record))
        .await
        .unwrap();
}

/// Reads the dead letters of `destination` with a consumer of its own, until `count` arrived.
async fn dead_letters(binder: &KafkaBinder, destination: &str, count: usize) -> Vec<Received> {
    let reader = binder
        .consumer(
            &format!("{destination}.dlq"),
            &ConsumerOptions::new(unique("dlq-reader")),
        )
        .await
        .unwrap();
    let got = receive_n(reader.as_ref(), count, Duration::from_secs(30)).await;
    reader.close().await.unwrap();
    got
}

/// A binder whose topics have one partition, so that records are handled in the order they
/// were written.
fn one_partition_binder(brokers: &str) -> Arc<KafkaBinder> {
    let mut settings = config(brokers);
    settings.partitions = 1;
    Arc::new(KafkaBinder::new(settings).unwrap())
}

/// rdkafka panics reading a header name that is not UTF-8; the binder catches that, so the
/// record is dead-lettered as undecodable with its other headers, the handler never sees it,
/// and the consumer goes on: records after it, bad or good, are handled as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_name_that_is_not_utf8_is_dead_lettered_and_the_consumer_goes_on() {
    let Some(brokers) =
        brokers("header_name_that_is_not_utf8_is_dead_lettered_and_the_consumer_goes_on")
    else {
        return;
    };
    let kafka = one_partition_binder(&brokers);
    let topic = unique("bad-header-name");
    let channel = Channel::new(
        "bad-header-name",
        kafka.clone() as Arc<dyn Binder>,
        BindingConfig::new(&topic).group(unique("g")),
    );
    // Creates the topic.
    let source = channel.source::<u64>().await.unwrap();
    let bad = |payload: &'static [u8]| RawRecord {
        key: None,
        headers: &[
            (b"before", b"kept"),
            (&[0xff, 0xfe, b'n'], b"value"),
            (b"after", b"kept too"),
        ],
        value: payload,
    };
    produce_raw(&brokers, &topic, bad(b"7")).await;
    source.send(&1_000).await.unwrap();
    produce_raw(&brokers, &topic, bad(b"8")).await;
    source.send(&1_001).await.unwrap();

    let handled = Arc::new(Mutex::new(Vec::<u64>::new()));
    let mut subscription = {
        let handled = handled.clone();
        channel
            .sink::<u64>()
            .subscribe(move |n: u64| {
                handled.lock().unwrap().push(n);
                async { Ok::<(), String>(()) }
            })
            .await
            .unwrap()
    };
    assert!(
        eventually(Duration::from_secs(30), || async {
            handled.lock().unwrap().contains(&1_001)
        })
        .await,
        "the good messages after the bad records were not all handled: {:?}",
        handled.lock().unwrap()
    );
    let letters = dead_letters(&kafka, &topic, 2).await;
    let payloads: Vec<&[u8]> = letters.iter().map(|l| &l.message.payload()[..]).collect();
    assert_eq!(
        payloads,
        [&b"7"[..], b"8"],
        "both bad records were dead-lettered"
    );
    for letter in &letters {
        let headers = letter.message.headers();
        assert_eq!(
            headers.get(stream_core::header::ERROR_KIND),
            Some("decode"),
            "{letter:?}"
        );
        assert!(
            headers
                .get(stream_core::header::ERROR)
                .is_some_and(|reason| reason.contains("header name is not UTF-8")),
            "{letter:?}"
        );
        // Each header was read on its own: the bad name lost none of the others.
        assert_eq!(headers.get("before"), Some("kept"), "{letter:?}");
        assert_eq!(headers.get("after"), Some("kept too"), "{letter:?}");
    }
    assert_eq!(
        *handled.lock().unwrap(),
        vec![1_000, 1_001],
        "no bad record reached the handler"
    );
    assert!(
        !subscription.is_finished(),
        "the subscription ended: {:?}",
        tokio::time::timeout(Duration::from_secs(1), subscription.wait()).await
    );
    subscription.shutdown().await.unwrap();
}

/// Keys and header values that are not UTF-8 (binary keys of Java producers, Avro) are
/// handed to handlers converted lossily, not dead-lettered; equal bytes give equal keys, so
/// core still handles each key's records one at a time and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_or_header_value_that_is_not_utf8_is_handled_lossily_in_key_order() {
    let Some(brokers) =
        brokers("key_or_header_value_that_is_not_utf8_is_handled_lossily_in_key_order")
    else {
        return;
    };
    let kafka = one_partition_binder(&brokers);
    let topic = unique("binary-keys");
    let channel = Channel::new(
        "binary-keys",
        kafka.clone() as Arc<dyn Binder>,
        BindingConfig::new(&topic).group(unique("g")).concurrency(4),
    );
    // Creates the topic.
    let _source = channel.source::<u64>().await.unwrap();
    // A big-endian long 1 as a Java producer serializes it is UTF-8 (NULs and a 0x01), so
    // the keys start with bytes that are not: 0xff, and a 0xc3 not followed by a
    // continuation byte.
    const KEYS: [&[u8]; 2] = [&[0xff, 0, 0, 0, 0, 0, 0, 1], &[0xc3, 0x28]];
    const VALUES: [&[u8]; 8] = [b"0", b"1", b"2", b"3", b"4", b"5", b"6", b"7"];
    for (n, value) in VALUES.into_iter().enumerate() {
        let record = RawRecord {
            key: Some(KEYS[n % 2]),
            headers: &[(b"trace", &[0x80, b'-', 0x81])],
            value,
        };
        produce_raw(&brokers, &topic, record).await;
    }

    // (key, trace header, payload) in the order handlers finished; earlier records sleep
    // longer, so records of one key would finish out of order if they ran concurrently.
    let finished = Arc::new(Mutex::new(Vec::<(String, String, u64)>::new()));
    let subscription = {
        let finished = finished.clone();
        channel
            .sink::<u64>()
            .subscribe_envelope(move |envelope: Envelope<u64>| {
                let finished = finished.clone();
                async move {
                    let n = *envelope.payload();
                    tokio::time::sleep(Duration::from_millis(20 * (8 - n))).await;
                    let message = envelope.message();
                    finished.lock().unwrap().push((
                        message.key().unwrap_or_default().to_owned(),
                        message
                            .headers()
                            .get("trace")
                            .unwrap_or_default()
                            .to_owned(),
                        n,
                    ));
                    Ok::<(), String>(())
                }
            })
            .await
            .unwrap()
    };
    assert!(
        eventually(Duration::from_secs(30), || async {
            finished.lock().unwrap().len() >= VALUES.len()
        })
        .await,
        "not every record was handled: {:?}",
        finished.lock().unwrap()
    );
    subscription.shutdown().await.unwrap();
    let finished = finished.lock().unwrap().clone();
    assert_eq!(finished.len(), VALUES.len(), "each record handled once");
    for (key, trace, n) in &finished {
        let sent_key = KEYS[*n as usize % 2];
        assert_eq!(key, &String::from_utf8_lossy(sent_key), "record {n}");
        assert_eq!(trace, "\u{fffd}-\u{fffd}", "record {n}");
    }
    for sent_key in KEYS {
        let key = String::from_utf8_lossy(sent_key);
        let order: Vec<u64> = finished
            .iter()
            .filter(|(k, _, _)| *k == key)
            .map(|(_, _, n)| *n)
            .collect();
        assert!(
            order.windows(2).all(|w| w[0] < w[1]),
            "key {key:?} handled out of order: {order:?}"
        );
    }
}

/// `start-from = "latest"` decides only where a new group starts: a partition added to the
/// topic later is read from its first message, not from whatever its end is when the group
/// notices it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_group_reads_partitions_added_later() {
    let Some(brokers) = brokers("latest_group_reads_partitions_added_later") else {
        return;
    };
    let mut settings =
        config(&brokers).consumer_property("topic.metadata.refresh.interval.ms", "1000");
    settings.partitions = 1;
    let binder = KafkaBinder::new(settings).unwrap();
    let topic = unique("grow-latest");
    let producer = binder.producer(&topic).await.unwrap();
    producer
        .send_batch((0..5).map(numbered).collect())
        .await
        .unwrap();
    let consumer = binder
        .consumer(
            &topic,
            &ConsumerOptions::new(unique("g")).start_from(StartFrom::Latest),
        )
        .await
        .unwrap();
    producer
        .send_batch((100..103).map(numbered).collect())
        .await
        .unwrap();
    common::grow_topic(&brokers, &topic, 2).await;
    // Published at once, before the group can have noticed the new partition.
    let publisher = KafkaBinder::new(config(&brokers)).unwrap();
    let late = publisher.producer(&topic).await.unwrap();
    for id in 200..203 {
        late.send(numbered(id).with_partition(1)).await.unwrap();
    }
    let got = receive_n(consumer.as_ref(), 6, Duration::from_secs(30)).await;
    let ids: BTreeSet<u64> = got.iter().map(id_of).collect();
    assert_eq!(
        ids,
        [100, 101, 102, 200, 201, 202].into_iter().collect(),
        "the new partition is read from its start; the messages before the group are not"
    );
    let tags: Vec<DeliveryTag> = got.iter().map(|r| r.tag).collect();
    consumer.ack(&tags).await.unwrap();
    consumer.close().await.unwrap();
}

/// A durable group whose committed offset is no longer retained (deleted by retention) goes
/// on from the oldest retained message: `start-from = "latest"` does not apply to it, so it
/// does not silently skip what is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_group_whose_offset_is_gone_resumes_at_the_oldest_retained_message() {
    let Some(brokers) =
        brokers("latest_group_whose_offset_is_gone_resumes_at_the_oldest_retained_message")
    else {
        return;
    };
    let mut settings = config(&brokers);
    settings.partitions = 1;
    let binder = KafkaBinder::new(settings).unwrap();
    let topic = unique("retained");
    let group = unique("g");
    let options = ConsumerOptions::new(&group).start_from(StartFrom::Latest);
    let producer = binder.producer(&topic).await.unwrap();
    producer
        .send_batch((0..10).map(numbered).collect())
        .await
        .unwrap();
    let first = binder.consumer(&topic, &options).await.unwrap();
    producer
        .send_batch((10..20).map(numbered).collect())
        .await
        .unwrap();
    let got = receive_n(first.as_ref(), 10, Duration::from_secs(30)).await;
    assert_eq!(
        got.iter().map(id_of).collect::<Vec<_>>(),
        (10..20).collect::<Vec<_>>()
    );
    let done: Vec<DeliveryTag> = got[..5].iter().map(|r| r.tag).collect();
    first.ack(&done).await.unwrap();
    first.close().await.unwrap();
    assert_eq!(
        binder
            .committed_offsets(&topic, &group)
            .await
            .unwrap()
            .get(&0),
        Some(&15)
    );
    // Retention removes everything below offset 17, the committed 15 and 16 included.
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .unwrap();
    let mut below = rdkafka::TopicPartitionList::new();
    below
        .add_partition_offset(&topic, 0, rdkafka::Offset::Offset(17))
        .unwrap();
    let result = admin
        .delete_records(&below, &rdkafka::admin::AdminOptions::new())
        .await
        .unwrap();
    assert_eq!(
        result.find_partition(&topic, 0).unwrap().offset(),
        rdkafka::Offset::Offset(17)
    );
    let second = binder.consumer(&topic, &options).await.unwrap();
    let got = receive_n(second.as_ref(), 3, Duration::from_secs(30)).await;
    assert_eq!(
        got.iter().map(id_of).collect::<Vec<_>>(),
        vec![17, 18, 19],
        "the group goes on from the oldest retained message"
    );
    second.close().await.unwrap();
}

/// A partitioned binding creates its topic with exactly its `partitions`, whatever the
/// binder's default for other topics, so instances that split the partitions by
/// `instance-count` read every message, including those another producer spreads over the
/// topic's partitions with Kafka's own partitioner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_binding_creates_its_topic_with_exactly_its_partitions() {
    let Some(brokers) =
        brokers("partitioned_binding_creates_its_topic_with_exactly_its_partitions")
    else {
        return;
    };
    let mut settings = config(&brokers);
    settings.partitions = 3;
    let binder: Arc<dyn Binder> = Arc::new(KafkaBinder::new(settings).unwrap());
    let topic = unique("exact");
    let group = unique("g");
    let binding = BindingConfig::new(&topic).group(&group).partitions(2);
    let handled = Arc::new(Mutex::new(BTreeMap::<u64, usize>::new()));
    let mut instances = Vec::new();
    for index in 0..2 {
        let handled = handled.clone();
        let channel = Channel::new("exact", binder.clone(), binding.clone().instance(index, 2));
        instances.push(
            channel
                .sink::<u64>()
                .subscribe(move |id: u64| {
                    *handled.lock().unwrap().entry(id).or_default() += 1;
                    async { Ok::<(), String>(()) }
                })
                .await
                .unwrap(),
        );
    }
    assert_eq!(common::partition_count(&brokers, &topic).await, 2);
    // Another service's producer, not partitioned by the binding: librdkafka's partitioner
    // spreads keys over every partition the topic has.
    let other = Channel::new("other", binder.clone(), BindingConfig::new(&topic));
    let source = other.source::<u64>().await.unwrap();
    for id in 0..40u64 {
        source.send_keyed(format!("key-{id}"), &id).await.unwrap();
    }
    let complete = eventually(Duration::from_secs(30), || async {
        handled.lock().unwrap().len() >= 40
    })
    .await;
    for instance in instances {
        instance.shutdown().await.unwrap();
    }
    let result = account(0..40, &handled.lock().unwrap());
    assert!(
        complete && result.lost.is_empty(),
        "lost: {:?}",
        result.lost
    );
}

/// A partitioned binding on a topic that has more partitions than the binding says is a
/// configuration error: instances that split the binding's partitions would never read the
/// others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_binding_on_a_topic_with_more_partitions_is_a_config_error() {
    let Some(brokers) =
        brokers("partitioned_binding_on_a_topic_with_more_partitions_is_a_config_error")
    else {
        return;
    };
    let mut settings = config(&brokers);
    settings.partitions = 3;
    let binder: Arc<dyn Binder> = Arc::new(KafkaBinder::new(settings).unwrap());
    let topic = unique("more");
    binder.producer(&topic).await.unwrap();
    let err = binder.prepare_partitions(&topic, 2).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.message().contains(&topic), "{err}");
    let channel = Channel::new(
        "more",
        binder.clone(),
        BindingConfig::new(&topic)
            .group(unique("g"))
            .partitions(2)
            .instance(0, 2),
    );
    let err = channel
        .sink::<u64>()
        .subscribe(|_: u64| async { Ok::<(), String>(()) })
        .await
        .expect_err("the instance must not start");
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
}

// Needs no broker: checked from the settings alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binding_whose_payload_limit_kafka_cannot_carry_is_a_config_error() {
    let binder = KafkaBinder::new(KafkaConfig::new("127.0.0.1:1")).unwrap();
    let default = BindingConfig::new("orders");
    assert_eq!(default.max_payload_bytes, 1 << 20);
    binder
        .check_binding("orders", &default)
        .expect("the documented default fits");
    let err = binder
        .check_binding(
            "orders",
            &BindingConfig::new("orders").max_payload_bytes(8 << 20),
        )
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.message().contains("orders"), "{err}");
    assert!(err.message().contains("max-payload-bytes"), "{err}");
    let roomy = KafkaBinder::new(
        KafkaConfig::new("127.0.0.1:1").producer_property("message.max.bytes", "16777216"),
    )
    .unwrap();
    roomy
        .check_binding(
            "orders",
            &BindingConfig::new("orders").max_payload_bytes(8 << 20),
        )
        .expect("a raised client limit carries it");
    // From a file, it is refused when the configuration is loaded.
    let err = stream_core::Streams::builder()
        .register(binder_kafka::register)
        .env(Vec::<(String, String)>::new())
        .load_str(
            r#"
            default-binder = "kafka"
            [binders.kafka]
            type = "kafka"
            brokers = "127.0.0.1:1"
            [bindings.big]
            destination = "big"
            max-payload-bytes = 8388608
            "#,
        )
        .expect_err("refused at load");
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
}

/// A payload of the documented default limit (1 MiB) goes through Kafka with stock broker
/// settings, and so does its dead-letter copy, which carries the dead-letter headers on top.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_payload_limit_round_trips_and_its_dead_letter_fits() {
    let Some(brokers) = brokers("default_payload_limit_round_trips_and_its_dead_letter_fits")
    else {
        return;
    };
    const LIMIT: usize = 1 << 20;
    let kafka = Arc::new(binder(&brokers));
    let topic = unique("mib");
    let binding = BindingConfig::new(&topic)
        .group(unique("g"))
        .retry(stream_core::RetryConfig {
            max_attempts: 1,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(10),
            multiplier: 1.0,
        });
    assert_eq!(binding.max_payload_bytes, LIMIT);
    let channel = Channel::new("mib", kafka.clone() as Arc<dyn Binder>, binding);
    let source = channel.source_with(stream_core::Raw).await.unwrap();
    let handled = Arc::new(Mutex::new(Vec::<(u8, usize)>::new()));
    let subscription = {
        let handled = handled.clone();
        channel
            .sink_with(stream_core::Raw)
            .subscribe(move |payload: bytes::Bytes| {
                let handled = handled.clone();
                async move {
                    handled.lock().unwrap().push((payload[0], payload.len()));
                    if payload[0] == 2 {
                        // The longest error text core keeps, and then some.
                        return Err("e".repeat(5_000));
                    }
                    Ok(())
                }
            })
            .await
            .unwrap()
    };
    for marker in [1u8, 2] {
        let mut payload = vec![0u8; LIMIT];
        payload[0] = marker;
        source
            .send_keyed("one-key", &bytes::Bytes::from(payload))
            .await
            .unwrap();
    }
    let letters = dead_letters(&kafka, &topic, 1).await;
    assert_eq!(
        letters.len(),
        1,
        "the failed message at the limit was dead-lettered"
    );
    let letter = &letters[0].message;
    assert_eq!(letter.payload().len(), LIMIT);
    assert_eq!(letter.payload()[0], 2);
    assert_eq!(
        letter.headers().get(stream_core::header::ATTEMPTS),
        Some("1")
    );
    assert!(letter.headers().get(stream_core::header::ERROR).is_some());
    subscription.shutdown().await.unwrap();
    assert_eq!(*handled.lock().unwrap(), vec![(1, LIMIT), (2, LIMIT)]);
}

/// After `close`, the binder makes no new producers or consumers; those made before keep
/// working until they are closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_binder_refuses_new_clients_and_keeps_existing_ones() {
    let Some(brokers) = brokers("closed_binder_refuses_new_clients_and_keeps_existing_ones") else {
        return;
    };
    let binder = binder(&brokers);
    let topic = unique("closed");
    let producer = binder.producer(&topic).await.unwrap();
    let consumer = binder
        .consumer(&topic, &ConsumerOptions::new(unique("g")))
        .await
        .unwrap();
    binder.close().await.unwrap();
    let err = binder.producer(&topic).await.err().expect("closed");
    assert_eq!(err.kind(), ErrorKind::Closed, "{err}");
    let err = binder
        .dead_letter_producer(&topic)
        .await
        .err()
        .expect("closed");
    assert_eq!(err.kind(), ErrorKind::Closed, "{err}");
    let err = binder
        .consumer(&topic, &ConsumerOptions::new(unique("g")))
        .await
        .err()
        .expect("closed");
    assert_eq!(err.kind(), ErrorKind::Closed, "{err}");
    producer.send(numbered(1)).await.unwrap();
    let got = receive_n(consumer.as_ref(), 1, Duration::from_secs(30)).await;
    assert_eq!(got.iter().map(id_of).collect::<Vec<_>>(), vec![1]);
    consumer.close().await.unwrap();
    producer.close().await.unwrap();
}

/// A dead-letter topic that is missing while the binder may not create topics fails the
/// subscription when it starts, naming the topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_dead_letter_topic_fails_the_subscription_at_start() {
    let Some(brokers) = brokers("missing_dead_letter_topic_fails_the_subscription_at_start") else {
        return;
    };
    let topic = unique("no-dlq");
    binder(&brokers).producer(&topic).await.unwrap();
    let mut settings = config(&brokers);
    settings.create_topics = false;
    let channel = Channel::new(
        "no-dlq",
        Arc::new(KafkaBinder::new(settings).unwrap()) as Arc<dyn Binder>,
        BindingConfig::new(&topic).group(unique("g")),
    );
    let err = channel
        .sink::<u64>()
        .subscribe(|_: u64| async { Ok::<(), String>(()) })
        .await
        .expect_err("the dead-letter topic is missing");
    assert_eq!(err.kind(), ErrorKind::DestinationNotFound, "{err}");
    assert!(err.message().contains(&format!("{topic}.dlq")), "{err}");
}
