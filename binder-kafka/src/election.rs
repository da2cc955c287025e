//! Partition leader and group coordinator elections, which make requests fail for a moment:
//! right after a topic is created, on a broker that just started (its group coordinator is
//! still loading), or while a broker of a cluster restarts.

use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::types::RDKafkaErrorCode;

/// How long to wait before asking a partition without a leader again.
const PAUSE: Duration = Duration::from_millis(50);

/// Whether an error says a partition's leader or a group coordinator is being elected,
/// moved or loaded, which goes away by itself.
pub(crate) fn leader_moving(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::NotLeaderForPartition
                | RDKafkaErrorCode::LeaderNotAvailable
                | RDKafkaErrorCode::CoordinatorLoadInProgress
                | RDKafkaErrorCode::CoordinatorNotAvailable
        )
    )
}

/// Calls `request` (given the time left) until it gets an answer other than a leader
/// election, or `deadline` passes. Blocking: call it from a blocking thread, where the short
/// pauses hold up nothing else.
pub(crate) fn through_election<T>(
    deadline: Instant,
    mut request: impl FnMut(Duration) -> KafkaResult<T>,
) -> KafkaResult<T> {
    loop {
        // librdkafka takes a zero timeout as "do not wait at all".
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        match request(left) {
            Err(e) if leader_moving(&e) && Instant::now() + PAUSE < deadline => {
                std::thread::sleep(PAUSE);
            }
            answer => return answer,
        }
    }
}
