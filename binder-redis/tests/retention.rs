//! Retention by acknowledgement (`trim = { acknowledged = true }`) on a real redis-server:
//! what every group acknowledged goes, nothing else does; the bound beside it drops the
//! oldest and says so.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use binder_redis::{RedisBinder, RedisConfig, TrimConfig};
use redis::aio::MultiplexedConnection;
use stream_core::{Binder, BindingConfig, Channel, Message};

const PATIENCE: Duration = Duration::from_secs(30);

/// One test at a time: each counts the server's `XTRIM` calls as its own producer's runs.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn binder(url: &str, max_len: Option<u64>) -> Arc<dyn Binder> {
    let mut config = RedisConfig::with_url(url);
    config.trim = Some(TrimConfig {
        max_len,
        max_age: None,
        approximate: false,
        acknowledged: true,
        interval: Duration::from_millis(100),
    });
    config.claim_interval = Some(Duration::from_millis(200));
    Arc::new(RedisBinder::new(config).unwrap())
}

/// A group on `stream` (made if missing) that starts at its beginning.
async fn create_group<C: redis::aio::ConnectionLike>(raw: &mut C, stream: &str, group: &str) {
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(raw)
        .await
        .unwrap();
}

async fn xlen(raw: &mut MultiplexedConnection, stream: &str) -> usize {
    redis::cmd("XLEN")
        .arg(stream)
        .query_async(raw)
        .await
        .unwrap()
}

async fn first_id(raw: &mut MultiplexedConnection, stream: &str) -> Option<String> {
    let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(1)
        .query_async(raw)
        .await
        .unwrap();
    reply.ids.into_iter().next().map(|entry| entry.id)
}

