//! The binder against a three-master Redis Cluster (`scripts/redis-cluster.sh`: no replicas,
//! the 16384 slots split over the three), found through `STREAM_TEST_REDIS_CLUSTER_URLS`
//! (the masters' URLs, comma-separated). `STREAM_TEST_REDIS_CLUSTER_RESTART` is a command
//! prefix: appending a node number N (its position in the URL list, 1..3) and running it
//! with `sh -c` kill -9s that node and starts it again on the same port, `nodes.conf` and
//! AOF, returning once the cluster is ok again.
//!
//! Every test name contains `cluster`, so the cluster stage of `scripts/test.sh` runs exactly
//! these (`cargo test -- cluster`) and its single-server stage leaves them out
//! (`--skip cluster`). Run without the variable, they skip with a message (fail under
//! `CI=true`); the few that need no cluster run anyway.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use binder_redis::{RedisBinder, RedisConfig};
use stream_core::testing::{broker_lock, skip, Capabilities, Harness};
use stream_core::{
    Binder, BindingConfig, Channel, ConsumerOptions, Envelope, Error, ErrorKind, Message,
    RetryConfig, Streams,
};
use tokio::time::Instant;

const URLS_VAR: &str = "STREAM_TEST_REDIS_CLUSTER_URLS";
const RESTART_VAR: &str = "STREAM_TEST_REDIS_CLUSTER_RESTART";
const PATIENCE: Duration = Duration::from_secs(30);

fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn is_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// The masters' URLs, or `None` after a visible skip message (a failure under `CI=true`).
/// `scripts/test.sh` leaves these tests out of its single-server stage with `--skip cluster`
/// and runs them in its cluster stage, which sets the variable.
fn cluster_nodes(_test: &str) -> Option<Vec<String>> {
    let urls = stream_core::testing::service_env(URLS_VAR)?;
    Some(
        urls.split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(str::to_owned)
            .collect(),
    )
}

/// The restart command prefix; unset with the cluster there is a skip, or under `CI=true` a
/// failure.
fn restart_prefix(test: &str) -> Option<String> {
    let prefix = std::env::var(RESTART_VAR)
        .ok()
        .filter(|command| !command.trim().is_empty());
    if prefix.is_none() {
        assert!(
            !is_ci(),
            "{test}: {RESTART_VAR} is not set but CI=true: the test must not be skipped"
        );
        skip(&format!(
            "redis cluster test {test}: {RESTART_VAR} is not set"
        ));
    }
    prefix
}

/// Kill -9s node `n` (1-based) and starts it again; returns once the cluster is ok.
async fn restart_node(prefix: &str, n: usize) -> stream_core::Result<()> {
    common::restart_redis(&format!("{} {n}", prefix.trim_end())).await
}

/// A binder of its own on the cluster.
fn cluster_binder(nodes: &[String]) -> Arc<dyn Binder> {
    Arc::new(RedisBinder::new(RedisConfig::with_nodes(nodes.iter().cloned())).expect("valid"))
}

/// The port of `redis://host:port`.
fn port_of(url: &str) -> u16 {
    url.trim_end_matches('/')
        .rsplit(':')
        .next()
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("no port in {url}"))
}

/// The slot of `key`, as the cluster computes it.
async fn slot_of(nodes: &[String], key: &str) -> u16 {
    let mut conn = common::raw(&nodes[0]).await;
    redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query_async(&mut conn)
        .await
        .expect("CLUSTER KEYSLOT")
}

/// The index in `nodes` of the master that serves `slot`, from `CLUSTER NODES` of `nodes[0]`.
async fn owner_of_slot(nodes: &[String], slot: u16) -> usize {
    let mut conn = common::raw(&nodes[0]).await;
    let text: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(&mut conn)
        .await
        .expect("CLUSTER NODES");
    for line in text.lines() {
        // <id> <ip:port@bus> <flags> <master> <ping> <pong> <epoch> <link> <slot ranges...>
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 9 || !fields[2].contains("master") {
            continue;
        }
        let serves = fields[8..].iter().any(|range| {
            if range.starts_with('[') {
                return false; // a migration under way, not ownership
            }
            let (low, high) = range.split_once('-').unwrap_or((range, range));
            let (low, high): (u16, u16) = (low.parse().unwrap(), high.parse().unwrap());
            (low..=high).contains(&slot)
        });
        if serves {
            let address = fields[1].split(['@', ',']).next().unwrap();
            let port = port_of(address);
            return nodes
                .iter()
                .position(|url| port_of(url) == port)
                .unwrap_or_else(|| panic!("slot {slot} is served by {address}, not in {nodes:?}"));
        }
    }
    panic!("no master serves slot {slot}:\n{text}");
}

