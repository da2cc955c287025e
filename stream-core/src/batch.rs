//! [`Batch`] and [`BatchError`]: what a batch handler gets and what it can say about it.

use std::error::Error as StdError;
use std::fmt;

use crate::sink::Envelope;
use crate::BoxError;

/// Up to the binding's `batch-size` messages for one call of a batch handler
/// ([`Sink::subscribe_batch`](crate::Sink::subscribe_batch)), in delivery order.
///
/// Items are [`Envelope`]s: the payload, the message and the attempt, which can differ
/// from item to item (a retried batch carries only the items that failed).
#[derive(Debug)]
pub struct Batch<T> {
    items: Vec<Envelope<T>>,
}

impl<T> Batch<T> {
    pub(crate) fn new(items: Vec<Envelope<T>>) -> Self {
        Batch { items }
    }

    /// How many messages the batch holds; never 0.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Always `false`: a batch handler is never called with nothing.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The messages, in delivery order; an item's index here is the one
    /// [`BatchError::fail`] takes.
    pub fn items(&self) -> &[Envelope<T>] {
        &self.items
    }

    /// The decoded values, in delivery order.
    pub fn payloads(&self) -> impl ExactSizeIterator<Item = &T> {
        self.items.iter().map(Envelope::payload)
    }

    /// The messages, by value.
    pub fn into_items(self) -> Vec<Envelope<T>> {
        self.items
    }
}

impl<T> IntoIterator for Batch<T> {
    type Item = Envelope<T>;
    type IntoIter = std::vec::IntoIter<Envelope<T>>;

    fn into_iter(self) -> Self::IntoIter {
        self.items.into_iter()
    }
}

impl<'a, T> IntoIterator for &'a Batch<T> {
    type Item = &'a Envelope<T>;
    type IntoIter = std::slice::Iter<'a, Envelope<T>>;

    fn into_iter(self) -> Self::IntoIter {
        self.items.iter()
    }
}

/// Which items of a [`Batch`] failed, each with its error; the others succeeded.
///
/// Return it as the batch handler's error (it is recognised at the top of the error, not
/// inside another error's `source` chain). Only the failed items go on to retry or to the
/// dead-letter destination, each by its own error: a [`HandlerError`](crate::HandlerError)
/// there rejects or delays that item alone. Any other error fails the whole batch. An empty
/// `BatchError` means every item succeeded.
///
/// Per-key order: an item that succeeded after a failed item of the same key in the batch
/// is not acknowledged; it is retried with that item, behind it.
///
/// ```
/// use stream_core::{BatchError, HandlerError};
///
/// let mut failed = BatchError::new();
/// failed.fail(2, "duplicate primary key");
/// failed.fail(5, HandlerError::reject("amount must be positive"));
/// assert_eq!(failed.len(), 2);
/// ```
#[derive(Debug, Default)]
pub struct BatchError {
    failed: Vec<(usize, BoxError)>,
}

impl BatchError {
    /// No failed items yet.
    pub fn new() -> Self {
        BatchError::default()
    }

    /// Marks item `index` of the batch failed with `error`. Indexes outside the batch are
    /// ignored; an index marked twice keeps its first error.
    pub fn fail(&mut self, index: usize, error: impl Into<BoxError>) -> &mut Self {
        self.failed.push((index, error.into()));
        self
    }

    /// How many items are marked failed.
    pub fn len(&self) -> usize {
        self.failed.len()
    }

    /// Whether no item is marked failed (then the whole batch succeeded).
    pub fn is_empty(&self) -> bool {
        self.failed.is_empty()
    }

    /// The failed items, as `(index, error)`.
    pub fn failed(&self) -> impl Iterator<Item = (usize, &(dyn StdError + Send + Sync + 'static))> {
        self.failed.iter().map(|(index, error)| (*index, &**error))
    }

    pub(crate) fn into_failed(self) -> Vec<(usize, BoxError)> {
        self.failed
    }
}

impl fmt::Display for BatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.failed.first() {
            None => f.write_str("no item of the batch failed"),
            Some((index, error)) => write!(
                f,
                "{} items of the batch failed; item {index}: {error}",
                self.failed.len()
            ),
        }
    }
}

impl StdError for BatchError {}
