//! What a member holds of each partition it owns: which deliveries started, which are
//! acknowledged, and which offset may be committed.
//!
//! Kafka keeps one committed offset per partition and group: everything below it counts as
//! done. With `concurrency > 1` core acknowledges messages of one partition out of order, so
//! the committed offset may only move to the first delivered message that is still
//! un-acknowledged. Committing any further would lose that message if this member died.
//!
//! Each assignment of a partition gets a new *epoch*, carried in the delivery tags of that
//! assignment: a delivery fetched before its partition was revoked is not taken for one of the
//! same offset fetched again after the partition came back.

use std::collections::{HashMap, VecDeque};

use stream_core::DeliveryTag;

/// A delivery's partition, assignment epoch and offset, packed into a [`DeliveryTag`]: the
/// partition in the low 32 bits of the first half, the epoch in the high ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Delivery {
    pub(crate) partition: i32,
    pub(crate) epoch: u32,
    pub(crate) offset: i64,
}

impl Delivery {
    pub(crate) fn tag(self) -> DeliveryTag {
        // Partitions and offsets of delivered messages are never negative.
        DeliveryTag(
            (u64::from(self.epoch) << 32) | u64::from(self.partition as u32),
            self.offset as u64,
        )
    }

    pub(crate) fn of(tag: DeliveryTag) -> Delivery {
        Delivery {
            partition: (tag.0 & u64::from(u32::MAX)) as i32,
            epoch: (tag.0 >> 32) as u32,
            offset: tag.1 as i64,
        }
    }
}

/// How far a delivery got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    /// Fetched; no handler has it.
    Fetched,
    /// A handler has it ([`OffsetTracker::start`] said so).
    Started,
    Acked,
}

/// The partitions a member owns and what it holds of each.
#[derive(Debug, Default)]
pub(crate) struct OffsetTracker {
    partitions: HashMap<i32, Partition>,
    next_epoch: u32,
}

#[derive(Debug, Default)]
struct Partition {
    epoch: u32,
    /// Being revoked: deliveries that have not started never will.
    revoking: bool,
    /// Delivered offsets not yet covered by `position`, ascending. Kafka offsets have holes
    /// (transaction markers, compaction), so the delivered ones are listed rather than
    /// assumed to be consecutive. A deque, because offsets arrive in order (appended) and
    /// leave in order (popped), once per message.
    outstanding: VecDeque<(i64, Progress)>,
    /// Deliveries of `outstanding` that started and are not acknowledged.
    started: usize,
    /// The offset to commit: every delivered offset below it is acknowledged. None until the
    /// first acknowledgement moves it.
    position: Option<i64>,
    /// The position last sent to the group coordinator.
    committed: Option<i64>,
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

    fn uncommitted(&self) -> Option<i64> {
        self.position.filter(|&p| self.committed != Some(p))
    }
}

/// What a batch of acknowledgements changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Acked {
    /// Partitions whose commit position moved, with the new position, sorted by partition.
    pub(crate) moved: Vec<(i32, i64)>,
    /// Whether a started delivery of a partition being revoked was among them.
    pub(crate) revoking_progress: bool,
}

impl OffsetTracker {
    pub(crate) fn new() -> Self {
        OffsetTracker::default()
    }

    /// Starts tracking `partition`, newly assigned, and returns the epoch of its deliveries.
    /// Earlier state is forgotten: the group's committed offset is where this assignment
    /// starts.
    pub(crate) fn assign(&mut self, partition: i32) -> u32 {
        let epoch = self.next_epoch;
        self.next_epoch = self.next_epoch.wrapping_add(1);
        self.partitions.insert(
            partition,
            Partition {
                epoch,
                ..Partition::default()
            },
        );
        epoch
    }

    /// Whether `partition` is owned and not being revoked.
    #[cfg(test)]
    pub(crate) fn owns(&self, partition: i32) -> bool {
        self.partitions
            .get(&partition)
            .is_some_and(|state| !state.revoking)
    }