/// The index in `nodes` of the master that holds `key`.
async fn owner_of(nodes: &[String], key: &str) -> usize {
    owner_of_slot(nodes, slot_of(nodes, key).await).await
}

/// A fresh stream name whose slot the master `nodes[index]` serves.
async fn stream_on(nodes: &[String], index: usize, name: &str) -> String {
    for _ in 0..1000 {
        let key = common::unique(name);
        if owner_of(nodes, &key).await == index {
            return key;
        }
    }
    panic!("no key found for master {index}");
}

struct ClusterHarness {
    nodes: Vec<String>,
    restart: Option<String>,
}

fn harness() -> Option<ClusterHarness> {
    let nodes = cluster_nodes("cluster::conformance (every case)")?;
    // Only `broker_restart_mid_stream` needs it, and the suite says so when it skips.
    let restart = std::env::var(RESTART_VAR)
        .ok()
        .filter(|command| !command.trim().is_empty());
    Some(ClusterHarness { nodes, restart })
}

#[async_trait::async_trait]
impl Harness for ClusterHarness {
    async fn binder(&self) -> Arc<dyn Binder> {
        cluster_binder(&self.nodes)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
            .restart(self.restart.is_some())
            .counts_deliveries(true)
            .claim_idle(Duration::from_millis(500))
    }

    /// A rolling crash: every master in turn is killed (-9) and started again, the next one
    /// once the cluster is ok. The case's stream lives on one of them, unknown here, so that
    /// one certainly crashes once while the case's clients stay connected.
    async fn restart_broker(&self) -> stream_core::Result<()> {
        let Some(prefix) = self.restart.as_deref() else {
            return Err(Error::new(
                ErrorKind::Broker,
                format!("{RESTART_VAR} is not set"),
            ));
        };
        for n in 1..=self.nodes.len() {
            restart_node(prefix, n).await?;
        }
        Ok(())
    }
}

mod cluster {
    stream_core::conformance_suite!(crate::harness());
}

/// Building needs no cluster, and a cluster nobody answers for is a connection error that
/// names the seeds and hides the password, after the configured attempts.
#[tokio::test]
async fn cluster_unreachable_seeds_are_a_connection_error_naming_them() {
    let binder = RedisBinder::new(RedisConfig {
        connect_attempts: 2,
        connect_timeout: Duration::from_millis(200),
        ..RedisConfig::with_nodes([
            "redis://:clustersecret@127.0.0.1:1",
            "redis://:clustersecret@127.0.0.1:2",
        ])
    })
    .expect("building does no network I/O");
    let err = binder.producer("s").await.err().expect("nothing listens");
    assert_eq!(err.kind(), ErrorKind::Connection);
    assert!(err.is_temporary());
    assert!(
        err.message()
            .contains("redis cluster at redis://:***@127.0.0.1:1,redis://:***@127.0.0.1:2"),
        "{err}"
    );
    assert!(err.message().contains("2 attempts"), "{err}");
    let shown = format!("{err} {err:?} {binder:?}");
    assert!(!shown.contains("clustersecret"), "{shown}");
}

