//! The configuration file: binders, bindings and their policies.
//!
//! ```toml
//! default-binder = "memory"
//!
//! [binders.memory]
//! type = "memory"
//!
//! [bindings.orders-out]
//! destination = "order-events"
//!
//! [bindings.payments-in]
//! destination = "order-events"
//! group = "payment-service"
//! concurrency = 4
//! prefetch = 256
//! retry = { max-attempts = 3, initial-backoff = "100ms", max-backoff = "5s", multiplier = 2.0 }
//! dead-letter = "order-events.dlq"
//! ```
//!
//! Environment variables override the file: `STREAM_DEFAULT_BINDER=kafka` sets
//! `default-binder`, and `STREAM_BINDINGS__PAYMENTS_IN__CONCURRENCY=8` sets
//! `bindings.payments-in.concurrency` (`__` separates levels, `_` stands for `-`). Only
//! `STREAM_DEFAULT_BINDER`, `STREAM_BINDERS__*` and `STREAM_BINDINGS__*` are read; other
//! `STREAM_*` variables are left to their owners.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::binder::StartFrom;
use crate::{Error, ErrorKind, Result};

/// The whole file, after environment overrides.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Config {
    /// Binder used by bindings that name none. Default: the only binder declared, if there is
    /// exactly one.
    #[serde(default)]
    pub default_binder: Option<String>,
    /// Binders by name; each has a `type` and the settings of that type.
    #[serde(default)]
    pub binders: BTreeMap<String, BinderConfig>,
    /// Bindings by name.
    #[serde(default)]
    pub bindings: BTreeMap<String, BindingConfig>,
}

/// One `[binders.NAME]` table: a `type` plus settings that the binder of that type checks.
#[derive(Debug, Clone)]
pub struct BinderConfig {
    /// The binder type, matched against the registry (`memory`, `redis`, `kafka`).
    pub kind: String,
    /// Every other key of the table, passed to the binder's factory as it is.
    pub settings: toml::Table,
}

impl<'de> Deserialize<'de> for BinderConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut settings = toml::Table::deserialize(deserializer)?;
        match settings.remove("type") {
            Some(toml::Value::String(kind)) => Ok(BinderConfig { kind, settings }),
            Some(other) => Err(serde::de::Error::custom(format!(
                "`type` must be a string, found {}",
                other.type_str()
            ))),
            None => Err(serde::de::Error::missing_field("type")),
        }
    }
}

