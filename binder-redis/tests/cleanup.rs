//! What crashed processes leave in Redis, cleaned by the live ones: consumer names that
//! hold nothing, and anonymous groups nobody reads any more.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use binder_redis::RedisConfig;
use stream_core::testing::broker_lock;
use stream_core::{Binder, ConsumerOptions, Message};
use tokio::time::Instant;

const PATIENCE: Duration = Duration::from_secs(20);
const EXPIRY: Duration = Duration::from_secs(1);

/// A binder whose consumers count a member silent for a second as dead.
fn binder(url: &str, prefix: &str) -> Arc<dyn Binder> {
    common::binder_with(RedisConfig {
        consumer_prefix: prefix.to_owned(),
        block: Duration::from_millis(50),
        consumer_expiry: EXPIRY,
        ..RedisConfig::with_url(url)
    })
}

/// Receives on `consumer` (whose claim sweeps do the cleaning) until `done` holds.
async fn sweep_until<F, Fut>(consumer: &dyn stream_core::Consumer, what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + PATIENCE;
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        let batch = consumer.receive(64).await.unwrap();
        let tags: Vec<_> = batch.iter().map(|r| r.tag).collect();
        consumer.ack(&tags).await.unwrap();
    }
}

/// Three members crash (dropped, no close), two of them holding entries. A live member
/// takes the entries over and acknowledges them; once the dead names hold nothing and have
/// been silent for `consumer-expiry`, its sweep removes them from the group. Its own name
/// stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_members_are_removed_from_their_group() {
    let _lock = broker_lock(false).await;
    let Some(url) = common::redis_url() else {
        return;
    };
    let (stream, group) = (common::unique("crashed"), common::unique("g"));
    let options = ConsumerOptions::new(&group).claim_idle(Duration::from_millis(200));
    let producer = common::binder(&url).producer(&stream).await.unwrap();
    let victims = common::unique("victim");
    let mut crashed = Vec::new();
    for n in 0..3 {
        let member = binder(&url, &victims)
            .consumer(&stream, &options)
            .await
            .unwrap();
        if n < 2 {
            producer
                .send_batch((0..3).map(|i| Message::new(format!("{n}-{i}"))).collect())
                .await
                .unwrap();
            let held = common::receive_until(&*member, PATIENCE, "entries", |g| g.len() >= 3).await;
            assert_eq!(held.len(), 3);
        }
        crashed.push(member);
    }
    drop(crashed);

    let survivors = common::unique("survivor");
    let survivor = binder(&url, &survivors)
        .consumer(&stream, &options)
        .await
        .unwrap();
    let mut raw = common::raw(&url).await;
    sweep_until(&*survivor, "only the survivor is left", || {
        let mut raw = raw.clone();
        let (stream, group, survivors) = (stream.clone(), group.clone(), survivors.clone());
        async move {
            let members = common::consumers(&mut raw, &stream, &group).await;
            members.len() == 1 && members[0].0.starts_with(survivors.as_str())
        }
    })
    .await;
    assert_eq!(common::pending(&mut raw, &stream, &group).await, 0);
    survivor.close().await.unwrap();
}

/// A process dies with an anonymous consumer open: a live member of another group on the
/// stream destroys its group once its consumer has been silent for `consumer-expiry`, and
/// likewise an anonymous group with no consumer at all that leaves a waiting entry unread.
/// A live anonymous consumer that never receives anything keeps its group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_groups_of_crashed_processes_are_destroyed() {
    let _lock = broker_lock(false).await;
    let Some(url) = common::redis_url() else {
        return;
    };
    let stream = common::unique("anon");
    let prefix = common::unique("member");
    let durable = common::unique("durable");
    let sweeper = binder(&url, &prefix)
        .consumer(
            &stream,
            &ConsumerOptions::new(&durable).claim_idle(Duration::from_millis(200)),
        )
        .await
        .unwrap();
    // Before anything of the dead consumer: it was last seen after this.
    let began = Instant::now();
    let dead = format!("anonymous.{}", common::unique("dead"));
    let crashed = binder(&url, &prefix)
        .consumer(&stream, &ConsumerOptions::new(&dead).anonymous())
        .await
        .unwrap();
    drop(crashed);
    let live = format!("anonymous.{}", common::unique("live"));
    let listener = binder(&url, &prefix)
        .consumer(&stream, &ConsumerOptions::new(&live).anonymous())
        .await
        .unwrap();
    // A group left with no consumer at all, and an entry it never reads.
    let orphan = format!("anonymous.{}", common::unique("orphan"));
    let mut raw = common::raw(&url).await;
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg(&orphan)
        .arg("$")
        .query_async(&mut raw)
        .await
        .unwrap();
    common::binder(&url)
        .producer(&stream)
        .await
        .unwrap()
        .send(Message::new("unread"))
        .await
        .unwrap();

    let expected: HashSet<String> = [durable.clone(), live.clone()].into();
    sweep_until(&*sweeper, "the dead groups are destroyed", || {
        let mut raw = raw.clone();
        let (stream, expected) = (stream.clone(), expected.clone());
        async move {
            let groups: HashSet<String> = common::groups(&mut raw, &stream)
                .await
                .into_iter()
                .collect();
            groups == expected
        }
    })
    .await;
    assert!(
        began.elapsed() >= EXPIRY,
        "destroyed after {:?}, before the expiry",
        began.elapsed()
    );
    // The listener has been silent longer than the expiry already; three more.
    let until = Instant::now() + EXPIRY * 3;
    sweep_until(&*sweeper, "three more expiry periods passed", || async {
        Instant::now() >= until
    })
    .await;
    let groups: HashSet<String> = common::groups(&mut raw, &stream)
        .await
        .into_iter()
        .collect();
    assert_eq!(groups, expected, "a live anonymous group was destroyed");
    listener.close().await.unwrap();
    sweeper.close().await.unwrap();
}
