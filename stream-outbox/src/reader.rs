//! The relay's side of the PostgreSQL outbox: claiming committed rows, marking them sent,
//! waiting for new ones, removing old ones.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use stream_core::{Headers, Message, Result};
use tokio::sync::{Mutex, Notify};
use tokio_postgres::types::Type;
use tokio_postgres::{AsyncMessage, Client, NoTls};

use crate::outbox::{Outbox, RELAY_LOCK};
use crate::postgres::{connect, pg_error};
use crate::relay::{OutboxStore, Pending, Publisher};

/// Reads an [`Outbox`] table for a [`Relay`](crate::Relay), on connections of its own: one
/// for claiming rows, one that `LISTEN`s for new ones (reopened when it drops).
///
/// Several readers (in several processes) may read one table at once. A reader claims a
/// batch by taking a transaction-scoped advisory lock on each key of the oldest unsent rows;
/// the keys another reader holds are left to it. So a row is published once in normal
/// operation, and the rows of one key are published in order, by one reader at a time.
/// A reader that dies mid-batch leaves its rows unsent (its transaction rolls back when the
/// connection drops): the next claim publishes them again, with the same message ids.
pub struct OutboxReader {
    outbox: Outbox,
    config: tokio_postgres::Config,
    claimer: Mutex<Option<Client>>,
    listener: Mutex<Option<Listener>>,
    claim: String,
    fetch: String,
    mark_sent: String,
    mark_failed: String,
    remove_sent: String,
}

impl std::fmt::Debug for OutboxReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The connection settings may hold a password: only the table is shown.
        f.debug_struct("OutboxReader")
            .field("table", &self.outbox.table())
            .finish_non_exhaustive()
    }
}

/// A connection that `LISTEN`s on the outbox's channel.
struct Listener {
    _client: Client,
    notified: Arc<Notify>,
    alive: Arc<std::sync::atomic::AtomicBool>,
}

impl OutboxReader {
    pub(crate) fn new(outbox: Outbox, config: tokio_postgres::Config) -> OutboxReader {
        let t = outbox.table().to_owned();
        let relay_class = crate::postgres::TableName::new(&t)
            .expect("an outbox's table name is valid")
            .lock_class(RELAY_LOCK);
        // The oldest unsent rows, and the keys among them this reader could lock. The CTE
        // is materialized so that the locks are tried on those rows only.
        let claim = format!(
            "WITH candidates AS MATERIALIZED (
                 SELECT seq, lock_hash FROM {t}
                 WHERE sent_at IS NULL AND failure IS NULL ORDER BY seq LIMIT $1)
             SELECT lock_hash, max(seq) FROM candidates
             WHERE pg_try_advisory_xact_lock({relay_class}, lock_hash)
             GROUP BY lock_hash"
        );
        // Read again, in a new snapshot taken after the locks: a row that another reader
        // published and committed before we got its key is seen as sent, and a row whose
        // publication another reader rolled back is seen unsent, so each key's rows are
        // published in order.
        let fetch = format!(
            "SELECT seq, binding, message_key, message_id, header_names, header_values, payload
             FROM {t}
             WHERE sent_at IS NULL AND failure IS NULL AND seq <= $1 AND lock_hash = ANY($2)
             ORDER BY seq"
        );
        OutboxReader {
            mark_sent: format!("UPDATE {t} SET sent_at = now() WHERE seq = ANY($1)"),
            mark_failed: format!("UPDATE {t} SET failure = $2 WHERE seq = $1"),
            remove_sent: format!(
                "DELETE FROM {t} WHERE seq IN (
                     SELECT seq FROM {t} WHERE sent_at < now() - $1::float8 * interval '1 ms'
                     LIMIT 10000)"
            ),
            claim,
            fetch,
            outbox,
            config,
            claimer: Mutex::new(None),
            listener: Mutex::new(None),
        }
    }

    async fn listen(&self) -> Result<Listener> {
        let (client, mut connection) = self
            .config
            .connect(NoTls)
            .await
            .map_err(|e| pg_error("connecting to PostgreSQL to listen", e))?;
        let notified = Arc::new(Notify::new());
        let alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (wake, flag) = (notified.clone(), alive.clone());
        tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(_)) => wake.notify_one(),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "outbox listener connection ended");
                        break;
                    }
                }
            }
            flag.store(false, std::sync::atomic::Ordering::Release);
            // A waiter must not sleep on a dead connection.
            wake.notify_one();
        });
        client
            .batch_execute(&format!("LISTEN {}", self.outbox.channel()))
            .await
            .map_err(|e| pg_error("listening for outbox rows", e))?;
        Ok(Listener {
            _client: client,
            notified,
            alive,
        })
    }
}