/// One `[bindings.NAME]` table: ties code to a destination, a group, a binder and policies.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct BindingConfig {
    /// The broker-side name: a Redis stream key, a Kafka topic, a memory log. Required.
    pub destination: String,
    /// The binder to use. Default: `default-binder`.
    #[serde(default)]
    pub binder: Option<String>,
    /// Consumer group. Default: none, which makes each consumer an anonymous group of its own
    /// that starts at the latest message and is not durable.
    #[serde(default)]
    pub group: Option<String>,
    /// How many handler calls run at once, across keys; one key is always handled in order.
    /// Default: 1.
    #[serde(default = "defaults::concurrency")]
    pub concurrency: usize,
    /// The most un-acknowledged deliveries a consumer holds in memory. Default: 512, so one
    /// read can carry about 500 messages, the batch a hand-written consumer would ask for
    /// (on Redis with `appendfsync always`, each round trip costs an fsync). A binder may
    /// read ahead a bounded amount below this (Kafka: at most another `prefetch` messages and
    /// `fetch-queue-kbytes`), never in proportion to the backlog.
    #[serde(default = "defaults::prefetch")]
    pub prefetch: usize,
    /// Redelivery policy for handler errors. Default: see [`RetryConfig`].
    #[serde(default)]
    pub retry: RetryConfig,
    /// Where messages go after the last attempt or when they cannot be decoded.
    /// Default: the destination followed by `.dlq`.
    #[serde(default)]
    pub dead_letter: Option<String>,
    /// Where a new durable group starts: `earliest` or `latest`. Default: `earliest`.
    /// Anonymous groups always start at `latest`.
    #[serde(default)]
    pub start_from: StartFrom,
    /// Largest payload a source accepts, in bytes; larger sends fail with
    /// [`ErrorKind::PayloadTooLarge`] before reaching the broker. Default: 1 MiB.
    #[serde(default = "defaults::max_payload_bytes")]
    pub max_payload_bytes: usize,
    /// How long another member's delivery may sit un-acknowledged before this member takes it
    /// over, on binders that recover by idle time (Redis). Default: 30 s.
    #[serde(default = "defaults::claim_idle", with = "duration")]
    pub claim_idle: Duration,
    /// How often a consumer samples its lag for the `stream_consumer_lag` gauge
    /// ([`Consumer::lag`](crate::Consumer::lag)); `"0s"` never does. Default: 10 s.
    #[serde(default = "defaults::lag_interval", with = "duration")]
    pub lag_interval: Duration,
    /// How long one handler attempt may run: an attempt that runs longer fails (retried,
    /// then dead-lettered, like any failure) and its future is dropped, so the handler
    /// stops at its next `.await`. Keep it below `claim-idle` on Redis (past that, another
    /// member may take the message over while it runs) and below Kafka's
    /// `max.poll.interval.ms`; `shutdown-timeout` still bounds how long a stopping
    /// subscription waits for attempts in flight. Applies to handler-style subscriptions,
    /// single and batch; a pull-style stream times its own work. Default: none.
    #[serde(default, with = "duration::option")]
    pub handler_timeout: Option<Duration>,
    /// The most messages a batch handler ([`Sink::subscribe_batch`](crate::Sink::subscribe_batch))
    /// gets at once; at most `prefetch` (a batch subscription refuses to start otherwise).
    /// Default: 100.
    #[serde(default = "defaults::batch_size")]
    pub batch_size: usize,
    /// How long a batch handler waits for a batch to fill, from its first message; what
    /// arrived by then goes as a smaller batch. Default: 100 ms.
    #[serde(default = "defaults::batch_wait", with = "duration")]
    pub batch_wait: Duration,
    /// Drops deliveries whose message id ([`header::MESSAGE_ID`](crate::header::MESSAGE_ID))
    /// the binding's group already handled: see [`DedupConfig`]. Default: none.
    #[serde(default)]
    pub dedup: Option<DedupConfig>,
    /// How long a graceful shutdown waits for in-flight handlers before giving up on them;
    /// what they did not finish stays un-acknowledged and is delivered again. Default: 30 s.
    #[serde(default = "defaults::shutdown_timeout", with = "duration")]
    pub shutdown_timeout: Duration,
    /// Splits the destination into this many partitions: a message goes to the partition of
    /// its key ([`partition_for`](crate::partition_for)), so one key stays in one partition
    /// and in order; messages without a key are spread round-robin. Kafka uses the topic's
    /// partitions; Redis and memory use one stream or log per partition, named
    /// `DESTINATION:{P}`. Producers and consumers of a destination must agree on it.
    /// Default: none, one unpartitioned destination.
    #[serde(default)]
    pub partitions: Option<u32>,
    /// This instance's number, from 0, among `instance-count` instances of a partitioned
    /// consumer group: it reads the partitions `p` with `p % instance-count == instance-index`.
    /// Usually set per instance through `STREAM_BINDINGS__NAME__INSTANCE_INDEX`. Default: 0.
    #[serde(default)]
    pub instance_index: u32,
    /// How many instances share a partitioned consumer group, each reading only its own
    /// partitions. Default: 1, which on Kafka leaves the assignment to the group's rebalancing
    /// and elsewhere reads every partition.
    #[serde(default = "defaults::instance_count")]
    pub instance_count: u32,
}

impl BindingConfig {
    /// A binding to `destination` with every default.
    pub fn new(destination: impl Into<String>) -> Self {
        BindingConfig {
            destination: destination.into(),
            binder: None,
            group: None,
            concurrency: defaults::concurrency(),
            prefetch: defaults::prefetch(),
            retry: RetryConfig::default(),
            dead_letter: None,
            start_from: StartFrom::default(),
            max_payload_bytes: defaults::max_payload_bytes(),
            claim_idle: defaults::claim_idle(),
            lag_interval: defaults::lag_interval(),
            handler_timeout: None,
            dedup: None,
            batch_size: defaults::batch_size(),
            batch_wait: defaults::batch_wait(),
            shutdown_timeout: defaults::shutdown_timeout(),
            partitions: None,
            instance_index: 0,
            instance_count: defaults::instance_count(),
        }
    }

