//! The `stream` binary against the real redis-server (and Redis Cluster) that
//! `scripts/test.sh` starts.

mod common;

use common::Setup;
use serde_json::Value;
use stream_core::testing::service_env;
use stream_core::HandlerError;

fn redis() -> Option<Setup> {
    let url = service_env("STREAM_TEST_REDIS_URL")?;
    Some(Setup::new(&format!("type = \"redis\"\nurl = \"{url}\"")))
}

#[test]
fn publish_then_tail_shows_the_message() {
    if let Some(setup) = redis() {
        common::publish_then_tail_shows_the_message(&setup);
    }
}

#[test]
fn errors_are_one_line_and_name_what_is_wrong() {
    if let Some(setup) = redis() {
        common::errors_are_one_line_and_name_what_is_wrong(&setup);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_is_listed_sent_back_and_handled_once_the_handler_is_fixed() {
    if let Some(setup) = redis() {
        common::a_dead_letter_is_listed_sent_back_and_handled_once_the_handler_is_fixed(&setup)
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redrive_killed_half_way_and_run_again_loses_nothing() {
    if let Some(setup) = redis() {
        common::a_redrive_killed_half_way_and_run_again_loses_nothing(&setup).await;
    }
}

/// The same operations on a three-master Redis Cluster, where the stream and its
/// dead-letter stream live on different masters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_tail_and_redrive_on_a_redis_cluster() {
    let Some(urls) = service_env("STREAM_TEST_REDIS_CLUSTER_URLS") else {
        return;
    };
    let nodes: Vec<String> = urls.split(',').map(|u| format!("\"{u}\"")).collect();
    let setup = Setup::new(&format!("type = \"redis\"\nnodes = [{}]", nodes.join(", ")));
    setup.run(&[
        "publish",
        "orders-out",
        "--key",
        "o-9",
        r#"{"amount_cents":-1}"#,
    ]);
    let tail = common::stdout(&setup.run(&[
        "tail",
        "orders-out",
        "--from",
        "earliest",
        "--count",
        "1",
        "--format",
        "json",
    ]));
    let message: Value = serde_json::from_str(tail.trim()).unwrap();
    assert_eq!(message["key"], "o-9");

    let streams = setup.streams();
    let sink = streams.sink::<Value>("orders-in").unwrap();
    let broken = sink
        .subscribe(|_: Value| async { Err::<(), _>(HandlerError::reject("negative amount")) })
        .await
        .unwrap();
    let dlq = format!("{}.dlq", setup.destination);
    common::wait_until("the order is dead-lettered", || {
        let (streams, setup, dlq) = (&streams, &setup, dlq.clone());
        async move { setup.held(streams, &dlq).await.len() == 1 }
    })
    .await;
    broken.shutdown().await.unwrap();
    let inspect = common::stdout(&setup.run(&["inspect", "orders-in"]));
    assert!(
        inspect.contains("dead letters 1") && inspect.contains("payments"),
        "{inspect}"
    );
    let redriven = common::stdout(&setup.run(&["dlq", "redrive", "orders-in"]));
    assert!(redriven.contains("sent back 1 dead letters"), "{redriven}");
    assert!(setup.held(&streams, &dlq).await.is_empty());
    assert_eq!(
        setup.held(&streams, &setup.destination).await.len(),
        2,
        "the original and its redriven copy"
    );
    streams.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_mid_run_loses_nothing() {
    let (Some(setup), Some(url)) = (redis(), common::postgres()) else {
        return;
    };
    common::a_relay_killed_mid_run_loses_nothing(&setup, &url).await;
}
