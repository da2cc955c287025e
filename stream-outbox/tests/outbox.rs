//! The transactional outbox against a real PostgreSQL and every broker: what commits is
//! published, in commit order per key; what rolls back never is; relays share a table.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{connect, postgres, unique_table, wait_for, Placed, Seen};
use stream_core::Envelope;
use stream_outbox::{MemoryOutbox, Outbox, Relay, RelayConfig};

const PATIENCE: Duration = Duration::from_secs(60);

/// Subscribes `binding` of `streams`, recording what arrives.
async fn record(
    streams: &stream_core::Streams,
    binding: &str,
) -> (Arc<Mutex<Seen>>, stream_core::Subscription) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let recorder = seen.clone();
    let subscription = streams
        .sink::<Placed>(binding)
        .unwrap()
        .subscribe_envelope(move |envelope: Envelope<Placed>| {
            Seen::record(&recorder, &envelope);
            async { Ok::<(), std::io::Error>(()) }
        })
        .await
        .unwrap();
    (seen, subscription)
}

async fn count_rows(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_write_is_never_published() {
    let Some(url) = postgres() else { return };
    for broker in common::brokers() {
        let mut client = connect(&url).await;
        let outbox = Outbox::with_table(&unique_table("outbox")).unwrap();
        outbox.install(&client).await.unwrap();
        let (streams, _) = common::streams(&broker);
        let (seen, subscription) = record(&streams, "audit").await;
        let relay = Relay::new(outbox.reader(&url).unwrap(), streams.clone()).spawn();

        let tx = client.transaction().await.unwrap();
        let rolled_back = outbox
            .send(
                &tx,
                "orders-out",
                "a",
                &Placed {
                    key: "a".into(),
                    n: 0,
                },
            )
            .await
            .unwrap();
        tx.rollback().await.unwrap();
        let tx = client.transaction().await.unwrap();
        let committed = outbox
            .send(
                &tx,
                "orders-out",
                "b",
                &Placed {
                    key: "b".into(),
                    n: 0,
                },
            )
            .await
            .unwrap();
        tx.commit().await.unwrap();

        wait_for(PATIENCE, "the committed event arrives", || {
            seen.lock().unwrap().by_id.contains_key(&committed)
        })
        .await;
        relay.shutdown().await.unwrap();
        subscription.shutdown().await.unwrap();
        {
            let seen = seen.lock().unwrap();
            assert!(
                !seen.by_id.contains_key(&rolled_back),
                "{}: the rolled-back event was published",
                broker.name
            );
            assert_eq!(seen.distinct(), 1, "{}", broker.name);
        }
        let table = outbox.table();
        assert_eq!(
            count_rows(&client, &format!("SELECT count(*) FROM {table}")).await,
            1,
            "{}: only the committed row exists",
            broker.name
        );
        assert_eq!(
            count_rows(
                &client,
                &format!("SELECT count(*) FROM {table} WHERE sent_at IS NOT NULL")
            )
            .await,
            1,
            "{}: and it is marked sent",
            broker.name
        );
        streams.close().await.unwrap();
    }
}

/// Two transactions write one key; the first commits last if nothing stops it. `send`
/// makes the second wait for the first, so the order the events are published in is the
/// order the transactions committed in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_writer_of_a_key_waits_so_events_go_out_in_commit_order() {
    let Some(url) = postgres() else { return };
    let broker = &common::brokers()[0];
    let mut first_client = connect(&url).await;
    let watcher = connect(&url).await;
    let outbox = Outbox::with_table(&unique_table("outbox")).unwrap();
    outbox.install(&first_client).await.unwrap();

    let first = first_client.transaction().await.unwrap();
    outbox
        .send(
            &first,
            "orders-out",
            "k",
            &Placed {
                key: "k".into(),
                n: 0,
            },
        )
        .await
        .unwrap();
    let committed_second = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let second = tokio::spawn({
        let (url, outbox, committed) = (url.clone(), outbox.clone(), committed_second.clone());
        async move {
            let mut client = connect(&url).await;
            let tx = client.transaction().await.unwrap();
            outbox
                .send(
                    &tx,
                    "orders-out",
                    "k",
                    &Placed {
                        key: "k".into(),
                        n: 1,
                    },
                )
                .await
                .unwrap();
            tx.commit().await.unwrap();
            committed.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    });
    // The second writer is blocked on the key's lock.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let waiting = count_rows(
            &watcher,
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'advisory'",
        )
        .await;
        if waiting > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the second writer never waited"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!committed_second.load(std::sync::atomic::Ordering::SeqCst));
    first.commit().await.unwrap();
    second.await.unwrap();

    let (streams, _) = common::streams(broker);
    let (seen, subscription) = record(&streams, "audit").await;
    let relay = Relay::new(outbox.reader(&url).unwrap(), streams.clone()).spawn();
    wait_for(PATIENCE, "both events arrive", || {
        seen.lock().unwrap().distinct() == 2
    })
    .await;
    relay.shutdown().await.unwrap();
    subscription.shutdown().await.unwrap();
    assert_eq!(seen.lock().unwrap().by_key["k"], vec![0, 1]);
}

