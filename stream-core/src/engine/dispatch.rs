//! Feeds deliveries to the worker: at most `concurrency` at once, one at a time per key, and
//! settles what the worker did with each.

use std::sync::Arc;
use std::time::Instant;

use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, watch};

use crate::binder::{DeliveryTag, Received};
use crate::engine::inbound::{Backlog, Members, Settlement};
use crate::engine::keyed::KeyedQueue;
use crate::engine::worker::{Outcome, Worker};

/// What a dispatcher works from: the deliveries, and where it settles them.
pub(crate) struct Feed {
    pub(crate) deliveries: mpsc::UnboundedReceiver<Received>,
    pub(crate) backlog: Arc<Backlog>,
    pub(crate) members: Arc<Members>,
    pub(crate) acks: AckBuffer,
    pub(crate) gates: Gates,
}

/// What makes the dispatcher stop starting deliveries: stopping for good, or a pause.
pub(crate) struct Gates {
    pub(crate) stopping: watch::Receiver<bool>,
    pub(crate) paused: watch::Receiver<bool>,
}

/// Acknowledgements on their way from the handlers to the ack loop, sent in bursts.
///
/// Sent one by one, each acknowledgement tended to find the ack loop asleep and woke it:
/// a thread wake-up per message, which on two cores cost more than the handler. They are
/// held only while the dispatcher has more work it can do at once: they go out when the
/// deliveries run dry, before awaiting a handler that did not finish at its first poll (a
/// slow or stuck handler must not hold earlier messages un-acknowledged; on Redis they would
/// be claimed by another member after `claim-idle`), and after `burst` of them.
pub(crate) struct AckBuffer {
    sender: mpsc::UnboundedSender<Settlement>,
    pending: Vec<DeliveryTag>,
    /// At most a quarter of the prefetch, so held acks never keep the fetch loop from
    /// overlapping the next fetch with handling.
    burst: usize,
}

impl AckBuffer {
    pub(crate) fn new(sender: mpsc::UnboundedSender<Settlement>, prefetch: usize) -> Self {
        let burst = (prefetch / 4).clamp(1, 32);
        AckBuffer {
            sender,
            pending: Vec::with_capacity(burst),
            burst,
        }
    }

    pub(crate) fn push(&mut self, tag: DeliveryTag) {
        self.pending.push(tag);
        if self.pending.len() >= self.burst {
            self.flush();
        }
    }

    /// Settles what the worker did with a delivery.
    pub(crate) fn settle(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Ack(tag) => self.push(tag),
            Outcome::Drop(tag) => self.settle_now(Settlement::Drop(tag)),
            Outcome::Interrupted => {}
        }
    }

    /// Settles a delivery that was not handled: released, or dropped.
    pub(crate) fn settle_now(&self, settlement: Settlement) {
        // The ack loop outlives every dispatcher; a send fails only at teardown.
        let _ = self.sender.send(settlement);
    }

    pub(crate) fn flush(&mut self) {
        for tag in self.pending.drain(..) {
            let _ = self.sender.send(Settlement::Ack(tag));
        }
    }
}

impl Drop for AckBuffer {
    fn drop(&mut self) {
        // Handled messages are acknowledged whatever way the dispatcher ends.
        self.flush();
    }
}

/// Deliveries the single-handler loop takes in a row before it yields to other tasks.
const MAX_STREAK: u32 = 512;