/// How many times Redis ran `XTRIM` (the retention script's trim), from `INFO commandstats`.
async fn trims(raw: &mut MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(raw)
        .await
        .unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix("cmdstat_xtrim:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |calls| calls.parse().unwrap())
}

/// Waits until the retention task has run `runs` more times (on any stream of this server:
/// a lower bound for ours).
async fn retention_ran(raw: &mut MultiplexedConnection, runs: u64) {
    let from = trims(raw).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while trims(raw).await < from + runs {
        assert!(
            tokio::time::Instant::now() < deadline,
            "retention never ran"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A producer of `stream` that has run its retention once (at start, before any entry).
async fn producer(
    binder: &Arc<dyn Binder>,
    raw: &mut MultiplexedConnection,
    stream: &str,
) -> Box<dyn stream_core::Producer> {
    let producer = binder.producer(stream).await.unwrap();
    retention_ran(raw, 1).await;
    producer
}

async fn publish(producer: &dyn stream_core::Producer, n: usize) {
    let batch: Vec<Message> = (0..n).map(|i| Message::new(format!("{i}"))).collect();
    producer.send_batch(batch).await.unwrap();
}

async fn handle_all(binder: &Arc<dyn Binder>, stream: &str, group: &str, n: usize) {
    let handled = Arc::new(AtomicUsize::new(0));
    let count = handled.clone();
    let subscription = Channel::new(
        "in",
        binder.clone(),
        BindingConfig::new(stream).group(group),
    )
    .sink_with(stream_core::Raw)
    .subscribe(move |_| {
        count.fetch_add(1, Ordering::SeqCst);
        async { Ok::<(), String>(()) }
    })
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while handled.load(Ordering::SeqCst) < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{group} handled {} of {n}",
            handled.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    subscription.shutdown().await.unwrap();
    assert_eq!(
        handled.load(Ordering::SeqCst),
        n,
        "{group} handled each once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_group_keeps_everything_it_has_not_acknowledged() {
    let Some(url) = common::redis_url() else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let binder = binder(&url, None);
    let mut raw = common::raw(&url).await;
    let stream = common::unique("retention");
    // Two groups from the start; `slow` reads nothing for now.
    for group in ["fast", "slow"] {
        create_group(&mut raw, &stream, group).await;
    }
    let producer = producer(&binder, &mut raw, &stream).await;
    publish(&*producer, 1000).await;
    handle_all(&binder, &stream, "fast", 1000).await;
    retention_ran(&mut raw, 3).await;
    assert_eq!(
        xlen(&mut raw, &stream).await,
        1000,
        "nothing `slow` has not read went"
    );

    // `slow` reads every message; then both have acknowledged everything.
    handle_all(&binder, &stream, "slow", 1000).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while xlen(&mut raw, &stream).await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stream never shrank"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    producer.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_entries_are_kept_until_acknowledged() {
    let Some(url) = common::redis_url() else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let binder = binder(&url, None);
    let mut raw = common::raw(&url).await;
    let stream = common::unique("retention-pending");
    create_group(&mut raw, &stream, "g").await;
    let producer = producer(&binder, &mut raw, &stream).await;
    publish(&*producer, 20).await;
    // A member reads ten and dies without acknowledging them: they stay pending.
    let read: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("g")
        .arg("crashed")
        .arg("COUNT")
        .arg(10)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut raw)
        .await
        .unwrap();
    let ids: Vec<String> = read.keys[0].ids.iter().map(|e| e.id.clone()).collect();
    retention_ran(&mut raw, 3).await;
    assert_eq!(
        xlen(&mut raw, &stream).await,
        20,
        "pending entries are kept"
    );

    // Five acknowledged: those go, the pending rest and the unread ten stay.
    let _: usize = redis::cmd("XACK")
        .arg(&stream)
        .arg("g")
        .arg(&ids[..5])
        .query_async(&mut raw)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while xlen(&mut raw, &stream).await > 15 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "acknowledged entries never went"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(xlen(&mut raw, &stream).await, 15);
    assert_eq!(
        first_id(&mut raw, &stream).await.as_deref(),
        Some(ids[5].as_str())
    );
    producer.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bound_drops_the_oldest_and_names_the_group_that_lost_them() {
    let Some(url) = common::redis_url() else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let recorded = stream_core::testing::observe::recorded();
    let binder = binder(&url, Some(100));
    let mut raw = common::raw(&url).await;
    let stream = common::unique("retention-bound");
    create_group(&mut raw, &stream, "slow").await;
    let producer = producer(&binder, &mut raw, &stream).await;
    publish(&*producer, 500).await;
    assert_eq!(
        xlen(&mut raw, &stream).await,
        100,
        "the bound kept the newest 100"
    );
    let labels = [("destination", stream.as_str()), ("group", "slow")];
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while recorded.counter(binder_redis::names::RETENTION_UNREAD_DROPPED, &labels) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the loss was never reported"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    producer.close().await.unwrap();
}

/// On a Redis Cluster the script runs on the node that owns the stream: a group that reads
/// later still gets every message, and once both groups acknowledged everything the stream
/// is empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_on_a_cluster_keeps_what_a_lagging_group_needs() {
    let Some(urls) = stream_core::testing::service_env("STREAM_TEST_REDIS_CLUSTER_URLS") else {
        return;
    };
    let nodes: Vec<String> = urls.split(',').map(|u| u.trim().to_owned()).collect();
    let mut config = RedisConfig::with_nodes(nodes.clone());
    config.trim = Some(TrimConfig {
        max_len: None,
        max_age: None,
        approximate: false,
        acknowledged: true,
        interval: Duration::from_millis(100),
    });
    let binder: Arc<dyn Binder> = Arc::new(RedisBinder::new(config).unwrap());
    let mut raw = redis::cluster::ClusterClient::new(nodes)
        .unwrap()
        .get_async_connection()
        .await
        .unwrap();
    let stream = common::unique("retention-cluster");
    for group in ["fast", "slow"] {
        create_group(&mut raw, &stream, group).await;
    }
    let producer = binder.producer(&stream).await.unwrap();
    publish(&*producer, 500).await;
    handle_all(&binder, &stream, "fast", 500).await;
    // Retention ran every 100 ms while `slow` read nothing; it still reads all 500.
    handle_all(&binder, &stream, "slow", 500).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let len: usize = redis::cmd("XLEN")
            .arg(&stream)
            .query_async(&mut raw)
            .await
            .unwrap();
        if len == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stream never shrank: {len}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    producer.close().await.unwrap();
}
