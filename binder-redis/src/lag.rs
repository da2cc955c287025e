//! A group's lag: the entries of its stream it has not acknowledged, for core's
//! `stream_consumer_lag` gauge.
//!
//! Redis tells most of it in `XINFO GROUPS`: `pending` (delivered, not acknowledged) and
//! `lag` (never delivered). Both are group-wide, so every member reports the same figure.
//! [`LAG_SCRIPT`] reads them with the stream's length and first id in one round trip, and
//! [`group_lag`] corrects what Redis gets wrong or cannot tell:
//!
//! * Redis counts `lag` as entries added minus entries the group read, so entries a trim
//!   removed before the group read them stay in it. When the group's last-delivered id is
//!   below the stream's first entry, every entry left is undelivered: the lag is the
//!   stream's length.
//! * `lag` is nil when entries after the group's position were deleted (`XDEL`), until the
//!   group has read past them (Redis 7.0 and later; before 7.0 there is no `lag` at all).
//!   [`COUNT_SCRIPT`] then counts the entries after the position, or those up to it, in
//!   pages, up to [`MAX_COUNTED`] on each side; past that the sample fails (core logs it
//!   and tries again at the next interval) rather than report a guess.
//! * A group that does not exist (Redis lost it, or the stream was deleted) is made again
//!   by the consumer's next read, where its `start-from` says: it has the whole stream to
//!   read (`earliest`) or nothing (`latest`).

use std::sync::LazyLock;

use redis::Value;
use stream_core::{Result, StartFrom};

use crate::connection::{command_error, Conn};
use crate::entry::EntryId;

/// Most entries [`COUNT_SCRIPT`] counts on each side of a group's position.
const MAX_COUNTED: u64 = 1_000;
/// Entries per `XRANGE` of [`COUNT_SCRIPT`]. The script holds a page of entries, payloads
/// included, at a time; with payloads of up to 1 MiB (core's default limit) a page of 10
/// keeps that to about 10 MiB of Redis's memory, at a hundred cheap calls per thousand.
const COUNT_PAGE: u64 = 10;

/// What a group's lag is computed from, read in one atomic step.
///
/// KEYS[1] stream; ARGV[1] group. Returns `{}` when the stream does not exist, `{length}`
/// when it has no such group, else `{length, pending, lag or -1, last-delivered id, first
/// entry id or ''}`. Ids go back as text: Lua's numbers cannot hold them exactly.
const LAG_SCRIPT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {}
end
local length = redis.call('XLEN', KEYS[1])
for _, flat in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local group = {}
  for i = 1, #flat, 2 do group[flat[i]] = flat[i + 1] end
  if group['name'] == ARGV[1] then
    local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
    -- nil (absent before Redis 7.0) and false (Redis cannot tell) both become -1.
    local lag = group['lag'] or -1
    return {length, group['pending'], lag, group['last-delivered-id'], first and first[1] or ''}
  end
end
return {length}
";

/// Counts the entries after ARGV[1] (a group's last-delivered id), or failing that those up
/// to it and subtracts them from the length: whichever side is small. Pages of ARGV[2]
/// entries, at most ARGV[3] on each side. Returns the count after, or -1 when both sides
/// have more than ARGV[3].
///
/// KEYS[1] stream; ARGV: position, page size, most counted.
const COUNT_SCRIPT: &str = r"
local page, most = tonumber(ARGV[2]), tonumber(ARGV[3])
local function count(command, from, to)
  local n = 0
  while n <= most do
    local entries = redis.call(command, KEYS[1], from, to, 'COUNT', page)
    n = n + #entries
    if #entries < page then
      return n
    end
    from = '(' .. entries[#entries][1]
  end
  return -1
end
local after = count('XRANGE', '(' .. ARGV[1], '+')
if after >= 0 then
  return after
end
local through = count('XREVRANGE', ARGV[1], '-')
if through >= 0 then
  return redis.call('XLEN', KEYS[1]) - through
end
return -1
";

static LAG: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(LAG_SCRIPT));
static COUNT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(COUNT_SCRIPT));

