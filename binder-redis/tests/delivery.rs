//! Delivery under time and failure on a real redis-server: handlers slower than
//! `claim-idle`, attempts kept across hand-backs and crashes, refused acknowledgements, bad
//! entries, rolling restarts, and what a closed binder still makes.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use binder_redis::{RedisConfig, TrimConfig};
use futures::StreamExt;
use stream_core::testing::broker_lock;
use stream_core::{
    header, Binder, BindingConfig, Channel, ConsumerOptions, DeliveryTag, Envelope, ErrorKind,
    Message, RetryConfig, Streams, Subscription,
};
use tokio::time::Instant;

const PATIENCE: Duration = Duration::from_secs(20);

fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Retries short enough for `claim-idle`s of a few hundred milliseconds.
fn quick_retry(max_attempts: u32) -> RetryConfig {
    RetryConfig {
        max_attempts,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(100),
        multiplier: 2.0,
    }
}

/// Entries of `stream` (0 when it does not exist).
async fn xlen(raw: &mut redis::aio::MultiplexedConnection, stream: &str) -> usize {
    redis::cmd("XLEN")
        .arg(stream)
        .query_async(raw)
        .await
        .unwrap()
}

/// Delivery count and idle time of each pending entry of `group`, by id.
async fn pending_by_id(
    raw: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    group: &str,
) -> HashMap<String, (usize, usize)> {
    common::pending_entries(raw, stream, group)
        .await
        .into_iter()
        .map(|p| (p.id, (p.times_delivered, p.last_delivered_ms)))
        .collect()
}

/// The consumer name of the one member of `group` whose name starts with `prefix`.
async fn member_named(
    raw: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    group: &str,
    prefix: &str,
) -> String {
    common::consumers(raw, stream, group)
        .await
        .into_iter()
        .map(|(name, _)| name)
        .find(|name| name.starts_with(prefix))
        .expect("the consumer is a member of its group")
}

/// Two members, prefetch 40, concurrency 1, a 100 ms handler, `claim-idle` 500 ms: the
/// first member holds all 40 for about 4 s, eight times `claim-idle`. The other member
/// takes none of them over: no message is handled twice and each key's messages are
/// handled in publish order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_handlers_keep_their_entries_from_other_members() {
    let _lock = broker_lock(false).await;
    let Some(url) = common::redis_url() else {
        return;
    };
    let stream = common::unique("slow");
    let config = BindingConfig::new(&stream)
        .group(common::unique("g"))
        .prefetch(40)
        .concurrency(1)
        .claim_idle(Duration::from_millis(500))
        .retry(quick_retry(3));
    let binder = common::binder(&url);
    let source = Channel::new("slow", binder.clone(), config.clone())
        .source::<u64>()
        .await
        .unwrap();
    for n in 0..40u64 {
        source.send_keyed(format!("k{}", n % 4), &n).await.unwrap();
    }
    // (member, key, n) in handling order.
    let log: Arc<Mutex<Vec<(usize, String, u64)>>> = Arc::default();
    let subscribe = |member: usize| {
        let (log, binder, config) = (log.clone(), common::binder(&url), config.clone());
        async move {
            Channel::new("slow", binder, config)
                .sink::<u64>()
                .subscribe_envelope(move |e: Envelope<u64>| {
                    let log = log.clone();
                    let key = e.message().key().unwrap_or_default().to_owned();
                    let n = *e.payload();
                    async move {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        log.lock().unwrap().push((member, key, n));
                        Ok::<(), String>(())
                    }
                })
                .await
                .unwrap()
        }
    };
    let first = subscribe(0).await;
    let deadline = Instant::now() + PATIENCE;
    while log.lock().unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the first member handles nothing"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The first member's read took all 40: it has handled one and holds 39.
    let second = subscribe(1).await;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let distinct: HashSet<u64> = log.lock().unwrap().iter().map(|(_, _, n)| *n).collect();
        if distinct.len() == 40 {
            break;
        }
        assert!(Instant::now() < deadline, "not all 40 handled in time");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.shutdown().await.unwrap();
    second.shutdown().await.unwrap();

    let log = log.lock().unwrap().clone();
    let mut times: HashMap<u64, usize> = HashMap::new();
    for (_, _, n) in &log {
        *times.entry(*n).or_default() += 1;
    }
    let duplicates: usize = times.values().map(|c| c - 1).sum();
    let by_second = log.iter().filter(|(m, _, _)| *m == 1).count();
    report(&format!(
        "slow_handlers: 40 messages, handled {} times, duplicates {duplicates}, \
         by the second member {by_second}",
        log.len()
    ));
    assert_eq!(duplicates, 0, "a live member's entries were taken over");
    for key in ["k0", "k1", "k2", "k3"] {
        let order: Vec<u64> = log
            .iter()
            .filter(|(_, k, _)| k == key)
            .map(|(_, _, n)| *n)
            .collect();
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(order, sorted, "{key} handled out of publish order");
    }
}

