//! Partitioned destinations: which partition a message goes to, and the producer that puts it
//! there.
//!
//! A binder either has partitions of its own (a Kafka topic), and core tells it the partition
//! of each message, or it has none (Redis, memory), and core makes one destination per
//! partition, named by [`partition_destination`], with a producer and a consumer each.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use futures::future::try_join_all;

use crate::binder::{Binder, Producer};
use crate::{Message, Result};

/// The partition of `key` among `partitions`: the hash Kafka's Java client uses (murmur2 of
/// the key's UTF-8 bytes, sign bit cleared, modulo the count), so services in other languages
/// that publish to the same Kafka topic with the same keys agree with it.
///
/// ```
/// use stream_core::partition_for;
///
/// let p = partition_for("order-7", 6);
/// assert!(p < 6);
/// assert_eq!(p, partition_for("order-7", 6), "stable");
/// ```
///
/// # Panics
///
/// When `partitions` is 0.
pub fn partition_for(key: &str, partitions: u32) -> u32 {
    assert!(partitions > 0, "a destination has at least one partition");
    (murmur2(key.as_bytes()) & 0x7fff_ffff) % partitions
}

/// The destination that holds partition `partition` of `destination` on a binder without
/// partitions of its own: `orders:{3}`. The braces are a Redis Cluster hash tag, so a
/// partition's stream lives in one slot whatever the destination name holds.
pub fn partition_destination(destination: &str, partition: u32) -> String {
    format!("{destination}:{{{partition}}}")
}

/// MurmurHash2 as `org.apache.kafka.common.utils.Utils.murmur2`: seed `0x9747b28c`,
/// little-endian words, unsigned arithmetic.
fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    // Kafka hashes the length as a Java int; keys longer than that cannot be sent anyway.
    let mut h = SEED ^ (data.len() as u32);
    let mut words = data.chunks_exact(4);
    for word in &mut words {
        let mut k = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M) ^ k;
    }
    let tail = words.remainder();
    if !tail.is_empty() {
        for (i, &byte) in tail.iter().enumerate().rev() {
            h ^= u32::from(byte) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// A producer for a partitioned binding: picks each message's partition and hands it to the
/// binder's producer of that partition.
pub(crate) struct Partitioned {
    partitions: u32,
    route: Route,
    /// Round-robin position for messages without a key.
    next: AtomicU32,
}

enum Route {
    /// The binder partitions the destination itself: every message goes through one producer
    /// with its partition set.
    Native(Arc<dyn Producer>),
    /// One producer per partition destination, indexed by partition.
    Destinations(Vec<Arc<dyn Producer>>),
}

impl Partitioned {
    /// The producer of `partitions` partitions of `destination` on `binder`.
    pub(crate) async fn open(
        binder: &dyn Binder,
        destination: &str,
        partitions: u32,
    ) -> Result<Partitioned> {
        let route = if binder.prepare_partitions(destination, partitions).await? {
            Route::Native(binder.producer(destination).await?.into())
        } else {
            let producers = try_join_all((0..partitions).map(|p| async move {
                binder
                    .producer(&partition_destination(destination, p))
                    .await
            }))
            .await?;
            Route::Destinations(producers.into_iter().map(Arc::from).collect())
        };
        Ok(Partitioned {
            partitions,
            route,
            next: AtomicU32::new(0),
        })
    }

    fn partition_of(&self, message: &Message) -> u32 {
        match message.key() {
            Some(key) => partition_for(key, self.partitions),
            None => self.next.fetch_add(1, Ordering::Relaxed) % self.partitions,
        }
    }

    fn producers(&self) -> &[Arc<dyn Producer>] {
        match &self.route {
            Route::Native(producer) => std::slice::from_ref(producer),
            Route::Destinations(producers) => producers,
        }
    }
}

#[async_trait]
impl Producer for Partitioned {
    async fn send(&self, message: Message) -> Result<String> {
        let partition = self.partition_of(&message);
        match &self.route {
            Route::Native(producer) => producer.send(message.with_partition(partition)).await,
            Route::Destinations(producers) => producers[partition as usize].send(message).await,
        }
    }

    async fn send_batch(&self, messages: Vec<Message>) -> Result<Vec<String>> {
        match &self.route {
            Route::Native(producer) => {
                let messages = messages
                    .into_iter()
                    .map(|m| {
                        let partition = self.partition_of(&m);
                        m.with_partition(partition)
                    })
                    .collect();
                producer.send_batch(messages).await
            }
            Route::Destinations(producers) => {
                // Order matters only within a partition, so the partitions' batches go out
                // side by side, each in order.
                let mut batches: Vec<(Vec<usize>, Vec<Message>)> =
                    (0..producers.len()).map(|_| Default::default()).collect();
                let total = messages.len();
                for (index, message) in messages.into_iter().enumerate() {
                    let batch = &mut batches[self.partition_of(&message) as usize];
                    batch.0.push(index);
                    batch.1.push(message);
                }
                let sent = try_join_all(
                    batches
                        .into_iter()
                        .zip(producers)
                        .filter(|((_, batch), _)| !batch.is_empty())
                        .map(|((indexes, batch), producer)| async move {
                            Ok::<_, crate::Error>((indexes, producer.send_batch(batch).await?))
                        }),
                )
                .await?;
                let mut ids = vec![String::new(); total];
                for (indexes, batch_ids) in sent {
                    for (index, id) in indexes.into_iter().zip(batch_ids) {
                        ids[index] = id;
                    }
                }
                Ok(ids)
            }
        }
    }

    async fn flush(&self) -> Result<()> {
        try_join_all(self.producers().iter().map(|p| p.flush())).await?;
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        try_join_all(self.producers().iter().map(|p| p.close())).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The values of Kafka's own `UtilsTest.testMurmur2`.
    #[test]
    fn murmur2_matches_kafka() {
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
        ];
        for (data, expected) in cases {
            assert_eq!(
                murmur2(data) as i32,
                expected,
                "{}",
                String::from_utf8_lossy(data)
            );
        }
    }

    #[test]
    fn keys_spread_over_every_partition() {
        let mut seen = [0u32; 8];
        for i in 0..8_000 {
            seen[partition_for(&format!("key-{i}"), 8) as usize] += 1;
        }
        // A uniform hash puts about 1000 in each; 800 is far outside its spread.
        assert!(seen.iter().all(|&n| n > 800), "{seen:?}");
    }

    #[test]
    fn partition_destinations_carry_a_hash_tag() {
        assert_eq!(partition_destination("orders", 3), "orders:{3}");
    }
}
