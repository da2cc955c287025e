//! Recovery on a real redis-server: a member killed mid-batch, a poison entry that keeps
//! killing its consumers, a receive dropped midway, and Redis itself restarted mid-stream.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stream_core::testing::broker_lock;
use stream_core::{
    header, BindingConfig, Channel, ConsumerOptions, DeliveryTag, Envelope, Message, RetryConfig,
};
use tokio::time::Instant;

const CLAIM_IDLE: Duration = Duration::from_millis(300);
const PATIENCE: Duration = Duration::from_secs(20);

fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn options(group: &str) -> ConsumerOptions {
    ConsumerOptions::new(group).claim_idle(CLAIM_IDLE)
}

/// A member receives a batch, acknowledges part of it and dies (dropped, no ack, no close):
/// another member gets exactly the rest, only after `claim-idle`, as redeliveries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_member_batch_is_taken_over_by_xautoclaim() {
    let _lock = broker_lock(false).await;
    let Some(url) = common::redis_url() else {
        return;
    };
    let (stream, group) = (common::unique("killed"), common::unique("g"));
    let producer = common::binder(&url).producer(&stream).await.unwrap();
    let victim = common::binder(&url)
        .consumer(&stream, &options(&group))
        .await
        .unwrap();
    let messages = (0..20).map(|n| Message::new(n.to_string())).collect();
    let ids = producer.send_batch(messages).await.unwrap();

    let before_delivery = Instant::now();
    let held = common::receive_until(&*victim, PATIENCE, "the victim's batch", |got| {
        got.len() >= 20
    })
    .await;
    assert!(held.iter().all(|r| r.attempt == 1));
    let (acked, dropped) = held.split_at(8);
    victim
        .ack(&acked.iter().map(|r| r.tag).collect::<Vec<_>>())
        .await
        .unwrap();
    drop(victim); // killed: the other 12 stay pending under its name

    let survivor = common::binder(&url)
        .consumer(&stream, &options(&group))
        .await
        .unwrap();
    let taken = common::receive_until(&*survivor, PATIENCE, "the taken-over entries", |got| {
        got.len() >= 12
    })
    .await;
    let taken_at = before_delivery.elapsed();
    let want: HashSet<&str> = dropped.iter().map(|r| r.message.id()).collect();
    let got: HashSet<&str> = taken.iter().map(|r| r.message.id()).collect();
    assert_eq!(taken.len(), 12, "each un-acked entry exactly once");
    assert_eq!(got, want, "exactly the entries the victim did not ack");
    assert!(
        taken.iter().all(|r| r.attempt == 2),
        "a claimed entry counts as delivered twice"
    );
    assert!(
        taken_at >= CLAIM_IDLE,
        "taken over after {taken_at:?}, before the claim idle time of {CLAIM_IDLE:?}"
    );
    assert!(ids
        .iter()
        .all(|id| got.contains(id.as_str()) || acked.iter().any(|r| r.message.id() == id)));
    survivor
        .ack(&taken.iter().map(|r| r.tag).collect::<Vec<_>>())
        .await
        .unwrap();
    let mut raw = common::raw(&url).await;
    assert_eq!(
        common::pending_settles(&mut raw, &stream, &group, 0).await,
        0
    );
    survivor.close().await.unwrap();
}

/// An entry whose consumers keep dying reaches the next one with its delivery count; core
/// starts counting attempts there, so it is dead-lettered after one more failure instead of
/// three, with the documented headers, and acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_entry_is_dead_lettered_by_its_delivery_count() {
    let _lock = broker_lock(false).await;
    let Some(url) = common::redis_url() else {
        return;
    };
    // Two crashes: the third delivery is the last attempt the handler gets.
    let (attempts, headers) = poison_after_crashes(&url, 2).await;
    assert_eq!(
        attempts,
        vec![3],
        "one handler call, numbered by the delivery count"
    );
    assert_eq!(headers.get(header::ATTEMPTS), Some("3"));
    assert_eq!(headers.get(header::ERROR), Some("crashes every consumer"));
}

/// A message delivered more often than the retry policy allows never reaches a handler
/// again: it is dead-lettered at once, so a message that crashes its consumers cannot loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_past_its_attempts_is_dead_lettered_without_a_handler_call() {
    let _lock = broker_lock(false).await;
    let Some(url) = common::redis_url() else {
        return;
    };
    let (attempts, headers) = poison_after_crashes(&url, 3).await;
    assert!(attempts.is_empty(), "no handler call: {attempts:?}");
    // Three attempts were made, each ended by a crash.
    assert_eq!(headers.get(header::ATTEMPTS), Some("3"));
    assert_eq!(
        headers.get(header::ERROR),
        Some("3 earlier attempts ended without an outcome (the consumer crashed or stopped during each)")
    );
}

