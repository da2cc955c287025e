//! Which offset of each partition may be committed when acknowledgements arrive out of order.
//!
//! Kafka keeps one committed offset per partition and group: everything below it counts as
//! done. With `concurrency > 1` core acknowledges messages of one partition out of order, so
//! the committed offset may only move to the first delivered message that is still
//! un-acknowledged. Committing any further would lose that message if this member died.

use std::collections::{HashMap, VecDeque};

/// Delivered and acknowledged offsets of the partitions this consumer owns.
#[derive(Debug, Default)]
pub(crate) struct OffsetTracker {
    partitions: HashMap<i32, Partition>,
}

#[derive(Debug, Default)]
struct Partition {
    /// Delivered offsets not yet covered by `position`, ascending, and whether each was
    /// acknowledged. Kafka offsets have holes (transaction markers, compaction), so the
    /// delivered ones are listed rather than assumed to be consecutive. A deque, because
    /// offsets arrive in order (appended) and leave in order (popped), once per message.
    outstanding: VecDeque<(i64, bool)>,
    /// The offset to commit: every delivered offset below it is acknowledged. None until the
    /// first acknowledgement moves it.
    position: Option<i64>,
}

impl Partition {
    /// Where `offset` sits in `outstanding`. Offsets are mostly consecutive, so the guess from
    /// the first one usually hits; holes fall back to a binary search.
    fn find(&self, offset: i64) -> Option<usize> {
        let &(first, _) = self.outstanding.front()?;
        let guess = usize::try_from(offset.checked_sub(first)?).ok()?;
        if self
            .outstanding
            .get(guess)
            .is_some_and(|&(o, _)| o == offset)
        {
            return Some(guess);
        }
        self.outstanding
            .binary_search_by_key(&offset, |&(o, _)| o)
            .ok()
    }
}

impl OffsetTracker {
    pub(crate) fn new() -> Self {
        OffsetTracker::default()
    }

    /// Starts tracking `partition`, newly assigned; earlier state is forgotten because the
    /// broker's committed offset is where this assignment starts.
    pub(crate) fn assign(&mut self, partition: i32) {
        self.partitions.insert(partition, Partition::default());
    }

    /// Stops tracking `partition` and returns the offset to commit for it, if acknowledgements
    /// moved it. Acknowledgements of its deliveries that arrive later are ignored: the next
    /// owner resumes from the committed offset and delivers them again.
    pub(crate) fn revoke(&mut self, partition: i32) -> Option<i64> {
        self.partitions.remove(&partition).and_then(|p| p.position)
    }

    /// Records that `offset` of `partition` was handed to core.
    pub(crate) fn delivered(&mut self, partition: i32, offset: i64) {
        let state = self.partitions.entry(partition).or_default();
        // After a seek back (an offset reset), an offset below the position was acknowledged
        // already; tracking it again would hold the position back for nothing.
        if state.position.is_some_and(|position| offset < position) {
            return;
        }
        match state.outstanding.back() {
            Some(&(last, _)) if offset <= last => {
                // Delivered again after a seek back: keep the list sorted and single.
                if let Err(at) = state.outstanding.binary_search_by_key(&offset, |&(o, _)| o) {
                    state.outstanding.insert(at, (offset, false));
                }
            }
            _ => state.outstanding.push_back((offset, false)),
        }
    }

    /// Records acknowledgements and returns, for each partition whose commit position moved,
    /// the new position (offset of the next message to read), sorted by partition.
    pub(crate) fn acked(&mut self, acks: impl IntoIterator<Item = (i32, i64)>) -> Vec<(i32, i64)> {
        let mut touched = Vec::new();
        // Acks come in runs of one partition: look the partition up once per run.
        let mut current: Option<(i32, &mut Partition)> = None;
        for (partition, offset) in acks {
            if current.as_ref().is_none_or(|(p, _)| *p != partition) {
                current = self.partitions.get_mut(&partition).map(|s| (partition, s));
            }
            let Some((_, state)) = current.as_mut() else {
                // Revoked since delivery: no longer ours to commit.
                continue;
            };
            if let Some(at) = state.find(offset) {
                state.outstanding[at].1 = true;
                if !touched.contains(&partition) {
                    touched.push(partition);
                }
            }
        }
        touched.sort_unstable();
        touched
            .into_iter()
            .filter_map(|partition| {
                let state = self.partitions.get_mut(&partition)?;
                let mut moved = None;
                while let Some(&(offset, true)) = state.outstanding.front() {
                    moved = Some(offset + 1);
                    state.outstanding.pop_front();
                }
                let position = moved?;
                state.position = Some(position);
                Some((partition, position))
            })
            .collect()
    }

    /// The commit position of every tracked partition that has one.
    pub(crate) fn positions(&self) -> Vec<(i32, i64)> {
        let mut positions: Vec<(i32, i64)> = self
            .partitions
            .iter()
            .filter_map(|(partition, state)| state.position.map(|p| (*partition, p)))
            .collect();
        positions.sort_unstable();
        positions
    }

