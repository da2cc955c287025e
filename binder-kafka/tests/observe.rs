//! What health checks and the lag gauge see: `Binder::ping` of a cluster that is away,
//! silent or fine, and `Consumer::lag` of new groups, acknowledged work, `start-from`,
//! retention and anonymous consumers.

mod common;

use std::time::Duration;

use binder_kafka::{KafkaBinder, KafkaConfig, MAX_PING_WAIT};
use common::{binder, brokers, config, eventually, unique};
use stream_core::{Binder, Consumer, ConsumerOptions, ErrorKind, Message, Received, StartFrom};
use tokio::net::TcpListener;
use tokio::time::Instant;

/// What a ping that fails may take: its bound, and scheduling slack on a busy machine.
const PING_BOUND: Duration = MAX_PING_WAIT.saturating_add(Duration::from_millis(500));

/// Nothing listens: a Connection error naming the brokers within the bound (well within
/// the 2 s `Streams::health` allows). Needs no Kafka.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_of_unreachable_brokers_names_them_in_bounded_time() {
    let binder = KafkaBinder::new(
        KafkaConfig::new("127.0.0.1:1").client_property("sasl.password", "topsecret"),
    )
    .unwrap();
    let started = Instant::now();
    let err = binder.ping().await.expect_err("nothing listens on port 1");
    let took = started.elapsed();
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    assert!(err.is_temporary());
    assert!(err.message().contains("127.0.0.1:1"), "{err}");
    assert!(!format!("{err} {err:?}").contains("topsecret"));
    assert!(took < PING_BOUND, "took {took:?}");
}

/// A broker that accepts connections and never answers: the bound holds, though
/// `connect-timeout` is far longer. Needs no Kafka.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_of_a_silent_broker_gives_up_at_its_bound() {
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = silent.local_addr().unwrap().to_string();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            open.push(socket);
        }
    });
    let mut settings = KafkaConfig::new(&address);
    settings.connect_timeout = Duration::from_secs(30);
    let binder = KafkaBinder::new(settings).unwrap();
    let started = Instant::now();
    let err = binder.ping().await.expect_err("the broker never answers");
    let took = started.elapsed();
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    assert!(err.message().contains(&address), "{err}");
    assert!(took < PING_BOUND, "took {took:?}");
    held.abort();
}

/// A live broker answers, before the binder uses any topic and after; a closed binder
/// says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_of_a_live_broker() {
    let Some(brokers) = brokers("ping_of_a_live_broker") else {
        return;
    };
    let binder = binder(&brokers);
    binder.ping().await.expect("before any topic");
    let producer = binder.producer(&unique("ping")).await.unwrap();
    binder.ping().await.expect("with a topic in use");
    producer.close().await.unwrap();
    binder.close().await.unwrap();
    assert_eq!(binder.ping().await.unwrap_err().kind(), ErrorKind::Closed);
}

fn numbered(id: u64) -> Message {
    Message::new(id.to_string().into_bytes()).with_key(format!("key-{}", id % 7))
}

async fn lag(consumer: &dyn Consumer) -> u64 {
    consumer
        .lag()
        .await
        .expect("lag")
        .expect("a group member tells its lag")
}

/// Waits until the lag reads `want` (commits land every `commit-interval`).
async fn lag_becomes(consumer: &dyn Consumer, want: u64) {
    let last = std::cell::Cell::new(None);
    let reached = eventually(Duration::from_secs(20), || {
        let last = &last;
        async move {
            let now = lag(consumer).await;
            last.set(Some(now));
            now == want
        }
    })
    .await;
    assert!(reached, "the lag reads {want}; last read {:?}", last.get());
}

async fn receive_n(consumer: &dyn Consumer, count: usize) -> Vec<Received> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < count {
        assert!(
            Instant::now() < deadline,
            "{count} deliveries; got {}",
            got.len()
        );
        got.extend(consumer.receive(count - got.len()).await.expect("receive"));
    }
    got
}

