//! The life of a handler-style subscription: its fetch loop, its dispatcher, and the order
//! in which they stop and report.

use std::future::Future;

use crate::engine::dispatch::{AckBuffer, Feed, Gates};
use crate::engine::inbound::Inbound;
use crate::{Error, ErrorKind, Result};

/// Runs `dispatcher` on the subscription's deliveries until stopped or failed, then closes
/// the consumer. Returns the first failure; the others are logged.
pub(crate) async fn supervise<D, Fut>(
    inbound: Inbound,
    prefetch: usize,
    dispatcher: D,
) -> Result<()>
where
    D: FnOnce(Feed) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Inbound {
        deliveries,
        backlog,
        settle,
        members,
        stop,
        paused,
        fault,
        fetcher,
        closer,
        status,
        ..
    } = inbound;
    let mut dispatcher = tokio::spawn(dispatcher(Feed {
        deliveries,
        backlog,
        members,
        acks: AckBuffer::new(settle, prefetch),
        gates: Gates {
            stopping: stop.subscribe(),
            paused: paused.subscribe(),
        },
    }));
    let mut fetcher = fetcher;
    // The dispatcher ends before the fetcher only when it died: it runs until stopped and
    // then until the fetcher's channel closes.
    let mut dispatched = None;
    let fetched = tokio::select! {
        fetched = &mut fetcher => fetched,
        ended = &mut dispatcher => {
            dispatched = Some(ended);
            let _ = stop.send(true);
            fetcher.await
        }
    };
    let fetched = fetched
        .unwrap_or_else(|e| Err(Error::new(ErrorKind::Closed, "fetch task failed").with_source(e)));
    // A permanent fetch failure stops the dispatcher too.
    let _ = stop.send(true);
    let timeout = closer.timeout;
    let drained = match dispatched {
        Some(ended) => Some(ended),
        None => {
            let abort = dispatcher.abort_handle();
            match tokio::time::timeout(timeout, dispatcher).await {
                Ok(ended) => Some(ended),
                Err(_) => {
                    abort.abort();
                    tracing::warn!(?timeout, "handlers still running at the shutdown deadline; their messages will be delivered again");
                    None
                }
            }
        }
    };
    let closed = closer.close().await;
    // The first failure is the one to report; the others are logged, never dropped.
    let mut failures = Vec::new();
    if let Err(e) = fetched {
        failures.push(e);
    }
    if let Some(e) = fault.take() {
        failures.push(e);
    }
    match drained {
        Some(Ok(())) => {}
        Some(Err(e)) => failures.push(
            Error::new(
                ErrorKind::Closed,
                "the subscription's dispatcher died; deliveries it held will be delivered again",
            )
            .with_source(e),
        ),
        None => failures.push(Error::new(
            ErrorKind::Timeout,
            format!("handlers still running after the shutdown timeout of {timeout:?}; their messages stay un-acknowledged"),
        )),
    }
    if let Err(e) = closed {
        failures.push(e);
    }
    let mut failures = failures.into_iter();
    let result = match failures.next() {
        None => Ok(()),
        Some(first) => {
            for other in failures {
                tracing::warn!(error = %other, "subscription also failed");
            }
            Err(first)
        }
    };
    status.ended(&result);
    result
}