    /// Sets the consumer group.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// Sets the concurrency.
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency;
        self
    }

    /// Sets the prefetch bound.
    pub fn prefetch(mut self, prefetch: usize) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// Sets the retry policy.
    pub fn retry(mut self, retry: RetryConfig) -> Self {
        self.retry = retry;
        self
    }

    /// Sets the dead-letter destination.
    pub fn dead_letter(mut self, destination: impl Into<String>) -> Self {
        self.dead_letter = Some(destination.into());
        self
    }

    /// Sets the start position of a new group.
    pub fn start_from(mut self, start_from: StartFrom) -> Self {
        self.start_from = start_from;
        self
    }

    /// Sets the payload limit.
    pub fn max_payload_bytes(mut self, max: usize) -> Self {
        self.max_payload_bytes = max;
        self
    }

    /// Sets the idle time before takeover.
    pub fn claim_idle(mut self, idle: Duration) -> Self {
        self.claim_idle = idle;
        self
    }

    /// Sets how often the consumer samples its lag (zero: never).
    pub fn lag_interval(mut self, interval: Duration) -> Self {
        self.lag_interval = interval;
        self
    }

    /// Sets the graceful-shutdown deadline.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Bounds each handler attempt to `timeout`.
    pub fn handler_timeout(mut self, timeout: Duration) -> Self {
        self.handler_timeout = Some(timeout);
        self
    }

    /// Sets a batch handler's largest batch and how long it waits for one to fill.
    pub fn batch(mut self, size: usize, wait: Duration) -> Self {
        self.batch_size = size;
        self.batch_wait = wait;
        self
    }

    /// Makes the consumer idempotent: ids handled within `ttl` are not handled again.
    pub fn dedup(mut self, store: impl Into<String>, ttl: Duration) -> Self {
        self.dedup = Some(DedupConfig {
            store: store.into(),
            ttl,
        });
        self
    }

    /// Splits the destination into `partitions` partitions.
    pub fn partitions(mut self, partitions: u32) -> Self {
        self.partitions = Some(partitions);
        self
    }

    /// Makes this consumer instance `index` of `count` that share the partitions.
    pub fn instance(mut self, index: u32, count: u32) -> Self {
        self.instance_index = index;
        self.instance_count = count;
        self
    }

    /// The partitions this instance consumes, in order; `None` when the binding is not
    /// partitioned.
    pub fn assigned_partitions(&self) -> Option<Vec<u32>> {
        let partitions = self.partitions?;
        let count = self.instance_count.max(1);
        Some(
            (0..partitions)
                .filter(|p| p % count == self.instance_index)
                .collect(),
        )
    }

    /// The dead-letter destination, default applied.
    pub fn dead_letter_destination(&self) -> String {
        self.dead_letter
            .clone()
            .unwrap_or_else(|| format!("{}.dlq", self.destination))
    }

    pub(crate) fn validate(&self, name: &str) -> Result<()> {
        let bad = |what: &str| {
            Err(Error::new(
                ErrorKind::Config,
                format!("bindings.{name}: {what}"),
            ))
        };
        if self.destination.is_empty() {
            return bad("`destination` must not be empty");
        }
        if self
            .group
            .as_deref()
            .is_some_and(|group| group.starts_with(crate::ANONYMOUS_GROUP_PREFIX))
        {
            return bad(&format!(
                "`group` names starting with `{}` are reserved for consumers without a group \
                 (binders may delete such groups once their consumer is gone); pick another name",
                crate::ANONYMOUS_GROUP_PREFIX
            ));
        }
        if self.concurrency == 0 {
            return bad("`concurrency` must be at least 1");
        }
        if self.prefetch == 0 {
            return bad("`prefetch` must be at least 1");
        }
        if self.retry.max_attempts == 0 {
            return bad("`retry.max-attempts` must be at least 1");
        }
        if self.batch_size == 0 {
            return bad("`batch-size` must be at least 1");
        }
        if self.handler_timeout == Some(Duration::ZERO) {
            return bad("`handler-timeout` must be above 0 (leave it out for none)");
        }
        if !(self.retry.multiplier >= 1.0 && self.retry.multiplier.is_finite()) {
            return bad("`retry.multiplier` must be a finite number >= 1.0");
        }
        if self.partitions == Some(0) {
            return bad("`partitions` must be at least 1");
        }
        if self.instance_count == 0 {
            return bad("`instance-count` must be at least 1");
        }
        if self.instance_index >= self.instance_count {
            return bad(&format!(
                "`instance-index` {} is out of range for `instance-count` {} (indexes start at 0)",
                self.instance_index, self.instance_count
            ));
        }
        if self.instance_count > 1 {
            match self.partitions {
                None => {
                    return bad("`instance-count` above 1 needs `partitions`: instances share a group by splitting its partitions")
                }
                Some(partitions) if self.instance_index >= partitions => {
                    return bad(&format!(
                        "instance {} of {} would read no partition: there are only {partitions}",
                        self.instance_index, self.instance_count
                    ))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

/// Redelivery with exponential backoff: attempt `n` (from 1) that fails waits
/// `min(initial-backoff * multiplier^(n-1), max-backoff)` before attempt `n + 1`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RetryConfig {
    /// Handler calls before a message is dead-lettered, the first included. Default: 3.
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: u32,
    /// Wait after the first failure. Default: 1 s.
    #[serde(default = "defaults::initial_backoff", with = "duration")]
    pub initial_backoff: Duration,
    /// Longest wait. Default: 10 s.
    #[serde(default = "defaults::max_backoff", with = "duration")]
    pub max_backoff: Duration,
    /// Growth factor between waits. Default: 2.0.
    #[serde(default = "defaults::multiplier")]
    pub multiplier: f64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: defaults::max_attempts(),
            initial_backoff: defaults::initial_backoff(),
            max_backoff: defaults::max_backoff(),
            multiplier: defaults::multiplier(),
        }
    }
}

impl RetryConfig {
    /// The wait after failed attempt `attempt` (counting from 1).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(64) as i32;
        let secs = self.initial_backoff.as_secs_f64() * self.multiplier.powi(exp);
        let capped = secs.min(self.max_backoff.as_secs_f64());
        Duration::try_from_secs_f64(capped).unwrap_or(self.max_backoff)
    }
}

