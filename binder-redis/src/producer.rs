//! Publishing: one `XADD` per message; a batch goes as `MULTI`/`XADD`.../`EXEC` transactions.
//!
//! Why transactions rather than a plain pipeline: Redis reads a pipeline in 16 KiB pieces and,
//! with `appendfsync always`, syncs the AOF after every piece that wrote something, so a plain
//! pipeline of 1 KiB messages costs one fsync per 15 messages. Queued commands write nothing
//! until `EXEC`, which runs the whole chunk in one event-loop turn: one fsync per chunk. It
//! also makes a chunk all-or-nothing, so a chunk refused at queue time (loading, OOM) is
//! known not to have run any of its entries.
//!
//! On a Redis Cluster the transactions stay: redis-rs's cluster connection sends a pipeline,
//! `atomic()` or not, whole to the master of the slot of its first keyed command, and every
//! command of a chunk names the same stream key. What redis-rs does not do for a transaction
//! is follow a redirect: a chunk sent to a master that lost the slot comes back as
//! `EXECABORT` listing a `MOVED` per `XADD`, so `RedisProducer::retrying` makes the
//! connection relearn the slot and sends the chunk again (it ran nothing).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use redis::{RedisError, RedisResult, ServerErrorKind};
use stream_core::{Error, ErrorKind, Message, Producer, Result};
use tokio::time::Instant;

use crate::config::Trim;
use crate::connection::{command_error, is_transient_refusal, Conn};
use crate::entry::{fields_size, write_fields};

/// Retention by acknowledgement as configured ([`crate::retention`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Retention {
    pub(crate) interval: Duration,
    pub(crate) approximate: bool,
}

/// XADD trimming as configured, `~` or `=`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TrimRule {
    pub(crate) trim: Trim,
    pub(crate) approximate: bool,
}

/// First pause before sending a refused command again; it doubles up to the cap.
const FIRST_RETRY: Duration = Duration::from_millis(25);
const MAX_RETRY: Duration = Duration::from_millis(500);

/// Bytes of the fixed `XADD` arguments: the command name, trimming and the id.
const XADD_OVERHEAD: usize = 48;
/// Most entries in one transaction: Redis holds a transaction's commands in memory until
/// `EXEC` and blocks other clients while it runs them.
const MAX_CHUNK_ENTRIES: usize = 1024;
/// Most payload bytes in one transaction (a single larger message still goes alone).
const MAX_CHUNK_BYTES: usize = 4 << 20;

pub(crate) struct RedisProducer {
    conn: Conn,
    stream: String,
    trim: Option<TrimRule>,
    /// How long a send keeps trying while Redis refuses it (restarting, loading its data).
    patience: Duration,
    closed: AtomicBool,
    /// Keeps the retention task running; taken by `close`.
    retention: std::sync::Mutex<Option<crate::retention::Alive>>,
}

impl RedisProducer {
    pub(crate) fn new(
        conn: Conn,
        stream: &str,
        trim: Option<TrimRule>,
        retention: Option<Retention>,
        patience: Duration,
    ) -> Self {
        let alive = retention.map(|retention| {
            let alive = crate::retention::Alive::default();
            tokio::spawn(crate::retention::run(
                std::sync::Arc::downgrade(&alive),
                conn.clone(),
                stream.to_owned(),
                retention.interval,
                retention.approximate,
            ));
            alive
        });
        RedisProducer {
            conn,
            stream: stream.to_owned(),
            trim,
            patience,
            closed: AtomicBool::new(false),
            retention: std::sync::Mutex::new(alive),
        }
    }

    /// Runs `attempt` again while Redis refuses it in a way that proves it did not run it,
    /// for up to `patience`: during a restart a send is delayed, not failed. Anything that
    /// may have run (a connection dropped mid-command) is returned to the caller instead,
    /// since a second `XADD` would duplicate the entry.
    async fn retrying<T, F, Fut>(&self, commands: usize, mut attempt: F) -> RedisResult<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let deadline = Instant::now() + self.patience;
        let mut wait = FIRST_RETRY;
        loop {
            match attempt().await {
                Err(e) if not_executed(&e, commands) && Instant::now() + wait < deadline => {
                    tracing::debug!(stream = %self.stream, error = %e, retry_in = ?wait, "redis refused XADD; sending it again");
                    if redirected(&e) {
                        self.conn.clone().relearn_slot(&self.stream).await;
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(MAX_RETRY);
                }
                result => return result,
            }
        }
    }