/// A handler fails attempts 1 and 2 and is still running attempt 3 when its process
/// crashes (its runtime is torn down: no shutdown, no close). The next member's handler is
/// told attempt 4: the attempts made survive the crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_survive_a_crash() {
    let _lock = broker_lock(false).await;
    let Some(url) = common::redis_url() else {
        return;
    };
    let stream = common::unique("attempts");
    let config = BindingConfig::new(&stream)
        .group(common::unique("g"))
        .claim_idle(Duration::from_millis(300))
        .retry(quick_retry(10));
    Channel::new("attempts", common::binder(&url), config.clone())
        .source::<u64>()
        .await
        .unwrap()
        .send(&7)
        .await
        .unwrap();

    let crashed = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let seen: Arc<Mutex<Vec<u32>>> = Arc::default();
    let (third_started, started) = tokio::sync::oneshot::channel::<()>();
    let third_started = Arc::new(Mutex::new(Some(third_started)));
    let (s, cfg, u) = (seen.clone(), config.clone(), url.clone());
    let subscription: Subscription = crashed
        .spawn(async move {
            Channel::new("attempts", common::binder(&u), cfg)
                .sink::<u64>()
                .subscribe_envelope(move |e: Envelope<u64>| {
                    let attempt = e.attempt();
                    s.lock().unwrap().push(attempt);
                    let signal = third_started.clone();
                    async move {
                        if attempt < 3 {
                            return Err(format!("attempt {attempt} fails"));
                        }
                        if let Some(tx) = signal.lock().unwrap().take() {
                            let _ = tx.send(());
                        }
                        std::future::pending::<()>().await;
                        Ok(())
                    }
                })
                .await
                .unwrap()
        })
        .await
        .unwrap();
    tokio::time::timeout(PATIENCE, started)
        .await
        .expect("attempt 3 starts")
        .unwrap();
    // The crash: every task of that process stops where it is.
    crashed.shutdown_background();
    std::mem::forget(subscription);
    assert_eq!(*seen.lock().unwrap(), vec![1, 2, 3]);

    let next: Arc<Mutex<Vec<u32>>> = Arc::default();
    let n = next.clone();
    let survivor = Channel::new("attempts", common::binder(&url), config)
        .sink::<u64>()
        .subscribe_envelope(move |e: Envelope<u64>| {
            n.lock().unwrap().push(e.attempt());
            async { Ok::<(), String>(()) }
        })
        .await
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    while next.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the next member never got it");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    survivor.shutdown().await.unwrap();
    assert_eq!(
        *next.lock().unwrap(),
        vec![4],
        "three attempts were made before the crash"
    );
}

/// While a consumer holds entries, a receive fails midway (its connections are killed), so
/// the next one re-reads the consumer's own pending list first. That re-read leaves the
/// delivery counts alone: the held entries still count one attempt, and an entry Redis
/// handed to the consumer whose reply it never saw comes back as attempt 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_pending_pass_keeps_delivery_counts() {
    // CLIENT KILL drops every connection: nothing else may run meanwhile.
    let _lock = broker_lock(true).await;
    let Some(url) = common::redis_url() else {
        return;
    };
    let (stream, group) = (common::unique("pass"), common::unique("g"));
    let prefix = common::unique("member");
    let binder = common::binder_with(RedisConfig {
        consumer_prefix: prefix.clone(),
        block: Duration::from_millis(100),
        ..RedisConfig::with_url(&url)
    });
    let consumer = binder
        .consumer(
            &stream,
            &ConsumerOptions::new(&group).claim_idle(Duration::from_secs(60)),
        )
        .await
        .unwrap();
    let producer = binder.producer(&stream).await.unwrap();
    producer
        .send_batch((0..5).map(|n| Message::new(format!("held-{n}"))).collect())
        .await
        .unwrap();
    let held = common::receive_until(&*consumer, PATIENCE, "five entries", |g| g.len() >= 5).await;
    assert!(held.iter().all(|r| r.attempt == 1));

    // A read whose reply was lost: Redis recorded the delivery, the consumer never saw it.
    let unseen = producer.send(Message::new("unseen")).await.unwrap();
    let mut raw = common::raw(&url).await;
    let name = member_named(&mut raw, &stream, &group, &prefix).await;
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(&group)
        .arg(&name)
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut raw)
        .await
        .unwrap();
    let _: redis::Value = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .arg("SKIPME")
        .arg("yes")
        .query_async(&mut raw)
        .await
        .unwrap();

    let got =
        common::receive_until(&*consumer, PATIENCE, "the unseen entry", |g| !g.is_empty()).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message.id(), unseen);
    assert_eq!(got[0].attempt, 1, "the lost read never reached a handler");
    let mut raw = common::raw(&url).await;
    let counts = pending_by_id(&mut raw, &stream, &group).await;
    for r in held.iter().chain(&got) {
        assert_eq!(
            counts[r.message.id()].0,
            1,
            "delivery count of {} after the re-read",
            String::from_utf8_lossy(r.message.payload())
        );
    }
    consumer.close().await.unwrap();
}

