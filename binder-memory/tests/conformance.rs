//! The shared conformance suite, run on the in-memory binder.

use std::sync::Arc;

use binder_memory::MemoryBinder;
use stream_core::testing::{Capabilities, Harness};
use stream_core::Binder;

/// Every case gets its own broker; there is nothing to share or restart.
struct MemoryHarness;

#[async_trait::async_trait]
impl Harness for MemoryHarness {
    async fn binder(&self) -> Arc<dyn Binder> {
        Arc::new(SHARED.clone())
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
}

// Members of one case must meet on one broker, as they would on a real one.
static SHARED: std::sync::LazyLock<MemoryBinder> = std::sync::LazyLock::new(MemoryBinder::new);

stream_core::conformance_suite!(Some(MemoryHarness));
