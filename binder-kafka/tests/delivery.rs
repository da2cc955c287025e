//! Delivery under time against a real broker (`STREAM_TEST_KAFKA_BROKERS`): handlers slower
//! than librdkafka's poll interval, rebalances while handlers run, deliveries of revoked
//! partitions, partitions added to a topic while a consumer reads it.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use binder_kafka::{KafkaBinder, KafkaConfig};
use common::{account, brokers, config, eventually, grow_topic, unique, GroupWatch};
use stream_core::{
    Binder, BindingConfig, Channel, Consumer, ConsumerOptions, Message, Received, Subscription,
};

/// Test settings with librdkafka's `max.poll.interval.ms` cut to `poll_interval`; the session
/// timeout follows it down, since librdkafka refuses a session longer than the poll interval.
fn short_poll_config(brokers: &str, poll_interval: Duration, partitions: i32) -> KafkaConfig {
    let ms = poll_interval.as_millis().to_string();
    let mut settings = config(brokers)
        .consumer_property("max.poll.interval.ms", ms.as_str())
        .consumer_property("session.timeout.ms", ms.as_str())
        .consumer_property("heartbeat.interval.ms", "500");
    settings.partitions = partitions;
    settings
}

fn id_of(received: &Received) -> u64 {
    std::str::from_utf8(received.message.payload())
        .unwrap()
        .parse()
        .unwrap()
}

/// Handlings in the order they started: (member, id).
type Log = Arc<Mutex<Vec<(&'static str, u64)>>>;

/// A member whose handler records `id` as it starts, then takes `handling` to finish.
async fn slow_member(
    channel: &Channel,
    name: &'static str,
    handling: Duration,
    log: &Log,
) -> Subscription {
    let log = log.clone();
    channel
        .sink::<u64>()
        .subscribe(move |id: u64| {
            log.lock().unwrap().push((name, id));
            async move {
                tokio::time::sleep(handling).await;
                Ok::<(), String>(())
            }
        })
        .await
        .unwrap()
}

fn handled_per_id(log: &Log) -> BTreeMap<u64, usize> {
    let mut seen = BTreeMap::new();
    for (_, id) in log.lock().unwrap().iter() {
        *seen.entry(*id).or_default() += 1;
    }
    seen
}

/// Two members of one group with handlers of 250 ms and librdkafka's poll interval cut to
/// 3 s; each holds more work than it can finish in 3 s, and the second joins while the first
/// is busy, so partitions move while handlers run. No member is thrown out of the group,
/// nothing is handled twice or lost, and each key is handled in publish order across both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_handlers_through_a_rebalance_cause_no_eviction_and_no_duplicate() {
    let Some(brokers) =
        brokers("slow_handlers_through_a_rebalance_cause_no_eviction_and_no_duplicate")
    else {
        return;
    };
    const MESSAGES: u64 = 120;
    const KEYS: u64 = 8;
    let binder: Arc<dyn Binder> =
        Arc::new(KafkaBinder::new(short_poll_config(&brokers, Duration::from_secs(3), 4)).unwrap());
    let topic = unique("slow");
    let group = unique("g");
    // Default prefetch (512): a member takes everything there is and holds it.
    let channel = Channel::new(
        "slow",
        binder.clone(),
        BindingConfig::new(&topic).group(&group).concurrency(4),
    );
    let source = channel
        .source::<u64>()
        .await
        .unwrap()
        .keyed_by(|id: &u64| format!("key-{}", id % KEYS));
    let ids: Vec<u64> = (0..MESSAGES).collect();
    source.send_batch(&ids).await.unwrap();

    let watch = GroupWatch::start(&brokers, &group);
    let log: Log = Arc::default();
    let handling = Duration::from_millis(250);
    let a = slow_member(&channel, "a", handling, &log).await;
    // Alone, `a` needs 120 × 250 ms / 4 = 7.5 s: `b` joins once it is well under way.
    assert!(
        eventually(Duration::from_secs(30), || async {
            log.lock().unwrap().len() >= 8
        })
        .await,
        "a never started handling"
    );
    let b = slow_member(&channel, "b", handling, &log).await;
    let complete = eventually(Duration::from_secs(90), || async {
        handled_per_id(&log).len() as u64 >= MESSAGES
    })
    .await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    let members = watch.finish();

    let log = log.lock().unwrap().clone();
    let seen = {
        let mut seen = BTreeMap::new();
        for (_, id) in &log {
            *seen.entry(*id).or_insert(0usize) += 1;
        }
        seen
    };
    let result = account(0..MESSAGES, &seen);
    let by_b = log.iter().filter(|(member, _)| *member == "b").count();
    eprintln!(
        "slow handlers: lost {}, duplicates {}, handled by b {by_b}, group members seen {}",
        result.lost.len(),
        result.duplicates,
        members.len()
    );
    assert!(
        complete && result.lost.is_empty(),
        "lost: {:?}",
        result.lost
    );
    assert_eq!(result.duplicates, 0, "handled twice: {log:?}");
    assert!(by_b > 0, "the rebalance never gave b any work");
    assert_eq!(
        members.len(),
        2,
        "a member left the group and joined again under a new id: {members:?}"
    );
    for key in 0..KEYS {
        let order: Vec<u64> = log
            .iter()
            .map(|(_, id)| *id)
            .filter(|id| id % KEYS == key)
            .collect();
        assert!(
            order.windows(2).all(|w| w[0] < w[1]),
            "key-{key} out of publish order: {order:?}"
        );
    }
}

