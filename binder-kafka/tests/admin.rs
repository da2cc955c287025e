//! Operators' access to Kafka topics (`Binder::admin`) against a real broker: reports of
//! missing and partitioned topics and of groups, reads in pages outside any group, removal
//! up to a position and purge by time.

mod common;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use binder_kafka::{KafkaBinder, KafkaConfig};
use common::{brokers, config, eventually, unique};
use stream_core::admin::{Admin, Cursor, DestinationReport, Position, ReadFrom, Removal, Stored};
use stream_core::{Binder, ConsumerOptions, ErrorKind, Message, Producer};
use tokio::time::Instant;

const PARTITIONS: usize = 3;

fn binder(brokers: &str) -> KafkaBinder {
    let mut settings = config(brokers);
    settings.partitions = PARTITIONS as i32;
    KafkaBinder::new(settings).expect("valid test settings")
}

async fn admin(binder: &KafkaBinder) -> Arc<dyn Admin> {
    binder
        .admin()
        .await
        .expect("the Kafka binder has admin access")
}

/// Message `id`: its payload, one of five keys, and two headers.
fn numbered(id: u64) -> Message {
    Message::new(format!("payload-{id}").into_bytes())
        .with_key(format!("key-{}", id % 5))
        .with_header("n", id.to_string())
        .with_header("trace", format!("t-{id}"))
}

/// Publishes messages `ids` and returns where each landed: id -> (partition, offset).
async fn publish(producer: &dyn Producer, ids: std::ops::Range<u64>) -> BTreeMap<u64, (u32, i64)> {
    let landed = producer
        .send_batch(ids.clone().map(numbered).collect())
        .await
        .expect("published");
    ids.zip(landed)
        .map(|(id, at)| {
            let (partition, offset) = at.split_once('@').expect("partition@offset");
            (id, (partition.parse().unwrap(), offset.parse().unwrap()))
        })
        .collect()
}

/// Reads everything from `from` in pages of `page`, and the cursor after the last page.
async fn read_all(
    admin: &dyn Admin,
    topic: &str,
    from: ReadFrom,
    page: usize,
) -> (Vec<Stored>, Cursor) {
    let mut from = from;
    let mut all = Vec::new();
    loop {
        let read = admin.read(topic, &from, page).await.expect("read");
        assert!(read.messages.len() <= page, "at most a page");
        if read.messages.is_empty() {
            return (all, read.next);
        }
        all.extend(read.messages);
        from = ReadFrom::Cursor(read.next);
    }
}

/// The id a stored message carries in its header `n`.
fn id_of(stored: &Stored) -> u64 {
    stored.message.headers().get("n").unwrap().parse().unwrap()
}

fn position(partition: u32, offset: i64) -> Position {
    Position(format!("{partition}:{offset}"))
}

/// The groups of the cluster named like the admin's readers: none, as they never join
/// nor commit.
async fn reader_groups(brokers: &str) -> Vec<String> {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    let client: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("a client");
    tokio::task::spawn_blocking(move || {
        let list = client
            .fetch_group_list(None, Duration::from_secs(10))
            .expect("the group list");
        list.groups()
            .iter()
            .map(|g| g.name().to_owned())
            .filter(|name| name.starts_with("stream-admin-reader."))
            .collect()
    })
    .await
    .unwrap()
}

/// `(partition, low, high)` of a report, by partition.
fn watermarks(report: &DestinationReport) -> BTreeMap<u32, (u64, u64)> {
    report
        .partitions
        .iter()
        .map(|&(p, low, high)| (p, (low, high)))
        .collect()
}