pub(crate) mod defaults {
    use std::time::Duration;
    pub fn instance_count() -> u32 {
        1
    }
    pub fn concurrency() -> usize {
        1
    }
    pub fn prefetch() -> usize {
        512
    }
    pub fn max_payload_bytes() -> usize {
        1024 * 1024
    }
    pub fn claim_idle() -> Duration {
        Duration::from_secs(30)
    }
    pub fn shutdown_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn dedup_ttl() -> Duration {
        Duration::from_secs(24 * 3600)
    }
    pub fn batch_size() -> usize {
        100
    }
    pub fn batch_wait() -> Duration {
        Duration::from_millis(100)
    }
    pub fn lag_interval() -> Duration {
        Duration::from_secs(10)
    }
    pub fn max_attempts() -> u32 {
        3
    }
    pub fn initial_backoff() -> Duration {
        Duration::from_secs(1)
    }
    pub fn max_backoff() -> Duration {
        Duration::from_secs(10)
    }
    pub fn multiplier() -> f64 {
        2.0
    }
}

/// An idempotent consumer (`dedup = { store = "...", ttl = "24h" }` on a binding): a
/// delivery whose message id the group handled successfully within `ttl` is acknowledged
/// without calling the handler.
///
/// The id is checked before the handler and marked after it succeeded, so a process that
/// dies between the two handles the message again when it comes back, and two copies
/// handled at the same moment by two members may both run: the store removes duplicates of
/// handled messages, not the at-least-once window of one handling. For effects in a
/// PostgreSQL database, `stream_outbox::PgDedup::subscribe` closes that window (the handler
/// writes in the transaction that marks the id).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct DedupConfig {
    /// Where handled ids are kept: `memory` (this process only; tests and single instances),
    /// the name of a binder in `[binders]` that keeps them (Redis: a key with a TTL per id,
    /// shared by every instance), or a store named in code with
    /// [`StreamsBuilder::dedup_store`](crate::StreamsBuilder::dedup_store) (PostgreSQL:
    /// `stream_outbox::PgDedup`). Required.
    pub store: String,
    /// How long an id is remembered. Default: 24 h.
    #[serde(default = "defaults::dedup_ttl", with = "duration")]
    pub ttl: Duration,
}

