//! The layout of a message inside a stream entry, and the parsing of stream replies.
//!
//! | field        | holds                                   |
//! |--------------|-----------------------------------------|
//! | `p`          | the payload, raw bytes                  |
//! | `k`          | the key, when the message has one       |
//! | `h:<name>`   | one header; repeated names repeat       |
//!
//! Fields written by other programs (anything else) come back as headers under their own
//! name, so entries from plain `XADD` producers stay readable.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use redis::Value;
use stream_core::{DeliveryTag, HeaderReuse, Headers, Message};

/// Field holding the payload.
pub(crate) const PAYLOAD: &str = "p";
/// Field holding the key.
pub(crate) const KEY: &str = "k";
/// Prefix of header fields.
pub(crate) const HEADER_PREFIX: &str = "h:";

/// The number of `XADD` arguments and their total bytes that [`write_fields`] appends.
pub(crate) fn fields_size(message: &Message) -> (usize, usize) {
    let mut args = 2;
    let mut bytes = PAYLOAD.len() + message.payload().len();
    if let Some(key) = message.key() {
        args += 2;
        bytes += KEY.len() + key.len();
    }
    for (name, value) in message.headers().iter() {
        args += 2;
        bytes += HEADER_PREFIX.len() + name.len() + value.len();
    }
    (args, bytes)
}

/// Appends a message's fields to an `XADD` after its id argument.
pub(crate) fn write_fields(cmd: &mut redis::Cmd, message: &Message) {
    use redis::RedisWrite as _;
    use std::io::Write as _;

    cmd.arg(PAYLOAD).arg(message.payload().as_ref());
    if let Some(key) = message.key() {
        cmd.arg(KEY).arg(key);
    }
    for (name, value) in message.headers().iter() {
        // Written in place: a `format!` would allocate once per header and message.
        let mut field = cmd.writer_for_next_arg();
        // Writing into the command's Vec cannot fail.
        let _ = field.write_all(HEADER_PREFIX.as_bytes());
        let _ = field.write_all(name.as_bytes());
        drop(field);
        cmd.arg(value);
    }
}

/// One entry of a stream reply. `message` is `None` when the entry was deleted or trimmed
/// while it sat in a pending list: Redis still knows its id, not its content.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) id: EntryId,
    pub(crate) message: Option<Message>,
    /// Why the entry's fields do not make a message faithfully (a name or value that is not
    /// UTF-8, no payload): the message is then what could be salvaged, and core
    /// dead-letters it as undecodable instead of handing it to a handler.
    pub(crate) defect: Option<String>,
}

