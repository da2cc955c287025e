//! Topic creation and metadata through librdkafka's admin client.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use stream_core::{Error, ErrorKind, Result};

use crate::config::KafkaConfig;
use crate::error::{kind_of, kind_of_code};

/// Longest single metadata request; the overall wait is bounded by `connect-timeout`.
const METADATA_ATTEMPT: Duration = Duration::from_secs(2);
/// Pause between metadata requests while a new topic propagates.
const METADATA_RETRY: Duration = Duration::from_millis(50);

/// Makes sure topics exist before producers and consumers use them.
pub(crate) struct Admin {
    config: Arc<KafkaConfig>,
    client: Arc<AdminClient<DefaultClientContext>>,
    /// Topics known to exist with a leader for every partition.
    ready: Mutex<HashSet<String>>,
}

impl Admin {
    pub(crate) fn new(config: Arc<KafkaConfig>) -> Result<Admin> {
        let client = config
            .admin_config()
            .create()
            .map_err(|e| config.client_error(e))?;
        Ok(Admin {
            config,
            client: Arc::new(client),
            ready: Mutex::new(HashSet::new()),
        })
    }

    /// Returns the partitions of `topic` once every one of them has a leader, creating the
    /// topic first (with the binder's `partitions`) if it is missing and creation is allowed.
    /// An existing topic may have any number of partitions.
    pub(crate) async fn ensure_topic(&self, topic: &str) -> Result<Vec<i32>> {
        self.ensure(topic, None).await
    }

    /// [`ensure_topic`](Admin::ensure_topic) for a partitioned binding, which routes
    /// messages to partitions and splits them between instances by its own count: the topic
    /// must have exactly `partitions`, and gets that many if the binder creates it.
    pub(crate) async fn ensure_partitioned_topic(
        &self,
        topic: &str,
        partitions: i32,
    ) -> Result<Vec<i32>> {
        self.ensure(topic, Some(partitions)).await
    }

    async fn ensure(&self, topic: &str, exactly: Option<i32>) -> Result<Vec<i32>> {
        let deadline = Instant::now() + self.config.connect_timeout;
        let mut created = false;
        loop {
            match self.partitions(topic, deadline).await? {
                Some(partitions)
                    if exactly.is_some_and(|wanted| partitions.len() != wanted as usize) =>
                {
                    let wanted = exactly.unwrap_or_default();
                    // With fewer, messages routed to the missing partitions fail; with more,
                    // instances that split the binding's partitions never read the others,
                    // and Kafka's own partitioner (other producers) puts keys elsewhere.
                    // Changing a topic's partitions moves keys under running groups, so it is
                    // left to an operator's deliberate step.
                    return Err(Error::new(
                        ErrorKind::Config,
                        format!(
                            "Kafka topic `{topic}` has {} partitions but the binding says \
                             `partitions = {wanted}`: set it to {}, or give the topic {wanted} \
                             partitions",
                            partitions.len(),
                            partitions.len()
                        ),
                    ));
                }
                Some(partitions) => {
                    self.ready
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .insert(topic.to_owned());
                    return Ok(partitions);
                }
                None if !self.config.create_topics => {
                    return Err(Error::new(
                        ErrorKind::DestinationNotFound,
                        format!(
                            "Kafka topic `{topic}` does not exist and this binder may not create \
                             it (create-topics = false)"
                        ),
                    ));
                }
                None if !created => {
                    self.create(topic, exactly.unwrap_or(self.config.partitions))
                        .await?;
                    created = true;
                }
                None => {
                    // Created, not yet visible with leaders everywhere: metadata catches up
                    // within a few hundred milliseconds.
                    if Instant::now() >= deadline {
                        return Err(Error::new(
                            ErrorKind::Timeout,
                            format!(
                                "Kafka topic `{topic}` was created but has no leader for every \
                                 partition after {:?} (connect-timeout)",
                                self.config.connect_timeout
                            ),
                        ));
                    }
                    tokio::time::sleep(METADATA_RETRY).await;
                }
            }
        }
    }