/// `STREAM_BINDERS__REDIS__NODES` holds the seeds as one comma-separated string; they reach
/// the binder as a cluster (its connection error names them all). Needs no cluster.
#[tokio::test]
async fn cluster_seeds_from_the_environment_reach_the_binder() {
    let streams = Streams::builder()
        .register(binder_redis::register)
        .env([
            (
                "STREAM_BINDERS__REDIS__NODES".to_owned(),
                "redis://127.0.0.1:1, redis://127.0.0.1:2".to_owned(),
            ),
            (
                "STREAM_BINDERS__REDIS__CONNECT_ATTEMPTS".to_owned(),
                "1".to_owned(),
            ),
        ])
        .load_str(
            "default-binder = \"redis\"\n[binders.redis]\ntype = \"redis\"\n\
             [bindings.out]\ndestination = \"d\"\n",
        )
        .expect("the seeds load without a cluster");
    let err = streams.source::<String>("out").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection);
    assert!(
        err.message()
            .contains("redis cluster at redis://127.0.0.1:1,redis://127.0.0.1:2 (1 attempt)"),
        "{err}"
    );
}

/// A cluster has database 0 only: seeds that select another are refused when the binder is
/// built, before any connection. Needs no cluster.
#[test]
fn cluster_seeds_selecting_a_database_are_a_config_error() {
    let err = RedisBinder::new(RedisConfig::with_nodes(["redis://127.0.0.1:1/2"])).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.message().contains("database 0 only"), "{err}");
}

/// Streams whose slots belong to each of the three masters: single sends, batches (one
/// transaction each) and group reads all reach the master that holds the stream, and the
/// acks land there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_every_master_serves_the_streams_of_its_slots() {
    let _lock = broker_lock(false).await;
    let Some(nodes) = cluster_nodes("cluster_every_master_serves_the_streams_of_its_slots") else {
        return;
    };
    let binder = cluster_binder(&nodes);
    for index in 0..nodes.len() {
        let stream = stream_on(&nodes, index, "spread").await;
        let group = common::unique("g");
        let consumer = binder
            .consumer(&stream, &ConsumerOptions::new(&group))
            .await
            .unwrap();
        let producer = binder.producer(&stream).await.unwrap();
        let mut ids = vec![producer.send(Message::new("single")).await.unwrap()];
        let batch = (0..50).map(|n| Message::new(n.to_string())).collect();
        ids.extend(producer.send_batch(batch).await.unwrap());
        let got = common::receive_until(&*consumer, PATIENCE, "the stream's entries", |got| {
            got.len() >= ids.len()
        })
        .await;
        let got_ids: Vec<&str> = got.iter().map(|r| r.message.id()).collect();
        assert_eq!(
            got_ids, ids,
            "every entry once, in order, on master {index}"
        );
        consumer
            .ack(&got.iter().map(|r| r.tag).collect::<Vec<_>>())
            .await
            .unwrap();

        // The master itself holds the stream and its group, with nothing left pending.
        let mut owner = common::raw(&nodes[index]).await;
        let len: usize = redis::cmd("XLEN")
            .arg(&stream)
            .query_async(&mut owner)
            .await
            .expect("the owner answers for its own key");
        assert_eq!(len, ids.len());
        assert_eq!(
            common::pending_settles(&mut owner, &stream, &group, 0).await,
            0
        );
        consumer.close().await.unwrap();
        producer.close().await.unwrap();
    }
}

