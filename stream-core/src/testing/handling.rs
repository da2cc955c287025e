//! Conformance cases of the handler model: outcomes, timeouts, service handlers, batches
//! and processors.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::StreamExt;

use super::cases::{read_dead_letters, Event};
use super::{
    ack_all, channel, raw_consumer, receive_at_least, test_binding, unique, wait_until,
    FailingSends, Harness, Tally, SEND_FAILURE,
};
use crate::{
    handler_fn, header, Batch, BatchError, Binder, BoxError, Envelope, HandlerError, Message,
    Output, RetryConfig,
};

fn ev(n: u64) -> Event {
    Event { n }
}

fn number(message: &Message) -> u64 {
    serde_json::from_slice::<Event>(message.payload())
        .expect("an event")
        .n
}

/// An error with a source, to check that the dead-letter copy keeps the chain.
#[derive(Debug)]
struct SaveFailed(std::io::Error);

impl std::fmt::Display for SaveFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("saving the order failed")
    }
}

impl std::error::Error for SaveFailed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// A handler that rejects a message sends it to the dead-letter destination at once, with
/// its error's message and `source` chain, however many attempts were left; the next
/// message of its key follows it.
pub async fn rejected_message_skips_its_remaining_attempts(h: &dyn Harness) {
    let caps = h.capabilities();
    let binder = h.binder().await;
    let dest = unique("reject");
    let config = test_binding(&dest, &caps)
        .group(unique("g"))
        .retry(RetryConfig {
            max_attempts: 5,
            ..test_binding(&dest, &caps).retry
        });
    let attempts: Arc<Mutex<Vec<(u64, u32)>>> = Arc::default();
    let tally = Tally::new();
    let (a, t) = (attempts.clone(), tally.clone());
    let sub = channel(&binder, config.clone())
        .sink::<Event>()
        .subscribe_envelope(move |e: Envelope<Event>| {
            let n = e.payload().n;
            a.lock().unwrap().push((n, e.attempt()));
            let t = t.clone();
            async move {
                if n == 0 {
                    let disk = std::io::Error::other("constraint orders_amount_positive violated");
                    return Err(HandlerError::reject(SaveFailed(disk)));
                }
                t.record(n);
                Ok(())
            }
        })
        .await
        .unwrap();
    let source = channel(&binder, config.clone())
        .source::<Event>()
        .await
        .unwrap();
    source.send_keyed("k", &ev(0)).await.unwrap();
    source.send_keyed("k", &ev(1)).await.unwrap();
    source.send_keyed("other", &ev(2)).await.unwrap();
    let dead = read_dead_letters(h, &binder, &config.dead_letter_destination(), 1).await;
    wait_until(caps.patience, "the other messages are handled", || {
        tally.has_all([1, 2])
    })
    .await;
    sub.shutdown().await.unwrap();

    let attempts = attempts.lock().unwrap().clone();
    let rejected: Vec<u32> = attempts
        .iter()
        .filter(|(n, _)| *n == 0)
        .map(|(_, a)| *a)
        .collect();
    assert_eq!(
        rejected,
        vec![1],
        "one attempt of the rejected message: {attempts:?}"
    );
    let letter = &dead[0];
    assert_eq!(number(letter), 0);
    let headers = letter.headers();
    assert_eq!(headers.get(header::ERROR_KIND), Some("rejected"));
    assert_eq!(headers.get(header::ATTEMPTS), Some("1"));
    assert_eq!(headers.get(header::ERROR), Some("saving the order failed"));
    assert_eq!(
        headers.get(header::ERROR_CHAIN),
        Some("saving the order failed\nconstraint orders_amount_positive violated")
    );
    tally.assert_complete("rejected_message_skips_its_remaining_attempts", [1, 2]);
}