/// Feeds deliveries to the worker: at most `concurrency` at once, one at a time per key.
/// Once stopping, it starts nothing more: what it has not started is released (handed back
/// without counting an attempt) while running handlers finish.
pub(crate) async fn dispatch<T: Send + 'static>(
    worker: Arc<Worker<T>>,
    feed: Feed,
    concurrency: usize,
) {
    let Feed {
        mut deliveries,
        backlog,
        members,
        mut acks,
        gates: Gates {
            mut stopping,
            mut paused,
        },
    } = feed;
    if concurrency == 1 {
        // One at a time is per-key order already; no scheduling needed. This loop runs once
        // per message, so it avoids what it can: while deliveries are waiting it takes them
        // without a `select!`, and a handler that starts right after the previous one ended
        // starts at that one's end time (one clock read per message, not two).
        let mut previous_end = None;
        let mut streak = 0;
        loop {
            if streak >= MAX_STREAK {
                // `try_recv` never yields: without this, handlers that never wait would keep
                // the thread from other tasks for as long as deliveries keep coming.
                // tokio's `consume_budget` per message did the same but cost a tenth of
                // the in-memory binder's throughput.
                streak = 0;
                tokio::task::yield_now().await;
            }
            let (received, started) = match deliveries.try_recv() {
                Ok(received) if !*stopping.borrow() => {
                    streak += 1;
                    (received, previous_end.unwrap_or_else(Instant::now))
                }
                Ok(received) => {
                    backlog.take();
                    acks.settle_now(Settlement::Release(received.tag));
                    break;
                }
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) => {
                    streak = 0;
                    acks.flush();
                    let received = tokio::select! {
                        biased;
                        _ = stopping.wait_for(|s| *s) => break,
                        received = deliveries.recv() => received,
                    };
                    let Some(received) = received else { break };
                    (received, Instant::now())
                }
            };
            if *paused.borrow() {
                acks.flush();
                let resumed = tokio::select! {
                    biased;
                    _ = stopping.wait_for(|s| *s) => false,
                    _ = paused.wait_for(|p| !*p) => true,
                };
                if !resumed {
                    backlog.take();
                    acks.settle_now(Settlement::Release(received.tag));
                    break;
                }
            }
            backlog.take();
            if !members.holds(received.tag) {
                acks.settle_now(Settlement::Drop(received.tag));
                continue;
            }
            let mut handling = std::pin::pin!(worker.process(received, started));
            let (outcome, ended) = match futures::poll!(handling.as_mut()) {
                std::task::Poll::Ready(done) => done,
                std::task::Poll::Pending => {
                    acks.flush();
                    handling.await
                }
            };
            backlog.handled(ended.saturating_duration_since(started), 1);
            previous_end = Some(ended);
            acks.settle(outcome);
        }
        acks.flush();
        release_rest(&mut deliveries, &backlog, &acks).await;
        return;
    }
    let mut queue = KeyedQueue::<Received>::new();
    let mut running = FuturesUnordered::new();
    let mut open = true;
    let mut fed = true;
    loop {
        while open && !*paused.borrow() && running.len() < concurrency {
            let Some((slot, received)) = queue.pop() else {
                break;
            };
            backlog.take();
            if !members.holds(received.tag) {
                acks.settle_now(Settlement::Drop(received.tag));
                if queue.done(slot) {
                    backlog.add(1);
                }
                continue;
            }
            let worker = worker.clone();
            running.push(async move {
                let started = Instant::now();
                let (outcome, ended) = worker.process(received, started).await;
                (slot, outcome, ended.saturating_duration_since(started))
            });
        }
        if !open && running.is_empty() && !fed {
            return;
        }
        // Once stopping, the deliveries are no longer drained: flush every time.
        if !open || deliveries.is_empty() {
            acks.flush();
        }
        tokio::select! {
            Some((slot, outcome, took)) = running.next(), if !running.is_empty() => {
                backlog.handled(took, concurrency);
                if queue.done(slot) {
                    backlog.add(1);
                }
                acks.settle(outcome);
            }
            received = deliveries.recv(), if fed => match received {
                Some(received) if open => {
                    let slot = queue.slot(received.message.key());
                    if !queue.push(slot, received) {
                        // Held back behind its key; `done` counts it again when released.
                        backlog.take();
                    }
                }
                Some(received) => {
                    // Fetched as the consumer stopped: never started.
                    backlog.take();
                    acks.settle_now(Settlement::Release(received.tag));
                }
                None => {
                    fed = false;
                    if open {
                        open = false;
                        release_queued(&mut queue, &backlog, &acks);
                    }
                }
            },
            _ = stopping.wait_for(|s| *s), if open => {
                open = false;
                release_queued(&mut queue, &backlog, &acks);
            }
            // A pause or resume: the loop above looks at it again.
            Ok(()) = paused.changed(), if open => {}
        }
    }
}

/// Releases what the dispatcher queued and never started.
pub(crate) fn release_queued(
    queue: &mut KeyedQueue<Received>,
    backlog: &Backlog,
    acks: &AckBuffer,
) {
    for (ready, received) in queue.drain() {
        if ready {
            backlog.take();
        }
        acks.settle_now(Settlement::Release(received.tag));
    }
}

/// Releases what is still on its way from the fetch loop, until the loop has ended.
pub(crate) async fn release_rest(
    deliveries: &mut mpsc::UnboundedReceiver<Received>,
    backlog: &Backlog,
    acks: &AckBuffer,
) {
    while let Some(received) = deliveries.recv().await {
        backlog.take();
        acks.settle_now(Settlement::Release(received.tag));
    }
}
