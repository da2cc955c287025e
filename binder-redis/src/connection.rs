//! Connecting with a bounded retry, and turning redis errors into `stream_core` errors.
//!
//! [`Conn`] is what producers and consumers talk through: a [`ConnectionManager`] to one
//! server, or a [`ClusterConnection`] to every master of a Redis Cluster. Both reconnect by
//! themselves; the cluster one also routes each command to the master of its key's slot and
//! follows `MOVED`/`ASK` redirects. The binder only sends commands that touch one stream
//! key (pipelines and transactions included), so routing never meets a cross-slot command.

use std::path::Path;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncConnectionConfig, Client, ClientTlsConfig, Cmd, ConnectionInfo, IntoConnectionInfo,
    Pipeline, RedisError, RedisFuture, ServerErrorKind, TlsCertificates, Value,
};
use stream_core::{Error, ErrorKind, Result};

use crate::config::RedisConfig;

/// Backoff between connection attempts: 100 ms doubling, capped.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Times redis-rs sends a cluster command again after a redirect, a dropped connection or a
/// refusal (`TRYAGAIN`, `CLUSTERDOWN`, `LOADING`); the response timeout bounds them all.
const CLUSTER_RETRIES: u32 = 16;
/// Waits between those, in ms: random below `min(MAX, FACTOR * 2^retry)`, at least `MIN`.
/// redis-rs's defaults (1.3 s to 11 min) would hold a command through a node's restart far
/// longer than `command-timeout`.
const CLUSTER_RETRY_MIN_MS: u64 = 25;
const CLUSTER_RETRY_MAX_MS: u64 = 1_000;
const CLUSTER_RETRY_FACTOR_MS: u64 = 25;

