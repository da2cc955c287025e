//! The keepalive on a real redis-server, as an operator sees it: what it reports. The test
//! binary records the binder's warnings with a subscriber of its own.

mod common;

use std::fmt::Write as _;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use binder_redis::RedisConfig;
use stream_core::testing::broker_lock;
use stream_core::{Consumer, ConsumerOptions, Message};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

const PATIENCE: Duration = Duration::from_secs(20);

/// Keeps every warning and error as one line of `field=value` pairs.
#[derive(Default)]
struct Warnings {
    lines: Mutex<Vec<String>>,
}

struct Line(String);

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, "{}={:?} ", field.name(), value);
    }
}

impl Subscriber for Warnings {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        *metadata.level() <= Level::WARN
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut line = Line(String::new());
        event.record(&mut line);
        self.lines.lock().unwrap().push(line.0);
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

/// The warnings of this test binary so far, recording from the first call on.
fn warnings() -> Arc<Warnings> {
    static WARNINGS: OnceLock<Arc<Warnings>> = OnceLock::new();
    WARNINGS
        .get_or_init(|| {
            let warnings = Arc::new(Warnings::default());
            tracing::subscriber::set_global_default(warnings.clone())
                .expect("no other subscriber in this test binary");
            warnings
        })
        .clone()
}

/// Warnings that mention `text`.
fn warned(warnings: &Warnings, text: &str) -> Vec<String> {
    warnings
        .lines
        .lock()
        .unwrap()
        .iter()
        .filter(|line| line.contains(text))
        .cloned()
        .collect()
}

/// The `XACK` of an acknowledged entry rides on the next read, whose reply (and with it the
/// confirmation) comes only when its `BLOCK` ends; meanwhile the keepalive finds the entry no
/// longer pending. That is the acknowledgement landing, not another member taking over: no
/// warning about a takeover, which would blame a stall that never happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_entries_are_not_reported_taken_over() {
    let warnings = warnings();
    let _lock = broker_lock(false).await;
    let Some(url) = common::redis_url() else {
        return;
    };
    let (stream, group) = (common::unique("ack-race"), common::unique("g"));
    let binder = common::binder_with(RedisConfig {
        // Reads block long, and no claim sweep cuts them short.
        block: Duration::from_millis(1500),
        claim_interval: Some(Duration::from_secs(3600)),
        ..RedisConfig::with_url(&url)
    });
    // The keepalive goes round every 100 ms.
    let options = ConsumerOptions::new(&group).claim_idle(Duration::from_millis(300));
    let consumer: Arc<dyn Consumer> = binder.consumer(&stream, &options).await.unwrap().into();
    binder
        .producer(&stream)
        .await
        .unwrap()
        .send_batch((0..2).map(|n| Message::new(n.to_string())).collect())
        .await
        .unwrap();
    let got = common::receive_until(&*consumer, PATIENCE, "two entries", |g| g.len() >= 2).await;
    let mut raw = common::raw(&url).await;

    // The next read carries the XACK and blocks: nothing new comes.
    consumer.ack(&[got[0].tag]).await.unwrap();
    assert!(consumer.receive(16).await.unwrap().is_empty());
    assert_eq!(
        common::pending(&mut raw, &stream, &group).await,
        1,
        "the read carried the acknowledgement"
    );
    let false_alarms = warned(&warnings, &stream);
    assert!(
        false_alarms.is_empty(),
        "warnings while nothing went wrong: {false_alarms:?}"
    );

    consumer.ack(&[got[1].tag]).await.unwrap();
    consumer.close().await.unwrap();
}
