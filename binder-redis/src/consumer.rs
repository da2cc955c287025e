//! Consuming as a member of a consumer group: the loop behind `receive` (own pending list,
//! `XAUTOCLAIM`, `XREADGROUP`), batched `XACK`, and leaving the group.
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
//! `ack` queues the ids and returns; a task of the consumer sends them (see [`AckQueue`]).
//!
//! # Holding entries, and counting attempts
//!
//! Redis keeps a delivery count per pending entry; this binder keeps it equal to core's
//! attempts (see `stream_core::Consumer`): the deliveries of the message that reached a
//! handler, or may have. A read of a new entry (`XREADGROUP ... >`) and a takeover from
//! another member (`XAUTOCLAIM`) add one; [`Consumer::retrying`] sets it to the attempt
//! about to start; [`Consumer::release`] takes one back. Everything else this consumer does
//! to its own entries leaves the count alone: a task re-claims the entries it holds with
//! `XCLAIM ... JUSTID` every third of `claim-idle` (10 s at most), so that no other member
//! finds them idle however long their handlers take; the pass over its own pending list
//! restores the counts that `XREADGROUP ... 0` raises; and when its own sweep claims an
//! entry it holds (after a stall longer than `claim-idle`), it takes that count back. Each of these checks, in one
//! script per batch, that the entry is still pending for this consumer, so none takes back
//! an entry another member has since claimed.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use redis::{RedisError, RedisResult, Value};
use stream_core::{
    Consumer, ConsumerOptions, DeliveryTag, Error, ErrorKind, Received, Result, StartFrom,
};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::connection::{command_error, Conn};
use crate::entry::{parse_autoclaim, parse_pending_count, parse_read, Entry, EntryId, Malformed};

/// The start of a stream or pending list.
const ZERO: EntryId = EntryId { ms: 0, seq: 0 };
/// Pending entries handed back per script call at close.
const RELEASE_PAGE: usize = 500;
/// Most entries read from the own pending list in one round trip.
const MAX_PENDING_PAGE: usize = 4096;
/// The shortest pause between claim sweeps, whatever the configuration says.
const MIN_CLAIM_INTERVAL: Duration = Duration::from_millis(10);
/// How long a queued acknowledgement waits for a read to carry it before it is sent alone.
/// Far below any sensible `claim-idle`, so no other member takes over an entry for lack of
/// its `XACK`.
const ACK_DELAY: Duration = Duration::from_millis(5);
/// Acknowledgements queued and not yet confirmed beyond which `ack` waits for the queue.
const MAX_QUEUED_ACKS: usize = 8192;
/// Failed `XACK`s of one batch tried again, once the consumer is gone, before its entries
/// are left to redelivery.
const ACK_TRIES: u32 = 20;

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

/// The shortest pause between keepalive rounds.
const MIN_KEEPALIVE_PERIOD: Duration = Duration::from_millis(10);
/// The longest pause between keepalive rounds, whatever `claim-idle` says.
const MAX_KEEPALIVE_PERIOD: Duration = Duration::from_secs(10);
/// Entries per call of [`HOLD_SCRIPT`].
const HOLD_PAGE: usize = 512;

/// Re-claims entries that are still pending for this consumer (`XPENDING` says who owns each
/// one, in the same atomic step), changing their delivery count as the mode says; returns
/// the ids that are not, because another member took them or they were acknowledged.
///
/// KEYS[1] stream; ARGV: group, consumer, mode, attempt (for `attempt`), ids...
/// Modes: `keep` resets the idle time (and shows the consumer alive); `attempt` sets the count to ARGV[4]; `release` takes
/// one off the count and makes the entry claimable at once (delivery time 1970);
/// `unbump` takes one off; `handback` makes it claimable at once.
const HOLD_SCRIPT: &str = r"
local group, consumer, mode = ARGV[1], ARGV[2], ARGV[3]
if mode == 'keep' then
  -- Shows the consumer alive to the cleanup of other members (XINFO CONSUMERS idle): made
  -- again if a cleanup removed it while it held nothing, and seen now. Its own pending list
  -- after the highest id there can be holds nothing, so the read returns and counts nothing.
  redis.call('XGROUP', 'CREATECONSUMER', KEYS[1], group, consumer)
  redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', 1, 'STREAMS', KEYS[1],
    '18446744073709551615-18446744073709551614')
