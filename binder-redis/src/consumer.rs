//! Consuming as a member of a consumer group: the loop behind `receive` (own pending list,
//! `XAUTOCLAIM`, `XREADGROUP`), the `stream_core::Consumer` implementation, and leaving the
//! group at close.
//!
//! Reads and acks use different connections. Redis runs the commands of one connection in
//! order, so an `XACK` queued behind an `XREADGROUP ... BLOCK` would wait for the block to
//! end; the blocking connection also needs a response timeout longer than `BLOCK`. On a
//! Redis Cluster the blocking connection is a cluster connection of the consumer's own (one
//! connection to each master, the read going to the stream's), for the same two reasons.
//! redis-rs sends a cluster command again after a redirect or a dropped connection; a read
//! whose reply was lost that way may have left entries in this consumer's pending list that
//! it never saw, and the claim sweep hands them out once they have been idle `claim-idle`.
//!
//! The loop's helpers have modules of their own: `ack` queues the ids and returns, and
//! [`acks`](crate::acks) sends them; [`holdings`](crate::holdings) keeps what the consumer
//! has handed out, in memory and in Redis (the keepalive, attempt counts, release); and
//! [`cleanup`](crate::cleanup) removes what dead consumers left behind.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use redis::{RedisError, RedisResult, Value};
use stream_core::{
    Consumer, ConsumerOptions, DeliveryTag, Error, ErrorKind, Received, Result, StartFrom,
};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::acks::{send_acks, AckQueue, Carried, MAX_QUEUED_ACKS};
use crate::cleanup::clean_up;
use crate::connection::{command_error, millis, Conn};
use crate::entry::{parse_autoclaim, parse_pending_count, parse_read, Entry, EntryId, Malformed};
use crate::holdings::{keep_alive, keepalive_period, Hold, Holdings, Member};
use crate::lag::group_lag;

/// The start of a stream or pending list.
const ZERO: EntryId = EntryId { ms: 0, seq: 0 };
/// Pending entries handed back per script call at close.
const RELEASE_PAGE: usize = 500;
/// Most entries read from the own pending list in one round trip.
const MAX_PENDING_PAGE: usize = 4096;
/// The shortest pause between claim sweeps, whatever the configuration says.
const MIN_CLAIM_INTERVAL: Duration = Duration::from_millis(10);
/// Further away than any sweep needs waiting for: a hundred years. Longer settings mean
/// the same, and keep deadlines within what a clock can hold.
const NEVER: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

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

/// Reads the consumer's own pending entries after an id, as `XREADGROUP ... <id>` does,
/// then sets their delivery counts back to what they were: that read adds one to each,
/// though it is no new attempt (the entries were delivered to this consumer already, and
/// counted then). Deleted entries are left alone (the read does not count them, and an
/// `XCLAIM` would drop them from the pending list before the consumer acknowledges them).
///
/// KEYS[1] stream; ARGV: group, consumer, after id, count. Returns the read's reply.
const OWN_PENDING_SCRIPT: &str = r"
local counts = {}
for _, row in ipairs(redis.call('XPENDING', KEYS[1], ARGV[1], '(' .. ARGV[3], '+', ARGV[4], ARGV[2])) do
  counts[row[1]] = row[4]
end
local reply = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[4], 'STREAMS', KEYS[1], ARGV[3])
if reply then
  for _, entry in ipairs(reply[1][2]) do
    local count = counts[entry[1]]
    if entry[2] and count then
      redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, entry[1], 'RETRYCOUNT', count, 'JUSTID')
    end
  end
end
return reply
";

static OWN_PENDING: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(OWN_PENDING_SCRIPT));

/// Consumer settings that come from the binder's configuration.
#[derive(Debug, Clone)]
pub(crate) struct ReadSettings {
    pub(crate) block: Duration,
    pub(crate) claim_interval: Option<Duration>,
    pub(crate) consumer_prefix: String,
    /// How long `close` waits for queued acknowledgements to be confirmed.
    pub(crate) command_timeout: Duration,
    /// How long a consumer may go unseen before other members count it as dead.
    pub(crate) consumer_expiry: Duration,
}

