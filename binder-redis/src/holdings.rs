//! What a consumer holds: the deliveries it has handed out and Redis has not confirmed
//! acknowledged, in memory ([`Holdings`]) and in Redis (its pending list, changed through
//! [`HOLD_SCRIPT`]), and the keepalive that keeps other members off them however long the
//! handlers take.
//!
//! # Holding entries, and counting attempts
//!
//! Redis keeps a delivery count per pending entry; this binder keeps it equal to core's attempts
//! (see `stream_core::Consumer`): the deliveries of the message that reached a handler, or may
//! have. A read of a new entry (`XREADGROUP ... >`) and a takeover from another member
//! (`XAUTOCLAIM`) add one; [`Consumer::retrying`](stream_core::Consumer::retrying) sets it to the
//! attempt about to start; [`Consumer::release`](stream_core::Consumer::release) takes one back.
//! Everything else this consumer does to its own entries leaves the count alone: a task re-claims
//! the entries it holds with `XCLAIM ... JUSTID` every third of `claim-idle` (10 s at most), so
//! that no other member finds them idle however long their handlers take; the pass over its own
//! pending list restores the counts that `XREADGROUP ... 0` raises; and when its own sweep claims
//! an entry it holds (after a stall longer than `claim-idle`), it takes that count back. Each of
//! these checks, in one script per batch, that the entry is still pending for this consumer, so
//! none takes back an entry another member has since claimed.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use redis::RedisResult;
use stream_core::DeliveryTag;
use tokio::sync::watch;

use crate::connection::Conn;
use crate::entry::EntryId;

/// The shortest pause between keepalive rounds.
const MIN_KEEPALIVE_PERIOD: Duration = Duration::from_millis(10);
/// The shortest `claim-idle` of a group the keepalive covers: three rounds at their
/// shortest, as it goes round every third of `claim-idle`.
pub(crate) const MIN_CLAIM_IDLE: Duration = MIN_KEEPALIVE_PERIOD.saturating_mul(3);
/// The longest pause between keepalive rounds, whatever `claim-idle` says.
const MAX_KEEPALIVE_PERIOD: Duration = Duration::from_secs(10);
/// Entries per call of [`HOLD_SCRIPT`].
const HOLD_PAGE: usize = 512;

/// Re-claims entries that are still pending for this consumer (`XPENDING` says who owns each
/// one, in the same atomic step), changing their delivery count as the mode says; returns
/// the ids that are not, because another member took them or they were acknowledged.
///
/// An entry handed back already (its delivery time set to 1970, by `release` or `handback`)
/// is left alone by `keep` and `release`: keeping it would make other members wait
/// `claim-idle` for it again, and releasing it again would take a second count off. That
/// makes `release` safe to run over entries some of which were released before.
///
/// An entry deleted or trimmed from the stream is left alone and never returned, except
/// that a hand-back claims it (which drops it from the pending list, as any member's claim
/// would). `XCLAIM` drops a deleted entry from the pending list, yet the consumer that
/// holds it was handed its content and is handling it; and no other member can deliver it
/// any more, so it is not lost to anyone. Its `XACK` (or a claim sweep) clears it.
///
/// KEYS[1] stream; ARGV: group, consumer, mode, attempt (for `attempt`), ids...
/// Modes: `keep` resets the idle time (and shows the consumer alive); `attempt` sets the
/// count to ARGV[4]; `release` takes one off the count and makes the entry claimable at once
/// (delivery time 1970); `unbump` takes one off; `handback` makes it claimable at once.
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
local handback = mode == 'release' or mode == 'handback'
-- The server's clock in ms: an entry delivered in the first second of 1970 was handed back.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local function exists(id)
  return #redis.call('XRANGE', KEYS[1], id, id) > 0