/// Per partition, how many of `landed` it got.
fn per_partition(landed: &BTreeMap<u64, (u32, i64)>) -> BTreeMap<u32, u64> {
    let mut counts = BTreeMap::new();
    for &(partition, _) in landed.values() {
        *counts.entry(partition).or_insert(0) += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_topic_is_reported_missing_and_left_alone() {
    let Some(brokers) = brokers("a_missing_topic_is_reported_missing_and_left_alone") else {
        return;
    };
    let binder = binder(&brokers);
    let admin = admin(&binder).await;
    let topic = unique("admin-missing");
    let report = admin.inspect(&topic, &[]).await.unwrap();
    assert!(!report.exists);
    assert_eq!(report.length, 0);
    assert!(report.partitions.is_empty() && report.groups.is_empty());
    let read = admin.read(&topic, &ReadFrom::Earliest, 10).await.unwrap();
    assert!(read.messages.is_empty());
    assert_eq!(
        admin.purge(&topic, SystemTime::now()).await.unwrap(),
        Some(0)
    );
    admin.remove(&topic, &[position(0, 3)]).await.unwrap();
    // Asking neither made the topic.
    assert!(!admin.inspect(&topic, &[]).await.unwrap().exists);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_topic_reports_its_watermarks_and_length() {
    let Some(brokers) = brokers("a_partitioned_topic_reports_its_watermarks_and_length") else {
        return;
    };
    let binder = binder(&brokers);
    let topic = unique("admin-inspect");
    let producer = binder.producer(&topic).await.unwrap();
    let landed = publish(&*producer, 0..30).await;
    let admin = admin(&binder).await;
    let report = admin.inspect(&topic, &[]).await.unwrap();
    assert!(report.exists);
    assert_eq!(report.length, 30);
    let counts = per_partition(&landed);
    assert!(
        counts.len() > 1,
        "five keys spread over partitions: {counts:?}"
    );
    let expected: BTreeMap<u32, (u64, u64)> = (0..PARTITIONS as u32)
        .map(|p| (p, (0, counts.get(&p).copied().unwrap_or(0))))
        .collect();
    assert_eq!(watermarks(&report), expected);
    assert!(
        report.groups.is_empty(),
        "nobody reads it: {:?}",
        report.groups
    );
    producer.close().await.unwrap();
}

/// A group that acknowledged one partition lags by the others; it is reported with its
/// member while that is there, and by its commits once it left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_that_consumed_part_is_reported_with_its_lag() {
    let Some(brokers) = brokers("a_group_that_consumed_part_is_reported_with_its_lag") else {
        return;
    };
    let binder = binder(&brokers);
    let topic = unique("admin-lag");
    let producer = binder.producer(&topic).await.unwrap();
    let landed = publish(&*producer, 0..20).await;
    let counts = per_partition(&landed);
    let acked_partition = *counts.keys().next().unwrap();
    let expected_lag = 20 - counts[&acked_partition];
    let group = unique("admin-g");
    let member = binder
        .consumer(&topic, &ConsumerOptions::new(&group))
        .await
        .unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < 20 {
        assert!(
            Instant::now() < deadline,
            "20 deliveries; got {}",
            got.len()
        );
        got.extend(member.receive(20 - got.len()).await.unwrap());
    }
    let tags: Vec<_> = got
        .iter()
        .filter(|r| r.message.partition() == Some(acked_partition))
        .map(|r| r.tag)
        .collect();
    member.ack(&tags).await.unwrap();
    let admin = admin(&binder).await;
    // Commits land every commit-interval: wait for the report to show it.
    let last = RefCell::new(None);
    let reached = eventually(Duration::from_secs(20), || {
        let (admin, topic, group, last) = (&admin, &topic, &group, &last);
        async move {
            let report = admin
                .inspect(topic, std::slice::from_ref(group))
                .await
                .unwrap();
            let found = report.groups.iter().find(|g| &g.name == group);
            let done = found.is_some_and(|g| g.lag == Some(expected_lag));
            *last.borrow_mut() = Some(report);
            done
        }
    })
    .await;
    let report = last.into_inner().unwrap();
    assert!(
        reached,
        "lag {expected_lag} for {group}: {:?}",
        report.groups
    );
    let reported = report.groups.iter().find(|g| g.name == group).unwrap();
    assert_eq!(reported.pending, None, "Kafka does not tell");
    assert_eq!(reported.consumers.len(), 1, "{:?}", reported.consumers);
    let consumer = &reported.consumers[0];
    assert!(consumer.name.starts_with("stream-rs"), "{}", consumer.name);
    assert!(consumer.name.contains("127.0.0.1"), "{}", consumer.name);
    assert_eq!((consumer.held, consumer.idle), (None, None));

    member.close().await.unwrap();
    // Gone from the group, still there by its commits, with the same lag.
    let last = RefCell::new(None);
    let left = eventually(Duration::from_secs(20), || {
        let (admin, topic, group, last) = (&admin, &topic, &group, &last);
        async move {
            let report = admin
                .inspect(topic, std::slice::from_ref(group))
                .await
                .unwrap();
            let found = report.groups.into_iter().find(|g| &g.name == group);
            let done = found.as_ref().is_some_and(|g| g.consumers.is_empty());
            *last.borrow_mut() = found;
            done
        }
    })
    .await;
    let reported = last
        .into_inner()
        .expect("the group is still reported by its commits");
    assert!(left, "member gone: {reported:?}");
    assert_eq!(reported.lag, Some(expected_lag));
    producer.close().await.unwrap();
}

/// Pages of 7 from the earliest: every message exactly once, each partition in offset
/// order without gaps, everything as it was sent; reading joins no group and commits
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_from_earliest_in_pages_returns_everything_once() {
    let Some(brokers) = brokers("reading_from_earliest_in_pages_returns_everything_once") else {
        return;
    };
    let binder = binder(&brokers);
    let topic = unique("admin-read");
    let producer = binder.producer(&topic).await.unwrap();
    let sent_from = SystemTime::now() - Duration::from_secs(1);
    let landed = publish(&*producer, 0..25).await;
    let sent_until = SystemTime::now() + Duration::from_secs(1);
    let admin = admin(&binder).await;
    let (all, cursor) = read_all(&*admin, &topic, ReadFrom::Earliest, 7).await;
    assert_eq!(all.len(), 25);
    let ids: BTreeSet<u64> = all.iter().map(id_of).collect();
    assert_eq!(ids, (0..25).collect(), "each once");
    let mut last_offset: BTreeMap<u32, i64> = BTreeMap::new();
    for stored in &all {
        let id = id_of(stored);
        let (partition, offset) = landed[&id];
        assert_eq!(stored.position, position(partition, offset));
        assert_eq!(stored.message.id(), format!("{partition}@{offset}"));
        assert_eq!(stored.message.partition(), Some(partition));
        let previous = last_offset.insert(partition, offset);
        assert_eq!(
            previous.map_or(0, |o| o + 1),
            offset,
            "partition {partition} in order, no gap"
        );
        let want = numbered(id);
        assert_eq!(stored.message.payload(), want.payload());
        assert_eq!(stored.message.key(), want.key());
        let headers: Vec<_> = stored.message.headers().iter().collect();
        let wanted: Vec<_> = want.headers().iter().collect();
        assert_eq!(headers, wanted);
        let at = stored.stored_at.expect("Kafka stamps records");
        assert!(sent_from <= at && at <= sent_until, "{at:?}");
    }
    let ends: Vec<String> = (0..PARTITIONS as u32)
        .map(|p| {
            format!(
                "{p}={}",
                per_partition(&landed).get(&p).copied().unwrap_or(0)
            )
        })
        .collect();
    assert_eq!(cursor.0, ends.join(","), "the cursor is at every end");
    // Nothing more: an empty read that stays where it is.
    let again = admin
        .read(&topic, &ReadFrom::Cursor(cursor.clone()), 7)
        .await
        .unwrap();
    assert!(again.messages.is_empty());
    assert_eq!(again.next, cursor);
    // Reading made no group and committed nothing.
    assert!(admin.inspect(&topic, &[]).await.unwrap().groups.is_empty());
    assert_eq!(reader_groups(&brokers).await, Vec::<String>::new());
    let bad = admin
        .read(&topic, &ReadFrom::Cursor(Cursor("0:4".into())), 7)
        .await
        .unwrap_err();
    assert_eq!(bad.kind(), ErrorKind::Config, "{bad}");
    producer.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_from_latest_returns_only_what_comes_after() {
    let Some(brokers) = brokers("reading_from_latest_returns_only_what_comes_after") else {
        return;
    };
    let binder = binder(&brokers);
    let topic = unique("admin-latest");
    let producer = binder.producer(&topic).await.unwrap();
    publish(&*producer, 0..10).await;
    let admin = admin(&binder).await;
    let latest = admin.read(&topic, &ReadFrom::Latest, 100).await.unwrap();
    assert!(latest.messages.is_empty());
    publish(&*producer, 10..16).await;
    let (after, _) = read_all(&*admin, &topic, ReadFrom::Cursor(latest.next), 100).await;
    let ids: BTreeSet<u64> = after.iter().map(id_of).collect();
    assert_eq!(ids, (10..16).collect());
    assert_eq!(after.len(), 6);
    producer.close().await.unwrap();
}

/// Removing one position deletes its partition's records up to it and nothing else;
/// removing it again changes nothing; a position never written is an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_up_to_a_position_deletes_exactly_that_prefix() {
    let Some(brokers) = brokers("removing_up_to_a_position_deletes_exactly_that_prefix") else {
        return;
    };
    let binder = binder(&brokers);
    let topic = unique("admin-remove");
    let producer = binder.producer(&topic).await.unwrap();
    let landed = publish(&*producer, 0..30).await;
    let admin = admin(&binder).await;
    assert_eq!(admin.removal(), Removal::UpTo);
    let counts = per_partition(&landed);
    let (&partition, &count) = counts.iter().max_by_key(|(_, &n)| n).unwrap();
    assert!(count >= 3, "{counts:?}");
    let before = watermarks(&admin.inspect(&topic, &[]).await.unwrap());
    // Two positions of the partition: the newer one counts.
    admin
        .remove(&topic, &[position(partition, 0), position(partition, 1)])
        .await
        .unwrap();
    let after = admin.inspect(&topic, &[]).await.unwrap();
    assert_eq!(after.length, 28);
    let mut expected = before.clone();
    expected.insert(partition, (2, count));
    assert_eq!(watermarks(&after), expected);
    let (left, _) = read_all(&*admin, &topic, ReadFrom::Earliest, 100).await;
    let ids: BTreeSet<u64> = left.iter().map(id_of).collect();
    let removed: BTreeSet<u64> = landed
        .iter()
        .filter(|(_, &(p, o))| p == partition && o <= 1)
        .map(|(&id, _)| id)
        .collect();
    assert_eq!(ids, (0..30).filter(|id| !removed.contains(id)).collect());
    // Gone already: skipped.
    admin
        .remove(&topic, &[position(partition, 0)])
        .await
        .unwrap();
    assert_eq!(
        watermarks(&admin.inspect(&topic, &[]).await.unwrap()),
        expected
    );
    let err = admin
        .remove(&topic, &[position(partition, count as i64 + 5)])
        .await
        .unwrap_err();
    assert!(err.message().contains("beyond the end"), "{err}");
    let err = admin
        .remove(&topic, &[Position("1@2".into())])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    producer.close().await.unwrap();
}

/// Purge removes what was stamped before the time and keeps what came after, and counts
/// what it removed; a time after everything empties the topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purging_by_time_removes_only_older_records() {
    let Some(brokers) = brokers("purging_by_time_removes_only_older_records") else {
        return;
    };
    let binder = binder(&brokers);
    let topic = unique("admin-purge");
    let producer = binder.producer(&topic).await.unwrap();
    publish(&*producer, 0..12).await;
    let admin = admin(&binder).await;
    let (old, _) = read_all(&*admin, &topic, ReadFrom::Earliest, 100).await;
    let newest_old = old.iter().filter_map(|s| s.stored_at).max().unwrap();
    // Timestamps are milliseconds: the cut is the millisecond after the newest old record,
    // and the new records are sent once the clock is past it.
    let cut = newest_old + Duration::from_millis(1);
    while SystemTime::now() <= cut {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    publish(&*producer, 12..20).await;
    assert_eq!(admin.purge(&topic, cut).await.unwrap(), Some(12));
    let report = admin.inspect(&topic, &[]).await.unwrap();
    assert_eq!(report.length, 8);
    let (left, _) = read_all(&*admin, &topic, ReadFrom::Earliest, 100).await;
    let ids: BTreeSet<u64> = left.iter().map(id_of).collect();
    assert_eq!(ids, (12..20).collect());
    // Nothing older than the cut is left.
    assert_eq!(admin.purge(&topic, cut).await.unwrap(), Some(0));
    let later = SystemTime::now() + Duration::from_secs(3600);
    assert_eq!(admin.purge(&topic, later).await.unwrap(), Some(8));
    assert_eq!(admin.inspect(&topic, &[]).await.unwrap().length, 0);
    producer.close().await.unwrap();
}

/// No broker: an error naming the address within connect-timeout, no secret in it. Needs
/// no Kafka.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_cluster_fails_in_bounded_time_without_secrets() {
    let mut settings =
        KafkaConfig::new("127.0.0.1:1").client_property("sasl.password", "topsecret");
    settings.connect_timeout = Duration::from_secs(2);
    let binder = KafkaBinder::new(settings).unwrap();
    let admin = admin(&binder).await;
    let started = Instant::now();
    let err = admin.inspect("anything", &[]).await.unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(err.kind(), ErrorKind::Connection | ErrorKind::Timeout),
        "{err}"
    );
    assert!(err.message().contains("127.0.0.1:1"), "{err}");
    assert!(!format!("{err} {err:?}").contains("topsecret"));
    assert!(took < Duration::from_secs(4), "took {took:?}");
    binder.close().await.unwrap();
    assert_eq!(
        binder.admin().await.err().unwrap().kind(),
        ErrorKind::Closed
    );
}