/// `HandlerError::retry_after` replaces the binding's backoff for that attempt: with a
/// backoff of at most 100 ms configured, the second attempt comes after the longer delay the
/// handler asked for. The delay outlasts `claim-idle`: the member keeps what it holds.
pub async fn retry_after_replaces_the_backoff(h: &dyn Harness) {
    let caps = h.capabilities();
    let binder = h.binder().await;
    let dest = unique("retry-after");
    let config = test_binding(&dest, &caps).group(unique("g"));
    assert!(config.retry.max_backoff <= Duration::from_millis(100));
    let delay = (caps.claim_idle * 2).max(Duration::from_millis(300));
    let seen: Arc<Mutex<Vec<(u32, Instant)>>> = Arc::default();
    let s = seen.clone();
    let sub = channel(&binder, config.clone())
        .sink::<Event>()
        .subscribe_envelope(move |e: Envelope<Event>| {
            s.lock().unwrap().push((e.attempt(), Instant::now()));
            let first = e.attempt() == 1;
            async move {
                if first {
                    Err(HandlerError::retry_after(
                        "the rate limit is reached",
                        delay,
                    ))
                } else {
                    Ok(())
                }
            }
        })
        .await
        .unwrap();
    let source = channel(&binder, config).source::<Event>().await.unwrap();
    source.send(&ev(1)).await.unwrap();
    wait_until(caps.patience, "the second attempt ran", || {
        seen.lock().unwrap().len() == 2
    })
    .await;
    sub.shutdown().await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.iter().map(|(a, _)| *a).collect::<Vec<_>>(), vec![1, 2]);
    let waited = seen[1].1 - seen[0].1;
    assert!(
        waited >= delay,
        "the retry waited the delay asked for, not less: {waited:?}"
    );
}

/// Sets a flag when dropped: the timed-out attempt's future is dropped, not left running.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// An attempt that runs past `handler-timeout` fails: its future is dropped, the message
/// is retried, and one that always runs too long is dead-lettered with the timeout.
pub async fn handler_timeout_fails_the_attempt(h: &dyn Harness) {
    let caps = h.capabilities();
    let binder = h.binder().await;
    let dest = unique("timeout");
    let config = test_binding(&dest, &caps)
        .group(unique("g"))
        .concurrency(2)
        .handler_timeout(Duration::from_millis(200));
    let dropped = Arc::new(AtomicBool::new(false));
    let attempts: Arc<Mutex<Vec<(u64, u32)>>> = Arc::default();
    let tally = Tally::new();
    let (d, a, t) = (dropped.clone(), attempts.clone(), tally.clone());
    let sub = channel(&binder, config.clone())
        .sink::<Event>()
        .subscribe_envelope(move |e: Envelope<Event>| {
            let (n, attempt) = (e.payload().n, e.attempt());
            a.lock().unwrap().push((n, attempt));
            let (d, t) = (d.clone(), t.clone());
            async move {
                // 1 is stuck on its first attempt, 2 on every attempt.
                if (n == 1 && attempt == 1) || n == 2 {
                    let _flag = DropFlag(d);
                    futures::future::pending::<()>().await;
                }
                t.record(n);
                Ok::<(), BoxError>(())
            }
        })
        .await
        .unwrap();
    let source = channel(&binder, config.clone())
        .source::<Event>()
        .await
        .unwrap();
    source.send_keyed("a", &ev(1)).await.unwrap();
    source.send_keyed("b", &ev(2)).await.unwrap();
    source.send_keyed("c", &ev(3)).await.unwrap();
    let dead = read_dead_letters(h, &binder, &config.dead_letter_destination(), 1).await;
    wait_until(caps.patience, "1 and 3 are handled", || {
        tally.has_all([1, 3])
    })
    .await;
    sub.shutdown().await.unwrap();

    assert!(
        dropped.load(Ordering::SeqCst),
        "the timed-out future was dropped"
    );
    let attempts = attempts.lock().unwrap().clone();
    let of = |m: u64| {
        attempts
            .iter()
            .filter(|(n, _)| *n == m)
            .map(|(_, a)| *a)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        of(1),
        vec![1, 2],
        "1 timed out once, then succeeded: {attempts:?}"
    );
    assert_eq!(
        of(2),
        vec![1, 2, 3],
        "2 timed out on every attempt: {attempts:?}"
    );
    assert_eq!(number(&dead[0]), 2);
    let error = dead[0].headers().get(header::ERROR).unwrap_or_default();
    assert!(error.contains("handler-timeout"), "{error}");
    tally.assert_complete("handler_timeout_fails_the_attempt", [1, 3]);
}

