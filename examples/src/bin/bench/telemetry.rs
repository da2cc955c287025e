//! What `--telemetry` installs: the metrics recorder and `tracing` subscriber of an
//! instrumented service, so that rows measure the library with its metrics and spans on.

use std::time::Duration;

use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::Layer;

/// A Prometheus recorder (its upkeep on a thread, as its HTTP listener would run it) and a
/// formatting subscriber that enables stream-core's DEBUG spans and writes nowhere: span
/// creation, field recording and formatting are paid, writing to a terminal is not.
pub fn install() {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("no other metrics recorder is installed");
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(5));
        handle.run_upkeep();
    });
    let filter = Targets::new()
        .with_target("stream_core", LevelFilter::DEBUG)
        .with_default(LevelFilter::INFO);
    let subscriber = tracing_subscriber::registry().with(
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::sink)
            .with_filter(filter),
    );
    tracing::subscriber::set_global_default(subscriber).expect("no other subscriber");
    eprintln!("telemetry on: Prometheus recorder, stream_core spans at DEBUG");
}