/// The master that holds the stream is killed (-9) and restarted twice while a publisher and
/// a consumer group run: every entry whose `XADD` succeeded is handled, duplicates are
/// counted, and nothing is left pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_master_of_the_stream_killed_mid_stream_loses_no_acked_message() {
    const TEST: &str = "cluster_master_of_the_stream_killed_mid_stream_loses_no_acked_message";
    let _lock = broker_lock(true).await;
    let Some(nodes) = cluster_nodes(TEST) else {
        return;
    };
    let Some(restart) = restart_prefix(TEST) else {
        return;
    };
    let (stream, group) = (common::unique("kill"), common::unique("g"));
    let victim = owner_of(&nodes, &stream).await;
    let binder = cluster_binder(&nodes);
    let config = BindingConfig::new(&stream)
        .group(&group)
        .claim_idle(Duration::from_secs(2))
        // Below claim-idle, as a redis binder requires.
        .retry(RetryConfig {
            max_backoff: Duration::from_secs(1),
            ..RetryConfig::default()
        });
    let channel = Channel::new("cluster-kill", binder.clone(), config);
    // Entry id -> (payload, handlings).
    let handled: Arc<Mutex<HashMap<String, (u64, u32)>>> = Arc::default();
    let h = handled.clone();
    let subscription = channel
        .sink::<u64>()
        .subscribe_envelope(move |e: Envelope<u64>| {
            h.lock()
                .unwrap()
                .entry(e.message().id().to_owned())
                .or_insert((*e.payload(), 0))
                .1 += 1;
            async { Ok::<(), String>(()) }
        })
        .await
        .unwrap();

    const N: u64 = 600;
    let source = channel.source::<u64>().await.unwrap();
    let publisher = tokio::spawn(async move {
        let mut accepted = Vec::new();
        let mut refused = 0;
        for n in 0..N {
            loop {
                match source.send(&n).await {
                    Ok(id) => {
                        accepted.push(id);
                        break;
                    }
                    Err(e) => {
                        assert!(
                            e.is_temporary(),
                            "a send while the master is down fails with a temporary error: {e:?}"
                        );
                        refused += 1;
                        // Retry backoff for the publisher, not a stand-in for a condition.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }
        (accepted, refused)
    });

    let count = |handled: &Arc<Mutex<HashMap<String, (u64, u32)>>>| handled.lock().unwrap().len();
    for threshold in [N / 4, N / 2] {
        let deadline = Instant::now() + PATIENCE;
        while count(&handled) < threshold as usize {
            assert!(
                Instant::now() < deadline,
                "{threshold} handled before killing the master"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        restart_node(&restart, victim + 1)
            .await
            .expect("the master restarts");
    }
    let (accepted, refused) = publisher.await.unwrap();
    let deadline = Instant::now() + PATIENCE * 2;
    while !accepted
        .iter()
        .all(|id| handled.lock().unwrap().contains_key(id))
    {
        assert!(
            Instant::now() < deadline,
            "accepted messages not all handled"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    subscription.shutdown().await.unwrap();

    let handled = handled.lock().unwrap().clone();
    let lost = accepted
        .iter()
        .filter(|id| !handled.contains_key(*id))
        .count();
    // The same entry handled again (its ack lost in the crash).
    let redelivered: u32 = handled.values().map(|(_, c)| c - 1).sum();
    // An XADD whose reply was lost in the crash may have landed, and redis-rs sends a command
    // again after a dropped connection: the same payload in a second entry, never accepted
    // under that id.
    let accepted_set: HashSet<&String> = accepted.iter().collect();
    let landed_unconfirmed = handled
        .keys()
        .filter(|id| !accepted_set.contains(id))
        .count();
    let mut per_payload: HashMap<u64, u32> = HashMap::new();
    for (n, c) in handled.values() {
        *per_payload.entry(*n).or_default() += c;
    }
    let duplicates: u32 = per_payload.values().map(|c| c - 1).sum();
    report(&format!(
        "{TEST}: master {} (of {}) killed twice, {} accepted, {refused} sends refused and \
         retried, {} payloads handled, lost {lost}, duplicates {duplicates} ({redelivered} \
         entries handled again, {landed_unconfirmed} entries appended twice by a resent XADD)",
        victim + 1,
        nodes.len(),
        accepted.len(),
        per_payload.len()
    ));
    assert_eq!(lost, 0);
    assert_eq!(
        per_payload.len(),
        N as usize,
        "every payload handled, nothing foreign"
    );
    assert_eq!(accepted.len(), N as usize);
    assert_eq!(
        owner_of(&nodes, &stream).await,
        victim,
        "the restarted master kept its slots"
    );
    let mut owner = common::raw(&nodes[victim]).await;
    assert_eq!(
        common::pending(&mut owner, &stream, &group).await,
        0,
        "every handled message was acknowledged, and the acks survived the crashes"
    );
}

/// The slot of a stream is migrated to another master under a running producer and
/// consumer: the batch sent next (a transaction, which redis-rs does not redirect) and the
/// blocked read both find the new master, and nothing is lost or left pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_slot_moved_to_another_master_is_followed() {
    let _lock = broker_lock(true).await;
    let Some(nodes) = cluster_nodes("cluster_slot_moved_to_another_master_is_followed") else {
        return;
    };
    let stream = common::unique("moved");
    let group = common::unique("g");
    let slot = slot_of(&nodes, &stream).await;
    let from = owner_of_slot(&nodes, slot).await;
    let to = (from + 1) % nodes.len();

    let binder = cluster_binder(&nodes);
    let producer = binder.producer(&stream).await.unwrap();
    let consumer = binder
        .consumer(&stream, &ConsumerOptions::new(&group))
        .await
        .unwrap();
    let first: Vec<Message> = (0..20).map(|n| Message::new(n.to_string())).collect();
    let mut ids = producer.send_batch(first).await.unwrap();
    let mut got = common::receive_until(&*consumer, PATIENCE, "the first batch", |got| {
        got.len() >= 20
    })
    .await;
    consumer
        .ack(&got.iter().map(|r| r.tag).collect::<Vec<_>>())
        .await
        .unwrap();

    // The consumer is idle, so its next read blocks on the old master while the slot moves.
    let reader = {
        let consumer = Arc::new(consumer);
        let c = consumer.clone();
        let task = tokio::spawn(async move {
            common::receive_until(&**c, PATIENCE, "the batch sent after the move", |got| {
                got.len() >= 20
            })
            .await
        });
        (consumer, task)
    };
    move_slot(&nodes, slot, from, to).await;
    assert_eq!(owner_of_slot(&nodes, slot).await, to);

    let second: Vec<Message> = (20..40).map(|n| Message::new(n.to_string())).collect();
    ids.extend(
        producer
            .send_batch(second)
            .await
            .expect("the batch follows the slot to its new master"),
    );
    let (consumer, task) = reader;
    let after = task.await.unwrap();
    consumer
        .ack(&after.iter().map(|r| r.tag).collect::<Vec<_>>())
        .await
        .unwrap();
    got.extend(after);
    let got_ids: Vec<&str> = got.iter().map(|r| r.message.id()).collect();
    assert_eq!(got_ids, ids, "every entry once, in order, across the move");

    let mut new_owner = common::raw(&nodes[to]).await;
    let len: usize = redis::cmd("XLEN")
        .arg(&stream)
        .query_async(&mut new_owner)
        .await
        .expect("the new master answers for the stream");
    assert_eq!(len, 40);
    assert_eq!(
        common::pending_settles(&mut new_owner, &stream, &group, 0).await,
        0,
        "the acks reached the new master"
    );
    consumer.close().await.unwrap();
    producer.close().await.unwrap();
    // Leaves the cluster as scripts/redis-cluster.sh made it.
    move_slot(&nodes, slot, to, from).await;
}

/// Moves `slot` and its keys from master `from` to master `to` the way `redis-cli --cluster
/// reshard` does: IMPORTING/MIGRATING, MIGRATE of every key, then SETSLOT NODE everywhere.
async fn move_slot(nodes: &[String], slot: u16, from: usize, to: usize) {
    let mut conns = Vec::new();
    let mut ids = Vec::new();
    for url in nodes {
        let mut conn = common::raw(url).await;
        let id: String = redis::cmd("CLUSTER")
            .arg("MYID")
            .query_async(&mut conn)
            .await
            .expect("CLUSTER MYID");
        conns.push(conn);
        ids.push(id);
    }
    let setslot = |state: &str, node: &str| {
        let mut cmd = redis::cmd("CLUSTER");
        cmd.arg("SETSLOT").arg(slot).arg(state).arg(node);
        cmd
    };
    setslot("IMPORTING", &ids[from])
        .query_async::<()>(&mut conns[to])
        .await
        .expect("IMPORTING");
    setslot("MIGRATING", &ids[to])
        .query_async::<()>(&mut conns[from])
        .await
        .expect("MIGRATING");
    loop {
        let keys: Vec<String> = redis::cmd("CLUSTER")
            .arg("GETKEYSINSLOT")
            .arg(slot)
            .arg(100)
            .query_async(&mut conns[from])
            .await
            .expect("GETKEYSINSLOT");
        if keys.is_empty() {
            break;
        }
        let url = &nodes[to];
        let host = url
            .trim_start_matches("redis://")
            .rsplit_once(':')
            .unwrap()
            .0;
        redis::cmd("MIGRATE")
            .arg(host)
            .arg(port_of(url))
            .arg("")
            .arg(0)
            .arg(5000)
            .arg("KEYS")
            .arg(&keys)
            .query_async::<()>(&mut conns[from])
            .await
            .expect("MIGRATE");
    }
    // The new owner first, as redis-cli does, so that it never refuses its own slot.
    let mut order = vec![to, from];
    order.extend((0..nodes.len()).filter(|n| *n != to && *n != from));
    for n in order {
        setslot("NODE", &ids[to])
            .query_async::<()>(&mut conns[n])
            .await
            .expect("SETSLOT NODE");
    }
    // Every node agrees before the test goes on (the config epochs travel over the bus).
    let deadline = Instant::now() + PATIENCE;
    'agree: loop {
        assert!(
            Instant::now() < deadline,
            "nodes did not agree on slot {slot}"
        );
        for n in 0..nodes.len() {
            let view: Vec<String> = nodes
                .iter()
                .cycle()
                .skip(n)
                .take(nodes.len())
                .cloned()
                .collect();
            if owner_of_slot(&view, slot).await != (to + nodes.len() - n) % nodes.len() {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue 'agree;
            }
        }
        break;
    }
}

/// The ping goes to every master: one that does not answer (its clients paused with
/// `CLIENT PAUSE ... ALL`) fails it within its bound, with an error naming the seeds; it
/// answers again once that master does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_ping_needs_every_master() {
    let Some(nodes) = cluster_nodes("cluster_ping_needs_every_master") else {
        return;
    };
    // A paused master stalls the commands of every other test on it.
    let _lock = broker_lock(true).await;
    let binder = cluster_binder(&nodes);
    binder.ping().await.expect("every master answers");
    let pause = binder_redis::MAX_PING_WAIT * 2;
    for (index, node) in nodes.iter().enumerate() {
        let mut conn = common::raw(node).await;
        redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(pause.as_millis() as u64)
            .arg("ALL")
            .query_async::<()>(&mut conn)
            .await
            .expect("CLIENT PAUSE");
        let started = Instant::now();
        let err = binder.ping().await.expect_err("a master does not answer");
        let took = started.elapsed();
        assert_eq!(err.kind(), ErrorKind::Connection, "master {index}: {err}");
        assert!(
            err.message().contains(&nodes[0]),
            "master {index}: {err} names the seeds"
        );
        assert!(
            took < binder_redis::MAX_PING_WAIT + Duration::from_millis(500),
            "master {index}: took {took:?}"
        );
        let deadline = Instant::now() + PATIENCE;
        while let Err(e) = binder.ping().await {
            assert!(
                Instant::now() < deadline,
                "master {index} answers again: {e}"
            );
        }
    }
}

/// The lag of a group on a stream of each master, read by the script on that master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_lag_on_every_master() {
    let Some(nodes) = cluster_nodes("cluster_lag_on_every_master") else {
        return;
    };
    let _lock = broker_lock(false).await;
    let binder = cluster_binder(&nodes);
    for (index, node) in nodes.iter().enumerate() {
        let stream = stream_on(&nodes, index, "lag").await;
        let mut conn = common::raw(node).await;
        for n in 0..=index {
            redis::cmd("XADD")
                .arg(&stream)
                .arg("*")
                .arg("p")
                .arg(n)
                .query_async::<String>(&mut conn)
                .await
                .expect("XADD on the stream's master");
        }
        let consumer = binder
            .consumer(&stream, &ConsumerOptions::new(common::unique("g")))
            .await
            .unwrap();
        let backlog = index as u64 + 1;
        assert_eq!(
            consumer.lag().await.unwrap(),
            Some(backlog),
            "master {index}"
        );
        let got = common::receive_until(&*consumer, PATIENCE, "the backlog", |got| {
            got.len() as u64 >= backlog
        })
        .await;
        consumer
            .ack(&got.iter().map(|r| r.tag).collect::<Vec<_>>())
            .await
            .unwrap();
        let deadline = Instant::now() + PATIENCE;
        while consumer.lag().await.unwrap() != Some(0) {
            assert!(Instant::now() < deadline, "master {index}: acknowledged");
        }
        consumer.close().await.unwrap();
    }
}