/// Entries a consumer holds went idle past `claim-idle` (as when its process stalled), so
/// its own claim sweep takes them: they stay with it, not handed out again, and their
/// delivery counts do not grow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_claim_sweep_keeps_counts_of_held_entries() {
    let _lock = broker_lock(false).await;
    let Some(url) = common::redis_url() else {
        return;
    };
    let (stream, group) = (common::unique("sweep"), common::unique("g"));
    let prefix = common::unique("member");
    let binder = common::binder_with(RedisConfig {
        consumer_prefix: prefix.clone(),
        block: Duration::from_millis(50),
        claim_interval: Some(Duration::from_millis(20)),
        ..RedisConfig::with_url(&url)
    });
    // A long claim-idle keeps the keepalive out of the way: only the sweep touches them.
    let consumer = binder
        .consumer(
            &stream,
            &ConsumerOptions::new(&group).claim_idle(Duration::from_secs(60)),
        )
        .await
        .unwrap();
    binder
        .producer(&stream)
        .await
        .unwrap()
        .send_batch((0..5).map(|n| Message::new(n.to_string())).collect())
        .await
        .unwrap();
    let held = common::receive_until(&*consumer, PATIENCE, "five entries", |g| g.len() >= 5).await;
    let ids: Vec<&str> = held.iter().map(|r| r.message.id()).collect();
    let mut raw = common::raw(&url).await;
    let name = member_named(&mut raw, &stream, &group, &prefix).await;
    let _: Vec<String> = redis::cmd("XCLAIM")
        .arg(&stream)
        .arg(&group)
        .arg(&name)
        .arg(0)
        .arg(&ids)
        .arg("IDLE")
        .arg(3_600_000)
        .arg("JUSTID")
        .query_async(&mut raw)
        .await
        .unwrap();

    let deadline = Instant::now() + PATIENCE;
    loop {
        let again = consumer.receive(16).await.unwrap();
        assert!(again.is_empty(), "held entries handed out again");
        let pending = pending_by_id(&mut raw, &stream, &group).await;
        if pending.values().all(|(_, idle)| *idle < 3_000_000) {
            assert!(
                pending.values().all(|(count, _)| *count == 1),
                "the sweep counted a delivery of held entries: {pending:?}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "the sweep never took them");
    }
    consumer.close().await.unwrap();
}

/// Ten messages, prefetch 16: ten rounds of "open a pull stream, take and ack one, close"
/// dead-letter nothing, and every message reaches its handler as attempt 1. What a close
/// hands back unseen is not an attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_and_reopen_with_a_large_prefetch_dead_letters_nothing() {
    let _lock = broker_lock(false).await;
    let Some(url) = common::redis_url() else {
        return;
    };
    let stream = common::unique("reopen");
    let config = BindingConfig::new(&stream)
        .group(common::unique("g"))
        .prefetch(16)
        .claim_idle(Duration::from_millis(500))
        .retry(quick_retry(3));
    let dlq = config.dead_letter_destination();
    let binder = common::binder(&url);
    let channel = Channel::new("reopen", binder.clone(), config);
    channel
        .source::<u64>()
        .await
        .unwrap()
        .send_batch(&(0..10).collect::<Vec<u64>>())
        .await
        .unwrap();
    let mut handled: Vec<(u64, u32)> = Vec::new();
    for round in 0..10 {
        let mut deliveries = channel.sink::<u64>().stream().await.unwrap();
        let delivery = tokio::time::timeout(PATIENCE, deliveries.next())
            .await
            .unwrap_or_else(|_| panic!("round {round}: nothing delivered"))
            .expect("stream open")
            .expect("no error");
        handled.push((*delivery.payload(), delivery.attempt()));
        delivery.ack();
        deliveries.close().await.unwrap();
    }
    let mut raw = common::raw(&url).await;
    let dead = xlen(&mut raw, &dlq).await;
    report(&format!(
        "close_and_reopen: handled {handled:?}, dead letters {dead}"
    ));
    assert_eq!(dead, 0, "dead letters of deliveries no handler saw");
    let distinct: HashSet<u64> = handled.iter().map(|(n, _)| *n).collect();
    assert_eq!(distinct.len(), 10, "each message once: {handled:?}");
    assert!(
        handled.iter().all(|(_, attempt)| *attempt == 1),
        "hand-backs counted as attempts: {handled:?}"
    );
}