/// A `tower` middleware of the test's own: counts calls, rejects messages with a
/// `x-poison` header before the handler sees them, and asks to be made ready first.
#[derive(Clone)]
struct Screening<S> {
    inner: S,
    calls: Arc<AtomicUsize>,
    readied: Arc<AtomicUsize>,
}

impl<S> tower_service::Service<Envelope<Event>> for Screening<S>
where
    S: tower_service::Service<Envelope<Event>, Response = ()>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = ();
    type Error = BoxError;
    type Future = futures::future::BoxFuture<'static, Result<(), BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.readied.fetch_add(1, Ordering::SeqCst);
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, envelope: Envelope<Event>) -> Self::Future {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if envelope.message().headers().get("x-poison").is_some() {
            return Box::pin(async { Err(HandlerError::reject("poisoned").into()) });
        }
        let handled = self.inner.call(envelope);
        Box::pin(async move { handled.await.map_err(Into::into) })
    }
}

/// A handler given as a `tower` service, wrapped in middleware, is made ready and called
/// once per delivery; what the middleware decides (a rejection) is honoured.
pub async fn service_handlers_run_inside_their_middleware(h: &dyn Harness) {
    let caps = h.capabilities();
    let binder = h.binder().await;
    let dest = unique("service");
    let config = test_binding(&dest, &caps).group(unique("g")).concurrency(4);
    let tally = Tally::new();
    let t = tally.clone();
    let (calls, readied) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let service = Screening {
        inner: handler_fn(move |e: Envelope<Event>| {
            t.record(e.payload().n);
            async { Ok::<(), std::io::Error>(()) }
        }),
        calls: calls.clone(),
        readied: readied.clone(),
    };
    let sub = channel(&binder, config.clone())
        .sink::<Event>()
        .subscribe_service(service)
        .await
        .unwrap();
    let source = channel(&binder, config.clone())
        .source::<Event>()
        .await
        .unwrap();
    for n in 0..20 {
        source
            .send_keyed(format!("k{}", n % 5), &ev(n))
            .await
            .unwrap();
    }
    let poison = source
        .encode(&ev(99))
        .unwrap()
        .with_header("x-poison", "yes");
    source.send_message(poison).await.unwrap();
    let dead = read_dead_letters(h, &binder, &config.dead_letter_destination(), 1).await;
    wait_until(caps.patience, "the 20 are handled", || tally.has_all(0..20)).await;
    sub.shutdown().await.unwrap();
    assert_eq!(number(&dead[0]), 99);
    assert_eq!(dead[0].headers().get(header::ERROR_KIND), Some("rejected"));
    let duplicates = tally.assert_complete("service_handlers_run_inside_their_middleware", 0..20);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        21 + duplicates,
        "one call per delivery"
    );
    assert!(
        readied.load(Ordering::SeqCst) >= 21,
        "made ready before every call"
    );
}

/// What a batch handler saw: per call, the (number, key, attempt) of each item.
type Calls = Arc<Mutex<Vec<Vec<(u64, String, u32)>>>>;

fn record_call(calls: &Calls, batch: &Batch<Event>) {
    calls.lock().unwrap().push(
        batch
            .items()
            .iter()
            .map(|e| {
                (
                    e.payload().n,
                    e.message().key().unwrap_or("").to_owned(),
                    e.attempt(),
                )
            })
            .collect(),
    );
}