/// A connection to one server or to a cluster; cheap to clone, clones share it.
#[derive(Clone)]
pub(crate) enum Conn {
    Server(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    /// Makes a cluster connection look up who serves `key` now. A transaction refused with
    /// `MOVED` comes back from redis-rs as `EXECABORT`, which it neither follows nor learns
    /// the new slot owner from; a plain keyed command makes it do both.
    pub(crate) async fn relearn_slot(&mut self, key: &str) {
        if let Conn::Cluster(_) = self {
            // Only the side effect matters; a failure here shows again on the retry.
            let _ = redis::cmd("XLEN").arg(key).query_async::<Value>(self).await;
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Server(conn) => conn.req_packed_command(cmd),
            Conn::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Server(conn) => conn.req_packed_commands(pipeline, offset, count),
            // redis-rs sends a pipeline, and a transaction (`atomic()`) as one
            // MULTI/.../EXEC, to the master of the slot of its first keyed command. All of
            // ours name one stream key, so that is the node that holds it.
            Conn::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Server(conn) => conn.get_db(),
            Conn::Cluster(conn) => conn.get_db(),
        }
    }
}

/// What every connection of one binder is made from.
#[derive(Clone)]
pub(crate) struct Endpoint {
    target: Target,
    /// The URL, or the seed node URLs, with passwords hidden, for errors and logs.
    pub(crate) address: String,
    connect_timeout: Duration,
    attempts: u32,
    redactor: Redactor,
}

#[derive(Clone)]
enum Target {
    Server(Client),
    Cluster(ClusterSeeds),
}

/// The settings a [`ClusterClient`] is built from; one is built per connection, since the
/// response timeout (the blocking read's is longer) is fixed at build time.
#[derive(Clone)]
struct ClusterSeeds {
    nodes: Vec<ConnectionInfo>,
    username: Option<String>,
    password: Option<String>,
    certificates: Option<TlsCertificates>,
}

impl ClusterSeeds {
    fn client(
        &self,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> redis::RedisResult<ClusterClient> {
        let mut builder = ClusterClientBuilder::new(self.nodes.clone())
            .connection_timeout(connect_timeout)
            // Also the bound of a whole command with its redirects, reconnects and retries.
            .response_timeout(response_timeout)
            .retries(CLUSTER_RETRIES)
            .min_retry_wait(CLUSTER_RETRY_MIN_MS)
            .max_retry_wait(CLUSTER_RETRY_MAX_MS)
            .retry_wait_formula(CLUSTER_RETRY_FACTOR_MS, 2);
        if let Some(username) = &self.username {
            builder = builder.username(username);
        }
        if let Some(password) = &self.password {
            builder = builder.password(password);
        }
        if let Some(certificates) = &self.certificates {
            builder = builder.certs(certificates.clone());
        }
        builder.build()
    }
}

impl Endpoint {
    /// Parses the URL (or the seed nodes) and credentials; no network I/O.
    pub(crate) fn new(config: &RedisConfig) -> Result<Endpoint> {
        let addresses = config.addresses();
        let redacted: Vec<String> = addresses
            .iter()
            .map(|a| crate::config::redact_url(a))
            .collect();
        let address = redacted.join(",");
        let mut redactor = Redactor {
            urls: addresses
                .iter()
                .map(|a| a.to_string())
                .zip(redacted.iter().cloned())
                .collect(),
            passwords: config.password.iter().cloned().collect(),
        };
        let (key, entry) = if config.is_cluster() {
            ("nodes", "`nodes` entry")
        } else {
            ("url", "`url`")
        };
        let mut infos = Vec::with_capacity(addresses.len());
        for (url, shown) in addresses.iter().zip(&redacted) {
            let info = url.into_connection_info().map_err(|e| {
                Error::new(
                    ErrorKind::Config,
                    format!(
                        "redis binder: invalid {entry} {shown}: {}",
                        redactor.scrub(&e.to_string())
                    ),
                )
            })?;
            if let Some(password) = info.redis_settings().password() {
                redactor.passwords.push(password.to_owned());
            }
            infos.push(info);
        }
        let tls = infos
            .iter()
            .any(|info| matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. }));
        if tls {
            // rustls needs one process-wide crypto provider; if the application installed
            // another one already, that one is used and this is a no-op.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let certificates = tls_certificates(config)?;
        let unusable = |e: RedisError, redactor: &Redactor| {
            Error::new(
                ErrorKind::Config,
                format!(
                    "redis binder: cannot use `{key}` {address}: {}",
                    redactor.scrub(&e.to_string())
                ),
            )
        };
        let target = if config.is_cluster() {
            if infos.iter().any(|info| info.redis_settings().db() != 0) {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "redis binder: `nodes` {address} select a database; a Redis Cluster has \
                         database 0 only"
                    ),
                ));
            }
            let seeds = ClusterSeeds {
                nodes: infos,
                username: config.username.clone(),
                password: config.password.clone(),
                certificates,
            };
            // Built once here only to check the seeds agree (credentials, TLS) before any
            // connection is attempted.
            seeds
                .client(config.connect_timeout, config.command_timeout)
                .map_err(|e| unusable(e, &redactor))?;
            Target::Cluster(seeds)
        } else {
            let mut info = infos.remove(0);
            if config.username.is_some() || config.password.is_some() {
                let mut redis = info.redis_settings().clone();
                if let Some(username) = &config.username {
                    redis = redis.set_username(username);
                }
                if let Some(password) = &config.password {
                    redis = redis.set_password(password);
                }
                info = info.set_redis_settings(redis);
            }
            let client = match certificates {
                Some(certificates) => Client::build_with_tls(info, certificates),
                None => Client::open(info),
            }
            .map_err(|e| unusable(e, &redactor))?;
            Target::Server(client)
        };
        Ok(Endpoint {
            target,
            address,
            connect_timeout: config.connect_timeout,
            attempts: config.connect_attempts,
            redactor,
        })
    }

    /// What the address names, for messages: `redis` or `redis cluster`.
    fn noun(&self) -> &'static str {
        match self.target {
            Target::Server(_) => "redis",
            Target::Cluster(_) => "redis cluster",
        }
    }

    /// A connection that reconnects by itself, once Redis has answered at least once.
    ///
    /// The first contact is tried `connect-attempts` times with backoff, so that an
    /// unreachable server gives an error naming the address instead of a hang. After that,
    /// a dropped connection is re-established on the next command with the same budget;
    /// commands issued meanwhile fail with a temporary error or wait and succeed.
    ///
    /// On a cluster, `response_timeout` bounds each command with whatever redirects,
    /// reconnects and retries redis-rs makes for it; a node that is down is tried again in
    /// the background until it is back.
    pub(crate) async fn connect(&self, response_timeout: Duration) -> Result<Conn> {
        self.connect_within(response_timeout, self.attempts).await
    }

    /// [`connect`](Endpoint::connect) with one attempt at first contact, for a health check:
    /// a server that refuses is reported at once, with the reason, rather than after the
    /// backoff of `connect-attempts`. Reconnects later still get every attempt.
    pub(crate) async fn connect_once(&self, response_timeout: Duration) -> Result<Conn> {
        self.connect_within(response_timeout, 1).await
    }

    async fn connect_within(&self, response_timeout: Duration, attempts: u32) -> Result<Conn> {
        match &self.target {
            Target::Server(client) => {
                self.connect_server(client, response_timeout, attempts)
                    .await
            }
            Target::Cluster(seeds) => {
                self.connect_cluster(seeds, response_timeout, attempts)
                    .await
            }
        }
    }

    async fn connect_server(
        &self,
        client: &Client,
        response_timeout: Duration,
        attempts: u32,
    ) -> Result<Conn> {
        self.probe(client, attempts).await?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(response_timeout))
            .set_number_of_retries(self.attempts.saturating_sub(1) as usize)
            .set_min_delay(FIRST_BACKOFF)
            .set_max_delay(MAX_BACKOFF);
        let budget = self.budget();
        match tokio::time::timeout(
            budget,
            ConnectionManager::new_with_config(client.clone(), config),
        )
        .await
        {
            Ok(Ok(manager)) => Ok(Conn::Server(manager)),
            Ok(Err(e)) => Err(self.unreachable(1, e)),
            Err(_) => Err(self.too_slow(budget)),
        }
    }

    /// Connects to the seeds, reads the slot map and connects to every master, with the
    /// same attempts and backoff as a single server.
    async fn connect_cluster(
        &self,
        seeds: &ClusterSeeds,
        response_timeout: Duration,
        attempts: u32,
    ) -> Result<Conn> {
        let client = seeds
            .client(self.connect_timeout, response_timeout)
            .map_err(|e| self.unreachable(1, e))?;
        let budget = self.budget();
        let connect = async {
            let mut backoff = FIRST_BACKOFF;
            let mut attempt = 1;
            loop {
                let error = match client.get_async_connection().await {
                    Ok(conn) => return Ok(Conn::Cluster(conn)),
                    Err(e) => e,
                };
                if attempt >= attempts || !is_transient(&error) {
                    return Err(self.unreachable(attempt, error));
                }
                tracing::debug!(address = %self.address, attempt, error = %self.redactor.scrub(&error.to_string()), retry_in = ?backoff, "redis cluster not reachable yet");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                attempt += 1;
            }
        };
        match tokio::time::timeout(budget, connect).await {
            Ok(result) => result,
            Err(_) => Err(self.too_slow(budget)),
        }
    }

    /// The most the first connection may take with all its attempts.
    fn budget(&self) -> Duration {
        self.connect_timeout * (self.attempts + 1) + MAX_BACKOFF * self.attempts
    }

    fn too_slow(&self, budget: Duration) -> Error {
        Error::new(
            ErrorKind::Connection,
            format!(
                "{} at {} did not accept a connection within {budget:?}",
                self.noun(),
                self.address
            ),
        )
        .temporary(true)
    }

    /// One plain connection per attempt, so the attempt count and the error are ours.
    async fn probe(&self, client: &Client, attempts: u32) -> Result<()> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.connect_timeout));
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 1;
        loop {
            let result = client
                .get_multiplexed_async_connection_with_config(&config)
                .await;
            let error = match result {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            if attempt >= attempts || !is_transient(&error) {
                return Err(self.unreachable(attempt, error));
            }
            tracing::debug!(address = %self.address, attempt, error = %error, retry_in = ?backoff, "redis not reachable yet");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            attempt += 1;
        }
    }

    fn unreachable(&self, attempts: u32, error: RedisError) -> Error {
        let transient = is_transient(&error);
        let plural = if attempts == 1 { "" } else { "s" };
        Error::new(
            ErrorKind::Connection,
            format!(
                "cannot connect to {} at {} ({attempts} attempt{plural}): {}",
                self.noun(),
                self.address,
                self.redactor.scrub(&error.to_string())
            ),
        )
        .temporary(transient)
        .with_source(error)
    }
}

