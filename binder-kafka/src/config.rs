//! The `[binders.NAME]` settings of a Kafka binder and the librdkafka properties made from them.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use stream_core::{Error, ErrorKind, Result};

/// Settings of a Kafka binder, read from a `[binders.NAME]` table whose `type` is `"kafka"`.
///
/// ```toml
/// [binders.kafka]
/// type = "kafka"
/// brokers = "127.0.0.1:9092"
/// partitions = 6
/// [binders.kafka.client]            # every client: producers, consumers, admin
/// "security.protocol" = "SASL_SSL"
/// "sasl.mechanism" = "PLAIN"
/// "sasl.username" = "svc"
/// "sasl.password" = "..."           # never shown by Debug
/// [binders.kafka.producer]          # producers only
/// "compression.type" = "lz4"
/// [binders.kafka.consumer]          # consumers only
/// "session.timeout.ms" = 10000
/// ```
///
/// Properties the binder owns because delivery guarantees depend on them are refused in the
/// passthrough tables: `bootstrap.servers` (use `brokers`), `group.id` (the binding's
/// `group`), `auto.offset.reset` (the binding's `start-from`), `enable.auto.commit`,
/// `enable.auto.offset.store`, `enable.idempotence` and `acks` (alias
/// `request.required.acks`).
#[derive(Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port` separated by commas (`bootstrap.servers`). Required.
    pub brokers: String,
    /// Client id reported to the brokers (`client.id`). Default: `"stream-rs"`.
    #[serde(default = "defaults::client_id")]
    pub client_id: String,
    /// Whether a missing topic is created on first use by a producer or consumer. When false,
    /// using a missing topic fails with [`ErrorKind::DestinationNotFound`]. Default: true.
    #[serde(default = "defaults::create_topics")]
    pub create_topics: bool,
    /// Partitions of topics the binder creates: how many members of one group can share the
    /// work of a topic. Default: 3.
    #[serde(default = "defaults::partitions")]
    pub partitions: i32,
    /// Replication factor of topics the binder creates. Default: unset, so that the brokers'
    /// `default.replication.factor` applies: 1 on a single broker (Kafka's own default), and
    /// on a cluster whatever its operators chose for every topic, typically 3. Together with
    /// the brokers' `min.insync.replicas` it decides how many broker losses an acknowledged
    /// `send` survives; a topic that exists already keeps its own.
    #[serde(default)]
    pub replication_factor: Option<i16>,
    /// How long the producer waits to fill a batch (`linger.ms`). Default: `"5ms"`.
    #[serde(default = "defaults::linger", with = "stream_core::config::duration")]
    pub linger: Duration,
    /// How long a publish may take, retries included, before `send` fails with a timeout
    /// (`message.timeout.ms`); a broker restart shorter than this is a delayed success.
    /// Default: `"30s"`.
    #[serde(
        default = "defaults::delivery_timeout",
        with = "stream_core::config::duration"
    )]
    pub delivery_timeout: Duration,
    /// How often acknowledged offsets are committed; on a crash, at most this much
    /// acknowledged work is delivered again. Offsets are also committed when partitions are
    /// revoked and when a consumer closes. Default: `"1s"`.
    #[serde(
        default = "defaults::commit_interval",
        with = "stream_core::config::duration"
    )]
    pub commit_interval: Duration,
    /// How long the first producer or consumer waits for the cluster before failing with
    /// [`ErrorKind::Connection`]. Default: `"10s"`.
    #[serde(
        default = "defaults::connect_timeout",
        with = "stream_core::config::duration"
    )]
    pub connect_timeout: Duration,
    /// Upper bound, in KiB, of messages a consumer prefetches into librdkafka's queue
    /// (`queued.max.messages.kbytes`; `fetch.max.bytes` follows it), so memory does not grow
    /// with a backlog. Default: 1024.
    #[serde(default = "defaults::fetch_queue_kbytes")]
    pub fetch_queue_kbytes: u32,
    /// librdkafka properties for every client (producers, consumers, the admin client),
    /// passed through as they are; numbers and booleans are turned into strings. Security
    /// settings (`security.protocol`, `sasl.*`, `ssl.*`) go here. Default: empty.
    #[serde(default)]
    pub client: BTreeMap<String, Property>,
    /// librdkafka properties for producers only, applied after `client`. Default: empty.
    #[serde(default)]
    pub producer: BTreeMap<String, Property>,
    /// librdkafka properties for consumers only, applied after `client`. Default: empty.
    #[serde(default)]
    pub consumer: BTreeMap<String, Property>,
}

