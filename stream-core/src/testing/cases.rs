//! The conformance cases. Each takes a [`Harness`] and panics on a broken contract.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use super::{
    ack_all, channel, observe, raw_consumer, raw_producer, receive_at_least, skip, test_binding,
    unique, wait_until, CountingBinder, Harness, Refusal, RefusingDeadLetters, ShortReceives,
    Tally,
};
use crate::{header, Binder, ErrorKind, Message, RetryConfig, StartFrom};

pub use super::handling::{
    batch_handler_gets_full_batches_in_key_order, batch_items_fail_alone_and_keys_stay_in_order,
    dedup_skips_ids_its_group_handled, failed_batches_dead_letter_each_message,
    handler_timeout_fails_the_attempt, message_ids_stay_with_their_message,
    processor_publishes_then_acknowledges, pulled_deliveries_can_be_rejected,
    rejected_message_skips_its_remaining_attempts, retry_after_replaces_the_backoff,
    service_handlers_run_inside_their_middleware,
};
pub use super::operations::{
    admin_reads_without_joining_a_group, dead_letters_are_listed_and_sent_back,
};

/// The payload every case publishes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// A number unique within the case.
    pub n: u64,
}

fn ev(n: u64) -> Event {
    Event { n }
}

/// Payload, key and headers arrive as sent, with the broker id that `send` returned.
pub async fn publish_subscribe_keeps_payload_headers_and_key(h: &dyn Harness) {
    let caps = h.capabilities();
    let binder = h.binder().await;
    let dest = unique("roundtrip");
    let ch = channel(&binder, test_binding(&dest, &caps).group(unique("g")));
    let mut stream = ch.sink::<Event>().stream().await.expect("stream");
    let source = ch.source::<Event>().await.expect("source");
    let msg = source
        .encode(&ev(7))
        .unwrap()
        .with_key("order-7")
        .with_header("trace-id", "t-7")
        .with_header("tenant", "acme");
    let id = source.send_message(msg).await.expect("send");
    assert!(!id.is_empty(), "send returns the broker id");

    let d = tokio::time::timeout(caps.patience, stream.next())
        .await
        .expect("delivery arrives")
        .expect("stream open")
        .expect("no error");
    assert_eq!(d.payload(), &ev(7));
    assert_eq!(d.message().key(), Some("order-7"));
    assert_eq!(d.message().headers().get("trace-id"), Some("t-7"));
    assert_eq!(d.message().headers().get("tenant"), Some("acme"));
    assert_eq!(
        d.message().headers().get(header::CONTENT_TYPE),
        Some("application/json")
    );
    assert_eq!(
        d.message().id(),
        id,
        "received id equals the id send returned"
    );
    assert_eq!(d.attempt(), 1);
    d.ack();
    stream.close().await.expect("close");
}

/// Messages published to one destination never appear on another.
pub async fn destinations_are_isolated(h: &dyn Harness) {
    let caps = h.capabilities();
    let binder = h.binder().await;
    let (a, b) = (unique("iso-a"), unique("iso-b"));
    let sa = channel(&binder, test_binding(&a, &caps))
        .source::<Event>()
        .await
        .unwrap();
    let sb = channel(&binder, test_binding(&b, &caps))
        .source::<Event>()
        .await
        .unwrap();
    for n in 0..5 {
        sa.send(&ev(n)).await.unwrap();
    }
    for n in 100..103 {
        sb.send(&ev(n)).await.unwrap();
    }
    // A sentinel last, so "everything before it was seen" is a condition we can wait for.
    sa.send(&ev(999)).await.unwrap();
    sb.send(&ev(999)).await.unwrap();
    for (dest, expected) in [(&a, (0..5).collect::<Vec<_>>()), (&b, (100..103).collect())] {
        let tally = Tally::new();
        let t = tally.clone();
        let sub = channel(&binder, test_binding(dest, &caps).group(unique("g")))
            .sink::<Event>()
            .subscribe(move |e: Event| {
                t.record(e.n);
                async { Ok::<(), String>(()) }
            })
            .await
            .unwrap();
        let all: Vec<u64> = expected.iter().copied().chain([999]).collect();
        wait_until(
            caps.patience,
            "all messages of the destination arrive",
            || tally.has_all(all.clone()),
        )
        .await;
        sub.shutdown().await.unwrap();
        tally.assert_complete("destinations_are_isolated", all);
    }
}

/// Several publishers and several members of one group: every message handled, none lost.
pub async fn competing_consumers_share_a_group(h: &dyn Harness) {
    let caps = h.capabilities();
    let binder = h.binder().await;
    let dest = unique("compete");
    let config = test_binding(&dest, &caps).group(unique("g"));
    let tally = Tally::new();
    let mut subs = Vec::new();
    for _ in 0..3 {
        let t = tally.clone();
        let member = h.binder().await;
        subs.push(
            channel(&member, config.clone())
                .sink::<Event>()
                .subscribe(move |e: Event| {
                    t.record(e.n);
                    async { Ok::<(), String>(()) }
                })
                .await
                .unwrap(),
        );
    }
    let mut publishers = Vec::new();
    for p in 0..3u64 {
        let source = channel(&binder, config.clone())
            .source::<Event>()
            .await
            .unwrap();
        publishers.push(tokio::spawn(async move {
            for i in 0..100 {
                source.send(&ev(p * 1000 + i)).await.unwrap();
            }
        }));
    }
    for p in publishers {
        p.await.unwrap();
    }
    let expected: Vec<u64> = (0..3)
        .flat_map(|p| (0..100).map(move |i| p * 1000 + i))
        .collect();
    wait_until(caps.patience, "300 messages are handled", || {
        tally.has_all(expected.clone())
    })
    .await;
    for sub in subs {
        sub.shutdown().await.unwrap();
    }
    tally.assert_complete("competing_consumers_share_a_group", expected);
}

/// Two groups on one destination each get every message.
pub async fn every_group_gets_every_message(h: &dyn Harness) {
    let caps = h.capabilities();
    let binder = h.binder().await;
    let dest = unique("fanout");
    let tallies = [Tally::new(), Tally::new()];
    let mut subs = Vec::new();
    for tally in &tallies {
        let t = tally.clone();
        subs.push(
            channel(&binder, test_binding(&dest, &caps).group(unique("g")))
                .sink::<Event>()
                .subscribe(move |e: Event| {
                    t.record(e.n);
                    async { Ok::<(), String>(()) }
                })
                .await
                .unwrap(),
        );
    }
    let source = channel(&binder, test_binding(&dest, &caps))
        .source::<Event>()
        .await
        .unwrap();
    for n in 0..50 {
        source.send(&ev(n)).await.unwrap();
    }
    for tally in &tallies {
        wait_until(caps.patience, "each group handles all 50", || {
            tally.has_all(0..50)
        })
        .await;
    }
    for sub in subs {
        sub.shutdown().await.unwrap();
    }
    for tally in &tallies {
        tally.assert_complete("every_group_gets_every_message", 0..50);
    }
}

/// A nacked delivery comes back as the next attempt; once acked it is gone.
pub async fn nack_redelivers(h: &dyn Harness) {
    let caps = h.capabilities();
    let binder = h.binder().await;
    let dest = unique("nack");
    let ch = channel(&binder, test_binding(&dest, &caps).group(unique("g")));
    let mut stream = ch.sink::<Event>().stream().await.unwrap();
    let source = ch.source::<Event>().await.unwrap();
    source.send(&ev(1)).await.unwrap();
    let first = next_delivery(&mut stream, caps.patience).await;
    assert_eq!((first.payload().n, first.attempt()), (1, 1));
    let id = first.message().id().to_owned();
    first.nack("not yet");
    let again = next_delivery(&mut stream, caps.patience).await;
    assert_eq!(again.payload().n, 1, "the nacked message comes back");
    assert_eq!(again.message().id(), id);
    assert_eq!(again.attempt(), 2);
    again.ack();
    source.send(&ev(2)).await.unwrap();
    let after = next_delivery(&mut stream, caps.patience).await;
    assert_eq!(
        after.payload().n,
        2,
        "an acked message is not delivered again"
    );
    after.ack();
    stream.close().await.unwrap();
}