/// One handler takes longer than librdkafka's whole poll interval while the prefetch window
/// is full: the member keeps its partition, finishes, and nothing is delivered twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_slower_than_the_poll_interval_keeps_the_member() {
    let Some(brokers) = brokers("handler_slower_than_the_poll_interval_keeps_the_member") else {
        return;
    };
    const MESSAGES: u64 = 3;
    let binder: Arc<dyn Binder> =
        Arc::new(KafkaBinder::new(short_poll_config(&brokers, Duration::from_secs(2), 1)).unwrap());
    let topic = unique("slower");
    let group = unique("g");
    let channel = Channel::new(
        "slower",
        binder.clone(),
        BindingConfig::new(&topic)
            .group(&group)
            .prefetch(1)
            .concurrency(1),
    );
    let source = channel.source::<u64>().await.unwrap();
    let ids: Vec<u64> = (0..MESSAGES).collect();
    source.send_batch(&ids).await.unwrap();

    let watch = GroupWatch::start(&brokers, &group);
    let log: Log = Arc::default();
    let member = slow_member(&channel, "only", Duration::from_millis(2_500), &log).await;
    let complete = eventually(Duration::from_secs(60), || async {
        handled_per_id(&log).len() as u64 >= MESSAGES
    })
    .await;
    member.shutdown().await.unwrap();
    let members = watch.finish();
    let result = account(0..MESSAGES, &handled_per_id(&log));
    assert!(
        complete && result.lost.is_empty(),
        "lost: {:?}",
        result.lost
    );
    assert_eq!(
        result.duplicates,
        0,
        "handled twice: {:?}",
        log.lock().unwrap()
    );
    assert_eq!(
        members.len(),
        1,
        "the member was thrown out of its group and joined again: {members:?}"
    );
    let committed = KafkaBinder::new(config(&brokers))
        .unwrap()
        .committed_offsets(&topic, &group)
        .await
        .unwrap();
    assert_eq!(committed.get(&0), Some(&(MESSAGES as i64)));
}

