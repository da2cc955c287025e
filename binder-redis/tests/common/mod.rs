//! What the Redis integration tests share: finding the test server, restarting it, and a
//! plain redis-rs connection to look at what the binder left in Redis.

#![allow(dead_code)] // each test file uses its own part of this module

use std::sync::Arc;

use binder_redis::{RedisBinder, RedisConfig};
use stream_core::testing::{service_env, skip};
use stream_core::{Binder, Error, ErrorKind};

/// The URL of the test server, or `None` (after a visible skip message) when unset; under
/// `CI=true` an unset variable fails the test instead.
pub fn redis_url() -> Option<String> {
    service_env("STREAM_TEST_REDIS_URL")
}

fn is_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The shell command that kill -9s the test server and starts it again on the same port and
/// data. Unset: skipped with a message, or a failure under `CI=true`.
pub fn restart_command(test: &str) -> Option<String> {
    let command = restart_env(test);
    if command.is_none() {
        skip(&format!(
            "{test}: STREAM_TEST_REDIS_RESTART is not set (scripts/test.sh sets it)"
        ));
    }
    command
}

/// Like [`restart_command`], without the skip message (for callers that print their own).
pub fn restart_env(test: &str) -> Option<String> {
    match std::env::var("STREAM_TEST_REDIS_RESTART") {
        Ok(cmd) if !cmd.trim().is_empty() => Some(cmd),
        _ => {
            assert!(
                !is_ci(),
                "STREAM_TEST_REDIS_RESTART is not set but CI=true: {test} must not be skipped"
            );
            None
        }
    }
}

/// Runs the restart command; returns once Redis accepts connections again.
pub async fn restart_redis(command: &str) -> stream_core::Result<()> {
    let command = command.to_owned();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(&command)
            .output()
    })
    .await
    .map_err(|e| Error::new(ErrorKind::Broker, "restart task failed").with_source(e))?
    .map_err(|e| Error::new(ErrorKind::Broker, "cannot run the restart command").with_source(e))?;
    if !output.status.success() {
        return Err(Error::new(
            ErrorKind::Broker,
            format!(
                "restart command failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ),
        ));
    }
    Ok(())
}

/// A fresh binder (its own connections) on the test server.
pub fn binder(url: &str) -> Arc<dyn Binder> {
    binder_with(RedisConfig::with_url(url))
}

/// A fresh binder with settings of its own.
pub fn binder_with(config: RedisConfig) -> Arc<dyn Binder> {
    Arc::new(RedisBinder::new(config).expect("valid test config"))
}

/// A plain connection for looking at streams and groups directly.
pub async fn raw(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("valid url")
        .get_multiplexed_async_connection()
        .await
        .expect("test redis reachable")
}

/// A stream or group name no other run uses.
pub fn unique(name: &str) -> String {
    format!("redis-test-{name}-{}", stream_core::unique_suffix())
}

/// How many entries of `group` are pending (delivered, not acknowledged).
pub async fn pending(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    group: &str,
) -> usize {
    let reply: redis::streams::StreamPendingReply = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .query_async(conn)
        .await
        .expect("XPENDING");
    reply.count()
}

/// Waits until `group` has `want` pending entries and returns that, or returns what it has
/// after `ACKS_LAND`. `ack` returns once the ids are queued; the consumer sends them with its
/// next read or a few milliseconds later, so the pending list follows shortly after.
pub async fn pending_settles(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    group: &str,
    want: usize,
) -> usize {
    let deadline = tokio::time::Instant::now() + ACKS_LAND;
    loop {
        let now = pending(conn, stream, group).await;
        if now == want || tokio::time::Instant::now() >= deadline {
            return now;
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
}

/// Far more than the consumer's few milliseconds before it sends queued acks on its own.
pub const ACKS_LAND: std::time::Duration = std::time::Duration::from_secs(2);

/// The pending entries of `group`: id, owner, idle ms, delivery count.
pub async fn pending_entries(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    group: &str,
) -> Vec<redis::streams::StreamPendingId> {
    let reply: redis::streams::StreamPendingCountReply = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .arg("-")
        .arg("+")
        .arg(10_000)
        .query_async(conn)
        .await
        .expect("XPENDING extended");
    reply.ids
}

/// The consumers of `group`: name and pending count.
pub async fn consumers(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    group: &str,
) -> Vec<(String, usize)> {
    let reply: redis::streams::StreamInfoConsumersReply = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(stream)
        .arg(group)
        .query_async(conn)
        .await
        .expect("XINFO CONSUMERS");
    reply
        .consumers
        .into_iter()
        .map(|c| (c.name, c.pending))
        .collect()
}

/// The group names of `stream`.
pub async fn groups(conn: &mut redis::aio::MultiplexedConnection, stream: &str) -> Vec<String> {
    let reply: redis::streams::StreamInfoGroupsReply = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await
        .expect("XINFO GROUPS");
    reply.groups.into_iter().map(|g| g.name).collect()
}

/// Receives until `done` says the collected deliveries are enough, or panics after
/// `timeout`. Temporary errors (a reconnect under way) are tolerated and counted.
pub async fn receive_until(
    consumer: &dyn stream_core::Consumer,
    timeout: std::time::Duration,
    what: &str,
    mut done: impl FnMut(&[stream_core::Received]) -> bool,
) -> Vec<stream_core::Received> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut got = Vec::new();
    while !done(&got) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        assert!(
            !left.is_zero(),
            "timed out after {timeout:?} waiting for {what}; got {} deliveries",
            got.len()
        );
        match tokio::time::timeout(left, consumer.receive(64)).await {
            Ok(Ok(batch)) => got.extend(batch),
            Ok(Err(e)) if e.is_temporary() => {}
            Ok(Err(e)) => panic!("receive failed while waiting for {what}: {e:?}"),
            Err(_) => {}
        }
    }
    got
}