/// Clients of the server blocked in a command (`INFO clients`).
async fn blocked_clients(raw: &mut redis::aio::MultiplexedConnection) -> usize {
    let info: String = redis::cmd("INFO")
        .arg("clients")
        .query_async(raw)
        .await
        .unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix("blocked_clients:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("INFO clients has blocked_clients")
}

/// Core stops fetching by dropping a `receive` whose read is blocked in Redis. The read is
/// still served: an entry published meanwhile lands in the consumer's pending list, counted
/// as delivered, and nothing ever sees it. No handler saw it, so `close` hands it back
/// uncounted, as it hands back what core released: the next member gets it as attempt 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_a_dropped_receive_never_returned_are_handed_back_uncounted() {
    // Counts the server's blocked clients: nothing else may run meanwhile.
    let _lock = broker_lock(true).await;
    let Some(url) = common::redis_url() else {
        return;
    };
    let (stream, group) = (common::unique("dropped-read"), common::unique("g"));
    // An hour: anything the other member gets was handed back, not claimed as idle.
    let options = ConsumerOptions::new(&group).claim_idle(Duration::from_secs(3600));
    let binder = common::binder_with(RedisConfig {
        block: Duration::from_secs(10),
        ..RedisConfig::with_url(&url)
    });
    let first = binder.consumer(&stream, &options).await.unwrap();
    let mut raw = common::raw(&url).await;
    let mut watch = common::raw(&url).await;
    let blocked = async {
        while blocked_clients(&mut watch).await == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    tokio::select! {
        got = first.receive(16) => panic!("nothing was published yet: {got:?}"),
        () = blocked => {}
        () = tokio::time::sleep(PATIENCE) => panic!("the read never blocked"),
    }
    // The receive is dropped; its read is not.
    binder
        .producer(&stream)
        .await
        .unwrap()
        .send(Message::new("late"))
        .await
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    while common::pending(&mut raw, &stream, &group).await == 0 {
        assert!(Instant::now() < deadline, "the blocked read never got it");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    first.close().await.unwrap();

    let second = common::binder(&url)
        .consumer(&stream, &options)
        .await
        .unwrap();
    let back = common::receive_until(&*second, PATIENCE, "the entry", |g| !g.is_empty()).await;
    assert_eq!(
        back.iter().map(|r| r.attempt).collect::<Vec<_>>(),
        vec![1],
        "a delivery no handler saw was counted as an attempt"
    );
    second
        .ack(&back.iter().map(|r| r.tag).collect::<Vec<_>>())
        .await
        .unwrap();
    second.close().await.unwrap();
}

/// `release` hands deliveries back at once (another member takes them without waiting for
/// `claim-idle`) and uncounted: the next delivery is attempt 1 again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn released_deliveries_go_back_at_once_uncounted() {
    let _lock = broker_lock(false).await;
    let Some(url) = common::redis_url() else {
        return;
    };
    let (stream, group) = (common::unique("release"), common::unique("g"));
    // An hour: anything the other member gets was handed back, not claimed as idle.
    let options = ConsumerOptions::new(&group).claim_idle(Duration::from_secs(3600));
    let binder = common::binder(&url);
    binder
        .producer(&stream)
        .await
        .unwrap()
        .send_batch((0..5).map(|n| Message::new(n.to_string())).collect())
        .await
        .unwrap();
    let first = binder.consumer(&stream, &options).await.unwrap();
    let got = common::receive_until(&*first, PATIENCE, "five entries", |g| g.len() >= 5).await;
    let tags: Vec<DeliveryTag> = got.iter().map(|r| r.tag).collect();
    first.release(&tags).await.unwrap();

    let second = common::binder(&url)
        .consumer(&stream, &options)
        .await
        .unwrap();
    let back =
        common::receive_until(&*second, PATIENCE, "the released entries", |g| g.len() >= 5).await;
    assert_eq!(
        back.iter().map(|r| r.message.id()).collect::<HashSet<_>>(),
        got.iter().map(|r| r.message.id()).collect::<HashSet<_>>()
    );
    assert!(
        back.iter().all(|r| r.attempt == 1),
        "released deliveries counted: {:?}",
        back.iter().map(|r| r.attempt).collect::<Vec<_>>()
    );
    second
        .ack(&back.iter().map(|r| r.tag).collect::<Vec<_>>())
        .await
        .unwrap();
    second.close().await.unwrap();
    first.close().await.unwrap();
}

/// Core sends a failed `release` again (a temporary error, or a reply lost with its
/// connection), though the first may have run, in part (a page of it) or whole: releasing
/// the same deliveries twice takes one count off, not two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_sent_twice_takes_one_count_off() {
    let _lock = broker_lock(false).await;
    let Some(url) = common::redis_url() else {
        return;
    };
    let (stream, group) = (common::unique("release-twice"), common::unique("g"));
    let options = ConsumerOptions::new(&group).claim_idle(Duration::from_secs(3600));
    let binder = common::binder(&url);
    binder
        .producer(&stream)
        .await
        .unwrap()
        .send(Message::new("m"))
        .await
        .unwrap();
    let first = binder.consumer(&stream, &options).await.unwrap();
    let got = common::receive_until(&*first, PATIENCE, "the entry", |g| !g.is_empty()).await;
    let tag = got[0].tag;
    // Attempt 1 failed; attempt 2 is recorded, then handed back before it starts.
    first.retrying(tag, 2).await.unwrap();
    first.release(&[tag]).await.unwrap();
    first.release(&[tag]).await.unwrap();
    let mut raw = common::raw(&url).await;
    let counts: Vec<usize> = pending_by_id(&mut raw, &stream, &group)
        .await
        .into_values()
        .map(|(count, _)| count)
        .collect();
    assert_eq!(counts, vec![1], "the one attempt made stays counted");

    let second = common::binder(&url)
        .consumer(&stream, &options)
        .await
        .unwrap();
    let back = common::receive_until(&*second, PATIENCE, "the entry", |g| !g.is_empty()).await;
    assert_eq!(back.iter().map(|r| r.attempt).collect::<Vec<_>>(), vec![2]);
    second.ack(&[back[0].tag]).await.unwrap();
    second.close().await.unwrap();
    first.close().await.unwrap();
}

