//! The broker is killed (-9) and restarted while messages flow. A binary of its own, so the
//! restart does not disturb tests running in parallel with it.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use binder_kafka::KafkaBinder;
use common::{account, brokers, config, eventually, skip_or_fail, unique};
use stream_core::{Binder, BindingConfig, Channel};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_stream_loses_no_acknowledged_message() {
    const TEST: &str = "broker_restart_mid_stream_loses_no_acknowledged_message";
    let Some(brokers) = brokers(TEST) else {
        return;
    };
    let Ok(restart) = std::env::var("STREAM_TEST_KAFKA_RESTART") else {
        skip_or_fail(TEST, "STREAM_TEST_KAFKA_RESTART is not set");
        return;
    };
    let binder: Arc<dyn Binder> = Arc::new(KafkaBinder::new(config(&brokers)).unwrap());
    let topic = unique("restart");
    let binding = BindingConfig::new(&topic).group(unique("g")).concurrency(4);
    let channel = Channel::new("restart", binder.clone(), binding);
    let source = channel.source::<u64>().await.unwrap();

    let handled = Arc::new(Mutex::new(BTreeMap::<u64, usize>::new()));
    let subscription = {
        let handled = handled.clone();
        channel
            .sink::<u64>()
            .subscribe(move |id: u64| {
                let handled = handled.clone();
                async move {
                    *handled.lock().unwrap().entry(id).or_default() += 1;
                    Ok::<(), String>(())
                }
            })
            .await
            .unwrap()
    };

    // Publishes until told to stop; a send that returned Ok is a message the broker has.
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (source, stop) = (source.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut accepted, mut failed) = (Vec::new(), Vec::new());
            let mut id = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match source.send_keyed(format!("key-{}", id % 8), &id).await {
                    Ok(_) => accepted.push(id),
                    Err(e) => failed.push((id, e.to_string())),
                }
                id += 1;
            }
            (accepted, failed)
        })
    };

    // Mid-stream: the consumer is busy when the broker dies.
    assert!(
        eventually(Duration::from_secs(60), || async {
            handled.lock().unwrap().len() >= 50
        })
        .await,
        "nothing was handled before the restart"
    );
    let before = handled.lock().unwrap().len();
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(&restart)
            .stdout(std::process::Stdio::null())
            .status()
    })
    .await
    .unwrap()
    .expect("run STREAM_TEST_KAFKA_RESTART");
    assert!(status.success(), "restart command failed: {status}");

    // Both sides resume: more messages are handled after the restart than before it.
    assert!(
        eventually(Duration::from_secs(90), || async {
            handled.lock().unwrap().len() >= before + 100
        })
        .await,
        "consumption did not resume after the restart ({before} handled before)"
    );
    stop.store(true, Ordering::Relaxed);
    let (accepted, failed) = publisher.await.unwrap();

    let complete = eventually(Duration::from_secs(90), || async {
        let handled = handled.lock().unwrap();
        accepted.iter().all(|id| handled.contains_key(id))
    })
    .await;
    let result = account(accepted.iter().copied(), &handled.lock().unwrap());
    eprintln!(
        "restart: {} accepted, {} sends failed (the caller saw an error), lost {}, duplicates {}",
        accepted.len(),
        failed.len(),
        result.lost.len(),
        result.duplicates
    );
    for (id, error) in failed.iter().take(5) {
        eprintln!("  send {id} failed: {error}");
    }
    assert!(
        complete && result.lost.is_empty(),
        "lost: {:?}",
        result.lost
    );
    subscription.shutdown().await.unwrap();
    binder.close().await.unwrap();
}
