//! What a handler is, and what it can say about a failed attempt.
//!
//! A handler is a [`tower_service::Service`] of [`Envelope<T>`](crate::Envelope) (or of
//! [`Batch<T>`](crate::Batch)) whose error converts into [`BoxError`]: wrap it with any
//! `tower` layer (timeout, rate limit, concurrency limit, your own) and hand it to
//! [`Sink::subscribe_service`](crate::Sink::subscribe_service). Plain async closures go to
//! [`Sink::subscribe`](crate::Sink::subscribe) as before; [`handler_fn`] turns one into a
//! service when layers are wanted.
//!
//! Any error is a failed attempt, retried with the binding's backoff and dead-lettered once
//! its attempts are used up. A [`HandlerError`] says otherwise: retry after a given delay,
//! or reject now (straight to the dead-letter destination). Core finds it by type anywhere
//! in the error's [`source`](std::error::Error::source) chain, never by its text.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use tower_service::Service;

use crate::{BoxError, Error, ErrorKind};

/// What happens to a message after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Action {
    /// Try again after the binding's backoff; dead-letter once `retry.max-attempts` are
    /// used. What any error without a [`HandlerError`] in its chain means.
    Retry,
    /// Try again after this delay instead of the backoff. Still an attempt: once
    /// `retry.max-attempts` are used, the message is dead-lettered.
    RetryAfter(Duration),
    /// Dead-letter now, whatever attempts are left (`x-error-kind: rejected`).
    Reject,
}

/// An error with the [`Action`] to take on the message whose attempt failed.
///
/// Return it from a handler (`Err(HandlerError::reject(e))`, or `?` on a result already
/// mapped with [`HandlerError::reject`]), or put it anywhere in an error's
/// [`source`](std::error::Error::source) chain. It is transparent: its message and its
/// sources are those of the error it wraps, which is what the dead-letter copy records.
///
/// ```
/// use stream_core::{Action, HandlerError};
/// use std::time::Duration;
///
/// let invalid = HandlerError::reject("amount must be positive");
/// assert_eq!(invalid.action(), Action::Reject);
/// assert_eq!(invalid.to_string(), "amount must be positive");
///
/// let busy = HandlerError::retry_after("rate limited", Duration::from_secs(5));
/// assert_eq!(busy.action(), Action::RetryAfter(Duration::from_secs(5)));
/// ```
pub struct HandlerError {
    action: Action,
    error: BoxError,
}

impl HandlerError {
    /// Retry with the binding's backoff: what any plain error means.
    pub fn retry(error: impl Into<BoxError>) -> Self {
        HandlerError::new(Action::Retry, error)
    }

    /// Retry after `delay` instead of the binding's backoff. The consumer keeps the message
    /// through the delay, however long (on Redis it keeps refreshing its claim); only if it
    /// dies may another member take the message over, after `claim-idle`.
    pub fn retry_after(error: impl Into<BoxError>, delay: Duration) -> Self {
        HandlerError::new(Action::RetryAfter(delay), error)
    }

    /// Dead-letter now: the message cannot succeed, so further attempts only waste time.
    pub fn reject(error: impl Into<BoxError>) -> Self {
        HandlerError::new(Action::Reject, error)
    }

    /// `error` with `action`.
    pub fn new(action: Action, error: impl Into<BoxError>) -> Self {
        HandlerError {
            action,
            error: error.into(),
        }
    }

    /// What happens to the message.
    pub fn action(&self) -> Action {
        self.action
    }

    /// The wrapped error.
    pub fn error(&self) -> &(dyn StdError + Send + Sync + 'static) {
        &*self.error
    }

    /// The wrapped error, by value.
    pub fn into_error(self) -> BoxError {
        self.error
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("action", &self.action)
            .field("error", &self.error)
            .finish()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.error, f)
    }
}

impl StdError for HandlerError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.error.source()
    }
}

/// The action an error asks for: that of the first [`HandlerError`] in its chain, else
/// [`Action::Retry`].
pub(crate) fn action_of(error: &(dyn StdError + 'static)) -> Action {
    let mut link = Some(error);
    while let Some(error) = link {
        if let Some(handler_error) = error.downcast_ref::<HandlerError>() {
            return handler_error.action;
        }
        link = error.source();
    }
    Action::Retry
}

/// A [`Service`] that calls an async closure; cloning it is cheap (shares the closure).
///
/// What [`handler_fn`] returns.
pub struct HandlerFn<F> {
    f: Arc<F>,
}

impl<F> Clone for HandlerFn<F> {
    fn clone(&self) -> Self {
        HandlerFn { f: self.f.clone() }
    }
}

impl<F> fmt::Debug for HandlerFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerFn").finish_non_exhaustive()
    }
}