/// With a trimming binder, ordinary streams are trimmed but dead letters are kept until
/// someone handles them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_not_trimmed() {
    let _lock = broker_lock(false).await;
    let Some(url) = common::redis_url() else {
        return;
    };
    let binder = common::binder_with(RedisConfig {
        trim: Some(TrimConfig {
            max_len: Some(3),
            max_age: None,
            approximate: false,
            acknowledged: false,
            interval: Duration::from_secs(10),
        }),
        ..RedisConfig::with_url(&url)
    });
    let (stream, dlq) = (common::unique("trimmed"), common::unique("trimmed-dlq"));
    let producer = binder.producer(&stream).await.unwrap();
    let dead_letters = binder.dead_letter_producer(&dlq).await.unwrap();
    for n in 0..10 {
        producer.send(Message::new(n.to_string())).await.unwrap();
        dead_letters
            .send(Message::new(n.to_string()))
            .await
            .unwrap();
    }
    let mut raw = common::raw(&url).await;
    assert_eq!(xlen(&mut raw, &stream).await, 3, "the trim rule applies");
    assert_eq!(xlen(&mut raw, &dlq).await, 10, "dead letters were trimmed");
}

/// After `close`, the binder makes no new producer, dead-letter producer or consumer
/// (`Closed`); the producer made before keeps working until it is closed itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_binder_refuses_new_clients() {
    let _lock = broker_lock(false).await;
    let Some(url) = common::redis_url() else {
        return;
    };
    let stream = common::unique("closed");
    let binder = common::binder(&url);
    let before = binder.producer(&stream).await.unwrap();
    binder.close().await.unwrap();
    let producer = binder.producer(&stream).await.err().expect("producer");
    assert_eq!(producer.kind(), ErrorKind::Closed);
    let dead_letters = binder
        .dead_letter_producer(&stream)
        .await
        .err()
        .expect("dead-letter producer");
    assert_eq!(dead_letters.kind(), ErrorKind::Closed);
    let consumer = binder
        .consumer(&stream, &ConsumerOptions::new(common::unique("g")))
        .await
        .err()
        .expect("consumer");
    assert_eq!(consumer.kind(), ErrorKind::Closed);
    before.send(Message::new("still open")).await.unwrap();
    before.close().await.unwrap();
}

/// A Redis user allowed everything but `XACK`, and the binder connected as that user.
async fn binder_that_cannot_ack(url: &str) -> (Arc<dyn Binder>, String) {
    let user = common::unique("no-xack");
    let mut raw = common::raw(url).await;
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&user)
        .arg("on")
        .arg(">pw")
        .arg("~*")
        .arg("&*")
        .arg("+@all")
        .arg("-xack")
        .query_async(&mut raw)
        .await
        .unwrap();
    let binder = common::binder_with(RedisConfig {
        username: Some(user.clone()),
        password: Some("pw".into()),
        block: Duration::from_millis(50),
        command_timeout: Duration::from_secs(2),
        ..RedisConfig::with_url(url)
    });
    (binder, user)
}

async fn delete_user(url: &str, user: &str) {
    let _: i64 = redis::cmd("ACL")
        .arg("DELUSER")
        .arg(user)
        .query_async(&mut common::raw(url).await)
        .await
        .unwrap();
}