/// A second member joins while the first holds fetched deliveries of both partitions, two of
/// which it started (and nobody asks the first for more). The partition that moves is handed
/// over only once the started delivery of it is acknowledged, its commit includes that
/// delivery, and the first member no longer holds the deliveries of it that never started;
/// the new owner gets exactly those.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_waits_for_started_deliveries_and_drops_unstarted_ones() {
    let Some(brokers) = brokers("revoke_waits_for_started_deliveries_and_drops_unstarted_ones")
    else {
        return;
    };
    let binder = KafkaBinder::new(config(&brokers)).unwrap();
    let topic = unique("revoke");
    let group = unique("g");
    let producer = binder.producer(&topic).await.unwrap();
    producer
        .send_batch(
            (0..40u64)
                .map(|id| Message::new(id.to_string().into_bytes()).with_key(format!("k{id}")))
                .collect(),
        )
        .await
        .unwrap();
    let first: Arc<dyn Consumer> = binder
        .consumer(&topic, &ConsumerOptions::new(&group))
        .await
        .unwrap()
        .into();
    let mut held: Vec<Received> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while held.len() < 40 && tokio::time::Instant::now() < deadline {
        held.extend(first.receive(40 - held.len()).await.unwrap());
    }
    assert_eq!(held.len(), 40, "the first member got everything");
    let mut by_partition: BTreeMap<u32, Vec<Received>> = BTreeMap::new();
    for received in held {
        by_partition
            .entry(received.message.partition().unwrap())
            .or_default()
            .push(received);
    }
    assert_eq!(by_partition.len(), 2, "both partitions have messages");
    // One delivery of each partition starts: a handler is working on it.
    let started: Vec<_> = by_partition.values().map(|r| r[0].tag).collect();
    for tag in &started {
        assert!(
            first.holds(*tag),
            "a delivery of an owned partition is held"
        );
    }

    let second: Arc<dyn Consumer> = binder
        .consumer(&topic, &ConsumerOptions::new(&group))
        .await
        .unwrap()
        .into();
    let got_by_second = Arc::new(Mutex::new(Vec::<Received>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (second, got, stop) = (second.clone(), got_by_second.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let batch = second.receive(64).await.unwrap();
                got.lock().unwrap().extend(batch);
            }
        })
    };
    // The handlers of the started deliveries take a second.
    tokio::time::sleep(Duration::from_secs(1)).await;
    first.ack(&started).await.unwrap();

    assert!(
        eventually(Duration::from_secs(30), || async {
            !got_by_second.lock().unwrap().is_empty()
        })
        .await,
        "the second member never got a partition"
    );
    let moved = got_by_second.lock().unwrap()[0]
        .message
        .partition()
        .unwrap();
    let expected: Vec<u64> = by_partition[&moved][1..].iter().map(id_of).collect();
    assert!(
        eventually(Duration::from_secs(15), || async {
            got_by_second.lock().unwrap().len() >= expected.len()
        })
        .await,
        "the second member did not get the rest of partition {moved}"
    );
    stop.store(true, Ordering::Relaxed);
    reader.await.unwrap();
    let got: Vec<u64> = got_by_second.lock().unwrap().iter().map(id_of).collect();
    assert_eq!(
        got, expected,
        "the new owner starts right after the started delivery, which was committed"
    );
    for received in &by_partition[&moved][1..] {
        assert!(
            !first.holds(received.tag),
            "a delivery of the revoked partition {moved} that never started is still held"
        );
    }
    let kept = by_partition.keys().find(|p| **p != moved).unwrap();
    for received in &by_partition[kept][1..] {
        assert!(
            first.holds(received.tag),
            "a delivery of the kept partition {kept} is no longer held"
        );
    }
    first.close().await.unwrap();
    second.close().await.unwrap();
}

/// An anonymous consumer follows its topic: messages published to a partition added after it
/// started are delivered too, from the partition's first message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_consumer_reads_partitions_added_later() {
    let Some(brokers) = brokers("anonymous_consumer_reads_partitions_added_later") else {
        return;
    };
    let mut settings =
        config(&brokers).consumer_property("topic.metadata.refresh.interval.ms", "1000");
    settings.partitions = 1;
    let binder = KafkaBinder::new(settings).unwrap();
    let topic = unique("grow-anon");
    binder.producer(&topic).await.unwrap();
    let consumer = binder
        .consumer(&topic, &ConsumerOptions::new(unique("anon")).anonymous())
        .await
        .unwrap();
    grow_topic(&brokers, &topic, 2).await;
    // A fresh binder: its producer learns about the new partition from the start.
    let publisher = KafkaBinder::new(config(&brokers)).unwrap();
    let producer = publisher.producer(&topic).await.unwrap();
    for id in 0..10u64 {
        producer
            .send(Message::new(id.to_string().into_bytes()).with_partition((id % 2) as u32))
            .await
            .unwrap();
    }
    let mut got: Vec<u64> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while got.len() < 10 && tokio::time::Instant::now() < deadline {
        got.extend(consumer.receive(10).await.unwrap().iter().map(id_of));
    }
    got.sort_unstable();
    assert_eq!(
        got,
        (0..10).collect::<Vec<_>>(),
        "both partitions were read"
    );
    consumer.close().await.unwrap();
}