    /// Records that `offset` of `partition` was fetched, and returns its delivery; None when
    /// the partition is not owned (any more).
    pub(crate) fn delivered(&mut self, partition: i32, offset: i64) -> Option<Delivery> {
        let state = self.partitions.get_mut(&partition)?;
        let delivery = Delivery {
            partition,
            epoch: state.epoch,
            offset,
        };
        // After a seek back (an offset reset), an offset below the position was acknowledged
        // already; tracking it again would hold the position back for nothing.
        if state.position.is_some_and(|position| offset < position) {
            return Some(delivery);
        }
        match state.outstanding.back() {
            Some(&(last, _)) if offset <= last => {
                // Delivered again after a seek back: keep the list sorted and single.
                if let Err(at) = state.outstanding.binary_search_by_key(&offset, |&(o, _)| o) {
                    state.outstanding.insert(at, (offset, Progress::Fetched));
                }
            }
            _ => state.outstanding.push_back((offset, Progress::Fetched)),
        }
        Some(delivery)
    }

    /// Whether `delivery` may go to a handler, which then has it: false once its partition is
    /// revoked, being revoked, or owned again under a newer assignment.
    pub(crate) fn start(&mut self, delivery: Delivery) -> bool {
        let Some(state) = self.partitions.get_mut(&delivery.partition) else {
            return false;
        };
        if state.epoch != delivery.epoch {
            return false;
        }
        let Some(at) = state.find(delivery.offset) else {
            // Acknowledged already (below the position): nothing to hold back.
            return !state.revoking;
        };
        match state.outstanding[at].1 {
            Progress::Fetched if state.revoking => false,
            Progress::Fetched => {
                state.outstanding[at].1 = Progress::Started;
                state.started += 1;
                true
            }
            Progress::Started | Progress::Acked => true,
        }
    }

    /// Records acknowledgements. Those of partitions no longer owned, or owned under a newer
    /// assignment, are ignored: the owner delivers them again.
    pub(crate) fn acked(&mut self, acks: impl IntoIterator<Item = Delivery>) -> Acked {
        let mut touched = Vec::new();
        let mut revoking_progress = false;
        // Acks come in runs of one partition: look the partition up once per run.
        let mut current: Option<(i32, &mut Partition)> = None;
        for delivery in acks {
            if current
                .as_ref()
                .is_none_or(|(p, _)| *p != delivery.partition)
            {
                current = self
                    .partitions
                    .get_mut(&delivery.partition)
                    .map(|s| (delivery.partition, s));
            }
            let Some((_, state)) = current.as_mut() else {
                continue;
            };
            if state.epoch != delivery.epoch {
                continue;
            }
            if let Some(at) = state.find(delivery.offset) {
                if state.outstanding[at].1 == Progress::Started {
                    state.started -= 1;
                    revoking_progress |= state.revoking;
                }
                state.outstanding[at].1 = Progress::Acked;
                if !touched.contains(&delivery.partition) {
                    touched.push(delivery.partition);
                }
            }
        }
        touched.sort_unstable();
        let moved = touched
            .into_iter()
            .filter_map(|partition| {
                let state = self.partitions.get_mut(&partition)?;
                let mut moved = None;
                while let Some(&(offset, Progress::Acked)) = state.outstanding.front() {
                    moved = Some(offset + 1);
                    state.outstanding.pop_front();
                }
                let position = moved?;
                state.position = Some(position);
                Some((partition, position))
            })
            .collect();
        Acked {
            moved,
            revoking_progress,
        }
    }

    /// Marks `partition` as being revoked: its deliveries that have not started never will.
    pub(crate) fn begin_revoke(&mut self, partition: i32) {
        if let Some(state) = self.partitions.get_mut(&partition) {
            state.revoking = true;
        }
    }

    /// Started deliveries of partitions being revoked that are not acknowledged yet.
    pub(crate) fn started_while_revoking(&self) -> usize {
        self.partitions
            .values()
            .filter(|state| state.revoking)
            .map(|state| state.started)
            .sum()
    }

    /// Stops tracking `partition` and returns the offset to commit for it, if
    /// acknowledgements moved it past what was committed. Acknowledgements of its deliveries
    /// that arrive later are ignored.
    pub(crate) fn revoke(&mut self, partition: i32) -> Option<i64> {
        self.partitions
            .remove(&partition)
            .and_then(|state| state.uncommitted())
    }

    /// Commit positions that moved since they were last committed, sorted by partition; they
    /// count as committed from now on (see [`OffsetTracker::commit_failed`]).
    pub(crate) fn take_uncommitted(&mut self) -> Vec<(i32, i64)> {
        let mut positions: Vec<(i32, i64)> = self
            .partitions
            .iter_mut()
            .filter_map(|(partition, state)| {
                let position = state.uncommitted()?;
                state.committed = Some(position);
                Some((*partition, position))
            })
            .collect();
        positions.sort_unstable();
        positions
    }

