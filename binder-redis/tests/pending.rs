//! Pending entries on a real redis-server: entries trimmed or deleted while pending, what
//! close leaves behind, and `XADD` trimming.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use binder_redis::{RedisConfig, TrimConfig};
use stream_core::testing::broker_lock;
use stream_core::{ConsumerOptions, Message};

const PATIENCE: Duration = Duration::from_secs(20);

fn payloads(received: &[stream_core::Received]) -> HashSet<String> {
    received
        .iter()
        .map(|r| String::from_utf8(r.message.payload().to_vec()).unwrap())
        .collect()
}

fn set(items: &[&str]) -> HashSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// A crashed member's pending entries are trimmed away by a `MAXLEN` producer before anyone
/// claims them: the claimer gets only entries that still exist, and the trimmed ones leave
/// the pending list instead of coming back as empty messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_trimmed_while_pending_are_cleared_not_delivered() {
    let _lock = broker_lock(false).await;
    let Some(url) = common::redis_url() else {
        return;
    };
    let (stream, group) = (common::unique("trimmed"), common::unique("g"));
    let options = ConsumerOptions::new(&group).claim_idle(Duration::from_millis(200));
    let plain = common::binder(&url).producer(&stream).await.unwrap();
    let victim = common::binder(&url)
        .consumer(&stream, &options)
        .await
        .unwrap();
    plain
        .send_batch((0..5).map(|n| Message::new(format!("old-{n}"))).collect())
        .await
        .unwrap();
    let held =
        common::receive_until(&*victim, PATIENCE, "the victim's batch", |g| g.len() >= 5).await;
    assert_eq!(held.len(), 5);
    drop(victim);

    let trimming = common::binder_with(RedisConfig {
        trim: Some(TrimConfig {
            max_len: Some(3),
            max_age: None,
            approximate: false,
            acknowledged: false,
            interval: Duration::from_secs(10),
        }),
        ..RedisConfig::with_url(&url)
    })
    .producer(&stream)
    .await
    .unwrap();
    trimming
        .send_batch((0..3).map(|n| Message::new(format!("new-{n}"))).collect())
        .await
        .unwrap();
    let mut raw = common::raw(&url).await;
    assert_eq!(
        common::pending(&mut raw, &stream, &group).await,
        5,
        "trimmed yet pending"
    );

    let survivor = common::binder(&url)
        .consumer(&stream, &options)
        .await
        .unwrap();
    let got =
        common::receive_until(&*survivor, PATIENCE, "the new entries", |g| g.len() >= 3).await;
    // One more round, so that the claim sweep has certainly met the trimmed entries.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while common::pending(&mut raw, &stream, &group).await != 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "trimmed entries still pending"
        );
        assert!(survivor.receive(16).await.unwrap().is_empty());
    }
    assert_eq!(payloads(&got), set(&["new-0", "new-1", "new-2"]));
    assert!(got.iter().all(|r| !r.message.payload().is_empty()));
    survivor
        .ack(&got.iter().map(|r| r.tag).collect::<Vec<_>>())
        .await
        .unwrap();
    assert_eq!(
        common::pending_settles(&mut raw, &stream, &group, 0).await,
        0
    );
    survivor.close().await.unwrap();
}

/// Idle time of pending entry `id` of `group`, in milliseconds.
async fn idle_ms(
    raw: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    group: &str,
    id: &str,
) -> usize {
    common::pending_entries(raw, stream, group)
        .await
        .into_iter()
        .find(|p| p.id == id)
        .map(|p| p.last_delivered_ms)
        .expect("the entry is pending")
}

/// Returns once the keepalive has re-claimed the held entry `id` since this call began: its
/// idle time drops between two looks.
async fn keepalive_round(
    raw: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    group: &str,
    id: &str,
) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut last = idle_ms(raw, stream, group, id).await;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the keepalive never re-claimed {id}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = idle_ms(raw, stream, group, id).await;
        if now < last {
            return;
        }
        last = now;
    }
}

