//! Idempotent consumers on PostgreSQL: a [`DedupStore`] for the binding key `dedup`, and
//! handlers that record their effects in the transaction that marks the message handled.

use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use serde::Deserialize;
use stream_core::config::duration;
use stream_core::dedup::DedupStore;
use stream_core::{BoxError, Envelope, Error, ErrorKind, Result, Sink, Subscription};
use tokio_postgres::types::Type;
use tokio_postgres::NoTls;

use crate::postgres::{parse_config, pg_error, TableName};

/// How a [`PgDedup`] keeps its ids.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PgDedupConfig {
    /// The table of handled ids (lowercase, optionally schema-qualified). Default:
    /// `stream_dedup`.
    #[serde(default = "defaults::table")]
    pub table: String,
    /// Connections kept open: at least the `concurrency` of the bindings that use the
    /// store, since each handling holds one for its transaction. Default: 16.
    #[serde(default = "defaults::pool_size")]
    pub pool_size: usize,
    /// How often expired ids are deleted. Default: 10 min.
    #[serde(default = "defaults::cleanup_interval", with = "duration")]
    pub cleanup_interval: Duration,
}

impl Default for PgDedupConfig {
    fn default() -> Self {
        PgDedupConfig {
            table: defaults::table(),
            pool_size: defaults::pool_size(),
            cleanup_interval: defaults::cleanup_interval(),
        }
    }
}

mod defaults {
    use std::time::Duration;
    pub fn table() -> String {
        "stream_dedup".into()
    }
    pub fn pool_size() -> usize {
        16
    }
    pub fn cleanup_interval() -> Duration {
        Duration::from_secs(600)
    }
}

/// Handled message ids in a PostgreSQL table.
///
/// Two ways to use it:
///
/// - As the [`DedupStore`] of a binding's `dedup` key (register it with
///   [`StreamsBuilder::dedup_store`](stream_core::StreamsBuilder::dedup_store)): the id is
///   checked before the handler and marked after it succeeded, like the Redis store. A
///   process that dies between the handler's success and the mark handles the message
///   again when it is redelivered.
/// - With [`subscribe`](PgDedup::subscribe): the handler gets the transaction ([`Tx`]) in
///   which the id was claimed, and its writes commit together with the mark, or not at
///   all. A message is then handled to effect exactly once in this database, whatever
///   crashes, redeliveries and redrives happen within the id's TTL.
#[derive(Clone)]
pub struct PgDedup {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    handled: String,
    mark: String,
    claim: String,
    remove_expired: String,
}

impl std::fmt::Debug for PgDedup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The pool's settings hold the password: not shown.
        f.debug_struct("PgDedup")
            .field("status", &self.inner.pool.status())
            .finish_non_exhaustive()
    }
}

impl PgDedup {
    /// Connects to the database at `url` with [`PgDedupConfig::default`] and creates the
    /// table if it does not exist.
    pub async fn connect(url: &str) -> Result<PgDedup> {
        PgDedup::connect_with(url, PgDedupConfig::default()).await
    }

    /// Connects with `config`.
    pub async fn connect_with(url: &str, config: PgDedupConfig) -> Result<PgDedup> {
        let table = TableName::new(&config.table)?;
        let manager = Manager::from_config(
            parse_config(url)?,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(config.pool_size.max(1))
            .build()
            .map_err(|e| {
                Error::new(ErrorKind::Config, "cannot build the PostgreSQL pool").with_source(e)
            })?;
        let t = table.as_str();
        let inner = Arc::new(Inner {
            pool,
            handled: format!(
                "SELECT 1 FROM {t} WHERE scope = $1 AND message_id = $2 AND expires_at > now()"
            ),
            mark: format!(
                "INSERT INTO {t} (scope, message_id, expires_at)
                 VALUES ($1, $2, now() + $3 * interval '1 ms')
                 ON CONFLICT (scope, message_id) DO UPDATE SET expires_at = EXCLUDED.expires_at"
            ),
            // A second claim of one id waits on the primary key until the first transaction
            // ends: it then sees the id handled (commit) or claims it itself (rollback).
            claim: format!(
                "INSERT INTO {t} AS handled (scope, message_id, expires_at)
                 VALUES ($1, $2, now() + $3 * interval '1 ms')
                 ON CONFLICT (scope, message_id) DO UPDATE SET expires_at = EXCLUDED.expires_at
                 WHERE handled.expires_at <= now()
                 RETURNING 1"
            ),
            remove_expired: format!(
                "DELETE FROM {t} WHERE ctid IN (
                     SELECT ctid FROM {t} WHERE expires_at <= now() LIMIT 10000)"
            ),
        });
        let dedup = PgDedup { inner };
        dedup.install(&table).await?;
        tokio::spawn(sweep(Arc::downgrade(&dedup.inner), config.cleanup_interval));
        Ok(dedup)
    }