/// Two relays on one table, while writers commit: every event arrives once, each key's in
/// order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_publish_each_event_once_and_in_order() {
    let Some(url) = postgres() else { return };
    const KEYS: u64 = 20;
    const TRANSACTIONS: u64 = 40;
    const PER_TRANSACTION: u64 = 50;
    for broker in common::brokers() {
        let mut client = connect(&url).await;
        let outbox = Outbox::with_table(&unique_table("outbox")).unwrap();
        outbox.install(&client).await.unwrap();
        let (streams, _) = common::streams(&broker);
        let (seen, subscription) = record(&streams, "audit").await;
        let config = RelayConfig {
            batch_size: 100,
            ..RelayConfig::default()
        };
        let relays = [
            Relay::new(outbox.reader(&url).unwrap(), streams.clone())
                .with_config(config.clone())
                .spawn(),
            Relay::new(outbox.reader(&url).unwrap(), streams.clone())
                .with_config(config)
                .spawn(),
        ];
        let mut next = [0u64; KEYS as usize];
        for t in 0..TRANSACTIONS {
            let tx = client.transaction().await.unwrap();
            for i in 0..PER_TRANSACTION {
                let k = ((t * PER_TRANSACTION + i) * 7 % KEYS) as usize;
                let event = Placed {
                    key: format!("k{k}"),
                    n: next[k],
                };
                next[k] += 1;
                outbox
                    .send(&tx, "orders-out", &event.key, &event)
                    .await
                    .unwrap();
            }
            tx.commit().await.unwrap();
        }
        let total = (TRANSACTIONS * PER_TRANSACTION) as usize;
        wait_for(PATIENCE, "every event arrives", || {
            seen.lock().unwrap().distinct() == total
        })
        .await;
        for relay in relays {
            relay.shutdown().await.unwrap();
        }
        subscription.shutdown().await.unwrap();
        {
            let seen = seen.lock().unwrap();
            assert_eq!(seen.distinct(), total, "{}: lost", broker.name);
            assert_eq!(seen.duplicates(), 0, "{}: published twice", broker.name);
            seen.first_arrivals_in_order()
                .unwrap_or_else(|e| panic!("{}: {e}", broker.name));
        }
        let table = outbox.table();
        assert_eq!(
            count_rows(
                &client,
                &format!("SELECT count(*) FROM {table} WHERE sent_at IS NULL")
            )
            .await,
            0,
            "{}",
            broker.name
        );
        streams.close().await.unwrap();
    }
}

