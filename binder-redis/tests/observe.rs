//! What health checks and the lag gauge see: `Binder::ping` of a server that is away,
//! silent or fine, and `Consumer::lag` through the edge cases of Redis's own counters
//! (a new group on a backlog, trims, deletions, a lost group, a deleted stream).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use binder_redis::{RedisBinder, RedisConfig, MAX_PING_WAIT};
use stream_core::{Binder, Consumer, ConsumerOptions, ErrorKind, StartFrom};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// What a ping that fails may take: its bound, and scheduling slack on a busy machine.
const PING_BOUND: Duration = MAX_PING_WAIT.saturating_add(Duration::from_millis(500));

/// Nothing listens: a Connection error naming the address, password hidden, and the
/// refusal, at once (one attempt: a health check does not wait out `connect-attempts`).
/// Needs no Redis.
#[tokio::test]
async fn ping_of_an_unreachable_server_names_the_address_in_bounded_time() {
    let binder = RedisBinder::new(RedisConfig {
        password: Some("hunter2".into()),
        ..RedisConfig::with_url("redis://app:topsecret@127.0.0.1:1/0")
    })
    .expect("building does no network I/O");
    let started = Instant::now();
    let err = binder.ping().await.expect_err("nothing listens on port 1");
    let took = started.elapsed();
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    assert!(err.is_temporary());
    assert!(
        err.message().contains("redis://app:***@127.0.0.1:1/0"),
        "{err}"
    );
    let shown = format!("{err} {err:?}");
    assert!(
        !shown.contains("topsecret") && !shown.contains("hunter2"),
        "{shown}"
    );
    assert!(took < MAX_PING_WAIT, "took {took:?}");
}

/// A server that accepts connections and never answers (a hung process, a black hole):
/// the ping gives up at its bound, though `connect-timeout` and `command-timeout` are far
/// longer, with an error naming the address. Needs no Redis.
#[tokio::test]
async fn ping_of_a_silent_server_gives_up_at_its_bound() {
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            open.push(socket);
        }
    });
    let binder = RedisBinder::new(RedisConfig {
        connect_timeout: Duration::from_secs(30),
        command_timeout: Duration::from_secs(30),
        ..RedisConfig::with_url(format!("redis://:sesame@127.0.0.1:{port}"))
    })
    .unwrap();
    let started = Instant::now();
    let err = binder.ping().await.expect_err("the server never answers");
    let took = started.elapsed();
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    assert!(
        err.message()
            .contains(&format!("redis://:***@127.0.0.1:{port}")),
        "{err}"
    );
    assert!(!format!("{err:?}").contains("sesame"));
    assert!(took >= MAX_PING_WAIT && took < PING_BOUND, "took {took:?}");
    held.abort();
}

/// A proxy to the test server whose traffic can be cut (held, not refused) and restored.
struct Proxy {
    port: u16,
    cut: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(target: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let flag = cut.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&target).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pipe(client_read, server_write, flag.clone()));
                tokio::spawn(pipe(server_read, client_write, flag.clone()));
            }
        });
        Proxy { port, cut, task }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies bytes one way, holding them while the proxy is cut. (Readiness and `try_*`
/// calls: the test build of tokio has no `io-util`.)
async fn pipe(
    from: tokio::net::tcp::OwnedReadHalf,
    to: tokio::net::tcp::OwnedWriteHalf,
    cut: Arc<AtomicBool>,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        if from.readable().await.is_err() {
            return;
        }
        let n = match from.try_read(&mut buffer) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return,
        };
        // Held, as a network that drops packets holds them, until the test restores it.
        while cut.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut sent = 0;
        while sent < n {
            if to.writable().await.is_err() {
                return;
            }
            match to.try_write(&buffer[sent..n]) {
                Ok(written) => sent += written,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    }
}

/// A connected binder whose Redis goes silent: the ping fails at its bound with the
/// address, and answers again once Redis does, on the same connection.
#[tokio::test]
async fn ping_of_a_connected_server_that_goes_silent() {
    let Some(url) = common::redis_url() else {
        return;
    };
    let target = url.trim_start_matches("redis://").trim_end_matches('/');
    let proxy = Proxy::start(target.to_owned()).await;
    let binder = RedisBinder::new(RedisConfig::with_url(format!(
        "redis://127.0.0.1:{}",
        proxy.port
    )))
    .unwrap();
    binder.ping().await.expect("Redis answers");
    proxy.cut.store(true, Ordering::Release);
    let started = Instant::now();
    let err = binder.ping().await.expect_err("Redis is silent");
    let took = started.elapsed();
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    assert!(
        err.message().contains(&format!("127.0.0.1:{}", proxy.port)),
        "{err}"
    );
    assert!(took < PING_BOUND, "took {took:?}");
    proxy.cut.store(false, Ordering::Release);
    // The held PING is answered late, and the connection manager may be reconnecting:
    // the next pings succeed once that settles.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match binder.ping().await {
            Ok(()) => break,
            Err(e) => assert!(Instant::now() < deadline, "Redis answers again: {e}"),
        }
    }
    binder.close().await.unwrap();
    assert_eq!(
        binder.ping().await.unwrap_err().kind(),
        ErrorKind::Closed,
        "a closed binder"
    );
}

