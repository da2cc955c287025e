//! The binder against a three-node KRaft cluster (`scripts/kafka-cluster.sh`: replication
//! factor 3, `min.insync.replicas` 2), found through `STREAM_TEST_KAFKA_CLUSTER_BROKERS`.
//! `STREAM_TEST_KAFKA_CLUSTER_RESTART` is a command prefix: appending a broker number N (its
//! `node.id`, 1..3) and running it with `sh -c` kill -9s that broker and starts it again,
//! returning once it is back in every partition's ISR.
//!
//! Every test name contains `cluster`, so the cluster stage of `scripts/test.sh` runs exactly
//! these (`cargo test -- cluster`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use binder_kafka::{KafkaBinder, KafkaConfig};
use common::{account, eventually, unique};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::TopicPartitionList;
use stream_core::testing::{broker_lock, Capabilities, Harness};
use stream_core::{Binder, BindingConfig, Channel, Error, ErrorKind};

const BROKERS_VAR: &str = "STREAM_TEST_KAFKA_CLUSTER_BROKERS";
const RESTART_VAR: &str = "STREAM_TEST_KAFKA_CLUSTER_RESTART";
/// The replication factor `scripts/kafka-cluster.sh` configures as the brokers' default.
const CLUSTER_REPLICAS: usize = 3;

/// The cluster's bootstrap list, or None after a visible skip message (a failure under
/// `CI=true`). `scripts/test.sh` leaves these tests out of its single-broker stage with
/// `--skip cluster` and runs them in its cluster stage, which sets the variable.
fn cluster_brokers(_test: &str) -> Option<String> {
    stream_core::testing::service_env(BROKERS_VAR)
}

fn restart_prefix() -> Option<String> {
    std::env::var(RESTART_VAR)
        .ok()
        .filter(|command| !command.trim().is_empty())
}

/// Kill -9s broker `node` and starts it again; returns once it is back in sync.
async fn restart_node(prefix: &str, node: i32) -> stream_core::Result<()> {
    let command = format!("{} {node}", prefix.trim_end());
    let status = tokio::task::spawn_blocking({
        let command = command.clone();
        move || {
            std::process::Command::new("sh")
                .arg("-c")
                .arg(&command)
                .stdout(std::process::Stdio::null())
                .status()
        }
    })
    .await
    .map_err(|e| Error::new(ErrorKind::Broker, "restart task failed").with_source(e))?
    .map_err(|e| Error::new(ErrorKind::Broker, format!("cannot run `{command}`")).with_source(e))?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::Broker,
            format!("`{command}` failed: {status}"),
        ))
    }
}

/// The binder's settings for the cluster tests: those of the single-broker tests, with the
/// replication factor left to the brokers' default, as a deployment would.
fn cluster_config(brokers: &str) -> KafkaConfig {
    let mut config = common::config(brokers);
    config.replication_factor = None;
    config
}

struct ClusterHarness {
    brokers: String,
    restart: Option<String>,
    nodes: usize,
}

fn harness() -> Option<ClusterHarness> {
    let brokers = cluster_brokers("cluster::conformance (every case)")?;
    Some(ClusterHarness {
        nodes: brokers.split(',').filter(|b| !b.trim().is_empty()).count(),
        brokers,
        restart: restart_prefix(),
    })
}

#[async_trait::async_trait]
impl Harness for ClusterHarness {
    async fn binder(&self) -> Arc<dyn Binder> {
        Arc::new(KafkaBinder::new(cluster_config(&self.brokers)).expect("valid test settings"))
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
            .restart(self.restart.is_some())
            .counts_deliveries(false)
            // A key lives in one partition, and one member owns a partition at a time.
            .orders_keys_across_members(true)
            .claim_idle(Duration::from_secs(2))
            .patience(Duration::from_secs(45))
    }

    /// A rolling crash: every node in turn is killed (-9) and restarted, the next one only
    /// once the last is back in sync. Whichever nodes lead the case's partitions, coordinate
    /// its group or act as the active controller, each of them crashes once while the case's
    /// clients stay connected, and one node down at a time is what a three-node cluster with
    /// `min.insync.replicas = 2` promises to survive without refusing writes.
    async fn restart_broker(&self) -> stream_core::Result<()> {
        let Some(prefix) = self.restart.as_deref() else {
            return Err(Error::new(
                ErrorKind::Broker,
                format!("{RESTART_VAR} is not set"),
            ));
        };
        for node in 1..=self.nodes as i32 {
            restart_node(prefix, node).await?;
        }
        Ok(())
    }
}

mod cluster {
    stream_core::conformance_suite!(crate::harness());
}