impl Endpoint {
    /// A `PING` that failed: whatever Redis (or the way to it) said, it did not answer as a
    /// healthy server does.
    pub(crate) fn ping_failed(&self, error: RedisError) -> Error {
        Error::new(
            ErrorKind::Connection,
            format!(
                "{} at {} did not answer PING: {}",
                self.noun(),
                self.address,
                self.redactor.scrub(&error.to_string())
            ),
        )
        .temporary(true)
        .with_source(error)
    }

    /// A `PING` that got no answer within `waited`, connecting included.
    pub(crate) fn ping_unanswered(&self, waited: Duration) -> Error {
        Error::new(
            ErrorKind::Connection,
            format!(
                "{} at {} did not answer PING within {waited:?}",
                self.noun(),
                self.address
            ),
        )
        .temporary(true)
    }
}

/// Certificates from the `tls-*-file` settings; `None` keeps redis-rs's defaults (the
/// system trust store, no client certificate).
fn tls_certificates(config: &RedisConfig) -> Result<Option<TlsCertificates>> {
    if config.tls_ca_file.is_none() && config.tls_cert_file.is_none() {
        return Ok(None);
    }
    let read = |key: &str, path: &Path| {
        std::fs::read(path).map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!("redis binder: cannot read `{key}` {}: {e}", path.display()),
            )
            .with_source(e)
        })
    };
    let root_cert = match &config.tls_ca_file {
        Some(path) => Some(read("tls-ca-file", path)?),
        None => None,
    };
    let client_tls = match (&config.tls_cert_file, &config.tls_key_file) {
        (Some(cert), Some(key)) => Some(ClientTlsConfig {
            client_cert: read("tls-cert-file", cert)?,
            client_key: read("tls-key-file", key)?,
        }),
        _ => None,
    };
    Ok(Some(TlsCertificates {
        client_tls,
        root_cert,
    }))
}

