//! Turning a fetched Kafka record into a core [`Message`], whatever bytes the broker holds.
//!
//! Core's keys, header names and header values are text. A key or a header value that is not
//! UTF-8 (a Java producer's serialized long, Avro) is converted lossily, invalid sequences
//! becoming U+FFFD: equal bytes still give equal strings, so per-key order holds (two keys
//! that differ only in invalid bytes are merely ordered together). A header name that is not
//! UTF-8 cannot be read at all through rdkafka (see [`read_headers`]): such a record is
//! delivered with a defect, so core dead-letters it as undecodable with its other headers,
//! and the consumer goes on with the next record.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use bytes::BytesMut;
use rdkafka::message::{BorrowedMessage, Headers as NativeHeaders, Message as _};
use stream_core::{DeliveryTag, HeaderReuse, Headers, Message, Received};

/// Where the records of one fetch are copied out of librdkafka.
#[derive(Default)]
pub(crate) struct Copies {
    /// The payloads of the fetch, one after another in one allocation that the messages
    /// share (each a slice of it), rather than an allocation per message. The memory goes
    /// when the last message of the fetch is dropped.
    pub(crate) payloads: BytesMut,
    /// Shares header text between consecutive records.
    pub(crate) headers: HeaderReuse,
}

impl Copies {
    /// Room for `bytes` more payload bytes in one allocation.
    pub(crate) fn reserve(&mut self, bytes: usize) {
        self.payloads.reserve(bytes);
    }
}

/// `message` as a delivery with `tag`, and roughly the memory it takes (payload, key and
/// headers), for bounding what the consumer buffers.
pub(crate) fn received(
    message: &BorrowedMessage<'_>,
    tag: DeliveryTag,
    copies: &mut Copies,
) -> (Received, usize) {
    let (partition, offset) = (message.partition(), message.offset());
    let (out, defect, size) = converted(message, copies);
    // Kafka keeps no count of deliveries per message (see the crate docs on attempts).
    let received = Received::new(out, tag, 1);
    let received = match defect {
        Some(defect) => received.with_defect(format!(
            "Kafka record {partition}@{offset} cannot be delivered as it is: {defect}"
        )),
        None => received,
    };
    (received, size)
}

/// `message` as a core [`Message`] (payload, headers, lossy key, id `partition@offset`,
/// partition), the defect that keeps it from being handled as it is (a header name that is
/// not UTF-8), and roughly the memory it takes. Shared by consumers and by the operators'
/// reads ([`crate::inspect`]), so that both see a record as the same message.
pub(crate) fn converted(
    message: &BorrowedMessage<'_>,
    copies: &mut Copies,
) -> (Message, Option<String>, usize) {
    let (partition, offset) = (message.partition(), message.offset());
    let payload = message.payload().unwrap_or_default();
    let mut size = payload.len();
    let (headers, defect) = match message.headers() {
        Some(native) => read_headers(native, &mut size, &mut copies.headers),
        None => (Headers::new(), None),
    };
    copies.payloads.extend_from_slice(payload);
    let mut out = Message::new(copies.payloads.split().freeze())
        .with_headers(headers)
        .with_id(delivery_id(partition, offset))
        // Never negative on a fetched message.
        .with_partition(partition as u32);
    if let Some(key) = message.key() {
        size += key.len();
        out = out.with_key(String::from_utf8_lossy(key));
    }
    (out, defect, size)
}