async fn next_delivery<T: Send + 'static>(
    stream: &mut crate::Deliveries<T>,
    patience: Duration,
) -> crate::Delivery<T> {
    tokio::time::timeout(patience, stream.next())
        .await
        .expect("a delivery arrives")
        .expect("stream open")
        .expect("no error")
}

/// A handler that keeps failing is retried with backoff, then dead-lettered with the
/// documented headers; other keys flow meanwhile and the same key waits.
pub async fn retry_then_dead_letter_while_others_flow(h: &dyn Harness) {
    let caps = h.capabilities();
    let binder = h.binder().await;
    let dest = unique("retry");
    let group = unique("g");
    let config = test_binding(&dest, &caps)
        .group(group.clone())
        .concurrency(2);
    let dlq = config.dead_letter_destination();
    let log: Arc<Mutex<Vec<(u64, u32)>>> = Arc::default();
    let l = log.clone();
    let sub = channel(&binder, config.clone())
        .sink::<Event>()
        .subscribe_envelope(move |e: crate::Envelope<Event>| {
            l.lock().unwrap().push((e.payload().n, e.attempt()));
            let poison = e.payload().n == 0;
            async move {
                if poison {
                    Err("payment gateway refused")
                } else {
                    Ok(())
                }
            }
        })
        .await
        .unwrap();
    let source = channel(&binder, config.clone())
        .source::<Event>()
        .await
        .unwrap();
    source.send_keyed("poison", &ev(0)).await.unwrap();
    source.send_keyed("poison", &ev(1)).await.unwrap(); // same key: must wait
    for n in 10..20 {
        source
            .send_keyed(format!("good-{n}"), &ev(n))
            .await
            .unwrap();
    }
    wait_until(
        caps.patience,
        "all good messages and the follower are handled",
        || {
            let log = log.lock().unwrap();
            (10..20)
                .chain([1])
                .all(|n| log.iter().any(|(m, _)| *m == n))
        },
    )
    .await;
    sub.shutdown().await.unwrap();

    let log = log.lock().unwrap().clone();
    let poison: Vec<usize> = (0..log.len()).filter(|i| log[*i].0 == 0).collect();
    assert_eq!(
        poison.iter().map(|i| log[*i].1).collect::<Vec<_>>(),
        vec![1, 2, 3],
        "three attempts, numbered: {log:?}"
    );
    let follower = log.iter().position(|(n, _)| *n == 1).unwrap();
    assert!(
        follower > *poison.last().unwrap(),
        "the same key waited for the poison message to finish: {log:?}"
    );
    let others_between = log[poison[0]..*poison.last().unwrap()]
        .iter()
        .filter(|(n, _)| *n >= 10)
        .count();
    assert!(
        others_between > 0,
        "other keys were handled while the poison message was retried: {log:?}"
    );

    let dead = read_dead_letters(h, &binder, &dlq, 1).await;
    let m = &dead[0];
    let hd = m.headers();
    assert_eq!(serde_json::from_slice::<Event>(m.payload()).unwrap(), ev(0));
    assert_eq!(m.key(), Some("poison"));
    assert_eq!(hd.get(header::ORIGINAL_DESTINATION), Some(dest.as_str()));
    assert_eq!(hd.get(header::ORIGINAL_GROUP), Some(group.as_str()));
    assert_eq!(hd.get(header::ATTEMPTS), Some("3"));
    assert_eq!(hd.get(header::ERROR), Some("payment gateway refused"));
    assert_eq!(hd.get(header::ERROR_KIND), Some("handler"));
    assert!(!hd.get(header::ORIGINAL_ID).unwrap_or("").is_empty());
    let first = hd.get(header::FIRST_FAILURE).expect("first-failure header");
    humantime::parse_rfc3339(first).expect("first-failure is RFC 3339");
}

/// Reads `count` messages from a dead-letter destination with a fresh group.
pub(super) async fn read_dead_letters(
    h: &dyn Harness,
    binder: &Arc<dyn Binder>,
    dlq: &str,
    count: usize,
) -> Vec<Message> {
    let caps = h.capabilities();
    let consumer = raw_consumer(binder, dlq, &unique("dlq-reader"), &caps).await;
    let got = receive_at_least(&*consumer, count, caps.patience).await;
    assert_eq!(got.len(), count, "dead-letter destination holds {count}");
    ack_all(&*consumer, &got).await;
    consumer.close().await.unwrap();
    got.into_iter().map(|r| r.message).collect()
}

/// A payload that does not decode never reaches the handler and is dead-lettered with the
/// decode error; the messages around it are handled.
pub async fn undecodable_payload_goes_to_dead_letter(h: &dyn Harness) {
    let caps = h.capabilities();
    let binder = h.binder().await;
    let dest = unique("decode");
    let config = test_binding(&dest, &caps).group(unique("g"));
    let tally = Tally::new();
    let t = tally.clone();
    let sub = channel(&binder, config.clone())
        .sink::<Event>()
        .subscribe(move |e: Event| {
            t.record(e.n);
            async { Ok::<(), String>(()) }
        })
        .await
        .unwrap();
    let raw = raw_producer(&binder, &dest).await;
    raw.send(Message::new(&b"{\"n\":1}"[..]).with_header(header::CONTENT_TYPE, "application/json"))
        .await
        .unwrap();
    raw.send(
        Message::new(&b"this is not json"[..])
            .with_key("bad")
            .with_header(header::CONTENT_TYPE, "application/json"),
    )
    .await
    .unwrap();
    raw.send(Message::new(&b"{\"n\":2}"[..]).with_header(header::CONTENT_TYPE, "text/plain"))
        .await
        .unwrap();
    raw.send(Message::new(&b"{\"n\":3}"[..])).await.unwrap();
    wait_until(caps.patience, "the decodable messages are handled", || {
        tally.has_all([1, 3])
    })
    .await;
    let dead = read_dead_letters(h, &binder, &config.dead_letter_destination(), 2).await;
    sub.shutdown().await.unwrap();
    tally.assert_complete("undecodable_payload_goes_to_dead_letter", [1, 3]);
    let bad = dead
        .iter()
        .find(|m| m.payload().as_ref() == b"this is not json")
        .expect("the bad JSON is dead-lettered as it was");
    assert_eq!(bad.key(), Some("bad"));
    assert_eq!(bad.headers().get(header::ERROR_KIND), Some("decode"));
    assert!(bad.headers().get(header::ERROR).unwrap().contains("JSON"));
    let wrong_type = dead
        .iter()
        .find(|m| m.payload().as_ref() == b"{\"n\":2}")
        .expect("the wrong content type is dead-lettered");
    assert!(wrong_type
        .headers()
        .get(header::ERROR)
        .unwrap()
        .contains("text/plain"));
}

/// With concurrency above one, each key is handled in publish order while keys overlap.
pub async fn per_key_order_under_concurrency(h: &dyn Harness) {
    let caps = h.capabilities();
    let binder = h.binder().await;
    let dest = unique("order");
    let config = test_binding(&dest, &caps).group(unique("g")).concurrency(4);
    let seen: Arc<Mutex<HashMap<String, Vec<u64>>>> = Arc::default();
    let running = Arc::new(AtomicUsize::new(0));
    let max_running = Arc::new(AtomicUsize::new(0));
    let (s, r, m) = (seen.clone(), running.clone(), max_running.clone());
    let source = channel(&binder, config.clone())
        .source::<Event>()
        .await
        .unwrap();
    for i in 0..40u64 {
        for k in 0..4 {
            source
                .send_keyed(format!("key-{k}"), &ev(k * 1000 + i))
                .await
                .unwrap();
        }
    }
    let sub = channel(&binder, config)
        .sink::<Event>()
        .subscribe_envelope(move |e: crate::Envelope<Event>| {
            let (s, r, m) = (s.clone(), r.clone(), m.clone());
            async move {
                let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(now, Ordering::SeqCst);
                // Simulated work, so handlers of different keys overlap.
                tokio::time::sleep(Duration::from_millis(2)).await;
                let key = e.message().key().unwrap().to_owned();
                s.lock()
                    .unwrap()
                    .entry(key)
                    .or_default()
                    .push(e.payload().n % 1000);
                r.fetch_sub(1, Ordering::SeqCst);
                Ok::<(), String>(())
            }
        })
        .await
        .unwrap();
    wait_until(caps.patience, "160 messages are handled", || {
        seen.lock().unwrap().values().map(Vec::len).sum::<usize>() >= 160
    })
    .await;
    sub.shutdown().await.unwrap();
    let seen = seen.lock().unwrap();
    for (key, order) in seen.iter() {
        assert_eq!(order, &(0..40).collect::<Vec<_>>(), "order of {key}");
    }
    assert!(
        max_running.load(Ordering::SeqCst) > 1,
        "handlers of different keys ran concurrently"
    );
}