    async fn install(&self, table: &TableName) -> Result<()> {
        let conn = self.connection().await?;
        let (t, bare) = (table.as_str(), table.bare());
        conn.batch_execute(&format!(
            "SELECT pg_advisory_xact_lock({class}, 0);
             CREATE TABLE IF NOT EXISTS {t} (
                 scope text NOT NULL,
                 message_id text NOT NULL,
                 expires_at timestamptz NOT NULL,
                 PRIMARY KEY (scope, message_id)
             );
             CREATE INDEX IF NOT EXISTS {bare}_expires ON {t} (expires_at);",
            class = table.lock_class(0),
        ))
        .await
        .map_err(|e| pg_error("creating the dedup table", e))
    }

    async fn connection(&self) -> Result<Object> {
        self.inner.pool.get().await.map_err(|e| {
            let kind = match e {
                deadpool_postgres::PoolError::Timeout(_) => ErrorKind::Timeout,
                _ => ErrorKind::Connection,
            };
            Error::new(kind, "PostgreSQL: no connection for the dedup store").with_source(e)
        })
    }

    /// Deletes expired ids now (a task of the store does it every `cleanup-interval`);
    /// returns how many.
    pub async fn remove_expired(&self) -> Result<u64> {
        let conn = self.connection().await?;
        let mut removed = 0;
        loop {
            let n = conn
                .execute(&self.inner.remove_expired, &[])
                .await
                .map_err(|e| pg_error("removing expired ids", e))?;
            removed += n;
            if n < 10_000 {
                return Ok(removed);
            }
        }
    }

    /// Runs `handler` for every message of `sink`, each in a transaction that first claims
    /// the message id for the sink's group: a message whose id the group already handled
    /// within `ttl` is acknowledged without calling the handler; otherwise the handler's
    /// writes through [`Tx`] and the claim commit together when it returns `Ok`, and roll
    /// back together when it fails (then the binding's retry and dead-letter rules apply).
    ///
    /// The binding needs a `group`. Leave its `dedup` key unset: the claim is the check.
    ///
    /// ```no_run
    /// # async fn doc(sink: stream_core::Sink<String>, dedup: stream_outbox::PgDedup) -> stream_core::Result<()> {
    /// use std::time::Duration;
    /// use stream_core::{BoxError, Envelope};
    /// use stream_outbox::Tx;
    ///
    /// let day = Duration::from_secs(24 * 3600);
    /// let subscription = dedup
    ///     .subscribe(&sink, day, |payment: Envelope<String>, tx: Tx| async move {
    ///         tx.execute("INSERT INTO payments (order_id) VALUES ($1)", &[payment.payload()])
    ///             .await?;
    ///         Ok::<(), BoxError>(())
    ///     })
    ///     .await?;
    /// # subscription.shutdown().await }
    /// ```
    pub async fn subscribe<T, F, Fut, E>(
        &self,
        sink: &Sink<T>,
        ttl: Duration,
        handler: F,
    ) -> Result<Subscription>
    where
        T: Send + 'static,
        F: Fn(Envelope<T>, Tx) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        let channel = sink.channel();
        let Some(group) = channel.config().group.clone() else {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "bindings.{}: a deduplicating consumer needs a `group` (ids are \
                     remembered per group)",
                    channel.name()
                ),
            ));
        };
        let scope: Arc<str> =
            stream_core::dedup::scope(&group, &channel.config().destination).into();
        let handler = Arc::new(handler);
        let dedup = self.clone();
        sink.subscribe_envelope(move |envelope: Envelope<T>| {
            let (dedup, scope, handler) = (dedup.clone(), scope.clone(), handler.clone());
            async move { dedup.handle_once(&scope, ttl, envelope, &*handler).await }
        })
        .await
    }

    async fn handle_once<T, F, Fut, E>(
        &self,
        scope: &str,
        ttl: Duration,
        envelope: Envelope<T>,
        handler: &F,
    ) -> std::result::Result<(), BoxError>
    where
        F: Fn(Envelope<T>, Tx) -> Fut,
        Fut: Future<Output = std::result::Result<(), E>>,
        E: Into<BoxError>,
    {
        let conn = self.connection().await?;
        conn.batch_execute("BEGIN")
            .await
            .map_err(|e| pg_error("starting a dedup transaction", e))?;
        let tx = Tx::new(conn);
        if let Some(id) = envelope.message().message_id() {
            let ttl_ms = ttl.as_secs_f64() * 1000.0;
            let claimed = tx
                .query_typed(
                    &self.inner.claim,
                    &[
                        (&scope, Type::TEXT),
                        (&id, Type::TEXT),
                        (&ttl_ms, Type::FLOAT8),
                    ],
                )
                .await
                .map_err(|e| pg_error("claiming a message id", e))?;
            if claimed.is_empty() {
                tracing::debug!(%id, scope, "already handled; acknowledged without handling");
                tx.finish("ROLLBACK").await?;
                return Ok(());
            }
        }
        let outcome: std::result::Result<(), BoxError> =
            handler(envelope, tx.clone()).await.map_err(Into::into);
        match outcome {
            Ok(()) => Ok(tx.finish("COMMIT").await?),
            Err(e) => {
                tx.finish("ROLLBACK").await?;
                Err(e)
            }
        }
    }
}

