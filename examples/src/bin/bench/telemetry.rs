//! What `--telemetry` installs: the metrics recorder and `tracing` subscriber of an
//! instrumented service, so that rows measure the library with its metrics and spans on.

use std::time::Duration;

use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::Layer;

/// How much `--telemetry` turns on.
#[derive(Debug, Clone, Copy)]
pub enum Level {
    /// The Prometheus recorder alone.
    Metrics,
    /// The recorder and a formatting subscriber at INFO, as a service runs in production:
    /// the library's spans (DEBUG) are filtered out.
    Info,
    /// The recorder and the subscriber with stream-core's DEBUG spans on: a span per send
    /// and per attempt, as tracing every message costs.
    Debug,
}

impl std::str::FromStr for Level {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "metrics" => Ok(Level::Metrics),
            "info" => Ok(Level::Info),
            "debug" => Ok(Level::Debug),
            other => Err(format!("unknown telemetry level `{other}`")),
        }
    }
}

/// A Prometheus recorder (its upkeep on a thread, as its HTTP listener would run it) and,
/// above [`Level::Metrics`], a formatting subscriber that writes nowhere: span creation,
/// field recording and formatting are paid, writing to a terminal is not.
pub fn install(level: Level) {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("no other metrics recorder is installed");
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(5));
        handle.run_upkeep();
    });
    let stream_core = match level {
        Level::Metrics => {
            eprintln!("telemetry on: Prometheus recorder");
            return;
        }
        Level::Info => LevelFilter::INFO,
        Level::Debug => LevelFilter::DEBUG,
    };
    let filter = Targets::new()
        .with_target("stream_core", stream_core)
        .with_default(LevelFilter::INFO);
    let subscriber = tracing_subscriber::registry().with(
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::sink)
            .with_filter(filter),
    );
    tracing::subscriber::set_global_default(subscriber).expect("no other subscriber");
    eprintln!("telemetry on: Prometheus recorder, subscriber with stream_core at {stream_core}");
}