    /// A commit of `position` for `partition` failed: it is committed again next time.
    pub(crate) fn commit_failed(&mut self, partition: i32, position: i64) {
        if let Some(state) = self.partitions.get_mut(&partition) {
            if state.committed == Some(position) {
                state.committed = None;
            }
        }
    }

    /// Deliveries handed out and not yet acknowledged, over all partitions.
    #[cfg(test)]
    pub(crate) fn unacked(&self) -> usize {
        self.partitions
            .values()
            .map(|p| {
                p.outstanding
                    .iter()
                    .filter(|(_, progress)| *progress != Progress::Acked)
                    .count()
            })
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

    fn d(partition: i32, offset: i64) -> Delivery {
        Delivery {
            partition,
            epoch: 0,
            offset,
        }
    }

    /// A delivery of the current assignment of `partition` (or of epoch 0 if unassigned).
    fn at(t: &OffsetTracker, partition: i32, offset: i64) -> Delivery {
        Delivery {
            partition,
            epoch: t.partitions.get(&partition).map_or(0, |p| p.epoch),
            offset,
        }
    }

    fn acked(t: &mut OffsetTracker, acks: &[(i32, i64)]) -> Vec<(i32, i64)> {
        let acks: Vec<Delivery> = acks.iter().map(|&(p, o)| at(t, p, o)).collect();
        t.acked(acks).moved
    }

    #[test]
    fn tags_carry_partition_epoch_and_offset() {
        for delivery in [
            d(0, 0),
            Delivery {
                partition: i32::MAX,
                epoch: u32::MAX,
                offset: i64::MAX,
            },
            Delivery {
                partition: 7,
                epoch: 3,
                offset: 1_234,
            },
        ] {
            assert_eq!(Delivery::of(delivery.tag()), delivery);
        }
    }

    #[test]
    fn in_order_acks_move_the_position_one_past_the_last() {
        let mut t = tracker_with(0, 10..13);
        assert_eq!(acked(&mut t, &[(0, 10)]), vec![(0, 11)]);
        assert_eq!(acked(&mut t, &[(0, 11), (0, 12)]), vec![(0, 13)]);
        assert_eq!(t.take_uncommitted(), vec![(0, 13)]);
        assert_eq!(t.unacked(), 0);
    }

    #[test]
    fn out_of_order_acks_never_pass_a_gap() {
        let mut t = tracker_with(0, 0..6);
        // 0, 1 done; 2 still running; 3, 4, 5 done out of order.
        assert_eq!(
            acked(&mut t, &[(0, 4), (0, 1), (0, 0), (0, 5), (0, 3)]),
            vec![(0, 2)]
        );
        assert_eq!(t.take_uncommitted(), vec![(0, 2)]);
        assert_eq!(t.unacked(), 1);
        // Acking again what is already counted does not move anything.
        assert_eq!(acked(&mut t, &[(0, 3)]), vec![]);
        // The gap closes: the position jumps past everything acknowledged behind it.
        assert_eq!(acked(&mut t, &[(0, 2)]), vec![(0, 6)]);
    }

    #[test]
    fn nothing_acked_means_nothing_to_commit() {
        let mut t = tracker_with(0, 0..3);
        assert_eq!(acked(&mut t, &[(0, 1), (0, 2)]), vec![]);
        assert_eq!(t.take_uncommitted(), vec![]);
        assert_eq!(t.revoke(0), None);
    }

    #[test]
    fn holes_in_offsets_are_skipped() {
        // Offsets 3 and 4 do not exist (a transaction marker, a compacted record).
        let mut t = tracker_with(0, [1, 2, 5, 6]);
        assert_eq!(acked(&mut t, &[(0, 5), (0, 1), (0, 2)]), vec![(0, 6)]);
        assert_eq!(acked(&mut t, &[(0, 6)]), vec![(0, 7)]);
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
        assert_eq!(acked(&mut t, &[(1, 0), (0, 1), (1, 1)]), vec![(1, 2)]);
        assert_eq!(acked(&mut t, &[(0, 0)]), vec![(0, 2)]);
        assert_eq!(t.take_uncommitted(), vec![(0, 2), (1, 2)]);
    }

    #[test]
    fn positions_are_committed_once_unless_the_commit_failed() {
        let mut t = tracker_with(0, 0..4);
        acked(&mut t, &[(0, 0)]);
        assert_eq!(t.take_uncommitted(), vec![(0, 1)]);
        assert_eq!(t.take_uncommitted(), vec![]);
        t.commit_failed(0, 1);
        assert_eq!(t.take_uncommitted(), vec![(0, 1)]);
        acked(&mut t, &[(0, 1)]);
        // A failure reported for an older position than the one sent since changes nothing.
        assert_eq!(t.take_uncommitted(), vec![(0, 2)]);
        t.commit_failed(0, 1);
        assert_eq!(t.take_uncommitted(), vec![]);
        assert_eq!(t.revoke(0), None);
    }

    #[test]
    fn revoke_returns_the_uncommitted_position_and_ignores_later_acks() {
        let mut t = tracker_with(3, 100..105);
        acked(&mut t, &[(3, 100), (3, 101), (3, 103)]);
        assert_eq!(t.revoke(3), Some(102));
        // The in-flight deliveries finish after the revoke: not ours to commit any more.
        assert_eq!(acked(&mut t, &[(3, 102), (3, 104)]), vec![]);
        assert_eq!(t.take_uncommitted(), vec![]);
        assert_eq!(t.revoke(3), None);
    }

    #[test]
    fn a_new_assignment_starts_fresh_and_ignores_the_old_one() {
        let mut t = tracker_with(0, 0..4);
        let old = t.delivered(0, 4).unwrap();
        acked(&mut t, &[(0, 0)]);
        assert_eq!(t.revoke(0), Some(1));
        let epoch = t.assign(0);
        assert_ne!(epoch, old.epoch);
        // The new owner (us again) resumes at the committed offset 1.
        for offset in 1..5 {
            t.delivered(0, offset);
        }
        // The old assignment's delivery of offset 4 neither starts nor counts.
        assert!(!t.start(old));
        assert!(t.acked([old]).moved.is_empty());
        let again = |offset| Delivery {
            partition: 0,
            epoch,
            offset,
        };
        assert!(t.start(again(4)));
        assert_eq!(t.acked([again(2), again(1)]).moved, vec![(0, 3)]);
    }

    #[test]
    fn revoking_stops_unstarted_deliveries_and_waits_for_started_ones() {
        let mut t = tracker_with(0, 0..4);
        t.assign(1);
        t.delivered(1, 0);
        assert!(t.start(d(0, 0)));
        assert!(t.start(d(0, 1)));
        // Asking again about a started delivery changes nothing.
        assert!(t.start(d(0, 1)));
        t.begin_revoke(0);
        assert!(!t.owns(0));
        assert!(t.owns(1));
        assert!(!t.start(d(0, 2)), "never started, never will");
        assert!(t.start(at(&t, 1, 0)), "another partition is not affected");
        assert_eq!(t.started_while_revoking(), 2);
        let progress = t.acked([d(0, 1)]);
        assert!(progress.revoking_progress);
        assert_eq!(progress.moved, vec![]);
        assert!(!t.acked([at(&t, 1, 0)]).revoking_progress);
        assert_eq!(t.started_while_revoking(), 1);
        assert_eq!(t.acked([d(0, 0)]).moved, vec![(0, 2)]);
        assert_eq!(t.started_while_revoking(), 0);
        assert_eq!(t.revoke(0), Some(2));
        assert!(!t.start(d(0, 3)));
    }

    #[test]
    fn redelivery_below_the_position_is_not_tracked() {
        let mut t = tracker_with(0, 0..3);
        assert_eq!(acked(&mut t, &[(0, 0), (0, 1), (0, 2)]), vec![(0, 3)]);
        // An offset reset hands 1 out again; it must not hold the position back.
        t.delivered(0, 1);
        t.delivered(0, 3);
        assert_eq!(t.unacked(), 1);
        assert_eq!(acked(&mut t, &[(0, 3)]), vec![(0, 4)]);
    }

    #[test]
    fn duplicate_delivery_of_an_outstanding_offset_keeps_its_ack() {
        let mut t = tracker_with(0, 0..2);
        assert_eq!(acked(&mut t, &[(0, 1)]), vec![]);
        t.delivered(0, 1);
        assert_eq!(acked(&mut t, &[(0, 0)]), vec![(0, 2)]);
    }

    #[test]
    fn acks_for_unknown_offsets_and_partitions_are_ignored() {
        let mut t = tracker_with(0, 0..2);
        assert_eq!(acked(&mut t, &[(0, 7), (9, 0)]), vec![]);
        assert_eq!(t.unacked(), 2);
        assert!(t.delivered(9, 0).is_none(), "partition 9 is not owned");
    }
}