mod defaults {
    use std::time::Duration;

    pub fn client_id() -> String {
        "stream-rs".to_owned()
    }
    pub fn create_topics() -> bool {
        true
    }
    pub fn partitions() -> i32 {
        3
    }
    pub fn linger() -> Duration {
        Duration::from_millis(5)
    }
    pub fn delivery_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn commit_interval() -> Duration {
        Duration::from_secs(1)
    }
    pub fn connect_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn fetch_queue_kbytes() -> u32 {
        1024
    }
}

/// Room a message needs on Kafka beyond its payload: its key and headers, and the headers
/// core adds to a dead-letter copy (about 2.5 KiB: the error text is capped at 2 KiB). A
/// binding's `max-payload-bytes` may be at most `message.max.bytes` less this.
pub(crate) const MESSAGE_HEADROOM: usize = 64 * 1024;

/// The producers' `message.max.bytes` unless a passthrough table sets it: core's default
/// `max-payload-bytes` (1 MiB) plus [`MESSAGE_HEADROOM`]. librdkafka's own default (1,000,000
/// bytes) and the brokers' (1,048,588) are both below a 1 MiB payload.
pub(crate) const DEFAULT_MESSAGE_MAX_BYTES: usize = (1 << 20) + MESSAGE_HEADROOM;

/// How much more a topic the binder creates accepts (its `max.message.bytes`, which bounds a
/// whole record batch) than producers send as one message (`message.max.bytes`): a batch of
/// one message adds its framing, and compression of data that does not compress adds a
/// little.
pub(crate) const BATCH_MARGIN: usize = 64 * 1024;

/// Properties whose values the binder sets itself, with what to use instead.
const RESERVED: &[(&str, &str)] = &[
    ("bootstrap.servers", "set `brokers` instead"),
    ("metadata.broker.list", "set `brokers` instead"),
    ("group.id", "the binding's `group` sets it"),
    (
        "auto.offset.reset",
        "the binding's `start-from` decides where a new group starts, and anything else without a committed offset starts at the oldest retained message",
    ),
    (
        "enable.auto.commit",
        "the binder commits acknowledged offsets itself; see `commit-interval`",
    ),
    (
        "enable.auto.offset.store",
        "the binder stores only acknowledged offsets",
    ),
    (
        "enable.idempotence",
        "producers are always idempotent so retries neither reorder nor duplicate",
    ),
    (
        "acks",
        "`send` succeeds only once every in-sync replica has the message (acks=all)",
    ),
    (
        "request.required.acks",
        "`send` succeeds only once every in-sync replica has the message (acks=all)",
    ),
];

/// Parts of property names whose values are secret: never printed, never logged.
const SECRET_MARKERS: &[&str] = &[
    "password",
    "secret",
    "sasl.jaas.config",
    "sasl.oauthbearer.config",
    "ssl.key",
    "ssl_key",
    "keystore",
    "token",
    "credential",
];

/// Whether the value of librdkafka property `name` must never be shown.
pub(crate) fn is_secret(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_MARKERS.iter().any(|marker| name.contains(marker))
}

