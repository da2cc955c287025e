//! A tiny Kafka protocol client, in safe Rust, that writes one record whose key, header names
//! and header values are any bytes. rdkafka's producer takes header names as `&str` (and
//! Java's client encodes `String`s), so a header name that is not UTF-8, which the broker
//! stores as it is, can only be written by speaking the protocol.
//!
//! It speaks just enough of it: ApiVersions v0, to pick a Produce version, then one
//! ProduceRequest (v3 to v8, the versions without tagged fields) carrying one RecordBatch v2
//! (magic 2, uncompressed) of one record, sent to the first bootstrap address, which must lead
//! the partition (the single test broker leads every partition).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A record as bytes.
pub struct RawRecord<'a> {
    /// `None` writes a null key.
    pub key: Option<&'a [u8]>,
    /// Name and value of each header, in order.
    pub headers: &'a [(&'a [u8], &'a [u8])],
    pub value: &'a [u8],
}

const API_PRODUCE: i16 = 0;
const API_VERSIONS: i16 = 18;
/// Produce versions this client can write: v3 has the RecordBatch v2 format, v9 and later
/// are "flexible" (tagged fields, compact strings).
const PRODUCE_VERSIONS: std::ops::RangeInclusive<i16> = 3..=8;
/// Errors a partition answers while a new topic is still being set up on the broker.
const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
const LEADER_NOT_AVAILABLE: i16 = 5;
const NOT_LEADER_OR_FOLLOWER: i16 = 6;

/// Writes `record` to `partition` of `topic` with `acks=all` through the first address of
/// `brokers`, and returns its offset. Blocking. Panics (failing the test) unless the broker
/// answers error code 0, after retrying for up to 30 s while the topic is being set up.
pub fn produce(brokers: &str, topic: &str, partition: i32, record: &RawRecord<'_>) -> i64 {
    let address = brokers.split(',').next().unwrap().trim();
    let mut connection = Connection::open(address);
    let version = connection.produce_version();
    let batch = record_batch(record);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (error_code, base_offset) = connection.produce(version, topic, partition, &batch);
        let retriable = [
            UNKNOWN_TOPIC_OR_PARTITION,
            LEADER_NOT_AVAILABLE,
            NOT_LEADER_OR_FOLLOWER,
        ];
        if retriable.contains(&error_code) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        assert_eq!(
            error_code, 0,
            "the broker refused the raw record to {topic}-{partition} (Produce v{version})"
        );
        return base_offset;
    }
}

/// One connection to a broker, request after request.
struct Connection {
    stream: TcpStream,
    correlation_id: i32,
}

impl Connection {
    fn open(address: &str) -> Connection {
        let stream = TcpStream::connect(address).expect("connect to the broker");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream
            .set_write_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        Connection {
            stream,
            correlation_id: 0,
        }
    }

    /// Sends a request (header v1: not flexible) and returns the response after its header
    /// (v0: the correlation id).
    fn call(&mut self, api_key: i16, api_version: i16, body: &[u8]) -> Reader {
        self.correlation_id += 1;
        let mut request = Vec::new();
        put_i16(&mut request, api_key);
        put_i16(&mut request, api_version);
        put_i32(&mut request, self.correlation_id);
        put_string(&mut request, Some(b"stream-rs-raw-test"));
        request.extend_from_slice(body);
        let mut frame = Vec::new();
        put_bytes(&mut frame, &request);
        self.stream.write_all(&frame).expect("send a request");

        let mut size = [0; 4];
        self.stream.read_exact(&mut size).expect("read a response");
        let mut response = vec![0; i32::from_be_bytes(size) as usize];
        self.stream
            .read_exact(&mut response)
            .expect("read a response");
        let mut reader = Reader(response);
        assert_eq!(reader.i32(), self.correlation_id, "correlation id");
        reader
    }

    /// The highest Produce version both the broker and this client speak (ApiVersions v0).
    fn produce_version(&mut self) -> i16 {
        let mut response = self.call(API_VERSIONS, 0, &[]);
        assert_eq!(response.i16(), 0, "ApiVersions error code");
        for _ in 0..response.i32() {
            let (api_key, min_version, max_version) =
                (response.i16(), response.i16(), response.i16());
            if api_key == API_PRODUCE {
                let version = max_version.min(*PRODUCE_VERSIONS.end());
                assert!(
                    version >= min_version && PRODUCE_VERSIONS.contains(&version),
                    "the broker speaks Produce v{min_version} to v{max_version}, \
                     this client v3 to v8"
                );
                return version;
            }
        }
        panic!("the broker does not list Produce in its ApiVersions");
    }

    /// Sends one ProduceRequest with `batch` and returns the partition's error code and base
    /// offset.
    fn produce(&mut self, version: i16, topic: &str, partition: i32, batch: &[u8]) -> (i16, i64) {
        let mut body = Vec::new();
        put_string(&mut body, None); // transactional_id
        put_i16(&mut body, -1); // acks: all in-sync replicas
        put_i32(&mut body, 30_000); // timeout_ms
        put_i32(&mut body, 1); // topic_data: one topic
        put_string(&mut body, Some(topic.as_bytes())); // name
        put_i32(&mut body, 1); // partition_data: one partition
        put_i32(&mut body, partition); // index
        put_bytes(&mut body, batch); // records
        let mut response = self.call(API_PRODUCE, version, &body);
        assert_eq!(response.i32(), 1, "responses: one topic");
        assert_eq!(response.string(), topic.as_bytes(), "the topic's name");
        assert_eq!(response.i32(), 1, "partition_responses: one partition");
        assert_eq!(response.i32(), partition, "the partition's index");
        let error_code = response.i16();
        let base_offset = response.i64();
        // log_append_time_ms, log_start_offset, ... and throttle_time_ms follow: not needed.
        (error_code, base_offset)
    }
}

