//! What operators ask a broker about a destination, from outside the services that use it:
//! its size and groups, its messages read without joining a group, and the removal of
//! messages from a dead-letter destination once they were sent back.
//!
//! A binder exposes this through [`Binder::admin`](crate::Binder::admin); the dead-letter
//! policies built on it ([`crate::dlq`]) and the `stream` command line use nothing else.

use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::{Message, Result};

/// Where an [`Admin::read`] starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadFrom {
    /// The oldest message the broker still holds.
    Earliest,
    /// After the newest message: only what is published from now on.
    Latest,
    /// Where an earlier read stopped ([`Read::next`]).
    Cursor(Cursor),
}

/// Where a message sits in its destination, in the binder's own terms (a Redis entry id, a
/// Kafka `partition:offset`). Opaque to everyone but the binder that made it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Position(pub String);

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A message as the broker stores it.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Its position, to read after it or to remove it.
    pub position: Position,
    /// When the broker took it, where the broker records that.
    pub stored_at: Option<SystemTime>,
    /// The message: id, key, headers, payload.
    pub message: Message,
}

/// Where a read stopped, in the binder's own terms (a Redis entry id, the next offset of
/// each Kafka partition): reading from it returns what comes after everything read so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor(pub String);

/// What one [`Admin::read`] returned.
#[derive(Debug, Clone)]
pub struct Read {
    /// The messages, in order (per partition).
    pub messages: Vec<Stored>,
    /// Where to read on from.
    pub next: Cursor,
}

/// What a broker knows about one destination.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct DestinationReport {
    /// Whether the destination exists.
    pub exists: bool,
    /// Messages the broker holds now.
    pub length: u64,
    /// The oldest and newest position held, if any.
    pub range: Option<(Position, Position)>,
    /// Per partition, for binders with partitions: `(partition, low, high)` offsets.
    pub partitions: Vec<(u32, u64, u64)>,
    /// The consumer groups reading it.
    pub groups: Vec<GroupReport>,
}

/// One consumer group of a destination.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct GroupReport {
    /// The group's name.
    pub name: String,
    /// Messages the group has not acknowledged, where the broker can tell.
    pub lag: Option<u64>,
    /// Deliveries handed out and not acknowledged.
    pub pending: Option<u64>,
    /// Its members.
    pub consumers: Vec<ConsumerReport>,
}

/// One member of a consumer group.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct ConsumerReport {
    /// The member's name (Redis consumer name, Kafka client id and host).
    pub name: String,
    /// Deliveries it holds, where the broker tells.
    pub held: Option<u64>,
    /// How long since it last read, where the broker tells.
    pub idle: Option<Duration>,
}

/// How a broker removes messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Removal {
    /// Each message on its own (Redis `XDEL`).
    Individual,
    /// Everything up to and including a position, per partition (Kafka `DeleteRecords`):
    /// removing a message removes those before it in its partition too.
    UpTo,
}

/// Administrative access to a binder's broker. See the [module](self) documentation.
#[async_trait]
pub trait Admin: Send + Sync + 'static {
    /// What the broker knows about `destination`. `known_groups` are groups the caller
    /// knows read it (the configuration's bindings): a broker that cannot list a
    /// destination's groups cheaply (Kafka, where each group's commits take a client of
    /// their own) reports those and the groups with live members on it, and no others.
    async fn inspect(
        &self,
        destination: &str,
        known_groups: &[String],
    ) -> Result<DestinationReport>;

    /// Reads up to `max` messages of `destination` from `from`, in order (per partition),
    /// without joining any group and without acknowledging anything for anyone. An empty
    /// read means nothing more is there now; [`Read::next`] is where to read on.
    async fn read(&self, destination: &str, from: &ReadFrom, max: usize) -> Result<Read>;

    /// How [`remove`](Admin::remove) removes.
    fn removal(&self) -> Removal;

    /// Removes the messages at `positions` from `destination`, once they were handled
    /// elsewhere (a dead letter sent back), as [`removal`](Admin::removal) says. Positions
    /// that are gone already are skipped.
    async fn remove(&self, destination: &str, positions: &[Position]) -> Result<()>;

    /// Removes every message of `destination` the broker took before `before`; returns how
    /// many it removed, where the broker tells.
    async fn purge(&self, destination: &str, before: SystemTime) -> Result<Option<u64>>;
}
