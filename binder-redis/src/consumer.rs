//! Consuming as a member of a consumer group: the loop behind `receive` (own pending list,
//! `XAUTOCLAIM`, `XREADGROUP`), batched `XACK`, and leaving the group.
//!
//! Reads and acks use different connections. Redis runs the commands of one connection in
//! order, so an `XACK` queued behind an `XREADGROUP ... BLOCK` would wait for the block to
//! end; the blocking connection also needs a response timeout longer than `BLOCK`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::{RedisError, Value};
use stream_core::{
    Consumer, ConsumerOptions, DeliveryTag, Error, ErrorKind, Received, Result, StartFrom,
};
use tokio::time::Instant;

use crate::connection::command_error;
use crate::entry::{parse_autoclaim, parse_pending_count, parse_read, Entry, EntryId, Malformed};

/// The start of a stream or pending list.
const ZERO: EntryId = EntryId { ms: 0, seq: 0 };
/// Pending entries handed back per script call at close.
const RELEASE_PAGE: usize = 500;
/// Most entries read from the own pending list in one round trip.
const MAX_PENDING_PAGE: usize = 4096;
/// The shortest pause between claim sweeps, whatever the configuration says.
const MIN_CLAIM_INTERVAL: Duration = Duration::from_millis(10);

/// Hands this consumer's pending entries back to the group at close: their delivery time is
/// set to 1970 so that the next `XAUTOCLAIM` of any member takes them at once. When nothing
/// is pending it deletes the consumer name instead. One script, so that no entry can enter
/// the pending list between the emptiness check and `XGROUP DELCONSUMER`, which would drop
/// it from the group for good.
///
/// KEYS[1] stream; ARGV: group, consumer, range start (`-` or `(id`), page size.
/// Returns {handed back, last id}.
const RELEASE_SCRIPT: &str = r"
local page = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], '+', tonumber(ARGV[4]), ARGV[2])
if #page == 0 then
  if ARGV[3] == '-' then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
  end
  return {0, ''}