/// Deletes expired ids every `interval` while the store lives.
async fn sweep(inner: Weak<Inner>, interval: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        let Some(inner) = inner.upgrade() else { return };
        if let Err(e) = (PgDedup { inner }).remove_expired().await {
            tracing::warn!(error = %e, "could not remove expired dedup ids");
        }
    }
}

#[async_trait]
impl DedupStore for PgDedup {
    async fn handled(&self, scope: &str, id: &str) -> Result<bool> {
        let conn = self.connection().await?;
        let rows = conn
            .query_typed(
                &self.inner.handled,
                &[(&scope, Type::TEXT), (&id, Type::TEXT)],
            )
            .await
            .map_err(|e| pg_error("looking up a message id", e))?;
        Ok(!rows.is_empty())
    }

    async fn mark(&self, scope: &str, id: &str, ttl: Duration) -> Result<()> {
        let conn = self.connection().await?;
        let ttl_ms = ttl.as_secs_f64() * 1000.0;
        conn.query_typed(
            &self.inner.mark,
            &[
                (&scope, Type::TEXT),
                (&id, Type::TEXT),
                (&ttl_ms, Type::FLOAT8),
            ],
        )
        .await
        .map_err(|e| pg_error("marking a message id handled", e))?;
        Ok(())
    }
}

/// The open transaction a [`PgDedup::subscribe`] handler runs in: a connection (it derefs
/// to [`tokio_postgres::Client`]) on which `BEGIN` was issued. Run the handler's statements
/// on it, and pass `&*tx` where a [`GenericClient`](tokio_postgres::GenericClient) is
/// taken ([`Outbox::send`](crate::Outbox::send): an event published if and only if the
/// handling commits). Commit and rollback are the store's: do not issue them, and do not
/// keep the `Tx` beyond the handler.
#[derive(Clone)]
pub struct Tx {
    open: Arc<OpenTx>,
}

struct OpenTx {
    conn: Option<Object>,
    finished: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Tx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tx").finish_non_exhaustive()
    }
}

impl Tx {
    fn new(conn: Object) -> Tx {
        Tx {
            open: Arc::new(OpenTx {
                conn: Some(conn),
                finished: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    async fn finish(&self, statement: &str) -> Result<()> {
        self.batch_execute(statement)
            .await
            .map_err(|e| pg_error("ending a dedup transaction", e))?;
        self.open
            .finished
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }
}

impl std::ops::Deref for Tx {
    type Target = tokio_postgres::Client;

    fn deref(&self) -> &tokio_postgres::Client {
        self.open.conn.as_ref().expect("taken only on drop")
    }
}

impl Drop for OpenTx {
    fn drop(&mut self) {
        if !self.finished.load(std::sync::atomic::Ordering::Acquire) {
            // Cancelled mid-transaction (a shutdown that gave up on the handler): the
            // connection must not go back to the pool inside the transaction. Closing it
            // makes the server roll back.
            if let Some(conn) = self.conn.take() {
                drop(Object::take(conn));
            }
        }
    }
}