/// What parsing one reply's entries keeps from one entry to the next.
///
/// Entries of one stream mostly carry the same header names and many the same values (the
/// codec's content type): [`HeaderReuse`] shares that text instead of allocating it again
/// for every entry; only what differs (a message id) is new.
#[derive(Default)]
struct HeaderCache {
    reuse: HeaderReuse,
    /// The header fields of the entry being parsed, kept for its capacity.
    fields: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Builds the message of one entry from its flat field-value list, with the first reason
/// it is not faithful to the entry, if there is one. Nothing an entry holds makes this
/// fail: one odd entry must not stop a consumer.
fn message_of(
    id: &str,
    fields: impl Iterator<Item = (Value, Value)>,
    cache: &mut HeaderCache,
) -> (Message, Option<String>) {
    let mut payload = None;
    let mut key = None;
    let mut defect = None;
    cache.fields.clear();
    for (field, value) in fields {
        let (Some(field), Some(value)) = (bytes_of(field), bytes_of(value)) else {
            defect.get_or_insert_with(|| "a field or value is not a string".to_owned());
            continue;
        };
        match field.as_slice() {
            f if f == PAYLOAD.as_bytes() => {
                if payload.replace(Bytes::from(value)).is_some() {
                    defect.get_or_insert_with(|| {
                        format!("field `{PAYLOAD}` (the payload) appears twice")
                    });
                }
            }
            f if f == KEY.as_bytes() => {
                let text = String::from_utf8(value).unwrap_or_else(|e| {
                    defect.get_or_insert_with(|| format!("field `{KEY}` (the key) is not UTF-8"));
                    String::from_utf8_lossy(e.as_bytes()).into_owned()
                });
                if key.replace(text).is_some() {
                    defect.get_or_insert_with(|| format!("field `{KEY}` (the key) appears twice"));
                }
            }
            _ => cache.fields.push((field, value)),
        }
    }
    let (headers, header_defect) = headers_of(&cache.fields, &mut cache.reuse);
    let defect = defect.or(header_defect);
    let defect = match payload {
        Some(_) => defect,
        None => defect.or_else(|| Some(format!("the entry has no payload field `{PAYLOAD}`"))),
    };
    let mut message = Message::new(payload.unwrap_or_default())
        .with_headers(headers)
        .with_id(id);
    if let Some(key) = key {
        message = message.with_key(key);
    }
    (message, defect)
}

/// Headers from `h:<name>` fields (and foreign fields, under their own name), with the first
/// name or value that is not UTF-8 as the defect; such text is kept with replacement
/// characters, for the dead letter.
fn headers_of(fields: &[(Vec<u8>, Vec<u8>)], reuse: &mut HeaderReuse) -> (Headers, Option<String>) {
    let mut defect = None;
    let headers = reuse.build(fields.iter().map(|(field, value)| {
        let name = field
            .strip_prefix(HEADER_PREFIX.as_bytes())
            .unwrap_or(field);
        let name = std::str::from_utf8(name)
            .map(Cow::Borrowed)
            .unwrap_or_else(|_| {
                defect.get_or_insert_with(|| {
                    format!(
                        "field name `{}` is not UTF-8",
                        String::from_utf8_lossy(field)
                    )
                });
                String::from_utf8_lossy(name)
            });
        let value = std::str::from_utf8(value)
            .map(Cow::Borrowed)
            .unwrap_or_else(|_| {
                defect.get_or_insert_with(|| {
                    format!(
                        "the value of field `{}` is not UTF-8",
                        String::from_utf8_lossy(field)
                    )
                });
                String::from_utf8_lossy(value)
            });
        (name, value)
    }));
    (headers, defect)
}

/// A stream entry id `ms-seq`; it is also the delivery tag, as `DeliveryTag(ms, seq)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct EntryId {
    pub(crate) ms: u64,
    pub(crate) seq: u64,
}

