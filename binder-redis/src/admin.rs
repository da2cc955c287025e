//! Administrative access to Redis streams ([`stream_core::admin::Admin`]): `XINFO` for
//! reports, `XRANGE` for reads outside any group, `XDEL` and `XTRIM MINID` for removal.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use redis::Value;
use stream_core::admin::{
    Admin, ConsumerReport, Cursor, DestinationReport, GroupReport, Position, Read, ReadFrom,
    Removal, Stored,
};
use stream_core::{Error, ErrorKind, Result};

use crate::connection::{command_error, Conn};
use crate::entry::{parse_range, EntryId};

/// The [`Admin`] of a [`RedisBinder`](crate::RedisBinder), on its command connection.
pub(crate) struct RedisAdmin {
    pub(crate) conn: Conn,
}

/// Reads `XINFO`'s flat `[name, value, ...]` replies (and RESP3 maps) by field name.
struct Fields(Vec<(String, Value)>);

impl Fields {
    fn of(value: Value) -> Fields {
        let pairs = match value {
            Value::Array(flat) => {
                let mut flat = flat.into_iter();
                std::iter::from_fn(|| Some((flat.next()?, flat.next()?)))
                    .filter_map(|(name, value)| Some((text(&name)?, value)))
                    .collect()
            }
            Value::Map(map) => map
                .into_iter()
                .filter_map(|(name, value)| Some((text(&name)?, value)))
                .collect(),
            _ => Vec::new(),
        };
        Fields(pairs)
    }

    fn get(&self, name: &str) -> Option<&Value> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    fn text(&self, name: &str) -> Option<String> {
        self.get(name).and_then(text)
    }

    fn number(&self, name: &str) -> Option<u64> {
        match self.get(name)? {
            Value::Int(n) => u64::try_from(*n).ok(),
            other => text(other)?.parse().ok(),
        }
    }
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

fn entry_time(id: EntryId) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(id.ms)
}

/// The id that comes right after `id` in a stream, for exclusive range starts.
fn successor(id: EntryId) -> EntryId {
    match id.seq.checked_add(1) {
        Some(seq) => EntryId { ms: id.ms, seq },
        None => EntryId {
            ms: id.ms + 1,
            seq: 0,
        },
    }
}

impl RedisAdmin {
    async fn query<T: redis::FromRedisValue>(&self, what: &str, cmd: &redis::Cmd) -> Result<T> {
        let mut conn = self.conn.clone();
        cmd.query_async(&mut conn)
            .await
            .map_err(|e| command_error(what, e))
    }

    /// The id of the newest entry, if any.
    async fn last_id(&self, destination: &str) -> Result<Option<EntryId>> {
        let reply: Value = self
            .query(
                "XREVRANGE",
                redis::cmd("XREVRANGE")
                    .arg(destination)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1),
            )
            .await?;
        let entries = parse_range(reply).map_err(|e| malformed(destination, e))?;
        Ok(entries.first().map(|entry| entry.id))
    }
}

fn malformed(destination: &str, e: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::Broker,
        format!("unexpected reply about stream `{destination}`: {e}"),
    )
}

