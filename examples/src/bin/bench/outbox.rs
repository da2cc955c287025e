//! Exactly-once effects (issue 16): the transactional outbox end to end, and what an
//! idempotent consumer's store costs per message.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use binder_memory::MemoryBinder;
use stream_core::dedup::{DedupStore, MemoryDedup};
use stream_core::{Binder, BindingConfig, Channel, Streams};
use stream_outbox::{Outbox, PgDedup, PgDedupConfig, Relay, RelayConfig};
use tokio_postgres::{Client, NoTls};

use crate::report::{compare_timed, subscribe_counting, Payload, Report, Row, Settings};

/// Events per transaction in the outbox rows: an order and a few events is a transaction
/// of a few rows; a hundred keeps the commit cost from dominating either side.
const PER_TRANSACTION: usize = 100;
/// Payload size of these rows.
const SIZE: usize = 64;
/// Handlers at once in the dedup rows (and ids in flight in their store rows): a store is a
/// round trip away, so a consumer that deduplicates runs several handlers at once.
const CONCURRENCY: usize = 16;

async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .expect("PostgreSQL answers");
    tokio::spawn(connection);
    client
}

fn fresh(prefix: &str) -> String {
    format!("{prefix}_{}", stream_core::unique_suffix())
}

/// Outbox events per second from the first write to the last delivery: `n` events written
/// with `Outbox::send`, one await each, in transactions of [`PER_TRANSACTION`], while a
/// relay (batches of 500) publishes them and a consumer counts them. The raw side is the
/// ceiling of that pipeline in the same run: the same rows INSERTed by tokio-postgres
/// pipelined within each transaction, and the broker's raw client publishing the same
/// payloads (`raw_publish`); a pipeline moves no faster than its slower half, so the raw
/// value is `n / max(time of each half)`.
pub async fn outbox_row<P, PF>(
    settings: &Settings,
    report: &mut Report,
    name: &'static str,
    binder: Arc<dyn Binder>,
    postgres: &str,
    n: usize,
    mut raw_publish: P,
) where
    P: FnMut(usize) -> PF,
    PF: Future<Output = (usize, Duration)>,
{
    for (metric, writer) in [
        ("outbox send, end to end", Writer::OneByOne),
        ("outbox send_all, end to end", Writer::PerTransaction),
        ("outbox relay, backlog", Writer::Before),
    ] {
        let (ours, raw) = compare_timed(
            settings.runs,
            || outbox_end_to_end(binder.clone(), postgres, n, writer),
            || {
                let publish = raw_publish(n);
                async move {
                    let (_, published) = publish.await;
                    if writer == Writer::Before {
                        // The rows are written before the clock starts: only the broker.
                        return (n, published);
                    }
                    let (_, inserts) = raw_inserts(postgres, n).await;
                    (n, inserts.max(published))
                }
            },
        )
        .await;
        report.add(Row::ratio(name, metric, SIZE, ours, raw));
    }
}

/// How the events of an outbox run are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writer {
    /// `Outbox::send` per event, one await each, while the relay runs.
    OneByOne,
    /// `Outbox::send_all` per transaction, while the relay runs.
    PerTransaction,
    /// All committed before the relay starts (and the clock with it): the relay alone.
    Before,
}

