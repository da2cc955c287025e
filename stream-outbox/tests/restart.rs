//! The relay across a PostgreSQL crash: killed with SIGKILL and started again on the same
//! data, the database comes back, and the relay reconnects (claims and `LISTEN`) and
//! publishes what is committed before and after. In a test binary of its own: the restart
//! would break the connections of tests running beside it.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{connect, postgres, unique_table, wait_for, Placed, Seen};
use stream_core::testing::service_env;
use stream_core::Envelope;
use stream_outbox::{Outbox, Relay};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_carries_on_after_postgres_crashes() {
    let (Some(url), Some(restart)) = (postgres(), service_env("STREAM_TEST_POSTGRES_RESTART"))
    else {
        return;
    };
    let outbox = Outbox::with_table(&unique_table("outbox")).unwrap();
    outbox.install(&connect(&url).await).await.unwrap();
    let (streams, _) = common::streams(&common::brokers()[0]);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let recorder = seen.clone();
    let subscription = streams
        .sink::<Placed>("audit")
        .unwrap()
        .subscribe_envelope(move |envelope: Envelope<Placed>| {
            Seen::record(&recorder, &envelope);
            async { Ok::<(), std::io::Error>(()) }
        })
        .await
        .unwrap();
    let relay = Relay::new(outbox.reader(&url).unwrap(), streams.clone()).spawn();
    let write = |range: std::ops::Range<u64>| {
        let (url, outbox) = (url.clone(), outbox.clone());
        async move {
            let mut client = connect(&url).await;
            for n in range {
                let tx = client.transaction().await.unwrap();
                let event = Placed { key: "k".into(), n };
                outbox.send(&tx, "orders-out", "k", &event).await.unwrap();
                tx.commit().await.unwrap();
            }
        }
    };
    write(0..200).await;
    wait_for(Duration::from_secs(60), "the first 200 arrive", || {
        seen.lock().unwrap().distinct() == 200
    })
    .await;

    let command = restart.clone();
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(&command)
            .stdout(std::process::Stdio::null())
            .status()
    })
    .await
    .unwrap()
    .unwrap();
    assert!(status.success(), "restarting PostgreSQL: {restart}");

    write(200..400).await;
    wait_for(
        Duration::from_secs(60),
        "the 200 written after the crash arrive",
        || seen.lock().unwrap().distinct() == 400,
    )
    .await;
    relay.shutdown().await.unwrap();
    subscription.shutdown().await.unwrap();
    let seen = seen.lock().unwrap();
    eprintln!(
        "across a PostgreSQL crash: 400 of 400 arrived, duplicates {}",
        seen.duplicates()
    );
    seen.first_arrivals_in_order().unwrap();
}