/// Redis refuses the `XACK`s of two acknowledged entries: `close` says so with an error and
/// hands back only the three entries no handler finished. The two stay pending under the
/// closed consumer (not immediately claimable), since handing them back would have them
/// handled twice at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_keeps_entries_whose_ack_redis_refused() {
    let _lock = broker_lock(false).await;
    let Some(url) = common::redis_url() else {
        return;
    };
    let (stream, group) = (common::unique("refused"), common::unique("g"));
    let (binder, user) = binder_that_cannot_ack(&url).await;
    binder
        .producer(&stream)
        .await
        .unwrap()
        .send_batch((0..5).map(|n| Message::new(n.to_string())).collect())
        .await
        .unwrap();
    let consumer = binder
        .consumer(
            &stream,
            &ConsumerOptions::new(&group).claim_idle(Duration::from_secs(3600)),
        )
        .await
        .unwrap();
    let got = common::receive_until(&*consumer, PATIENCE, "five entries", |g| g.len() >= 5).await;
    let (acked, unfinished) = got.split_at(2);
    consumer
        .ack(&acked.iter().map(|r| r.tag).collect::<Vec<_>>())
        .await
        .unwrap();
    let closed = consumer.close().await;
    delete_user(&url, &user).await;
    let err = closed.expect_err("close reports the acknowledgements Redis refused");
    report(&format!(
        "close_keeps_entries_whose_ack_redis_refused: {err}"
    ));

    let mut raw = common::raw(&url).await;
    let pending = pending_by_id(&mut raw, &stream, &group).await;
    assert_eq!(pending.len(), 5, "nothing was acknowledged");
    const HANDED_BACK: usize = 1_000_000_000; // idle since 1970
    for r in acked {
        assert!(
            pending[r.message.id()].1 < HANDED_BACK,
            "an entry whose XACK was refused was handed back"
        );
    }
    for r in unfinished {
        assert!(
            pending[r.message.id()].1 > HANDED_BACK,
            "an unfinished entry was not handed back"
        );
    }
}

/// Redis refuses an `XACK` for good: the consumer does not hand the acknowledged entry out
/// again (not even once `claim-idle` has passed), and its next `receive` fails with an
/// error that says so, so the subscription ends instead of handling the entry twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_ack_is_reported_and_not_redelivered() {
    let _lock = broker_lock(false).await;
    let Some(url) = common::redis_url() else {
        return;
    };
    let (stream, group) = (common::unique("refused"), common::unique("g"));
    let (binder, user) = binder_that_cannot_ack(&url).await;
    binder
        .producer(&stream)
        .await
        .unwrap()
        .send(Message::new("once"))
        .await
        .unwrap();
    let claim_idle = Duration::from_millis(200);
    let consumer = binder
        .consumer(
            &stream,
            &ConsumerOptions::new(&group).claim_idle(claim_idle),
        )
        .await
        .unwrap();
    let got = common::receive_until(&*consumer, PATIENCE, "the entry", |g| !g.is_empty()).await;
    consumer.ack(&[got[0].tag]).await.unwrap();
    let acked_at = Instant::now();
    let error = loop {
        match consumer.receive(16).await {
            Ok(batch) => {
                assert!(
                    batch.is_empty(),
                    "the acknowledged entry came back: attempt {}",
                    batch[0].attempt
                );
                assert!(
                    acked_at.elapsed() < PATIENCE,
                    "the refused XACK was never reported"
                );
            }
            Err(e) if e.is_temporary() => {}
            Err(e) => break e,
        }
    };
    report(&format!(
        "refused_ack_is_reported_and_not_redelivered: {error}"
    ));
    assert_eq!(error.kind(), ErrorKind::Broker);
    let _ = consumer.close().await;
    delete_user(&url, &user).await;
}

/// Entries no producer of this library wrote, with a header or field name or value, or a
/// key, that is not UTF-8, or without a payload: each is dead-lettered as undecodable and
/// the consumer goes on to the next entry. The handler sees only the good one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_entries_are_dead_lettered_without_stopping_the_consumer() {
    let _lock = broker_lock(false).await;
    let Some(url) = common::redis_url() else {
        return;
    };
    let stream = common::unique("malformed");
    let config = BindingConfig::new(&stream)
        .group(common::unique("g"))
        .claim_idle(Duration::from_millis(500))
        .retry(quick_retry(3));
    let dlq = config.dead_letter_destination();
    let mut raw = common::raw(&url).await;
    let bad: Vec<Vec<(&[u8], &[u8])>> = vec![
        vec![(b"p", b"1"), (b"h:\xff\xfename", b"v")],
        vec![(b"p", b"2"), (b"h:name", b"\xc3\x28")],
        vec![(b"h:name", b"v")],
        vec![(b"p", b"4"), (b"k", b"\xff")],
        vec![(b"p", b"5"), (b"\xfe", b"foreign")],
    ];
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("p")
        .arg("0")
        .query_async(&mut raw)
        .await
        .unwrap();
    let channel = Channel::new("malformed", common::binder(&url), config);
    let handled: Arc<Mutex<Vec<u64>>> = Arc::default();
    let h = handled.clone();
    let subscription = channel
        .sink::<u64>()
        .subscribe(move |n: u64| {
            h.lock().unwrap().push(n);
            async { Ok::<(), String>(()) }
        })
        .await
        .unwrap();
    // Published behind a good entry, so the group already reads when they arrive.
    let deadline = Instant::now() + PATIENCE;
    while handled.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the first entry was not handled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for fields in &bad {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&stream).arg("*");
        for (field, value) in fields {
            cmd.arg(*field).arg(*value);
        }
        let _: String = cmd.query_async(&mut raw).await.unwrap();
    }
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("p")
        .arg("6")
        .query_async(&mut raw)
        .await
        .unwrap();
    let reader = common::binder(&url)
        .consumer(&dlq, &ConsumerOptions::new(common::unique("dlq-reader")))
        .await
        .unwrap();
    let dead =
        common::receive_until(&*reader, PATIENCE, "five dead letters", |g| g.len() >= 5).await;
    let deadline = Instant::now() + PATIENCE;
    while handled.lock().unwrap().len() < 2 {
        assert!(Instant::now() < deadline, "the entry after the bad ones");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        !subscription.is_finished(),
        "the bad entries stopped the subscription"
    );
    subscription.shutdown().await.unwrap();
    assert_eq!(*handled.lock().unwrap(), vec![0, 6]);
    for letter in &dead {
        let headers = letter.message.headers();
        report(&format!(
            "dead letter: {:?}",
            headers.get(header::ERROR).unwrap_or_default()
        ));
        assert_eq!(headers.get(header::ERROR_KIND), Some("decode"));
    }
}

