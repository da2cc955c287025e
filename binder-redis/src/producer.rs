//! Publishing: one `XADD` per message, pipelined for batches.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::{RedisError, RedisResult, ServerErrorKind};
use stream_core::{Error, ErrorKind, Message, Producer, Result};
use tokio::time::Instant;

use crate::config::Trim;
use crate::connection::command_error;
use crate::entry::write_fields;

/// XADD trimming as configured, `~` or `=`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TrimRule {
    pub(crate) trim: Trim,
    pub(crate) approximate: bool,
}

/// First pause before sending a refused command again; it doubles up to the cap.
const FIRST_RETRY: Duration = Duration::from_millis(25);
const MAX_RETRY: Duration = Duration::from_millis(500);

pub(crate) struct RedisProducer {
    conn: ConnectionManager,
    stream: String,
    trim: Option<TrimRule>,
    /// How long a send keeps trying while Redis refuses it (restarting, loading its data).
    patience: Duration,
    closed: AtomicBool,
}

impl RedisProducer {
    pub(crate) fn new(
        conn: ConnectionManager,
        stream: &str,
        trim: Option<TrimRule>,
        patience: Duration,
    ) -> Self {
        RedisProducer {
            conn,
            stream: stream.to_owned(),
            trim,
            patience,
            closed: AtomicBool::new(false),
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
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(MAX_RETRY);
                }
                result => return result,
            }
        }
    }

    fn xadd(&self, message: &Message) -> redis::Cmd {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&self.stream);
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
                    cmd.arg("MINID").arg(op).arg(cut.to_string());
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
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for message in &messages {
            pipe.add_command(self.xadd(message));
        }
        self.retrying(messages.len(), || {
            let mut conn = self.conn.clone();
            let pipe = &pipe;
            async move { pipe.query_async::<Vec<String>>(&mut conn).await }
        })
        .await
        .map_err(|e| {
            command_error(
                &format!(
                    "pipelined XADD of {} entries to stream `{}`",
                    messages.len(),
                    self.stream
                ),
                e,
            )
        })
    }

    async fn close(&self) -> Result<()> {
        // Every send already waited for Redis to accept it: nothing is buffered here.
        self.closed.store(true, Ordering::Release);
        Ok(())
    }
}

/// Whether Redis certainly ran none of the `commands` sent: a refused connection, or a
/// rejection before running (loading its data, a failover) of every one of them.
fn not_executed(e: &RedisError, commands: usize) -> bool {
    if e.is_connection_refusal() {
        return true;
    }
    let Some(errors) = e.clone().into_server_errors() else {
        return false;
    };
    let rejected = errors.iter().all(|(_, server)| {
        matches!(
            server.kind(),
            Some(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::ReadOnly
            )
        )
    });
    // A pipeline error lists only the commands that failed; the others ran.
    rejected && errors.len() == commands
}