async fn outbox_end_to_end(
    binder: Arc<dyn Binder>,
    postgres: &str,
    n: usize,
    writer: Writer,
) -> (usize, Duration) {
    let mut client = connect(postgres).await;
    let outbox = Outbox::with_table(&fresh("bench_outbox")).unwrap();
    outbox.install(&client).await.unwrap();
    let destination = format!("bench-outbox-{}", stream_core::unique_suffix());
    let streams = Streams::builder()
        .binder("broker", binder)
        .env(Vec::<(String, String)>::new())
        .load_str(&format!(
            "[bindings.out]\nbinder = \"broker\"\ndestination = \"{destination}\"\n\
             [bindings.in]\nbinder = \"broker\"\ndestination = \"{destination}\"\ngroup = \"g\"\n"
        ))
        .unwrap();
    // One message through first, untimed: a Kafka consumer joins its group, and the relay's
    // producer finds its topic, before the clock starts.
    let warmed = Arc::new(tokio::sync::Notify::new());
    let first = warmed.clone();
    let (subscription, done) =
        subscribe_counting(&streams.channel("in").unwrap(), n + 1, move |count| {
            if count == 1 {
                first.notify_one();
            }
        })
        .await;
    let value = Payload::of_size(SIZE);
    write(
        &mut client,
        &outbox,
        &["warm-up".to_owned()],
        &value,
        Writer::OneByOne,
    )
    .await;
    let warming = Relay::new(outbox.reader(postgres).unwrap(), streams.clone()).spawn();
    warmed.notified().await;
    warming.shutdown().await.unwrap();
    let keys: Vec<String> = (0..n).map(|i| (i % 64).to_string()).collect();
    if writer == Writer::Before {
        write(&mut client, &outbox, &keys, &value, writer).await;
    }
    let start = Instant::now();
    let relay = Relay::new(outbox.reader(postgres).unwrap(), streams.clone())
        .with_config(RelayConfig::default())
        .spawn();
    if writer != Writer::Before {
        write(&mut client, &outbox, &keys, &value, writer).await;
    }
    done.notified().await;
    let elapsed = start.elapsed();
    relay.shutdown().await.unwrap();
    subscription.shutdown().await.unwrap();
    client
        .batch_execute(&format!("DROP TABLE {}", outbox.table()))
        .await
        .unwrap();
    // The binder is the caller's, shared by every run: not closed here.
    (n, elapsed)
}

/// Writes one event per key, [`PER_TRANSACTION`] per transaction.
async fn write(
    client: &mut Client,
    outbox: &Outbox,
    keys: &[String],
    value: &Payload,
    writer: Writer,
) {
    for chunk in keys.chunks(PER_TRANSACTION) {
        let tx = client.transaction().await.unwrap();
        if writer == Writer::PerTransaction {
            let events = chunk.iter().map(|key| (key.as_str(), value));
            outbox.send_all(&tx, "out", events).await.unwrap();
        } else {
            for key in chunk {
                outbox.send(&tx, "out", key, value).await.unwrap();
            }
        }
        tx.commit().await.unwrap();
    }
}

/// The database half of the ceiling: the outbox's columns, INSERTed by tokio-postgres with
/// a prepared statement, every row of a transaction in flight at once (pipelined).
async fn raw_inserts(postgres: &str, n: usize) -> (usize, Duration) {
    let mut client = connect(postgres).await;
    let table = fresh("bench_raw");
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (seq bigserial PRIMARY KEY, binding text, message_key text,
             message_id text, payload bytea, sent_at timestamptz)"
        ))
        .await
        .unwrap();
    let payload = serde_json::to_vec(&Payload::of_size(SIZE)).unwrap();
    let insert = format!(
        "INSERT INTO {table} (binding, message_key, message_id, payload) VALUES ($1, $2, $3, $4)"
    );
    let start = Instant::now();
    for t in 0..n / PER_TRANSACTION {
        let tx = client.transaction().await.unwrap();
        let statement = tx.prepare(&insert).await.unwrap();
        let rows: Vec<(String, String)> = (0..PER_TRANSACTION)
            .map(|i| {
                (
                    ((t * PER_TRANSACTION + i) % 64).to_string(),
                    uuid_like(t * PER_TRANSACTION + i),
                )
            })
            .collect();
        let inserts = rows.iter().map(|(key, id)| {
            let (tx, statement, payload) = (&tx, &statement, &payload);
            async move { tx.execute(statement, &[&"out", key, id, payload]).await }
        });
        for result in futures::future::join_all(inserts).await {
            result.unwrap();
        }
        tx.commit().await.unwrap();
    }
    let elapsed = start.elapsed();
    client
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
    (n, elapsed)
}

fn uuid_like(n: usize) -> String {
    format!("00000000-0000-7000-8000-{n:012}")
}