/// A consumer never holds more un-acknowledged deliveries than `prefetch`, however large
/// the backlog.
pub async fn prefetch_bounds_unacked_deliveries(h: &dyn Harness) {
    let caps = h.capabilities();
    let counting = CountingBinder::new(h.binder().await);
    let binder: Arc<dyn Binder> = Arc::new(counting.clone());
    let dest = unique("prefetch");
    let config = test_binding(&dest, &caps)
        .group(unique("g"))
        .prefetch(8)
        .concurrency(2);
    let source = channel(&binder, config.clone())
        .source::<Event>()
        .await
        .unwrap();
    let batch: Vec<Event> = (0..200).map(ev).collect();
    source.send_batch(&batch).await.unwrap();
    let tally = Tally::new();
    let t = tally.clone();
    let gate = Arc::new(Semaphore::new(0));
    let g = gate.clone();
    let sub = channel(&binder, config)
        .sink::<Event>()
        .subscribe(move |e: Event| {
            let (t, g) = (t.clone(), g.clone());
            async move {
                g.acquire().await.unwrap().forget();
                t.record(e.n);
                Ok::<(), String>(())
            }
        })
        .await
        .unwrap();
    // With handlers blocked, the consumer fills up to the bound and stops there.
    wait_until(
        caps.patience,
        "the consumer has prefetched up to the bound",
        || counting.received() >= 8,
    )
    .await;
    assert_eq!(
        counting.received(),
        8,
        "blocked handlers stop fetching at the bound"
    );
    gate.add_permits(1_000);
    wait_until(caps.patience, "all 200 are handled", || {
        tally.has_all(0..200)
    })
    .await;
    sub.shutdown().await.unwrap();
    assert!(
        counting.max_outstanding() <= 8,
        "at most prefetch un-acked deliveries, saw {}",
        counting.max_outstanding()
    );
    tally.assert_complete("prefetch_bounds_unacked_deliveries", 0..200);
}

/// Consuming a batch, closing and reopening, over and over, loses nothing: what was fetched
/// but not acknowledged at a close comes back to the next consumer.
pub async fn close_and_reopen_in_batches_loses_nothing(h: &dyn Harness) {
    let caps = h.capabilities();
    let binder = h.binder().await;
    let dest = unique("reopen");
    let config = test_binding(&dest, &caps).group(unique("g")).prefetch(16);
    let source = channel(&binder, config.clone())
        .source::<Event>()
        .await
        .unwrap();
    let batch: Vec<Event> = (0..150).map(ev).collect();
    source.send_batch(&batch).await.unwrap();
    let tally = Tally::new();
    let deadline = Instant::now() + caps.patience * 2;
    let mut rounds = 0;
    while !tally.has_all(0..150) {
        assert!(
            Instant::now() < deadline,
            "150 messages not handled in time"
        );
        rounds += 1;
        let mut stream = channel(&binder, config.clone())
            .sink::<Event>()
            .stream()
            .await
            .unwrap();
        let patience = caps.patience + caps.claim_idle * 4;
        for _ in 0..30 {
            if tally.has_all(0..150) {
                break;
            }
            let d = next_delivery(&mut stream, patience).await;
            tally.record(d.payload().n);
            d.ack();
        }
        // Closing with prefetched deliveries not yet yielded: they must come back.
        stream.close().await.unwrap();
    }
    assert!(
        rounds >= 5,
        "150 messages in batches of 30 took {rounds} rounds"
    );
    tally.assert_complete("close_and_reopen_in_batches_loses_nothing", 0..150);
}

/// A member that dies holding deliveries (dropped without ack or close) hands them to a
/// live member of its group.
pub async fn crashed_member_work_is_taken_over(h: &dyn Harness) {
    let caps = h.capabilities();
    let binder = h.binder().await;
    let dest = unique("crash");
    let group = unique("g");
    let producer = raw_producer(&binder, &dest).await;
    let mut ids = Vec::new();
    let victim = raw_consumer(&h.binder().await, &dest, &group, &caps).await;
    for n in 0..10u64 {
        ids.push(producer.send(Message::new(n.to_string())).await.unwrap());
    }
    let held = receive_at_least(&*victim, 10, caps.patience).await;
    assert!(!held.is_empty(), "the victim received work before dying");
    drop(victim); // a crash: no ack, no close

    let survivor = raw_consumer(&h.binder().await, &dest, &group, &caps).await;
    let got = receive_at_least(&*survivor, 10, caps.patience + caps.claim_idle * 4).await;
    ack_all(&*survivor, &got).await;
    let mut got_ids: Vec<String> = got.iter().map(|r| r.message.id().to_owned()).collect();
    got_ids.sort();
    got_ids.dedup();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(
        got_ids, want,
        "the survivor got every message the victim held"
    );
    if caps.counts_deliveries {
        for r in &got {
            if held.iter().any(|v| v.message.id() == r.message.id()) {
                assert!(
                    r.attempt >= 2,
                    "a taken-over delivery counts as redelivered"
                );
            }
        }
    }
    survivor.close().await.unwrap();
}

/// Shutdown waits for running handlers, acknowledges their messages, then closes.
pub async fn graceful_shutdown_finishes_in_flight(h: &dyn Harness) {
    let caps = h.capabilities();
    let counting = CountingBinder::new(h.binder().await);
    let binder: Arc<dyn Binder> = Arc::new(counting.clone());
    let dest = unique("shutdown");
    let config = test_binding(&dest, &caps).group(unique("g")).concurrency(3);
    let started = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(0));
    let (s, f, g) = (started.clone(), finished.clone(), gate.clone());
    let sub = channel(&binder, config.clone())
        .sink::<Event>()
        .subscribe(move |_: Event| {
            let (s, f, g) = (s.clone(), f.clone(), g.clone());
            async move {
                s.fetch_add(1, Ordering::SeqCst);
                g.acquire().await.unwrap().forget();
                f.fetch_add(1, Ordering::SeqCst);
                Ok::<(), String>(())
            }
        })
        .await
        .unwrap();
    let source = channel(&binder, config).source::<Event>().await.unwrap();
    for n in 0..3 {
        source.send_keyed(format!("k{n}"), &ev(n)).await.unwrap();
    }
    wait_until(caps.patience, "three handlers are running", || {
        started.load(Ordering::SeqCst) == 3
    })
    .await;
    let shutdown = tokio::spawn(sub.shutdown());
    tokio::task::yield_now().await;
    assert!(
        !shutdown.is_finished(),
        "shutdown waits for running handlers"
    );
    gate.add_permits(3);
    shutdown.await.unwrap().expect("clean shutdown");
    assert_eq!(
        finished.load(Ordering::SeqCst),
        3,
        "in-flight handlers finished"
    );
    assert_eq!(
        counting.acked_at_close(),
        3,
        "their messages were acked before close"
    );
}

