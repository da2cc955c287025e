//! The one error type of the library.

use std::fmt;

/// Boxed error used as the source of an [`Error`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Result alias used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, coarse enough to match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The configuration is invalid: an unknown key, a bad value, a missing field.
    Config,
    /// A binder `type` that no registered binder provides.
    UnknownBinderType,
    /// A binding name that the configuration does not define.
    MissingBinding,
    /// The broker could not be reached, or the connection dropped.
    Connection,
    /// An operation did not finish in time.
    Timeout,
    /// The broker refused or failed an operation.
    Broker,
    /// A payload could not be encoded or decoded.
    Codec,
    /// A payload is larger than the binding or broker allows.
    PayloadTooLarge,
    /// The destination does not exist and may not be created.
    DestinationNotFound,
    /// The producer, consumer or binder was already closed.
    Closed,
    /// The binder cannot do this (an in-process broker inspected from another process).
    Unsupported,
}

impl ErrorKind {
    /// Whether an error of this kind may go away if the operation is tried again.
    pub fn is_temporary(self) -> bool {
        matches!(self, ErrorKind::Connection | ErrorKind::Timeout)
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Config => "configuration error",
            ErrorKind::UnknownBinderType => "unknown binder type",
            ErrorKind::MissingBinding => "missing binding",
            ErrorKind::Connection => "connection error",
            ErrorKind::Timeout => "timed out",
            ErrorKind::Broker => "broker error",
            ErrorKind::Codec => "codec error",
            ErrorKind::PayloadTooLarge => "payload too large",
            ErrorKind::DestinationNotFound => "destination not found",
            ErrorKind::Closed => "closed",
            ErrorKind::Unsupported => "unsupported",
        })
    }
}

/// An error with a [`kind`](Error::kind), a message for people and an optional source.
///
/// ```
/// use stream_core::{Error, ErrorKind};
///
/// let err = Error::new(ErrorKind::Connection, "redis at 127.0.0.1:6379 did not answer");
/// assert!(err.is_temporary());
/// assert_eq!(err.kind(), ErrorKind::Connection);
/// ```
pub struct Error {
    kind: ErrorKind,
    message: String,
    temporary: Option<bool>,
    source: Option<BoxError>,
}

impl Error {
    /// A new error of `kind` with a human-readable `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            temporary: None,
            source: None,
        }
    }

    /// Attaches the underlying cause, kept for [`std::error::Error::source`].
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// Overrides the temporary/permanent classification that the kind implies.
    ///
    /// Binders use this when the broker says more than the kind can, for example a
    /// broker error that is known to be retriable.
    pub fn temporary(mut self, temporary: bool) -> Self {
        self.temporary = Some(temporary);
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message, without the kind or the source.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether trying again may succeed (a dropped connection, a timeout), as opposed to
    /// a permanent failure (bad configuration, a payload that will never fit).
    pub fn is_temporary(&self) -> bool {
        self.temporary.unwrap_or_else(|| self.kind.is_temporary())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind).field("message", &self.message);
        if let Some(source) = &self.source {
            d.field("source", source);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The source is reachable through `source()`, not repeated here, so that error
        // reporters that walk the chain do not print it twice.
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_follows_kind_unless_overridden() {
        assert!(Error::new(ErrorKind::Timeout, "t").is_temporary());
        assert!(!Error::new(ErrorKind::Config, "c").is_temporary());
        assert!(Error::new(ErrorKind::Broker, "b")
            .temporary(true)
            .is_temporary());
    }

    #[test]
    fn source_is_chained_and_displayed() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let err = Error::new(ErrorKind::Connection, "cannot reach 127.0.0.1:1").with_source(io);
        assert!(std::error::Error::source(&err).is_some());
        assert_eq!(
            err.to_string(),
            "connection error: cannot reach 127.0.0.1:1"
        );
        assert_eq!(
            std::error::Error::source(&err).unwrap().to_string(),
            "refused"
        );
    }
}