/// Metadata and watermarks, read by a client of the test's own (no group is joined).
struct Inspector {
    client: Arc<BaseConsumer>,
    admin: AdminClient<DefaultClientContext>,
}

/// One partition as metadata reports it.
#[derive(Debug, Clone, PartialEq)]
struct PartitionState {
    leader: i32,
    replicas: Vec<i32>,
    isr: Vec<i32>,
}

impl Inspector {
    fn new(brokers: &str) -> Inspector {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", brokers);
        let admin = config.create().expect("admin client");
        // A metadata request must not create the topic it asks about. The group is only ever
        // looked up, never joined.
        config
            .set("allow.auto.create.topics", "false")
            .set("group.id", "stream-rs-cluster-inspector");
        Inspector {
            client: Arc::new(config.create().expect("inspector client")),
            admin,
        }
    }

    /// Node ids of the brokers in the cluster's metadata, sorted.
    async fn broker_ids(&self) -> Vec<i32> {
        let client = self.client.clone();
        tokio::task::spawn_blocking(move || {
            let metadata = client
                .fetch_metadata(None, Duration::from_secs(10))
                .expect("cluster metadata");
            let mut ids: Vec<i32> = metadata.brokers().iter().map(|b| b.id()).collect();
            ids.sort_unstable();
            ids
        })
        .await
        .unwrap()
    }

    /// The partitions of `topic` by id; empty while the topic is unknown.
    async fn partitions(&self, topic: &str) -> BTreeMap<i32, PartitionState> {
        let (client, topic) = (self.client.clone(), topic.to_owned());
        tokio::task::spawn_blocking(move || {
            // A broker that is down or just elected may fail the request: that reads as "not
            // known yet", and callers wait for the state they need.
            let Ok(metadata) = client.fetch_metadata(Some(&topic), Duration::from_secs(5)) else {
                return BTreeMap::new();
            };
            metadata
                .topics()
                .iter()
                .filter(|t| t.name() == topic && t.error().is_none())
                .flat_map(|t| t.partitions())
                .map(|p| {
                    (
                        p.id(),
                        PartitionState {
                            leader: p.leader(),
                            replicas: p.replicas().to_vec(),
                            isr: p.isr().to_vec(),
                        },
                    )
                })
                .collect()
        })
        .await
        .unwrap()
    }