/// A batch handler gets up to `batch-size` messages per call; a backlog fills whole
/// batches, every message is handled, and each key's messages come in publish order.
pub async fn batch_handler_gets_full_batches_in_key_order(h: &dyn Harness) {
    let caps = h.capabilities();
    let binder = h.binder().await;
    let dest = unique("batch");
    let config = test_binding(&dest, &caps)
        .group(unique("g"))
        .batch(10, Duration::from_millis(200));
    let source = channel(&binder, config.clone())
        .source::<Event>()
        .await
        .unwrap();
    // The group is created on the first subscribe, from the earliest message: the backlog
    // is there before the handler starts.
    let values: Vec<Event> = (0..60).map(ev).collect();
    for chunk in values.chunks(20) {
        let messages = chunk
            .iter()
            .map(|e| Ok(source.encode(e)?.with_key(format!("k{}", e.n % 6))))
            .collect::<crate::Result<Vec<_>>>()
            .unwrap();
        source.send_messages(messages).await.unwrap();
    }
    let calls: Calls = Arc::default();
    let tally = Tally::new();
    let (c, t) = (calls.clone(), tally.clone());
    let sub = channel(&binder, config.clone())
        .sink::<Event>()
        .subscribe_batch(move |batch: Batch<Event>| {
            record_call(&c, &batch);
            for n in batch.payloads() {
                t.record(n.n);
            }
            async { Ok::<(), std::io::Error>(()) }
        })
        .await
        .unwrap();
    wait_until(caps.patience, "the 60 are handled", || tally.has_all(0..60)).await;
    sub.shutdown().await.unwrap();
    tally.assert_complete("batch_handler_gets_full_batches_in_key_order", 0..60);
    let calls = calls.lock().unwrap().clone();
    let largest = calls.iter().map(Vec::len).max().unwrap_or(0);
    assert_eq!(
        largest, 10,
        "a backlog fills batches up to batch-size: {calls:?}"
    );
    assert!(calls.iter().all(|c| !c.is_empty()), "no empty batch");
    let mut last: HashMap<String, u64> = HashMap::new();
    for (n, key, _) in calls.iter().flatten() {
        if let Some(before) = last.insert(key.clone(), *n) {
            assert!(before < *n, "key {key}: {n} after {before}: {calls:?}");
        }
    }
}

