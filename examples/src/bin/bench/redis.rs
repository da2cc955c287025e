//! The Redis binder against redis-rs used by hand: pipelined XADD, XREADGROUP + XACK.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use stream_core::{Binder, BindingConfig, Channel, Codec, Json};

use crate::report::{
    compare_latency, compare_timed, lagging_consumer_rss, latency_through, paced,
    subscribe_counting, Payload, Report, Row, Samples, Settings, Stamped, BATCH,
};

pub async fn run(settings: &Settings, report: &mut Report, url: &str) {
    let binder = binder(url);
    let client = redis::Client::open(url).expect("valid Redis URL");
    let conn = client
        .get_multiplexed_async_connection_with_config(&no_timeout())
        .await
        .expect("Redis answers");
    for &size in &settings.sizes {
        let n = settings.redis_messages;
        let value = Payload::of_size(size);
        if settings.wants("publish") {
            let (ours, raw) = compare_timed(
                settings.runs,
                || publish_ours(&binder, conn.clone(), n, &value),
                || publish_raw(conn.clone(), n, &value),
            )
            .await;
            report.add(Row::ratio("redis", "publish", size, ours, raw));
        }
        if settings.wants("publish-concurrent") {
            let (ours, raw) = compare_timed(
                settings.runs,
                || publish_concurrent_ours(&binder, conn.clone(), n, &value),
                || publish_raw_in(conn.clone(), n, &value, CEILING_PIPELINE),
            )
            .await;
            report.add(Row::ratio(
                "redis",
                "publish, 64 concurrent sends",
                size,
                ours,
                raw,
            ));
        }
        if !settings.wants("consume") {
            continue;
        }
        // One backlog per size, read by a new group each run: every run reads the same
        // entries, and filling the stream stays out of the loop.
        let dest = fresh("con");
        prefill(&mut conn.clone(), &dest, n, &value, Entries::Ours).await;
        for (metric, concurrency) in [("consume+ack", 1), ("consume+ack, concurrency 8", 8)] {
            let (ours, raw) = compare_timed(
                settings.runs,
                || consume_ours(&binder, &dest, n, concurrency),
                || consume_raw(conn.clone(), &dest, n),
            )
            .await;
            report.add(Row::ratio("redis", metric, size, ours, raw));
        }
        delete(conn.clone(), &dest).await;
        // Entries as the peers write them (shove and ruststream publish the payload alone):
        // what our three headers cost a consumer, and the row to set beside the peers'.
        let dest = fresh("con-bare");
        prefill(&mut conn.clone(), &dest, n, &value, Entries::PayloadOnly).await;
        let (ours, raw) = compare_timed(
            settings.runs,
            || consume_ours(&binder, &dest, n, 1),
            || consume_raw(conn.clone(), &dest, n),
        )
        .await;
        report.add(Row::ratio(
            "redis",
            "consume+ack, entries without headers",
            size,
            ours,
            raw,
        ));
        delete(conn.clone(), &dest).await;
    }
    if settings.wants("latency") {
        compare_latency(
            report,
            "redis",
            64,
            settings.runs,
            || latency_ours(settings, &binder, 64),
            || latency_raw(settings, &client, 64),
        )
        .await;
    }
    if settings.wants("rss") {
        backlog_rss(settings, report, conn.clone()).await;
    }
    if settings.wants("retention-cost") {
        // Ours with `trim = { acknowledged = true, interval = "1s" }` against ours without, in
        // the "raw" column: what retention costs publishing and consuming.
        let retained = binder_with_retention(url);
        let value = Payload::of_size(64);
        let n = settings.redis_messages;
        let (on, off) = compare_timed(
            settings.runs,
            || publish_ours(&retained, conn.clone(), n, &value),
            || publish_ours(&binder, conn.clone(), n, &value),
        )
        .await;
        report.add(Row::ratio(
            "redis",
            "publish, retention on/off",
            64,
            on,
            off,
        ));
        let (on, off) = compare_timed(
            settings.runs,
            || consume_fresh(&retained, conn.clone(), n, &value),
            || consume_fresh(&binder, conn.clone(), n, &value),
        )
        .await;
        report.add(Row::ratio(
            "redis",
            "consume+ack, retention on/off",
            64,
            on,
            off,
        ));
    }
    if settings.wants("retention") {
        retention_soak(settings, url, conn.clone()).await;
    }
}

/// A backlog of its own, consumed by a new group while a producer of `binder` lives (so
/// that, with retention on, it trims behind the group as it acknowledges).
async fn consume_fresh(
    binder: &Arc<dyn Binder>,
    conn: MultiplexedConnection,
    n: usize,
    value: &Payload,
) -> (usize, Duration) {
    let dest = fresh("con-fresh");
    prefill(&mut conn.clone(), &dest, n, value, Entries::Ours).await;
    let producer = binder.producer(&dest).await.unwrap();
    let result = consume_ours(binder, &dest, n, 1).await;
    producer.close().await.unwrap();
    delete(conn, &dest).await;
    result
}