/// An event whose binding does not exist is kept, marked failed with the reason, and the
/// events after it still go out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_that_can_never_be_published_is_kept_failed_and_holds_up_nothing() {
    let Some(url) = postgres() else { return };
    let mut client = connect(&url).await;
    let outbox = Outbox::with_table(&unique_table("outbox")).unwrap();
    outbox.install(&client).await.unwrap();
    let (streams, _) = common::streams(&common::brokers()[0]);
    let (seen, subscription) = record(&streams, "audit").await;
    let tx = client.transaction().await.unwrap();
    outbox
        .send(
            &tx,
            "no-such-binding",
            "k",
            &Placed {
                key: "k".into(),
                n: 0,
            },
        )
        .await
        .unwrap();
    let oversized = stream_core::Message::new(vec![b'x'; 2 << 20]).with_key("k");
    outbox
        .send_message(&tx, "orders-out", oversized)
        .await
        .unwrap();
    let fine = outbox
        .send(
            &tx,
            "orders-out",
            "k",
            &Placed {
                key: "k".into(),
                n: 0,
            },
        )
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let relay = Relay::new(outbox.reader(&url).unwrap(), streams.clone()).spawn();
    wait_for(PATIENCE, "the publishable event arrives", || {
        seen.lock().unwrap().by_id.contains_key(&fine)
    })
    .await;
    relay.shutdown().await.unwrap();
    subscription.shutdown().await.unwrap();
    let failures: Vec<String> = client
        .query(
            &format!(
                "SELECT failure FROM {} WHERE failure IS NOT NULL ORDER BY seq",
                outbox.table()
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(failures.len(), 2, "{failures:?}");
    assert!(failures[0].contains("no-such-binding"), "{failures:?}");
    assert!(failures[1].contains("max-payload-bytes"), "{failures:?}");
}

/// Sent events are deleted once older than `keep-sent`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sent_events_are_removed_on_schedule() {
    let Some(url) = postgres() else { return };
    let mut client = connect(&url).await;
    let outbox = Outbox::with_table(&unique_table("outbox")).unwrap();
    outbox.install(&client).await.unwrap();
    let (streams, _) = common::streams(&common::brokers()[0]);
    let tx = client.transaction().await.unwrap();
    for n in 0..10 {
        outbox
            .send(&tx, "orders-out", "k", &Placed { key: "k".into(), n })
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    let relay = Relay::new(outbox.reader(&url).unwrap(), streams)
        .with_config(RelayConfig {
            keep_sent: Duration::ZERO,
            cleanup_interval: Duration::from_millis(50),
            ..RelayConfig::default()
        })
        .spawn();
    let count = format!("SELECT count(*) FROM {}", outbox.table());
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while count_rows(&client, &count).await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "sent rows were never removed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    relay.shutdown().await.unwrap();
}

/// The memory outbox keeps the contract: dropped transactions publish nothing, committed
/// ones publish in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_outbox_publishes_committed_events_in_order() {
    let broker = &common::brokers()[0];
    let (streams, _) = common::streams(broker);
    let (seen, subscription) = record(&streams, "audit").await;
    let outbox = MemoryOutbox::new();
    let relay = Relay::new(outbox.clone(), streams.clone()).spawn();
    let mut dropped = outbox.transaction();
    let never = dropped
        .send(
            "orders-out",
            "k",
            &Placed {
                key: "k".into(),
                n: 0,
            },
        )
        .unwrap();
    drop(dropped);
    for n in 0..100 {
        let mut tx = outbox.transaction();
        tx.send("orders-out", "k", &Placed { key: "k".into(), n })
            .unwrap();
        tx.commit();
    }
    wait_for(PATIENCE, "every event arrives", || {
        seen.lock().unwrap().distinct() == 100
    })
    .await;
    relay.shutdown().await.unwrap();
    subscription.shutdown().await.unwrap();
    let seen = seen.lock().unwrap();
    assert!(!seen.by_id.contains_key(&never));
    assert_eq!(seen.by_key["k"], (0..100).collect::<Vec<_>>());
    assert_eq!(outbox.unsent(), 0);
}

/// `send_all`: one statement, rows numbered in the order given, locks taken in one order
/// (a second writer of the same keys waits, whatever order it lists them in), and a
/// rollback takes every row back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_all_keeps_order_waits_for_the_keys_and_rolls_back_whole() {
    let Some(url) = postgres() else { return };
    let mut first_client = connect(&url).await;
    let watcher = connect(&url).await;
    let outbox = Outbox::with_table(&unique_table("outbox")).unwrap();
    outbox.install(&first_client).await.unwrap();
    let event = |key: &str, n| Placed { key: key.into(), n };

    let rolled_back = first_client.transaction().await.unwrap();
    let (x0, x1) = (event("x", 0), event("x", 1));
    let never = outbox
        .send_all(&rolled_back, "orders-out", [("x", &x0), ("x", &x1)])
        .await
        .unwrap();
    rolled_back.rollback().await.unwrap();

    let first = first_client.transaction().await.unwrap();
    let (b0, a0, a1) = (event("b", 0), event("a", 0), event("a", 1));
    outbox
        .send_all(&first, "orders-out", [("b", &b0), ("a", &a0), ("a", &a1)])
        .await
        .unwrap();
    let second = tokio::spawn({
        let (url, outbox) = (url.clone(), outbox.clone());
        async move {
            let mut client = connect(&url).await;
            let tx = client.transaction().await.unwrap();
            let (a2, b1) = (event("a", 2), event("b", 1));
            outbox
                .send_all(&tx, "orders-out", [("a", &a2), ("b", &b1)])
                .await
                .unwrap();
            tx.commit().await.unwrap();
        }
    });
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while count_rows(
        &watcher,
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'advisory'",
    )
    .await
        == 0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the second writer never waited"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.commit().await.unwrap();
    second.await.unwrap();

    let (streams, _) = common::streams(&common::brokers()[0]);
    let (seen, subscription) = record(&streams, "audit").await;
    let relay = Relay::new(outbox.reader(&url).unwrap(), streams.clone()).spawn();
    wait_for(PATIENCE, "five events arrive", || {
        seen.lock().unwrap().distinct() == 5
    })
    .await;
    relay.shutdown().await.unwrap();
    subscription.shutdown().await.unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.by_key["a"], vec![0, 1, 2]);
    assert_eq!(seen.by_key["b"], vec![0, 1]);
    assert!(never.iter().all(|id| !seen.by_id.contains_key(id)));
}