/// A RecordBatch v2 holding `record` alone, uncompressed, outside any transaction.
fn record_batch(record: &RawRecord<'_>) -> Vec<u8> {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;

    // The record: varint lengths, zigzag-encoded; -1 is null.
    let mut body = Vec::new();
    body.push(0); // attributes (unused)
    put_varint(&mut body, 0); // timestampDelta
    put_varint(&mut body, 0); // offsetDelta
    match record.key {
        Some(key) => put_varint_bytes(&mut body, key),
        None => put_varint(&mut body, -1),
    }
    put_varint_bytes(&mut body, record.value);
    put_varint(&mut body, record.headers.len() as i64); // headers count
    for (name, value) in record.headers {
        put_varint_bytes(&mut body, name); // headerKey
        put_varint_bytes(&mut body, value); // headerValue
    }
    let mut records = Vec::new();
    put_varint(&mut records, body.len() as i64); // length
    records.extend_from_slice(&body);

    // Everything the CRC covers: attributes to the end.
    let mut checked = Vec::new();
    put_i16(&mut checked, 0); // attributes: no compression, create time, not transactional
    put_i32(&mut checked, 0); // lastOffsetDelta
    put_i64(&mut checked, now_ms); // baseTimestamp
    put_i64(&mut checked, now_ms); // maxTimestamp
    put_i64(&mut checked, -1); // producerId: none (not idempotent)
    put_i16(&mut checked, -1); // producerEpoch
    put_i32(&mut checked, -1); // baseSequence
    put_i32(&mut checked, 1); // records count
    checked.extend_from_slice(&records);

    let mut batch = Vec::new();
    put_i64(&mut batch, 0); // baseOffset: the broker assigns offsets
    let batch_length = 4 + 1 + 4 + checked.len(); // partitionLeaderEpoch, magic, crc, the rest
    put_i32(&mut batch, batch_length as i32); // batchLength: the bytes after this field
    put_i32(&mut batch, -1); // partitionLeaderEpoch: set by the broker
    batch.push(2); // magic
    batch.extend_from_slice(&crc32c(&checked).to_be_bytes()); // crc
    batch.extend_from_slice(&checked);
    batch
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum of RecordBatch v2.
fn crc32c(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0; 256];
        let mut n = 0;
        while n < 256 {
            let mut crc = n as u32;
            let mut bit = 0;
            while bit < 8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0x82F6_3B78
                } else {
                    crc >> 1
                };
                bit += 1;
            }
            table[n] = crc;
            n += 1;
        }
        table
    };
    let mut crc = !0u32;
    for &byte in bytes {
        crc = TABLE[((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

fn put_i16(out: &mut Vec<u8>, value: i16) {
    out.extend_from_slice(&value.to_be_bytes());
}

fn put_i32(out: &mut Vec<u8>, value: i32) {
    out.extend_from_slice(&value.to_be_bytes());
}

fn put_i64(out: &mut Vec<u8>, value: i64) {
    out.extend_from_slice(&value.to_be_bytes());
}

/// STRING / NULLABLE_STRING: an i16 length (-1 for null), then the bytes.
fn put_string(out: &mut Vec<u8>, value: Option<&[u8]>) {
    match value {
        Some(bytes) => {
            put_i16(out, bytes.len() as i16);
            out.extend_from_slice(bytes);
        }
        None => put_i16(out, -1),
    }
}

/// BYTES (and a request's size prefix): an i32 length, then the bytes.
fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_i32(out, bytes.len() as i32);
    out.extend_from_slice(bytes);
}

/// A zigzag varint, as the fields of a record are written: 7 bits a byte, low bits first,
/// the top bit set on every byte but the last.
fn put_varint(out: &mut Vec<u8>, value: i64) {
    let mut zigzag = ((value << 1) ^ (value >> 63)) as u64;
    while zigzag >= 0x80 {
        out.push((zigzag as u8 & 0x7f) | 0x80);
        zigzag >>= 7;
    }
    out.push(zigzag as u8);
}

/// A varint length, then the bytes.
fn put_varint_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as i64);
    out.extend_from_slice(bytes);
}

/// Reads a response's big-endian fields in order.
struct Reader(Vec<u8>);

impl Reader {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        assert!(self.0.len() >= N, "the response is shorter than expected");
        let field: [u8; N] = self.0[..N].try_into().unwrap();
        self.0.drain(..N);
        field
    }

    fn i16(&mut self) -> i16 {
        i16::from_be_bytes(self.take())
    }

    fn i32(&mut self) -> i32 {
        i32::from_be_bytes(self.take())
    }

    fn i64(&mut self) -> i64 {
        i64::from_be_bytes(self.take())
    }

    fn string(&mut self) -> Vec<u8> {
        let len = self.i16().max(0) as usize;
        assert!(self.0.len() >= len, "the response is shorter than expected");
        self.0.drain(..len).collect()
    }
}

#[test]
fn crc32c_matches_the_standard_check_value() {
    assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    assert_eq!(crc32c(b""), 0);
}

#[test]
fn varints_are_zigzag_encoded() {
    for (value, encoded) in [
        (0, &[0x00][..]),
        (-1, &[0x01]),
        (1, &[0x02]),
        (-64, &[0x7f]),
        (64, &[0x80, 0x01]),
        (300, &[0xd8, 0x04]),
    ] {
        let mut out = Vec::new();
        put_varint(&mut out, value);
        assert_eq!(out, encoded, "{value}");
    }
}