fn binder_with_retention(url: &str) -> Arc<dyn Binder> {
    let streams = stream_core::Streams::builder()
        .register(binder_redis::register)
        .env(Vec::<(String, String)>::new())
        .load_str(&format!(
            "[binders.redis]\ntype = \"redis\"\nurl = \"{url}\"\n\
             trim = {{ acknowledged = true, interval = \"1s\" }}\n"
        ))
        .expect("bench configuration");
    streams.binder("redis").expect("declared")
}

/// Redis memory while a service publishes at a steady rate and a group keeps up, with
/// `trim = { acknowledged = true }`: printed every 10 s (`used_memory`, stream length).
/// Five minutes in full mode, one in quick mode; 3,000 messages a second of 64 B.
async fn retention_soak(settings: &Settings, url: &str, mut conn: MultiplexedConnection) {
    const RATE: u64 = 3_000;
    let minutes = if settings.quick { 1 } else { 5 };
    let streams = stream_core::Streams::builder()
        .register(binder_redis::register)
        .env(Vec::<(String, String)>::new())
        .load_str(&format!(
            "[binders.redis]\ntype = \"redis\"\nurl = \"{url}\"\n\
             trim = {{ acknowledged = true }}\n"
        ))
        .expect("bench configuration");
    let binder = streams.binder("redis").expect("declared");
    let dest = fresh("soak");
    let channel = Channel::new(
        "bench",
        binder.clone(),
        BindingConfig::new(&dest).group("soak"),
    );
    let (subscription, _) = subscribe_counting(&channel, usize::MAX, |_| {}).await;
    let source = channel.source::<Payload>().await.unwrap();
    let value = Payload::of_size(64);
    let used = |conn: &mut MultiplexedConnection| {
        let mut conn = conn.clone();
        async move {
            let info: String = redis::cmd("INFO")
                .arg("memory")
                .query_async(&mut conn)
                .await
                .unwrap();
            info.lines()
                .find_map(|l| l.strip_prefix("used_memory:"))
                .map_or(0, |v| v.trim().parse::<u64>().unwrap())
        }
    };
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut sent = 0u64;
    let mut next_report = Duration::ZERO;
    eprintln!("  retention soak: {RATE} msgs/s of 64 B for {minutes} min, trim = {{ acknowledged = true }}");
    while start.elapsed() < Duration::from_secs(60 * minutes) {
        tick.tick().await;
        let due = start.elapsed().as_millis() as u64 * RATE / 1000;
        let batch: Vec<Payload> = (sent..due).map(|_| value.clone()).collect();
        if !batch.is_empty() {
            source.send_batch(&batch).await.unwrap();
            sent = due;
        }
        if start.elapsed() >= next_report {
            let len: u64 = redis::cmd("XLEN")
                .arg(&dest)
                .query_async(&mut conn)
                .await
                .unwrap();
            eprintln!(
                "    t={:>3}s sent {sent:>7} used_memory {:>9} B stream length {len}",
                start.elapsed().as_secs(),
                used(&mut conn).await
            );
            next_report += Duration::from_secs(10);
        }
    }
    subscription.shutdown().await.unwrap();
    delete(conn, &dest).await;
}

/// Pipelines of thousands of commands on a loaded machine outlast redis-rs's default
/// response timeout; the benchmark waits instead of failing.
pub fn no_timeout() -> redis::AsyncConnectionConfig {
    redis::AsyncConnectionConfig::new().set_response_timeout(None)
}

pub fn binder(url: &str) -> Arc<dyn Binder> {
    let streams = stream_core::Streams::builder()
        .register(binder_redis::register)
        .env(Vec::<(String, String)>::new())
        .load_str(&format!(
            "[binders.redis]\ntype = \"redis\"\nurl = \"{url}\"\n"
        ))
        .expect("bench configuration");
    streams.binder("redis").expect("declared")
}

fn fresh(name: &str) -> String {
    format!("bench-{name}-{}", stream_core::unique_suffix())
}

async fn publish_ours(
    binder: &Arc<dyn Binder>,
    conn: MultiplexedConnection,
    n: usize,
    value: &Payload,
) -> (usize, Duration) {
    let dest = fresh("pub");
    let source = Channel::new("bench", binder.clone(), BindingConfig::new(&dest))
        .source::<Payload>()
        .await
        .unwrap();
    let batch: Vec<Payload> = vec![value.clone(); BATCH];
    let start = Instant::now();
    let mut sent = 0;
    while sent < n {
        let k = (n - sent).min(BATCH);
        source.send_batch(&batch[..k]).await.unwrap();
        sent += k;
    }
    let elapsed = start.elapsed();
    // Deleted like the raw side's: left behind, every run's entries pile up in the server and
    // its AOF, whose background rewrites (a fork, then compression on the other core) then
    // land in whichever measurement runs next.
    delete(conn, &dest).await;
    (n, elapsed)
}

