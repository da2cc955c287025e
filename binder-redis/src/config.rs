//! The `[binders.NAME]` settings of a `type = "redis"` binder.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use stream_core::{Error, ErrorKind, Result};

/// Settings of a Redis binder, read from a `[binders.NAME]` table with `type = "redis"`.
///
/// Every key is optional:
///
/// ```toml
/// [binders.redis]
/// type = "redis"
/// url = "rediss://redis.internal:6380/0"
/// username = "orders"
/// password = "s3cret"
/// consumer-prefix = "order-service"
/// block = "2s"
/// trim = { max-len = 1000000 }
/// ```
///
/// A Redis Cluster is named by its seed nodes instead of `url`:
///
/// ```toml
/// [binders.redis]
/// type = "redis"
/// nodes = ["redis://10.0.0.1:6379", "redis://10.0.0.2:6379", "redis://10.0.0.3:6379"]
/// ```
///
/// The password, whether under `password` or inside `url` or `nodes`, never appears in
/// `Debug` output, logs or error messages.
#[derive(Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RedisConfig {
    /// Where Redis listens: `redis://[user[:password]@]host[:port][/db]`, or `rediss://` for
    /// TLS. Default: `redis://127.0.0.1:6379`.
    #[serde(default = "defaults::url")]
    pub url: String,
    /// Seed nodes of a Redis Cluster, each written like `url` but without `/db` (a cluster has
    /// database 0 only): `["redis://10.0.0.1:6379", "redis://10.0.0.2:6379"]`, or one string
    /// with the URLs separated by commas (as an environment variable holds them). When set,
    /// the binder talks to the cluster: it learns the other masters and the slot map from
    /// whichever seed answers, follows `MOVED`/`ASK` redirects, and `url` must be left out.
    /// One seed is enough; more let the binder start while some are down. Default: empty,
    /// one standalone server at `url`.
    #[serde(default, deserialize_with = "node_list")]
    pub nodes: Vec<String>,
    /// ACL user name, replacing one given in `url`. Default: the one in `url`, else none.
    #[serde(default, deserialize_with = "scalar_text")]
    pub username: Option<String>,
    /// Password, replacing one given in `url`. Default: the one in `url`, else none.
    #[serde(default, deserialize_with = "scalar_text")]
    pub password: Option<String>,
    /// Start of every consumer name; a unique suffix is added per consumer instance, so that
    /// `XINFO CONSUMERS` shows which service holds what. Default: `consumer`.
    #[serde(default = "defaults::consumer_prefix")]
    pub consumer_prefix: String,
    /// How long one `XREADGROUP` waits for new entries (`BLOCK`) before the consumer loop
    /// looks at pending work again. Short keeps shutdown and takeover prompt. Default: 2 s.
    #[serde(default = "defaults::block", with = "stream_core::config::duration")]
    pub block: Duration,
    /// How often a consumer runs `XAUTOCLAIM` for entries other members left idle. Default:
    /// half the binding's `claim-idle`.
    #[serde(default, deserialize_with = "optional_duration")]
    pub claim_interval: Option<Duration>,
    /// How long a consumer may show no sign of life before other members of the stream
    /// count it as dead: its name is then removed from its group once it holds nothing,
    /// and an anonymous group (`anonymous.*`, made by core for a binding without `group`)
    /// whose consumers are all dead is destroyed. Live consumers show themselves at least
    /// every `min(claim-idle / 3, consumer-expiry / 10, 10s)`, so the default leaves a wide
    /// margin; every process sharing the streams should use the same value. Default: 5 min.
    #[serde(
        default = "defaults::consumer_expiry",
        with = "stream_core::config::duration"
    )]
    pub consumer_expiry: Duration,
    /// Trimming applied by every `XADD`. Default: none, the stream grows until trimmed by
    /// someone else.
    #[serde(default)]
    pub trim: Option<TrimConfig>,
    /// Time allowed for one TCP (and TLS) connection attempt. Default: 5 s.
    #[serde(
        default = "defaults::connect_timeout",
        with = "stream_core::config::duration"
    )]
    pub connect_timeout: Duration,
    /// Connection attempts before giving up, with backoff from 100 ms doubling to 2 s between
    /// them; used at first connect and again on every reconnect. Default: 5.
    #[serde(default = "defaults::connect_attempts")]
    pub connect_attempts: u32,
    /// Longest wait for the reply to one command; the blocking read gets `block` on top.
    /// Also how long a send keeps trying while Redis refuses it (restarting, loading its
    /// data) before it returns the error. Default: 5 s.
    #[serde(
        default = "defaults::command_timeout",
        with = "stream_core::config::duration"
    )]
    pub command_timeout: Duration,
    /// PEM file of the certificate authorities to trust for `rediss://`, instead of the
    /// system's. Default: the system's trust store.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS; needs `tls-key-file`. Default: none.
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls-cert-file`. Default: none.
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
}

/// How much of a stream is kept: `trim = { acknowledged = true }` (what every group has
/// acknowledged goes), a bound (`max-len = N` or `max-age = "24h"`), or both.
///
/// `acknowledged`: every `interval`, each producer trims its stream to the oldest entry
/// some group still needs (unread, or read and pending), in one round trip; nothing a group
/// has not acknowledged goes. A stream without groups is not trimmed by it.
///
/// A bound is applied by every `XADD` and removes entries whatever the groups did with
/// them: an entry a lagging group has not read yet is gone for that group, and one that is
/// pending is acknowledged and reported when its consumer or a claimer meets it. Beside
/// `acknowledged` it is a safety valve for a group that stops reading: when it removes
/// entries a group still needed, the next retention run logs a warning and counts
/// `stream_redis_retention_unread_dropped_total{destination, group}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TrimConfig {
    /// Keep about this many entries (`MAXLEN`). Default: unset; set this or `max-age`.
    #[serde(default)]
    pub max_len: Option<u64>,
    /// Drop entries older than this (`MINID` computed from the clock at each `XADD`).
    /// Default: unset; set this or `max-len`.
    #[serde(default, deserialize_with = "optional_duration")]
    pub max_age: Option<Duration>,
    /// Let Redis trim whole macro nodes only (`~`), which is much cheaper than trimming
    /// exactly (`=`). Default: true.
    #[serde(default = "defaults::approximate")]
    pub approximate: bool,
    /// Trim what every group has acknowledged, every `interval`. Default: false.
    #[serde(default)]
    pub acknowledged: bool,
    /// How often `acknowledged` trims. Default: 10 s.
    #[serde(
        default = "defaults::retention_interval",
        with = "stream_core::config::duration"
    )]
    pub interval: Duration,
}