/// The entries of `stream` that `group` has not acknowledged: never delivered plus
/// delivered and pending (released ones included: they are pending until claimed again).
pub(crate) async fn group_lag(
    conn: &mut Conn,
    stream: &str,
    group: &str,
    start: StartFrom,
) -> Result<u64> {
    let what = || format!("reading the lag of group `{group}` on stream `{stream}`");
    let reply: Vec<Value> = LAG
        .key(stream)
        .arg(group)
        .invoke_async(conn)
        .await
        .map_err(|e| command_error(&what(), e))?;
    let facts = Facts::parse(&reply).ok_or_else(|| {
        stream_core::Error::new(
            stream_core::ErrorKind::Broker,
            format!("{}: unexpected reply {reply:?}", what()),
        )
    })?;
    let (position, pending) = match facts {
        // Deleted: the consumer's next read makes it again, empty.
        Facts::NoStream => return Ok(0),
        Facts::NoGroup { length } => {
            return Ok(match start {
                StartFrom::Earliest => length,
                StartFrom::Latest => 0,
            })
        }
        Facts::Group {
            length,
            pending,
            lag,
            position,
            first,
        } => match undelivered(length, lag, position, first) {
            Some(undelivered) => return Ok(undelivered.saturating_add(pending)),
            None => (position, pending),
        },
    };
    let counted: i64 = COUNT
        .key(stream)
        .arg(position)
        .arg(COUNT_PAGE)
        .arg(MAX_COUNTED)
        .invoke_async(conn)
        .await
        .map_err(|e| command_error(&what(), e))?;
    match u64::try_from(counted) {
        Ok(undelivered) => Ok(undelivered.saturating_add(pending)),
        Err(_) => Err(stream_core::Error::new(
            stream_core::ErrorKind::Broker,
            format!(
                "{}: Redis cannot tell (entries after the group's position were deleted with \
                 XDEL) and more than {MAX_COUNTED} entries lie on either side of it to count",
                what()
            ),
        )
        .temporary(true)),
    }
}

/// The entries never delivered to a group, from what [`LAG_SCRIPT`] read; `None` when only
/// counting them tells.
fn undelivered(
    length: u64,
    lag: Option<u64>,
    position: EntryId,
    first: Option<EntryId>,
) -> Option<u64> {
    let Some(first) = first else {
        // An empty stream has nothing left to deliver.
        return Some(0);
    };
    if position < first {
        // Everything the stream holds comes after the group's position; what Redis counts
        // beyond that (entries trimmed before the group read them) is gone for good.
        return Some(length);
    }
    // Never more than the stream holds, whatever Redis's counters say.
    lag.map(|lag| lag.min(length))
}

/// [`LAG_SCRIPT`]'s reply.
#[derive(Debug, PartialEq, Eq)]
enum Facts {
    NoStream,
    NoGroup {
        length: u64,
    },
    Group {
        length: u64,
        pending: u64,
        /// `None` when Redis cannot tell.
        lag: Option<u64>,
        /// The group's last-delivered id.
        position: EntryId,
        /// `None` for an empty stream.
        first: Option<EntryId>,
    },
}

impl Facts {
    fn parse(reply: &[Value]) -> Option<Facts> {
        let int = |value: &Value| match value {
            Value::Int(n) => Some(*n),
            _ => None,
        };
        let text = |value: &Value| match value {
            Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
            Value::SimpleString(text) => Some(text.clone()),
            _ => None,
        };
        let count = |value: &Value| int(value).and_then(|n| u64::try_from(n).ok());
        match reply {
            [] => Some(Facts::NoStream),
            [length] => Some(Facts::NoGroup {
                length: count(length)?,
            }),
            [length, pending, lag, position, first] => {
                let first = text(first)?;
                Some(Facts::Group {
                    length: count(length)?,
                    pending: count(pending)?,
                    // -1 stands for nil.
                    lag: u64::try_from(int(lag)?).ok(),
                    position: EntryId::parse(&text(position)?)?,
                    first: if first.is_empty() {
                        None
                    } else {
                        Some(EntryId::parse(&first)?)
                    },
                })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ms: u64, seq: u64) -> EntryId {
        EntryId { ms, seq }
    }

    #[test]
    fn entries_trimmed_before_the_group_read_them_do_not_count() {
        // Redis would say 10 (added minus read), but 6 of them were trimmed away.
        assert_eq!(undelivered(4, Some(10), id(5, 0), Some(id(11, 0))), Some(4));
    }

    #[test]
    fn redis_lag_counts_when_nothing_after_the_position_was_trimmed() {
        assert_eq!(undelivered(8, Some(3), id(5, 0), Some(id(2, 0))), Some(3));
        // A counter above what the stream holds is wrong; the stream is right.
        assert_eq!(undelivered(2, Some(3), id(5, 0), Some(id(2, 0))), Some(2));
        assert_eq!(undelivered(8, None, id(5, 0), Some(id(2, 0))), None);
    }

    #[test]
    fn an_empty_stream_leaves_nothing_to_deliver() {
        assert_eq!(undelivered(0, None, id(5, 0), None), Some(0));
    }

    #[test]
    fn replies_parse() {
        assert_eq!(Facts::parse(&[]), Some(Facts::NoStream));
        assert_eq!(
            Facts::parse(&[Value::Int(3)]),
            Some(Facts::NoGroup { length: 3 })
        );
        let reply = [
            Value::Int(3),
            Value::Int(2),
            Value::Int(-1),
            Value::BulkString(b"5-1".to_vec()),
            Value::BulkString(Vec::new()),
        ];
        assert_eq!(
            Facts::parse(&reply),
            Some(Facts::Group {
                length: 3,
                pending: 2,
                lag: None,
                position: id(5, 1),
                first: None
            })
        );
        assert_eq!(Facts::parse(&[Value::Nil]), None);
    }
}