/// Durations written as `"250ms"`, `"5s"`, `"1m 30s"` (humantime syntax).
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    /// Deserializes a humantime string.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration `{text}` ({e}); write it like \"250ms\" or \"5s\""
            ))
        })
    }

    /// An optional duration: absent means none.
    pub mod option {
        use std::time::Duration;

        use serde::Deserializer;

        /// Deserializes a humantime string when the key is present.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            super::deserialize(d).map(Some)
        }
    }
}

impl Config {
    /// Parses TOML text, applying `overrides` (environment-style `(name, value)` pairs with
    /// the given prefix). `origin` names the file in error messages.
    pub fn parse<I>(text: &str, origin: &str, prefix: &str, overrides: I) -> Result<Config>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!("{origin}: {}", e.message().trim()),
            )
            .with_source(e)
        })?;
        apply_overrides(&mut table, origin, prefix, overrides)?;
        Config::from_table(table, origin)
    }

    fn from_table(mut table: toml::Table, origin: &str) -> Result<Config> {
        // Sections are deserialized one by one so an error can say where it is.
        let bindings = table.remove("bindings");
        let binders = table.remove("binders");
        let top: TopLevel = deserialize_value(toml::Value::Table(table), origin, "the top level")?;
        let mut config = Config {
            default_binder: top.default_binder,
            binders: BTreeMap::new(),
            bindings: BTreeMap::new(),
        };
        for (name, value) in section(binders, origin, "binders")? {
            let place = format!("binders.{name}");
            config
                .binders
                .insert(name, deserialize_value(value, origin, &place)?);
        }
        for (name, value) in section(bindings, origin, "bindings")? {
            let place = format!("bindings.{name}");
            let binding: BindingConfig = deserialize_value(value, origin, &place)?;
            binding
                .validate(&name)
                .map_err(|e| Error::new(ErrorKind::Config, format!("{origin}: {}", e.message())))?;
            config.bindings.insert(name, binding);
        }
        Ok(config)
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct TopLevel {
    #[serde(default)]
    default_binder: Option<String>,
    // Listed so a misspelt section name gets a suggestion; taken out before this is parsed.
    #[serde(default)]
    #[allow(dead_code)]
    binders: Option<toml::Value>,
    #[serde(default)]
    #[allow(dead_code)]
    bindings: Option<toml::Value>,
}

fn section(value: Option<toml::Value>, origin: &str, name: &str) -> Result<toml::Table> {
    match value {
        None => Ok(toml::Table::new()),
        Some(toml::Value::Table(t)) => Ok(t),
        Some(other) => Err(Error::new(
            ErrorKind::Config,
            format!(
                "{origin}: `{name}` must be a table, found {}",
                other.type_str()
            ),
        )),
    }
}

/// Deserializes one section, turning serde's unknown-field error into one that names the
/// place and suggests the nearest valid key.
pub(crate) fn deserialize_value<T: serde::de::DeserializeOwned>(
    value: toml::Value,
    origin: &str,
    place: &str,
) -> Result<T> {
    T::deserialize(value).map_err(|e| {
        let text = e.to_string();
        let text = text.trim();
        let message = match unknown_field(text) {
            Some((field, expected)) => {
                let hint = match nearest(&field, &expected) {
                    Some(best) => format!("did you mean `{best}`?"),
                    None => format!("valid keys: {}", expected.join(", ")),
                };
                format!("{origin}: unknown key `{field}` in {place}; {hint}")
            }
            None => format!("{origin}: {place}: {text}"),
        };
        Error::new(ErrorKind::Config, message).with_source(e)
    })
}

/// Reads serde's `unknown field `x`, expected one of `a`, `b`` message.
fn unknown_field(text: &str) -> Option<(String, Vec<String>)> {
    let rest = text.strip_prefix("unknown field `")?;
    let (field, rest) = rest.split_once('`')?;
    let expected = rest
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    Some((field.to_owned(), expected))
}

/// The candidate closest to `word` by edit distance, if it is close enough to be a typo.
pub(crate) fn nearest<S: AsRef<str>>(word: &str, candidates: &[S]) -> Option<String> {
    candidates
        .iter()
        .map(|c| (edit_distance(word, c.as_ref()), c.as_ref()))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.to_owned())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(row[j]).min(row[j + 1])
            };
            prev = cur;
        }
    }
    row[b.len()]
}