/// Durations far past any deadline a clock can hold (`claim-idle`, `claim-interval` and
/// `consumer-expiry` as `Duration::MAX`: "never") are "not in this process's lifetime",
/// not a panic in `receive` or a garbage argument to Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_durations_mean_never() {
    let _lock = broker_lock(false).await;
    let Some(url) = common::redis_url() else {
        return;
    };
    let (stream, group) = (common::unique("never"), common::unique("g"));
    let binder = common::binder_with(RedisConfig {
        block: Duration::from_millis(50),
        claim_interval: Some(Duration::MAX),
        consumer_expiry: Duration::MAX,
        ..RedisConfig::with_url(&url)
    });
    let consumer = binder
        .consumer(
            &stream,
            &ConsumerOptions::new(&group).claim_idle(Duration::MAX),
        )
        .await
        .unwrap();
    let first = tokio::spawn(async move {
        let got = consumer.receive(16).await;
        (consumer, got)
    });
    let (consumer, got) = first.await.expect("receive does not panic");
    assert!(got.unwrap().is_empty());
    binder
        .producer(&stream)
        .await
        .unwrap()
        .send(Message::new("m"))
        .await
        .unwrap();
    let got = common::receive_until(&*consumer, PATIENCE, "the entry", |g| !g.is_empty()).await;
    consumer
        .ack(&got.iter().map(|r| r.tag).collect::<Vec<_>>())
        .await
        .unwrap();
    consumer.close().await.unwrap();
}

/// A `claim-idle` that does not exceed `retry.max-backoff` is refused at load, naming the
/// binding: a member that dies while a message waits out its backoff would otherwise have
/// it taken over and retried sooner than the backoff promises.
#[tokio::test]
async fn claim_idle_within_max_backoff_is_a_config_error() {
    let load = |claim_idle: &str| {
        Streams::builder()
            .register(binder_redis::register)
            .env(Vec::<(String, String)>::new())
            .load_str(&format!(
                r#"
                default-binder = "redis"
                [binders.redis]
                type = "redis"
                url = "redis://127.0.0.1:1"
                [bindings.payments-in]
                destination = "orders"
                group = "payments"
                claim-idle = "{claim_idle}"
                retry = {{ max-backoff = "2s" }}
                "#
            ))
    };
    for refused in ["1s", "2s"] {
        let err = load(refused).expect_err("refused");
        assert_eq!(err.kind(), ErrorKind::Config, "{err}");
        assert!(
            err.message().contains("bindings.payments-in") && err.message().contains("claim-idle"),
            "{err}"
        );
    }
    load("3s").expect("claim-idle above max-backoff");

    // A binding built in code is checked when a client is made from it.
    let binder = common::binder("redis://127.0.0.1:1");
    let config = BindingConfig::new("orders")
        .group("payments")
        .claim_idle(Duration::from_secs(1))
        .retry(RetryConfig {
            max_backoff: Duration::from_secs(2),
            ..RetryConfig::default()
        });
    let err = Channel::new("coded", binder, config)
        .source::<u64>()
        .await
        .expect_err("refused");
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
}

