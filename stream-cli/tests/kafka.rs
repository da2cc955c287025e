//! The `stream` binary against the real Kafka that `scripts/test.sh` starts.

mod common;

use common::Setup;
use stream_core::testing::service_env;

fn kafka() -> Option<Setup> {
    let brokers = service_env("STREAM_TEST_KAFKA_BROKERS")?;
    Some(Setup::new(&format!(
        "type = \"kafka\"\nbrokers = \"{brokers}\""
    )))
}

#[test]
fn publish_then_tail_shows_the_message() {
    if let Some(setup) = kafka() {
        common::publish_then_tail_shows_the_message(&setup);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_is_listed_sent_back_and_handled_once_the_handler_is_fixed() {
    if let Some(setup) = kafka() {
        common::a_dead_letter_is_listed_sent_back_and_handled_once_the_handler_is_fixed(&setup)
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redrive_killed_half_way_and_run_again_loses_nothing() {
    if let Some(setup) = kafka() {
        common::a_redrive_killed_half_way_and_run_again_loses_nothing(&setup).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_mid_run_loses_nothing() {
    let (Some(setup), Some(url)) = (kafka(), common::postgres()) else {
        return;
    };
    common::a_relay_killed_mid_run_loses_nothing(&setup, &url).await;
}