pub async fn publish_raw(
    conn: MultiplexedConnection,
    n: usize,
    value: &Payload,
) -> (usize, Duration) {
    publish_raw_in(conn, n, value, BATCH).await
}

/// Pipelines of this many `XADD`s: redis-rs's fastest way to publish, and the ceiling the
/// concurrent sends are measured against.
const CEILING_PIPELINE: usize = 100;

/// Pipelines of `pipeline` `XADD`s, one after another, writing the same entries as ours.
async fn publish_raw_in(
    mut conn: MultiplexedConnection,
    n: usize,
    value: &Payload,
    pipeline: usize,
) -> (usize, Duration) {
    let dest = fresh("pub-raw");
    let codec = Json::<Payload>::new();
    let sent_at = crate::report::sent_at_text();
    let start = Instant::now();
    let mut sent = 0;
    while sent < n {
        let k = (n - sent).min(pipeline);
        let mut pipe = redis::pipe();
        for _ in 0..k {
            let payload = codec.encode(value).unwrap();
            our_entry(pipe.cmd("XADD"), &dest, payload.as_ref(), &sent_at);
        }
        let _: Vec<String> = pipe.query_async(&mut conn).await.unwrap();
        sent += k;
    }
    let elapsed = start.elapsed();
    delete(conn, &dest).await;
    (n, elapsed)
}

/// The arguments of an `XADD` of the entry our producer writes for a message: the payload
/// and the three headers every message carries (content type, message id, send time). Raw
/// sides write the same entries, so that they do the same work in the server; the send time
/// is one for a whole run, cheaper than ours, which reads the clock.
fn our_entry<'a>(
    xadd: &'a mut redis::Pipeline,
    dest: &str,
    payload: &[u8],
    sent_at: &str,
) -> &'a mut redis::Pipeline {
    xadd.arg(dest)
        .arg("*")
        .arg("p")
        .arg(payload)
        .arg("h:content-type")
        .arg("application/json")
        .arg("h:x-message-id")
        .arg(stream_core::new_message_id())
        .arg("h:x-sent-at")
        .arg(sent_at)
}

/// `Source::send` with 64 calls in flight, each returning when its entry was appended.
async fn publish_concurrent_ours(
    binder: &Arc<dyn Binder>,
    conn: MultiplexedConnection,
    n: usize,
    value: &Payload,
) -> (usize, Duration) {
    use futures::StreamExt as _;
    let dest = fresh("pub-conc");
    let source = Channel::new("bench", binder.clone(), BindingConfig::new(&dest))
        .source::<Payload>()
        .await
        .unwrap();
    let start = Instant::now();
    futures::stream::iter(0..n)
        .map(|_| source.send(value))
        .buffer_unordered(64)
        .for_each(|sent| {
            sent.expect("appended");
            async {}
        })
        .await;
    let elapsed = start.elapsed();
    delete(conn, &dest).await;
    (n, elapsed)
}

async fn delete(mut conn: MultiplexedConnection, key: &str) {
    let _: () = redis::cmd("DEL")
        .arg(key)
        .query_async(&mut conn)
        .await
        .unwrap();
}

/// Fills `dest` with `n` JSON entries, outside the timed part.
/// Writes `n` entries as our producers write them: the payload and our three headers.
/// What a prefilled entry holds.
#[derive(Clone, Copy)]
enum Entries {
    /// What a `Source` writes: the payload and our three headers.
    Ours,
    /// The payload field alone.
    PayloadOnly,
}

async fn prefill(
    conn: &mut MultiplexedConnection,
    dest: &str,
    n: usize,
    value: &Payload,
    entries: Entries,
) {
    let payload = Json::<Payload>::new().encode(value).unwrap();
    let sent_at = crate::report::sent_at_text();
    let mut sent = 0;
    while sent < n {
        let k = (n - sent).min(BATCH * 4);
        let mut pipe = redis::pipe();
        for _ in 0..k {
            let xadd = pipe.cmd("XADD");
            match entries {
                Entries::Ours => our_entry(xadd, dest, payload.as_ref(), &sent_at),
                Entries::PayloadOnly => xadd.arg(dest).arg("*").arg("p").arg(payload.as_ref()),
            }
            .ignore();
        }
        let _: () = pipe.query_async(conn).await.unwrap();
        sent += k;
    }
}