/// Consume rates on the memory binder (so that the store is what differs) with each dedup
/// store against the same consumer without dedup, alternating, in the same run; the
/// difference of their inverses is the store's cost per message. Then each remote store
/// against its raw client doing the same check and mark for the same ids, pipelined.
pub async fn dedup_rows(
    settings: &Settings,
    report: &mut Report,
    redis: Option<(Arc<dyn Binder>, &str)>,
    postgres: Option<&str>,
    n: usize,
) {
    let mut stores: Vec<(&'static str, Arc<dyn DedupStore>)> =
        vec![("dedup: memory", Arc::new(MemoryDedup::default()))];
    if let Some((binder, _)) = &redis {
        stores.push(("dedup: redis", binder.dedup_store().expect("a Redis store")));
    }
    let pg = match postgres {
        Some(url) => Some(
            PgDedup::connect_with(
                url,
                PgDedupConfig {
                    table: fresh("bench_dedup"),
                    ..PgDedupConfig::default()
                },
            )
            .await
            .unwrap(),
        ),
        None => None,
    };
    if let Some(pg) = &pg {
        stores.push(("dedup: postgres", Arc::new(pg.clone())));
    }
    for (metric, store) in stores {
        let (ours, none) = compare_timed(
            settings.runs,
            || consume(n, Some(store.clone())),
            || consume(n, None),
        )
        .await;
        let cost = 1e6 / ours.median() - 1e6 / none.median();
        eprintln!("  {metric}: {cost:.2} µs per message over the consumer without dedup");
        report.add(Row::ratio("memory", metric, SIZE, ours, none));
    }
    if let Some(pg) = &pg {
        let (ours, none) = compare_timed(
            settings.runs,
            || consume_in_transactions(pg, n),
            || consume(n, None),
        )
        .await;
        let cost = 1e6 / ours.median() - 1e6 / none.median();
        eprintln!("  dedup: postgres, handler's transaction: {cost:.2} µs per message");
        report.add(Row::ratio("memory", "dedup: postgres tx", SIZE, ours, none));
    }
    if let Some((binder, url)) = &redis {
        let store = binder.dedup_store().expect("a Redis store");
        let (ours, raw) = compare_timed(
            settings.runs,
            || store_ops(store.clone(), n),
            || raw_redis_ops(url, n),
        )
        .await;
        report.add(Row::ratio("redis", "dedup check+mark", 0, ours, raw));
    }
    if let (Some(pg), Some(url)) = (&pg, postgres) {
        let (ours, raw) = compare_timed(
            settings.runs,
            || store_ops(Arc::new(pg.clone()), n),
            || raw_postgres_ops(url, n),
        )
        .await;
        report.add(Row::ratio("postgres", "dedup check+mark", 0, ours, raw));
    }
}

/// `n` messages published to a memory destination, then consumed by a no-op handler,
/// [`CONCURRENCY`] at once, behind `store` if given.
async fn consume(n: usize, store: Option<Arc<dyn DedupStore>>) -> (usize, Duration) {
    let binder: Arc<dyn Binder> = Arc::new(MemoryBinder::new());
    let destination = format!("bench-dedup-{}", stream_core::unique_suffix());
    let mut config = BindingConfig::new(&destination)
        .group("g")
        .concurrency(CONCURRENCY);
    if store.is_some() {
        config = config.dedup("bench", Duration::from_secs(3600));
    }
    let mut channel = Channel::new("bench", binder, config);
    if let Some(store) = store {
        channel = channel.dedup_store(store);
    }
    publish(&channel, n).await;
    let start = Instant::now();
    let (subscription, done) = subscribe_counting(&channel, n, |_| {}).await;
    done.notified().await;
    let elapsed = start.elapsed();
    subscription.shutdown().await.unwrap();
    (n, elapsed)
}

/// Like [`consume`], each message handled in the transaction that claims its id.
async fn consume_in_transactions(dedup: &PgDedup, n: usize) -> (usize, Duration) {
    let binder: Arc<dyn Binder> = Arc::new(MemoryBinder::new());
    let destination = format!("bench-dedup-{}", stream_core::unique_suffix());
    let config = BindingConfig::new(&destination)
        .group("g")
        .concurrency(CONCURRENCY);
    let channel = Channel::new("bench", binder, config);
    publish(&channel, n).await;
    let handled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let done = Arc::new(tokio::sync::Notify::new());
    let (count, finished) = (handled.clone(), done.clone());
    let start = Instant::now();
    let subscription = dedup
        .subscribe(
            &channel.sink::<Payload>(),
            Duration::from_secs(3600),
            move |_: stream_core::Envelope<Payload>, _tx: stream_outbox::Tx| {
                if count.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1 == n {
                    finished.notify_one();
                }
                async { Ok::<(), stream_core::BoxError>(()) }
            },
        )
        .await
        .unwrap();
    done.notified().await;
    let elapsed = start.elapsed();
    subscription.shutdown().await.unwrap();
    (n, elapsed)
}

async fn publish(channel: &Channel, n: usize) {
    let source = channel.source::<Payload>().await.unwrap();
    let batch = vec![Payload::of_size(SIZE); 500];
    let mut sent = 0;
    while sent < n {
        let k = (n - sent).min(500);
        source.send_batch(&batch[..k]).await.unwrap();
        sent += k;
    }
}

/// The store as the dedup layer drives it: per id a check, then a mark, [`CONCURRENCY`]
/// ids at a time.
async fn store_ops(store: Arc<dyn DedupStore>, n: usize) -> (usize, Duration) {
    use futures::StreamExt;
    let scope = fresh("bench");
    let start = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let (store, scope) = (store.clone(), scope.clone());
            async move {
                let id = uuid_like(i);
                assert!(!store.handled(&scope, &id).await.unwrap());
                store
                    .mark(&scope, &id, Duration::from_secs(3600))
                    .await
                    .unwrap();
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<()>>()
        .await;
    (n, start.elapsed())
}

/// The same commands with redis-rs by hand, 500 ids a pipeline.
async fn raw_redis_ops(url: &str, n: usize) -> (usize, Duration) {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let scope = fresh("bench-raw");
    let start = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let mut pipe = redis::pipe();
        for i in chunk {
            let key = format!("stream:dedup:{scope}:{}", uuid_like(*i));
            pipe.cmd("EXISTS").arg(&key);
            pipe.cmd("SET")
                .arg(&key)
                .arg(1)
                .arg("PX")
                .arg(3_600_000)
                .ignore();
        }
        let _: Vec<i64> = pipe.query_async(&mut conn).await.unwrap();
    }
    (n, start.elapsed())
}

/// The same statements with tokio-postgres by hand, prepared, 500 ids in flight on one
/// connection (pipelined).
async fn raw_postgres_ops(url: &str, n: usize) -> (usize, Duration) {
    let client = connect(url).await;
    let table = fresh("bench_raw_dedup");
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} (scope text, message_id text, expires_at timestamptz,
             PRIMARY KEY (scope, message_id))"
        ))
        .await
        .unwrap();
    let check = client
        .prepare(&format!(
            "SELECT 1 FROM {table} WHERE scope = $1 AND message_id = $2 AND expires_at > now()"
        ))
        .await
        .unwrap();
    let mark = client
        .prepare(&format!(
            "INSERT INTO {table} VALUES ($1, $2, now() + interval '1 hour')
             ON CONFLICT (scope, message_id) DO UPDATE SET expires_at = EXCLUDED.expires_at"
        ))
        .await
        .unwrap();
    let start = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let ids: Vec<String> = chunk.iter().map(|i| uuid_like(*i)).collect();
        let ops = ids.iter().map(|id| {
            let (client, check, mark) = (&client, &check, &mark);
            async move {
                assert!(client.query(check, &[&"s", id]).await.unwrap().is_empty());
                client.execute(mark, &[&"s", id]).await.unwrap();
            }
        });
        futures::future::join_all(ops).await;
    }
    let elapsed = start.elapsed();
    client
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .unwrap();
    (n, elapsed)
}
