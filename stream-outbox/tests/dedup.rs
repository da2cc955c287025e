//! The PostgreSQL dedup store against a real database and every broker.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use common::{connect, postgres, unique_table, wait_for, Placed};
use stream_core::testing::{dedup_on_store, Capabilities, Harness};
use stream_core::{Binder, BoxError, Envelope, Streams};
use stream_outbox::{PgDedup, PgDedupConfig, Tx};

const PATIENCE: Duration = Duration::from_secs(60);

/// A broker of the tests as a conformance harness.
struct Broker {
    streams: Streams,
    capabilities: Capabilities,
}

#[async_trait]
impl Harness for Broker {
    async fn binder(&self) -> Arc<dyn Binder> {
        self.streams.binder("broker").unwrap()
    }

    fn capabilities(&self) -> Capabilities {
        self.capabilities.clone()
    }
}

async fn store(url: &str) -> PgDedup {
    PgDedup::connect_with(
        url,
        PgDedupConfig {
            table: unique_table("dedup"),
            ..PgDedupConfig::default()
        },
    )
    .await
    .unwrap()
}

/// Every store (memory, Redis, PostgreSQL) on every broker (memory, Redis, Kafka): a copy of
/// a handled message is dropped, a failed attempt is no handling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_store_drops_redeliveries_on_every_broker() {
    let Some(url) = postgres() else { return };
    let mut stores: Vec<(&str, Arc<dyn stream_core::dedup::DedupStore>)> = vec![
        (
            "memory",
            Arc::new(stream_core::dedup::MemoryDedup::default()),
        ),
        ("postgres", Arc::new(store(&url).await)),
    ];
    if let Some(redis) = stream_core::testing::service_env("STREAM_TEST_REDIS_URL") {
        let binder =
            binder_redis::RedisBinder::new(binder_redis::RedisConfig::with_url(redis)).unwrap();
        stores.push(("redis", binder.dedup_store().expect("Redis keeps ids")));
    }
    for broker in common::brokers() {
        let (streams, _) = common::streams(&broker);
        let capabilities = match broker.name {
            "kafka" => Capabilities::default()
                .counts_deliveries(false)
                .patience(Duration::from_secs(45)),
            _ => Capabilities::default(),
        };
        let harness = Broker {
            streams,
            capabilities,
        };
        for (name, store) in &stores {
            eprintln!("dedup store {name} on broker {}", broker.name);
            dedup_on_store(&harness, name, store.clone()).await;
        }
    }
}

/// The handler's writes and the mark commit together: a failed attempt leaves no effect,
/// and a copy of a handled message makes none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_writes_in_the_transaction_that_marks_its_message() {
    let Some(url) = postgres() else { return };
    for broker in common::brokers() {
        let client = connect(&url).await;
        let effects = unique_table("effects");
        client
            .batch_execute(&format!(
                "CREATE TABLE {effects} (key text, n bigint, PRIMARY KEY (key, n))"
            ))
            .await
            .unwrap();
        let dedup = store(&url).await;
        let (streams, _) = common::streams(&broker);
        let calls = Arc::new(AtomicUsize::new(0));
        let (insert, counted) = (
            format!("INSERT INTO {effects} (key, n) VALUES ($1, $2)"),
            calls.clone(),
        );
        let sink = streams.sink::<Placed>("orders-in").unwrap();
        let subscription = dedup
            .subscribe(
                &sink,
                Duration::from_secs(3600),
                move |e: Envelope<Placed>, tx: Tx| {
                    let insert = insert.clone();
                    let call = counted.fetch_add(1, Ordering::SeqCst);
                    async move {
                        let event = e.payload();
                        tx.execute(&insert, &[&event.key, &(event.n as i64)])
                            .await?;
                        // The first attempt at n = 1 fails after writing: its row must vanish.
                        if event.n == 1 && e.attempt() == 1 {
                            return Err::<(), BoxError>(format!("call {call} fails").into());
                        }
                        Ok(())
                    }
                },
            )
            .await
            .unwrap();
        let source = streams
            .source::<Placed>("orders-out")
            .await
            .unwrap()
            .identified_by(|e: &Placed| format!("{}-{}", e.key, e.n));
        // Every event twice: the copy carries the same id.
        for n in 0..5 {
            let event = Placed { key: "k".into(), n };
            source.send_keyed("k", &event).await.unwrap();
            source.send_keyed("k", &event).await.unwrap();
        }
        let count = format!("SELECT count(*) FROM {effects}");
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let rows: i64 = client.query_one(&count, &[]).await.unwrap().get(0);
            if rows == 5 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{}: {rows} effects",
                broker.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Every delivery has been taken: five first copies (one retried), five copies.
        wait_for(PATIENCE, "the handler's calls settle", || {
            calls.load(Ordering::SeqCst) >= 6
        })
        .await;
        subscription.shutdown().await.unwrap();
        let rows: i64 = client.query_one(&count, &[]).await.unwrap().get(0);
        assert_eq!(rows, 5, "{}: one effect per id", broker.name);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            6,
            "{}: the handler ran for each id once, plus the failed attempt; copies skipped",
            broker.name
        );
        streams.close().await.unwrap();
    }
}

/// Two copies of one id handled at once by two members: the second claim waits for the
/// first transaction and then sees the id handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_handled_at_once_make_one_effect() {
    let Some(url) = postgres() else { return };
    let watcher = connect(&url).await;
    let dedup = store(&url).await;
    let (streams, _) = common::streams(&common::brokers()[0]);
    let calls = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Notify::new());
    let handled = Arc::new(Mutex::new(Vec::new()));
    let sink = streams.sink::<Placed>("orders-in").unwrap();
    let (counted, opened, done) = (calls.clone(), gate.clone(), handled.clone());
    let subscription = dedup
        .subscribe(
            &sink,
            Duration::from_secs(3600),
            move |e: Envelope<Placed>, _tx: Tx| {
                let (counted, opened, done) = (counted.clone(), opened.clone(), done.clone());
                async move {
                    counted.fetch_add(1, Ordering::SeqCst);
                    // Holds its transaction open until the test has seen the copy wait.
                    opened.notified().await;
                    done.lock().unwrap().push(e.payload().n);
                    Ok::<(), BoxError>(())
                }
            },
        )
        .await
        .unwrap();
    let source = streams.source::<Placed>("orders-out").await.unwrap();
    let message = source
        .encode(&Placed {
            key: "k".into(),
            n: 7,
        })
        .unwrap()
        .with_header(stream_core::header::MESSAGE_ID, "same-id");
    // Different keys, so the two copies are dispatched concurrently.
    source
        .send_message(message.clone().with_key("a"))
        .await
        .unwrap();
    source.send_message(message.with_key("b")).await.unwrap();
    wait_for(PATIENCE, "the first copy reaches the handler", || {
        calls.load(Ordering::SeqCst) == 1
    })
    .await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the copy never waited"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gate.notify_one();
    wait_for(PATIENCE, "the first copy is handled", || {
        handled.lock().unwrap().len() == 1
    })
    .await;
    subscription.shutdown().await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the copy was not handled");
}