/// Many subscriptions opened and closed at once, while messages flow, lose nothing.
pub async fn concurrent_open_close_loses_nothing(h: &dyn Harness) {
    let caps = h.capabilities();
    let binder = h.binder().await;
    let dest = unique("churn");
    // Every close hands its prefetched, unhandled deliveries back, and brokers count each
    // hand-back as a delivery: 12 closes could push a message past the usual 3 attempts
    // into the dead-letter destination before any handler saw it. This case is about losing
    // nothing, so the attempts allowed exceed the closes.
    let config = test_binding(&dest, &caps)
        .group(unique("g"))
        .prefetch(4)
        .retry(RetryConfig {
            max_attempts: 20,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(100),
            multiplier: 2.0,
        });
    let tally = Tally::new();
    let source = channel(&binder, config.clone())
        .source::<Event>()
        .await
        .unwrap();
    let publisher = tokio::spawn(async move {
        for n in 0..100 {
            source.send(&ev(n)).await.unwrap();
        }
    });
    for _round in 0..3 {
        let mut opened = Vec::new();
        for _ in 0..4 {
            let (binder, config, t) = (binder.clone(), config.clone(), tally.clone());
            opened.push(tokio::spawn(async move {
                let sub = channel(&binder, config)
                    .sink::<Event>()
                    .subscribe(move |e: Event| {
                        t.record(e.n);
                        async { Ok::<(), String>(()) }
                    })
                    .await
                    .unwrap();
                tokio::task::yield_now().await;
                sub.shutdown().await.unwrap();
            }));
        }
        for task in opened {
            task.await.expect("open/close does not panic");
        }
    }
    publisher.await.unwrap();
    let t = tally.clone();
    let sub = channel(&binder, config)
        .sink::<Event>()
        .subscribe(move |e: Event| {
            t.record(e.n);
            async { Ok::<(), String>(()) }
        })
        .await
        .unwrap();
    wait_until(
        caps.patience + caps.claim_idle * 4,
        "all 100 are handled",
        || tally.has_all(0..100),
    )
    .await;
    sub.shutdown().await.unwrap();
    tally.assert_complete("concurrent_open_close_loses_nothing", 0..100);
}

/// Sends racing a close are all accepted before close returns; later sends fail.
pub async fn producer_close_flushes(h: &dyn Harness) {
    let caps = h.capabilities();
    let binder = h.binder().await;
    let dest = unique("flush");
    let ch = channel(&binder, test_binding(&dest, &caps).group(unique("g")));
    let source = ch.source::<Event>().await.unwrap();
    let sends: Vec<_> = (0..100)
        .map(|n| {
            let source = source.clone();
            tokio::spawn(async move { source.send(&ev(n)).await })
        })
        .collect();
    let mut accepted = Vec::new();
    for (n, send) in sends.into_iter().enumerate() {
        send.await.unwrap().expect("send before close succeeds");
        accepted.push(n as u64);
    }
    source.close().await.expect("close flushes");
    assert!(
        source.send(&ev(1000)).await.is_err(),
        "send after close fails"
    );
    let tally = Tally::new();
    let t = tally.clone();
    let sub = ch
        .sink::<Event>()
        .subscribe(move |e: Event| {
            t.record(e.n);
            async { Ok::<(), String>(()) }
        })
        .await
        .unwrap();
    wait_until(caps.patience, "all accepted sends are delivered", || {
        tally.has_all(accepted.clone())
    })
    .await;
    sub.shutdown().await.unwrap();
    tally.assert_complete("producer_close_flushes", accepted);
}

/// A payload over the limit is refused with a typed error and nothing reaches the broker.
pub async fn oversized_payload_is_rejected(h: &dyn Harness) {
    let caps = h.capabilities();
    let binder = h.binder().await;
    let dest = unique("oversize");
    let ch = channel(
        &binder,
        test_binding(&dest, &caps)
            .group(unique("g"))
            .max_payload_bytes(1024),
    );
    let source = ch.source_with(crate::Raw).await.unwrap();
    let err = source
        .send(&bytes::Bytes::from(vec![b'x'; 2048]))
        .await
        .expect_err("oversized payload is refused");
    assert_eq!(err.kind(), ErrorKind::PayloadTooLarge);
    assert!(!err.is_temporary());
    source
        .send(&bytes::Bytes::from_static(b"small"))
        .await
        .unwrap();
    let mut stream = ch.sink_with(crate::Raw).stream().await.unwrap();
    let first = tokio::time::timeout(caps.patience, stream.next())
        .await
        .expect("a delivery arrives")
        .unwrap()
        .unwrap();
    assert_eq!(
        first.payload().as_ref(),
        b"small",
        "only the small payload was published"
    );
    first.ack();
    stream.close().await.unwrap();
}

/// A new group starts at the oldest message with `earliest` and after the newest with
/// `latest`.
pub async fn new_group_start_position(h: &dyn Harness) {
    let caps = h.capabilities();
    let binder = h.binder().await;
    let dest = unique("start");
    let source = channel(&binder, test_binding(&dest, &caps))
        .source::<Event>()
        .await
        .unwrap();
    for n in 0..3 {
        source.send(&ev(n)).await.unwrap();
    }
    let latest = channel(
        &binder,
        test_binding(&dest, &caps)
            .group(unique("latest"))
            .start_from(StartFrom::Latest),
    );
    let mut late = latest.sink::<Event>().stream().await.unwrap();
    for n in 3..5 {
        source.send(&ev(n)).await.unwrap();
    }
    let earliest = channel(
        &binder,
        test_binding(&dest, &caps)
            .group(unique("earliest"))
            .start_from(StartFrom::Earliest),
    );
    let mut early = earliest.sink::<Event>().stream().await.unwrap();
    for (stream, want) in [(&mut early, vec![0, 1, 2, 3, 4]), (&mut late, vec![3, 4])] {
        let mut got = Vec::new();
        while got.len() < want.len() {
            let d = tokio::time::timeout(caps.patience, stream.next())
                .await
                .expect("delivery arrives")
                .unwrap()
                .unwrap();
            got.push(d.payload().n);
            d.ack();
        }
        got.sort();
        assert_eq!(got, want);
    }
    early.close().await.unwrap();
    late.close().await.unwrap();
}

/// The broker is killed and restarted mid-stream: every message whose send succeeded is
/// handled, with duplicates counted.
pub async fn broker_restart_mid_stream(h: &dyn Harness) {
    let caps = h.capabilities();
    if !caps.restart {
        skip("broker_restart_mid_stream: this binder's harness cannot restart its broker");
        return;
    }
    let binder = h.binder().await;
    let dest = unique("restart");
    let config = test_binding(&dest, &caps).group(unique("g"));
    let tally = Tally::new();
    let t = tally.clone();
    let sub = channel(&binder, config.clone())
        .sink::<Event>()
        .subscribe(move |e: Event| {
            t.record(e.n);
            async { Ok::<(), String>(()) }
        })
        .await
        .unwrap();
    let source = channel(&binder, config).source::<Event>().await.unwrap();
    let mut accepted = Vec::new();
    for n in 0..100 {
        source.send(&ev(n)).await.unwrap();
        accepted.push(n);
    }
    wait_until(
        caps.patience,
        "some messages are handled before the restart",
        || tally.distinct() >= 20,
    )
    .await;
    h.restart_broker().await.expect("broker restarts");
    // Sends during recovery may fail; only accepted ones must arrive.
    let mut refused = 0;
    for n in 100..200 {
        match source.send(&ev(n)).await {
            Ok(_) => accepted.push(n),
            Err(e) => {
                refused += 1;
                assert!(
                    e.is_temporary() || e.kind() == ErrorKind::Broker,
                    "a send during recovery fails with a connection-type error: {e}"
                );
            }
        }
    }
    assert!(
        accepted.len() > 150,
        "the binder recovered: only {refused} of 100 sends refused"
    );
    wait_until(
        caps.patience * 2,
        "every accepted message is handled",
        || tally.has_all(accepted.clone()),
    )
    .await;
    sub.shutdown().await.unwrap();
    tally.assert_complete("broker_restart_mid_stream", accepted);
}

/// What a partitioned case records of each handling: (instance, key, n, partition).
type Handled = Arc<Mutex<Vec<(u32, String, u64, Option<u32>)>>>;

/// A subscription of `instance` of `instances` that records into `handled` and `tally`.
async fn partition_member(
    binder: &Arc<dyn Binder>,
    config: &crate::BindingConfig,
    (instance, instances): (u32, u32),
    handled: &Handled,
    tally: &Tally,
) -> crate::Subscription {
    let (handled, tally) = (handled.clone(), tally.clone());
    channel(binder, config.clone().instance(instance, instances))
        .sink::<Event>()
        .subscribe_envelope(move |e: crate::Envelope<Event>| {
            let key = e.message().key().unwrap_or_default().to_owned();
            let partition = e.message().partition();
            handled
                .lock()
                .unwrap()
                .push((instance, key, e.payload().n, partition));
            tally.record(e.payload().n);
            async { Ok::<(), String>(()) }
        })
        .await
        .unwrap()
}

