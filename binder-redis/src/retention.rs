//! Retention by acknowledgement (`trim = { acknowledged = true }`): every `interval`, a
//! producer trims its stream to the oldest entry some group still needs, so entries every
//! group has acknowledged go and nothing a group has not is ever trimmed.
//!
//! What a group needs: the entries after its last-delivered id (not read yet) and from its
//! oldest pending id on (read, not acknowledged). The stream is trimmed with
//! `XTRIM MINID` to the oldest of those over every group, in one script on the stream's key
//! (one round trip per stream and interval; on a cluster, on the node that owns the key).
//! A stream without groups is left alone: a group created later from the start would find
//! its messages gone. Trimming is idempotent, so every publishing process may run it.
//!
//! A `max-len`/`max-age` bound beside it still trims at every `XADD`, unread or not; a
//! group whose needed entries that removed is reported (see [`run`]).

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use redis::RedisResult;

use crate::connection::Conn;

/// Counter: entries removed by acknowledgement-based retention. Label `destination`.
pub const TRIMMED: &str = "stream_redis_retention_trimmed_total";
/// Counter: checks that found a group whose unacknowledged entries were removed by the
/// `max-len`/`max-age` bound (unread messages lost). Labels `destination`, `group`.
pub const UNREAD_DROPPED: &str = "stream_redis_retention_unread_dropped_total";

/// KEYS[1]: the stream. ARGV[1]: `~` (approximate) or `=`.
/// Returns `{removed, first id or '', group, need, group, need, ...}`: how many entries
/// went, the stream's first entry after that, and what each group still needs (its oldest
/// pending id, else the id after its last-delivered one).
const RETENTION_SCRIPT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, ''} end
local function fields(list)
  local t = {}
  for i = 1, #list, 2 do t[list[i]] = list[i + 1] end
  return t
end
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function less(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  return am < bm or (am == bm and as < bs)
end
local function after(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return ms .. '-' .. string.format('%d', tonumber(seq) + 1)
end
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
local result = {0, ''}
local keep = nil
for _, g in ipairs(groups) do
  g = fields(g)
  local need = after(g['last-delivered-id'])
  if g['pending'] > 0 then
    local oldest = redis.call('XPENDING', KEYS[1], g['name'])[2]
    if less(oldest, need) then need = oldest end
  end
  result[#result + 1] = g['name']
  result[#result + 1] = need
  if keep == nil or less(need, keep) then keep = need end
end
if keep ~= nil then
  if ARGV[1] == '~' then
    -- Without LIMIT 0, an approximate trim stops after 100 nodes' worth of entries (10,000
    -- by default): fewer than a busy stream gains in an interval.
    result[1] = redis.call('XTRIM', KEYS[1], 'MINID', '~', keep, 'LIMIT', 0)
  else
    result[1] = redis.call('XTRIM', KEYS[1], 'MINID', '=', keep)
  end
end
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
if first[1] then result[2] = first[1][1] end
return result
";

static RETENTION: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| redis::Script::new(RETENTION_SCRIPT));

/// One retention run's outcome.
struct Outcome {
    removed: u64,
    /// The stream's first entry afterwards, if it has any.
    first: Option<StreamId>,
    /// Each group and the oldest entry it still needs.
    needs: Vec<(String, StreamId)>,
}

/// A stream entry id, ordered as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct StreamId(u64, u64);

impl std::str::FromStr for StreamId {
    type Err = ();
    fn from_str(id: &str) -> Result<StreamId, ()> {
        let (ms, seq) = id.split_once('-').ok_or(())?;
        Ok(StreamId(
            ms.parse().map_err(|_| ())?,
            seq.parse().map_err(|_| ())?,
        ))
    }
}

async fn trim_acknowledged(
    conn: &mut Conn,
    stream: &str,
    approximate: bool,
) -> RedisResult<Outcome> {
    let reply: Vec<redis::Value> = RETENTION
        .key(stream)
        .arg(if approximate { "~" } else { "=" })
        .invoke_async(conn)
        .await?;
    let mut reply = reply.into_iter();
    let removed = match reply.next() {
        Some(count) => redis::from_redis_value(count)?,
        None => 0,
    };
    let mut reply = reply.map(redis::from_redis_value::<String>);
    let first = reply.next().transpose()?.and_then(|id| id.parse().ok());
    let mut needs = Vec::new();
    while let (Some(group), Some(need)) = (reply.next(), reply.next()) {
        if let Ok(need) = need?.parse() {
            needs.push((group?, need));
        }
    }
    Ok(Outcome {
        removed,
        first,
        needs,
    })
}

/// Trims `stream` now and every `interval` while `alive` (the producer) lives.
/// Housekeeping: a failed trim is logged and tried again at the next interval.
///
/// A group is reported (a warning, and [`UNREAD_DROPPED`]) when it had every entry it
/// needed at the previous run and no longer has: something other than this trim (the
/// `max-len`/`max-age` bound, or an operator) removed entries it had not acknowledged. A
/// group created after entries were gone is not reported: they were never its.
pub(crate) async fn run(
    alive: Weak<()>,
    mut conn: Conn,
    stream: String,
    interval: Duration,
    approximate: bool,
) {
    let labels = [("destination", stream.clone())];
    let mut intact: HashMap<String, bool> = HashMap::new();
    loop {
        let Some(guard) = alive.upgrade() else { return };
        match trim_acknowledged(&mut conn, &stream, approximate).await {
            Ok(outcome) => {
                if outcome.removed > 0 {
                    metrics::counter!(TRIMMED, &labels).increment(outcome.removed);
                    tracing::debug!(%stream, removed = outcome.removed, "trimmed entries every group acknowledged");
                }
                let mut now = HashMap::with_capacity(outcome.needs.len());
                for (group, need) in outcome.needs {
                    let whole = outcome.first.is_none_or(|first| need >= first);
                    if !whole && intact.get(&group) == Some(&true) {
                        metrics::counter!(
                            UNREAD_DROPPED,
                            "destination" => stream.clone(),
                            "group" => group.clone()
                        )
                        .increment(1);
                        tracing::warn!(%stream, %group, "entries this group had not acknowledged are gone: the stream's max-len/max-age bound (or someone else) trimmed them while the group lagged");
                    }
                    now.insert(group, whole);
                }
                intact = now;
            }
            Err(e) => {
                tracing::warn!(%stream, error = %e, "could not trim acknowledged entries; trying again at the next interval");
            }
        }
        drop(guard);
        tokio::time::sleep(interval).await;
    }
}

/// What keeps a producer's retention task running: dropped with the producer.
pub(crate) type Alive = Arc<()>;