pub(crate) struct RedisConsumer {
    /// Shared with the binder's producers: acks, group setup, close.
    commands: Conn,
    member: Arc<Member>,
    durable: bool,
    start: StartFrom,
    claim_idle: Duration,
    claim_interval: Duration,
    block: Duration,
    command_timeout: Duration,
    consumer_expiry: Duration,
    /// Held for the whole of a `receive`; core calls it from one task anyway.
    state: tokio::sync::Mutex<ReadState>,
    /// Returned by `receive`, not yet acknowledged in Redis: claims and pending passes skip
    /// these, so a slow handler's message is not handed to this same consumer a second time,
    /// and the keepalive keeps them.
    holdings: Arc<Holdings>,
    acks: Arc<AckQueue>,
    closed: AtomicBool,
    /// Stops the keepalive at close; dropping it stops it too.
    keepalive: watch::Sender<bool>,
    /// The keepalive task, awaited at close: a round still running could otherwise make the
    /// consumer name again after close removed it.
    keepalive_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

struct ReadState {
    /// The blocking-read connection; `None` once closed.
    conn: Option<Conn>,
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
    /// When the next claim sweep also cleans up after dead consumers.
    next_cleanup: Instant,
    /// Anonymous groups without a consumer that leave entries unread: the position each
    /// was at, and since when. One that has not moved for the expiry is dead.
    quiet_groups: HashMap<String, (String, Instant)>,
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
        commands: Conn,
        read: Conn,
        stream: &str,
        options: &ConsumerOptions,
        settings: &ReadSettings,
    ) -> Result<RedisConsumer> {
        let claim_interval = settings
            .claim_interval
            .unwrap_or(options.claim_idle / 2)
            .max(MIN_CLAIM_INTERVAL);
        let (keepalive, stop_keepalive) = watch::channel(false);
        let consumer = RedisConsumer {
            commands,
            member: Arc::new(Member {
                stream: stream.to_owned(),
                group: options.group.clone(),
                name: format!(
                    "{}-{}",
                    settings.consumer_prefix,
                    stream_core::unique_suffix()
                ),
            }),
            durable: options.durable,
            start: options.start_from,
            claim_idle: options.claim_idle,
            claim_interval,
            block: settings.block,
            command_timeout: settings.command_timeout,
            consumer_expiry: settings.consumer_expiry,
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
                next_cleanup: Instant::now(),
                quiet_groups: HashMap::new(),
            }),
            holdings: Arc::default(),
            acks: Arc::new(AckQueue::new()),
            closed: AtomicBool::new(false),
            keepalive,
            keepalive_task: Mutex::new(None),
        };
        consumer
            .join_group(&mut consumer.commands.clone())
            .await
            .map_err(Fail::into_error)?;
        tokio::spawn(send_acks(
            consumer.acks.clone(),
            consumer.holdings.clone(),
            consumer.commands.clone(),
            consumer.member.stream.clone(),
            consumer.member.group.clone(),
        ));
        let keepalive_task = tokio::spawn(keep_alive(
            consumer.member.clone(),
            consumer.holdings.clone(),
            consumer.commands.clone(),
            keepalive_period(consumer.claim_idle, consumer.consumer_expiry),
            stop_keepalive,
        ));
        *consumer
            .keepalive_task
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(keepalive_task);
        tracing::debug!(stream = %consumer.member.stream, group = %consumer.member.group, consumer = %consumer.member.name, "joined consumer group");
        Ok(consumer)
    }

    /// Creates the group if it does not exist, and this consumer in it: Redis makes a
    /// consumer only when it first gets an entry, and until then other members' cleanup
    /// could not tell this one is alive (see [`CLEANUP_SCRIPT`](crate::cleanup)).
    async fn join_group(&self, conn: &mut Conn) -> Result<(), Fail> {
        let start = match self.start {
            StartFrom::Earliest => "0",
            StartFrom::Latest => "$",
        };
        let mut cmd = redis::cmd("XGROUP");
        cmd.arg("CREATE")
            .arg(&self.member.stream)
            .arg(&self.member.group)
            .arg(start)
            .arg("MKSTREAM");
        match cmd.query_async::<()>(conn).await {
            Ok(()) => {}
            // Created by another member, or by us before a reconnect: exactly what we want.
            Err(e) if e.code() == Some("BUSYGROUP") => {}
            Err(e) => return Err(self.fail("XGROUP CREATE", e)),
        }
        redis::cmd("XGROUP")
            .arg("CREATECONSUMER")
            .arg(&self.member.stream)
            .arg(&self.member.group)
            .arg(&self.member.name)
            .query_async::<i64>(conn)
            .await
            .map_err(|e| self.fail("XGROUP CREATECONSUMER", e))?;
        Ok(())
    }

    fn fail(&self, command: &str, e: RedisError) -> Fail {
        Fail::Redis(
            format!(
                "{command} on stream `{}` group `{}`",
                self.member.stream, self.member.group
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
            self.join_group(&mut conn).await?;
            state.pending_from = Some(ZERO);
            state.ready = true;
        }
        while let Some(from) = state.pending_from {
            // Entries still being handled here sit in the same list and are skipped; reading
            // past them in one go saves a round trip per page of them.
            let count = (max + self.holdings.len()).min(MAX_PENDING_PAGE).max(max);
            let entries = self.read_own_pending(&mut conn, count, from).await?;
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
            if state.claim_from == ZERO && now >= state.next_cleanup {
                // Cheap, but no need to look more often than a fraction of the expiry.
                state.next_cleanup = now
                    + (self.consumer_expiry / 4)
                        .max(self.claim_interval)
                        .min(NEVER);
                clean_up(
                    &self.member,
                    &mut conn,
                    self.consumer_expiry,
                    &mut state.quiet_groups,
                )
                .await;
            }
            let batch = self.claim(&mut conn, state, max).await?;
            if state.claim_from == ZERO {
                // A sweep of the whole pending list is done; the next one waits. Until then
                // every receive continues the sweep, so a large backlog is taken over fast.
                state.next_claim = now + self.claim_interval.min(NEVER);
            }
            if !batch.is_empty() {
                return Ok(batch);
            }
        }
        let until_claim = state.next_claim.saturating_duration_since(Instant::now());
        let block = self.block.min(until_claim).max(Duration::from_millis(1));
        let entries = self.read_new(&mut conn, max, block).await?;
        self.accept(&mut conn, entries, Origin::New).await
    }

    fn xreadgroup(&self, max: usize, from: &str, block: Option<Duration>) -> redis::Cmd {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.member.group)
            .arg(&self.member.name)
            .arg("COUNT")
            .arg(max);
        if let Some(block) = block {
            cmd.arg("BLOCK").arg(millis(block).max(1));
        }
        cmd.arg("STREAMS").arg(&self.member.stream).arg(from);
        cmd
    }

    /// Reads up to `max` entries of this consumer's own pending list after `after`, leaving
    /// their delivery counts as they were (see [`OWN_PENDING_SCRIPT`]).
    async fn read_own_pending(
        &self,
        conn: &mut Conn,
        max: usize,
        after: EntryId,
    ) -> Result<Vec<Entry>, Fail> {
        let reply: Value = OWN_PENDING
            .key(&self.member.stream)
            .arg(&self.member.group)
            .arg(&self.member.name)
            .arg(after)
            .arg(max)
            .invoke_async(conn)
            .await
            .map_err(|e| self.fail("XREADGROUP of the own pending list", e))?;
        self.parse(reply)
    }

    /// Reads new entries, carrying the queued acknowledgements in the same pipeline (see
    /// [`AckQueue`]).
    async fn read_new(
        &self,
        conn: &mut Conn,
        max: usize,
        block: Duration,
    ) -> Result<Vec<Entry>, Fail> {
        let read = self.xreadgroup(max, ">", Some(block));
        let carried = Carried {
            acks: &self.acks,
            ids: self.acks.take(),
        };
        if carried.ids.is_empty() {
            drop(carried);
            let reply: Value = read
                .query_async(conn)
                .await
                .map_err(|e| self.fail("XREADGROUP", e))?;
            return self.parse(reply);
        }
        let mut pipe = redis::pipe();
        pipe.cmd("XACK")
            .arg(&self.member.stream)
            .arg(&self.member.group)
            .arg(&carried.ids);
        pipe.add_command(read);
        // Each reply on its own: a failed XACK must not cost the entries just read.
        let replies: Vec<RedisResult<Value>> = match pipe.ignore_errors().query_async(conn).await {
            Ok(replies) => replies,
            Err(e) => return Err(self.fail("XACK + XREADGROUP", e)),
        };
        let mut replies = replies.into_iter();
        let (Some(acked), Some(read)) = (replies.next(), replies.next()) else {
            return Err(Fail::Reply(
                format!("XACK + XREADGROUP on `{}`", self.member.stream),
                Malformed("pipeline reply is short"),
            ));
        };
        carried.settle(&self.holdings, acked);
        self.parse(read.map_err(|e| self.fail("XREADGROUP", e))?)
    }

    fn parse(&self, reply: Value) -> Result<Vec<Entry>, Fail> {
        parse_read(reply)
            .map_err(|e| Fail::Reply(format!("XREADGROUP on `{}`", self.member.stream), e))
    }

    async fn claim(
        &self,
        conn: &mut Conn,
        state: &mut ReadState,
        max: usize,
    ) -> Result<Vec<Received>, Fail> {
        let mut cmd = redis::cmd("XAUTOCLAIM");
        cmd.arg(&self.member.stream)
            .arg(&self.member.group)
            .arg(&self.member.name)
            .arg(millis(self.claim_idle))
            .arg(state.claim_from)
            .arg("COUNT")
            .arg(max);
        let reply: Value = cmd
            .query_async(conn)
            .await
            .map_err(|e| self.fail("XAUTOCLAIM", e))?;
        let claimed = parse_autoclaim(reply)
            .map_err(|e| Fail::Reply(format!("XAUTOCLAIM on `{}`", self.member.stream), e))?;
        state.claim_from = claimed.cursor;
        // Redis 7 already dropped these from the pending list. Those this consumer holds
        // were read whole before they were trimmed, and are being handled.
        let skipped: Vec<String> = claimed
            .deleted
            .iter()
            .filter(|id| !self.holdings.contains(id.tag()))
            .map(EntryId::to_string)
            .collect();
        if !skipped.is_empty() {
            tracing::warn!(
                stream = %self.member.stream,
                group = %self.member.group,
                count = skipped.len(),
                ids = ?skipped,
                "pending entries were deleted or trimmed from the stream before they were handled; they are skipped"
            );
        }
        let (held, entries): (Vec<Entry>, Vec<Entry>) = claimed
            .entries
            .into_iter()
            .partition(|entry| self.holdings.contains(entry.id.tag()));
        if !held.is_empty() {
            // Entries this consumer holds went idle (a stall longer than claim-idle) and
            // its own sweep took them: no new delivery, so the count it added goes back.
            let ids: Vec<EntryId> = held.iter().map(|entry| entry.id).collect();
            self.member
                .hold(conn, Hold::Unbump, &ids)
                .await
                .map_err(|e| self.fail("XCLAIM of held entries", e))?;
        }
        let batch = self.accept(conn, entries, Origin::Redelivered).await?;
        if !batch.is_empty() {
            tracing::info!(
                stream = %self.member.stream,
                group = %self.member.group,
                consumer = %self.member.name,
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
        conn: &mut Conn,
        entries: Vec<Entry>,
        origin: Origin,
    ) -> Result<Vec<Received>, Fail> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let mut deleted = Vec::new();
        let mut keep = Vec::with_capacity(entries.len());
        {
            let held = self.holdings.lock();
            for entry in entries {
                if entry.message.is_none() {
                    deleted.push(entry.id);
                } else if origin == Origin::New || !held.in_flight.contains_key(&entry.id.tag()) {
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
                // A count of 0 is an entry released and not yet claimed again.
                let attempt = count?.max(1);
                let received = Received::new(entry.message?, entry.id.tag(), attempt);
                Some(match entry.defect {
                    Some(defect) => received.with_defect(format!(
                        "stream entry {} of `{}` is not a message: {defect}",
                        entry.id, self.member.stream
                    )),
                    None => received,
                })
            })
            .collect())
    }

    /// Acknowledges entries whose content is gone, so they leave the pending list instead of
    /// coming back forever as empty messages.
    async fn clear_deleted(&self, conn: &mut Conn, ids: &[EntryId]) -> Result<(), Fail> {
        redis::cmd("XACK")
            .arg(&self.member.stream)
            .arg(&self.member.group)
            .arg(ids)
            .query_async::<i64>(conn)
            .await
            .map_err(|e| self.fail("XACK", e))?;
        tracing::warn!(
            stream = %self.member.stream,
            group = %self.member.group,
            consumer = %self.member.name,
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
        conn: &mut Conn,
        entries: &[Entry],
    ) -> Result<Vec<Option<u32>>, Fail> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for entry in entries {
            pipe.cmd("XPENDING")
                .arg(&self.member.stream)
                .arg(&self.member.group)
                .arg(entry.id)
                .arg(entry.id)
                .arg(1)
                .arg(&self.member.name);
        }
        let replies: Vec<Value> = pipe
            .query_async(conn)
            .await
            .map_err(|e| self.fail("XPENDING", e))?;
        Ok(replies.iter().map(parse_pending_count).collect())
    }

    /// Takes back, at close, the count of this consumer's pending entries that no `receive`
    /// returned, and makes them claimable at once, as [`Consumer::release`] does for what
    /// core never started. A `receive` dropped while its read is blocked in Redis (core
    /// stops fetching that way) is still served: entries published meanwhile land in this
    /// consumer's pending list, counted as delivered, and nobody sees them. Entries `release`
    /// handed back already are left alone (see [`HOLD_SCRIPT`](crate::holdings)).
    async fn release_unseen(&self) -> Result<(), RedisError> {
        let mut conn = self.commands.clone();
        let mut from = "-".to_owned();
        loop {
            // Rows of id, owner, idle ms, delivery count.
            let page: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
                .arg(&self.member.stream)
                .arg(&self.member.group)
                .arg(&from)
                .arg("+")
                .arg(RELEASE_PAGE)
                .arg(&self.member.name)
                .query_async(&mut conn)
                .await?;
            let unseen: Vec<EntryId> = page
                .iter()
                .filter_map(|(id, ..)| EntryId::parse(id))
                .filter(|id| !self.holdings.contains(id.tag()))
                .collect();
            self.member.hold(&mut conn, Hold::Release, &unseen).await?;
            match page.last() {
                Some((last, ..)) if page.len() == RELEASE_PAGE => from = format!("({last}"),
                _ => return Ok(()),
            }
        }
    }

    /// Hands every pending entry of this consumer to the group at close, and removes the
    /// consumer name if nothing was pending.
    async fn hand_back_all(&self) -> Result<usize, RedisError> {
        let script = redis::Script::new(RELEASE_SCRIPT);
        let mut conn = self.commands.clone();
        let mut from = "-".to_owned();
        let mut released = 0;
        loop {
            let (count, last): (usize, String) = script
                .key(&self.member.stream)
                .arg(&self.member.group)
                .arg(&self.member.name)
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

    /// Hands this consumer's pending entries to the group at close, except `kept`: entries
    /// whose acknowledgement Redis has not confirmed, which must not be handled again at
    /// once. The consumer name stays, since it still owns those.
    async fn hand_back_except(&self, kept: &[EntryId]) -> Result<usize, RedisError> {
        let kept: HashSet<EntryId> = kept.iter().copied().collect();
        let mut conn = self.commands.clone();
        let mut from = "-".to_owned();
        let mut handed_back = 0;
        loop {
            // Rows of id, owner, idle ms, delivery count.
            let page: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
                .arg(&self.member.stream)
                .arg(&self.member.group)
                .arg(&from)
                .arg("+")
                .arg(RELEASE_PAGE)
                .arg(&self.member.name)
                .query_async(&mut conn)
                .await?;
            let ids: Vec<EntryId> = page
                .iter()
                .filter_map(|(id, ..)| EntryId::parse(id))
                .filter(|id| !kept.contains(id))
                .collect();
            self.member.hold(&mut conn, Hold::HandBack, &ids).await?;
            handed_back += ids.len();
            match page.last() {
                Some((last, ..)) if page.len() == RELEASE_PAGE => from = format!("({last}"),
                _ => return Ok(handed_back),
            }
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
                    self.member.name, self.member.stream
                ),
            ));
        }
        if let Some((kind, why)) = self.acks.refusal() {
            // Going on would hold the refused entries forever while handling more that
            // cannot be acknowledged either.
            return Err(Error::new(
                kind,
                format!(
                    "consumer `{}` of stream `{}` stops: {why}; the entries it could not \
                     acknowledge stay pending and are delivered again after claim-idle once \
                     it is closed",
                    self.member.name, self.member.stream
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
                    tracing::warn!(stream = %self.member.stream, group = %self.member.group, "consumer group is gone (Redis lost its data, or someone deleted it); creating it again");
                    recreated = true;
                    state.ready = false;
                }
                Err(fail) => return Err(fail.into_error()),
            }
        };
        self.holdings.hand_out(batch.iter().map(|r| r.tag));
        state.interrupted = false;
        Ok(batch)
    }

    async fn ack(&self, tags: &[DeliveryTag]) -> Result<()> {
        if tags.is_empty() {
            return Ok(());
        }
        self.holdings.acked(tags);
        self.acks.push(tags.iter().copied().map(EntryId::from_tag));
        // Bounds the queue when Redis cannot keep up (or is away): core's window then stays
        // shut, as it would with an ack that waited.
        self.acks.drained_to(MAX_QUEUED_ACKS).await;
        Ok(())
    }

    fn holds(&self, tag: DeliveryTag) -> bool {
        self.holdings.holds(tag)
    }

    async fn release(&self, tags: &[DeliveryTag]) -> Result<()> {
        let ids: Vec<EntryId> = tags.iter().copied().map(EntryId::from_tag).collect();
        for page in ids.chunks(RELEASE_PAGE) {
            // Entries another member took meanwhile are its business now.
            self.member
                .hold(&mut self.commands.clone(), Hold::Release, page)
                .await
                .map_err(|e| {
                    command_error(
                        &format!(
                            "handing back deliveries on stream `{}` group `{}`",
                            self.member.stream, self.member.group
                        ),
                        e,
                    )
                })?;
            // Handed back: no longer this consumer's to keep or to skip.
            self.holdings.forget(page);
        }
        Ok(())
    }

    async fn retrying(&self, tag: DeliveryTag, attempt: u32) -> Result<()> {
        let id = EntryId::from_tag(tag);
        let gone = self
            .member
            .hold(&mut self.commands.clone(), Hold::Attempt(attempt), &[id])
            .await
            .map_err(|e| {
                command_error(
                    &format!(
                        "recording attempt {attempt} of entry {id} on stream `{}` group `{}`",
                        self.member.stream, self.member.group
                    ),
                    e,
                )
            })?;
        if !gone.is_empty() {
            tracing::warn!(stream = %self.member.stream, group = %self.member.group, consumer = %self.member.name, %id, attempt, "retrying an entry another member has taken over; it may be handled by both");
        }
        Ok(())
    }

    /// Group-wide: what `XINFO GROUPS` says the group has not been given (`lag`) plus what it
    /// was given and has not acknowledged (`pending`), corrected as [`crate::lag`] says.
    async fn lag(&self) -> Result<Option<u64>> {
        group_lag(
            &mut self.commands.clone(),
            &self.member.stream,
            &self.member.group,
            self.start,
        )
        .await
        .map(Some)
    }

    async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        // Waits out a receive still running, then drops the blocking connection.
        self.state.lock().await.conn = None;
        // From here on what is not acknowledged is handed back, or left to go idle.
        let _ = self.keepalive.send(true);
        let keepalive_task = self
            .keepalive_task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(task) = keepalive_task {
            let _ = task.await;
        }
        // Acknowledgements are recorded before anything is handed back: an entry handed
        // back with its XACK still unconfirmed would be handled twice.
        let _ = tokio::time::timeout(self.command_timeout, self.acks.flush()).await;
        let unconfirmed = self.acks.unconfirmed();
        if !self.durable {
            // An anonymous group lives exactly as long as its one consumer; its pending
            // entries, acknowledged or not, go with it.
            let result = redis::cmd("XGROUP")
                .arg("DESTROY")
                .arg(&self.member.stream)
                .arg(&self.member.group)
                .query_async::<i64>(&mut self.commands.clone())
                .await;
            if let Err(e) = result {
                tracing::warn!(stream = %self.member.stream, group = %self.member.group, error = %e, "could not delete the anonymous consumer group; it stays until deleted by hand");
            }
            return Ok(());
        }
        if let Err(e) = self.release_unseen().await {
            tracing::warn!(stream = %self.member.stream, group = %self.member.group, consumer = %self.member.name, error = %e, "could not take back the count of pending entries no handler saw; they are handed back counted as attempts");
        }
        let handed_back = if unconfirmed.is_empty() {
            self.hand_back_all().await
        } else {
            self.hand_back_except(&unconfirmed).await
        };
        match handed_back {
            Ok(0) => {
                tracing::debug!(stream = %self.member.stream, group = %self.member.group, consumer = %self.member.name, "left consumer group");
            }
            Ok(handed_back) => {
                tracing::debug!(stream = %self.member.stream, group = %self.member.group, consumer = %self.member.name, handed_back, "left consumer group; un-acknowledged entries handed to the other members");
            }
            Err(e) => {
                // Nothing is lost: the entries stay pending under this name and other
                // members claim them once they have been idle for `claim-idle`.
                tracing::warn!(stream = %self.member.stream, group = %self.member.group, consumer = %self.member.name, error = %e, "could not hand back pending entries at close; other members will claim them after the idle time");
            }
        }
        if unconfirmed.is_empty() {
            return Ok(());
        }
        let (kind, why) = self.acks.refusal().unwrap_or_else(|| {
            (
                ErrorKind::Timeout,
                format!("no reply within {:?}", self.command_timeout),
            )
        });
        Err(Error::new(
            kind,
            format!(
                "consumer `{}` of stream `{}` group `{}` closed with {} acknowledgements Redis \
                 did not confirm ({why}); those entries stay pending, and unless their XACK \
                 got through they are delivered again after claim-idle",
                self.member.name,
                self.member.stream,
                self.member.group,
                unconfirmed.len()
            ),
        ))
    }
}

impl Drop for RedisConsumer {
    fn drop(&mut self) {
        self.acks.consumer_dropped();
    }
}
