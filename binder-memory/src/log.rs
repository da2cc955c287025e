//! One destination: a retained log and the consumer groups reading it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use stream_core::{Message, StartFrom};
use tokio::sync::Notify;

/// A destination's log, shared by its producers and consumers.
#[derive(Default)]
pub(crate) struct Log {
    state: Mutex<LogState>,
    /// Woken on every append and every release, so waiting consumers look again.
    pub(crate) changed: Notify,
}

#[derive(Default)]
pub(crate) struct LogState {
    /// Offset of `entries[0]`.
    base: u64,
    entries: VecDeque<Message>,
    groups: HashMap<String, Group>,
}

/// A consumer group's view of a log.
#[derive(Default)]
struct Group {
    /// The next offset never delivered to this group.
    next: u64,
    /// Offsets handed back (released, closed or dropped consumer) to deliver again, oldest
    /// first, with the attempts made on each.
    released: BTreeMap<u64, u32>,
    /// Offsets delivered and not acknowledged: which consumer holds them, and the attempt
    /// the delivery is (each delivery counts as one until released).
    pending: HashMap<u64, (u64, u32)>,
    members: usize,
}

/// One delivery taken from a group.
pub(crate) struct Taken {
    pub(crate) offset: u64,
    pub(crate) message: Message,
    pub(crate) attempt: u32,
}

impl Log {
    pub(crate) fn lock(&self) -> MutexGuard<'_, LogState> {
        // A panic while holding the lock leaves consistent state (every mutation is a single
        // step), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl LogState {
    /// Appends and returns the offset; trims to `retention`.
    pub(crate) fn append(&mut self, message: Message, retention: usize) -> u64 {
        let offset = self.base + self.entries.len() as u64;
        self.entries.push_back(message.with_id(offset.to_string()));
        while self.entries.len() > retention.max(1) {
            self.entries.pop_front();
            self.base += 1;
        }
        offset
    }

    pub(crate) fn end(&self) -> u64 {
        self.base + self.entries.len() as u64
    }

    pub(crate) fn snapshot(&self) -> Vec<Message> {
        self.entries.iter().cloned().collect()
    }

    /// Registers a member of `group`, creating the group at `start` if it is new.
    pub(crate) fn join(&mut self, group: &str, start: StartFrom) {
        let next = match start {
            StartFrom::Earliest => self.base,
            StartFrom::Latest => self.end(),
        };
        let entry = self
            .groups
            .entry(group.to_owned())
            .or_insert_with(|| Group {
                next,
                ..Group::default()
            });
        entry.members += 1;
    }

    /// Removes a member, handing its pending deliveries back to the group. A group that is
    /// not durable disappears with its last member.
    pub(crate) fn leave(&mut self, group: &str, consumer: u64, durable: bool) {
        let Some(g) = self.groups.get_mut(group) else {
            return;
        };
        let held: Vec<u64> = g
            .pending
            .iter()
            .filter(|(_, (holder, _))| *holder == consumer)
            .map(|(offset, _)| *offset)
            .collect();
        for offset in held {
            if let Some((_, count)) = g.pending.remove(&offset) {
                g.released.insert(offset, count);
            }
        }
        g.members -= 1;
        if g.members == 0 && !durable {
            self.groups.remove(group);
        }
    }

    /// Takes up to `max` deliveries for `consumer`: handed-back ones first, then new ones.
    pub(crate) fn take(&mut self, group: &str, consumer: u64, max: usize) -> Vec<Taken> {
        let base = self.base;
        let end = self.end();
        let Some(g) = self.groups.get_mut(group) else {
            return Vec::new();
        };
        let mut taken = Vec::new();
        while taken.len() < max {
            let Some((offset, count)) = g.released.pop_first() else {
                break;
            };
            if offset < base {
                // Dropped by retention while pending: nothing left to deliver.
                continue;
            }
            g.pending.insert(offset, (consumer, count + 1));
            taken.push(Taken {
                offset,
                message: self.entries[(offset - base) as usize].clone(),
                attempt: count + 1,
            });
        }
        g.next = g.next.max(base);
        while taken.len() < max && g.next < end {
            let offset = g.next;
            g.next += 1;
            g.pending.insert(offset, (consumer, 1));
            taken.push(Taken {
                offset,
                message: self.entries[(offset - base) as usize].clone(),
                attempt: 1,
            });
        }
        taken
    }

    /// Hands offsets `consumer` holds back to the group without counting their delivery as
    /// an attempt: no handler saw them.
    pub(crate) fn release(
        &mut self,
        group: &str,
        consumer: u64,
        offsets: impl Iterator<Item = u64>,
    ) {
        if let Some(g) = self.groups.get_mut(group) {
            for offset in offsets {
                if matches!(g.pending.get(&offset), Some((holder, _)) if *holder == consumer) {
                    if let Some((_, attempt)) = g.pending.remove(&offset) {
                        g.released.insert(offset, attempt.saturating_sub(1));
                    }
                }
            }
        }
    }

    /// Records that `consumer` tries `offset` again as attempt `attempt`.
    pub(crate) fn record_attempt(&mut self, group: &str, consumer: u64, offset: u64, attempt: u32) {
        if let Some(g) = self.groups.get_mut(group) {
            if let Some((holder, count)) = g.pending.get_mut(&offset) {
                if *holder == consumer {
                    *count = attempt;
                }
            }
        }
    }

    /// Acknowledges offsets held by `consumer`; others' (taken over meanwhile) are ignored.
    pub(crate) fn ack(&mut self, group: &str, consumer: u64, offsets: impl Iterator<Item = u64>) {
        if let Some(g) = self.groups.get_mut(group) {
            for offset in offsets {
                if matches!(g.pending.get(&offset), Some((holder, _)) if *holder == consumer) {
                    g.pending.remove(&offset);
                }
            }
        }
    }

    /// Messages `group` has not acknowledged: never delivered, or delivered and pending.
    pub(crate) fn unfinished(&self, group: &str) -> u64 {
        let end = self.end();
        self.groups.get(group).map_or(0, |g| {
            end.saturating_sub(g.next.max(self.base)) + (g.pending.len() + g.released.len()) as u64
        })
    }

    /// Un-acknowledged deliveries of `group`.
    pub(crate) fn pending(&self, group: &str) -> usize {
        self.groups
            .get(group)
            .map_or(0, |g| g.pending.len() + g.released.len())
    }
}

/// All destinations of one in-memory broker.
#[derive(Default)]
pub(crate) struct Logs {
    logs: Mutex<HashMap<String, Arc<Log>>>,
}

impl Logs {
    pub(crate) fn get(&self, destination: &str) -> Arc<Log> {
        let mut logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        logs.entry(destination.to_owned()).or_default().clone()
    }
}