/// Publishes `count` entries to `stream` directly; returns their ids.
async fn backlog(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    count: usize,
) -> Vec<String> {
    let mut pipe = redis::pipe();
    for n in 0..count {
        pipe.cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg("p")
            .arg(format!("{{\"n\":{n}}}"));
    }
    pipe.query_async(conn).await.expect("XADD")
}

async fn consumer(
    binder: &Arc<dyn Binder>,
    stream: &str,
    options: &ConsumerOptions,
) -> Box<dyn Consumer> {
    binder.consumer(stream, options).await.expect("consumer")
}

async fn lag(consumer: &dyn Consumer) -> u64 {
    consumer
        .lag()
        .await
        .expect("lag")
        .expect("the redis binder always tells")
}

/// Receives exactly `count` deliveries: each `receive` asks for what is still missing.
async fn take(consumer: &dyn Consumer, count: usize) -> Vec<stream_core::Received> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut got = Vec::new();
    while got.len() < count {
        assert!(
            Instant::now() < deadline,
            "{count} deliveries; got {}",
            got.len()
        );
        got.extend(consumer.receive(count - got.len()).await.expect("receive"));
    }
    got
}

/// A new group on a backlog lags by the backlog: nothing of it is acknowledged, whether
/// delivered or not; acknowledgements take it down, and a `latest` group starts at 0.
#[tokio::test]
async fn a_new_group_on_a_backlog_lags_by_the_backlog() {
    let Some(url) = common::redis_url() else {
        return;
    };
    let mut conn = common::raw(&url).await;
    let stream = common::unique("lag-backlog");
    backlog(&mut conn, &stream, 7).await;
    let binder = common::binder(&url);
    let earliest = consumer(&binder, &stream, &ConsumerOptions::new(common::unique("g"))).await;
    assert_eq!(lag(&*earliest).await, 7);
    let got = take(&*earliest, 3).await;
    assert_eq!(got.len(), 3);
    assert_eq!(lag(&*earliest).await, 7, "delivered is not acknowledged");
    let tags: Vec<_> = got.iter().map(|r| r.tag).collect();
    earliest.ack(&tags).await.unwrap();
    let deadline = Instant::now() + common::ACKS_LAND;
    while lag(&*earliest).await != 4 {
        assert!(
            Instant::now() < deadline,
            "acknowledgements take the lag down"
        );
    }
    let latest = consumer(
        &binder,
        &stream,
        &ConsumerOptions::new(common::unique("g")).start_from(StartFrom::Latest),
    )
    .await;
    assert_eq!(lag(&*latest).await, 0);
    backlog(&mut conn, &stream, 2).await;
    assert_eq!(lag(&*latest).await, 2);
    assert_eq!(lag(&*earliest).await, 6);
    earliest.close().await.unwrap();
    latest.close().await.unwrap();
}

