//! Settings of `[binders.NAME] type = "memory"`.

use serde::Deserialize;

/// Settings of the in-memory binder.
///
/// ```toml
/// [binders.memory]
/// type = "memory"
/// retention = 100000
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct MemoryConfig {
    /// Messages kept per destination; the oldest go first. A group that falls further behind
    /// than this misses what was dropped, as with a broker's retention. Default: 1,000,000.
    #[serde(default = "default_retention")]
    pub retention: usize,
}

fn default_retention() -> usize {
    1_000_000
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            retention: default_retention(),
        }
    }
}