fn row_to_pending(row: &tokio_postgres::Row) -> (i64, Pending) {
    let seq: i64 = row.get(0);
    let binding: String = row.get(1);
    let key: Option<String> = row.get(2);
    let message_id: String = row.get(3);
    let names: Vec<String> = row.get(4);
    let values: Vec<String> = row.get(5);
    let payload: Vec<u8> = row.get(6);
    let mut headers = Headers::new();
    for (name, value) in names.into_iter().zip(values) {
        headers.append(name, value);
    }
    headers.append(stream_core::header::MESSAGE_ID, message_id);
    let mut message = Message::new(payload).with_headers(headers);
    if let Some(key) = key {
        message = message.with_key(key);
    }
    (seq, Pending::new(binding, message))
}

#[async_trait]
impl OutboxStore for OutboxReader {
    async fn relay(&self, limit: usize, publisher: &dyn Publisher) -> Result<usize> {
        let mut slot = self.claimer.lock().await;
        if slot.as_ref().is_none_or(Client::is_closed) {
            *slot = Some(connect(&self.config).await?);
        }
        let client = slot.as_mut().expect("connected above");
        let result: Result<usize> = async {
            let tx = client
                .transaction()
                .await
                .map_err(|e| pg_error("starting a relay transaction", e))?;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let claimed = tx
                .query_typed(&self.claim, &[(&limit, Type::INT8)])
                .await
                .map_err(|e| pg_error("claiming outbox rows", e))?;
            if claimed.is_empty() {
                return Ok(0);
            }
            let hashes: Vec<i32> = claimed.iter().map(|row| row.get(0)).collect();
            let upto: i64 = claimed
                .iter()
                .map(|row| row.get::<_, i64>(1))
                .max()
                .unwrap_or(0);
            let rows = tx
                .query_typed(
                    &self.fetch,
                    &[(&upto, Type::INT8), (&hashes, Type::INT4_ARRAY)],
                )
                .await
                .map_err(|e| pg_error("reading outbox rows", e))?;
            let (seqs, batch): (Vec<i64>, Vec<Pending>) = rows.iter().map(row_to_pending).unzip();
            if batch.is_empty() {
                return Ok(0);
            }
            let rejected = publisher.publish(&batch).await?;
            let mut sent = seqs.clone();
            for rejection in &rejected {
                let seq = seqs[rejection.index];
                sent.retain(|s| *s != seq);
                tx.execute(&self.mark_failed, &[&seq, &rejection.reason])
                    .await
                    .map_err(|e| pg_error("marking an outbox row failed", e))?;
            }
            tx.query_typed(&self.mark_sent, &[(&sent, Type::INT8_ARRAY)])
                .await
                .map_err(|e| pg_error("marking outbox rows sent", e))?;
            tx.commit()
                .await
                .map_err(|e| pg_error("committing a relay transaction", e))?;
            Ok(seqs.len())
        }
        .await;
        if let Err(e) = &result {
            if e.is_temporary() {
                // Reconnect next time rather than reuse a connection in an unknown state.
                *slot = None;
            }
        }
        result
    }

    async fn wait_for_rows(&self, timeout: Duration) {
        let mut slot = self.listener.lock().await;
        let alive = slot
            .as_ref()
            .is_some_and(|l| l.alive.load(std::sync::atomic::Ordering::Acquire));
        if !alive {
            match self.listen().await {
                // Rows committed before LISTEN took effect sent no notification to us:
                // the caller looks again before waiting.
                Ok(listener) => {
                    *slot = Some(listener);
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for outbox rows; polling instead");
                    *slot = None;
                    drop(slot);
                    tokio::time::sleep(timeout).await;
                    return;
                }
            }
        }
        let notified = slot.as_ref().expect("alive above").notified.clone();
        drop(slot);
        let _ = tokio::time::timeout(timeout, notified.notified()).await;
    }

    async fn remove_sent(&self, older_than: Duration) -> Result<u64> {
        let client = connect(&self.config).await?;
        let millis = older_than.as_secs_f64() * 1000.0;
        let mut removed = 0;
        loop {
            let n = client
                .execute(&self.remove_sent, &[&millis])
                .await
                .map_err(|e| pg_error("removing sent outbox rows", e))?;
            removed += n;
            if n < 10_000 {
                return Ok(removed);
            }
        }
    }
}