end
local gone = {}
for i = 5, #ARGV do
  local id = ARGV[i]
  local row = redis.call('XPENDING', KEYS[1], group, id, id, 1)[1]
  if row and row[2] == consumer then
    local claim = {'XCLAIM', KEYS[1], group, consumer, 0, id}
    if mode == 'attempt' then
      claim[#claim + 1] = 'RETRYCOUNT'
      claim[#claim + 1] = ARGV[4]
    elseif mode == 'release' or mode == 'unbump' then
      claim[#claim + 1] = 'RETRYCOUNT'
      claim[#claim + 1] = math.max(row[4] - 1, 0)
    end
    if mode == 'release' or mode == 'handback' then
      claim[#claim + 1] = 'TIME'
      claim[#claim + 1] = 1
    end
    claim[#claim + 1] = 'JUSTID'
    redis.call(unpack(claim))
  else
    gone[#gone + 1] = id
  end
end
return gone
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

/// Removes from the consumer's own group the consumers that hold nothing and were not seen
/// for the expiry, and destroys other anonymous groups of the stream (named by core with
/// the prefix) that nobody reads any more: every consumer unseen for the expiry, or no
/// consumer at all and entries waiting past where the group last read, with that position
/// unchanged since the caller first saw it so (it passes those as candidates). Returns
/// {consumers removed, groups destroyed, consumer-less anonymous groups with entries
/// waiting as flat pairs of name and last-delivered-id}.
///
/// KEYS[1] stream; ARGV: own group, expiry ms, anonymous prefix, candidates as pairs.
const CLEANUP_SCRIPT: &str = r"
local group, expiry, prefix = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local function fields(flat)
  local t = {}
  for i = 1, #flat, 2 do t[flat[i]] = flat[i + 1] end
  return t
end
local removed = 0
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], group)) do
  c = fields(c)
  if c['pending'] == 0 and c['idle'] > expiry then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], group, c['name'])
    removed = removed + 1
  end
end
local candidates = {}
for i = 4, #ARGV, 2 do candidates[ARGV[i]] = ARGV[i + 1] end
local destroyed, quiet = {}, {}
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  g = fields(g)
  local name, position = g['name'], g['last-delivered-id']
  if name ~= group and string.sub(name, 1, #prefix) == prefix then
    local consumers = redis.call('XINFO', 'CONSUMERS', KEYS[1], name)
    local dead = #consumers > 0
    for _, c in ipairs(consumers) do
      if fields(c)['idle'] <= expiry then
        dead = false
        break
      end
    end
    if #consumers == 0 and #redis.call('XRANGE', KEYS[1], '(' .. position, '+', 'COUNT', 1) > 0 then
      if candidates[name] == position then
        dead = true
      else
        quiet[#quiet + 1] = name
        quiet[#quiet + 1] = position
      end
    end
    if dead then
      redis.call('XGROUP', 'DESTROY', KEYS[1], name)
      destroyed[#destroyed + 1] = name
    end
  end
end
return {removed, destroyed, quiet}
";

/// The start of the group names core gives anonymous groups.
const ANONYMOUS_PREFIX: &str = "anonymous.";

static HOLD: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(HOLD_SCRIPT));
static CLEANUP: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(CLEANUP_SCRIPT));
static OWN_PENDING: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(OWN_PENDING_SCRIPT));

/// What [`HOLD_SCRIPT`] does to the entries this consumer still holds.
#[derive(Debug, Clone, Copy)]
enum Hold {
    /// Resets their idle time; the count stays.
    Keep,
    /// Records that this attempt of them is about to start.
    Attempt(u32),
    /// Takes back the count of a delivery no handler saw, and hands them to the group.
    Release,
    /// Takes back the one delivery this consumer's own claim counted.
    Unbump,
    /// Hands them to the group with their counts.
    HandBack,
}

impl Hold {
    fn mode(self) -> &'static str {
        match self {
            Hold::Keep => "keep",
            Hold::Attempt(_) => "attempt",
            Hold::Release => "release",
            Hold::Unbump => "unbump",
            Hold::HandBack => "handback",
        }
    }
}

/// Who a consumer is in Redis; shared with its background tasks.
struct Member {
    stream: String,
    group: String,
    name: String,
}

impl Member {
    /// Runs [`HOLD_SCRIPT`] over `ids`, a page at a time; returns those no longer pending
    /// for this consumer.
    async fn hold(
        &self,
        conn: &mut Conn,
        hold: Hold,
        ids: &[EntryId],
    ) -> RedisResult<Vec<EntryId>> {
        let attempt = match hold {
            Hold::Attempt(attempt) => attempt,
            _ => 0,
        };
        let mut gone = Vec::new();
        let mut pages: Vec<&[EntryId]> = ids.chunks(HOLD_PAGE).collect();
        if pages.is_empty() && matches!(hold, Hold::Keep) {
            // Nothing held, but the consumer still shows it is alive.
            pages.push(&[]);
        }
        for page in pages {
            let ids: Vec<String> = HOLD
                .key(&self.stream)
                .arg(&self.group)
                .arg(&self.name)
                .arg(hold.mode())
                .arg(attempt)
                .arg(page)
                .invoke_async(conn)
                .await?;
            gone.extend(ids.iter().filter_map(|id| EntryId::parse(id)));
        }
        Ok(gone)
    }
}

/// How often the keepalive re-claims held entries and shows the consumer alive: well
/// inside `claim-idle`, so that no other member finds held entries idle between two rounds,
/// and well inside `consumer-expiry`, so that no cleanup takes the consumer for dead.
fn keepalive_period(claim_idle: Duration, consumer_expiry: Duration) -> Duration {
    (claim_idle / 3)
        .min(consumer_expiry / 10)
        .clamp(MIN_KEEPALIVE_PERIOD, MAX_KEEPALIVE_PERIOD)
}

/// Re-claims the entries `holdings` holds every `period` until `stop` says so or the
/// consumer is gone. Entries found in another member's pending list are marked lost.
async fn keep_alive(
    member: Arc<Member>,
    holdings: Arc<Holdings>,
    mut conn: Conn,
    period: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut rounds = tokio::time::interval(period);
    rounds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = rounds.tick() => {}
            // Stopped, or the consumer was dropped with the sender.
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
        let ids = holdings.ids();
        match member.hold(&mut conn, Hold::Keep, &ids).await {
            Ok(gone) => {
                if failing {
                    tracing::info!(stream = %member.stream, group = %member.group, consumer = %member.name, "keeping held entries works again");
                    failing = false;
                }
                let lost = holdings.lose(&gone);
                if lost > 0 {
                    tracing::warn!(stream = %member.stream, group = %member.group, consumer = %member.name, lost, "another member took over entries this consumer holds (Redis was out of reach, or this process stalled, for longer than claim-idle); those not started yet are dropped here, those started may be handled twice");
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(stream = %member.stream, group = %member.group, consumer = %member.name, error = %e, "could not keep held entries; another member may take them over after claim-idle");
                    failing = true;
                }
            }
        }
    }
}

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

/// The deliveries a consumer holds, and those it lost to another member.
#[derive(Default)]
struct Holdings {
    held: Mutex<Held>,
    /// Whether `lost` may hold anything: [`Holdings::holds`] needs no lock while it is false.
    any_lost: AtomicBool,
}

#[derive(Default)]
struct Held {
    /// Handed out and not confirmed acknowledged.
    in_flight: InFlight,
    /// Handed out, then found pending for another member: not to be handled here.
    lost: InFlight,
}

impl Holdings {
    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn hand_out(&self, tags: impl Iterator<Item = DeliveryTag>) {
        let mut held = self.lock();
        if self.any_lost.load(Ordering::Acquire) {
            // Taken back from the member that had them: ours again.
            let held = &mut *held;
            for tag in tags {
                held.lost.remove(&tag);
                held.in_flight.insert(tag);
            }
            self.any_lost
                .store(!held.lost.is_empty(), Ordering::Release);
        } else {
            held.in_flight.extend(tags);
        }
    }

    /// Forgets entries that are acknowledged or handed back.
    fn forget(&self, ids: &[EntryId]) {
        let mut held = self.lock();
        for id in ids {
            held.in_flight.remove(&id.tag());
        }
        if self.any_lost.load(Ordering::Acquire) {
            for id in ids {
                held.lost.remove(&id.tag());
            }
            self.any_lost
                .store(!held.lost.is_empty(), Ordering::Release);
        }
    }

    fn contains(&self, tag: DeliveryTag) -> bool {
        self.lock().in_flight.contains(&tag)
    }

    fn len(&self) -> usize {
        self.lock().in_flight.len()
    }

    fn ids(&self) -> Vec<EntryId> {
        self.lock()
            .in_flight
            .iter()
            .map(|tag| EntryId::from_tag(*tag))
            .collect()
    }

    /// Marks entries another member now holds; returns how many this consumer still held.
    fn lose(&self, ids: &[EntryId]) -> usize {
        if ids.is_empty() {
            return 0;
        }
        let mut held = self.lock();
        let mut lost = 0;
        for id in ids {
            // Not held any more: acknowledged meanwhile, which the script cannot tell apart.
            if held.in_flight.remove(&id.tag()) {
                held.lost.insert(id.tag());
                lost += 1;
            }
        }
        if lost > 0 {
            self.any_lost.store(true, Ordering::Release);
        }
        lost
    }

    /// False, once, for a delivery another member took over.
    fn holds(&self, tag: DeliveryTag) -> bool {
        if !self.any_lost.load(Ordering::Acquire) {
            return true;
        }
        let mut held = self.lock();
        let lost = held.lost.remove(&tag);
        self.any_lost
            .store(!held.lost.is_empty(), Ordering::Release);
        !lost
    }
}

/// Tags of deliveries this consumer handed out and Redis has not seen acknowledged.
type InFlight = HashSet<DeliveryTag, TagHash>;

/// Hashing for [`InFlight`]: every delivery is inserted and removed once, and SipHash over
/// its two words was a measurable part of the consumer's time. Seeded per process, so ids
/// chosen by a producer cannot be made to collide.
#[derive(Clone)]
struct TagHash(u64);

impl Default for TagHash {
    fn default() -> Self {
        TagHash(std::collections::hash_map::RandomState::new().hash_one(0u64))
    }
}

impl BuildHasher for TagHash {
    type Hasher = TagHasher;

    fn build_hasher(&self) -> TagHasher {
        TagHasher(self.0)
    }
}

struct TagHasher(u64);

impl Hasher for TagHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.write_u64(u64::from(byte));
        }
    }

    fn write_u64(&mut self, n: u64) {
        // The 64-bit finaliser of MurmurHash3: every input bit reaches every output bit.
        let mut h = self.0 ^ n;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^= h >> 33;
        self.0 = h;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Acknowledgements core has made and Redis has not confirmed yet.
///
/// Core counts a delivery against the prefetch window until `ack` returns. An `ack` that
/// waited for `XACK` would keep that part of the window shut for a round trip per batch,
/// so the next read could only ask for what earlier acks had already freed: small reads,
/// each paying the full fixed cost of a round trip (and, with `appendfsync always`, of an
/// fsync). So `ack` only queues the ids. The next `XREADGROUP` for new entries carries
/// them: `XACK` and `XREADGROUP` go in one pipeline, which Redis runs in one event-loop
/// turn with one fsync. Ids no read picked up within [`ACK_DELAY`] (the stream is idle and
/// the read blocks, or the fetch loop waits) are sent on their own by [`send_acks`].
///
/// The handlers are done with these entries; what is in flight is the id. Until Redis
/// confirms, the entries stay held (see [`Holdings`]): neither a pending pass nor a claim of
/// this consumer hands them out again, the keepalive keeps other members off them, and
/// `close` records the queue before it hands anything back.
///
/// An `XACK` that fails is sent again, with backoff, for as long as the consumer lives: the
/// entry stays held meanwhile rather than being delivered a second time. When Redis refuses
/// it for good (a `NOPERM` from an ACL, a key that is no stream any more), the refusal is
/// kept: the next `receive` returns it, which ends the subscription with that error, and
/// `close` leaves those entries pending (they are delivered again after `claim-idle`, once
/// the consumer no longer keeps them) and returns it too. A process that dies with
/// acknowledgements queued leaves those entries pending, to be delivered again like any
/// other un-acknowledged entry.
struct AckQueue {
    state: Mutex<AckState>,
    /// Wakes [`send_acks`].
    wake: Notify,
    progress: watch::Sender<AckProgress>,
}

/// What waiters on the queue look at.
#[derive(Debug, Clone, Copy, Default)]
struct AckProgress {
    /// Queued or being sent, not yet settled (confirmed, or given up on).
    outstanding: usize,
    /// Redis refused an `XACK` for good: waiting for the queue to drain is pointless.
    refused: bool,
}

#[derive(Default)]
struct AckState {
    queued: Vec<EntryId>,
    /// When the oldest of `queued` arrived.
    since: Option<Instant>,
    /// Send at once: the consumer is closing or gone.
    urgent: bool,
    /// The consumer is gone: [`send_acks`] sends what is left and ends.
    dropped: bool,
    /// Taken by [`send_acks`] and not settled yet.
    sending: Vec<EntryId>,
    /// Why Redis refused an `XACK` for good, once it has.
    refusal: Option<(ErrorKind, String)>,
}

impl AckQueue {
    fn new() -> AckQueue {
        AckQueue {
            state: Mutex::default(),
            wake: Notify::new(),
            progress: watch::Sender::new(AckProgress::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AckState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, ids: impl IntoIterator<Item = EntryId>) {
        let mut state = self.lock();
        let before = state.queued.len();
        state.queued.extend(ids);
        let added = state.queued.len() - before;
        // Counted before anyone can take them, so the count never drops below zero.
        self.progress.send_modify(|p| p.outstanding += added);
        let first = state.since.is_none();
        state.since.get_or_insert_with(Instant::now);
        drop(state);
        // Later ones are due no sooner than the first, which the sender already waits for.
        if first {
            self.wake.notify_one();
        }
    }

    /// Takes everything queued, for a read to carry.
    fn take(&self) -> Vec<EntryId> {
        let mut state = self.lock();
        state.since = None;
        std::mem::take(&mut state.queued)
    }

    /// Puts back ids whose `XACK` may not have run; sending one twice is harmless.
    fn put_back(&self, mut ids: Vec<EntryId>) {
        let mut state = self.lock();
        ids.append(&mut state.queued);
        state.queued = ids;
        state.since.get_or_insert_with(Instant::now);
        drop(state);
        self.wake.notify_one();
    }

    /// The ids [`send_acks`] is to send now, after giving reads [`ACK_DELAY`] to carry
    /// them; `None` once the consumer is gone and nothing is left.
    async fn due(&self) -> Option<Vec<EntryId>> {
        loop {
            let wait = {
                let mut state = self.lock();
                match state.since {
                    None if state.dropped => return None,
                    None => None,
                    Some(since) => {
                        let due = since + ACK_DELAY;
                        if state.urgent || state.dropped || Instant::now() >= due {
                            state.since = None;
                            let ids = std::mem::take(&mut state.queued);
                            state.sending.clone_from(&ids);
                            return Some(ids);
                        }
                        Some(due)
                    }
                }
            };
            match wait {
                // A wake-up sent between the look above and this wait is kept, not lost.
                None => self.wake.notified().await,
                Some(due) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(due) => {}
                        _ = self.wake.notified() => {}
                    }
                }
            }
        }
    }

    /// What was queued meanwhile, to go along with a retry of [`send_acks`]'s batch.
    fn take_more(&self) -> Vec<EntryId> {
        let mut state = self.lock();
        state.since = None;
        let more = std::mem::take(&mut state.queued);
        state.sending.extend_from_slice(&more);
        more
    }

    fn settled(&self, n: usize) {
        self.progress.send_modify(|p| p.outstanding -= n);
    }

    /// Settles [`send_acks`]'s batch.
    fn sent(&self, n: usize) {
        self.lock().sending.clear();
        self.settled(n);
    }

    fn is_dropped(&self) -> bool {
        self.lock().dropped
    }

    /// Keeps the first refusal, for `receive` and `close` to report.
    fn refuse(&self, error: &Error) {
        let mut state = self.lock();
        if state.refusal.is_none() {
            state.refusal = Some((error.kind(), error.message().to_owned()));
            drop(state);
            self.progress.send_modify(|p| p.refused = true);
        }
    }

    fn refusal(&self) -> Option<(ErrorKind, String)> {
        self.lock().refusal.clone()
    }

    /// Acknowledged ids Redis has not confirmed.
    fn unconfirmed(&self) -> Vec<EntryId> {
        let state = self.lock();
        let mut ids = state.sending.clone();
        ids.extend_from_slice(&state.queued);
        ids
    }

    /// Sends what is queued without waiting for a read, and waits until it is settled or
    /// Redis refused some of it for good.
    async fn flush(&self) {
        self.lock().urgent = true;
        self.wake.notify_one();
        self.drained_to(0).await;
        self.lock().urgent = false;
    }

    /// Waits until at most `limit` acknowledgements are outstanding, or one was refused.
    async fn drained_to(&self, limit: usize) {
        let done = |p: &AckProgress| p.outstanding <= limit || p.refused;
        if done(&self.progress.borrow()) {
            return;
        }
        let mut progress = self.progress.subscribe();
        let _ = progress.wait_for(done).await;
    }
}

/// Ids a read carries; put back into the queue if the read is dropped before the reply
/// says whether its `XACK` ran.
struct Carried<'a> {
    acks: &'a AckQueue,
    ids: Vec<EntryId>,
}

