//! Connecting with a bounded retry, and turning redis errors into `stream_core` errors.

use std::path::Path;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{
    AsyncConnectionConfig, Client, ClientTlsConfig, IntoConnectionInfo, RedisError,
    ServerErrorKind, TlsCertificates,
};
use stream_core::{Error, ErrorKind, Result};

use crate::config::RedisConfig;

/// Backoff between connection attempts: 100 ms doubling, capped.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// What every connection of one binder is made from.
#[derive(Clone)]
pub(crate) struct Endpoint {
    client: Client,
    /// The URL with its password hidden, for errors and logs.
    pub(crate) address: String,
    connect_timeout: Duration,
    attempts: u32,
    redactor: Redactor,
}

impl Endpoint {
    /// Parses the URL and credentials; no network I/O.
    pub(crate) fn new(config: &RedisConfig) -> Result<Endpoint> {
        let address = config.redacted_url();
        let mut redactor = Redactor {
            url: config.url.clone(),
            redacted: address.clone(),
            password: config.password.clone(),
        };
        let mut info = config.url.as_str().into_connection_info().map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!(
                    "redis binder: invalid `url` {address}: {}",
                    redactor.scrub(&e.to_string())
                ),
            )
        })?;
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
        redactor.password = info.redis_settings().password().map(str::to_owned);
        if matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. }) {
            // rustls needs one process-wide crypto provider; if the application installed
            // another one already, that one is used and this is a no-op.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let client = match tls_certificates(config)? {
            Some(certificates) => Client::build_with_tls(info, certificates),
            None => Client::open(info),
        }
        .map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!(
                    "redis binder: cannot use `url` {address}: {}",
                    redactor.scrub(&e.to_string())
                ),
            )
        })?;
        Ok(Endpoint {
            client,
            address,
            connect_timeout: config.connect_timeout,
            attempts: config.connect_attempts,
            redactor,
        })
    }

    /// A connection that reconnects by itself, once Redis has answered at least once.
    ///
    /// The first contact is tried `connect-attempts` times with backoff, so that an
    /// unreachable server gives an error naming the address instead of a hang. After that,
    /// a dropped connection is re-established on the next command with the same budget;
    /// commands issued meanwhile fail with a temporary error or wait and succeed.
    pub(crate) async fn connect(&self, response_timeout: Duration) -> Result<ConnectionManager> {
        self.probe().await?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(response_timeout))
            .set_number_of_retries(self.attempts.saturating_sub(1) as usize)
            .set_min_delay(FIRST_BACKOFF)
            .set_max_delay(MAX_BACKOFF);
        let budget = self.connect_timeout * (self.attempts + 1) + MAX_BACKOFF * self.attempts;
        match tokio::time::timeout(
            budget,
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await
        {
            Ok(Ok(manager)) => Ok(manager),
            Ok(Err(e)) => Err(self.unreachable(1, e)),
            Err(_) => Err(Error::new(
                ErrorKind::Connection,
                format!(
                    "redis at {} did not accept a connection within {budget:?}",
                    self.address
                ),
            )),
        }
    }

    /// One plain connection per attempt, so the attempt count and the error are ours.
    async fn probe(&self) -> Result<()> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.connect_timeout));
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 1;
        loop {
            let result = self
                .client
                .get_multiplexed_async_connection_with_config(&config)
                .await;
            let error = match result {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            if attempt >= self.attempts || !is_transient(&error) {
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
                "cannot connect to redis at {} ({attempts} attempt{plural}): {}",
                self.address,
                self.redactor.scrub(&error.to_string())
            ),
        )
        .temporary(transient)
        .with_source(error)
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

/// Takes the URL and the password out of redis-rs messages, which may quote them.
#[derive(Clone)]
struct Redactor {
    url: String,
    redacted: String,
    password: Option<String>,
}

impl Redactor {
    fn scrub(&self, text: &str) -> String {
        let mut text = text.replace(&self.url, &self.redacted);
        if let Some(password) = self.password.as_deref().filter(|p| !p.is_empty()) {
            text = text.replace(password, "***");
        }
        text
    }
}

/// Errors that may pass if the same command is sent again later.
fn is_transient(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.kind(),
            redis::ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::ReadOnly
            )
        )
}

/// Maps a failed command to the error kinds core retries on (connection, timeout) or
/// gives up on (broker). `what` says which command failed and where.
pub(crate) fn command_error(what: &str, e: RedisError) -> Error {
    let kind = if e.is_timeout() {
        ErrorKind::Timeout
    } else if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
        ErrorKind::Connection
    } else {
        ErrorKind::Broker
    };
    let mut error = Error::new(kind, format!("{what}: {e}"));
    if kind == ErrorKind::Broker && is_transient(&e) {
        // LOADING after a restart, READONLY during a failover: the broker's word that
        // trying again later works.
        error = error.temporary(true);
    }
    error.with_source(e)
}