/// Applies `PREFIX_A__B_C=value` as `a.b-c = value`. Values are read as TOML scalars when they
/// parse as one (`8`, `true`, `2.5`), as strings otherwise.
///
/// A variable may define a binding or binder the file lacks, but only whole: one that sets a
/// key of a binding without a `destination` (or of a binder without a `type`) is almost
/// always a misspelt name, and the error names the variable and the nearest name the file has.
fn apply_overrides<I>(
    table: &mut toml::Table,
    origin: &str,
    prefix: &str,
    overrides: I,
) -> Result<()>
where
    I: IntoIterator<Item = (String, String)>,
{
    let head = format!("{prefix}_");
    // Only the file's own sections are overridable; other PREFIX_* variables (the path of
    // the file, test settings) belong to someone else and are left alone.
    let ours = |rest: &str| {
        rest == "DEFAULT_BINDER" || rest.starts_with("BINDERS__") || rest.starts_with("BINDINGS__")
    };
    let mut pairs: Vec<(String, String)> = overrides
        .into_iter()
        .filter(|(name, _)| name.strip_prefix(&head).is_some_and(ours))
        .collect();
    pairs.sort();
    let in_file = |section: &str, table: &toml::Table| -> Vec<String> {
        match table.get(section) {
            Some(toml::Value::Table(t)) => t.keys().cloned().collect(),
            _ => Vec::new(),
        }
    };
    let file_names = [
        ("bindings", in_file("bindings", table)),
        ("binders", in_file("binders", table)),
    ];
    // (section, name) of entries the file lacks → the variables that set them.
    let mut created: BTreeMap<(&str, String), Vec<String>> = BTreeMap::new();
    for (name, raw) in pairs {
        let path: Vec<String> = name[head.len()..]
            .split("__")
            .map(|part| part.to_ascii_lowercase().replace('_', "-"))
            .collect();
        if path.iter().any(String::is_empty) {
            return Err(Error::new(
                ErrorKind::Config,
                format!("environment variable {name}: empty key segment"),
            ));
        }
        if path.len() >= 2 {
            for (section, names) in &file_names {
                if path[0] == *section && !names.contains(&path[1]) {
                    created
                        .entry((section, path[1].clone()))
                        .or_default()
                        .push(name.clone());
                }
            }
        }
        let value = scalar(&raw);
        let mut node = &mut *table;
        for part in &path[..path.len() - 1] {
            let entry = node
                .entry(part.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            node = match entry {
                toml::Value::Table(t) => t,
                _ => {
                    return Err(Error::new(
                        ErrorKind::Config,
                        format!("environment variable {name}: `{part}` is not a table"),
                    ))
                }
            };
        }
        node.insert(path[path.len() - 1].clone(), value);
    }
    for ((section, entry), variables) in created {
        let required = if section == "bindings" {
            "destination"
        } else {
            "type"
        };
        let defined = table
            .get(section)
            .and_then(|s| s.get(&entry))
            .and_then(|e| e.get(required))
            .is_some();
        if defined {
            continue;
        }
        let names = &file_names
            .iter()
            .find(|(s, _)| *s == section)
            .map(|(_, names)| names.as_slice())
            .unwrap_or_default();
        let hint = match nearest(&entry, names) {
            Some(best) => format!("; did you mean `{best}`?"),
            None if names.is_empty() => format!("; it defines no {section}"),
            None => format!("; it defines: {}", names.join(", ")),
        };
        let upper = entry.to_ascii_uppercase().replace('-', "_");
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "environment variable {} sets {section}.{entry}, which {origin} does not define{hint} \
                 (to define it from the environment, set {head}{}__{upper}__{} too)",
                variables.join(", "),
                section.to_ascii_uppercase(),
                required.to_ascii_uppercase(),
            ),
        ));
    }
    Ok(())
}

