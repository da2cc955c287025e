//! The writing side: events go into the outbox table in the caller's own transaction.

use serde::Serialize;
use stream_core::{header, Message, Result};
use tokio_postgres::types::Type;
use tokio_postgres::GenericClient;
use tracing::Instrument;

use crate::postgres::{parse_config, pg_error, TableName};
use crate::reader::OutboxReader;

/// The table [`Outbox::new`] uses.
pub const DEFAULT_TABLE: &str = "stream_outbox";

/// Lock roles: writers of one key queue behind each other; relays claim keys.
pub(crate) const WRITER_LOCK: u32 = 0;
pub(crate) const RELAY_LOCK: u32 = 1;

/// A transactional outbox in a PostgreSQL table.
///
/// [`send`](Outbox::send) writes an event in the caller's transaction: it is published if and
/// only if that transaction commits, by a [`Relay`](crate::Relay) reading the table through
/// [`reader`](Outbox::reader). Events with one key are published in the order their
/// transactions committed: `send` takes a transaction-scoped advisory lock on the key, so a
/// second transaction writing that key waits until the first one ends.
///
/// ```no_run
/// # async fn doc(mut client: tokio_postgres::Client) -> stream_core::Result<()> {
/// # #[derive(serde::Serialize)] struct OrderPlaced { id: u64 }
/// let outbox = stream_outbox::Outbox::new();
/// outbox.install(&client).await?; // once: CREATE TABLE IF NOT EXISTS
///
/// let tx = client.transaction().await.unwrap();
/// tx.execute("INSERT INTO orders (id) VALUES (7)", &[]).await.unwrap();
/// outbox.send(&tx, "orders-out", "7", &OrderPlaced { id: 7 }).await?;
/// tx.commit().await.unwrap(); // the event exists from here on, or never
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Outbox {
    table: TableName,
    insert: String,
    insert_all: String,
    channel: String,
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox::new()
    }
}

impl Outbox {
    /// The outbox in table `stream_outbox`.
    pub fn new() -> Outbox {
        Outbox::from_table(TableName::new(DEFAULT_TABLE).expect("the default table name is valid"))
    }

    /// The outbox in `table` (lowercase, optionally schema-qualified: `events.outbox`).
    pub fn with_table(table: &str) -> Result<Outbox> {
        Ok(Outbox::from_table(TableName::new(table)?))
    }