async fn consume_ours(
    binder: &Arc<dyn Binder>,
    dest: &str,
    n: usize,
    concurrency: usize,
) -> (usize, Duration) {
    let group = format!("g-{}", stream_core::unique_suffix());
    let channel = Channel::new(
        "bench",
        binder.clone(),
        crate::report::consume_binding(dest, &group).concurrency(concurrency),
    );
    let start = Instant::now();
    let (sub, done) = subscribe_counting(&channel, n, |_| {}).await;
    done.notified().await;
    // To the last handled message, as the raw loop; acks are pipelined behind handling.
    let elapsed = start.elapsed();
    sub.shutdown().await.unwrap();
    (n, elapsed)
}

/// XREADGROUP COUNT 500, decode, one XACK for the batch, strictly alternating.
async fn consume_raw(mut conn: MultiplexedConnection, dest: &str, n: usize) -> (usize, Duration) {
    let group = format!("g-{}", stream_core::unique_suffix());
    let codec = Json::<Payload>::new();
    let start = Instant::now();
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(dest)
        .arg(&group)
        .arg("0")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut handled = 0;
    while handled < n {
        let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&group)
            .arg("c")
            .arg("COUNT")
            .arg(BATCH)
            .arg("BLOCK")
            .arg(1000)
            .arg("STREAMS")
            .arg(dest)
            .arg(">")
            .query_async(&mut conn)
            .await
            .unwrap();
        let mut ids = Vec::new();
        for key in reply.keys {
            for entry in key.ids {
                let payload: Vec<u8> = entry.get("p").unwrap();
                let _p: Payload = codec.decode(&payload).unwrap();
                ids.push(entry.id);
            }
        }
        if ids.is_empty() {
            continue;
        }
        handled += ids.len();
        let _: i64 = redis::cmd("XACK")
            .arg(dest)
            .arg(&group)
            .arg(&ids)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    (n, start.elapsed())
}

async fn latency_ours(settings: &Settings, binder: &Arc<dyn Binder>, size: usize) -> (f64, f64) {
    let dest = fresh("lat");
    let channel = Channel::new(
        "bench",
        binder.clone(),
        BindingConfig::new(&dest).group("g"),
    );
    latency_through(&channel, settings, size).await
}

async fn latency_raw(settings: &Settings, client: &redis::Client, size: usize) -> (f64, f64) {
    let dest = fresh("lat-raw");
    let samples = Samples::new(settings.latency_messages);
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&no_timeout())
        .await
        .unwrap();
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&dest)
        .arg("g")
        .arg("$")
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await
        .unwrap();
    // The reader blocks, so it gets a connection of its own.
    let mut reader = client
        .get_multiplexed_async_connection_with_config(&no_timeout())
        .await
        .unwrap();
    let (d, s) = (dest.clone(), samples.clone());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let consumer = tokio::spawn(async move {
        let codec = Json::<Stamped>::new();
        while !stopped.load(Ordering::Relaxed) {
            let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg("g")
                .arg("c")
                .arg("COUNT")
                .arg(100)
                .arg("BLOCK")
                .arg(100)
                .arg("STREAMS")
                .arg(&d)
                .arg(">")
                .query_async(&mut reader)
                .await
                .unwrap();
            let mut ids = Vec::new();
            for key in reply.keys {
                for entry in key.ids {
                    let payload: Vec<u8> = entry.get("p").unwrap();
                    s.record(&codec.decode(&payload).unwrap());
                    ids.push(entry.id);
                }
            }
            if !ids.is_empty() {
                let _: i64 = redis::cmd("XACK")
                    .arg(&d)
                    .arg("g")
                    .arg(&ids)
                    .query_async(&mut reader)
                    .await
                    .unwrap();
            }
        }
    });
    let codec = Json::<Stamped>::new();
    paced(settings, size, &samples, |m| {
        let (mut conn, dest) = (conn.clone(), dest.clone());
        let payload = codec.encode(&m).unwrap();
        async move {
            let _: String = redis::cmd("XADD")
                .arg(&dest)
                .arg("*")
                .arg("p")
                .arg(payload.as_ref())
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    })
    .await;
    let result = samples.percentiles().await;
    stop.store(true, Ordering::Relaxed);
    consumer.await.unwrap();
    delete(conn, &dest).await;
    result
}

/// A consumer working through a backlog: RSS before and at its peak.
async fn backlog_rss(settings: &Settings, report: &mut Report, conn: MultiplexedConnection) {
    let dest = fresh("backlog");
    let backlog = settings.backlog;
    prefill(
        &mut conn.clone(),
        &dest,
        backlog,
        &Payload::of_size(64),
        Entries::Ours,
    )
    .await;
    let consume = backlog.min(settings.backlog_consumed);
    let rss = lagging_consumer_rss("redis", &dest, consume).await;
    delete(conn, &dest).await;
    report.rss("redis", backlog, consume, rss);
}
