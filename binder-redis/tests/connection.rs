//! Connections: an unreachable server, credentials, configuration through the registry, and
//! a group that vanishes under a running consumer.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use binder_redis::{RedisBinder, RedisConfig};
use stream_core::testing::broker_lock;
use stream_core::{Binder, BindingConfig, Channel, ErrorKind, Message, Streams};
use tokio::time::Instant;

/// Nothing listens: the first producer fails after the configured attempts with a
/// connection error that names the address and hides the password. Needs no Redis.
#[tokio::test]
async fn unreachable_server_is_a_connection_error_naming_the_address() {
    let binder = RedisBinder::new(RedisConfig {
        password: Some("hunter2".into()),
        connect_attempts: 3,
        connect_timeout: Duration::from_millis(200),
        ..RedisConfig::with_url("redis://app:topsecret@127.0.0.1:1/0")
    })
    .expect("building does no network I/O");
    let started = Instant::now();
    let err = binder
        .producer("s")
        .await
        .err()
        .expect("nothing listens on port 1");
    let took = started.elapsed();
    assert_eq!(err.kind(), ErrorKind::Connection);
    assert!(err.is_temporary());
    let shown = format!("{err} {err:?} {binder:?}");
    assert!(
        err.message().contains("redis://app:***@127.0.0.1:1/0"),
        "{err}"
    );
    assert!(err.message().contains("3 attempts"), "{err}");
    assert!(
        !shown.contains("topsecret") && !shown.contains("hunter2"),
        "{shown}"
    );
    // Three attempts with 100 ms and 200 ms between them: bounded, not a hang.
    assert!(
        took >= Duration::from_millis(300),
        "backoff between attempts: {took:?}"
    );
    assert!(
        took < Duration::from_secs(5),
        "gave up in bounded time: {took:?}"
    );
}

/// `type = "redis"` through the registry: every key is read, a misspelt key names the
/// nearest valid one, and nothing connects while loading. Needs no Redis.
#[test]
fn the_registered_type_reads_its_settings() {
    let load = |binder_table: &str| {
        Streams::builder()
            .register(binder_redis::register)
            .env(Vec::<(String, String)>::new())
            .load_str(&format!(
                "default-binder = \"redis\"\n[binders.redis]\ntype = \"redis\"\n{binder_table}\n\
                 [bindings.out]\ndestination = \"d\"\n"
            ))
    };
    let streams = load(
        "url = \"redis://127.0.0.1:1\"\nblock = \"500ms\"\nclaim-interval = \"1s\"\n\
         trim = { max-len = 1000 }\nconsumer-prefix = \"svc\"",
    )
    .expect("valid settings load without a server");
    assert_eq!(streams.binder("redis").unwrap().kind(), "redis");
    let err = load("url = \"redis://127.0.0.1:1\"\nconect-timeout = \"1s\"").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(
        err.message().contains("did you mean `connect-timeout`?"),
        "{err}"
    );
    let err = load("trim = { max-len = 5, max-age = \"1h\" }").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.message().contains("not both"), "{err}");
    let err = load("url = \"http://127.0.0.1\"").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
}

/// `username` and `password` keys authenticate as an ACL user; a wrong password fails at
/// once (no retries), as a permanent connection error without the password in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_from_settings_authenticate_and_stay_hidden() {
    let _lock = broker_lock(false).await;
    let Some(url) = common::redis_url() else {
        return;
    };
    let user = common::unique("user");
    let mut raw = common::raw(&url).await;
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&user)
        .arg("on")
        .arg(">right-password")
        .arg("~*")
        .arg("&*")
        .arg("+@all")
        .query_async(&mut raw)
        .await
        .unwrap();
    let with = |password: &str| {
        RedisBinder::new(RedisConfig {
            username: Some(user.clone()),
            password: Some(password.to_owned()),
            connect_timeout: Duration::from_secs(1),
            ..RedisConfig::with_url(&url)
        })
        .unwrap()
    };
    let stream = common::unique("auth");
    let good = with("right-password");
    let id = good
        .producer(&stream)
        .await
        .expect("the ACL user connects")
        .send(Message::new("x"))
        .await
        .unwrap();
    assert!(!id.is_empty());
    let who: String = redis::cmd("ACL")
        .arg("WHOAMI")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(who, "default", "the test's own connection is unaffected");

    let bad = with("wrong-password");
    let err = bad.producer(&stream).await.err().expect("wrong password");
    assert_eq!(err.kind(), ErrorKind::Connection);
    assert!(
        !err.is_temporary(),
        "bad credentials do not get better: {err}"
    );
    assert!(err.message().contains("1 attempt"), "no retries: {err}");
    let shown = format!("{err} {err:?} {bad:?} {good:?}");
    assert!(
        !shown.contains("right-password") && !shown.contains("wrong-password"),
        "{shown}"
    );
    let _: i64 = redis::cmd("ACL")
        .arg("DELUSER")
        .arg(&user)
        .query_async(&mut raw)
        .await
        .unwrap();
}

/// The stream (and with it the group) is deleted under a running subscription: the consumer
/// creates the group again and goes on with what is published afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_lost_under_a_running_consumer_is_created_again() {
    let _lock = broker_lock(false).await;
    let Some(url) = common::redis_url() else {
        return;
    };
    let (stream, group) = (common::unique("lost"), common::unique("g"));
    let binder: Arc<dyn Binder> = common::binder(&url);
    let channel = Channel::new("lost", binder, BindingConfig::new(&stream).group(&group));
    let seen: Arc<Mutex<HashSet<u64>>> = Arc::default();
    let s = seen.clone();
    let subscription = channel
        .sink::<u64>()
        .subscribe(move |n: u64| {
            s.lock().unwrap().insert(n);
            async { Ok::<(), String>(()) }
        })
        .await
        .unwrap();
    let source = channel.source::<u64>().await.unwrap();
    let wait_for = |range: std::ops::Range<u64>| {
        let seen = seen.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            while !range.clone().all(|n| seen.lock().unwrap().contains(&n)) {
                assert!(Instant::now() < deadline, "{range:?} not all handled");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    for n in 0..5 {
        source.send(&n).await.unwrap();
    }
    wait_for(0..5).await;
    let mut raw = common::raw(&url).await;
    let _: i64 = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut raw)
        .await
        .unwrap();
    for n in 5..10 {
        source.send(&n).await.unwrap();
    }
    wait_for(5..10).await;
    assert_eq!(common::groups(&mut raw, &stream).await, vec![group.clone()]);
    subscription.shutdown().await.unwrap();
    assert_eq!(common::pending(&mut raw, &stream, &group).await, 0);
}