/// What trimming a validated [`TrimConfig`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trim {
    MaxLen(u64),
    MaxAge(Duration),
}

impl TrimConfig {
    /// The bound every `XADD` applies, if any.
    pub(crate) fn strategy(&self) -> Result<Option<Trim>> {
        if self.acknowledged && self.interval.is_zero() {
            return Err(config_error("`trim.interval` must be longer than zero"));
        }
        match (self.max_len, self.max_age) {
            (Some(n), None) => Ok(Some(Trim::MaxLen(n))),
            (None, Some(age)) if !age.is_zero() => Ok(Some(Trim::MaxAge(age))),
            (None, Some(_)) => Err(config_error("`trim.max-age` must be longer than zero")),
            (Some(_), Some(_)) => Err(config_error(
                "`trim` takes one of `max-len` and `max-age`, not both (XADD trims by one)",
            )),
            (None, None) if self.acknowledged => Ok(None),
            (None, None) => Err(config_error(
                "`trim` needs `acknowledged = true`, `max-len` or `max-age`",
            )),
        }
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: defaults::url(),
            nodes: Vec::new(),
            username: None,
            password: None,
            consumer_prefix: defaults::consumer_prefix(),
            block: defaults::block(),
            claim_interval: None,
            consumer_expiry: defaults::consumer_expiry(),
            trim: None,
            connect_timeout: defaults::connect_timeout(),
            connect_attempts: defaults::connect_attempts(),
            command_timeout: defaults::command_timeout(),
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

impl RedisConfig {
    /// The defaults, connecting to `url`.
    pub fn with_url(url: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            ..RedisConfig::default()
        }
    }

    /// The defaults, connecting to the Redis Cluster that `nodes` (seed node URLs) belong to.
    pub fn with_nodes<I, S>(nodes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        RedisConfig {
            nodes: nodes.into_iter().map(Into::into).collect(),
            ..RedisConfig::default()
        }
    }

    /// Whether this names a Redis Cluster (`nodes` is set) rather than one server.
    pub fn is_cluster(&self) -> bool {
        !self.nodes.is_empty()
    }

    /// Checks what can be checked without a network: the URL, durations and trimming.
    pub(crate) fn validate(&self) -> Result<()> {
        if self.block.is_zero() {
            // BLOCK 0 means forever in Redis: the consumer could never be shut down promptly.
            return Err(config_error("`block` must be longer than zero"));
        }
        if self.block < Duration::from_millis(1) {
            return Err(config_error("`block` must be at least 1ms"));
        }
        if self.connect_attempts == 0 {
            return Err(config_error("`connect-attempts` must be at least 1"));
        }
        if self.command_timeout.is_zero() || self.connect_timeout.is_zero() {
            return Err(config_error(
                "`command-timeout` and `connect-timeout` must be longer than zero",
            ));
        }
        if self.claim_interval.is_some_and(|d| d.is_zero()) {
            return Err(config_error("`claim-interval` must be longer than zero"));
        }
        if self.consumer_expiry < Duration::from_millis(100) {
            // Live consumers show themselves every tenth of it at most, but no more often
            // than every 10 ms.
            return Err(config_error("`consumer-expiry` must be at least 100ms"));
        }
        if let Some(trim) = &self.trim {
            trim.strategy()?;
        }
        if self.consumer_prefix.is_empty() {
            return Err(config_error("`consumer-prefix` must not be empty"));
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err(config_error(
                "`tls-cert-file` and `tls-key-file` go together (mutual TLS needs both)",
            ));
        }
        if self.is_cluster() {
            // `url` has a default, so only a changed one can be told apart from none.
            if self.url != defaults::url() {
                return Err(config_error(
                    "`url` and `nodes` exclude each other: `url` names one server, `nodes` the \
                     seed nodes of a Redis Cluster",
                ));
            }
            if self.nodes.iter().any(|node| node.trim().is_empty()) {
                return Err(config_error("`nodes` has an empty entry"));
            }
        }
        let tls_files = self.tls_ca_file.is_some() || self.tls_cert_file.is_some();
        if tls_files && !self.addresses().iter().all(|a| a.starts_with("rediss://")) {
            return Err(config_error(
                "`tls-ca-file`, `tls-cert-file` and `tls-key-file` need `rediss://` urls",
            ));
        }
        Ok(())
    }

    /// The URL of the server, or the cluster's seed nodes.
    pub(crate) fn addresses(&self) -> Vec<&str> {
        if self.is_cluster() {
            self.nodes.iter().map(String::as_str).collect()
        } else {
            vec![self.url.as_str()]
        }
    }

    /// The URL with its password replaced by `***`: what errors and logs show.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }

    /// The seed node URLs with their passwords replaced by `***`.
    pub fn redacted_nodes(&self) -> Vec<String> {
        self.nodes.iter().map(|node| redact_url(node)).collect()
    }
}

// Hand-written so that neither `password` nor a password inside `url` or `nodes` is ever
// printed.
impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &self.redacted_url())
            .field("nodes", &self.redacted_nodes())
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("consumer_prefix", &self.consumer_prefix)
            .field("block", &self.block)
            .field("claim_interval", &self.claim_interval)
            .field("consumer_expiry", &self.consumer_expiry)
            .field("trim", &self.trim)
            .field("connect_timeout", &self.connect_timeout)
            .field("connect_attempts", &self.connect_attempts)
            .field("command_timeout", &self.command_timeout)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .finish()
    }
}