end
local args = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], '0'}
for _, entry in ipairs(page) do
  args[#args + 1] = entry[1]
end
args[#args + 1] = 'TIME'
args[#args + 1] = '1'
args[#args + 1] = 'JUSTID'
redis.call(unpack(args))
return {#page, page[#page][1]}
";

/// Consumer settings that come from the binder's configuration.
#[derive(Debug, Clone)]
pub(crate) struct ReadSettings {
    pub(crate) block: Duration,
    pub(crate) claim_interval: Option<Duration>,
    pub(crate) consumer_prefix: String,
}

pub(crate) struct RedisConsumer {
    /// Shared with the binder's producers: acks, group setup, close.
    commands: ConnectionManager,
    stream: String,
    group: String,
    name: String,
    durable: bool,
    start: StartFrom,
    claim_idle: Duration,
    claim_interval: Duration,
    block: Duration,
    /// Held for the whole of a `receive`; core calls it from one task anyway.
    state: tokio::sync::Mutex<ReadState>,
    /// Returned by `receive`, not yet acknowledged: claims and pending passes skip these,
    /// so a slow handler's message is not handed to this same consumer a second time.
    in_flight: Mutex<HashSet<DeliveryTag>>,
    closed: AtomicBool,
}

struct ReadState {
    /// The blocking-read connection; `None` once closed.
    conn: Option<ConnectionManager>,
    /// The group is known to exist since the last interruption.
    ready: bool,
    /// A `receive` began and did not return its batch (an error, or the future was
    /// dropped): entries may sit in our pending list that nobody has seen.
    interrupted: bool,
    /// Where the pass over our own pending entries continues; `None` when it is done.
    pending_from: Option<EntryId>,
    /// The `XAUTOCLAIM` cursor.
    claim_from: EntryId,
    /// When the next claim sweep starts.
    next_claim: Instant,
}

/// Where entries of one read came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// `XREADGROUP ... >`: first delivery.
    New,
    /// Our own pending list, or claimed from another member: delivered before.
    Redelivered,
}

/// A failed step of the consumer loop.
enum Fail {
    Redis(String, RedisError),
    Reply(String, Malformed),
}

impl Fail {
    /// The group or the whole stream is gone: `NOGROUP`, or `UNBLOCKED` for a read that was
    /// blocked when the stream key was deleted.
    fn no_group(&self) -> bool {
        matches!(self, Fail::Redis(_, e) if matches!(e.code(), Some("NOGROUP" | "UNBLOCKED")))
    }

    fn into_error(self) -> Error {
        match self {
            Fail::Redis(what, e) => command_error(&what, e),
            Fail::Reply(what, e) => {
                Error::new(ErrorKind::Broker, format!("{what}: {e}")).with_source(e)
            }
        }
    }
}

impl RedisConsumer {
    /// Joins (creating if needed) the group, so that a `latest` group starts now, not at the
    /// first `receive`.
    pub(crate) async fn open(
        commands: ConnectionManager,
        read: ConnectionManager,
        stream: &str,
        options: &ConsumerOptions,
        settings: &ReadSettings,
    ) -> Result<RedisConsumer> {
        let claim_interval = settings
            .claim_interval
            .unwrap_or(options.claim_idle / 2)
            .max(MIN_CLAIM_INTERVAL);
        let consumer = RedisConsumer {
            commands,
            stream: stream.to_owned(),
            group: options.group.clone(),
            name: format!(
                "{}-{}",
                settings.consumer_prefix,
                stream_core::unique_suffix()
            ),
            durable: options.durable,
            start: options.start_from,
            claim_idle: options.claim_idle,
            claim_interval,
            block: settings.block,
            state: tokio::sync::Mutex::new(ReadState {
                conn: Some(read),
                ready: true,
                interrupted: false,
                // A fresh name has an empty pending list; the pass costs one round trip and
                // keeps the rule simple: own pending first, then the rest.
                pending_from: Some(ZERO),
                claim_from: ZERO,
                // Work abandoned by a crashed member is looked for right away.
                next_claim: Instant::now(),
            }),
            in_flight: Mutex::new(HashSet::new()),
            closed: AtomicBool::new(false),
        };
        consumer
            .create_group(&mut consumer.commands.clone())
            .await
            .map_err(Fail::into_error)?;
        tracing::debug!(stream = %consumer.stream, group = %consumer.group, consumer = %consumer.name, "joined consumer group");
        Ok(consumer)
    }

    async fn create_group(&self, conn: &mut ConnectionManager) -> Result<(), Fail> {
        let start = match self.start {
            StartFrom::Earliest => "0",
            StartFrom::Latest => "$",
        };
        let mut cmd = redis::cmd("XGROUP");
        cmd.arg("CREATE")
            .arg(&self.stream)
            .arg(&self.group)
            .arg(start)
            .arg("MKSTREAM");
        match cmd.query_async::<()>(conn).await {
            Ok(()) => Ok(()),
            // Created by another member, or by us before a reconnect: exactly what we want.
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(self.fail("XGROUP CREATE", e)),
        }
    }

    fn fail(&self, command: &str, e: RedisError) -> Fail {
        Fail::Redis(
            format!(
                "{command} on stream `{}` group `{}`",
                self.stream, self.group
            ),
            e,
        )
    }

    /// One step of the loop: unfinished own pending entries first, then (when due) entries
    /// other members left idle, then new entries, waiting at most until the next claim.
    async fn fetch(&self, state: &mut ReadState, max: usize) -> Result<Vec<Received>, Fail> {
        let Some(mut conn) = state.conn.clone() else {
            return Ok(Vec::new());
        };
        if !state.ready {
            self.create_group(&mut conn).await?;
            state.pending_from = Some(ZERO);
            state.ready = true;
        }
        while let Some(from) = state.pending_from {
            // Entries still being handled here sit in the same list and are skipped; reading
            // past them in one go saves a round trip per page of them.
            let in_flight = self
                .in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .len();
            let count = (max + in_flight).min(MAX_PENDING_PAGE).max(max);
            let entries = self.read(&mut conn, count, &from.to_string(), None).await?;
            let Some(last) = entries.last() else {
                state.pending_from = None;
                break;
            };
            let last = last.id;
            let mut batch = self.accept(&mut conn, entries, Origin::Redelivered).await?;
            if batch.len() > max {
                // The rest stays pending and is read again by the next call.
                batch.truncate(max);
            }
            state.pending_from = Some(match (batch.len() == max, batch.last()) {
                (true, Some(returned)) => EntryId::from_tag(returned.tag),
                _ => last,
            });
            if !batch.is_empty() {
                return Ok(batch);
            }
        }
        let now = Instant::now();
        if now >= state.next_claim {
            let batch = self.claim(&mut conn, state, max).await?;
            if state.claim_from == ZERO {
                // A sweep of the whole pending list is done; the next one waits. Until then
                // every receive continues the sweep, so a large backlog is taken over fast.
                state.next_claim = now + self.claim_interval;
            }
            if !batch.is_empty() {
                return Ok(batch);
            }
        }
        let until_claim = state.next_claim.saturating_duration_since(Instant::now());
        let block = self.block.min(until_claim).max(Duration::from_millis(1));
        let entries = self.read(&mut conn, max, ">", Some(block)).await?;
        self.accept(&mut conn, entries, Origin::New).await
    }

    async fn read(
        &self,
        conn: &mut ConnectionManager,
        max: usize,
        from: &str,
        block: Option<Duration>,
    ) -> Result<Vec<Entry>, Fail> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.group)
            .arg(&self.name)
            .arg("COUNT")
            .arg(max);
        if let Some(block) = block {
            cmd.arg("BLOCK").arg(block.as_millis().max(1) as u64);
        }
        cmd.arg("STREAMS").arg(&self.stream).arg(from);
        let reply: Value = cmd
            .query_async(conn)
            .await
            .map_err(|e| self.fail("XREADGROUP", e))?;
        parse_read(reply).map_err(|e| Fail::Reply(format!("XREADGROUP on `{}`", self.stream), e))
    }

    async fn claim(
        &self,
        conn: &mut ConnectionManager,
        state: &mut ReadState,
        max: usize,
    ) -> Result<Vec<Received>, Fail> {
        let mut cmd = redis::cmd("XAUTOCLAIM");
        cmd.arg(&self.stream)
            .arg(&self.group)
            .arg(&self.name)
            .arg(self.claim_idle.as_millis() as u64)
            .arg(state.claim_from)
            .arg("COUNT")
            .arg(max);
        let reply: Value = cmd
            .query_async(conn)
            .await
            .map_err(|e| self.fail("XAUTOCLAIM", e))?;
        let claimed = parse_autoclaim(reply)
            .map_err(|e| Fail::Reply(format!("XAUTOCLAIM on `{}`", self.stream), e))?;
        state.claim_from = claimed.cursor;
        if !claimed.deleted.is_empty() {
            // Redis 7 already dropped these from the pending list.
            tracing::warn!(
                stream = %self.stream,
                group = %self.group,
                count = claimed.deleted.len(),
                ids = ?claimed.deleted.iter().map(EntryId::to_string).collect::<Vec<_>>(),
                "pending entries were deleted or trimmed from the stream before they were handled; they are skipped"
            );
        }
        let batch = self
            .accept(conn, claimed.entries, Origin::Redelivered)
            .await?;
        if !batch.is_empty() {
            tracing::info!(
                stream = %self.stream,
                group = %self.group,
                consumer = %self.name,
                count = batch.len(),
                idle = ?self.claim_idle,
                "took over deliveries another member left idle"
            );
        }
        Ok(batch)
    }

    /// Turns entries into deliveries: deleted ones are acknowledged and reported, ones this
    /// consumer is still handling are skipped, and redelivered ones get their count.
    async fn accept(
        &self,
        conn: &mut ConnectionManager,
        entries: Vec<Entry>,
        origin: Origin,
    ) -> Result<Vec<Received>, Fail> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let mut deleted = Vec::new();
        let mut keep = Vec::with_capacity(entries.len());
        {
            let in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            for entry in entries {
                if entry.fields.is_none() {
                    deleted.push(entry.id);
                } else if origin == Origin::New || !in_flight.contains(&entry.id.tag()) {
                    keep.push(entry);
                }
            }
        }
        if !deleted.is_empty() {
            self.clear_deleted(conn, &deleted).await?;
        }
        let counts = match origin {
            Origin::New => vec![Some(1); keep.len()],
            Origin::Redelivered => self.delivery_counts(conn, &keep).await?,
        };
        Ok(keep
            .into_iter()
            .zip(counts)
            .filter_map(|(entry, count)| {
                // No count: it left our pending list meanwhile (acked, or claimed by a
                // member that found it idle); whoever has it now handles it.
                let delivery_count = count?;
                Some(Received {
                    tag: entry.id.tag(),
                    delivery_count,
                    message: entry.into_message(),
                })
            })
            .collect())
    }

    /// Acknowledges entries whose content is gone, so they leave the pending list instead of
    /// coming back forever as empty messages.
    async fn clear_deleted(
        &self,
        conn: &mut ConnectionManager,
        ids: &[EntryId],
    ) -> Result<(), Fail> {
        redis::cmd("XACK")
            .arg(&self.stream)
            .arg(&self.group)
            .arg(ids)
            .query_async::<i64>(conn)
            .await
            .map_err(|e| self.fail("XACK", e))?;
        tracing::warn!(
            stream = %self.stream,
            group = %self.group,
            consumer = %self.name,
            count = ids.len(),
            ids = ?ids.iter().map(EntryId::to_string).collect::<Vec<_>>(),
            "pending entries were deleted or trimmed from the stream before they were handled; acknowledged and skipped"
        );
        Ok(())
    }

    /// The delivery count of each entry from the extended `XPENDING`, in one round trip;
    /// `None` for an entry no longer pending for this consumer.
    async fn delivery_counts(
        &self,
        conn: &mut ConnectionManager,
        entries: &[Entry],
    ) -> Result<Vec<Option<u32>>, Fail> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for entry in entries {
            pipe.cmd("XPENDING")
                .arg(&self.stream)
                .arg(&self.group)
                .arg(entry.id)
                .arg(entry.id)
                .arg(1)
                .arg(&self.name);
        }
        let replies: Vec<Value> = pipe
            .query_async(conn)
            .await
            .map_err(|e| self.fail("XPENDING", e))?;
        Ok(replies.iter().map(parse_pending_count).collect())
    }

    async fn release(&self) -> Result<usize, RedisError> {
        let script = redis::Script::new(RELEASE_SCRIPT);
        let mut conn = self.commands.clone();
        let mut from = "-".to_owned();
        let mut released = 0;
        loop {
            let (count, last): (usize, String) = script
                .key(&self.stream)
                .arg(&self.group)
                .arg(&self.name)
                .arg(&from)
                .arg(RELEASE_PAGE)
                .invoke_async(&mut conn)
                .await?;
            released += count;
            if count < RELEASE_PAGE {
                return Ok(released);
            }
            from = format!("({last}");
        }
    }
}