impl EntryId {
    pub(crate) fn parse(text: &str) -> Option<EntryId> {
        let (ms, seq) = text.split_once('-')?;
        Some(EntryId {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }

    pub(crate) fn tag(self) -> DeliveryTag {
        DeliveryTag(self.ms, self.seq)
    }

    pub(crate) fn from_tag(tag: DeliveryTag) -> EntryId {
        EntryId {
            ms: tag.0,
            seq: tag.1,
        }
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

impl redis::ToRedisArgs for EntryId {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        out.write_arg_fmt(self);
    }
}

impl redis::ToSingleRedisArg for EntryId {}

/// A reply Redis sent that does not have the documented shape.
#[derive(Debug)]
pub(crate) struct Malformed(pub(crate) &'static str);

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unexpected reply from redis: {}", self.0)
    }
}

impl std::error::Error for Malformed {}

/// Entries of an `XREADGROUP` reply on one stream; a nil reply (BLOCK ran out) is empty.
pub(crate) fn parse_read(reply: Value) -> Result<Vec<Entry>, Malformed> {
    let streams = match reply {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(streams) => streams
            .into_iter()
            .map(|stream| match stream {
                Value::Array(mut pair) if pair.len() == 2 => Ok(pair.pop().unwrap_or(Value::Nil)),
                _ => Err(Malformed("XREADGROUP stream is not [key, entries]")),
            })
            .collect::<Result<Vec<_>, _>>()?,
        // RESP3 answers with a map of stream key to entries.
        Value::Map(streams) => streams.into_iter().map(|(_, entries)| entries).collect(),
        _ => return Err(Malformed("XREADGROUP reply is not an array")),
    };
    let mut entries = Vec::new();
    for stream in streams {
        entries.extend(parse_entries(stream)?);
    }
    Ok(entries)
}

/// The reply of `XAUTOCLAIM`: the next cursor, the claimed entries, and the ids that were
/// deleted while pending (Redis 7 drops those from the pending list itself).
pub(crate) struct Claimed {
    pub(crate) cursor: EntryId,
    pub(crate) entries: Vec<Entry>,
    pub(crate) deleted: Vec<EntryId>,
}

pub(crate) fn parse_autoclaim(reply: Value) -> Result<Claimed, Malformed> {
    let Value::Array(parts) = reply else {
        return Err(Malformed("XAUTOCLAIM reply is not an array"));
    };
    let mut parts = parts.into_iter();
    let cursor = parts
        .next()
        .and_then(|v| id_of(&v))
        .ok_or(Malformed("XAUTOCLAIM cursor"))?;
    let entries = parse_entries(parts.next().unwrap_or(Value::Array(Vec::new())))?;
    let deleted = match parts.next() {
        Some(Value::Array(ids)) => ids
            .iter()
            .map(|v| id_of(v).ok_or(Malformed("XAUTOCLAIM deleted id")))
            .collect::<Result<_, _>>()?,
        _ => Vec::new(),
    };
    Ok(Claimed {
        cursor,
        entries,
        deleted,
    })
}

/// The delivery count of an extended `XPENDING key group id id 1 consumer` reply, or `None`
/// when the entry is not (or no longer) pending for that consumer.
pub(crate) fn parse_pending_count(reply: &Value) -> Option<u32> {
    let Value::Array(rows) = reply else {
        return None;
    };
    let Value::Array(row) = rows.first()? else {
        return None;
    };
    match row.get(3)? {
        Value::Int(n) => u32::try_from(*n).ok(),
        _ => None,
    }
}

/// Entries of an `XRANGE` or `XREVRANGE` reply.
pub(crate) fn parse_range(value: Value) -> Result<Vec<Entry>, Malformed> {
    parse_entries(value)
}

fn parse_entries(value: Value) -> Result<Vec<Entry>, Malformed> {
    let Value::Array(items) = value else {
        return Err(Malformed("stream entries are not an array"));
    };
    let mut cache = HeaderCache::default();
    items
        .into_iter()
        .map(|item| {
            let Value::Array(mut pair) = item else {
                return Err(Malformed("stream entry is not [id, fields]"));
            };
            if pair.len() != 2 {
                return Err(Malformed("stream entry is not [id, fields]"));
            }
            let fields = pair.pop().unwrap_or(Value::Nil);
            let raw_id = match pair.pop() {
                Some(Value::BulkString(b)) => b,
                Some(Value::SimpleString(s)) => s.into_bytes(),
                _ => return Err(Malformed("stream entry id")),
            };
            let id = std::str::from_utf8(&raw_id)
                .ok()
                .and_then(EntryId::parse)
                .ok_or(Malformed("stream entry id"))?;
            let text_id = id.to_string();
            let parsed = match fields {
                // A Lua script's `false` arrives as nil over RESP2 and as false over RESP3.
                Value::Nil | Value::Boolean(false) => None,
                Value::Array(flat) => {
                    let odd = !flat.len().is_multiple_of(2);
                    let mut flat = flat.into_iter();
                    let pairs = std::iter::from_fn(|| Some((flat.next()?, flat.next()?)));
                    let (message, defect) = message_of(&text_id, pairs, &mut cache);
                    let odd = odd.then(|| "a field has no value".to_owned());
                    Some((message, defect.or(odd)))
                }
                Value::Map(map) => Some(message_of(&text_id, map.into_iter(), &mut cache)),
                _ => return Err(Malformed("stream entry fields")),
            };
            let (message, defect) = match parsed {
                Some((message, defect)) => (Some(message), defect),
                None => (None, None),
            };
            Ok(Entry {
                id,
                message,
                defect,
            })
        })
        .collect()
}

fn bytes_of(value: Value) -> Option<Vec<u8>> {
    match value {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::Int(n) => Some(n.to_string().into_bytes()),
        _ => None,
    }
}

fn id_of(value: &Value) -> Option<EntryId> {
    match value {
        Value::BulkString(b) => EntryId::parse(std::str::from_utf8(b).ok()?),
        Value::SimpleString(s) => EntryId::parse(s),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn entry_ids_round_trip_through_tags() {
        let id = EntryId::parse("1700000000000-7").unwrap();
        assert_eq!(id.tag(), DeliveryTag(1_700_000_000_000, 7));
        assert_eq!(EntryId::from_tag(id.tag()).to_string(), "1700000000000-7");
        assert!(EntryId::parse("17").is_none());
        assert!(EntryId::parse("a-b").is_none());
    }

    fn entry(id: &str, fields: &[(&str, &[u8])]) -> Value {
        let flat = fields
            .iter()
            .flat_map(|(f, v)| [bulk(f), Value::BulkString(v.to_vec())])
            .collect();
        Value::Array(vec![bulk(id), Value::Array(flat)])
    }

    fn read_reply(entries: Vec<Value>) -> Value {
        Value::Array(vec![Value::Array(vec![bulk("s"), Value::Array(entries)])])
    }

    fn headers(message: &Message) -> Vec<(&str, &str)> {
        message.headers().iter().collect()
    }

    #[test]
    fn fields_become_payload_key_and_headers() {
        let reply = read_reply(vec![entry(
            "5-0",
            &[
                ("p", &[0, 159, 146, 150]),
                ("k", b"order-1"),
                ("h:a", b"1"),
                ("h:a", b"2"),
                ("foreign", b"x"),
            ],
        )]);
        let entries = parse_read(reply).unwrap();
        let message = entries[0].message.as_ref().unwrap();
        assert_eq!(entries[0].id, EntryId { ms: 5, seq: 0 });
        assert_eq!(message.id(), "5-0");
        assert_eq!(message.key(), Some("order-1"));
        assert_eq!(&message.payload()[..], &[0, 159, 146, 150]);
        assert_eq!(
            headers(message),
            vec![("a", "1"), ("a", "2"), ("foreign", "x")]
        );
    }

    #[test]
    fn headers_are_shared_only_between_entries_that_carry_the_same() {
        let json: &[(&str, &[u8])] = &[("p", b"{}"), ("h:content-type", b"application/json")];
        let reply = read_reply(vec![
            entry("1-0", json),
            entry("2-0", json),
            entry("3-0", &[("h:content-type", b"text/plain"), ("p", b"x")]),
            entry("4-0", &[("p", b"x")]),
            entry(
                "5-0",
                &[
                    ("p", b"x"),
                    ("h:content-type", b"text/plain"),
                    ("h:b", b"2"),
                ],
            ),
            entry("6-0", &[("p", b"x"), ("h:content-type", b"text/plain")]),
            entry("7-0", json),
        ]);
        let messages: Vec<Message> = parse_read(reply)
            .unwrap()
            .into_iter()
            .map(|e| e.message.unwrap())
            .collect();
        let expected: [&[(&str, &str)]; 7] = [
            &[("content-type", "application/json")],
            &[("content-type", "application/json")],
            &[("content-type", "text/plain")],
            &[],
            &[("content-type", "text/plain"), ("b", "2")],
            &[("content-type", "text/plain")],
            &[("content-type", "application/json")],
        ];
        for (message, expected) in messages.iter().zip(expected) {
            assert_eq!(headers(message), expected, "{}", message.id());
        }
        assert_eq!(&messages[2].payload()[..], b"x");
    }

    fn raw_entry(id: &str, fields: &[(&[u8], &[u8])]) -> Value {
        let flat = fields
            .iter()
            .flat_map(|(f, v)| [Value::BulkString(f.to_vec()), Value::BulkString(v.to_vec())])
            .collect();
        Value::Array(vec![bulk(id), Value::Array(flat)])
    }

    #[test]
    fn entries_that_are_not_faithful_messages_carry_a_defect_and_spoil_no_other() {
        let reply = read_reply(vec![
            raw_entry("1-0", &[(b"p", b"1"), (b"h:\xffname", b"v")]),
            raw_entry("2-0", &[(b"p", b"2"), (b"h:name", b"\xc3\x28")]),
            raw_entry("3-0", &[(b"h:name", b"v")]),
            raw_entry("4-0", &[(b"p", b"4"), (b"k", b"\xff")]),
            raw_entry("5-0", &[(b"p", b"5"), (b"\xfe", b"foreign")]),
            raw_entry("6-0", &[(b"p", b"6"), (b"p", b"6")]),
            raw_entry("7-0", &[(b"p", b"7"), (b"h:name", b"v")]),
            // Same header bytes as 2-0, after a good entry: the cache keeps the defect.
            raw_entry("8-0", &[(b"p", b"8"), (b"h:name", b"\xc3\x28")]),
        ]);
        let entries = parse_read(reply).unwrap();
        let defects: Vec<Option<&str>> = entries.iter().map(|e| e.defect.as_deref()).collect();
        assert_eq!(
            defects,
            [
                Some("field name `h:\u{fffd}name` is not UTF-8"),
                Some("the value of field `h:name` is not UTF-8"),
                Some("the entry has no payload field `p`"),
                Some("field `k` (the key) is not UTF-8"),
                Some("field name `\u{fffd}` is not UTF-8"),
                Some("field `p` (the payload) appears twice"),
                None,
                Some("the value of field `h:name` is not UTF-8"),
            ]
        );
        let good = entries[6].message.as_ref().unwrap();
        assert_eq!(headers(good), vec![("name", "v")]);
        assert_eq!(&good.payload()[..], b"7");
    }

    #[test]
    fn read_reply_keeps_deleted_entries_as_none() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("s"),
            Value::Array(vec![
                Value::Array(vec![bulk("1-1"), Value::Nil]),
                Value::Array(vec![bulk("2-1"), Value::Array(vec![bulk("p"), bulk("x")])]),
            ]),
        ])]);
        let entries = parse_read(reply).unwrap();
        assert_eq!(entries.len(), 2);
        assert!(entries[0].message.is_none());
        assert_eq!(&entries[1].message.as_ref().unwrap().payload()[..], b"x");
        assert!(parse_read(Value::Nil).unwrap().is_empty());
    }

    #[test]
    fn autoclaim_reply_has_cursor_entries_and_deleted_ids() {
        let reply = Value::Array(vec![
            bulk("0-0"),
            Value::Array(vec![Value::Array(vec![
                bulk("2-1"),
                Value::Array(vec![bulk("p"), bulk("x")]),
            ])]),
            Value::Array(vec![bulk("1-1")]),
        ]);
        let claimed = parse_autoclaim(reply).unwrap();
        assert_eq!(claimed.cursor, EntryId { ms: 0, seq: 0 });
        assert_eq!(claimed.entries.len(), 1);
        assert_eq!(claimed.deleted, vec![EntryId { ms: 1, seq: 1 }]);
    }

    #[test]
    fn pending_count_comes_from_the_fourth_column() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("1-1"),
            bulk("c1"),
            Value::Int(10),
            Value::Int(3),
        ])]);
        assert_eq!(parse_pending_count(&reply), Some(3));
        assert_eq!(parse_pending_count(&Value::Array(vec![])), None);
    }
}