/// The headers of a record as text, adding their bytes to `size`, and a defect when a header
/// name is not UTF-8. Header values that are not UTF-8 are converted lossily; a null value is
/// an empty string.
///
/// rdkafka 0.38 turns each header name into `&str` with `CStr::to_str().unwrap()`
/// (`Headers::get`, `try_get` and the iterator alike), so a name that is not UTF-8, which
/// any producer may write and the broker stores as it is, panics inside rdkafka. Its safe API
/// has no other way to a header, and reading librdkafka's bytes directly takes unsafe code,
/// which this crate forbids. So each header is read on its own inside `catch_unwind`: the
/// panic of a bad name becomes a defect, and the headers before and after it are kept (the
/// dead letter carries them). This is not a general panic guard: it is there for that one
/// known panic of rdkafka on what the broker sends. Nothing is left half-done by it
/// (`AssertUnwindSafe`): `try_get` only reads.
///
/// The panic still goes through the process's panic hook (the default one prints it to
/// stderr). Built with `panic = "abort"`, nothing can be caught: such a record aborts the
/// process (see the README).
fn read_headers(
    native: &impl NativeHeaders,
    size: &mut usize,
    reuse: &mut HeaderReuse,
) -> (Headers, Option<String>) {
    let count = native.count();
    let mut unreadable = Vec::new();
    let readable = (0..count).map_while(|index| {
        match catch_unwind(AssertUnwindSafe(|| native.try_get(index))) {
            Ok(Some(header)) => {
                let value = header.value.unwrap_or_default();
                *size += header.key.len() + value.len();
                Some(Some((header.key, String::from_utf8_lossy(value))))
            }
            // Out of range: the list cannot change under a borrowed message, so never.
            Ok(None) => None,
            Err(_) => {
                unreadable.push(index.to_string());
                Some(None)
            }
        }
    });
    let headers = reuse.build(readable.flatten());
    let defect = match unreadable.as_slice() {
        [] => None,
        [index] => Some(format!(
            "a header name is not UTF-8 (the header at index {index} of {count})"
        )),
        indexes => Some(format!(
            "a header name is not UTF-8 (the headers at indexes {} of {count})",
            indexes.join(", ")
        )),
    };
    (headers, defect)
}

/// `partition@offset`, written without `format!`: this runs once per received message, and
/// the formatting machinery cost more than the rest of the id.
pub(crate) fn delivery_id(partition: i32, offset: i64) -> Arc<str> {
    Arc::from(delivery_id_in(&mut [0u8; 41], partition, offset))
}

/// [`delivery_id`] written into `out`.
pub(crate) fn delivery_id_in(out: &mut [u8; 41], partition: i32, offset: i64) -> &str {
    fn push_decimal(out: &mut [u8; 41], mut len: usize, value: i64) -> usize {
        let mut digits = [0u8; 20];
        let mut n = value.unsigned_abs();
        let mut count = 0;
        loop {
            digits[count] = b'0' + (n % 10) as u8;
            count += 1;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        if value < 0 {
            out[len] = b'-';
            len += 1;
        }
        for &digit in digits[..count].iter().rev() {
            out[len] = digit;
            len += 1;
        }
        len
    }
    let mut len = push_decimal(out, 0, i64::from(partition));
    out[len] = b'@';
    len = push_decimal(out, len + 1, offset);
    // Only ASCII digits, '-' and '@' were written.
    std::str::from_utf8(&out[..len]).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_that_are_not_utf8_are_converted_lossily() {
        use rdkafka::message::{Header, OwnedHeaders};
        let native = OwnedHeaders::new()
            .insert(Header {
                key: "trace",
                value: Some(&[0x80, b'-', 0xff][..]),
            })
            .insert(Header {
                key: "null",
                value: None::<&[u8]>,
            })
            .insert(Header {
                key: "trace",
                value: Some("second"),
            });
        let mut size = 0;
        let (headers, defect) = read_headers(&native, &mut size, &mut HeaderReuse::default());
        assert_eq!(defect, None);
        let got: Vec<(&str, &str)> = headers.iter().collect();
        assert_eq!(
            got,
            [
                ("trace", "\u{fffd}-\u{fffd}"),
                ("null", ""),
                ("trace", "second")
            ]
        );
        assert_eq!(size, 5 + 3 + 4 + 5 + 6);
    }

    #[test]
    fn delivery_ids_are_partition_at_offset() {
        for (partition, offset) in [(0, 0), (3, 1_234_567), (i32::MAX, i64::MAX), (-1, i64::MIN)] {
            assert_eq!(
                &*delivery_id(partition, offset),
                format!("{partition}@{offset}")
            );
        }
    }
}