/// `redis://user:secret@host` becomes `redis://user:***@host`; a `password=` query value is
/// hidden too. Text that does not look like a URL is returned with any `user:pass@` part
/// hidden all the same, since it may still be a mistyped URL with a password in it.
pub(crate) fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{host}"),
            // A lone userinfo part is a user name for redis-rs; still, it may be a password
            // typed without the leading colon, so it is hidden too.
            None if !userinfo.is_empty() => format!("***@{host}"),
            None => format!("@{host}"),
        },
        None => authority.to_owned(),
    };
    let tail = redact_query(tail);
    match scheme {
        Some(scheme) => format!("{scheme}://{authority}{tail}"),
        None => format!("{authority}{tail}"),
    }
}

fn redact_query(tail: &str) -> String {
    let Some((path, query)) = tail.split_once('?') else {
        return tail.to_owned();
    };
    let (query, fragment) = match query.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (query, None),
    };
    let query = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if name.eq_ignore_ascii_case("password") => format!("{name}=***"),
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&");
    match fragment {
        Some(f) => format!("{path}?{query}#{f}"),
        None => format!("{path}?{query}"),
    }
}

fn config_error(message: &str) -> Error {
    Error::new(ErrorKind::Config, format!("redis binder: {message}"))
}

/// Environment overrides turn `PASSWORD=1234` into a number; a password is text all the same.
fn scalar_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct Text;
    impl serde::de::Visitor<'_> for Text {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<String, E> {
            Ok(v.to_string())
        }
    }
    d.deserialize_any(Text).map(Some)
}

