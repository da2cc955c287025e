//! The shared conformance suite, run on the Kafka binder against a real broker.

mod common;

use std::sync::Arc;
use std::time::Duration;

use binder_kafka::KafkaBinder;
use stream_core::testing::{service_env, Capabilities, Harness};
use stream_core::{Binder, Error, ErrorKind};

struct KafkaHarness {
    brokers: String,
    /// `STREAM_TEST_KAFKA_RESTART`: a shell command that kill -9s the broker and starts it
    /// again on the same port and data.
    restart: Option<String>,
}

fn harness() -> Option<KafkaHarness> {
    Some(KafkaHarness {
        brokers: service_env("STREAM_TEST_KAFKA_BROKERS")?,
        restart: std::env::var("STREAM_TEST_KAFKA_RESTART")
            .ok()
            .filter(|command| !command.trim().is_empty()),
    })
}

#[async_trait::async_trait]
impl Harness for KafkaHarness {
    async fn binder(&self) -> Arc<dyn Binder> {
        // A binder per call: its own producer and consumers, as another process would have.
        Arc::new(KafkaBinder::new(common::config(&self.brokers)).expect("valid test settings"))
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
            .restart(self.restart.is_some())
            // Kafka keeps no per-message delivery count; redeliveries report 1.
            .counts_deliveries(false)
            // A key lives in one partition, and one member owns a partition at a time.
            .orders_keys_across_members(true)
            // Takeover is by rebalance, not idle time: a dropped member leaves its group at
            // once, and a silent one is noticed after session.timeout.ms (6 s in tests).
            .claim_idle(Duration::from_secs(2))
            .patience(Duration::from_secs(45))
    }

    async fn restart_broker(&self) -> stream_core::Result<()> {
        let Some(command) = self.restart.clone() else {
            return Err(Error::new(
                ErrorKind::Broker,
                "STREAM_TEST_KAFKA_RESTART is not set",
            ));
        };
        let status = tokio::task::spawn_blocking(move || {
            std::process::Command::new("sh")
                .arg("-c")
                .arg(&command)
                .stdout(std::process::Stdio::null())
                .status()
        })
        .await
        .map_err(|e| Error::new(ErrorKind::Broker, "restart task failed").with_source(e))?
        .map_err(|e| {
            Error::new(ErrorKind::Broker, "cannot run the restart command").with_source(e)
        })?;
        if status.success() {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::Broker,
                format!("the restart command failed: {status}"),
            ))
        }
    }
}

stream_core::conformance_suite!(harness());
