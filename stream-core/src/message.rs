//! The broker-neutral message: payload bytes, ordered headers, an optional key and an id.

use std::sync::Arc;

use bytes::Bytes;

/// Header names the library itself sets. Binders carry them like any other header.
pub mod header {
    /// Media type of the payload, set by the codec on send and checked on receive.
    pub const CONTENT_TYPE: &str = "content-type";
    /// Dead-letter header: the destination the message was consumed from.
    pub const ORIGINAL_DESTINATION: &str = "x-original-destination";
    /// Dead-letter header: the consumer group that gave up on the message.
    pub const ORIGINAL_GROUP: &str = "x-original-group";
    /// Dead-letter header: the broker id of the message in its original destination.
    pub const ORIGINAL_ID: &str = "x-original-id";
    /// Dead-letter header: how many times the message was handed to a handler.
    pub const ATTEMPTS: &str = "x-attempts";
    /// Dead-letter header: the last error's message (its `Display`), at most 2 KiB.
    pub const ERROR: &str = "x-error";
    /// Dead-letter header: the last error's message followed by that of each error in its
    /// [`source`](std::error::Error::source) chain, outermost first, one per line; at most
    /// 4 KiB.
    pub const ERROR_CHAIN: &str = "x-error-chain";
    /// Dead-letter header: why the message was dead-lettered: `decode` (the payload never
    /// reached a handler), `handler` (its attempts were used up) or `rejected` (the handler
    /// rejected it with [`HandlerError::reject`](crate::HandlerError::reject)).
    pub const ERROR_KIND: &str = "x-error-kind";
    /// Dead-letter header: when the first attempt failed, RFC 3339 in UTC.
    pub const FIRST_FAILURE: &str = "x-first-failure";
    /// Processor output header: the id of the message a
    /// [`processor`](crate::Streams::processor) consumed to produce this one.
    pub const INPUT_ID: &str = "x-input-id";
    /// The message's own id, set by its producer once and kept wherever the message goes:
    /// redeliveries, the dead-letter copy, a redrive. A [`Source`](crate::Source) sets a
    /// UUIDv7 on send unless the message has one (see
    /// [`Source::identified_by`](crate::Source::identified_by)); a
    /// [`processor`](crate::Streams::processor) gives its outputs ids made from its input's,
    /// so the outputs of an input processed twice have the same ids. Unlike the broker's
    /// [`Message::id`](crate::Message::id), it is the same on every binder and across a
    /// redrive.
    pub const MESSAGE_ID: &str = "x-message-id";
    /// When the message was sent, in milliseconds since the Unix epoch, set by every
    /// [`Source`](crate::Source) send; consumers measure end-to-end latency from it.
    pub const SENT_AT: &str = "x-sent-at";
}

/// Ordered message headers. Names may repeat; lookups return the first match.
///
/// Cloning is cheap: clones share storage until one of them is changed, and names and values
/// are shared strings, so changing a clone copies pointers, not text.
#[derive(Debug, Clone, Default)]
// `None` until the first header: most received messages carry few headers or none, and an
// empty set should not cost an allocation per message.
pub struct Headers(Option<Arc<Vec<Entry>>>);

/// One header: a name and its value.
type Entry = (Arc<str>, Arc<str>);

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Headers::default()
    }

    /// The entries, for changing, with room for `extra` more: a shared set is copied into a
    /// vector of that size at once, rather than copied and then grown.
    fn entries(&mut self, extra: usize) -> &mut Vec<Entry> {
        let shared = self.0.get_or_insert_with(Default::default);
        if Arc::get_mut(shared).is_none() {
            let mut copy = Vec::with_capacity(shared.len() + extra);
            copy.extend(shared.iter().cloned());
            *shared = Arc::new(copy);
        }
        Arc::get_mut(shared).expect("just made unique")
    }

    fn as_slice(&self) -> &[Entry] {
        self.0.as_deref().map_or(&[], Vec::as_slice)
    }

    /// The first value under `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.as_slice()
            .iter()
            .find(|(n, _)| &**n == name)
            .map(|(_, v)| &**v)
    }

    /// Appends a header, keeping any earlier one with the same name.
    pub fn append(&mut self, name: impl Into<Arc<str>>, value: impl Into<Arc<str>>) {
        self.entries(1).push((name.into(), value.into()));
    }

    /// Sets `name` to `value`, replacing every earlier value under that name.
    pub fn insert(&mut self, name: impl Into<Arc<str>>, value: impl Into<Arc<str>>) {
        let name = name.into();
        let entries = self.entries(1);
        entries.retain(|(n, _)| *n != name);
        entries.push((name, value.into()));
    }

    /// Makes room for `extra` more headers, so adding them does not grow the set one by one.
    pub fn reserve(&mut self, extra: usize) {
        self.entries(extra).reserve(extra);
    }

    /// Removes every value under `name`.
    pub fn remove(&mut self, name: &str) {
        if self.get(name).is_some() {
            self.entries(0).retain(|(n, _)| &**n != name);
        }
    }

    /// Iterates in insertion order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &str)> {
        self.as_slice().iter().map(|(n, v)| (&**n, &**v))
    }

    /// Number of headers.
    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }
}

