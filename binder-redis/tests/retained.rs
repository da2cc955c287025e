//! The shared conformance suite again, with acknowledged retention trimming every 50 ms
//! (`trim = { acknowledged = true }`): the delivery contract holds while acknowledged entries
//! are being removed under the consumers. Without the restart case (the plain suite has it).

mod common;

use std::sync::Arc;
use std::time::Duration;

use binder_redis::{RedisConfig, TrimConfig};
use stream_core::testing::{Capabilities, Harness};
use stream_core::Binder;

struct RetainedHarness {
    url: String,
}

impl RetainedHarness {
    fn from_env() -> Option<RetainedHarness> {
        Some(RetainedHarness {
            url: common::redis_url()?,
        })
    }
}

#[async_trait::async_trait]
impl Harness for RetainedHarness {
    async fn binder(&self) -> Arc<dyn Binder> {
        let mut config = RedisConfig::with_url(&self.url);
        config.trim = Some(TrimConfig {
            max_len: None,
            max_age: None,
            approximate: false,
            acknowledged: true,
            interval: Duration::from_millis(50),
        });
        common::binder_with(config)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
            .counts_deliveries(true)
            .claim_idle(Duration::from_millis(500))
    }
}

stream_core::conformance_suite!(RetainedHarness::from_env());