    /// Waits until every partition of `topic` satisfies `check`; returns the last state seen.
    async fn wait_for(
        &self,
        topic: &str,
        limit: Duration,
        what: &str,
        check: impl Fn(&PartitionState) -> bool,
    ) -> BTreeMap<i32, PartitionState> {
        let deadline = Instant::now() + limit;
        loop {
            let state = self.partitions(topic).await;
            if !state.is_empty() && state.values().all(&check) {
                return state;
            }
            assert!(
                Instant::now() < deadline,
                "`{topic}` never reached: {what}; last metadata {state:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Creates `topic` with an explicit replica list per partition; the first replica of a
    /// list is the partition's preferred leader.
    async fn create(&self, topic: &str, assignment: &[Vec<i32>]) {
        let lists: Vec<&[i32]> = assignment.iter().map(Vec::as_slice).collect();
        let new_topic = NewTopic::new(
            topic,
            assignment.len() as i32,
            TopicReplication::Variable(&lists),
        );
        let results = self
            .admin
            .create_topics([&new_topic], &AdminOptions::new())
            .await
            .expect("create topic");
        for result in results {
            result.unwrap_or_else(|(name, code)| panic!("creating {name}: {code}"));
        }
    }

    /// A broker that leads a partition of the group offsets topic, and a new group name that
    /// this broker coordinates.
    ///
    /// Kafka stores a group's offsets in partition `abs(hashCode(group id)) % partitions` of
    /// `__consumer_offsets` (Java's `String.hashCode`), and the leader of that partition is
    /// the group's coordinator.
    async fn group_coordinated_by_a_leader(&self, topic: &str) -> (i32, String) {
        const OFFSETS: &str = "__consumer_offsets";
        // A coordinator lookup creates the offsets topic on a cluster that has had no group
        // yet; the offsets it returns do not matter.
        let (client, name) = (self.client.clone(), topic.to_owned());
        tokio::task::spawn_blocking(move || {
            let mut list = TopicPartitionList::new();
            list.add_partition(&name, 0);
            let _ = client.committed_offsets(list, Duration::from_secs(10));
        })
        .await
        .unwrap();
        let offsets = self
            .wait_for(OFFSETS, Duration::from_secs(30), "a leader", |p| {
                p.leader >= 0
            })
            .await;
        let coordinator_of = |group: &str| {
            let hash = group.encode_utf16().fold(0i32, |h, unit| {
                h.wrapping_mul(31).wrapping_add(i32::from(unit))
            });
            let partition = (hash & 0x7fff_ffff) % offsets.len() as i32;
            offsets[&partition].leader
        };
        let victim = offsets[&0].leader;
        let group = std::iter::repeat_with(|| unique("g"))
            .find(|group| coordinator_of(group) == victim)
            .expect("an endless supply of names");
        (victim, group)
    }

    /// The high watermark (offset of the next message) of each partition.
    async fn ends(&self, topic: &str, partitions: &[i32]) -> BTreeMap<i32, i64> {
        let (client, topic, partitions) =
            (self.client.clone(), topic.to_owned(), partitions.to_vec());
        tokio::task::spawn_blocking(move || {
            partitions
                .iter()
                .map(|&p| {
                    let (_, high) = client
                        .fetch_watermarks(&topic, p, Duration::from_secs(10))
                        .expect("watermarks");
                    (p, high)
                })
                .collect()
        })
        .await
        .unwrap()
    }
}

/// Topics the binder creates take the brokers' default replication factor, and an explicit
/// `replication-factor` overrides it; one larger than the cluster is refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_created_topics_are_replicated() {
    const TEST: &str = "cluster_created_topics_are_replicated";
    let Some(brokers) = cluster_brokers(TEST) else {
        return;
    };
    let _shared = broker_lock(false).await;
    let inspector = Inspector::new(&brokers);
    let nodes = inspector.broker_ids().await;
    assert_eq!(
        nodes.len(),
        CLUSTER_REPLICAS,
        "brokers in metadata: {nodes:?}"
    );

    let binder = KafkaBinder::new(cluster_config(&brokers)).unwrap();
    let topic = unique("cluster-replicated");
    binder.producer(&topic).await.unwrap();
    let state = inspector
        .wait_for(
            &topic,
            Duration::from_secs(30),
            "every replica in sync",
            |p| p.isr.len() == p.replicas.len(),
        )
        .await;
    assert_eq!(state.len(), 2, "partitions: {state:?}");
    for (partition, p) in &state {
        let replicas: BTreeSet<i32> = p.replicas.iter().copied().collect();
        assert_eq!(
            replicas.len(),
            CLUSTER_REPLICAS,
            "partition {partition} is not on every broker: {p:?}"
        );
    }

    let mut two = cluster_config(&brokers);
    two.replication_factor = Some(2);
    let binder = KafkaBinder::new(two).unwrap();
    let topic = unique("cluster-two-replicas");
    binder.producer(&topic).await.unwrap();
    let state = inspector
        .wait_for(&topic, Duration::from_secs(30), "metadata", |_| true)
        .await;
    assert!(
        state.values().all(|p| p.replicas.len() == 2),
        "replication-factor = 2: {state:?}"
    );

    let mut too_many = cluster_config(&brokers);
    too_many.replication_factor = Some(CLUSTER_REPLICAS as i16 + 1);
    let binder = KafkaBinder::new(too_many).unwrap();
    let topic = unique("cluster-too-many-replicas");
    let err = binder
        .producer(&topic)
        .await
        .err()
        .expect("more replicas than brokers");
    assert!(err.message().contains(&topic), "{err}");
    assert!(
        err.message().to_ascii_lowercase().contains("replication"),
        "{err}"
    );
}

/// The broker leading every partition of the test topic, and coordinating the consumer
/// group, is killed (-9) while a publisher and the group are busy, and restarted.
/// Leadership moves to the other replicas; publishing and consuming go on while the broker is
/// down; every message whose send succeeded is handled and committed: lost = 0. Every send
/// returns (none hangs) and a failed one fails with a temporary error; failed sends and
/// duplicates are counted and reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_leader_killed_mid_stream_loses_no_acknowledged_message() {
    const TEST: &str = "cluster_leader_killed_mid_stream_loses_no_acknowledged_message";
    // Sequential sends per publisher, each paced: about 200 messages a second in all, so the
    // run moves a few thousand messages on a two-core machine.
    const PUBLISHERS: u64 = 4;
    const PACE: Duration = Duration::from_millis(20);
    const PARTITIONS: usize = 3;
    let Some(brokers) = cluster_brokers(TEST) else {
        return;
    };
    let Some(restart) = restart_prefix() else {
        common::skip_or_fail(TEST, &format!("{RESTART_VAR} is not set"));
        return;
    };
    // Nothing else in this binary runs while a broker is down.
    let _exclusive = broker_lock(true).await;
    let inspector = Inspector::new(&brokers);
    let nodes = inspector.broker_ids().await;
    assert_eq!(
        nodes.len(),
        CLUSTER_REPLICAS,
        "brokers in metadata: {nodes:?}"
    );

    let topic = unique("cluster-failover");

    // One broker leads every partition of the topic and coordinates the group, so the kill
    // takes away every leader and the group's offset store at once.
    let (victim, group) = inspector.group_coordinated_by_a_leader(&topic).await;
    let followers: Vec<i32> = nodes.iter().copied().filter(|n| *n != victim).collect();
    let assignment: Vec<Vec<i32>> = (0..PARTITIONS)
        .map(|p| {
            let mut replicas = vec![victim];
            replicas.extend(followers.iter().cycle().skip(p).take(followers.len()));
            replicas
        })
        .collect();
    inspector.create(&topic, &assignment).await;
    let state = inspector
        .wait_for(
            &topic,
            Duration::from_secs(30),
            "led by the victim with every replica in sync",
            |p| p.leader == victim && p.isr.len() == CLUSTER_REPLICAS,
        )
        .await;
    assert_eq!(state.len(), PARTITIONS);

    // librdkafka's default session timeout rather than the 6 s of the other tests: losing the
    // coordinator takes several seconds to recover from (the dead broker's fencing, then the
    // offsets partition's new leader loading it), and a session that expires meanwhile makes
    // the member drop its partitions and wait, rejoining, for its old session to expire too.
    let config = cluster_config(&brokers).consumer_property("session.timeout.ms", "45000");
    let binder = Arc::new(KafkaBinder::new(config).unwrap());
    let binding = BindingConfig::new(&topic).group(&group).concurrency(4);
    let channel = Channel::new("failover", binder.clone() as Arc<dyn Binder>, binding);
    let source = channel.source::<u64>().await.unwrap();

    // id -> times handled; when each handling happened, to tell when consumption resumed.
    let handled = Arc::new(Mutex::new(BTreeMap::<u64, usize>::new()));
    let handled_at = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let subscription = {
        let (handled, handled_at) = (handled.clone(), handled_at.clone());
        channel
            .sink::<u64>()
            .subscribe(move |id: u64| {
                let (handled, handled_at) = (handled.clone(), handled_at.clone());
                async move {
                    *handled.lock().unwrap().entry(id).or_default() += 1;
                    handled_at.lock().unwrap().push(Instant::now());
                    Ok::<(), String>(())
                }
            })
            .await
            .unwrap()
    };
    let distinct = || handled.lock().unwrap().len();

    // Each publisher sends its own ids one after another and files each under the outcome
    // its send returned. A send that returns nothing within the delivery timeout (plus a
    // margin) is a hang: the caller would never learn what became of the message.
    let stop = Arc::new(AtomicBool::new(false));
    let accepted_count = Arc::new(AtomicU64::new(0));
    let send_limit = cluster_config(&brokers).delivery_timeout + Duration::from_secs(15);
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|first| {
            let (source, stop, accepted_count) =
                (source.clone(), stop.clone(), accepted_count.clone());
            tokio::spawn(async move {
                let (mut accepted, mut failed, mut hung) = (Vec::new(), Vec::new(), Vec::new());
                let mut pace = tokio::time::interval(PACE);
                pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut id = first;
                while !stop.load(Ordering::Relaxed) {
                    pace.tick().await;
                    let send = source.send_keyed(format!("key-{}", id % 16), &id);
                    match tokio::time::timeout(send_limit, send).await {
                        Ok(Ok(_)) => {
                            accepted.push(id);
                            accepted_count.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Err(e)) => failed.push((id, e)),
                        Err(_) => hung.push(id),
                    }
                    id += PUBLISHERS;
                }
                (accepted, failed, hung)
            })
        })
        .collect();