/// A list of node URLs, or one string of them separated by commas (environment overrides
/// arrive as one string).
fn node_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct Nodes;
    impl<'de> serde::de::Visitor<'de> for Nodes {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of node URLs, or one string of them separated by commas")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Vec<String>, E> {
            Ok(v.split(',')
                .map(str::trim)
                .filter(|node| !node.is_empty())
                .map(str::to_owned)
                .collect())
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Vec<String>, A::Error> {
            let mut nodes = Vec::new();
            while let Some(node) = seq.next_element::<String>()? {
                nodes.push(node);
            }
            Ok(nodes)
        }
    }
    d.deserialize_any(Nodes)
}

fn optional_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    stream_core::config::duration::deserialize(d).map(Some)
}

mod defaults {
    use std::time::Duration;

    pub(super) fn url() -> String {
        "redis://127.0.0.1:6379".to_owned()
    }
    pub(super) fn consumer_prefix() -> String {
        "consumer".to_owned()
    }
    pub(super) fn block() -> Duration {
        Duration::from_secs(2)
    }
    pub(super) fn consumer_expiry() -> Duration {
        Duration::from_secs(300)
    }
    pub(super) fn connect_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub(super) fn connect_attempts() -> u32 {
        5
    }
    pub(super) fn command_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub(super) fn approximate() -> bool {
        true
    }
    pub(super) fn retention_interval() -> Duration {
        Duration::from_secs(10)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<RedisConfig> {
        let table: toml::Table = toml::from_str(text).unwrap();
        stream_core::BinderSettings::new("redis", "test.toml", table).parse()
    }

    #[test]
    fn defaults_apply_to_an_empty_table() {
        let config = parse("").unwrap();
        assert_eq!(config.url, "redis://127.0.0.1:6379");
        assert_eq!(config.block, Duration::from_secs(2));
        assert_eq!(config.connect_attempts, 5);
        assert!(config.trim.is_none());
        config.validate().unwrap();
    }

    #[test]
    fn every_key_parses() {
        let config = parse(
            r#"
            url = "rediss://cache:6380/2"
            username = "svc"
            password = 1234
            consumer-prefix = "orders"
            block = "250ms"
            claim-interval = "1s"
            consumer-expiry = "10m"
            trim = { max-age = "1h", approximate = false }
            connect-timeout = "1s"
            connect-attempts = 2
            command-timeout = "3s"
            "#,
        )
        .unwrap();
        assert_eq!(config.password.as_deref(), Some("1234"));
        assert_eq!(config.block, Duration::from_millis(250));
        assert_eq!(config.claim_interval, Some(Duration::from_secs(1)));
        assert_eq!(config.consumer_expiry, Duration::from_secs(600));
        let trim = config.trim.as_ref().unwrap();
        assert_eq!(
            trim.strategy().unwrap(),
            Some(Trim::MaxAge(Duration::from_secs(3600)))
        );
        assert!(!trim.approximate);
        config.validate().unwrap();
    }

    #[test]
    fn acknowledged_retention_with_and_without_a_bound() {
        let config = parse("trim = { acknowledged = true }").unwrap();
        let trim = config.trim.as_ref().unwrap();
        assert_eq!(trim.strategy().unwrap(), None);
        assert_eq!(trim.interval, Duration::from_secs(10));
        let config =
            parse("trim = { acknowledged = true, max-len = 1000, interval = \"2s\" }").unwrap();
        let trim = config.trim.as_ref().unwrap();
        assert_eq!(trim.strategy().unwrap(), Some(Trim::MaxLen(1000)));
        assert_eq!(trim.interval, Duration::from_secs(2));
    }

    #[test]
    fn unknown_key_names_the_nearest_one() {
        let err = parse("blok = \"1s\"").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(
            err.message().contains("did you mean `block`"),
            "{}",
            err.message()
        );
        let err = parse("trim = { max-length = 5 }").unwrap_err();
        assert!(err.message().contains("max-len"), "{}", err.message());
    }

    #[test]
    fn invalid_values_are_config_errors() {
        for text in [
            "block = \"0s\"",
            "connect-attempts = 0",
            "consumer-expiry = \"10ms\"",
            "trim = {}",
            "trim = { max-len = 5, max-age = \"1h\" }",
            "trim = { acknowledged = true, interval = \"0s\" }",
            "url = \"redis://h\"\ntls-ca-file = \"/ca.pem\"",
            "url = \"rediss://h\"\ntls-cert-file = \"/client.pem\"",
        ] {
            let err = parse(text).and_then(|c| c.validate()).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Config, "{text}");
        }
    }