/// Entries trimmed before the group read them are gone: Redis's own `lag` still counts
/// them (it is entries added less entries read), the binder does not.
#[tokio::test]
async fn entries_trimmed_before_the_group_read_them_do_not_count() {
    let Some(url) = common::redis_url() else {
        return;
    };
    let mut conn = common::raw(&url).await;
    let stream = common::unique("lag-trim");
    backlog(&mut conn, &stream, 10).await;
    let binder = common::binder(&url);
    let group = ConsumerOptions::new(common::unique("g"));
    let member = consumer(&binder, &stream, &group).await;
    let got = take(&*member, 2).await;
    assert_eq!(got.len(), 2);
    let _: u64 = redis::cmd("XTRIM")
        .arg(&stream)
        .arg("MAXLEN")
        .arg(5)
        .query_async(&mut conn)
        .await
        .unwrap();
    let (redis_lag,): (i64,) = group_field(&mut conn, &stream, &group.group, "lag").await;
    assert_eq!(redis_lag, 8, "Redis counts the trimmed entries");
    // Five left to deliver, two delivered and pending (trimmed, but not acknowledged).
    assert_eq!(lag(&*member).await, 7);
    member.close().await.unwrap();

    // A group that read and acknowledged everything stays at 0 however the stream is
    // trimmed after.
    let done = consumer(&binder, &stream, &ConsumerOptions::new(common::unique("g"))).await;
    let got = take(&*done, 5).await;
    done.ack(&got.iter().map(|r| r.tag).collect::<Vec<_>>())
        .await
        .unwrap();
    let deadline = Instant::now() + common::ACKS_LAND;
    while lag(&*done).await != 0 {
        assert!(Instant::now() < deadline, "everything acknowledged");
    }
    let _: u64 = redis::cmd("XTRIM")
        .arg(&stream)
        .arg("MAXLEN")
        .arg(1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(lag(&*done).await, 0);
    done.close().await.unwrap();
}

/// One field of `group` in `XINFO GROUPS` (nil as an error).
async fn group_field<T: redis::FromRedisValue>(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    group: &str,
    field: &str,
) -> (T,) {
    let groups: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await
        .unwrap();
    let found = groups
        .into_iter()
        .find(|g| g.get("name") == Some(&redis::Value::BulkString(group.as_bytes().to_vec())))
        .expect("the group exists");
    (redis::from_redis_value(found[field].clone()).expect("the field's type"),)
}

/// Entries deleted after the group's position make Redis's `lag` nil; the binder counts
/// instead. With more than it counts on both sides of the position, the sample fails
/// (temporarily) rather than guess.
#[tokio::test]
async fn deleted_entries_ahead_are_counted_around() {
    let Some(url) = common::redis_url() else {
        return;
    };
    let mut conn = common::raw(&url).await;
    let stream = common::unique("lag-xdel");
    let ids = backlog(&mut conn, &stream, 10).await;
    let binder = common::binder(&url);
    let group = ConsumerOptions::new(common::unique("g"));
    let member = consumer(&binder, &stream, &group).await;
    assert_eq!(take(&*member, 2).await.len(), 2);
    let _: u64 = redis::cmd("XDEL")
        .arg(&stream)
        .arg(&ids[4])
        .query_async(&mut conn)
        .await
        .unwrap();
    let (redis_lag,): (Option<i64>,) = group_field(&mut conn, &stream, &group.group, "lag").await;
    assert_eq!(redis_lag, None, "Redis cannot tell");
    // Seven left to deliver (the fifth is gone), two pending.
    assert_eq!(lag(&*member).await, 9);
    member.close().await.unwrap();

    // Far from both ends: more than the binder counts on either side.
    let stream = common::unique("lag-xdel-far");
    let ids = backlog(&mut conn, &stream, 2_300).await;
    let group = ConsumerOptions::new(common::unique("g")).prefetch(2_000);
    let member = consumer(&binder, &stream, &group).await;
    take(&*member, 1_100).await;
    let _: u64 = redis::cmd("XDEL")
        .arg(&stream)
        .arg(&ids[2_000])
        .query_async(&mut conn)
        .await
        .unwrap();
    let err = member.lag().await.expect_err("too far to count");
    assert_eq!(err.kind(), ErrorKind::Broker, "{err}");
    assert!(err.is_temporary(), "{err}");
    // Once the group has read past the deleted entry, Redis can tell again.
    take(&*member, 1_199).await;
    assert_eq!(lag(&*member).await, 2_299);
    member.close().await.unwrap();
}

/// A group Redis lost, or whose stream was deleted, is made again by the consumer's next
/// read where `start-from` says; until then its lag is what it will have to read.
#[tokio::test]
async fn a_lost_group_or_a_deleted_stream() {
    let Some(url) = common::redis_url() else {
        return;
    };
    let mut conn = common::raw(&url).await;
    let stream = common::unique("lag-lost");
    backlog(&mut conn, &stream, 4).await;
    let binder = common::binder(&url);
    let earliest = ConsumerOptions::new(common::unique("g"));
    let latest = ConsumerOptions::new(common::unique("g")).start_from(StartFrom::Latest);
    let first = consumer(&binder, &stream, &earliest).await;
    let second = consumer(&binder, &stream, &latest).await;
    for group in [&earliest.group, &latest.group] {
        let _: i64 = redis::cmd("XGROUP")
            .arg("DESTROY")
            .arg(&stream)
            .arg(group)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    assert_eq!(lag(&*first).await, 4, "an earliest group reads everything");
    assert_eq!(
        lag(&*second).await,
        0,
        "a latest group reads what comes next"
    );
    let _: i64 = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(lag(&*first).await, 0, "a deleted stream holds nothing");
    assert_eq!(lag(&*second).await, 0);
    // The next read makes the group again; what comes then counts.
    assert!(first.receive(1).await.unwrap().is_empty());
    backlog(&mut conn, &stream, 3).await;
    assert_eq!(lag(&*first).await, 3);
    first.close().await.unwrap();
    second.close().await.unwrap();
}