    // Mid-stream: both sides are busy when the leader dies.
    assert!(
        eventually(Duration::from_secs(60), || async { distinct() >= 400 }).await,
        "only {} handled before the kill",
        distinct()
    );
    let handled_before = distinct();
    let killed = Instant::now();
    let restarting = tokio::spawn({
        let restart = restart.clone();
        async move { restart_node(&restart, victim).await }
    });
    // While the victim is down, the controller hands leadership to an in-sync follower.
    let moved = inspector
        .wait_for(
            &topic,
            Duration::from_secs(60),
            "leadership moved off the killed broker",
            |p| p.leader >= 0 && p.leader != victim,
        )
        .await;
    // The failover takes seconds (the controller fences the dead broker after its session
    // timeout), by then everything fetched before the kill has been handled.
    let failed_over = Instant::now();
    let accepted_at_failover = accepted_count.load(Ordering::Relaxed);
    restarting
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("restarting broker {victim}: {e}"));
    let restarted = Instant::now();
    let handled_at_restart = distinct();
    let handled_while_down = handled_at
        .lock()
        .unwrap()
        .iter()
        .filter(|at| **at > failed_over)
        .count();
    let resumed = handled_at
        .lock()
        .unwrap()
        .iter()
        .filter(|at| **at > failed_over)
        .min()
        .map(|at| at.duration_since(killed));
    let timeline = format!(
        "after the kill: leadership moved by {:?}, restart done at {:?}, first handling after \
         the failover at {resumed:?}",
        failed_over.duration_since(killed),
        restarted.duration_since(killed)
    );
    // acks=all with two of three replicas in sync (min.insync.replicas = 2) keeps accepting
    // while the third is down or catching up.
    let accepted_while_down = accepted_count.load(Ordering::Relaxed) - accepted_at_failover;
    assert!(
        accepted_while_down > 0,
        "no send succeeded between the failover and the end of the restart"
    );
    // The new leaders serve fetches too: the group must not wait for the dead broker.
    assert!(
        handled_while_down > 0,
        "nothing was handled between the failover and the end of the restart; {timeline}"
    );

    // Both sides go on after the restart.
    assert!(
        eventually(Duration::from_secs(90), || async {
            distinct() >= handled_at_restart + 400
        })
        .await,
        "consumption did not go on after the restart ({handled_at_restart} handled)"
    );
    stop.store(true, Ordering::Relaxed);
    let (mut accepted, mut failed, mut hung) = (Vec::new(), Vec::new(), Vec::new());
    for publisher in publishers {
        let (a, f, h) = publisher.await.unwrap();
        accepted.extend(a);
        failed.extend(f);
        hung.extend(h);
    }

    let complete = eventually(Duration::from_secs(90), || async {
        let handled = handled.lock().unwrap();
        accepted.iter().all(|id| handled.contains_key(id))
    })
    .await;
    // Everything in the topic, including any message whose send failed but was written, is
    // acknowledged and committed by the group: the group coordinator's failover lost no
    // commit.
    let partitions: Vec<i32> = state.keys().copied().collect();
    let ends = inspector.ends(&topic, &partitions).await;
    let committed_all = eventually(Duration::from_secs(60), || async {
        binder.committed_offsets(&topic, &group).await.ok().as_ref() == Some(&ends)
    })
    .await;
    let committed = binder.committed_offsets(&topic, &group).await;
    subscription.shutdown().await.unwrap();
    binder.close().await.unwrap();

    let sent = accepted.len() + failed.len() + hung.len();
    let result = account(accepted.iter().copied(), &handled.lock().unwrap());
    let sent_ids: BTreeSet<u64> = accepted
        .iter()
        .chain(failed.iter().map(|(id, _)| id))
        .chain(&hung)
        .copied()
        .collect();
    let phantoms = handled
        .lock()
        .unwrap()
        .keys()
        .filter(|id| !sent_ids.contains(id))
        .count();
    // Straight to stderr: the test harness captures `eprintln!` of passing tests.
    let mut stderr = std::io::stderr();
    let _ = writeln!(
        stderr,
        "cluster failover: broker {victim} led partitions {partitions:?} and coordinated group \
         {group}; killed with {handled_before} handled, {handled_while_down} handled between \
         failover and restart end; {timeline}; leaders after the failover {:?}; {sent} sent: {} accepted \
         ({accepted_while_down} between failover and restart end), {} failed (the caller saw \
         an error), {} hung; lost {}, duplicates {}",
        moved
            .iter()
            .map(|(p, s)| (*p, s.leader))
            .collect::<Vec<_>>(),
        accepted.len(),
        failed.len(),
        hung.len(),
        result.lost.len(),
        result.duplicates,
    );
    for (id, error) in failed.iter().take(5) {
        let _ = writeln!(stderr, "  send {id} failed: {error}");
    }
    assert!(hung.is_empty(), "sends that never returned: {hung:?}");
    for (id, error) in &failed {
        assert!(
            error.is_temporary(),
            "send {id} failed with a non-temporary error: {error}"
        );
    }
    assert!(
        complete && result.lost.is_empty(),
        "lost {} acknowledged messages: {:?}",
        result.lost.len(),
        result.lost
    );
    assert_eq!(phantoms, 0, "handled ids that were never sent");
    assert!(
        committed_all,
        "committed offsets {committed:?} never reached the end of the topic {ends:?}"
    );
}