impl KafkaConfig {
    /// Settings for `brokers` with every default.
    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaConfig {
            brokers: brokers.into(),
            client_id: defaults::client_id(),
            create_topics: defaults::create_topics(),
            partitions: defaults::partitions(),
            replication_factor: None,
            linger: defaults::linger(),
            delivery_timeout: defaults::delivery_timeout(),
            commit_interval: defaults::commit_interval(),
            connect_timeout: defaults::connect_timeout(),
            fetch_queue_kbytes: defaults::fetch_queue_kbytes(),
            client: BTreeMap::new(),
            producer: BTreeMap::new(),
            consumer: BTreeMap::new(),
        }
    }

    /// Sets a librdkafka property for every client.
    pub fn client_property(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.client.insert(name.into(), Property(value.into()));
        self
    }

    /// Sets a librdkafka property for producers only.
    pub fn producer_property(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.producer.insert(name.into(), Property(value.into()));
        self
    }

    /// Sets a librdkafka property for consumers only.
    pub fn consumer_property(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.consumer.insert(name.into(), Property(value.into()));
        self
    }

    /// Checks values and property names without touching the network: reserved properties,
    /// ranges, and whether librdkafka accepts every passthrough property.
    pub(crate) fn validate(&self) -> Result<()> {
        if self.brokers.trim().is_empty() {
            return Err(config_error("`brokers` must not be empty"));
        }
        if self.partitions < 1 {
            return Err(config_error("`partitions` must be at least 1"));
        }
        if matches!(self.replication_factor, Some(r) if r < 1) {
            return Err(config_error("`replication-factor` must be at least 1"));
        }
        if self.fetch_queue_kbytes == 0 {
            return Err(config_error("`fetch-queue-kbytes` must be at least 1"));
        }
        for (table, properties) in [("client", &self.client), ("producer", &self.producer)] {
            if let Some(value) = properties.get("message.max.bytes") {
                if value.0.trim().parse::<usize>().is_err() {
                    return Err(config_error(format!(
                        "`{table}.\"message.max.bytes\"` must be a number of bytes"
                    )));
                }
            }
        }
        for (table, properties) in [
            ("client", &self.client),
            ("producer", &self.producer),
            ("consumer", &self.consumer),
        ] {
            for name in properties.keys() {
                if let Some((_, instead)) = RESERVED.iter().find(|(n, _)| n == name) {
                    return Err(config_error(format!(
                        "`{table}.\"{name}\"` cannot be set: {instead}"
                    )));
                }
            }
        }
        // librdkafka checks names and values when a configuration is built, before any
        // client exists; doing it here turns a typo into a startup error.
        self.producer_config()
            .create_native_config()
            .map_err(|e| self.client_error(e))?;
        self.consumer_config()
            .create_native_config()
            .map_err(|e| self.client_error(e))?;
        Ok(())
    }

    /// Properties every client shares, then the `client` table.
    fn base_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("client.id", &self.client_id);
        for (name, value) in &self.client {
            config.set(name, &value.0);
        }
        config
    }

    /// The admin client: topic creation and metadata.
    pub(crate) fn admin_config(&self) -> ClientConfig {
        let mut config = self.base_config();
        // A metadata request for a missing topic must not create it behind our back (the
        // broker's `auto.create.topics.enable`): topics are made only with our settings.
        config.set("allow.auto.create.topics", "false");
        config
    }

    /// The shared producer.
    pub(crate) fn producer_config(&self) -> ClientConfig {
        let mut config = self.base_config();
        config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            // Same key, same partition as the Java client, so mixed fleets agree on order.
            .set("partitioner", "murmur2_random")
            .set("allow.auto.create.topics", "false")
            .set("linger.ms", millis(self.linger))
            .set("message.timeout.ms", millis(self.delivery_timeout));
        if !self.client.contains_key("message.max.bytes") {
            config.set("message.max.bytes", DEFAULT_MESSAGE_MAX_BYTES.to_string());
        }
        for (name, value) in &self.producer {
            config.set(name, &value.0);
        }
        config
    }

    /// A consumer; `group` is None for an anonymous consumer, which assigns partitions itself
    /// and commits nothing.
    pub(crate) fn consumer_config(&self) -> ClientConfig {
        let mut config = self.base_config();
        config
            .set("enable.auto.offset.store", "false")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            // Rebalances move only the partitions that change owner, so members keep working
            // (and keep their in-flight deliveries valid) while a member joins or leaves.
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set(
                "queued.max.messages.kbytes",
                self.fetch_queue_kbytes.to_string(),
            )
            // The queue is kept small, so it fills often, and librdkafka looks again only
            // after this long (default: a second). A consumer drains the 1 MiB queue in 2 ms
            // at 500 MB/s: at 10 ms it starved most of the time (1 KiB messages: 140k msgs/s
            // against 530k at 1 ms). A check per millisecond per full partition is cheap.
            .set("fetch.queue.backoff.ms", "1");
        for (name, value) in &self.consumer {
            config.set(name, &value.0);
        }
        config
    }

    /// The largest message (payload, key and headers) producers send: librdkafka's
    /// `message.max.bytes` as the passthrough tables set it, or
    /// [`DEFAULT_MESSAGE_MAX_BYTES`].
    pub(crate) fn message_max_bytes(&self) -> usize {
        self.producer
            .get("message.max.bytes")
            .or_else(|| self.client.get("message.max.bytes"))
            .and_then(|value| value.0.trim().parse().ok())
            .unwrap_or(DEFAULT_MESSAGE_MAX_BYTES)
    }

    /// The largest payload a binding may allow (`max-payload-bytes`) so that the message
    /// and its dead-letter copy both fit in [`message_max_bytes`](Self::message_max_bytes).
    pub(crate) fn max_payload_bytes(&self) -> usize {
        self.message_max_bytes().saturating_sub(MESSAGE_HEADROOM)
    }

    /// `max.message.bytes` of topics the binder creates: what producers send, with room for
    /// batch framing.
    pub(crate) fn topic_max_message_bytes(&self) -> usize {
        self.message_max_bytes() + BATCH_MARGIN
    }

    /// A librdkafka configuration error, with any secret value that librdkafka echoed
    /// replaced.
    pub(crate) fn client_error(&self, error: rdkafka::error::KafkaError) -> Error {
        let text = self.redact(&error.to_string());
        config_error(format!("librdkafka rejected the configuration: {text}"))
    }

    /// `text` with every secret value of the passthrough tables replaced by `***`.
    pub(crate) fn redact(&self, text: &str) -> String {
        let mut text = text.to_owned();
        for (name, value) in self.properties() {
            if is_secret(name) && !value.0.is_empty() {
                text = text.replace(&value.0, "***");
            }
        }
        text
    }

    fn properties(&self) -> impl Iterator<Item = (&String, &Property)> {
        self.client
            .iter()
            .chain(self.producer.iter())
            .chain(self.consumer.iter())
    }
}