    fn xadd(&self, message: &Message) -> redis::Cmd {
        // Sized up front: growing the buffer argument by argument copies a large payload
        // several times over.
        let (field_args, field_bytes) = fields_size(message);
        let mut cmd = redis::Cmd::with_capacity(
            7 + field_args,
            XADD_OVERHEAD + self.stream.len() + field_bytes,
        );
        cmd.arg("XADD").arg(&self.stream);
        if let Some(rule) = self.trim {
            let op = if rule.approximate { "~" } else { "=" };
            match rule.trim {
                Trim::MaxLen(n) => {
                    cmd.arg("MAXLEN").arg(op).arg(n);
                }
                Trim::MaxAge(age) => {
                    // Entry ids start with the server's clock in ms; ours stands in for it,
                    // so clock skew between the two moves the cut by the same amount.
                    let now = SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap_or(Duration::ZERO);
                    let cut = now.saturating_sub(age).as_millis();
                    cmd.arg("MINID")
                        .arg(op)
                        .arg(u64::try_from(cut).unwrap_or(u64::MAX));
                }
            }
        }
        cmd.arg("*");
        write_fields(&mut cmd, message);
        cmd
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::new(
                ErrorKind::Closed,
                format!("producer for stream `{}` is closed", self.stream),
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl Producer for RedisProducer {
    async fn send(&self, message: Message) -> Result<String> {
        self.check_open()?;
        // The reply is the id Redis gave the entry, sent only after it was appended (and
        // written to the AOF first when appendfsync is `always`).
        let cmd = self.xadd(&message);
        self.retrying(1, || {
            let mut conn = self.conn.clone();
            let cmd = &cmd;
            async move { cmd.query_async::<String>(&mut conn).await }
        })
        .await
        .map_err(|e| command_error(&format!("XADD to stream `{}`", self.stream), e))
    }

    async fn send_batch(&self, messages: Vec<Message>) -> Result<Vec<String>> {
        self.check_open()?;
        let mut ids = Vec::with_capacity(messages.len());
        let mut rest = &messages[..];
        while !rest.is_empty() {
            let len = chunk_len(rest);
            let (chunk, tail) = rest.split_at(len);
            rest = tail;
            let mut pipe = redis::pipe();
            pipe.atomic();
            for message in chunk {
                pipe.add_command(self.xadd(message));
            }
            let chunk_ids = self
                .retrying(chunk.len(), || {
                    let mut conn = self.conn.clone();
                    let pipe = &pipe;
                    async move { pipe.query_async::<Vec<String>>(&mut conn).await }
                })
                .await
                .map_err(|e| {
                    let sent = if ids.is_empty() {
                        String::new()
                    } else {
                        format!(
                            " ({} earlier entries of the batch were appended)",
                            ids.len()
                        )
                    };
                    command_error(
                        &format!(
                            "XADD of {} entries to stream `{}`{sent}",
                            chunk.len(),
                            self.stream
                        ),
                        e,
                    )
                })?;
            ids.extend(chunk_ids);
        }
        Ok(ids)
    }

    async fn close(&self) -> Result<()> {
        // Every send already waited for Redis to accept it: nothing is buffered here.
        self.closed.store(true, Ordering::Release);
        self.retention
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        Ok(())
    }
}

/// How many of `messages` (at least one) go into the next transaction.
fn chunk_len(messages: &[Message]) -> usize {
    let mut bytes = 0;
    messages
        .iter()
        .take(MAX_CHUNK_ENTRIES)
        .position(|m| {
            bytes += m.payload().len();
            bytes > MAX_CHUNK_BYTES
        })
        .unwrap_or(messages.len().min(MAX_CHUNK_ENTRIES))
        .max(1)
}

/// Whether Redis certainly ran none of the `commands` sent: a refused connection, a
/// rejection before running (loading its data, a failover, a slot served elsewhere) of every
/// one of them, or a transaction that one such rejection aborted.
fn not_executed(e: &RedisError, commands: usize) -> bool {
    if e.is_connection_refusal() {
        return true;
    }
    let aborted = e.kind() == redis::ErrorKind::Server(ServerErrorKind::ExecAbort);
    let Some(errors) = e.clone().into_server_errors() else {
        return false;
    };
    let rejected = errors
        .iter()
        .all(|(_, server)| server.kind().is_some_and(is_transient_refusal));
    // A pipeline error lists only the commands that failed; the others ran. An aborted
    // transaction ran nothing, whichever of its commands were refused.
    rejected && !errors.is_empty() && (aborted || errors.len() == commands)
}

/// Whether a cluster node refused the commands because their slot has moved to another
/// node. A single command's redirect is followed by redis-rs itself; this one reached us
/// because it was part of a transaction. (`ASK`, a slot half-way through a migration, is not
/// helped by this: redis-rs cannot send a transaction after `ASKING`, so it is sent again
/// until the migration ends and the refusal becomes `MOVED`.)
fn redirected(e: &RedisError) -> bool {
    e.clone().into_server_errors().is_some_and(|errors| {
        errors
            .iter()
            .any(|(_, server)| server.kind() == Some(ServerErrorKind::Moved))
    })
}