/// A partitioned binding split across two instances of one group: every key lands in the
/// partition its hash names, is read by one instance only, and in publish order; nothing is
/// lost.
pub async fn partitioned_instances_split_keys_in_order(h: &dyn Harness) {
    const PARTITIONS: u32 = 4;
    let caps = h.capabilities();
    let binder = h.binder().await;
    let dest = unique("parts");
    let config = test_binding(&dest, &caps)
        .group(unique("g"))
        .partitions(PARTITIONS)
        .concurrency(2);
    let handled: Handled = Arc::default();
    let tally = Tally::new();
    let mut subs = Vec::new();
    for instance in 0..2 {
        let member = h.binder().await;
        subs.push(partition_member(&member, &config, (instance, 2), &handled, &tally).await);
    }
    let source = channel(&binder, config.clone())
        .source::<Event>()
        .await
        .unwrap()
        .keyed_by(|e: &Event| format!("key-{}", e.n % 8));
    // Half one by one, half in batches, which are split by partition.
    for n in 0..100 {
        source.send(&ev(n)).await.unwrap();
    }
    let rest: Vec<Event> = (100..200).map(ev).collect();
    for chunk in rest.chunks(25) {
        source.send_batch(chunk).await.unwrap();
    }
    wait_until(caps.patience, "200 messages are handled", || {
        tally.has_all(0..200)
    })
    .await;
    for sub in subs {
        sub.shutdown().await.unwrap();
    }
    tally.assert_complete("partitioned_instances_split_keys_in_order", 0..200);
    let handled = handled.lock().unwrap();
    let mut readers: HashMap<&str, u32> = HashMap::new();
    let mut order: HashMap<&str, Vec<u64>> = HashMap::new();
    for (instance, key, n, partition) in handled.iter() {
        let expected = crate::partition_for(key, PARTITIONS);
        assert_eq!(*partition, Some(expected), "partition of {key} (n = {n})");
        assert_eq!(
            expected % 2,
            *instance,
            "{key} is in partition {expected}, which instance {} reads",
            expected % 2
        );
        let reader = *readers.entry(key).or_insert(*instance);
        assert_eq!(reader, *instance, "{key} was read by both instances");
        order.entry(key).or_default().push(*n);
    }
    assert_eq!(order.len(), 8, "every key arrived");
    for (key, ns) in &order {
        let mut sorted = ns.clone();
        sorted.sort_unstable();
        sorted.dedup();
        // A redelivery may repeat a message, never put it before an earlier one.
        let mut first_seen = ns.clone();
        let mut seen = std::collections::HashSet::new();
        first_seen.retain(|n| seen.insert(*n));
        assert_eq!(first_seen, sorted, "order of {key}");
    }
}

/// A single consumer of a partitioned binding reads every partition.
pub async fn partitioned_single_instance_reads_every_partition(h: &dyn Harness) {
    const PARTITIONS: u32 = 3;
    let caps = h.capabilities();
    let binder = h.binder().await;
    let dest = unique("parts-one");
    let config = test_binding(&dest, &caps)
        .group(unique("g"))
        .partitions(PARTITIONS);
    let handled: Handled = Arc::default();
    let tally = Tally::new();
    let sub = partition_member(&binder, &config, (0, 1), &handled, &tally).await;
    let source = channel(&binder, config.clone())
        .source::<Event>()
        .await
        .unwrap();
    // Unkeyed messages go round-robin, so every partition gets some.
    for n in 0..60 {
        source.send(&ev(n)).await.unwrap();
    }
    wait_until(caps.patience, "60 messages are handled", || {
        tally.has_all(0..60)
    })
    .await;
    sub.shutdown().await.unwrap();
    tally.assert_complete("partitioned_single_instance_reads_every_partition", 0..60);
    let partitions: std::collections::BTreeSet<Option<u32>> =
        handled.lock().unwrap().iter().map(|h| h.3).collect();
    assert_eq!(
        partitions,
        (0..PARTITIONS).map(Some).collect(),
        "messages came from every partition"
    );
}

/// A binder that hands out a few deliveries per receive still fills the prefetch window
/// while every handler is busy: fetching does not stop short of the bound waiting for a
/// fuller batch that cannot come.
pub async fn short_receives_fill_the_window(h: &dyn Harness) {
    let caps = h.capabilities();
    let counting = CountingBinder::new(Arc::new(ShortReceives::new(h.binder().await, 3)));
    let binder: Arc<dyn Binder> = Arc::new(counting.clone());
    let dest = unique("short");
    let config = test_binding(&dest, &caps)
        .group(unique("g"))
        .prefetch(8)
        .concurrency(2);
    let source = channel(&binder, config.clone())
        .source::<Event>()
        .await
        .unwrap();
    let batch: Vec<Event> = (0..40).map(ev).collect();
    source.send_batch(&batch).await.unwrap();
    let tally = Tally::new();
    let gate = Arc::new(Semaphore::new(0));
    let (t, g) = (tally.clone(), gate.clone());
    let sub = channel(&binder, config)
        .sink::<Event>()
        .subscribe(move |e: Event| {
            let (t, g) = (t.clone(), g.clone());
            async move {
                g.acquire().await.unwrap().forget();
                t.record(e.n);
                Ok::<(), String>(())
            }
        })
        .await
        .unwrap();
    wait_until(
        caps.patience,
        "three-at-a-time receives have filled the window of 8 while both handlers are held",
        || counting.received() >= 8,
    )
    .await;
    assert_eq!(counting.received(), 8, "no more than the window");
    gate.add_permits(1_000);
    wait_until(caps.patience, "all 40 are handled", || tally.has_all(0..40)).await;
    sub.shutdown().await.unwrap();
    assert!(
        counting.max_outstanding() <= 8,
        "at most prefetch un-acked deliveries, saw {}",
        counting.max_outstanding()
    );
    tally.assert_complete("short_receives_fill_the_window", 0..40);
}

/// Closing hands back what was prefetched and never handled without counting it as an
/// attempt: consumers that open, handle a little and close, over and over (a rolling
/// restart), never push an unseen message towards the dead-letter destination, and every
/// message is handled as attempt 1.
pub async fn close_and_reopen_keeps_attempts_at_one(h: &dyn Harness) {
    let caps = h.capabilities();
    let binder = h.binder().await;
    let dest = unique("attempts");
    // Far more prefetch than messages: every close hands back everything not yet handled.
    let config = test_binding(&dest, &caps).group(unique("g")).prefetch(256);
    let source = channel(&binder, config.clone())
        .source::<Event>()
        .await
        .unwrap();
    let batch: Vec<Event> = (0..10).map(ev).collect();
    source.send_batch(&batch).await.unwrap();
    let tally = Tally::new();
    // Pull style: one message per consumer.
    for round in 0..5 {
        let mut stream = channel(&binder, config.clone())
            .sink::<Event>()
            .stream()
            .await
            .unwrap();
        let d = next_delivery(&mut stream, caps.patience + caps.claim_idle * 4).await;
        assert_eq!(
            d.attempt(),
            1,
            "round {round}: message {} was handed back unstarted, not attempted",
            d.payload().n
        );
        tally.record(d.payload().n);
        d.ack();
        stream.close().await.unwrap();
    }
    // Handler style: subscriptions shut down after a few messages each.
    let attempts: Arc<Mutex<Vec<u32>>> = Arc::default();
    let deadline = Instant::now() + caps.patience * 2;
    while !tally.has_all(0..10) {
        assert!(Instant::now() < deadline, "10 messages not handled in time");
        let before = tally.distinct();
        let (t, a) = (tally.clone(), attempts.clone());
        let sub = channel(&binder, config.clone())
            .sink::<Event>()
            .subscribe_envelope(move |e: crate::Envelope<Event>| {
                t.record(e.payload().n);
                a.lock().unwrap().push(e.attempt());
                async { Ok::<(), String>(()) }
            })
            .await
            .unwrap();
        wait_until(
            caps.patience + caps.claim_idle * 4,
            "the subscription handles a message",
            || tally.distinct() > before,
        )
        .await;
        sub.shutdown().await.unwrap();
    }
    let attempts = attempts.lock().unwrap().clone();
    assert!(
        attempts.iter().all(|a| *a == 1),
        "every handler call was attempt 1: {attempts:?}"
    );
    // Every message reached a handler, so none was dead-lettered unseen.
    let duplicates = tally.assert_complete("close_and_reopen_keeps_attempts_at_one", 0..10);
    assert_eq!(duplicates, 0, "acknowledged messages came back");
}