/// Takes the URLs and the passwords out of redis-rs messages, which may quote them.
#[derive(Clone)]
struct Redactor {
    /// Each URL as configured, and as shown.
    urls: Vec<(String, String)>,
    passwords: Vec<String>,
}

impl Redactor {
    fn scrub(&self, text: &str) -> String {
        let mut text = text.to_owned();
        for (url, redacted) in &self.urls {
            text = text.replace(url, redacted);
        }
        for password in self.passwords.iter().filter(|p| !p.is_empty()) {
            text = text.replace(password, "***");
        }
        text
    }
}

/// Errors that may pass if the same command is sent again later.
fn is_transient(e: &RedisError) -> bool {
    if e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.kind() == redis::ErrorKind::ClusterConnectionNotFound
    {
        return true;
    }
    if e.kind() == redis::ErrorKind::Server(ServerErrorKind::ExecAbort) {
        // A transaction that Redis refused at queue time ran none of its commands; whether
        // sending it again helps depends on why its commands were refused.
        return e.clone().into_server_errors().is_some_and(|errors| {
            !errors.is_empty()
                && errors
                    .iter()
                    .all(|(_, server)| server.kind().is_some_and(is_transient_refusal))
        });
    }
    matches!(e.kind(), redis::ErrorKind::Server(kind) if is_transient_refusal(kind))
}

/// Refusals that mean "not now" or "not here": loading after a restart, a failover under
/// way, a slot that moved or is moving to another node of a cluster.
pub(crate) fn is_transient_refusal(kind: ServerErrorKind) -> bool {
    matches!(
        kind,
        ServerErrorKind::BusyLoading
            | ServerErrorKind::TryAgain
            | ServerErrorKind::MasterDown
            | ServerErrorKind::ClusterDown
            | ServerErrorKind::ReadOnly
            | ServerErrorKind::Moved
            | ServerErrorKind::Ask
    )
}

/// Maps a failed command to the error kinds core retries on (connection, timeout) or
/// gives up on (broker). `what` says which command failed and where.
pub(crate) fn command_error(what: &str, e: RedisError) -> Error {
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else if e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.kind() == redis::ErrorKind::ClusterConnectionNotFound
    {
        ErrorKind::Connection
    } else {
        ErrorKind::Broker
    };
    let mut error = Error::new(kind, format!("{what}: {e}"));
    if kind == ErrorKind::Broker && is_transient(&e) {
        // LOADING after a restart, READONLY during a failover, MOVED/ASK while a slot
        // changes hands: the broker's word that trying again later works.
        error = error.temporary(true);
    }
    error.with_source(e)
}

/// `duration` in whole milliseconds, as a Redis argument (`BLOCK`, a min-idle-time): at
/// most `i64::MAX`, the most Redis reads there, so a huge setting means "never" instead of
/// wrapping around to some other number.
pub(crate) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .min(i64::MAX as u64)
}