/// A batch handler that names the failed items: only those are retried (before anything
/// newer), each by its own error (a rejected item is dead-lettered at once), and an item
/// that succeeded behind a failed item of its key waits for it, so each key finishes in
/// order.
pub async fn batch_items_fail_alone_and_keys_stay_in_order(h: &dyn Harness) {
    let caps = h.capabilities();
    let binder = h.binder().await;
    let dest = unique("batch-fail");
    let config = test_binding(&dest, &caps)
        .group(unique("g"))
        .batch(10, Duration::from_millis(200));
    let source = channel(&binder, config.clone())
        .source::<Event>()
        .await
        .unwrap();
    let messages = (0..20)
        .map(|n| Ok(source.encode(&ev(n))?.with_key(format!("k{}", n % 4))))
        .collect::<crate::Result<Vec<_>>>()
        .unwrap();
    source.send_messages(messages).await.unwrap();
    let calls: Calls = Arc::default();
    // The item outcomes the handler reported, in order: (n, succeeded).
    let reported: Arc<Mutex<Vec<(u64, bool)>>> = Arc::default();
    let (c, r) = (calls.clone(), reported.clone());
    let sub = channel(&binder, config.clone())
        .sink::<Event>()
        .subscribe_batch(move |batch: Batch<Event>| {
            record_call(&c, &batch);
            let mut failed = BatchError::new();
            let mut reported = r.lock().unwrap();
            for (index, e) in batch.items().iter().enumerate() {
                let n = e.payload().n;
                if n == 7 {
                    failed.fail(index, HandlerError::reject("item 7 is invalid"));
                    reported.push((n, false));
                } else if n % 5 == 0 && e.attempt() == 1 {
                    failed.fail(index, format!("item {n} conflicted"));
                    reported.push((n, false));
                } else {
                    reported.push((n, true));
                }
            }
            async move {
                if failed.is_empty() {
                    Ok(())
                } else {
                    Err(failed)
                }
            }
        })
        .await
        .unwrap();
    let dead = read_dead_letters(h, &binder, &config.dead_letter_destination(), 1).await;
    let expected: Vec<u64> = (0..20).filter(|n| *n != 7).collect();
    wait_until(caps.patience, "every item but 7 succeeded", || {
        let reported = reported.lock().unwrap();
        expected.iter().all(|n| reported.contains(&(*n, true)))
    })
    .await;
    sub.shutdown().await.unwrap();

    assert_eq!(number(&dead[0]), 7);
    assert_eq!(dead[0].headers().get(header::ERROR_KIND), Some("rejected"));
    assert_eq!(
        dead[0].headers().get(header::ERROR),
        Some("item 7 is invalid")
    );
    let calls = calls.lock().unwrap().clone();
    // Which items a call must hand on to the next: the failed ones (not 7) and those behind
    // a failed one of their key.
    for (i, call) in calls.iter().enumerate() {
        let mut failed_keys = std::collections::HashSet::new();
        let mut carried = Vec::new();
        for (n, key, attempt) in call {
            let failed = *n != 7 && n % 5 == 0 && *attempt == 1;
            if failed {
                failed_keys.insert(key.clone());
                carried.push(*n);
            } else if failed_keys.contains(key) {
                carried.push(*n);
            }
        }
        if carried.is_empty() {
            continue;
        }
        let next: Vec<u64> = calls
            .get(i + 1)
            .unwrap_or_else(|| panic!("call {i} left {carried:?} to retry: {calls:?}"))
            .iter()
            .map(|(n, _, _)| *n)
            .collect();
        assert_eq!(
            next, carried,
            "the retry carries exactly the failed items and those behind them: {calls:?}"
        );
    }
    // Every item but 7 ran once, or twice if it was carried; none ran more.
    let mut runs: HashMap<u64, usize> = HashMap::new();
    for (n, _, _) in calls.iter().flatten() {
        *runs.entry(*n).or_default() += 1;
    }
    assert!(runs.values().all(|r| *r <= 2), "{calls:?}");
    // The last success of each item, in order, keeps each key's order.
    let reported = reported.lock().unwrap().clone();
    let mut finished: Vec<u64> = Vec::new();
    for (n, ok) in reported.iter().rev() {
        if *ok && !finished.contains(n) {
            finished.push(*n);
        }
    }
    finished.reverse();
    let mut last: HashMap<u64, u64> = HashMap::new();
    for n in finished {
        if let Some(before) = last.insert(n % 4, n) {
            assert!(
                before < n,
                "key k{}: {n} finished after {before}: {calls:?}",
                n % 4
            );
        }
    }
}

/// A batch that fails as a whole is retried as a whole, and each of its messages is
/// dead-lettered with the batch's error once its attempts are used up.
pub async fn failed_batches_dead_letter_each_message(h: &dyn Harness) {
    let caps = h.capabilities();
    let binder = h.binder().await;
    let dest = unique("batch-dead");
    let config = test_binding(&dest, &caps)
        .group(unique("g"))
        .batch(10, Duration::from_millis(200))
        .retry(RetryConfig {
            max_attempts: 2,
            ..test_binding(&dest, &caps).retry
        });
    let source = channel(&binder, config.clone())
        .source::<Event>()
        .await
        .unwrap();
    source.send_batch(&[ev(1), ev(2), ev(3)]).await.unwrap();
    let calls: Calls = Arc::default();
    let c = calls.clone();
    let sub = channel(&binder, config.clone())
        .sink::<Event>()
        .subscribe_batch(move |batch: Batch<Event>| {
            record_call(&c, &batch);
            async { Err::<(), _>(std::io::Error::other("the database is down")) }
        })
        .await
        .unwrap();
    let dead = read_dead_letters(h, &binder, &config.dead_letter_destination(), 3).await;
    sub.shutdown().await.unwrap();
    let mut numbers: Vec<u64> = dead.iter().map(number).collect();
    numbers.sort_unstable();
    assert_eq!(numbers, vec![1, 2, 3]);
    for letter in &dead {
        assert_eq!(letter.headers().get(header::ATTEMPTS), Some("2"));
        assert_eq!(
            letter.headers().get(header::ERROR),
            Some("the database is down")
        );
        assert_eq!(letter.headers().get(header::ERROR_KIND), Some("handler"));
    }
    let calls = calls.lock().unwrap().clone();
    let attempts: Vec<u32> = calls.iter().flatten().map(|(_, _, a)| *a).collect();
    assert_eq!(attempts.iter().filter(|a| **a == 1).count(), 3, "{calls:?}");
    assert_eq!(attempts.iter().filter(|a| **a == 2).count(), 3, "{calls:?}");
}