impl Carried<'_> {
    fn settle(mut self, holdings: &Holdings, outcome: RedisResult<Value>) {
        let ids = std::mem::take(&mut self.ids);
        match outcome {
            Ok(_) => {
                holdings.forget(&ids);
                self.acks.settled(ids.len());
            }
            // The group is gone, and with it what there was to acknowledge.
            Err(e) if e.code() == Some("NOGROUP") => {
                holdings.forget(&ids);
                self.acks.settled(ids.len());
            }
            Err(e) => {
                let error = command_error(&format!("XACK of {} entries", ids.len()), e);
                if !error.is_temporary() {
                    // Carried by every read, a refused XACK would never reach the sender
                    // that reports it.
                    self.acks.refuse(&error);
                }
                // Sent again on their own, with the retries that path has.
                self.acks.put_back(ids);
            }
        }
    }
}

impl Drop for Carried<'_> {
    fn drop(&mut self) {
        if !self.ids.is_empty() {
            self.acks.put_back(std::mem::take(&mut self.ids));
        }
    }
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
    /// could not tell this one is alive (see [`CLEANUP_SCRIPT`]).
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

    /// Removes what dead consumers left behind (see [`CLEANUP_SCRIPT`]). Housekeeping: a
    /// failure is logged, and the next sweep tries again.
    async fn clean_up(&self, conn: &mut Conn, state: &mut ReadState) {
        let now = Instant::now();
        let candidates: Vec<&str> = state
            .quiet_groups
            .iter()
            .filter(|(_, (_, since))| now.duration_since(*since) >= self.consumer_expiry)
            .flat_map(|(name, (position, _))| [name.as_str(), position.as_str()])
            .collect();
        let result: RedisResult<(usize, Vec<String>, Vec<String>)> = CLEANUP
            .key(&self.member.stream)
            .arg(&self.member.group)
            .arg(self.consumer_expiry.as_millis() as u64)
            .arg(ANONYMOUS_PREFIX)
            .arg(&candidates)
            .invoke_async(conn)
            .await;
        let (removed, destroyed, quiet) = match result {
            Ok(outcome) => outcome,
            Err(e) => {
                tracing::warn!(stream = %self.member.stream, group = %self.member.group, error = %e, "could not clean up after dead consumers; trying again at a later sweep");
                return;
            }
        };
        if removed > 0 {
            tracing::info!(stream = %self.member.stream, group = %self.member.group, removed, expiry = ?self.consumer_expiry, "removed consumers that held nothing and were not seen for the expiry");
        }
        if !destroyed.is_empty() {
            tracing::info!(stream = %self.member.stream, groups = ?destroyed, expiry = ?self.consumer_expiry, "destroyed anonymous groups nobody reads any more");
        }
        let mut seen = HashMap::with_capacity(quiet.len() / 2);
        for pair in quiet.chunks_exact(2) {
            let (name, position) = (&pair[0], &pair[1]);
            let since = match state.quiet_groups.get(name) {
                Some((was, since)) if was == position => *since,
                _ => now,
            };
            seen.insert(name.clone(), (position.clone(), since));
        }
        state.quiet_groups = seen;
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
                state.next_cleanup = now + (self.consumer_expiry / 4).max(self.claim_interval);
                self.clean_up(&mut conn, state).await;
            }
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
            cmd.arg("BLOCK").arg(block.as_millis().max(1) as u64);
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
            .arg(self.claim_idle.as_millis() as u64)
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
        if !claimed.deleted.is_empty() {
            // Redis 7 already dropped these from the pending list.
            tracing::warn!(
                stream = %self.member.stream,
                group = %self.member.group,
                count = claimed.deleted.len(),
                ids = ?claimed.deleted.iter().map(EntryId::to_string).collect::<Vec<_>>(),
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
                } else if origin == Origin::New || !held.in_flight.contains(&entry.id.tag()) {
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
        self.acks.lock().dropped = true;
        self.acks.wake.notify_one();
    }
}