    fn from_table(table: TableName) -> Outbox {
        let channel = table.bare().to_owned();
        // The key's lock is taken in the subquery, before the row draws its `seq`: a second
        // writer of the key waits for the first to commit and gets the higher number, so
        // `seq` order is commit order within a key. A NULL key takes no lock (strict
        // function). The notification is sent at commit, and never on rollback.
        let insert = format!(
            "INSERT INTO {t} (binding, message_key, lock_hash, message_id, header_names, \
             header_values, payload) \
             SELECT $1, $2, hashtext(COALESCE($2, $3)), $3, $4, $5, $6 \
             FROM (SELECT pg_advisory_xact_lock({class}, hashtext($2)), \
                          pg_notify('{channel}', '')) AS ordered",
            t = table.as_str(),
            class = table.lock_class(WRITER_LOCK),
        );
        // Every key's lock first, in one order (hash order) so that two transactions
        // writing the same keys never wait for each other in a cycle; the locks and the
        // notification are one-time filters, evaluated before the first row draws its
        // `seq`, and rows are numbered in the order given.
        let insert_all = format!(
            "WITH locked AS MATERIALIZED (
                 SELECT pg_advisory_xact_lock({class}, h) FROM (
                     SELECT DISTINCT hashtext(k) AS h FROM unnest($2::text[]) AS k
                     ORDER BY h) AS keys),
             notified AS MATERIALIZED (SELECT pg_notify('{channel}', ''))
             INSERT INTO {t} (binding, message_key, lock_hash, message_id, header_names, \
             header_values, payload)
             SELECT $1, e.key, hashtext(COALESCE(e.key, e.id)), e.id, $4, $5, e.payload
             FROM unnest($2::text[], $3::text[], $6::bytea[]) WITH ORDINALITY
                 AS e(key, id, payload, ord)
             WHERE (SELECT count(*) FROM locked) >= 0 AND (SELECT count(*) FROM notified) = 1
             ORDER BY e.ord",
            t = table.as_str(),
            class = table.lock_class(WRITER_LOCK),
        );
        Outbox {
            table,
            insert,
            insert_all,
            channel,
        }
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        self.table.as_str()
    }

    pub(crate) fn channel(&self) -> &str {
        &self.channel
    }

    /// Creates the table and its indexes if they do not exist. Safe to run from every
    /// instance at start-up: instances installing at once wait for each other.
    pub async fn install(&self, client: &impl GenericClient) -> Result<()> {
        let t = self.table.as_str();
        let bare = self.table.bare();
        let ddl = format!(
            "SELECT pg_advisory_xact_lock({class}, 0);
             CREATE TABLE IF NOT EXISTS {t} (
                 seq bigserial PRIMARY KEY,
                 binding text NOT NULL,
                 message_key text,
                 lock_hash integer NOT NULL,
                 message_id text NOT NULL,
                 header_names text[] NOT NULL,
                 header_values text[] NOT NULL,
                 payload bytea NOT NULL,
                 created_at timestamptz NOT NULL DEFAULT now(),
                 sent_at timestamptz,
                 failure text
             );
             CREATE INDEX IF NOT EXISTS {bare}_unsent ON {t} (seq)
                 WHERE sent_at IS NULL AND failure IS NULL;
             CREATE INDEX IF NOT EXISTS {bare}_sent ON {t} (sent_at)
                 WHERE sent_at IS NOT NULL;",
            class = self.table.lock_class(RELAY_LOCK),
        );
        // One implicit transaction: the lock covers the DDL.
        client
            .batch_execute(&ddl)
            .await
            .map_err(|e| pg_error("creating the outbox table", e))
    }

    /// Writes `event` (as JSON, under `key`) to be published to `binding` once the
    /// transaction `client` belongs to commits. Returns the event's message id
    /// ([`header::MESSAGE_ID`]), a fresh UUIDv7: a consumer that deduplicates drops the
    /// copies a relay crash may publish twice.
    ///
    /// Not cancel-safe in effect: dropping the future may leave the row written in the
    /// open transaction; roll the transaction back if the call does not complete.
    pub async fn send<T: Serialize + ?Sized>(
        &self,
        client: &impl GenericClient,
        binding: &str,
        key: &str,
        event: &T,
    ) -> Result<String> {
        let message = crate::json_message(event)?.with_key(key);
        self.send_message(client, binding, message).await
    }

    /// Writes a prepared message (its key, headers and, if set, its message id are kept).
    /// Returns its message id.
    pub async fn send_message(
        &self,
        client: &impl GenericClient,
        binding: &str,
        message: Message,
    ) -> Result<String> {
        let mut message = message;
        let message_id = crate::message_id_of(&message);
        let span = crate::write_span(binding, &mut message, &message_id);
        let (_, key, headers, payload) = message.into_parts();
        let (names, values): (Vec<&str>, Vec<&str>) = headers
            .iter()
            .filter(|(name, _)| *name != header::MESSAGE_ID)
            .unzip();
        client
            .query_typed(
                &self.insert,
                &[
                    (&binding, Type::TEXT),
                    (&key, Type::TEXT),
                    (&message_id, Type::TEXT),
                    (&names, Type::TEXT_ARRAY),
                    (&values, Type::TEXT_ARRAY),
                    (&payload.as_ref(), Type::BYTEA),
                ],
            )
            .instrument(span)
            .await
            .map_err(|e| pg_error("writing to the outbox", e))?;
        Ok(message_id)
    }

    /// Writes several events for `binding` (as JSON, each under its key) in one statement,
    /// in the given order; returns their message ids in that order. The same as calling
    /// [`send`](Outbox::send) for each, in one round trip, except that the keys' locks
    /// are taken all at once, in an order of their own, so two transactions writing the
    /// same keys through `send_all` never deadlock.
    pub async fn send_all<'e, T, I>(
        &self,
        client: &impl GenericClient,
        binding: &str,
        events: I,
    ) -> Result<Vec<String>>
    where
        T: Serialize + ?Sized + 'e,
        I: IntoIterator<Item = (&'e str, &'e T)>,
    {
        let mut keys = Vec::new();
        let mut payloads = Vec::new();
        for (key, event) in events {
            keys.push(key);
            payloads.push(crate::json(event)?);
        }
        let ids: Vec<String> = keys.iter().map(|_| stream_core::new_message_id()).collect();
        // One span and one trace context for the batch: written by one request.
        let mut shared = crate::json_headers();
        let span = tracing::debug_span!(
            "stream.outbox",
            binding = %binding,
            messages = keys.len(),
        );
        stream_core::telemetry::inject_context(&span, &mut shared);
        let (names, values): (Vec<&str>, Vec<&str>) = shared.iter().unzip();
        client
            .query_typed(
                &self.insert_all,
                &[
                    (&binding, Type::TEXT),
                    (&keys, Type::TEXT_ARRAY),
                    (&ids, Type::TEXT_ARRAY),
                    (&names, Type::TEXT_ARRAY),
                    (&values, Type::TEXT_ARRAY),
                    (&payloads, Type::BYTEA_ARRAY),
                ],
            )
            .instrument(span)
            .await
            .map_err(|e| pg_error("writing to the outbox", e))?;
        Ok(ids)
    }

    /// What a [`Relay`](crate::Relay) reads this outbox through: its own connections to
    /// the database at `url` (`postgres://user:password@host:port/db` or `key=value` pairs).
    pub fn reader(&self, url: &str) -> Result<OutboxReader> {
        Ok(OutboxReader::new(self.clone(), parse_config(url)?))
    }
}