/// A processor publishes what its function returns (nothing, one or many) with the input's
/// key and id, and acknowledges the input only after the broker accepted them: a publish
/// that fails is a failed attempt, retried, and no input is lost.
pub async fn processor_publishes_then_acknowledges(h: &dyn Harness) {
    let caps = h.capabilities();
    let binder = h.binder().await;
    let input = unique("proc-in");
    let output = unique("proc-out");
    let in_config = test_binding(&input, &caps).group(unique("g"));
    // The output's first two publishes fail as an unreachable broker's would.
    let flaky: Arc<dyn Binder> = Arc::new(FailingSends::new(binder.clone(), 2));
    let out_source = channel(&flaky, test_binding(&output, &caps))
        .source::<Event>()
        .await
        .unwrap();
    let attempts: Arc<Mutex<Vec<(u64, u32)>>> = Arc::default();
    let input_ids: Arc<Mutex<HashMap<u64, String>>> = Arc::default();
    let (a, i) = (attempts.clone(), input_ids.clone());
    let sub = channel(&binder, in_config.clone())
        .sink::<Event>()
        .process_envelope(out_source, move |e: Envelope<Event>| {
            a.lock().unwrap().push((e.payload().n, e.attempt()));
            let id = e.message().message_id().expect("a source sets message ids");
            i.lock().unwrap().insert(e.payload().n, id.to_owned());
            let n = e.payload().n;
            async move {
                // Odd inputs give nothing; even ones two outputs, the second keyed anew.
                let outputs = if n % 2 == 1 {
                    vec![]
                } else {
                    vec![
                        Output::new(ev(n * 10)),
                        Output::new(ev(n * 10 + 1)).key(format!("split-{n}")),
                    ]
                };
                Ok::<_, std::io::Error>(outputs)
            }
        })
        .await
        .unwrap();
    let source = channel(&binder, in_config.clone())
        .source::<Event>()
        .await
        .unwrap();
    let mut ids = HashMap::new();
    for n in 0..10 {
        ids.insert(
            n,
            source
                .send_keyed(format!("order-{n}"), &ev(n))
                .await
                .unwrap(),
        );
    }
    let reader = raw_consumer(&binder, &output, &unique("reader"), &caps).await;
    let got = receive_at_least(&*reader, 10, caps.patience).await;
    ack_all(&*reader, &got).await;
    reader.close().await.unwrap();
    wait_until(caps.patience, "every input was processed", || {
        let attempts = attempts.lock().unwrap();
        (0..10).all(|n| attempts.iter().any(|(m, _)| *m == n))
    })
    .await;
    sub.shutdown().await.unwrap();

    let mut outputs: HashMap<u64, usize> = HashMap::new();
    for received in &got {
        let message = &received.message;
        let n = number(message);
        *outputs.entry(n).or_default() += 1;
        let input = n / 10;
        assert_eq!(
            message.headers().get(header::INPUT_ID),
            Some(ids[&input].as_str())
        );
        let key = if n % 10 == 1 {
            format!("split-{input}")
        } else {
            format!("order-{input}")
        };
        assert_eq!(message.key(), Some(key.as_str()));
        let index = n % 10;
        assert_eq!(
            message.message_id().map(str::to_owned),
            Some(format!("{}/{index}", input_ids.lock().unwrap()[&input])),
            "an output's message id is its input's and its index: the same if processed again"
        );
    }
    let mut numbers: Vec<u64> = outputs.keys().copied().collect();
    numbers.sort_unstable();
    let expected: Vec<u64> = (0..10)
        .filter(|n| n % 2 == 0)
        .flat_map(|n| [n * 10, n * 10 + 1])
        .collect();
    assert_eq!(numbers, expected, "every output, none lost");
    let attempts = attempts.lock().unwrap().clone();
    let retried: Vec<u64> = attempts
        .iter()
        .filter(|(_, a)| *a > 1)
        .map(|(n, _)| *n)
        .collect();
    assert!(
        !retried.is_empty() && retried.iter().all(|n| n % 2 == 0),
        "the inputs whose publish failed ({SEND_FAILURE}) were attempted again: {attempts:?}"
    );
}