/// A handler that panics, before or after returning its future, is a failed attempt like
/// an error: retried, then dead-lettered with the panic message; the subscription keeps
/// handling everything else.
pub async fn panicking_handler_is_retried_then_dead_lettered(h: &dyn Harness) {
    let caps = h.capabilities();
    let binder = h.binder().await;
    let dest = unique("panic");
    let config = test_binding(&dest, &caps).group(unique("g")).concurrency(2);
    let log: Arc<Mutex<Vec<(u64, u32)>>> = Arc::default();
    let tally = Tally::new();
    let (l, t) = (log.clone(), tally.clone());
    let mut sub = channel(&binder, config.clone())
        .sink::<Event>()
        .subscribe_envelope(move |e: crate::Envelope<Event>| {
            let n = e.payload().n;
            l.lock().unwrap().push((n, e.attempt()));
            if n == 0 {
                panic!("sync boom");
            }
            let t = t.clone();
            async move {
                if n == 1 {
                    panic!("async boom");
                }
                t.record(n);
                Ok::<(), String>(())
            }
        })
        .await
        .unwrap();
    let source = channel(&binder, config.clone())
        .source::<Event>()
        .await
        .unwrap();
    source.send_keyed("sync", &ev(0)).await.unwrap();
    source.send_keyed("async", &ev(1)).await.unwrap();
    for n in 10..30 {
        source.send_keyed(format!("k{n}"), &ev(n)).await.unwrap();
    }
    let dead = read_dead_letters(h, &binder, &config.dead_letter_destination(), 2).await;
    wait_until(caps.patience, "the other 20 are handled", || {
        tally.has_all(10..30)
    })
    .await;
    assert!(!sub.is_finished(), "the subscription is still running");
    // It keeps going after the panics.
    source.send(&ev(99)).await.unwrap();
    wait_until(caps.patience, "a later message is handled", || {
        tally.has_all([99])
    })
    .await;
    let waited = tokio::time::timeout(Duration::from_millis(50), sub.wait()).await;
    assert!(
        waited.is_err(),
        "wait() does not return while the subscription runs"
    );
    sub.shutdown().await.expect("clean shutdown");
    let log = log.lock().unwrap().clone();
    for n in [0, 1] {
        let tries: Vec<u32> = log
            .iter()
            .filter(|(m, _)| *m == n)
            .map(|(_, a)| *a)
            .collect();
        assert_eq!(
            tries,
            vec![1, 2, 3],
            "message {n} attempted three times: {log:?}"
        );
    }
    for (n, boom) in [(0u64, "sync boom"), (1, "async boom")] {
        let letter = dead
            .iter()
            .find(|m| serde_json::from_slice::<Event>(m.payload()).ok() == Some(ev(n)))
            .unwrap_or_else(|| panic!("message {n} is dead-lettered"));
        let error = letter.headers().get(header::ERROR).unwrap_or_default();
        assert!(
            error.contains("panicked") && error.contains(boom),
            "{error}"
        );
        assert_eq!(letter.headers().get(header::ATTEMPTS), Some("3"));
    }
    tally.assert_complete(
        "panicking_handler_is_retried_then_dead_lettered",
        (10..30).chain([99]),
    );
}

/// A dead-letter destination that cannot be written fails the subscription's start; one
/// that refuses a message for good ends the subscription with that error instead of
/// retrying it forever, and the message stays un-acknowledged for the next consumer.
pub async fn refused_dead_letter_stops_the_subscription_with_the_error(h: &dyn Harness) {
    let caps = h.capabilities();
    let real = h.binder().await;
    let dest = unique("dlq-refused");
    let config = test_binding(&dest, &caps)
        .group(unique("g"))
        .retry(RetryConfig {
            max_attempts: 1,
            ..test_binding(&dest, &caps).retry
        });
    let unopenable: Arc<dyn Binder> =
        Arc::new(RefusingDeadLetters::new(real.clone(), Refusal::Open));
    let err = channel(&unopenable, config.clone())
        .sink::<Event>()
        .subscribe(|_: Event| async { Ok::<(), String>(()) })
        .await
        .expect_err("a dead-letter destination that cannot be opened fails the start");
    assert_eq!(err.kind(), ErrorKind::DestinationNotFound, "{err}");

    let refusing: Arc<dyn Binder> =
        Arc::new(RefusingDeadLetters::new(real.clone(), Refusal::Publish));
    let source = channel(&real, config.clone())
        .source::<Event>()
        .await
        .unwrap();
    source.send(&ev(0)).await.unwrap();
    let mut sub = channel(&refusing, config.clone())
        .sink::<Event>()
        .subscribe(|_: Event| async { Err::<(), _>("always fails") })
        .await
        .unwrap();
    let ended = tokio::time::timeout(caps.patience, sub.wait())
        .await
        .expect("the subscription ends instead of retrying the dead letter forever");
    let err = ended.expect_err("it ends with the refusal");
    assert_eq!(err.kind(), ErrorKind::PayloadTooLarge, "{err}");
    assert!(
        err.message().contains(&config.dead_letter_destination()),
        "the error names the dead-letter destination: {err}"
    );
    sub.shutdown()
        .await
        .expect("shutdown after the end is a no-op");

    // Nothing was lost: the next consumer, with a dead-letter destination that works, gets
    // the message again and, its one attempt used up, dead-letters it.
    let sub = channel(&real, config.clone())
        .sink::<Event>()
        .subscribe(|_: Event| async { Err::<(), _>("always fails") })
        .await
        .unwrap();
    let dead = read_dead_letters(h, &real, &config.dead_letter_destination(), 1).await;
    assert_eq!(
        serde_json::from_slice::<Event>(dead[0].payload()).unwrap(),
        ev(0)
    );
    sub.shutdown().await.unwrap();
}

/// The pull-style stream ends with the refusal, too, rather than retrying it forever.
pub async fn refused_dead_letter_stops_the_stream_with_the_error(h: &dyn Harness) {
    let caps = h.capabilities();
    let real = h.binder().await;
    let dest = unique("dlq-refused-stream");
    let config = test_binding(&dest, &caps)
        .group(unique("g"))
        .retry(RetryConfig {
            max_attempts: 1,
            ..test_binding(&dest, &caps).retry
        });
    let refusing: Arc<dyn Binder> =
        Arc::new(RefusingDeadLetters::new(real.clone(), Refusal::Publish));
    let source = channel(&real, config.clone())
        .source::<Event>()
        .await
        .unwrap();
    source.send(&ev(0)).await.unwrap();
    let mut stream = channel(&refusing, config)
        .sink::<Event>()
        .stream()
        .await
        .unwrap();
    next_delivery(&mut stream, caps.patience)
        .await
        .nack("always fails");
    let item = tokio::time::timeout(caps.patience, stream.next())
        .await
        .expect("the stream yields the refusal instead of waiting forever");
    let err = item
        .expect("an item, not the end")
        .expect_err("the item is the refusal");
    assert_eq!(err.kind(), ErrorKind::PayloadTooLarge, "{err}");
    assert!(
        tokio::time::timeout(caps.patience, stream.next())
            .await
            .expect("the stream ends")
            .is_none(),
        "nothing after the error"
    );
    stream.close().await.unwrap();
}