/// Entries trimmed from the stream while the consumer holds them (in a handler, waiting in
/// the prefetch window, between retries) were delivered already and are handled from
/// memory. The keepalive and `retrying` must not `XCLAIM` them (Redis drops a deleted entry
/// from the pending list when it is claimed), nor take them for entries another member took
/// over (core would then drop them unhandled); their `XACK` clears them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_trimmed_while_held_stay_held_until_acked() {
    let _lock = broker_lock(false).await;
    let Some(url) = common::redis_url() else {
        return;
    };
    let (stream, group) = (common::unique("trimmed-held"), common::unique("g"));
    // The keepalive goes round every 100 ms.
    let options = ConsumerOptions::new(&group).claim_idle(Duration::from_millis(300));
    let binder = common::binder(&url);
    let consumer = binder.consumer(&stream, &options).await.unwrap();
    binder
        .producer(&stream)
        .await
        .unwrap()
        .send_batch((0..3).map(|n| Message::new(n.to_string())).collect())
        .await
        .unwrap();
    let held = common::receive_until(&*consumer, PATIENCE, "three entries", |g| g.len() >= 3).await;
    let ids: Vec<&str> = held.iter().map(|r| r.message.id()).collect();
    let mut raw = common::raw(&url).await;
    // The first two are trimmed away while held; the third shows the keepalive going round.
    let _: usize = redis::cmd("XDEL")
        .arg(&stream)
        .arg(&ids[..2])
        .query_async(&mut raw)
        .await
        .unwrap();
    consumer.retrying(held[1].tag, 2).await.unwrap();
    keepalive_round(&mut raw, &stream, &group, ids[2]).await;

    let pending: HashSet<String> = common::pending_entries(&mut raw, &stream, &group)
        .await
        .into_iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(
        pending,
        set(&ids),
        "entries trimmed while held left the pending list before their handler was done"
    );
    assert!(
        held.iter().all(|r| consumer.holds(r.tag)),
        "entries trimmed while held taken for lost: core would drop them unhandled"
    );
    consumer
        .ack(&held.iter().map(|r| r.tag).collect::<Vec<_>>())
        .await
        .unwrap();
    assert_eq!(
        common::pending_settles(&mut raw, &stream, &group, 0).await,
        0
    );
    consumer.close().await.unwrap();
}

/// Entries in a consumer's own pending list that were `XDEL`eted come back from
/// `XREADGROUP ... 0` without fields: after a dropped connection the consumer re-reads its
/// pending list, delivers the entries that still exist and acknowledges the deleted ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_deleted_from_own_pending_list_are_acked_not_delivered() {
    // CLIENT KILL drops every connection: nothing else may run meanwhile.
    let _lock = broker_lock(true).await;
    let Some(url) = common::redis_url() else {
        return;
    };
    let (stream, group) = (common::unique("deleted"), common::unique("g"));
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
    let ids = producer
        .send_batch((0..5).map(|n| Message::new(format!("e{n}"))).collect())
        .await
        .unwrap();

    // Another member reads them, then they are moved into our consumer's pending list
    // behind its back by a claim (which counts a delivery): it never received them.
    let mut raw = common::raw(&url).await;
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(&group)
        .arg("other")
        .arg("COUNT")
        .arg(5)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(
        consumer.receive(16).await.unwrap().is_empty(),
        "nothing new to read"
    );
    let name = common::consumers(&mut raw, &stream, &group)
        .await
        .into_iter()
        .map(|(name, _)| name)
        .find(|name| name.starts_with(&prefix))
        .expect("our consumer is a member after its first read");
    let _: redis::Value = redis::cmd("XCLAIM")
        .arg(&stream)
        .arg(&group)
        .arg(&name)
        .arg(0)
        .arg(&ids)
        .query_async(&mut raw)
        .await
        .unwrap();
    let _: i64 = redis::cmd("XDEL")
        .arg(&stream)
        .arg(&ids[1])
        .arg(&ids[3])
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

    let got = common::receive_until(&*consumer, PATIENCE, "the surviving entries", |g| {
        g.len() >= 3
    })
    .await;
    assert_eq!(payloads(&got), set(&["e0", "e2", "e4"]));
    // Read by the other member, then claimed for ours: two deliveries, and re-reading its
    // own pending list adds none.
    assert!(
        got.iter().all(|r| r.attempt == 2),
        "pending entries are redeliveries: {:?}",
        got.iter().map(|r| r.attempt).collect::<Vec<_>>()
    );
    let mut raw = common::raw(&url).await;
    let pending = common::pending_entries(&mut raw, &stream, &group).await;
    let pending_ids: HashSet<&str> = pending.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(
        pending_ids,
        [&ids[0], &ids[2], &ids[4]]
            .iter()
            .map(|s| s.as_str())
            .collect(),
        "the deleted entries left the pending list"
    );
    for r in &got {
        let p = pending.iter().find(|p| p.id == r.message.id()).unwrap();
        assert_eq!(r.attempt as usize, p.times_delivered, "count from XPENDING");
    }
    consumer
        .ack(&got.iter().map(|r| r.tag).collect::<Vec<_>>())
        .await
        .unwrap();
    assert_eq!(
        common::pending_settles(&mut raw, &stream, &group, 0).await,
        0
    );
    consumer.close().await.unwrap();
}

