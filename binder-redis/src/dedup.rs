//! Handled message ids for idempotent consumers ([`stream_core::dedup::DedupStore`]): one
//! key per id with a TTL, shared by every instance of a group, on a single server or a
//! cluster (one key per command).

use std::time::Duration;

use async_trait::async_trait;
use stream_core::dedup::DedupStore;
use stream_core::Result;

use crate::connection::{command_error, millis};
use crate::RedisBinder;

/// Prefix of the keys that hold handled ids.
const PREFIX: &str = "stream:dedup:";

/// The [`DedupStore`] of a [`RedisBinder`], on its command connection.
pub(crate) struct RedisDedup {
    pub(crate) binder: RedisBinder,
}

fn key(scope: &str, id: &str) -> String {
    format!("{PREFIX}{scope}:{id}")
}

#[async_trait]
impl DedupStore for RedisDedup {
    async fn handled(&self, scope: &str, id: &str) -> Result<bool> {
        let mut conn = self.binder.commands().await?;
        redis::cmd("EXISTS")
            .arg(key(scope, id))
            .query_async(&mut conn)
            .await
            .map_err(|e| command_error("EXISTS", e))
    }

    async fn mark(&self, scope: &str, id: &str, ttl: Duration) -> Result<()> {
        let mut conn = self.binder.commands().await?;
        redis::cmd("SET")
            .arg(key(scope, id))
            .arg(1)
            .arg("PX")
            .arg(millis(ttl).max(1))
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| command_error("SET", e))
    }
}