/// A `claim-idle` shorter than three keepalive rounds at their shortest (10 ms) is refused
/// at load: a live member re-claims what it holds every third of `claim-idle`, but no more
/// often than every 10 ms, so below 30 ms another member could take over entries a live
/// member holds.
#[tokio::test]
async fn claim_idle_the_keepalive_cannot_cover_is_a_config_error() {
    let load = |claim_idle: &str| {
        Streams::builder()
            .register(binder_redis::register)
            .env(Vec::<(String, String)>::new())
            .load_str(&format!(
                r#"
                default-binder = "redis"
                [binders.redis]
                type = "redis"
                url = "redis://127.0.0.1:1"
                [bindings.payments-in]
                destination = "orders"
                group = "payments"
                claim-idle = "{claim_idle}"
                retry = {{ initial-backoff = "1ms", max-backoff = "1ms" }}
                "#
            ))
    };
    for refused in ["5ms", "29ms"] {
        let err = load(refused).expect_err("refused");
        assert_eq!(err.kind(), ErrorKind::Config, "{err}");
        assert!(
            err.message().contains("bindings.payments-in") && err.message().contains("claim-idle"),
            "{err}"
        );
    }
    load("30ms").expect("three keepalive rounds fit");
}

/// Two subscriptions (prefetch 512, concurrency 4, a handler of about a millisecond) drain
/// a backlog of 20,000 while each is shut down gracefully and replaced at once, three times,
/// back to back as a rolling restart does: nothing is dead-lettered, nothing lost, nothing
/// handled twice (graceful shutdown acknowledges what it handled before it hands the rest
/// back), and every handler call is attempt 1 (what is handed back unseen is uncounted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_rolling_restarts_dead_letter_nothing() {
    let _lock = broker_lock(false).await;
    let Some(url) = common::redis_url() else {
        return;
    };
    const N: u64 = 20_000;
    let stream = common::unique("rolling");
    let config = BindingConfig::new(&stream)
        .group(common::unique("g"))
        .prefetch(512)
        .concurrency(4);
    let dlq = config.dead_letter_destination();
    let source = Channel::new("rolling", common::binder(&url), config.clone())
        .source::<u64>()
        .await
        .unwrap();
    for chunk in (0..N).collect::<Vec<_>>().chunks(1000) {
        source.send_batch(chunk).await.unwrap();
    }
    let seen: Arc<Mutex<HashMap<u64, u32>>> = Arc::default();
    let attempts: Arc<Mutex<HashMap<u32, usize>>> = Arc::default();
    let handled = Arc::new(AtomicUsize::new(0));
    // Each member is a process of its own: its own binder and connections.
    let start = || {
        let (seen, handled, config) = (seen.clone(), handled.clone(), config.clone());
        let attempts = attempts.clone();
        let binder = common::binder(&url);
        async move {
            Channel::new("rolling", binder, config)
                .sink::<u64>()
                .subscribe_envelope(move |e: Envelope<u64>| {
                    let (seen, handled) = (seen.clone(), handled.clone());
                    let n = *e.payload();
                    *attempts.lock().unwrap().entry(e.attempt()).or_default() += 1;
                    async move {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        *seen.lock().unwrap().entry(n).or_default() += 1;
                        handled.fetch_add(1, Ordering::SeqCst);
                        Ok::<(), String>(())
                    }
                })
                .await
                .unwrap()
        }
    };
    let handled_at_least = |count: usize| {
        let handled = handled.clone();
        async move {
            let deadline = Instant::now() + PATIENCE;
            while handled.load(Ordering::SeqCst) < count {
                assert!(Instant::now() < deadline, "{count} handled in time");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    };
    let began = Instant::now();
    let mut members = vec![start().await, start().await];
    handled_at_least(N as usize / 10).await;
    // Three rounds of replacing each member, the next as soon as its successor has
    // started work: the prefetch windows are full at every shutdown.
    for step in 0..6 {
        let replacement = start().await;
        let old = std::mem::replace(&mut members[step % 2], replacement);
        old.shutdown().await.expect("graceful shutdown");
        handled_at_least(handled.load(Ordering::SeqCst) + 64).await;
    }
    let deadline = Instant::now() + PATIENCE * 2;
    while seen.lock().unwrap().len() < N as usize {
        assert!(
            Instant::now() < deadline,
            "only {} of {N} handled",
            seen.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for member in members {
        member.shutdown().await.unwrap();
    }
    let mut raw = common::raw(&url).await;
    let dead = xlen(&mut raw, &dlq).await;
    let seen = seen.lock().unwrap();
    let lost = (0..N).filter(|n| !seen.contains_key(n)).count();
    let duplicates: u32 = seen.values().map(|c| c - 1).sum();
    let mut attempts: Vec<(u32, usize)> = attempts.lock().unwrap().clone().into_iter().collect();
    attempts.sort_unstable();
    report(&format!(
        "graceful_rolling_restarts: {N} messages, 6 graceful replacements, drained in {:?}, \
         dead letters {dead}, lost {lost}, duplicates {duplicates}, \
         handler calls by attempt {attempts:?}",
        began.elapsed()
    ));
    assert_eq!(dead, 0, "dead letters during graceful restarts");
    assert_eq!(lost, 0);
    assert_eq!(duplicates, 0, "graceful shutdown handled something twice");
    assert_eq!(
        attempts,
        vec![(1, N as usize)],
        "hand-backs counted as attempts"
    );
}