/// Closing a durable consumer hands its un-acknowledged entries to the group at once (no
/// wait for the idle time) and keeps its name while it owns them; a consumer with nothing
/// pending removes its name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_hands_back_pending_entries_and_removes_idle_names() {
    let _lock = broker_lock(false).await;
    let Some(url) = common::redis_url() else {
        return;
    };
    let (stream, group) = (common::unique("close"), common::unique("g"));
    // Long idle time: anything taken over below was handed back by close, not claimed.
    let options = ConsumerOptions::new(&group).claim_idle(Duration::from_secs(3600));
    let binder = common::binder(&url);
    binder
        .producer(&stream)
        .await
        .unwrap()
        .send_batch((0..3).map(|n| Message::new(n.to_string())).collect())
        .await
        .unwrap();
    let first = binder.consumer(&stream, &options).await.unwrap();
    let got = common::receive_until(&*first, PATIENCE, "three entries", |g| g.len() >= 3).await;
    first.ack(&[got[0].tag]).await.unwrap();
    first.close().await.unwrap();
    let mut raw = common::raw(&url).await;
    let members = common::consumers(&mut raw, &stream, &group).await;
    assert_eq!(
        members.len(),
        1,
        "the closing consumer keeps its name while it owns entries"
    );
    assert_eq!(members[0].1, 2);

    let second = binder.consumer(&stream, &options).await.unwrap();
    let back = common::receive_until(&*second, PATIENCE, "the handed-back entries", |g| {
        g.len() >= 2
    })
    .await;
    let want: HashSet<&str> = got[1..].iter().map(|r| r.message.id()).collect();
    assert_eq!(
        back.iter().map(|r| r.message.id()).collect::<HashSet<_>>(),
        want
    );
    assert!(back.iter().all(|r| r.attempt == 2));
    second
        .ack(&back.iter().map(|r| r.tag).collect::<Vec<_>>())
        .await
        .unwrap();
    second.close().await.unwrap();
    let names: Vec<String> = common::consumers(&mut raw, &stream, &group)
        .await
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    assert_eq!(
        names.len(),
        1,
        "the second consumer removed its name: {names:?}"
    );
    assert_eq!(names[0], members[0].0);
}