fn millis(duration: Duration) -> String {
    duration.as_millis().to_string()
}

fn config_error(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Config, message)
}

// Hand-written so that passwords and keys in the passthrough tables never reach a log.
impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("client_id", &self.client_id)
            .field("create_topics", &self.create_topics)
            .field("partitions", &self.partitions)
            .field("replication_factor", &self.replication_factor)
            .field("linger", &self.linger)
            .field("delivery_timeout", &self.delivery_timeout)
            .field("commit_interval", &self.commit_interval)
            .field("connect_timeout", &self.connect_timeout)
            .field("fetch_queue_kbytes", &self.fetch_queue_kbytes)
            .field("client", &Redacted(&self.client))
            .field("producer", &Redacted(&self.producer))
            .field("consumer", &Redacted(&self.consumer))
            .finish()
    }
}

struct Redacted<'a>(&'a BTreeMap<String, Property>);

impl fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut map = f.debug_map();
        for (name, value) in self.0 {
            if is_secret(name) {
                map.entry(name, &"***");
            } else {
                map.entry(name, &value.0);
            }
        }
        map.finish()
    }
}

/// A librdkafka property value. Written in TOML as a string, number or boolean; librdkafka
/// takes them all as text.
#[derive(Clone, PartialEq, Eq)]
pub struct Property(pub String);

// The value may be a secret: Debug never shows it (KafkaConfig's Debug shows the safe ones).
impl fmt::Debug for Property {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Property(..)")
    }
}

impl<'de> Deserialize<'de> for Property {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PropertyVisitor;