    /// Deliveries handed out and not yet acknowledged, over all partitions.
    #[cfg(test)]
    pub(crate) fn unacked(&self) -> usize {
        self.partitions
            .values()
            .map(|p| p.outstanding.iter().filter(|(_, acked)| !acked).count())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker_with(partition: i32, offsets: impl IntoIterator<Item = i64>) -> OffsetTracker {
        let mut t = OffsetTracker::new();
        t.assign(partition);
        for offset in offsets {
            t.delivered(partition, offset);
        }
        t
    }

    #[test]
    fn in_order_acks_move_the_position_one_past_the_last() {
        let mut t = tracker_with(0, 10..13);
        assert_eq!(t.acked([(0, 10)]), vec![(0, 11)]);
        assert_eq!(t.acked([(0, 11), (0, 12)]), vec![(0, 13)]);
        assert_eq!(t.positions(), vec![(0, 13)]);
        assert_eq!(t.unacked(), 0);
    }

    #[test]
    fn out_of_order_acks_never_pass_a_gap() {
        let mut t = tracker_with(0, 0..6);
        // 0, 1 done; 2 still running; 3, 4, 5 done out of order.
        assert_eq!(
            t.acked([(0, 4), (0, 1), (0, 0), (0, 5), (0, 3)]),
            vec![(0, 2)]
        );
        assert_eq!(t.positions(), vec![(0, 2)]);
        assert_eq!(t.unacked(), 1);
        // Acking again what is already counted does not move anything.
        assert_eq!(t.acked([(0, 3)]), vec![]);
        // The gap closes: the position jumps past everything acknowledged behind it.
        assert_eq!(t.acked([(0, 2)]), vec![(0, 6)]);
    }

    #[test]
    fn nothing_acked_means_nothing_to_commit() {
        let mut t = tracker_with(0, 0..3);
        assert_eq!(t.acked([(0, 1), (0, 2)]), vec![]);
        assert_eq!(t.positions(), vec![]);
        assert_eq!(t.revoke(0), None);
    }

    #[test]
    fn holes_in_offsets_are_skipped() {
        // Offsets 3 and 4 do not exist (a transaction marker, a compacted record).
        let mut t = tracker_with(0, [1, 2, 5, 6]);
        assert_eq!(t.acked([(0, 5), (0, 1), (0, 2)]), vec![(0, 6)]);
        assert_eq!(t.acked([(0, 6)]), vec![(0, 7)]);
    }

    #[test]
    fn partitions_are_independent() {
        let mut t = OffsetTracker::new();
        t.assign(0);
        t.assign(1);
        for offset in 0..3 {
            t.delivered(0, offset);
            t.delivered(1, offset);
        }
        assert_eq!(t.acked([(1, 0), (0, 1), (1, 1)]), vec![(1, 2)]);
        assert_eq!(t.acked([(0, 0)]), vec![(0, 2)]);
        assert_eq!(t.positions(), vec![(0, 2), (1, 2)]);
    }

    #[test]
    fn revoke_returns_the_position_and_ignores_later_acks() {
        let mut t = tracker_with(3, 100..105);
        t.acked([(3, 100), (3, 101), (3, 103)]);
        assert_eq!(t.revoke(3), Some(102));
        // The in-flight deliveries finish after the revoke: not ours to commit any more.
        assert_eq!(t.acked([(3, 102), (3, 104)]), vec![]);
        assert_eq!(t.positions(), vec![]);
        assert_eq!(t.revoke(3), None);
    }

    #[test]
    fn reassignment_starts_fresh() {
        let mut t = tracker_with(0, 0..4);
        t.acked([(0, 0)]);
        assert_eq!(t.revoke(0), Some(1));
        t.assign(0);
        // The new owner (us again) resumes at the committed offset 1.
        for offset in 1..4 {
            t.delivered(0, offset);
        }
        assert_eq!(t.acked([(0, 2), (0, 1)]), vec![(0, 3)]);
    }

    #[test]
    fn redelivery_below_the_position_is_not_tracked() {
        let mut t = tracker_with(0, 0..3);
        assert_eq!(t.acked([(0, 0), (0, 1), (0, 2)]), vec![(0, 3)]);
        // An offset reset hands 1 out again; it must not hold the position back.
        t.delivered(0, 1);
        t.delivered(0, 3);
        assert_eq!(t.unacked(), 1);
        assert_eq!(t.acked([(0, 3)]), vec![(0, 4)]);
    }

    #[test]
    fn duplicate_delivery_of_an_outstanding_offset_keeps_its_ack() {
        let mut t = tracker_with(0, 0..2);
        assert_eq!(t.acked([(0, 1)]), vec![]);
        t.delivered(0, 1);
        assert_eq!(t.acked([(0, 0)]), vec![(0, 2)]);
    }

    #[test]
    fn acks_for_unknown_offsets_are_ignored() {
        let mut t = tracker_with(0, 0..2);
        assert_eq!(t.acked([(0, 7), (9, 0)]), vec![]);
        assert_eq!(t.unacked(), 2);
    }
}
