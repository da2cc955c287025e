//! Cleaning up after dead consumers. Every consumer joins its group under a name of its own,
//! and core names every anonymous group anew, so each crash would leave a consumer name (and,
//! for an anonymous group, a whole group) behind for good. Live members remove them: the
//! group's consumers that hold nothing and were not seen for `consumer-expiry`, and the
//! stream's anonymous groups nobody reads any more (see [`CLEANUP_SCRIPT`]). A live
//! consumer shows itself through the keepalive of [`holdings`](crate::holdings).

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use redis::RedisResult;
use tokio::time::Instant;

use crate::connection::{millis, Conn};
use crate::holdings::Member;

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

static CLEANUP: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(CLEANUP_SCRIPT));

/// Removes what dead consumers left behind (see [`CLEANUP_SCRIPT`]). Housekeeping: a
/// failure is logged, and the next sweep tries again. `quiet_groups` is the caller's record
/// of anonymous groups without a consumer that leave entries unread, kept between sweeps.
pub(crate) async fn clean_up(
    member: &Member,
    conn: &mut Conn,
    expiry: Duration,
    quiet_groups: &mut HashMap<String, (String, Instant)>,
) {
    let now = Instant::now();
    let candidates: Vec<&str> = quiet_groups
        .iter()
        .filter(|(_, (_, since))| now.duration_since(*since) >= expiry)
        .flat_map(|(name, (position, _))| [name.as_str(), position.as_str()])
        .collect();
    let result: RedisResult<(usize, Vec<String>, Vec<String>)> = CLEANUP
        .key(&member.stream)
        .arg(&member.group)
        .arg(millis(expiry))
        .arg(ANONYMOUS_PREFIX)
        .arg(&candidates)
        .invoke_async(conn)
        .await;
    let (removed, destroyed, quiet) = match result {
        Ok(outcome) => outcome,
        Err(e) => {
            tracing::warn!(stream = %member.stream, group = %member.group, error = %e, "could not clean up after dead consumers; trying again at a later sweep");
            return;
        }
    };
    if removed > 0 {
        tracing::info!(stream = %member.stream, group = %member.group, removed, expiry = ?expiry, "removed consumers that held nothing and were not seen for the expiry");
    }
    if !destroyed.is_empty() {
        tracing::info!(stream = %member.stream, groups = ?destroyed, expiry = ?expiry, "destroyed anonymous groups nobody reads any more");
    }
    let mut seen = HashMap::with_capacity(quiet.len() / 2);
    for pair in quiet.chunks_exact(2) {
        let (name, position) = (&pair[0], &pair[1]);
        let since = match quiet_groups.get(name) {
            Some((was, since)) if was == position => *since,
            _ => now,
        };
        seen.insert(name.clone(), (position.clone(), since));
    }
    *quiet_groups = seen;
}