/// A pull-style delivery rejected with `Delivery::reject` is dead-lettered at once, and a
/// `HandlerError` given to `nack` works as it does for a handler.
pub async fn pulled_deliveries_can_be_rejected(h: &dyn Harness) {
    let caps = h.capabilities();
    let binder = h.binder().await;
    let dest = unique("pull-reject");
    let config = test_binding(&dest, &caps)
        .group(unique("g"))
        .retry(RetryConfig {
            max_attempts: 5,
            ..test_binding(&dest, &caps).retry
        });
    let mut deliveries = channel(&binder, config.clone())
        .sink::<Event>()
        .stream()
        .await
        .unwrap();
    let source = channel(&binder, config.clone())
        .source::<Event>()
        .await
        .unwrap();
    for n in 0..3 {
        source.send(&ev(n)).await.unwrap();
    }
    let mut attempts: Vec<(u64, u32)> = Vec::new();
    let tally = Tally::new();
    while !tally.has_all([2]) || attempts.len() < 3 {
        let delivery = tokio::time::timeout(caps.patience, deliveries.next())
            .await
            .expect("a delivery in time")
            .expect("the stream goes on")
            .expect("no error");
        let n = delivery.payload().n;
        attempts.push((n, delivery.attempt()));
        match n {
            0 => delivery.reject("not an order"),
            1 => delivery.nack(HandlerError::reject(std::io::Error::other(
                "unknown customer",
            ))),
            _ => {
                tally.record(n);
                delivery.ack();
            }
        }
    }
    let dead = read_dead_letters(h, &binder, &config.dead_letter_destination(), 2).await;
    deliveries.close().await.unwrap();
    assert_eq!(
        attempts.iter().filter(|(n, _)| *n < 2).count(),
        2,
        "one attempt each: {attempts:?}"
    );
    for letter in &dead {
        assert_eq!(letter.headers().get(header::ERROR_KIND), Some("rejected"));
        assert_eq!(letter.headers().get(header::ATTEMPTS), Some("1"));
        let want = if number(letter) == 0 {
            "not an order"
        } else {
            "unknown customer"
        };
        assert_eq!(letter.headers().get(header::ERROR), Some(want));
    }
    tally.assert_complete("pulled_deliveries_can_be_rejected", [2]);
}

