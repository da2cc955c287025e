//! Scheduling that keeps one key in order while other keys run concurrently.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;

/// Orders work so that items with the same key start one after another, in arrival order,
/// while items with other keys (or none) are free to start.
///
/// Keys are compared by hash; two keys that collide are serialised together, which costs
/// concurrency, never order.
pub(crate) struct KeyedQueue<I> {
    hasher: std::collections::hash_map::RandomState,
    /// Keys with an item running or ready, and the items waiting behind it.
    busy: HashMap<u64, VecDeque<I>>,
    ready: VecDeque<(Option<u64>, I)>,
}

impl<I> KeyedQueue<I> {
    pub(crate) fn new() -> Self {
        KeyedQueue {
            hasher: Default::default(),
            busy: HashMap::new(),
            ready: VecDeque::new(),
        }
    }

    /// The slot of `key`: items of one slot run one at a time.
    pub(crate) fn slot(&self, key: Option<&str>) -> Option<u64> {
        key.map(|key| self.hasher.hash_one(key))
    }

    /// Queues `item`; returns whether it may start now rather than after its key's earlier
    /// items.
    pub(crate) fn push(&mut self, slot: Option<u64>, item: I) -> bool {
        let Some(slot) = slot else {
            self.ready.push_back((None, item));
            return true;
        };
        match self.busy.get_mut(&slot) {
            Some(waiting) => {
                waiting.push_back(item);
                false
            }
            None => {
                self.busy.insert(slot, VecDeque::new());
                self.ready.push_back((Some(slot), item));
                true
            }
        }
    }

    /// The next item that may start, with the slot to pass to [`done`](Self::done).
    pub(crate) fn pop(&mut self) -> Option<(Option<u64>, I)> {
        self.ready.pop_front()
    }

    /// Marks the item of `slot` finished, releasing the next item of its key; returns
    /// whether one was released.
    pub(crate) fn done(&mut self, slot: Option<u64>) -> bool {
        let Some(slot) = slot else { return false };
        match self.busy.get_mut(&slot).and_then(VecDeque::pop_front) {
            Some(next) => {
                self.ready.push_back((Some(slot), next));
                true
            }
            None => {
                self.busy.remove(&slot);
                false
            }
        }
    }

    /// Takes every item that has not started, each with whether it was ready (rather than
    /// waiting behind its key). Running items keep their slots, so [`done`](Self::done)
    /// still works for them; it releases nothing more.
    pub(crate) fn drain(&mut self) -> Vec<(bool, I)> {
        let mut drained = Vec::new();
        for (slot, item) in self.ready.drain(..) {
            // A ready item holds its key's slot; it will never run, so the slot goes too.
            if let Some(slot) = slot {
                if let Some(waiting) = self.busy.remove(&slot) {
                    drained.extend(waiting.into_iter().map(|item| (false, item)));
                }
            }
            drained.push((true, item));
        }
        for waiting in self.busy.values_mut() {
            drained.extend(waiting.drain(..).map(|item| (false, item)));
        }
        drained
    }

    /// Whether nothing is ready or waiting (running items are not counted).
    #[cfg(test)]
    pub(crate) fn is_idle(&self) -> bool {
        self.ready.is_empty() && self.busy.values().all(VecDeque::is_empty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_key_waits_other_keys_flow() {
        let mut q = KeyedQueue::new();
        let (a, b) = (q.slot(Some("a")), q.slot(Some("b")));
        q.push(a, 1);
        q.push(a, 2);
        q.push(b, 3);
        q.push(None, 4);
        let (sa, first) = q.pop().unwrap();
        assert_eq!(first, 1);
        // While a's first item runs, b and the keyless item may start, a's second may not.
        let (sb, second) = q.pop().unwrap();
        assert_eq!(second, 3);
        assert_eq!(q.pop().unwrap().1, 4);
        assert!(q.pop().is_none());
        q.done(sb);
        assert!(q.pop().is_none());
        q.done(sa);
        let (sa2, third) = q.pop().unwrap();
        assert_eq!(third, 2);
        q.done(sa2);
        assert!(q.is_idle());
    }

    #[test]
    fn drain_takes_everything_not_started_and_keeps_running_slots() {
        let mut q = KeyedQueue::new();
        let (a, b) = (q.slot(Some("a")), q.slot(Some("b")));
        q.push(a, 1);
        q.push(a, 2);
        q.push(b, 3);
        q.push(b, 4);
        q.push(None, 5);
        // 1 runs; 3 and 5 are ready; 2 and 4 wait behind their keys.
        let (running_slot, first) = q.pop().unwrap();
        assert_eq!(first, 1);
        let mut drained = q.drain();
        drained.sort();
        assert_eq!(drained, vec![(false, 2), (false, 4), (true, 3), (true, 5)]);
        assert!(q.is_idle());
        assert!(!q.done(running_slot), "nothing is left to release");
        assert!(q.pop().is_none());
    }
}