fn scalar(raw: &str) -> toml::Value {
    #[derive(Deserialize)]
    struct Probe {
        v: toml::Value,
    }
    match toml::from_str::<Probe>(&format!("v = {raw}")) {
        Ok(Probe { v }) if !v.is_table() && !v.is_array() => v,
        _ => toml::Value::String(raw.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config> {
        Config::parse(text, "streams.toml", "STREAM", Vec::new())
    }

    #[test]
    fn full_example_parses_with_defaults() {
        let c = parse(
            r#"
            default-binder = "memory"
            [binders.memory]
            type = "memory"
            [bindings.payments-in]
            destination = "order-events"
            group = "payment-service"
            concurrency = 4
            retry = { max-attempts = 5, initial-backoff = "100ms", max-backoff = "5s", multiplier = 2.0 }
            "#,
        )
        .unwrap();
        let b = &c.bindings["payments-in"];
        assert_eq!(b.concurrency, 4);
        assert_eq!(b.prefetch, 512);
        assert_eq!(b.retry.max_attempts, 5);
        assert_eq!(b.retry.initial_backoff, Duration::from_millis(100));
        assert_eq!(b.dead_letter_destination(), "order-events.dlq");
        assert_eq!(c.binders["memory"].kind, "memory");
    }

    #[test]
    fn typo_in_binding_key_names_place_and_suggestion() {
        let err = parse("[bindings.in]\ndestination = \"d\"\nprefech = 5\n").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(
            err.message()
                .contains("unknown key `prefech` in bindings.in"),
            "{err}"
        );
        assert!(err.message().contains("did you mean `prefetch`?"), "{err}");
        assert!(err.message().starts_with("streams.toml"), "{err}");
    }

    #[test]
    fn typo_in_nested_and_top_level_keys() {
        let err =
            parse("[bindings.in]\ndestination = \"d\"\nretry = { max-attempt = 2 }\n").unwrap_err();
        assert!(
            err.message().contains("did you mean `max-attempts`?"),
            "{err}"
        );
        let err = parse("default-bindr = \"x\"\n").unwrap_err();
        assert!(
            err.message().contains("did you mean `default-binder`?"),
            "{err}"
        );
    }

    #[test]
    fn bad_values_are_reported() {
        let err = parse("[bindings.in]\ndestination = \"d\"\nconcurrency = 0\n").unwrap_err();
        assert!(err.message().contains("concurrency"), "{err}");
        let err = parse("[bindings.in]\ndestination = \"d\"\nclaim-idle = \"soon\"\n").unwrap_err();
        assert!(err.message().contains("invalid duration `soon`"), "{err}");
        let err = parse("[binders.x]\nurl = \"u\"\n").unwrap_err();
        assert!(err.message().contains("missing field `type`"), "{err}");
    }

    #[test]
    fn environment_overrides_beat_the_file() {
        let env = vec![
            ("STREAM_DEFAULT_BINDER".to_owned(), "kafka".to_owned()),
            (
                "STREAM_BINDINGS__PAYMENTS_IN__CONCURRENCY".to_owned(),
                "8".to_owned(),
            ),
            ("STREAM_BINDERS__KAFKA__TYPE".to_owned(), "kafka".to_owned()),
            ("OTHER_THING".to_owned(), "ignored".to_owned()),
            ("STREAM_TEST_REDIS_URL".to_owned(), "not ours".to_owned()),
            ("STREAM_CONFIG".to_owned(), "not ours".to_owned()),
        ];
        let c = Config::parse(
            "default-binder = \"memory\"\n[bindings.payments-in]\ndestination = \"d\"\nconcurrency = 2\n",
            "streams.toml",
            "STREAM",
            env,
        )
        .unwrap();
        assert_eq!(c.default_binder.as_deref(), Some("kafka"));
        assert_eq!(c.bindings["payments-in"].concurrency, 8);
        assert_eq!(c.binders["kafka"].kind, "kafka");
    }

    #[test]
    fn an_override_of_a_binding_the_file_lacks_names_the_variable_and_the_nearest_binding() {
        let file = "[bindings.orders]\ndestination = \"d\"\n[binders.redis]\ntype = \"redis\"\n";
        let var = |name: &str, value: &str| vec![(name.to_owned(), value.to_owned())];
        let err = Config::parse(
            file,
            "streams.toml",
            "STREAM",
            var("STREAM_BINDINGS__ORDRS__CONCURRENCY", "8"),
        )
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        let text = err.message();
        assert!(
            text.contains("STREAM_BINDINGS__ORDRS__CONCURRENCY"),
            "{text}"
        );
        assert!(text.contains("did you mean `orders`?"), "{text}");
        assert!(!text.contains("missing field"), "{text}");
        let err = Config::parse(
            file,
            "streams.toml",
            "STREAM",
            var("STREAM_BINDERS__REDDIS__URL", "redis://x"),
        )
        .unwrap_err();
        assert!(
            err.message().contains("STREAM_BINDERS__REDDIS__URL"),
            "{err}"
        );
        assert!(err.message().contains("did you mean `redis`?"), "{err}");
        // A whole binding from the environment is fine.
        let c = Config::parse(
            file,
            "streams.toml",
            "STREAM",
            vec![
                (
                    "STREAM_BINDINGS__EXTRA__DESTINATION".to_owned(),
                    "x".to_owned(),
                ),
                (
                    "STREAM_BINDINGS__EXTRA__CONCURRENCY".to_owned(),
                    "2".to_owned(),
                ),
            ],
        )
        .unwrap();
        assert_eq!(c.bindings["extra"].concurrency, 2);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let r = RetryConfig {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(350),
            multiplier: 2.0,
        };
        assert_eq!(r.backoff(1), Duration::from_millis(100));
        assert_eq!(r.backoff(2), Duration::from_millis(200));
        assert_eq!(r.backoff(3), Duration::from_millis(350));
    }

    #[test]
    fn nearest_only_suggests_close_names() {
        assert_eq!(
            nearest("kafak", &["kafka", "memory"]).as_deref(),
            Some("kafka")
        );
        assert_eq!(nearest("zzzzzz", &["kafka", "memory"]), None);
    }

    #[test]
    fn partitioned_instances_come_from_file_and_environment() {
        let c = Config::parse(
            "[bindings.in]\ndestination = \"d\"\ngroup = \"g\"\npartitions = 6\ninstance-count = 3\n",
            "streams.toml",
            "STREAM",
            vec![("STREAM_BINDINGS__IN__INSTANCE_INDEX".to_owned(), "2".to_owned())],
        )
        .unwrap();
        let b = &c.bindings["in"];
        assert_eq!(
            (b.partitions, b.instance_index, b.instance_count),
            (Some(6), 2, 3)
        );
        assert_eq!(b.assigned_partitions(), Some(vec![2, 5]));
        assert_eq!(BindingConfig::new("d").assigned_partitions(), None);
    }

    #[test]
    fn binding_settings_that_cannot_work_are_refused() {
        for (extra, complaint) in [
            ("partitions = 0", "`partitions` must be at least 1"),
            ("instance-count = 0", "`instance-count` must be at least 1"),
            (
                "partitions = 4\ninstance-count = 2\ninstance-index = 2",
                "out of range",
            ),
            ("instance-count = 2", "needs `partitions`"),
            ("group = \"anonymous.billing\"", "reserved"),
            ("batch-size = 0", "`batch-size` must be at least 1"),
            (
                "handler-timeout = \"0s\"",
                "`handler-timeout` must be above 0",
            ),
            (
                "partitions = 2\ninstance-count = 3\ninstance-index = 2",
                "would read no partition",
            ),
        ] {
            let err = parse(&format!("[bindings.in]\ndestination = \"d\"\n{extra}\n")).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Config);
            assert!(err.message().contains(complaint), "{extra}: {err}");
        }
    }
}