/// A message keeps the id its producer gave it ([`header::MESSAGE_ID`]) through every
/// attempt and onto its dead-letter copy; a source gives each message its own, or the one
/// [`Source::identified_by`](crate::Source::identified_by) makes.
pub async fn message_ids_stay_with_their_message(h: &dyn Harness) {
    let caps = h.capabilities();
    let binder = h.binder().await;
    let dest = unique("message-id");
    let config = test_binding(&dest, &caps).group(unique("g"));
    // Per delivery: the number, the attempt and the message id.
    type Seen = Arc<Mutex<Vec<(u64, u32, Option<String>)>>>;
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let sub = channel(&binder, config.clone())
        .sink::<Event>()
        .subscribe_envelope(move |e: Envelope<Event>| {
            let (n, attempt) = (e.payload().n, e.attempt());
            s.lock()
                .unwrap()
                .push((n, attempt, e.message().message_id().map(str::to_owned)));
            async move {
                // 0 never succeeds, 1 succeeds on its second attempt.
                if n == 0 || (n == 1 && attempt == 1) {
                    Err("not yet")
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
    source.send(&ev(0)).await.unwrap();
    source.send(&ev(1)).await.unwrap();
    let named = channel(&binder, config.clone())
        .source::<Event>()
        .await
        .unwrap()
        .identified_by(|e: &Event| format!("event-{}", e.n));
    named.send(&ev(2)).await.unwrap();
    let dead = read_dead_letters(h, &binder, &config.dead_letter_destination(), 1).await;
    wait_until(caps.patience, "1 and 2 are handled", || {
        let seen = seen.lock().unwrap();
        seen.iter().any(|(n, a, _)| *n == 1 && *a == 2) && seen.iter().any(|(n, _, _)| *n == 2)
    })
    .await;
    sub.shutdown().await.unwrap();

    let seen = seen.lock().unwrap().clone();
    let ids_of = |m: u64| {
        seen.iter()
            .filter(|(n, _, _)| *n == m)
            .map(|(_, _, id)| id.clone().expect("every delivery has a message id"))
            .collect::<Vec<_>>()
    };
    for m in [0, 1] {
        let ids = ids_of(m);
        assert!(ids.len() >= 2, "{m} was attempted more than once: {seen:?}");
        assert!(
            ids.iter().all(|id| id == &ids[0]),
            "one id across attempts: {ids:?}"
        );
        assert_eq!(ids[0].len(), 36, "a UUID: {}", ids[0]);
    }
    assert_ne!(ids_of(0)[0], ids_of(1)[0], "each message has its own id");
    assert_eq!(ids_of(2), vec!["event-2".to_owned()]);
    assert_eq!(
        dead[0].message_id(),
        Some(ids_of(0)[0].as_str()),
        "the dead letter keeps it"
    );
}

/// An idempotent consumer (`dedup`) skips a message whose id its group already handled,
/// while a failed attempt is no handling (the retry runs), on the process's memory store
/// and on the binder's own store where it has one.
pub async fn dedup_skips_ids_its_group_handled(h: &dyn Harness) {
    let binder = h.binder().await;
    let mut stores: Vec<(&str, Arc<dyn crate::dedup::DedupStore>)> =
        vec![("memory", crate::dedup::MEMORY.clone())];
    if let Some(store) = binder.dedup_store() {
        stores.push((binder.kind(), store));
    }
    for (name, store) in stores {
        dedup_on_store(h, name, store).await;
    }
}

/// The case of [`dedup_skips_ids_its_group_handled`] on a given store (named `name` in the
/// binding's `dedup`), for store crates to run on every binder.
pub async fn dedup_on_store(h: &dyn Harness, name: &str, store: Arc<dyn crate::dedup::DedupStore>) {
    let binder = &h.binder().await;
    let caps = h.capabilities();
    let dest = unique("dedup");
    let config = test_binding(&dest, &caps)
        .group(unique("g"))
        .dedup(name, Duration::from_secs(3600));
    let handled: Arc<Mutex<Vec<(u64, u32)>>> = Arc::default();
    let seen = handled.clone();
    let sub = channel(binder, config.clone())
        .dedup_store(store)
        .sink::<Event>()
        .subscribe_envelope(move |e: Envelope<Event>| {
            let (n, attempt) = (e.payload().n, e.attempt());
            seen.lock().unwrap().push((n, attempt));
            async move {
                if n == 3 && attempt == 1 {
                    Err("not yet")
                } else {
                    Ok(())
                }
            }
        })
        .await
        .unwrap();
    // 1 and 2 share an id, as do 3 and 4: 2 and 4 are copies of handled messages.
    let source = channel(binder, config.clone())
        .source::<Event>()
        .await
        .unwrap()
        .identified_by(|e: &Event| format!("order-{}", e.n.div_ceil(2)));
    for n in 1..=5 {
        source.send_keyed("k", &ev(n)).await.unwrap();
    }
    wait_until(caps.patience, "the last message is handled", || {
        handled.lock().unwrap().iter().any(|(n, _)| *n == 5)
    })
    .await;
    sub.shutdown().await.unwrap();
    let handled = handled.lock().unwrap().clone();
    assert_eq!(
        handled,
        vec![(1, 1), (3, 1), (3, 2), (5, 1)],
        "on the {name} store: copies of handled ids skipped, the failed attempt retried"
    );
}