/// Crashes `crashes` members on a poison entry, then subscribes with max-attempts 3 and a
/// handler that always fails; returns the handler's attempt numbers and the dead letter's
/// headers.
async fn poison_after_crashes(url: &str, crashes: u32) -> (Vec<u32>, stream_core::Headers) {
    let url = url.to_owned();
    let (stream, group) = (common::unique("poison"), common::unique("g"));
    let binder = common::binder(&url);
    let producer = binder.producer(&stream).await.unwrap();
    let poison_id = producer
        .send(
            Message::new(&b"{\"n\":0}"[..])
                .with_key("k")
                .with_header(header::CONTENT_TYPE, "application/json"),
        )
        .await
        .unwrap();

    // Two members pick it up and crash before acknowledging it.
    for crash in 1..=crashes {
        let member = common::binder(&url)
            .consumer(&stream, &options(&group))
            .await
            .unwrap();
        let got = common::receive_until(&*member, PATIENCE, "the poison entry", |got| {
            !got.is_empty()
        })
        .await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].message.id(), poison_id);
        assert_eq!(
            got[0].attempt, crash,
            "delivery count after {crash} crashes"
        );
        drop(member);
    }

    let config = BindingConfig::new(&stream)
        .group(&group)
        .claim_idle(CLAIM_IDLE)
        .retry(RetryConfig {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(10),
            multiplier: 1.0,
        });
    let dlq = config.dead_letter_destination();
    let channel = Channel::new("poison", binder.clone(), config);
    let attempts: Arc<Mutex<Vec<u32>>> = Arc::default();
    let a = attempts.clone();
    let subscription = channel
        .sink::<serde_json::Value>()
        .subscribe_envelope(move |e: Envelope<serde_json::Value>| {
            a.lock().unwrap().push(e.attempt());
            async { Err::<(), _>("crashes every consumer") }
        })
        .await
        .unwrap();
    let reader = binder
        .consumer(&dlq, &ConsumerOptions::new(common::unique("dlq-reader")))
        .await
        .unwrap();
    let dead =
        common::receive_until(&*reader, PATIENCE, "the dead letter", |got| !got.is_empty()).await;
    subscription.shutdown().await.unwrap();

    assert_eq!(dead.len(), 1);
    let headers = dead[0].message.headers().clone();
    assert_eq!(headers.get(header::ORIGINAL_ID), Some(poison_id.as_str()));
    assert_eq!(headers.get(header::ORIGINAL_GROUP), Some(group.as_str()));
    assert_eq!(dead[0].message.key(), Some("k"));
    let mut raw = common::raw(&url).await;
    assert_eq!(
        common::pending(&mut raw, &stream, &group).await,
        0,
        "the poison entry was acknowledged after dead-lettering"
    );
    let attempts = attempts.lock().unwrap().clone();
    (attempts, headers)
}

/// `receive` futures dropped at random points, while entries arrive, lose nothing: what a
/// dropped call had been handed stays pending and comes back, still as attempt 1 (no
/// handler saw it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_dropped_midway_loses_nothing() {
    let _lock = broker_lock(false).await;
    let Some(url) = common::redis_url() else {
        return;
    };
    let (stream, group) = (common::unique("cancel"), common::unique("g"));
    let binder = common::binder(&url);
    let consumer = binder
        .consumer(
            &stream,
            &ConsumerOptions::new(&group).claim_idle(Duration::from_secs(60)),
        )
        .await
        .unwrap();
    let producer = binder.producer(&stream).await.unwrap();
    const N: usize = 300;
    let publisher = tokio::spawn(async move {
        let mut ids = Vec::new();
        for chunk in 0..N / 10 {
            let batch = (0..10)
                .map(|i| Message::new((chunk * 10 + i).to_string()))
                .collect();
            ids.extend(producer.send_batch(batch).await.unwrap());
            tokio::task::yield_now().await;
        }
        ids
    });

    let mut seen: HashMap<String, u32> = HashMap::new();
    let mut counted_twice = 0;
    let mut dropped_calls = 0;
    let mut settle = |batch: Vec<stream_core::Received>, seen: &mut HashMap<String, u32>| {
        let tags: Vec<DeliveryTag> = batch.iter().map(|r| r.tag).collect();
        for r in batch {
            if r.attempt > 1 {
                counted_twice += 1;
            }
            *seen.entry(r.message.id().to_owned()).or_default() += 1;
        }
        tags
    };
    // Deadlines from 0 to 1.5 ms: some calls are dropped before, some after Redis handed
    // out entries.
    for i in 0..400u64 {
        let limit = Duration::from_micros((i * 37) % 1500);
        match tokio::time::timeout(limit, consumer.receive(16)).await {
            Ok(batch) => {
                let tags = settle(batch.unwrap(), &mut seen);
                consumer.ack(&tags).await.unwrap();
            }
            Err(_) => dropped_calls += 1,
        }
    }
    let ids = publisher.await.unwrap();
    let deadline = Instant::now() + PATIENCE;
    while !ids.iter().all(|id| seen.contains_key(id)) {
        assert!(Instant::now() < deadline, "not every entry arrived");
        let batch = consumer.receive(64).await.unwrap();
        let tags = settle(batch, &mut seen);
        consumer.ack(&tags).await.unwrap();
    }
    let duplicates: u32 = seen.values().map(|c| c - 1).sum();
    report(&format!(
        "receive_dropped_midway: {N} entries, {dropped_calls} receive calls dropped, \
         {counted_twice} entries delivered as attempt 2 or more, lost 0, duplicates {duplicates}"
    ));
    assert_eq!(seen.len(), N, "every entry delivered, nothing foreign");
    assert_eq!(duplicates, 0, "nothing returned twice to one consumer");
    assert_eq!(counted_twice, 0, "a dropped receive counted as an attempt");
    let mut raw = common::raw(&url).await;
    assert_eq!(
        common::pending_settles(&mut raw, &stream, &group, 0).await,
        0
    );
    consumer.close().await.unwrap();
}