/// Turns an async closure of a request (an [`Envelope<T>`](crate::Envelope) or a
/// [`Batch<T>`](crate::Batch)) into a [`Service`], for wrapping with `tower` layers.
///
/// ```
/// use stream_core::{handler_fn, Envelope};
///
/// let service = handler_fn(|order: Envelope<String>| async move {
///     println!("{} (attempt {})", order.payload(), order.attempt());
///     Ok::<(), std::io::Error>(())
/// });
/// # let _ = service;
/// ```
pub fn handler_fn<F>(f: F) -> HandlerFn<F> {
    HandlerFn { f: Arc::new(f) }
}

impl<F, R, Fut, E> Service<R> for HandlerFn<F>
where
    F: Fn(R) -> Fut,
    Fut: Future<Output = Result<(), E>>,
{
    type Response = ();
    type Error = E;
    type Future = Fut;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), E>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: R) -> Fut {
        (self.f)(request)
    }
}

/// One attempt's future, its error boxed.
pub(crate) type Attempt = BoxFuture<'static, Result<(), BoxError>>;

/// A handler as the engine calls it: shared between the deliveries running at once.
pub(crate) trait Handle<R>: Send + Sync + 'static {
    fn handle(&self, request: R) -> Attempt;
}

/// A closure handler: called in place, with no clone per message.
pub(crate) struct FnHandle<F>(pub(crate) F);

impl<R, F, Fut, E> Handle<R> for FnHandle<F>
where
    F: Fn(R) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<BoxError> + 'static,
{
    fn handle(&self, request: R) -> Attempt {
        let attempt = (self.0)(request);
        async move { attempt.await.map_err(Into::into) }.boxed()
    }
}

/// A [`Service`] handler. Each call gets a clone of the service, made ready, as `tower`'s
/// convention has it: state meant to be shared across concurrent calls (a concurrency limit's
/// semaphore) is shared by its clones; state kept in the value itself is per call.
pub(crate) struct ServiceHandle<S>(Mutex<S>);

impl<S> ServiceHandle<S> {
    pub(crate) fn new(service: S) -> Self {
        ServiceHandle(Mutex::new(service))
    }
}

impl<R, S> Handle<R> for ServiceHandle<S>
where
    R: Send + 'static,
    S: Service<R, Response = ()> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    fn handle(&self, request: R) -> Attempt {
        // A clone that panicked leaves the prototype as it was; keep using it.
        let mut service = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        async move {
            futures::future::poll_fn(|cx| service.poll_ready(cx))
                .await
                .map_err(Into::into)?;
            service.call(request).await.map_err(Into::into)
        }
        .boxed()
    }
}

/// The binding's `handler-timeout`, as a layer: an attempt that runs longer fails with
/// [`ErrorKind::Timeout`] and its future is dropped.
pub(crate) struct Timeout<H> {
    pub(crate) inner: H,
    pub(crate) limit: Duration,
}

impl<R, H: Handle<R>> Handle<R> for Timeout<H> {
    fn handle(&self, request: R) -> Attempt {
        let limit = self.limit;
        let attempt = self.inner.handle(request);
        async move {
            match tokio::time::timeout(limit, attempt).await {
                Ok(done) => done,
                Err(_) => Err(Error::new(
                    ErrorKind::Timeout,
                    format!("the handler ran past its handler-timeout of {limit:?}"),
                )
                .into()),
            }
        }
        .boxed()
    }
}

/// Wraps `handle` in the binding's layers.
pub(crate) fn layered<R: 'static, H: Handle<R>>(
    handle: H,
    timeout: Option<Duration>,
) -> Arc<dyn Handle<R>> {
    match timeout {
        Some(limit) => Arc::new(Timeout {
            inner: handle,
            limit,
        }),
        None => Arc::new(handle),
    }
}

/// The messages of an error and of each of its sources, outermost first, one per line.
pub(crate) fn chain_text(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut link = error.source();
    while let Some(error) = link {
        text.push('\n');
        text.push_str(&error.to_string());
        link = error.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Outer(Box<dyn StdError + Send + Sync>);
    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("saving the order failed")
        }
    }
    impl StdError for Outer {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            Some(&*self.0)
        }
    }

    #[test]
    fn a_plain_error_retries() {
        let error: BoxError = "boom".into();
        assert_eq!(action_of(&*error), Action::Retry);
    }

    #[test]
    fn the_action_is_found_anywhere_in_the_chain() {
        let rejected = HandlerError::reject(std::io::Error::other("constraint violated"));
        let error: BoxError = Box::new(Outer(Box::new(rejected)));
        assert_eq!(action_of(&*error), Action::Reject);
    }

    #[test]
    fn a_handler_error_is_transparent_in_the_chain_text() {
        let inner = Outer(Box::new(std::io::Error::other("disk full")));
        let error: BoxError = Box::new(HandlerError::retry_after(inner, Duration::from_secs(1)));
        assert_eq!(chain_text(&*error), "saving the order failed\ndisk full");
    }
}