/// Waiting for a subscription in `select!` and then shutting it down, the most common shape
/// of a service, shuts it down fully: `shutdown` returns only after handlers finished,
/// their messages were acknowledged and the consumer closed.
pub async fn subscription_wait_is_cancel_safe(h: &dyn Harness) {
    let caps = h.capabilities();
    let counting = CountingBinder::new(h.binder().await);
    let binder: Arc<dyn Binder> = Arc::new(counting.clone());
    let dest = unique("wait");
    let config = test_binding(&dest, &caps).group(unique("g"));
    let started = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(0));
    let (s, g) = (started.clone(), gate.clone());
    let mut sub = channel(&binder, config.clone())
        .sink::<Event>()
        .subscribe(move |_: Event| {
            let (s, g) = (s.clone(), g.clone());
            async move {
                s.fetch_add(1, Ordering::SeqCst);
                g.acquire().await.unwrap().forget();
                Ok::<(), String>(())
            }
        })
        .await
        .unwrap();
    let source = channel(&binder, config).source::<Event>().await.unwrap();
    source.send(&ev(1)).await.unwrap();
    wait_until(caps.patience, "the handler is running", || {
        started.load(Ordering::SeqCst) == 1
    })
    .await;
    // The "signal" branch wins; the `wait` future is dropped half-way.
    tokio::select! {
        _ = sub.wait() => panic!("the subscription ended by itself"),
        _ = tokio::time::sleep(Duration::from_millis(20)) => {}
    }
    gate.add_permits(1);
    sub.shutdown().await.expect("clean shutdown");
    assert_eq!(
        counting.closed(),
        1,
        "shutdown returned only after the consumer closed"
    );
    assert_eq!(
        counting.acked_at_close(),
        1,
        "the handled message was acknowledged first"
    );
}

/// After `close`, a binder makes no new producers or consumers: each attempt fails with
/// [`ErrorKind::Closed`]. What was made before stays usable until closed itself.
pub async fn closed_binder_refuses_new_clients(h: &dyn Harness) {
    let caps = h.capabilities();
    let binder = h.binder().await;
    let dest = unique("closed");
    let earlier = raw_producer(&binder, &dest).await;
    binder.close().await.expect("close");
    match binder.producer(&dest).await {
        Err(e) => assert_eq!(e.kind(), ErrorKind::Closed, "producer after close: {e}"),
        Ok(_) => panic!("a producer was made after close"),
    }
    match binder.dead_letter_producer(&dest).await {
        Err(e) => assert_eq!(e.kind(), ErrorKind::Closed, "dead-letter producer: {e}"),
        Ok(_) => panic!("a dead-letter producer was made after close"),
    }
    let options = crate::ConsumerOptions::new(unique("g")).claim_idle(caps.claim_idle);
    match binder.consumer(&dest, &options).await {
        Err(e) => assert_eq!(e.kind(), ErrorKind::Closed, "consumer after close: {e}"),
        Ok(_) => panic!("a consumer was made after close"),
    }
    earlier
        .send(Message::new(&b"still open"[..]))
        .await
        .expect("a producer made before close still sends");
    earlier.close().await.unwrap();
}

/// Two members whose handlers each take a tenth of the takeover time, so that each holds
/// work for several times `claim-idle`: neither takes over what the other still holds, so
/// nothing is handled twice; where the broker gives each key to one member at a time, keys
/// stay in order across both.
pub async fn slow_handlers_keep_their_deliveries(h: &dyn Harness) {
    let caps = h.capabilities();
    let binder = h.binder().await;
    let dest = unique("slow");
    let config = test_binding(&dest, &caps).group(unique("g")).prefetch(40);
    let work = caps.claim_idle / 10;
    let tally = Tally::new();
    let handled: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let mut members = Vec::new();
    for _ in 0..2 {
        let (t, l) = (tally.clone(), handled.clone());
        members.push(
            channel(&binder, config.clone())
                .sink::<Event>()
                .subscribe_envelope(move |e: crate::Envelope<Event>| {
                    let (t, l) = (t.clone(), l.clone());
                    async move {
                        tokio::time::sleep(work).await;
                        let key = e.message().key().unwrap_or_default().to_owned();
                        l.lock().unwrap().push((key, e.payload().n));
                        t.record(e.payload().n);
                        Ok::<(), String>(())
                    }
                })
                .await
                .unwrap(),
        );
    }
    let source = channel(&binder, config).source::<Event>().await.unwrap();
    let messages = 80u64;
    for n in 0..messages {
        source
            .send_keyed(format!("key-{}", n % 8), &ev(n))
            .await
            .unwrap();
    }
    // Each member holds up to 40 messages of work: 40 × claim-idle / 10 = 4 × claim-idle.
    wait_until(
        caps.patience + work * messages as u32,
        "all messages are handled",
        || tally.has_all(0..messages),
    )
    .await;
    for member in members {
        member.shutdown().await.unwrap();
    }
    let duplicates = tally.assert_complete("slow_handlers_keep_their_deliveries", 0..messages);
    assert_eq!(duplicates, 0, "a live member's deliveries were taken over");
    if caps.orders_keys_across_members {
        let mut last: HashMap<String, u64> = HashMap::new();
        for (key, n) in handled.lock().unwrap().iter() {
            if let Some(previous) = last.insert(key.clone(), *n) {
                assert!(previous < *n, "{key}: {n} handled after {previous}");
            }
        }
    }
}

/// The metrics count what a case did: published, received, handled, failed attempts,
/// retries, dead letters by reason, undecodable payloads, handler durations, end-to-end
/// latencies, publish failures by kind; in-flight is back to 0 at the end, and the lag
/// gauge follows the backlog down to 0.
pub async fn metrics_count_what_happened(h: &dyn Harness) {
    use crate::telemetry::names;
    let recorded = observe::recorded();
    let caps = h.capabilities();
    let binder = h.binder().await;
    let dest = unique("metrics");
    let config = test_binding(&dest, &caps)
        .group(unique("g"))
        .concurrency(2)
        .lag_interval(Duration::from_millis(50));
    let labels = [("destination", dest.as_str())];
    let source = channel(&binder, config.clone())
        .source::<Event>()
        .await
        .unwrap();
    // A backlog first, so the lag gauge has something to report.
    for n in 0..10 {
        source.send_keyed(format!("k{n}"), &ev(n)).await.unwrap();
    }
    raw_producer(&binder, &dest)
        .await
        .send(Message::new(&b"not json"[..]).with_header(header::CONTENT_TYPE, "application/json"))
        .await
        .unwrap();
    let oversized = source.encode(&ev(99)).unwrap().with_key("big");
    let oversized = Message::new(vec![b' '; config.max_payload_bytes + 1])
        .with_headers(oversized.headers().clone());
    let err = source.send_message(oversized).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PayloadTooLarge);

    let gate = Arc::new(Semaphore::new(0));
    let tally = Tally::new();
    let (t, g) = (tally.clone(), gate.clone());
    let sub = channel(&binder, config.clone())
        .sink::<Event>()
        .subscribe(move |e: Event| {
            let (t, g) = (t.clone(), g.clone());
            async move {
                g.acquire().await.unwrap().forget();
                t.record(e.n);
                if e.n == 0 {
                    Err("always fails")
                } else {
                    Ok(())
                }
            }
        })
        .await
        .unwrap();
    wait_until(
        caps.patience,
        "the lag gauge reports the backlog (11 messages, none acknowledged)",
        || recorded.gauge(names::LAG, &labels) == Some(11.0),
    )
    .await;
    gate.add_permits(1_000);
    let dead = read_dead_letters(h, &binder, &config.dead_letter_destination(), 2).await;
    wait_until(caps.patience, "the nine good messages are handled", || {
        tally.has_all(1..10)
    })
    .await;
    wait_until(
        caps.patience + caps.claim_idle * 4,
        "the lag gauge falls to 0 once everything is acknowledged",
        || recorded.gauge(names::LAG, &labels) == Some(0.0),
    )
    .await;
    sub.shutdown().await.unwrap();
    assert_eq!(dead.len(), 2);

    let counter = |name: &str| recorded.counter(name, &labels);
    assert_eq!(counter(names::PUBLISHED), 10, "published");
    assert_eq!(
        recorded.counter(
            names::PUBLISH_FAILURES,
            &[
                ("destination", dest.as_str()),
                ("kind", "payload_too_large")
            ]
        ),
        1,
        "publish failures by kind"
    );
    assert_eq!(counter(names::RECEIVED), 11, "received");
    assert_eq!(counter(names::HANDLED), 9, "handled");
    assert_eq!(
        counter(names::HANDLER_ERRORS),
        3,
        "failed attempts of message 0"
    );
    assert_eq!(counter(names::RETRIES), 2, "attempts 2 and 3 of message 0");
    for (reason, count) in [("handler", 1), ("decode", 1)] {
        assert_eq!(
            recorded.counter(
                names::DEAD_LETTERED,
                &[("destination", dest.as_str()), ("reason", reason)]
            ),
            count,
            "dead-lettered for {reason}"
        );
    }
    assert_eq!(counter(names::UNDECODABLE), 1, "undecodable");
    let durations = recorded.histogram(names::HANDLER_DURATION, &labels);
    assert_eq!(durations.len(), 12, "one handler duration per attempt");
    assert!(durations.iter().all(|d| *d >= 0.0));
    let latencies = recorded.histogram(names::END_TO_END_LATENCY, &labels);
    assert_eq!(latencies.len(), 9, "one latency per handled message");
    assert!(
        latencies.iter().all(|l| *l >= 0.0 && *l < 600.0),
        "{latencies:?}"
    );
    assert_eq!(recorded.gauge(names::IN_FLIGHT, &labels), Some(0.0));
    assert_eq!(recorded.gauge(names::WINDOW_USED, &labels), Some(0.0));
}