#[async_trait]
impl Admin for RedisAdmin {
    /// Every group of the stream, from `XINFO GROUPS`: `known_groups` adds nothing.
    async fn inspect(
        &self,
        destination: &str,
        _known_groups: &[String],
    ) -> Result<DestinationReport> {
        let exists: bool = self
            .query("EXISTS", redis::cmd("EXISTS").arg(destination))
            .await?;
        let mut report = DestinationReport::default();
        if !exists {
            return Ok(report);
        }
        report.exists = true;
        let stream = Fields::of(
            self.query(
                "XINFO STREAM",
                redis::cmd("XINFO").arg("STREAM").arg(destination),
            )
            .await?,
        );
        report.length = stream.number("length").unwrap_or(0);
        let first = stream.get("first-entry").cloned();
        let last = stream.get("last-entry").cloned();
        let id_of = |entry: Option<Value>| match entry {
            Some(Value::Array(mut pair)) if !pair.is_empty() => text(&pair.swap_remove(0)),
            _ => None,
        };
        if let (Some(first), Some(last)) = (id_of(first), id_of(last)) {
            report.range = Some((Position(first), Position(last)));
        }
        let groups: Value = self
            .query(
                "XINFO GROUPS",
                redis::cmd("XINFO").arg("GROUPS").arg(destination),
            )
            .await?;
        let Value::Array(groups) = groups else {
            return Ok(report);
        };
        for group in groups {
            let group = Fields::of(group);
            let Some(name) = group.text("name") else {
                continue;
            };
            let pending = group.number("pending");
            let consumers: Value = self
                .query(
                    "XINFO CONSUMERS",
                    redis::cmd("XINFO")
                        .arg("CONSUMERS")
                        .arg(destination)
                        .arg(&name),
                )
                .await?;
            let consumers = match consumers {
                Value::Array(consumers) => consumers
                    .into_iter()
                    .map(Fields::of)
                    .filter_map(|consumer| {
                        let mut report = ConsumerReport::default();
                        report.name = consumer.text("name")?;
                        report.held = consumer.number("pending");
                        report.idle = consumer.number("idle").map(Duration::from_millis);
                        Some(report)
                    })
                    .collect(),
                _ => Vec::new(),
            };
            // Redis's `lag` leaves out what is pending; the group has acknowledged neither.
            let lag = group.number("lag").map(|lag| lag + pending.unwrap_or(0));
            let mut group_report = GroupReport::default();
            group_report.name = name;
            group_report.lag = lag;
            group_report.pending = pending;
            group_report.consumers = consumers;
            report.groups.push(group_report);
        }
        Ok(report)
    }

    async fn read(&self, destination: &str, from: &ReadFrom, max: usize) -> Result<Read> {
        let start = match from {
            ReadFrom::Earliest => None,
            ReadFrom::Latest => {
                // Nothing now; the cursor is the newest entry, so the next read starts after it.
                let last = self.last_id(destination).await?;
                let next = last.map_or_else(|| "0-0".to_owned(), |id| id.to_string());
                return Ok(Read {
                    messages: Vec::new(),
                    next: Cursor(next),
                });
            }
            ReadFrom::Cursor(Cursor(after)) => Some(EntryId::parse(after).ok_or_else(|| {
                Error::new(
                    ErrorKind::Config,
                    format!("`{after}` is not a Redis stream position (MS-SEQ)"),
                )
            })?),
        };
        let lower = match start {
            None => "-".to_owned(),
            Some(EntryId { ms: 0, seq: 0 }) => "-".to_owned(),
            Some(after) => successor(after).to_string(),
        };
        let reply: Value = self
            .query(
                "XRANGE",
                redis::cmd("XRANGE")
                    .arg(destination)
                    .arg(&lower)
                    .arg("+")
                    .arg("COUNT")
                    .arg(max.max(1)),
            )
            .await?;
        let entries = parse_range(reply).map_err(|e| malformed(destination, e))?;
        let next = entries
            .last()
            .map(|entry| entry.id.to_string())
            .or_else(|| start.map(|id| id.to_string()))
            .unwrap_or_else(|| "0-0".to_owned());
        let messages = entries
            .into_iter()
            .filter_map(|entry| {
                Some(Stored {
                    position: Position(entry.id.to_string()),
                    stored_at: Some(entry_time(entry.id)),
                    message: entry.message?,
                })
            })
            .collect();
        Ok(Read {
            messages,
            next: Cursor(next),
        })
    }

    fn removal(&self) -> Removal {
        Removal::Individual
    }

    async fn remove(&self, destination: &str, positions: &[Position]) -> Result<()> {
        if positions.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("XDEL");
        cmd.arg(destination);
        for position in positions {
            cmd.arg(&position.0);
        }
        let _: u64 = self.query("XDEL", &cmd).await?;
        Ok(())
    }

    async fn purge(&self, destination: &str, before: SystemTime) -> Result<Option<u64>> {
        let millis = before
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let removed: u64 = self
            .query(
                "XTRIM",
                redis::cmd("XTRIM")
                    .arg(destination)
                    .arg("MINID")
                    .arg(format!("{millis}-0")),
            )
            .await?;
        Ok(Some(removed))
    }
}
