//! Dead letters after the fact: list them, send them back once the cause is fixed, purge
//! them. Built on [`Admin`], so it works on every binder that offers it, from a service or
//! from the `stream` command line.
//!
//! ```no_run
//! # async fn run(streams: stream_core::Streams) -> stream_core::Result<()> {
//! use stream_core::dlq::Redrive;
//!
//! let dead = streams.dead_letters("payments-in").await?;
//! for letter in dead.list(10).await? {
//!     println!("{} {:?} {:?}", letter.stored.position, letter.reason, letter.error);
//! }
//! let summary = dead.redrive(&Redrive::default(), |_| {}).await?;
//! println!("{} sent back", summary.redriven);
//! # Ok(())
//! # }
//! ```

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use crate::admin::{Admin, ReadFrom, Removal, Stored};
use crate::codec::Raw;
use crate::message::{header, Headers};
use crate::{Channel, Error, ErrorKind, Message, Producer, Result, Source, Streams};

/// Header a redriven message carries: when it was sent back, RFC 3339.
pub const REDRIVEN_AT: &str = "x-redriven-at";
/// Header a redriven message carries: how many times it was sent back, from 1.
pub const REDRIVE_COUNT: &str = "x-redrive-count";

/// The headers the dead-letter copy adds, which a redriven message leaves behind.
const DEAD_LETTER_HEADERS: [&str; 8] = [
    header::ORIGINAL_DESTINATION,
    header::ORIGINAL_GROUP,
    header::ORIGINAL_ID,
    header::ATTEMPTS,
    header::ERROR,
    header::ERROR_CHAIN,
    header::ERROR_KIND,
    header::FIRST_FAILURE,
];

/// One dead letter, with what its headers say about it.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The message as the dead-letter destination holds it.
    pub stored: Stored,
    /// `x-error-kind`: `handler`, `rejected` or `decode`.
    pub reason: Option<String>,
    /// `x-error`.
    pub error: Option<String>,
    /// `x-attempts`.
    pub attempts: Option<u32>,
    /// `x-original-destination`.
    pub original_destination: Option<String>,
    /// `x-original-group`.
    pub original_group: Option<String>,
    /// `x-first-failure`.
    pub first_failure: Option<String>,
}

impl DeadLetter {
    fn of(stored: Stored) -> Self {
        let headers = stored.message.headers();
        let get = |name: &str| headers.get(name).map(str::to_owned);
        DeadLetter {
            reason: get(header::ERROR_KIND),
            error: get(header::ERROR),
            attempts: headers.get(header::ATTEMPTS).and_then(|a| a.parse().ok()),
            original_destination: get(header::ORIGINAL_DESTINATION),
            original_group: get(header::ORIGINAL_GROUP),
            first_failure: get(header::FIRST_FAILURE),
            stored,
        }
    }

    /// The message to send back: payload, key and the headers it had before it was
    /// dead-lettered (its trace context among them), with the redrive recorded.
    fn restored(&self) -> Message {
        let original = &self.stored.message;
        let mut headers: Headers = original
            .headers()
            .iter()
            .filter(|(name, _)| !DEAD_LETTER_HEADERS.contains(name))
            .collect();
        let count = original
            .headers()
            .get(REDRIVE_COUNT)
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0)
            + 1;
        headers.insert(REDRIVE_COUNT, count.to_string());
        headers.insert(
            REDRIVEN_AT,
            humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        );
        let mut message = Message::new(original.payload().clone()).with_headers(headers);
        if let Some(key) = original.key() {
            message = message.with_key(key);
        }
        message
    }
}

/// What [`DeadLetters::redrive`] sends back.
#[derive(Debug, Clone, Default)]
pub struct Redrive {
    /// Only dead letters whose header `.0` has the value `.1`.
    pub filter: Option<(String, String)>,
    /// At most this many.
    pub limit: Option<usize>,
    /// Report what would be sent back, send nothing, remove nothing.
    pub dry_run: bool,
}

/// What a redrive did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedriveSummary {
    /// Dead letters sent back and removed (or, in a dry run, that would have been).
    pub redriven: usize,
    /// Dead letters the filter left where they are.
    pub skipped: usize,
}

/// The dead letters of one binding. Made by [`Streams::dead_letters`].
pub struct DeadLetters {
    channel: Channel,
    admin: Arc<dyn Admin>,
    destination: String,
}

impl std::fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetters")
            .field("binding", &self.channel.name())
            .field("destination", &self.destination)
            .finish()
    }
}

/// Dead letters read per round trip.
const PAGE: usize = 100;