/// Redis is killed (-9) and restarted twice while messages are published and consumed with
/// acks: every entry whose `XADD` succeeded is handled, duplicates are counted, and in the
/// end nothing is left pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_mid_stream_every_accepted_message_is_handled() {
    let _lock = broker_lock(true).await;
    let Some(url) = common::redis_url() else {
        return;
    };
    let Some(restart) = common::restart_command("redis_restarted_mid_stream") else {
        return;
    };
    let (stream, group) = (common::unique("restart"), common::unique("g"));
    let binder = common::binder(&url);
    let config = BindingConfig::new(&stream)
        .group(&group)
        .claim_idle(Duration::from_secs(2))
        // Below claim-idle, as a redis binder requires.
        .retry(RetryConfig {
            max_backoff: Duration::from_secs(1),
            ..RetryConfig::default()
        });
    let channel = Channel::new("restart", binder.clone(), config);
    let handled: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let h = handled.clone();
    let subscription = channel
        .sink::<u64>()
        .subscribe_envelope(move |e: Envelope<u64>| {
            *h.lock()
                .unwrap()
                .entry(e.message().id().to_owned())
                .or_default() += 1;
            async { Ok::<(), String>(()) }
        })
        .await
        .unwrap();

    const N: u64 = 600;
    let source = channel.source::<u64>().await.unwrap();
    let publisher = tokio::spawn(async move {
        let mut accepted = Vec::new();
        let mut refused = 0;
        for n in 0..N {
            loop {
                match source.send(&n).await {
                    Ok(id) => {
                        accepted.push(id);
                        break;
                    }
                    Err(e) => {
                        assert!(
                            e.is_temporary() || e.kind() == stream_core::ErrorKind::Broker,
                            "a send during the outage fails with a connection-type error: {e:?}"
                        );
                        refused += 1;
                        // Retry backoff for the publisher, not a stand-in for a condition.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }
        (accepted, refused)
    });

    let count = |handled: &Arc<Mutex<HashMap<String, u32>>>| handled.lock().unwrap().len();
    for threshold in [N / 4, N / 2] {
        let deadline = Instant::now() + PATIENCE;
        while count(&handled) < threshold as usize {
            assert!(
                Instant::now() < deadline,
                "{threshold} handled before restarting"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        common::restart_redis(&restart)
            .await
            .expect("redis restarts");
    }
    let (accepted, refused) = publisher.await.unwrap();
    let deadline = Instant::now() + PATIENCE * 2;
    while !accepted
        .iter()
        .all(|id| handled.lock().unwrap().contains_key(id))
    {
        assert!(
            Instant::now() < deadline,
            "accepted messages not all handled"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    subscription.shutdown().await.unwrap();

    let handled = handled.lock().unwrap().clone();
    let lost = accepted
        .iter()
        .filter(|id| !handled.contains_key(*id))
        .count();
    let duplicates: u32 = handled.values().map(|c| c - 1).sum();
    // An XADD whose reply was lost in the crash may have landed: handled, never accepted.
    let accepted_set: HashSet<&String> = accepted.iter().collect();
    let landed_unconfirmed = handled
        .keys()
        .filter(|id| !accepted_set.contains(id))
        .count();
    report(&format!(
        "redis_restarted_mid_stream: 2 restarts, {} accepted, {refused} sends refused and \
         retried, {} handled distinct, lost {lost}, duplicates {duplicates}, \
         landed without confirmation {landed_unconfirmed}",
        accepted.len(),
        handled.len()
    ));
    assert_eq!(lost, 0);
    assert_eq!(accepted.len(), N as usize);
    let mut raw = common::raw(&url).await;
    assert_eq!(
        common::pending(&mut raw, &stream, &group).await,
        0,
        "every handled message was acknowledged, and the acks survived the restarts"
    );
}