/// A paused subscription starts nothing new, keeps what it holds (no other member takes it
/// over, however long the pause) and, once resumed, handles everything exactly once.
pub async fn pause_holds_deliveries_until_resume(h: &dyn Harness) {
    let caps = h.capabilities();
    let binder = h.binder().await;
    let dest = unique("pause");
    let config = test_binding(&dest, &caps).group(unique("g")).concurrency(2);
    let tally = Tally::new();
    let t = tally.clone();
    let sub = channel(&binder, config.clone())
        .sink::<Event>()
        .subscribe(move |e: Event| {
            t.record(e.n);
            async { Ok::<(), String>(()) }
        })
        .await
        .unwrap();
    let source = channel(&binder, config).source::<Event>().await.unwrap();
    for n in 0..5 {
        source.send_keyed(format!("k{n}"), &ev(n)).await.unwrap();
    }
    wait_until(caps.patience, "the first five are handled", || {
        tally.has_all(0..5)
    })
    .await;
    sub.pause();
    assert_eq!(sub.state(), crate::SubscriptionState::Paused);
    for n in 5..25 {
        source.send_keyed(format!("k{n}"), &ev(n)).await.unwrap();
    }
    // Absence cannot be awaited: watch for longer than a takeover would take.
    let watch = (caps.claim_idle * 2).max(Duration::from_secs(1));
    tokio::time::sleep(watch).await;
    assert_eq!(
        tally.distinct(),
        5,
        "nothing was handled while the subscription was paused"
    );
    sub.resume();
    assert_eq!(sub.state(), crate::SubscriptionState::Running);
    wait_until(caps.patience, "all 25 are handled after resume", || {
        tally.has_all(0..25)
    })
    .await;
    sub.shutdown().await.unwrap();
    let duplicates = tally.assert_complete("pause_holds_deliveries_until_resume", 0..25);
    assert_eq!(
        duplicates, 0,
        "held deliveries were taken over during the pause"
    );
}

/// `Streams::health` says whether the binder's broker answers and what each subscription
/// made through the streams is doing: running, paused, and gone once shut down.
pub async fn health_reports_brokers_and_subscriptions(h: &dyn Harness) {
    let caps = h.capabilities();
    let binder = h.binder().await;
    let dest = unique("health");
    let group = unique("g");
    let streams = crate::Streams::builder()
        .binder("main", binder.clone())
        .env(Vec::<(String, String)>::new())
        .load_str(&format!(
            "default-binder = \"main\"\n[bindings.in]\ndestination = \"{dest}\"\ngroup = \"{group}\"\n\
             claim-idle = \"{}ms\"\nretry = {{ max-backoff = \"100ms\" }}\n",
            caps.claim_idle.as_millis()
        ))
        .expect("configuration loads");
    let health = streams.health().await;
    assert_eq!(health.binders.len(), 1);
    assert_eq!(health.binders[0].name, "main");
    assert_eq!(health.binders[0].error, None, "the broker answers");
    assert!(health.subscriptions.is_empty());
    assert!(health.is_healthy());
    let sub = streams
        .sink::<Event>("in")
        .unwrap()
        .subscribe(|_: Event| async { Ok::<(), String>(()) })
        .await
        .unwrap();
    let states = |health: &crate::Health| -> Vec<crate::SubscriptionState> {
        health
            .subscriptions
            .iter()
            .map(|s| {
                assert_eq!(
                    (s.binding.as_str(), s.group.as_str()),
                    ("in", group.as_str())
                );
                s.state.clone()
            })
            .collect()
    };
    assert_eq!(
        states(&streams.health().await),
        vec![crate::SubscriptionState::Running]
    );
    sub.pause();
    assert_eq!(
        states(&streams.health().await),
        vec![crate::SubscriptionState::Paused]
    );
    sub.resume();
    sub.shutdown().await.unwrap();
    assert!(
        streams.health().await.subscriptions.is_empty(),
        "a subscription that was shut down is no longer listed"
    );
}

/// With the `opentelemetry` feature: the trace of the code that sends is the trace of the
/// consuming spans, on any binder: each attempt's `stream.handle` span is a child of the
/// `stream.send` span, and the dead-lettered copy still carries the trace context.
pub async fn trace_context_crosses_the_broker(h: &dyn Harness) {
    #[cfg(not(feature = "opentelemetry"))]
    {
        let _ = h;
        skip("trace_context_crosses_the_broker: stream-core was built without the `opentelemetry` feature");
    }
    #[cfg(feature = "opentelemetry")]
    {
        use opentelemetry::trace::TraceContextExt;
        use tracing::Instrument;
        use tracing_opentelemetry::OpenTelemetrySpanExt;

        let exporter = observe::finished_spans();
        let caps = h.capabilities();
        let binder = h.binder().await;
        let dest = unique("trace");
        let config = test_binding(&dest, &caps).group(unique("g"));
        let root = tracing::info_span!("conformance.root");
        let trace_id = root.context().span().span_context().trace_id();
        let root_id = root.context().span().span_context().span_id();
        let source = channel(&binder, config.clone())
            .source::<Event>()
            .await
            .unwrap();
        async {
            source.send_keyed("poison", &ev(0)).await.unwrap();
            source.send_keyed("good", &ev(1)).await.unwrap();
        }
        .instrument(root.clone())
        .await;
        drop(root);
        let tally = Tally::new();
        let t = tally.clone();
        let sub = channel(&binder, config.clone())
            .sink::<Event>()
            .subscribe(move |e: Event| {
                t.record(e.n);
                async move {
                    if e.n == 0 {
                        Err("always fails")
                    } else {
                        Ok(())
                    }
                }
            })
            .await
            .unwrap();
        let dead = read_dead_letters(h, &binder, &config.dead_letter_destination(), 1).await;
        wait_until(caps.patience, "the good message is handled", || {
            tally.has_all([1])
        })
        .await;
        sub.shutdown().await.unwrap();

        let spans: Vec<_> = exporter
            .get_finished_spans()
            .expect("finished spans")
            .into_iter()
            .filter(|span| span.span_context.trace_id() == trace_id)
            .collect();
        let sends: Vec<_> = spans.iter().filter(|s| s.name == "stream.send").collect();
        assert_eq!(sends.len(), 2, "two send spans in the sender's trace");
        assert!(sends.iter().all(|s| s.parent_span_id == root_id));
        let send_ids: Vec<_> = sends.iter().map(|s| s.span_context.span_id()).collect();
        let handles: Vec<_> = spans.iter().filter(|s| s.name == "stream.handle").collect();
        assert_eq!(
            handles.len(),
            4,
            "three attempts of the poison message and one of the good one, all in the sender's trace"
        );
        assert!(
            handles.iter().all(|s| send_ids.contains(&s.parent_span_id)),
            "each attempt is a child of its message's send span"
        );
        let traceparent = dead[0]
            .headers()
            .get("traceparent")
            .expect("the dead letter carries the trace context");
        assert!(
            traceparent.contains(&trace_id.to_string()),
            "{traceparent} names trace {trace_id}"
        );
    }
}