impl PartialEq for Headers {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for Headers {}

impl<N: Into<Arc<str>>, V: Into<Arc<str>>> FromIterator<(N, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (N, V)>>(iter: I) -> Self {
        let entries: Vec<Entry> = iter
            .into_iter()
            .map(|(n, v)| (n.into(), v.into()))
            .collect();
        Headers((!entries.is_empty()).then(|| Arc::new(entries)))
    }
}

/// For binders: builds the headers of received messages one after another, sharing text with
/// the previous message's headers where it is equal.
///
/// Consecutive messages of one producer mostly carry the same header names, and many the
/// same values (content type, trace flags): a consumer that made new strings for each would
/// allocate several times per message for text it already holds. Only the names and values
/// that differ from the previous message at the same position are allocated, and a message
/// whose headers are all equal to the previous one's shares its whole set.
///
/// ```
/// use stream_core::HeaderReuse;
///
/// let mut reuse = HeaderReuse::default();
/// let first = reuse.build([("content-type", "application/json"), ("x-message-id", "a")]);
/// let second = reuse.build([("content-type", "application/json"), ("x-message-id", "b")]);
/// assert_eq!(second.get("x-message-id"), Some("b"));
/// assert_eq!(first.get("content-type"), second.get("content-type"));
/// ```
#[derive(Debug, Default)]
pub struct HeaderReuse {
    last: Headers,
}

impl HeaderReuse {
    /// The headers `(name, value)`, in order, sharing what equals the previous message's.
    pub fn build<N: AsRef<str>, V: AsRef<str>>(
        &mut self,
        headers: impl IntoIterator<Item = (N, V)>,
    ) -> Headers {
        let last = self.last.as_slice();
        // Stays None while every header so far equals the previous message's at its place.
        let mut changed: Option<Vec<Entry>> = None;
        let mut count = 0;
        for (index, (name, value)) in headers.into_iter().enumerate() {
            let (name, value) = (name.as_ref(), value.as_ref());
            count = index + 1;
            let before = last.get(index);
            if changed.is_none() && before.is_some_and(|(n, v)| **n == *name && **v == *value) {
                continue;
            }
            let entries = changed.get_or_insert_with(|| {
                let mut entries = Vec::with_capacity(last.len().max(index + 1));
                entries.extend_from_slice(&last[..index]);
                entries
            });
            let name = match before {
                Some((n, _)) if **n == *name => n.clone(),
                _ => Arc::from(name),
            };
            let value = match before {
                Some((_, v)) if **v == *value => v.clone(),
                _ => Arc::from(value),
            };
            entries.push((name, value));
        }
        let headers = match changed {
            None if count == last.len() => return self.last.clone(),
            None => Headers((count > 0).then(|| Arc::new(last[..count].to_vec()))),
            Some(entries) => Headers(Some(Arc::new(entries))),
        };
        self.last = headers.clone();
        headers
    }
}

/// A message as it travels through a binder.
///
/// Keys decide ordering: messages with the same key are handled in publish order within a
/// consumer group. Binders carry keys and header values as UTF-8 text.
///
/// ```
/// use stream_core::Message;
///
/// let msg = Message::new(&b"{\"id\":7}"[..])
///     .with_key("order-7")
///     .with_header("trace-id", "abc");
/// assert_eq!(msg.key(), Some("order-7"));
/// assert_eq!(msg.headers().get("trace-id"), Some("abc"));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    id: Arc<str>,
    key: Option<String>,
    headers: Headers,
    payload: Bytes,
    partition: Option<u32>,
}

