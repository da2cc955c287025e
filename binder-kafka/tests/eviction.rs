//! A member thrown out of its consumer group, against librdkafka's mock cluster: it can be
//! told to answer a member's heartbeats with "unknown member" (what a coordinator answers a
//! member it evicted) and to answer nothing for a minute, which a real broker cannot be made
//! to do on cue. Runs without any service.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use binder_kafka::{KafkaBinder, KafkaConfig};
use common::{eventually, unique};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use stream_core::{Binder, BindingConfig, Channel, ConsumerOptions};

/// Counts the binder's warnings that a member lost its partitions to the group (the events
/// that carry a `lost_partitions` field), whichever thread logs them.
struct LostPartitions(Arc<AtomicUsize>);

struct HasLostPartitions(bool);

impl tracing::field::Visit for HasLostPartitions {
    fn record_debug(&mut self, field: &tracing::field::Field, _: &dyn std::fmt::Debug) {
        if field.name() == "lost_partitions" {
            self.0 = true;
        }
    }
}

impl tracing::Subscriber for LostPartitions {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        metadata.is_event() && *metadata.level() <= tracing::Level::WARN
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut visit = HasLostPartitions(false);
        event.record(&mut visit);
        if visit.0 {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// The coordinator drops a member whose handlers are busy (its heartbeats are answered
/// "unknown member"), then the cluster stops answering. Shutting the subscription down still
/// ends within a bound, dropping a consumer returns at once on a runtime thread, and the
/// runtime itself shuts down without waiting for librdkafka: a service can always stop.
#[test]
fn evicted_member_stops_in_bounded_time_and_never_blocks_the_runtime() {
    let lost = Arc::new(AtomicUsize::new(0));
    tracing::subscriber::set_global_default(LostPartitions(lost.clone()))
        .expect("the only subscriber of this test binary");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let evicted = runtime.block_on(async {
        let mock = MockCluster::new(1).unwrap();
        let topic = unique("evict");
        mock.create_topic(&topic, 2, 1).unwrap();
        mock.create_topic(&format!("{topic}.dlq"), 2, 1).unwrap();
        let mut settings = KafkaConfig::new(mock.bootstrap_servers())
            .consumer_property("session.timeout.ms", "3000")
            .consumer_property("heartbeat.interval.ms", "300");
        settings.commit_interval = Duration::from_millis(100);
        settings.partitions = 2;
        settings.connect_timeout = Duration::from_secs(5);
        let binder: Arc<dyn Binder> = Arc::new(KafkaBinder::new(settings).unwrap());
        let channel = Channel::new(
            "evict",
            binder.clone(),
            BindingConfig::new(&topic).group(unique("g")).concurrency(2),
        );
        let source = channel.source::<u64>().await.unwrap();
        let ids: Vec<u64> = (0..200).collect();
        source.send_batch(&ids).await.unwrap();
        let handled = Arc::new(Mutex::new(BTreeSet::<u64>::new()));
        let subscription = {
            let handled = handled.clone();
            channel
                .sink::<u64>()
                .subscribe(move |id: u64| {
                    handled.lock().unwrap().insert(id);
                    async {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Ok::<(), String>(())
                    }
                })
                .await
                .unwrap()
        };
        // A consumer of another group, made directly, to be dropped later.
        let direct = binder
            .consumer(&topic, &ConsumerOptions::new(unique("direct")))
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while direct.receive(10).await.unwrap().is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "direct got nothing");
        }
        assert!(
            eventually(Duration::from_secs(30), || async {
                handled.lock().unwrap().len() >= 5
            })
            .await,
            "handling never started"
        );

        // The coordinator no longer knows the members: they are out of their groups.
        mock.request_errors(
            RDKafkaApiKey::Heartbeat,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_MEMBER_ID; 8],
        );
        let evicted = eventually(Duration::from_secs(20), || async {
            lost.load(Ordering::Relaxed) > 0
        })
        .await;
        // Then the cluster answers nothing for a minute: neither a commit nor leaving the
        // group can complete before the bound.
        mock.broker_round_trip_time(1, Duration::from_secs(60))
            .unwrap();

        let stopping = Instant::now();
        let stopped = subscription.shutdown().await;
        let took = stopping.elapsed();
        eprintln!("shutdown after eviction took {took:?}: {stopped:?}");
        assert!(
            took < Duration::from_secs(20),
            "shutdown of an evicted member took {took:?}"
        );
        let dropping = Instant::now();
        drop(direct);
        let took = dropping.elapsed();
        assert!(
            took < Duration::from_millis(100),
            "dropping a consumer blocked its runtime thread for {took:?}"
        );
        evicted
    });
    let dropping = Instant::now();
    drop(runtime);
    let took = dropping.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "the runtime waited {took:?} for Kafka clients to close"
    );
    assert!(evicted, "the member never lost its partitions to the group");
}