    /// The partitions of `topic` if it exists and every partition has a leader, None if it
    /// does not exist (or not yet everywhere). Retries unreachable brokers until `deadline`.
    async fn partitions(&self, topic: &str, deadline: Instant) -> Result<Option<Vec<i32>>> {
        loop {
            let client = self.client.clone();
            let name = topic.to_owned();
            let attempt = METADATA_ATTEMPT.min(deadline.saturating_duration_since(Instant::now()));
            let fetched = tokio::task::spawn_blocking(move || {
                let metadata = client
                    .inner()
                    .fetch_metadata(Some(&name), attempt.max(Duration::from_millis(100)))?;
                let Some(found) = metadata.topics().iter().find(|t| t.name() == name) else {
                    return Ok(None);
                };
                if let Some(error) = found.error() {
                    return Err(KafkaError::MetadataFetch(error.into()));
                }
                if found.partitions().is_empty()
                    || found
                        .partitions()
                        .iter()
                        .any(|p| p.leader() < 0 || p.error().is_some())
                {
                    return Ok(None);
                }
                let mut partitions: Vec<i32> = found.partitions().iter().map(|p| p.id()).collect();
                partitions.sort_unstable();
                Ok(Some(partitions))
            })
            .await
            .map_err(|e| Error::new(ErrorKind::Broker, "metadata task failed").with_source(e))?;
            match fetched {
                Ok(found) => return Ok(found),
                Err(e) if kind_of(&e) == ErrorKind::DestinationNotFound => return Ok(None),
                Err(e) if is_unreachable(&e) && Instant::now() < deadline => {
                    tracing::debug!(brokers = %self.config.brokers, error = %e, "Kafka not reachable yet; retrying");
                }
                Err(e) if is_unreachable(&e) => {
                    return Err(Error::new(
                        ErrorKind::Connection,
                        format!(
                            "cannot reach Kafka at {} within {:?} (connect-timeout): {e}",
                            self.config.brokers, self.config.connect_timeout
                        ),
                    )
                    .with_source(e));
                }
                Err(e) => {
                    return Err(crate::error::convert(
                        e,
                        format!("metadata of Kafka topic `{topic}`"),
                    ))
                }
            }
        }
    }

    async fn create(&self, topic: &str, partitions: i32) -> Result<()> {
        let replication = self.config.replication_factor.map_or(-1, i32::from);
        // The brokers' default (1,048,588 bytes per record batch) is below the 1 MiB payload
        // core allows by default; the dead-letter topic is made here too, and its copies
        // carry extra headers.
        let max_message_bytes = self.config.topic_max_message_bytes().to_string();
        let new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(replication))
            .set("max.message.bytes", &max_message_bytes);
        let options = AdminOptions::new().operation_timeout(Some(self.config.connect_timeout));
        let results = self
            .client
            .create_topics([&new_topic], &options)
            .await
            .map_err(|e| crate::error::convert(e, format!("creating Kafka topic `{topic}`")))?;
        for result in results {
            match result {
                Ok(_) => {
                    tracing::info!(topic, partitions, "created Kafka topic");
                }
                // Another process (or binder) made it first: that is what we wanted.
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => {
                    return Err(Error::new(
                        kind_of_code(code),
                        format!("creating Kafka topic `{topic}` failed: {code}"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// One metadata request, answered by any broker of the cluster within `bound`. It asks
    /// about one topic this binder already uses (a small answer), or, before it uses any,
    /// about all of them. Asking creates nothing: the admin client does not let the broker
    /// create a topic it is asked about.
    pub(crate) async fn ping(&self, bound: Duration) -> Result<()> {
        let client = self.client.clone();
        let known = self
            .ready
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .next()
            .cloned();
        let asked = tokio::task::spawn_blocking(move || {
            client
                .inner()
                .fetch_metadata(known.as_deref(), bound)
                .map(drop)
        });
        // The request ends by itself at `bound`; this only keeps a blocking pool with no
        // thread free from holding the answer back.
        let answer = match tokio::time::timeout(bound + METADATA_RETRY, asked).await {
            Ok(joined) => joined.map_err(|e| {
                Error::new(ErrorKind::Broker, "metadata task failed").with_source(e)
            })?,
            Err(_) => return Err(self.unanswered(bound, None)),
        };
        answer.map_err(|e| self.unanswered(bound, Some(e)))
    }

    fn unanswered(&self, bound: Duration, error: Option<KafkaError>) -> Error {
        let why = match &error {
            Some(e) => format!(": {}", self.config.redact(&e.to_string())),
            None => String::new(),
        };
        let unanswered = Error::new(
            ErrorKind::Connection,
            format!(
                "Kafka at {} did not answer a metadata request within {bound:?}{why}",
                self.config.brokers
            ),
        )
        .temporary(true);
        match error {
            Some(e) => unanswered.with_source(e),
            None => unanswered,
        }
    }

    /// The admin client, for the operators' access ([`crate::inspect`]), which shares it.
    pub(crate) fn client(&self) -> Arc<AdminClient<DefaultClientContext>> {
        self.client.clone()
    }

    /// Whether `topic` was seen ready before, so the first-use check can be skipped.
    pub(crate) fn is_ready(&self, topic: &str) -> bool {
        self.ready
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .contains(topic)
    }
}

/// Errors that mean "no broker answered", as opposed to an answer we do not like.
fn is_unreachable(error: &KafkaError) -> bool {
    matches!(kind_of(error), ErrorKind::Connection | ErrorKind::Timeout)
}