/// Core's dead-letter tools on Kafka: list, a filtered redrive refused (it would remove
/// the letters it skips), a redrive that sends every letter back to its destination and
/// leaves the dead-letter topic empty, and purge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_redriven_and_purged() {
    use stream_core::dlq::{Redrive, REDRIVE_COUNT};
    use stream_core::header;
    let Some(brokers) = brokers("dead_letters_are_listed_redriven_and_purged") else {
        return;
    };
    let (destination, dlq) = (unique("admin-orders"), unique("admin-orders-dlq"));
    let streams = stream_core::Streams::builder()
        .register(binder_kafka::register)
        .env(Vec::<(String, String)>::new())
        .load_str(&format!(
            r#"
            default-binder = "kafka"
            [binders.kafka]
            type = "kafka"
            brokers = "{brokers}"
            partitions = {PARTITIONS}

            [bindings.orders-in]
            destination = "{destination}"
            group = "{group}"
            dead-letter = "{dlq}"
            "#,
            group = unique("admin-dlq-g"),
        ))
        .unwrap();
    let binder = streams.binder("kafka").unwrap();
    let letters = binder.dead_letter_producer(&dlq).await.unwrap();
    for id in 0..6u64 {
        letters
            .send(
                numbered(id)
                    .with_header(header::ORIGINAL_DESTINATION, destination.as_str())
                    .with_header(header::ERROR_KIND, "handler")
                    .with_header(header::ERROR, "gateway down")
                    .with_header(header::ATTEMPTS, "3"),
            )
            .await
            .unwrap();
    }
    let dead = streams.dead_letters("orders-in").await.unwrap();
    let listed = dead.list(100).await.unwrap();
    assert_eq!(listed.len(), 6);
    assert!(listed
        .iter()
        .all(|l| l.error.as_deref() == Some("gateway down") && l.attempts == Some(3)));

    let filtered = Redrive {
        filter: Some(("n".into(), "1".into())),
        ..Redrive::default()
    };
    let refused = dead.redrive(&filtered, |_| {}).await.unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::Unsupported, "{refused}");

    let summary = dead.redrive(&Redrive::default(), |_| {}).await.unwrap();
    assert_eq!(summary.redriven, 6);
    assert!(dead.list(100).await.unwrap().is_empty());
    let admin = binder.admin().await.unwrap();
    assert_eq!(admin.inspect(&dlq, &[]).await.unwrap().length, 0);
    let (back, _) = read_all(&*admin, &destination, ReadFrom::Earliest, 100).await;
    let ids: BTreeSet<u64> = back.iter().map(id_of).collect();
    assert_eq!(ids, (0..6).collect());
    for stored in &back {
        let headers = stored.message.headers();
        assert_eq!(headers.get(REDRIVE_COUNT), Some("1"));
        assert_eq!(
            headers.get(header::ERROR),
            None,
            "dead-letter headers left behind"
        );
        assert_eq!(stored.message.key(), numbered(id_of(stored)).key());
    }

    letters.send(numbered(7)).await.unwrap();
    let stamped = dead.list(1).await.unwrap()[0].stored.stored_at.unwrap();
    // Timestamps are milliseconds: purge "older than now" once now is past its millisecond.
    while SystemTime::now() <= stamped + Duration::from_millis(1) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(dead.purge(Duration::ZERO).await.unwrap(), Some(1));
    assert!(dead.list(100).await.unwrap().is_empty());
    letters.close().await.unwrap();
}