impl Streams {
    /// The dead letters of `binding`: its `dead-letter` destination. Fails with
    /// [`ErrorKind::Unsupported`] on a binder without administrative access (the in-memory
    /// broker, whose messages live in the process that made it).
    pub async fn dead_letters(&self, binding: &str) -> Result<DeadLetters> {
        let channel = self.channel(binding)?;
        let admin = channel.binder().admin().await?;
        let destination = channel.config().dead_letter_destination();
        Ok(DeadLetters {
            channel,
            admin,
            destination,
        })
    }
}

impl DeadLetters {
    /// The dead-letter destination.
    pub fn destination(&self) -> &str {
        &self.destination
    }

    /// Up to `max` dead letters, oldest first.
    pub async fn list(&self, max: usize) -> Result<Vec<DeadLetter>> {
        let mut letters = Vec::new();
        let mut from = ReadFrom::Earliest;
        while letters.len() < max {
            let read = self
                .admin
                .read(&self.destination, &from, (max - letters.len()).min(PAGE))
                .await?;
            if read.messages.is_empty() {
                break;
            }
            letters.extend(read.messages.into_iter().map(DeadLetter::of));
            from = ReadFrom::Cursor(read.next);
        }
        Ok(letters)
    }

    /// Sends dead letters back to where they came from, oldest first, and removes each from
    /// the dead-letter destination only after the broker accepted it again: a crash half-way
    /// loses nothing and sends at most one message twice. A redriven message is a new
    /// message: its attempts start again from 1. `progress` is called after each one.
    ///
    /// With [`Redrive::filter`] on a binder that removes only up to a position (Kafka), the
    /// dead letters the filter skips would be removed with the ones sent back: that is
    /// refused with [`ErrorKind::Unsupported`].
    pub async fn redrive(
        &self,
        options: &Redrive,
        mut progress: impl FnMut(&DeadLetter),
    ) -> Result<RedriveSummary> {
        if options.filter.is_some() && self.admin.removal() != Removal::Individual {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "the {} binder removes dead letters only up to a position, so a filtered \
                     redrive would remove the ones it skips; redrive `{}` without a filter",
                    self.channel.binder().kind(),
                    self.destination
                ),
            ));
        }
        let mut targets = Targets::new(&self.channel);
        let mut summary = RedriveSummary::default();
        let mut from = ReadFrom::Earliest;
        let limit = options.limit.unwrap_or(usize::MAX);
        'pages: loop {
            let read = self.admin.read(&self.destination, &from, PAGE).await?;
            if read.messages.is_empty() {
                break;
            }
            for stored in read.messages {
                if summary.redriven >= limit {
                    break 'pages;
                }
                let letter = DeadLetter::of(stored);
                if let Some((name, value)) = &options.filter {
                    if letter.stored.message.headers().get(name) != Some(value.as_str()) {
                        summary.skipped += 1;
                        continue;
                    }
                }
                if !options.dry_run {
                    targets
                        .send(letter.original_destination.as_deref(), letter.restored())
                        .await?;
                    self.admin
                        .remove(
                            &self.destination,
                            std::slice::from_ref(&letter.stored.position),
                        )
                        .await?;
                }
                summary.redriven += 1;
                progress(&letter);
            }
            from = ReadFrom::Cursor(read.next);
        }
        Ok(summary)
    }

    /// Removes the dead letters older than `age`; returns how many, where the broker tells.
    pub async fn purge(&self, age: Duration) -> Result<Option<u64>> {
        let before = SystemTime::now()
            .checked_sub(age)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        self.admin.purge(&self.destination, before).await
    }
}

/// Where redriven messages go: through the binding's own source when they came from its
/// destination (so a partitioned binding routes them by key again), else straight to the
/// destination they name.
struct Targets<'a> {
    channel: &'a Channel,
    own: Option<Source<Bytes>>,
    others: Vec<(String, Box<dyn Producer>)>,
}

impl<'a> Targets<'a> {
    fn new(channel: &'a Channel) -> Self {
        Targets {
            channel,
            own: None,
            others: Vec::new(),
        }
    }

    async fn send(&mut self, original: Option<&str>, message: Message) -> Result<()> {
        let own_destination = &self.channel.config().destination;
        match original {
            Some(other) if other != own_destination => {
                let index = match self.others.iter().position(|(d, _)| d == other) {
                    Some(index) => index,
                    None => {
                        let producer = self.channel.binder().producer(other).await?;
                        self.others.push((other.to_owned(), producer));
                        self.others.len() - 1
                    }
                };
                self.others[index].1.send(message).await.map(drop)
            }
            _ => {
                if self.own.is_none() {
                    self.own = Some(self.channel.source_with(Raw).await?);
                }
                let source = self.own.as_ref().expect("made above");
                source.send_message(message).await.map(drop)
            }
        }
    }
}