        impl Visitor<'_> for PropertyVisitor {
            type Value = Property;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Property, E> {
                Ok(Property(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Property, E> {
                Ok(Property(v))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Property, E> {
                Ok(Property(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Property, E> {
                Ok(Property(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Property, E> {
                Ok(Property(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Property, E> {
                Ok(Property(v.to_string()))
            }
        }

        deserializer.deserialize_any(PropertyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stream_core::BinderSettings;

    fn read(text: &str) -> Result<KafkaConfig> {
        let table: toml::Table = toml::from_str(text).unwrap();
        BinderSettings::new("kafka", "streams.toml", table).parse()
    }

    fn parse(text: &str) -> Result<KafkaConfig> {
        let config = read(text)?;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn defaults_apply_and_scalars_become_strings() {
        let c = parse(
            r#"
            brokers = "127.0.0.1:9092"
            [client]
            "socket.keepalive.enable" = true
            [consumer]
            "session.timeout.ms" = 6000
            "#,
        )
        .unwrap();
        assert_eq!(c.partitions, 3);
        assert!(c.create_topics);
        assert_eq!(c.linger, Duration::from_millis(5));
        assert_eq!(c.client["socket.keepalive.enable"].0, "true");
        assert_eq!(c.consumer["session.timeout.ms"].0, "6000");
        let native = c.consumer_config();
        assert_eq!(native.get("session.timeout.ms"), Some("6000"));
        assert_eq!(native.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(c.producer_config().get("enable.idempotence"), Some("true"));
        assert_eq!(c.producer_config().get("acks"), Some("all"));
        assert_eq!(c.replication_factor, None);
    }

    #[test]
    fn replication_factor_is_read_and_checked() {
        let c = parse("brokers = \"b:1\"\nreplication-factor = 3\n").unwrap();
        assert_eq!(c.replication_factor, Some(3));
        let err = parse("brokers = \"b:1\"\nreplication-factor = 0\n").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.message().contains("replication-factor"), "{err}");
    }

    #[test]
    fn unknown_key_suggests_the_nearest() {
        let err = parse("brokers = \"b:1\"\npartitons = 2\n").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(
            err.message().contains("did you mean `partitions`?"),
            "{err}"
        );
    }

    #[test]
    fn reserved_and_unknown_librdkafka_properties_are_refused() {
        let err = parse("brokers = \"b:1\"\n[client]\n\"group.id\" = \"x\"\n").unwrap_err();
        assert!(err.message().contains("group.id"), "{err}");
        // A weaker `acks` would let `send` succeed before the in-sync replicas have the
        // message; librdkafka itself only refuses it once the first producer is made.
        for name in ["acks", "request.required.acks"] {
            let err =
                parse(&format!("brokers = \"b:1\"\n[producer]\n\"{name}\" = 1\n")).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Config);
            assert!(err.message().contains(name), "{err}");
        }
        let err = parse("brokers = \"b:1\"\n[producer]\n\"lingr.ms\" = 3\n").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.message().contains("lingr.ms"), "{err}");
    }

    #[test]
    fn debug_redacts_secrets() {
        // Not validated: the ssl.* properties need a build with the `ssl` feature.
        let c = read(
            r#"
            brokers = "127.0.0.1:9092"
            [client]
            "sasl.username" = "svc"
            "sasl.password" = "hunter2"
            "sasl.jaas.config" = "org.Module required password=\"jaas-pw\";"
            "ssl.key.password" = "keypw"
            "ssl.key.pem" = "-----BEGIN PRIVATE KEY-----abc"
            "sasl.oauthbearer.client.secret" = "oauth-s3cret"
            "#,
        )
        .unwrap();
        let shown = format!("{c:?} {:?}", c.client["sasl.password"]);
        for secret in ["hunter2", "jaas-pw", "keypw", "PRIVATE KEY", "oauth-s3cret"] {
            assert!(!shown.contains(secret), "{secret} leaked: {shown}");
        }
        assert!(shown.contains("svc"), "{shown}");
        assert!(shown.contains("sasl.password"), "{shown}");
    }

    #[test]
    fn producers_carry_the_default_payload_with_room_for_dead_letter_headers() {
        let c = parse("brokers = \"b:1\"\n").unwrap();
        assert_eq!(
            c.producer_config().get("message.max.bytes"),
            Some(DEFAULT_MESSAGE_MAX_BYTES.to_string().as_str())
        );
        assert_eq!(c.max_payload_bytes(), 1 << 20);
        assert!(c.topic_max_message_bytes() > c.message_max_bytes());
        // Set in either table, the value applies to the checks too.
        for table in ["client", "producer"] {
            let c = parse(&format!(
                "brokers = \"b:1\"\n[{table}]\n\"message.max.bytes\" = 4194304\n"
            ))
            .unwrap();
            assert_eq!(
                c.producer_config().get("message.max.bytes"),
                Some("4194304")
            );
            assert_eq!(c.max_payload_bytes(), 4_194_304 - MESSAGE_HEADROOM);
        }
        let err =
            parse("brokers = \"b:1\"\n[producer]\n\"message.max.bytes\" = \"lots\"\n").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Config);
    }

    #[test]
    fn errors_do_not_echo_secret_values() {
        let c = KafkaConfig::new("b:1").client_property("ssl.key.password", "topsecret");
        assert_eq!(
            c.redact("Invalid value \"topsecret\" for ssl.key.password"),
            "Invalid value \"***\" for ssl.key.password"
        );
    }
}
