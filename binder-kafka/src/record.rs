//! Turning a fetched Kafka record into a core [`Message`].

use std::sync::Arc;

use rdkafka::message::{BorrowedMessage, Headers as _, Message as _};
use stream_core::{DeliveryTag, Headers, Message, Received};

/// `message` as a delivery with `tag`, and roughly the memory it takes (payload, key and
/// headers), for bounding what the consumer buffers.
pub(crate) fn received(message: &BorrowedMessage<'_>, tag: DeliveryTag) -> (Received, usize) {
    let (partition, offset) = (message.partition(), message.offset());
    let payload = message.payload().unwrap_or_default();
    let mut size = payload.len();
    let mut headers = Headers::new();
    if let Some(native) = message.headers() {
        for header in native.iter() {
            let value = header.value.unwrap_or_default();
            size += header.key.len() + value.len();
            headers.append(header.key, String::from_utf8_lossy(value));
        }
    }
    let mut out = Message::new(payload.to_vec())
        .with_headers(headers)
        .with_id(delivery_id(partition, offset))
        // Never negative on a delivered message.
        .with_partition(partition as u32);
    if let Some(key) = message.key() {
        size += key.len();
        out = out.with_key(String::from_utf8_lossy(key));
    }
    // Kafka keeps no count of deliveries per message.
    (Received::new(out, tag, 1), size)
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