/// Sends queued acknowledgements, one `XACK` for whatever gathered while the previous one
/// was on its way, until the consumer is dropped and the queue is empty. A failed `XACK`
/// is sent again until it passes; only once the consumer is gone does it give up (see
/// [`AckQueue`]).
async fn send_acks(
    acks: Arc<AckQueue>,
    holdings: Arc<Holdings>,
    mut conn: Conn,
    stream: String,
    group: String,
) {
    while let Some(mut ids) = acks.due().await {
        if ids.is_empty() {
            continue;
        }
        let mut tries = 0;
        loop {
            let result = redis::cmd("XACK")
                .arg(&stream)
                .arg(&group)
                .arg(&ids)
                .query_async::<i64>(&mut conn)
                .await;
            match result {
                Ok(_) => {
                    holdings.forget(&ids);
                    break;
                }
                Err(e) if e.code() == Some("NOGROUP") => {
                    tracing::warn!(%stream, %group, count = ids.len(), "consumer group is gone; nothing left to acknowledge");
                    holdings.forget(&ids);
                    break;
                }
                // The first command after a dropped connection fails while the connection is
                // re-made; XACK is idempotent, so it is simply sent again.
                Err(e) if e.is_connection_dropped() && tries == 0 => {}
                Err(e) => {
                    let error = command_error(
                        &format!(
                            "XACK of {} entries on stream `{stream}` group `{group}`",
                            ids.len()
                        ),
                        e,
                    );
                    if acks.is_dropped() && tries >= ACK_TRIES {
                        // Nobody is left to report to; the entries stay pending.
                        tracing::error!(%stream, %group, count = ids.len(), %error, "XACK failed; these entries will be delivered again");
                        break;
                    }
                    let wait = ack_backoff(tries);
                    if error.is_temporary() {
                        tracing::warn!(%stream, %group, %error, retry_in = ?wait, "XACK failed; retrying");
                    } else {
                        if acks.refusal().is_none() {
                            tracing::error!(%stream, %group, count = ids.len(), %error, "redis refuses XACK; the consumer stops, and these entries stay pending");
                        }
                        acks.refuse(&error);
                    }
                    tokio::time::sleep(wait).await;
                }
            }
            tries += 1;
            // Whatever was acknowledged meanwhile goes along with the retry.
            ids.append(&mut acks.take_more());
        }
        acks.sent(ids.len());
    }
}

/// 50 ms doubling to 5 s, as core waits between failed acks.
fn ack_backoff(tries: u32) -> Duration {
    let ms = 50u64.saturating_mul(1 << tries.min(7));
    Duration::from_millis(ms.min(5_000))
}