impl Message {
    /// A message with `payload`, no key, no headers.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Message {
            payload: payload.into(),
            ..Message::default()
        }
    }

    /// Sets the key.
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Appends a header.
    pub fn with_header(mut self, name: impl Into<Arc<str>>, value: impl Into<Arc<str>>) -> Self {
        self.headers.append(name, value);
        self
    }

    /// Sets the broker id; binders call this on received messages.
    pub fn with_id(mut self, id: impl Into<Arc<str>>) -> Self {
        self.id = id.into();
        self
    }

    /// Sets the partition: on a message to send, where a binder with partitions of its own
    /// (Kafka) puts it; on a received message, where it came from. A partitioned binding sets
    /// it from the key (see [`partition_for`](crate::partition_for)).
    pub fn with_partition(mut self, partition: u32) -> Self {
        self.partition = Some(partition);
        self
    }

    /// Replaces all headers.
    pub fn with_headers(mut self, headers: Headers) -> Self {
        self.headers = headers;
        self
    }

    /// The producer-assigned id ([`header::MESSAGE_ID`]), where the message has one.
    pub fn message_id(&self) -> Option<&str> {
        self.headers.get(header::MESSAGE_ID)
    }

    /// The id the broker gave the message (a Redis entry id, `partition@offset` on Kafka, an
    /// offset in memory); empty before it was sent.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The key, if any.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// The partition the message goes to or came from, where the destination has partitions.
    pub fn partition(&self) -> Option<u32> {
        self.partition
    }

    /// The headers.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// The headers, to change them.
    pub fn headers_mut(&mut self) -> &mut Headers {
        &mut self.headers
    }

    /// The payload.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// Splits the message into its parts: `(id, key, headers, payload)`.
    pub fn into_parts(self) -> (String, Option<String>, Headers, Bytes) {
        (self.id.to_string(), self.key, self.headers, self.payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_reuse_shares_equal_text_and_keeps_every_difference() {
        fn entries(headers: &Headers) -> &[Entry] {
            headers.as_slice()
        }
        let mut reuse = HeaderReuse::default();
        let first = reuse.build([("a", "1"), ("b", "2"), ("c", "3")]);
        // All equal: the very same set.
        let same = reuse.build([("a", "1"), ("b", "2"), ("c", "3")]);
        assert!(Arc::ptr_eq(
            first.0.as_ref().unwrap(),
            same.0.as_ref().unwrap()
        ));
        // One value differs: the others' text is shared, the new value is new.
        let next = reuse.build([("a", "1"), ("b", "9"), ("c", "3")]);
        assert_eq!(
            next.iter().collect::<Vec<_>>(),
            [("a", "1"), ("b", "9"), ("c", "3")]
        );
        assert!(Arc::ptr_eq(&entries(&first)[0].1, &entries(&next)[0].1));
        assert!(Arc::ptr_eq(&entries(&first)[1].0, &entries(&next)[1].0));
        assert!(Arc::ptr_eq(&entries(&first)[2].1, &entries(&next)[2].1));
        // Fewer, more, other names, none: each exactly as given.
        let fewer = reuse.build([("a", "1")]);
        assert_eq!(fewer.iter().collect::<Vec<_>>(), [("a", "1")]);
        let more = reuse.build([("a", "1"), ("x", "7"), ("y", "8")]);
        assert_eq!(
            more.iter().collect::<Vec<_>>(),
            [("a", "1"), ("x", "7"), ("y", "8")]
        );
        let none = reuse.build(std::iter::empty::<(&str, &str)>());
        assert!(none.is_empty() && none.0.is_none());
        let again = reuse.build([("a", "1")]);
        assert_eq!(again.iter().collect::<Vec<_>>(), [("a", "1")]);
    }

    #[test]
    fn insert_replaces_append_keeps() {
        let mut h = Headers::new();
        h.append("a", "1");
        h.append("a", "2");
        assert_eq!(h.get("a"), Some("1"));
        assert_eq!(h.len(), 2);
        h.insert("a", "3");
        assert_eq!(h.iter().collect::<Vec<_>>(), vec![("a", "3")]);
        h.remove("a");
        assert!(h.is_empty());
    }
}

/// A new message id as a [`Source`](crate::Source) sets them ([`header::MESSAGE_ID`]): a
/// UUIDv7, whose leading milliseconds make ids sort by creation time. For producers that
/// write messages by other ways (an outbox) and want the same kind of id.
pub fn new_message_id() -> String {
    message_uuid().to_string()
}

/// A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then 74 bits that are unique within
/// the process (a counter, spread by an odd multiplier, mixed with a per-process random
/// seed), so that ids of different processes do not collide either.
///
/// Made by hand rather than with `Uuid::now_v7`, which asks the operating system for random
/// bytes on every call: a system call per message cost the in-memory binder a third of
/// its throughput.
pub(crate) fn message_uuid() -> uuid::Uuid {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::LazyLock;
    static SEED: LazyLock<u64> = LazyLock::new(|| {
        use std::hash::{BuildHasher, Hasher};
        // RandomState's keys come from the operating system's random source, once.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        hasher.finish()
    });
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    // A bijection of the counter (distinct within the process for 2^64 ids), and ten more
    // bits of the seed: the 74 bits a UUIDv7 leaves after its time, version and variant.
    let unique = (*SEED ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let r = (u128::from(*SEED >> 54) << 64) | u128::from(unique);
    let mut bytes = [0u8; 16];
    bytes[..6].copy_from_slice(&millis.to_be_bytes()[2..]);
    bytes[6] = 0x70 | (r >> 70) as u8 & 0x0f; // version 7
    bytes[7] = (r >> 62) as u8;
    bytes[8] = 0x80 | (r >> 56) as u8 & 0x3f; // variant 10
    bytes[9..].copy_from_slice(&r.to_be_bytes()[9..]);
    uuid::Uuid::from_bytes(bytes)
}

#[cfg(test)]
mod message_id_tests {
    use super::*;

    #[test]
    fn ids_are_version_7_distinct_and_ordered_by_millisecond() {
        let ids: Vec<uuid::Uuid> = (0..100_000).map(|_| message_uuid()).collect();
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
        for id in &ids {
            assert_eq!(id.get_version_num(), 7);
            assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
        }
        let millis = |id: &uuid::Uuid| {
            u64::from_be_bytes({
                let mut b = [0u8; 8];
                b[2..].copy_from_slice(&id.as_bytes()[..6]);
                b
            })
        };
        assert!(ids.windows(2).all(|w| millis(&w[0]) <= millis(&w[1])));
    }
}