/// A new group on a backlog lags by the backlog over every partition, before it has joined
/// and while it holds deliveries; acknowledged and committed work takes it down to 0.
/// Every member tells the group's lag, over all partitions, including one assigned only
/// some of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_group_on_a_backlog_lags_by_the_backlog() {
    let Some(brokers) = brokers("a_new_group_on_a_backlog_lags_by_the_backlog") else {
        return;
    };
    let binder = binder(&brokers);
    let topic = unique("lag-backlog");
    let producer = binder.producer(&topic).await.unwrap();
    producer
        .send_batch((0..9).map(numbered).collect())
        .await
        .unwrap();
    let group = unique("g");
    let member = binder
        .consumer(&topic, &ConsumerOptions::new(&group))
        .await
        .unwrap();
    assert_eq!(
        lag(&*member).await,
        9,
        "nothing committed: the whole backlog"
    );
    let got = receive_n(&*member, 9).await;
    assert_eq!(lag(&*member).await, 9, "delivered is not acknowledged");
    member
        .ack(&got.iter().map(|r| r.tag).collect::<Vec<_>>())
        .await
        .unwrap();
    lag_becomes(&*member, 0).await;
    producer
        .send_batch((9..12).map(numbered).collect())
        .await
        .unwrap();
    lag_becomes(&*member, 3).await;
    let static_member = binder
        .consumer(
            &topic,
            &ConsumerOptions::new(unique("g")).partitions(vec![0]),
        )
        .await
        .unwrap();
    assert_eq!(
        lag(&*static_member).await,
        12,
        "a member of one partition tells the lag of the whole group"
    );
    static_member.close().await.unwrap();
    member.close().await.unwrap();
    producer.close().await.unwrap();
}

/// `start-from = "latest"`: the group starts at the ends, so a backlog before it is no lag
/// of its; what comes after is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_latest_group_lags_only_by_what_came_after_it() {
    let Some(brokers) = brokers("a_latest_group_lags_only_by_what_came_after_it") else {
        return;
    };
    let binder = binder(&brokers);
    let topic = unique("lag-latest");
    let producer = binder.producer(&topic).await.unwrap();
    producer
        .send_batch((0..5).map(numbered).collect())
        .await
        .unwrap();
    let member = binder
        .consumer(
            &topic,
            &ConsumerOptions::new(unique("g")).start_from(StartFrom::Latest),
        )
        .await
        .unwrap();
    assert_eq!(lag(&*member).await, 0);
    producer
        .send_batch((5..8).map(numbered).collect())
        .await
        .unwrap();
    assert_eq!(lag(&*member).await, 3);
    member.close().await.unwrap();
    producer.close().await.unwrap();
}

/// A committed offset that retention removed counts from the oldest retained message, as
/// the consumer reads from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_offset_retention_removed_counts_from_the_oldest_retained() {
    let Some(brokers) =
        brokers("a_committed_offset_retention_removed_counts_from_the_oldest_retained")
    else {
        return;
    };
    let mut settings = config(&brokers);
    settings.partitions = 1;
    let binder = KafkaBinder::new(settings).unwrap();
    let topic = unique("lag-retained");
    let producer = binder.producer(&topic).await.unwrap();
    producer
        .send_batch((0..10).map(numbered).collect())
        .await
        .unwrap();
    let member = binder
        .consumer(&topic, &ConsumerOptions::new(unique("g")))
        .await
        .unwrap();
    let got = receive_n(&*member, 3).await;
    member
        .ack(&got.iter().map(|r| r.tag).collect::<Vec<_>>())
        .await
        .unwrap();
    lag_becomes(&*member, 7).await;
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .unwrap();
    let mut below = rdkafka::TopicPartitionList::new();
    below
        .add_partition_offset(&topic, 0, rdkafka::Offset::Offset(6))
        .unwrap();
    admin
        .delete_records(&below, &rdkafka::admin::AdminOptions::new())
        .await
        .unwrap();
    // Committed 3, retained from 6: four left.
    assert_eq!(lag(&*member).await, 4);
    member.close().await.unwrap();
    producer.close().await.unwrap();
}

/// An anonymous consumer commits nothing, so it has no lag to tell.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anonymous_consumer_tells_no_lag() {
    let Some(brokers) = brokers("an_anonymous_consumer_tells_no_lag") else {
        return;
    };
    let binder = binder(&brokers);
    let topic = unique("lag-anonymous");
    let member = binder
        .consumer(
            &topic,
            &ConsumerOptions::new(unique("anonymous.")).anonymous(),
        )
        .await
        .unwrap();
    assert_eq!(member.lag().await.unwrap(), None);
    member.close().await.unwrap();
}