/// `ack` returns once the ids are queued: they reach Redis by themselves shortly after, with
/// no further `receive` to carry them, and `close` sends what is still queued before it
/// hands the rest back, so nothing acknowledged is handed to another member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_acks_reach_redis_alone_and_before_close_hands_back() {
    let _lock = broker_lock(false).await;
    let Some(url) = common::redis_url() else {
        return;
    };
    let (stream, group) = (common::unique("acks"), common::unique("g"));
    let options = ConsumerOptions::new(&group).claim_idle(Duration::from_secs(3600));
    let binder = common::binder(&url);
    binder
        .producer(&stream)
        .await
        .unwrap()
        .send_batch((0..10).map(|n| Message::new(n.to_string())).collect())
        .await
        .unwrap();
    let consumer = binder.consumer(&stream, &options).await.unwrap();
    let got = common::receive_until(&*consumer, PATIENCE, "ten entries", |g| g.len() >= 10).await;
    let tags: Vec<_> = got.iter().map(|r| r.tag).collect();
    let mut raw = common::raw(&url).await;

    consumer.ack(&tags[..4]).await.unwrap();
    assert_eq!(
        common::pending_settles(&mut raw, &stream, &group, 6).await,
        6,
        "acknowledged entries leave the pending list without another read"
    );

    consumer.ack(&tags[4..7]).await.unwrap();
    consumer.close().await.unwrap();
    let members = common::consumers(&mut raw, &stream, &group).await;
    assert_eq!(members.len(), 1);
    assert_eq!(
        members[0].1, 3,
        "close sent the queued acks before handing back the other three"
    );
}

/// An anonymous group lives as long as its consumer: closing destroys it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_group_is_destroyed_on_close() {
    let _lock = broker_lock(false).await;
    let Some(url) = common::redis_url() else {
        return;
    };
    let (stream, group) = (common::unique("anon"), common::unique("anonymous"));
    let binder = common::binder(&url);
    let durable = binder
        .consumer(&stream, &ConsumerOptions::new(common::unique("durable")))
        .await
        .unwrap();
    let anonymous = binder
        .consumer(&stream, &ConsumerOptions::new(&group).anonymous())
        .await
        .unwrap();
    let mut raw = common::raw(&url).await;
    assert_eq!(common::groups(&mut raw, &stream).await.len(), 2);
    anonymous.close().await.unwrap();
    let left = common::groups(&mut raw, &stream).await;
    assert_eq!(left.len(), 1);
    assert!(!left.contains(&group));
    durable.close().await.unwrap();
    assert_eq!(
        common::groups(&mut raw, &stream).await.len(),
        1,
        "durable groups stay"
    );
}

/// `trim = { max-len = N }` keeps the stream at N entries (exactly, with `approximate =
/// false`); `max-age` drops entries older than the age.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xadd_trims_by_length_and_by_age() {
    let _lock = broker_lock(false).await;
    let Some(url) = common::redis_url() else {
        return;
    };
    let mut raw = common::raw(&url).await;
    let trimmed = |max_len, max_age| {
        common::binder_with(RedisConfig {
            trim: Some(TrimConfig {
                max_len,
                max_age,
                approximate: false,
                acknowledged: false,
                interval: Duration::from_secs(10),
            }),
            ..RedisConfig::with_url(&url)
        })
    };

    let by_len = common::unique("maxlen");
    let producer = trimmed(Some(10), None).producer(&by_len).await.unwrap();
    for n in 0..25 {
        producer.send(Message::new(n.to_string())).await.unwrap();
    }
    let len: usize = redis::cmd("XLEN")
        .arg(&by_len)
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(len, 10);

    let by_age = common::unique("minid");
    // An entry from 1970 (explicit id), then one published through a max-age producer.
    let _: String = redis::cmd("XADD")
        .arg(&by_age)
        .arg("1000-0")
        .arg("p")
        .arg("ancient")
        .query_async(&mut raw)
        .await
        .unwrap();
    let id = trimmed(None, Some(Duration::from_secs(3600)))
        .producer(&by_age)
        .await
        .unwrap()
        .send(Message::new("fresh"))
        .await
        .unwrap();
    let left: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(&by_age)
        .arg("-")
        .arg("+")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(left.len(), 1, "the old entry was trimmed");
    assert_eq!(left[0].0, id);
}