    #[test]
    fn debug_and_redaction_hide_passwords() {
        let config = RedisConfig {
            password: Some("hunter2".into()),
            ..RedisConfig::with_url("redis://app:topsecret@db:6379/1?password=other")
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("topsecret"), "{shown}");
        assert!(!shown.contains("other"), "{shown}");
        assert!(
            shown.contains("redis://app:***@db:6379/1?password=***"),
            "{shown}"
        );
    }

    #[test]
    fn nodes_name_a_cluster_as_a_list_or_one_string() {
        let listed = parse(r#"nodes = ["redis://a:7000", "redis://b:7001"]"#).unwrap();
        assert!(listed.is_cluster());
        assert_eq!(listed.nodes, ["redis://a:7000", "redis://b:7001"]);
        listed.validate().unwrap();
        // What `STREAM_BINDERS__REDIS__NODES=...` arrives as.
        let joined = parse(r#"nodes = "redis://a:7000, redis://b:7001,""#).unwrap();
        assert_eq!(joined.nodes, listed.nodes);
        assert!(!parse("").unwrap().is_cluster());
    }

    #[test]
    fn nodes_and_url_exclude_each_other() {
        let err = parse("url = \"redis://h:1\"\nnodes = [\"redis://a:7000\"]")
            .and_then(|c| c.validate())
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.message().contains("exclude each other"), "{err}");
        let err = parse("nodes = [\"redis://a:7000\"]\ntls-ca-file = \"/ca.pem\"")
            .and_then(|c| c.validate())
            .unwrap_err();
        assert!(err.message().contains("rediss://"), "{err}");
    }

    #[test]
    fn debug_hides_passwords_in_nodes() {
        let config = RedisConfig::with_nodes(["redis://:n0desecret@a:7000", "redis://b:7001"]);
        let shown = format!("{config:?}");
        assert!(!shown.contains("n0desecret"), "{shown}");
        assert!(shown.contains("redis://:***@a:7000"), "{shown}");
    }

    #[test]
    fn redaction_keeps_urls_without_secrets() {
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(redact_url("rediss://:pw@h/0"), "rediss://:***@h/0");
        assert_eq!(redact_url("redis://pw@h"), "redis://***@h");
        assert_eq!(redact_url("user:pw@h:1"), "user:***@h:1");
        assert_eq!(redact_url("redis://u:p@ss@h"), "redis://u:***@h");
    }
}
