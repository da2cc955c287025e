//! The shared conformance suite against a real redis-server (`STREAM_TEST_REDIS_URL`).

mod common;

use std::sync::Arc;
use std::time::Duration;

use stream_core::testing::{Capabilities, Harness};
use stream_core::Binder;

struct RedisHarness {
    url: String,
    restart: Option<String>,
}

impl RedisHarness {
    fn from_env() -> Option<RedisHarness> {
        let url = common::redis_url()?;
        // The suite prints its own skip message for the restart case.
        let restart = common::restart_env("conformance::broker_restart_mid_stream");
        Some(RedisHarness { url, restart })
    }
}

#[async_trait::async_trait]
impl Harness for RedisHarness {
    async fn binder(&self) -> Arc<dyn Binder> {
        common::binder(&self.url)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
            .restart(self.restart.is_some())
            .counts_deliveries(true)
            .claim_idle(Duration::from_millis(500))
    }

    async fn restart_broker(&self) -> stream_core::Result<()> {
        match &self.restart {
            Some(command) => common::restart_redis(command).await,
            None => Err(stream_core::Error::new(
                stream_core::ErrorKind::Broker,
                "STREAM_TEST_REDIS_RESTART is not set",
            )),
        }
    }
}

stream_core::conformance_suite!(RedisHarness::from_env());