#[async_trait]
impl Consumer for RedisConsumer {
    async fn receive(&self, max: usize) -> Result<Vec<Received>> {
        let mut state = self.state.lock().await;
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::new(
                ErrorKind::Closed,
                format!(
                    "consumer `{}` of stream `{}` is closed",
                    self.name, self.stream
                ),
            ));
        }
        if state.interrupted {
            // The last call failed or was dropped midway: after a reconnect the group may be
            // gone (a restart without persistence), and entries it read may sit unseen in
            // our pending list. Both are dealt with before anything new is read.
            state.ready = false;
        }
        state.interrupted = true;
        let max = max.max(1);
        let mut recreated = false;
        let batch = loop {
            match self.fetch(&mut state, max).await {
                Ok(batch) => break batch,
                Err(fail) if fail.no_group() && !recreated => {
                    tracing::warn!(stream = %self.stream, group = %self.group, "consumer group is gone (Redis lost its data, or someone deleted it); creating it again");
                    recreated = true;
                    state.ready = false;
                }
                Err(fail) => return Err(fail.into_error()),
            }
        };
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(batch.iter().map(|r| r.tag));
        state.interrupted = false;
        Ok(batch)
    }

    async fn ack(&self, tags: &[DeliveryTag]) -> Result<()> {
        if tags.is_empty() {
            return Ok(());
        }
        let ids: Vec<EntryId> = tags.iter().copied().map(EntryId::from_tag).collect();
        let mut xack = redis::cmd("XACK");
        xack.arg(&self.stream).arg(&self.group).arg(&ids);
        let mut result = xack.query_async::<i64>(&mut self.commands.clone()).await;
        if matches!(&result, Err(e) if e.is_connection_dropped()) {
            // The first command after a dropped connection fails while the connection is
            // re-made; XACK is idempotent, so it is simply sent again once.
            result = xack.query_async::<i64>(&mut self.commands.clone()).await;
        }
        // Forgotten whatever the outcome: an entry whose ack failed must be free to come
        // back through the pending pass or a claim, as core expects of a failed ack.
        {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            for tag in tags {
                in_flight.remove(tag);
            }
        }
        match result {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("NOGROUP") => {
                tracing::warn!(stream = %self.stream, group = %self.group, count = tags.len(), "consumer group is gone; nothing left to acknowledge");
                Ok(())
            }
            Err(e) => Err(command_error(
                &format!(
                    "XACK of {} entries on stream `{}` group `{}`",
                    ids.len(),
                    self.stream,
                    self.group
                ),
                e,
            )),
        }
    }

    async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        // Waits out a receive still running, then drops the blocking connection.
        self.state.lock().await.conn = None;
        if !self.durable {
            // An anonymous group lives exactly as long as its one consumer.
            let result = redis::cmd("XGROUP")
                .arg("DESTROY")
                .arg(&self.stream)
                .arg(&self.group)
                .query_async::<i64>(&mut self.commands.clone())
                .await;
            if let Err(e) = result {
                tracing::warn!(stream = %self.stream, group = %self.group, error = %e, "could not delete the anonymous consumer group; it stays until deleted by hand");
            }
            return Ok(());
        }
        match self.release().await {
            Ok(0) => {
                tracing::debug!(stream = %self.stream, group = %self.group, consumer = %self.name, "left consumer group");
            }
            Ok(released) => {
                tracing::debug!(stream = %self.stream, group = %self.group, consumer = %self.name, released, "left consumer group; un-acknowledged entries handed to the other members");
            }
            Err(e) => {
                // Nothing is lost: the entries stay pending under this name and other
                // members claim them once they have been idle for `claim-idle`.
                tracing::warn!(stream = %self.stream, group = %self.group, consumer = %self.name, error = %e, "could not hand back pending entries at close; other members will claim them after the idle time");
            }
        }
        Ok(())
    }
}
