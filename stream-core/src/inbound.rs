//! The consumer side shared by handler and pull styles: fetching under the prefetch bound,
//! batched acknowledgements, and an orderly close.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;

use crate::binder::{Consumer, ConsumerOptions, DeliveryTag, Received, StartFrom};
use crate::channel::Channel;
use crate::dead_letter::DeadLetter;
use crate::Result;

/// Largest batch asked of a binder in one `receive`, whatever the prefetch.
const MAX_FETCH: usize = 1024;
/// Largest batch of tags given to one `ack`.
const MAX_ACK_BATCH: usize = 1024;
/// Failed acks of a batch tried again before its messages are left to redelivery.
const ACK_TRIES: u32 = 20;

/// A running consumer: a fetch task feeding `deliveries`, an ack task draining `acks`.
pub(crate) struct Inbound {
    pub(crate) deliveries: mpsc::UnboundedReceiver<Received>,
    pub(crate) acks: mpsc::UnboundedSender<DeliveryTag>,
    pub(crate) stop: watch::Sender<bool>,
    pub(crate) dead_letter: Arc<DeadLetter>,
    pub(crate) fetcher: JoinHandle<Result<()>>,
    pub(crate) closer: Closer,
}

/// What is left to do after the fetcher stopped and every ack sender is gone.
pub(crate) struct Closer {
    consumer: Arc<dyn Consumer>,
    acker: JoinHandle<()>,
    dead_letter: Arc<DeadLetter>,
    pub(crate) timeout: Duration,
}

impl Inbound {
    pub(crate) async fn open(channel: &Channel) -> Result<Inbound> {
        let config = &channel.config;
        let options = match &config.group {
            Some(group) => ConsumerOptions::new(group.clone()).start_from(config.start_from),
            None => ConsumerOptions::new(format!("anonymous.{}", crate::unique_suffix()))
                .anonymous()
                .start_from(StartFrom::Latest),
        }
        .prefetch(config.prefetch)
        .claim_idle(config.claim_idle);
        let consumer: Arc<dyn Consumer> = channel
            .binder
            .consumer(&config.destination, &options)
            .await?
            .into();
        let dead_letter = Arc::new(DeadLetter::new(
            channel.binder.clone(),
            config.dead_letter_destination(),
            &config.destination,
            &options.group,
        ));
        let permits = Arc::new(Semaphore::new(config.prefetch));
        let (deliveries_tx, deliveries) = mpsc::unbounded_channel();
        let (acks, acks_rx) = mpsc::unbounded_channel();
        let (stop, stop_rx) = watch::channel(false);
        let fetcher = tokio::spawn(fetch_loop(
            consumer.clone(),
            permits.clone(),
            deliveries_tx,
            stop_rx,
        ));
        let acker = tokio::spawn(ack_loop(consumer.clone(), permits, acks_rx));
        Ok(Inbound {
            deliveries,
            acks,
            stop,
            dead_letter: dead_letter.clone(),
            fetcher,
            closer: Closer {
                consumer,
                acker,
                dead_letter,
                timeout: config.shutdown_timeout,
            },
        })
    }
}

impl Closer {
    /// Waits (bounded) for pending acks to reach the broker, then leaves the group.
    pub(crate) async fn close(self) -> Result<()> {
        if tokio::time::timeout(self.timeout, self.acker)
            .await
            .is_err()
        {
            tracing::warn!("acknowledgements still outstanding at shutdown; those messages will be delivered again");
        }
        self.dead_letter.close().await;
        self.consumer.close().await
    }
}

async fn fetch_loop(
    consumer: Arc<dyn Consumer>,
    permits: Arc<Semaphore>,
    deliveries: mpsc::UnboundedSender<Received>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let mut failures = 0u32;
    loop {
        // Each delivery holds a permit until acknowledged: at most `prefetch` are in memory.
        let first = tokio::select! {
            permit = permits.acquire() => permit,
            _ = stop.wait_for(|stopped| *stopped) => return Ok(()),
        };
        first.expect("the semaphore is never closed").forget();
        let mut taken = 1;
        while taken < MAX_FETCH {
            match permits.try_acquire() {
                Ok(permit) => {
                    permit.forget();
                    taken += 1;
                }
                Err(_) => break,
            }
        }
        let received = tokio::select! {
            received = consumer.receive(taken) => received,
            _ = stop.wait_for(|stopped| *stopped) => {
                permits.add_permits(taken);
                return Ok(());
            }
        };
        match received {
            Ok(batch) => {
                failures = 0;
                permits.add_permits(taken.saturating_sub(batch.len()));
                for delivery in batch {
                    if deliveries.send(delivery).is_err() {
                        return Ok(());
                    }
                }
            }
            Err(e) if e.is_temporary() => {
                permits.add_permits(taken);
                failures += 1;
                let wait = reconnect_backoff(failures);
                tracing::warn!(error = %e, retry_in = ?wait, "receive failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.wait_for(|stopped| *stopped) => return Ok(()),
                }
            }
            Err(e) => {
                permits.add_permits(taken);
                tracing::error!(error = %e, "receive failed permanently; consumer stops");
                return Err(e);
            }
        }
    }
}

async fn ack_loop(
    consumer: Arc<dyn Consumer>,
    permits: Arc<Semaphore>,
    mut acks: mpsc::UnboundedReceiver<DeliveryTag>,
) {
    let mut batch = Vec::with_capacity(MAX_ACK_BATCH);
    // Acks that arrive while one is in flight are gathered into the next batch.
    while acks.recv_many(&mut batch, MAX_ACK_BATCH).await > 0 {
        let mut tries = 0;
        loop {
            match consumer.ack(&batch).await {
                Ok(()) => break,
                Err(e) if e.is_temporary() && tries < ACK_TRIES => {
                    tries += 1;
                    let wait = reconnect_backoff(tries);
                    tracing::warn!(error = %e, retry_in = ?wait, "ack failed; retrying");
                    tokio::time::sleep(wait).await;
                }
                Err(e) => {
                    tracing::error!(error = %e, count = batch.len(), "ack failed; these messages will be delivered again");
                    break;
                }
            }
        }
        permits.add_permits(batch.len());
        batch.clear();
    }
}

/// 50 ms doubling to 5 s: for broker reconnects, not for handler retries.
pub(crate) fn reconnect_backoff(failures: u32) -> Duration {
    let ms = 50u64.saturating_mul(1 << failures.min(7).saturating_sub(1));
    Duration::from_millis(ms.min(5_000))
}