end
local gone = {}
for i = 5, #ARGV do
  local id = ARGV[i]
  local row = redis.call('XPENDING', KEYS[1], group, id, id, 1)[1]
  if row and row[2] == consumer and (mode == 'keep' or mode == 'release')
      and now - row[3] <= 1000 then
    -- Handed back already.
  elseif row and row[2] == consumer and (handback or exists(id)) then
    local claim = {'XCLAIM', KEYS[1], group, consumer, 0, id}
    if mode == 'attempt' then
      claim[#claim + 1] = 'RETRYCOUNT'
      claim[#claim + 1] = ARGV[4]
    elseif mode == 'release' or mode == 'unbump' then
      claim[#claim + 1] = 'RETRYCOUNT'
      claim[#claim + 1] = math.max(row[4] - 1, 0)
    end
    if handback then
      claim[#claim + 1] = 'TIME'
      claim[#claim + 1] = 1
    end
    claim[#claim + 1] = 'JUSTID'
    redis.call(unpack(claim))
  elseif exists(id) then
    gone[#gone + 1] = id
  end
end
return gone
";

static HOLD: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(HOLD_SCRIPT));

/// What [`HOLD_SCRIPT`] does to the entries this consumer still holds.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Hold {
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
pub(crate) struct Member {
    pub(crate) stream: String,
    pub(crate) group: String,
    pub(crate) name: String,
}

impl Member {
    /// Runs [`HOLD_SCRIPT`] over `ids`, a page at a time; returns those no longer pending
    /// for this consumer.
    pub(crate) async fn hold(
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
pub(crate) fn keepalive_period(claim_idle: Duration, consumer_expiry: Duration) -> Duration {
    (claim_idle / 3)
        .min(consumer_expiry / 10)
        .clamp(MIN_KEEPALIVE_PERIOD, MAX_KEEPALIVE_PERIOD)
}

/// Re-claims the entries `holdings` holds every `period` until `stop` says so or the
/// consumer is gone. Entries found in another member's pending list are marked lost.
pub(crate) async fn keep_alive(
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

/// The deliveries a consumer holds, and those it lost to another member.
#[derive(Default)]
pub(crate) struct Holdings {
    held: Mutex<Held>,
    /// Whether `lost` may hold anything: [`Holdings::holds`] needs no lock while it is false.
    any_lost: AtomicBool,
}

#[derive(Default)]
pub(crate) struct Held {
    /// Handed out and not confirmed acknowledged.
    pub(crate) in_flight: InFlight,
    /// Handed out, then found pending for another member: not to be handled here.
    lost: Tags,
}

impl Holdings {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn hand_out(&self, tags: impl Iterator<Item = DeliveryTag>) {
        let mut held = self.lock();
        if self.any_lost.load(Ordering::Acquire) {
            // Taken back from the member that had them: ours again.
            let held = &mut *held;
            for tag in tags {
                held.lost.remove(&tag);
                held.in_flight.insert(tag, false);
            }
            self.any_lost
                .store(!held.lost.is_empty(), Ordering::Release);
        } else {
            held.in_flight.extend(tags.map(|tag| (tag, false)));
        }
    }

    /// Marks deliveries core acknowledged: their `XACK` is queued or on its way, so the
    /// keepalive finding them no longer pending is that `XACK` landing, not a loss.
    pub(crate) fn acked(&self, tags: &[DeliveryTag]) {
        let mut held = self.lock();
        for tag in tags {
            if let Some(acked) = held.in_flight.get_mut(tag) {
                *acked = true;
            }
        }
    }

    /// Forgets entries that are acknowledged or handed back.
    pub(crate) fn forget(&self, ids: &[EntryId]) {
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

    pub(crate) fn contains(&self, tag: DeliveryTag) -> bool {
        self.lock().in_flight.contains_key(&tag)
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().in_flight.len()
    }

    fn ids(&self) -> Vec<EntryId> {
        self.lock()
            .in_flight
            .keys()
            .map(|tag| EntryId::from_tag(*tag))
            .collect()
    }

    /// Marks entries another member now holds; returns how many this consumer still held and
    /// had not acknowledged.
    fn lose(&self, ids: &[EntryId]) -> usize {
        if ids.is_empty() {
            return 0;
        }
        let mut held = self.lock();
        let mut lost = 0;
        for id in ids {
            // Not held any more: its XACK was confirmed meanwhile. Acknowledged and not yet
            // confirmed: the script ran after the XACK, and cannot tell that apart from a
            // takeover; the handler is done with it either way.
            if held.in_flight.get(&id.tag()) == Some(&false) {
                held.in_flight.remove(&id.tag());
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
    pub(crate) fn holds(&self, tag: DeliveryTag) -> bool {
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

/// Tags of deliveries this consumer handed out and Redis has not seen acknowledged, each
/// with whether core has acknowledged it.
pub(crate) type InFlight = HashMap<DeliveryTag, bool, TagHash>;

/// A set of delivery tags.
type Tags = HashSet<DeliveryTag, TagHash>;

/// Hashing for [`InFlight`] and [`Tags`]: every delivery is inserted and removed once, and SipHash over
/// its two words was a measurable part of the consumer's time. Seeded per process, so ids
/// chosen by a producer cannot be made to collide.
#[derive(Clone)]
pub(crate) struct TagHash(u64);

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

pub(crate) struct TagHasher(u64);

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
