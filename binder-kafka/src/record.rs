//! Turning a fetched Kafka record into a core [`Message`], whatever bytes the broker holds.
//!
//! Core's keys, header names and header values are text. A record whose key or headers are
//! not UTF-8 cannot be given to a handler as it is; it is delivered with a defect instead, so
//! core dead-letters it as undecodable (with lossy copies of what was not text) and nothing
//! panics or stops on it.

use std::sync::Arc;

use rdkafka::message::{BorrowedMessage, Message as _};
use stream_core::{DeliveryTag, Headers, Message, Received};

/// `message` as a delivery with `tag`, and roughly the memory it takes (payload, key and
/// headers), for bounding what the consumer buffers.
pub(crate) fn received(message: &BorrowedMessage<'_>, tag: DeliveryTag) -> (Received, usize) {
    let (partition, offset) = (message.partition(), message.offset());
    let payload = message.payload().unwrap_or_default();
    let mut size = payload.len();
    let mut defect: Option<String> = None;
    let mut headers = Headers::new();
    native::for_each_header(message, |name, value| {
        let value = value.unwrap_or_default();
        size += name.len() + value.len();
        let name = match std::str::from_utf8(name) {
            Ok(name) => name.to_owned(),
            Err(_) => {
                let lossy = String::from_utf8_lossy(name).into_owned();
                defect.get_or_insert_with(|| format!("header name {lossy:?} is not UTF-8"));
                lossy
            }
        };
        let value = match std::str::from_utf8(value) {
            Ok(value) => value.to_owned(),
            Err(_) => {
                defect.get_or_insert_with(|| format!("the value of header {name:?} is not UTF-8"));
                String::from_utf8_lossy(value).into_owned()
            }
        };
        headers.append(name, value);
    });
    let mut out = Message::new(payload.to_vec())
        .with_headers(headers)
        .with_id(delivery_id(partition, offset))
        // Never negative on a delivered message.
        .with_partition(partition as u32);
    if let Some(key) = message.key() {
        size += key.len();
        out = out.with_key(match std::str::from_utf8(key) {
            Ok(key) => key.to_owned(),
            Err(_) => {
                defect.get_or_insert_with(|| "the key is not UTF-8".to_owned());
                String::from_utf8_lossy(key).into_owned()
            }
        });
    }
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

/// `partition@offset`, written without `format!`: this runs once per received message, and
/// the formatting machinery cost more than the rest of the id.
pub(crate) fn delivery_id(partition: i32, offset: i64) -> Arc<str> {
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
    let mut out = [0u8; 41];
    let mut len = push_decimal(&mut out, 0, i64::from(partition));
    out[len] = b'@';
    len = push_decimal(&mut out, len + 1, offset);
    // Only ASCII digits, '-' and '@' were written.
    Arc::from(std::str::from_utf8(&out[..len]).unwrap_or_default())
}

/// Header access through librdkafka's C API. rdkafka's own (`Headers::get`, `try_get`, the
/// iterator) turns each name into `&str` with an `unwrap`, which panics on a name that is
/// not UTF-8, so a single such record from any producer would stop a consumer for good.
#[allow(unsafe_code)]
mod native {
    use std::ffi::{c_char, c_void, CStr};

    use rdkafka::message::{BorrowedMessage, Headers as _, Message as _};
    use rdkafka_sys as rdsys;

    /// Calls `visit` with each header's name and value bytes, in order.
    pub(super) fn for_each_header(
        message: &BorrowedMessage<'_>,
        mut visit: impl FnMut(&[u8], Option<&[u8]>),
    ) {
        let Some(headers) = message.headers() else {
            return;
        };
        // rdkafka's `BorrowedHeaders` is a view of librdkafka's `rd_kafka_headers_t` at the
        // same address.
        let native = std::ptr::from_ref(headers).cast::<rdsys::rd_kafka_headers_t>();
        for index in 0..headers.count() {
            let mut name: *const c_char = std::ptr::null();
            let mut value: *const c_void = std::ptr::null();
            let mut size: usize = 0;
            // SAFETY: `native` is the live header list of `message`, borrowed for this whole
            // function; the call only writes the three out-pointers, and fails for an index
            // out of range.
            let error = unsafe {
                rdsys::rd_kafka_header_get_all(native, index, &mut name, &mut value, &mut size)
            };
            if error != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
                return;
            }
            // SAFETY: librdkafka stores each header name NUL-terminated and each value as
            // `size` bytes (or a null pointer for a null value), owned by the header list,
            // which outlives these borrows.
            let (name, value) = unsafe {
                (
                    CStr::from_ptr(name).to_bytes(),
                    (!value.is_null())
                        .then(|| std::slice::from_raw_parts(value.cast::<u8>(), size)),
                )
            };
            visit(name, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
