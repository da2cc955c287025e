//! Acknowledgements: `ack` queues the ids and returns; the consumer's next read carries them
//! to Redis, or a task of the consumer sends them on their own. [`AckQueue`] says why, and
//! what holds until Redis confirms.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::{RedisResult, Value};
use stream_core::{Error, ErrorKind};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::connection::{command_error, Conn};
use crate::entry::EntryId;
use crate::holdings::Holdings;

/// How long a queued acknowledgement waits for a read to carry it before it is sent alone.
/// Far below any sensible `claim-idle`, so no other member takes over an entry for lack of
/// its `XACK`.
const ACK_DELAY: Duration = Duration::from_millis(5);
/// Acknowledgements queued and not yet confirmed beyond which `ack` waits for the queue.
pub(crate) const MAX_QUEUED_ACKS: usize = 8192;
/// Failed `XACK`s of one batch tried again, once the consumer is gone, before its entries
/// are left to redelivery.
const ACK_TRIES: u32 = 20;

/// Acknowledgements core has made and Redis has not confirmed yet.
///
/// Core counts a delivery against the prefetch window until `ack` returns. An `ack` that
/// waited for `XACK` would keep that part of the window shut for a round trip per batch,
/// so the next read could only ask for what earlier acks had already freed: small reads,
/// each paying the full fixed cost of a round trip (and, with `appendfsync always`, of an
/// fsync). So `ack` only queues the ids. The next `XREADGROUP` for new entries carries
/// them: `XACK` and `XREADGROUP` go in one pipeline, which Redis runs in one event-loop
/// turn with one fsync. Ids no read picked up within [`ACK_DELAY`] (the stream is idle and
/// the read blocks, or the fetch loop waits) are sent on their own by [`send_acks`].
///
/// The handlers are done with these entries; what is in flight is the id. Until Redis
/// confirms, the entries stay held (see [`Holdings`]): neither a pending pass nor a claim of
/// this consumer hands them out again, the keepalive keeps other members off them, and
/// `close` records the queue before it hands anything back.
///
/// An `XACK` that fails is sent again, with backoff, for as long as the consumer lives: the
/// entry stays held meanwhile rather than being delivered a second time. When Redis refuses
/// it for good (a `NOPERM` from an ACL, a key that is no stream any more), the refusal is
/// kept: the next `receive` returns it, which ends the subscription with that error, and
/// `close` leaves those entries pending (they are delivered again after `claim-idle`, once
/// the consumer no longer keeps them) and returns it too. A process that dies with
/// acknowledgements queued leaves those entries pending, to be delivered again like any
/// other un-acknowledged entry.
pub(crate) struct AckQueue {
    state: Mutex<AckState>,
    /// Wakes [`send_acks`].
    wake: Notify,
    progress: watch::Sender<AckProgress>,
}

/// What waiters on the queue look at.
#[derive(Debug, Clone, Copy, Default)]
struct AckProgress {
    /// Queued or being sent, not yet settled (confirmed, or given up on).
    outstanding: usize,
    /// Redis refused an `XACK` for good: waiting for the queue to drain is pointless.
    refused: bool,
}

#[derive(Default)]
struct AckState {
    queued: Vec<EntryId>,
    /// When the oldest of `queued` arrived.
    since: Option<Instant>,
    /// Send at once: the consumer is closing or gone.
    urgent: bool,
    /// The consumer is gone: [`send_acks`] sends what is left and ends.
    dropped: bool,
    /// Taken by [`send_acks`] and not settled yet.
    sending: Vec<EntryId>,
    /// Why Redis refused an `XACK` for good, once it has.
    refusal: Option<(ErrorKind, String)>,
}

impl AckQueue {
    pub(crate) fn new() -> AckQueue {
        AckQueue {
            state: Mutex::default(),
            wake: Notify::new(),
            progress: watch::Sender::new(AckProgress::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AckState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn push(&self, ids: impl IntoIterator<Item = EntryId>) {
        let mut state = self.lock();
        let before = state.queued.len();
        state.queued.extend(ids);
        let added = state.queued.len() - before;
        // Counted before anyone can take them, so the count never drops below zero.
        self.progress.send_modify(|p| p.outstanding += added);
        let first = state.since.is_none();
        state.since.get_or_insert_with(Instant::now);
        drop(state);
        // Later ones are due no sooner than the first, which the sender already waits for.
        if first {
            self.wake.notify_one();
        }
    }

    /// Takes everything queued, for a read to carry.
    pub(crate) fn take(&self) -> Vec<EntryId> {
        let mut state = self.lock();
        state.since = None;
        std::mem::take(&mut state.queued)
    }

    /// Puts back ids whose `XACK` may not have run; sending one twice is harmless.
    fn put_back(&self, mut ids: Vec<EntryId>) {
        let mut state = self.lock();
        ids.append(&mut state.queued);
        state.queued = ids;
        state.since.get_or_insert_with(Instant::now);
        drop(state);
        self.wake.notify_one();
    }

    /// The ids [`send_acks`] is to send now, after giving reads [`ACK_DELAY`] to carry
    /// them; `None` once the consumer is gone and nothing is left.
    async fn due(&self) -> Option<Vec<EntryId>> {
        loop {
            let wait = {
                let mut state = self.lock();
                match state.since {
                    None if state.dropped => return None,
                    None => None,
                    Some(since) => {
                        let due = since + ACK_DELAY;
                        if state.urgent || state.dropped || Instant::now() >= due {
                            state.since = None;
                            let ids = std::mem::take(&mut state.queued);
                            state.sending.clone_from(&ids);
                            return Some(ids);
                        }
                        Some(due)
                    }
                }
            };
            match wait {
                // A wake-up sent between the look above and this wait is kept, not lost.
                None => self.wake.notified().await,
                Some(due) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(due) => {}
                        _ = self.wake.notified() => {}
                    }
                }
            }
        }
    }

    /// What was queued meanwhile, to go along with a retry of [`send_acks`]'s batch.
    fn take_more(&self) -> Vec<EntryId> {
        let mut state = self.lock();
        state.since = None;
        let more = std::mem::take(&mut state.queued);
        state.sending.extend_from_slice(&more);
        more
    }

    fn settled(&self, n: usize) {
        self.progress.send_modify(|p| p.outstanding -= n);
    }

    /// Settles [`send_acks`]'s batch.
    fn sent(&self, n: usize) {
        self.lock().sending.clear();
        self.settled(n);
    }

    fn is_dropped(&self) -> bool {
        self.lock().dropped
    }

    /// The consumer is gone: [`send_acks`] sends what is left and ends.
    pub(crate) fn consumer_dropped(&self) {
        self.lock().dropped = true;
        self.wake.notify_one();
    }

    /// Keeps the first refusal, for `receive` and `close` to report.
    fn refuse(&self, error: &Error) {
        let mut state = self.lock();
        if state.refusal.is_none() {
            state.refusal = Some((error.kind(), error.message().to_owned()));
            drop(state);
            self.progress.send_modify(|p| p.refused = true);
        }
    }

    pub(crate) fn refusal(&self) -> Option<(ErrorKind, String)> {
        self.lock().refusal.clone()
    }

    /// Acknowledged ids Redis has not confirmed.
    pub(crate) fn unconfirmed(&self) -> Vec<EntryId> {
        let state = self.lock();
        let mut ids = state.sending.clone();
        ids.extend_from_slice(&state.queued);
        ids
    }

    /// Sends what is queued without waiting for a read, and waits until it is settled or
    /// Redis refused some of it for good.
    pub(crate) async fn flush(&self) {
        self.lock().urgent = true;
        self.wake.notify_one();
        self.drained_to(0).await;
        self.lock().urgent = false;
    }

    /// Waits until at most `limit` acknowledgements are outstanding, or one was refused.
    pub(crate) async fn drained_to(&self, limit: usize) {
        let done = |p: &AckProgress| p.outstanding <= limit || p.refused;
        if done(&self.progress.borrow()) {
            return;
        }
        let mut progress = self.progress.subscribe();
        let _ = progress.wait_for(done).await;
    }
}

/// Ids a read carries; put back into the queue if the read is dropped before the reply
/// says whether its `XACK` ran.
pub(crate) struct Carried<'a> {
    pub(crate) acks: &'a AckQueue,
    pub(crate) ids: Vec<EntryId>,
}

impl Carried<'_> {
    pub(crate) fn settle(mut self, holdings: &Holdings, outcome: RedisResult<Value>) {
        let ids = std::mem::take(&mut self.ids);
        match outcome {
            Ok(_) => {
                holdings.forget(&ids);
                self.acks.settled(ids.len());
            }
            // The group is gone, and with it what there was to acknowledge.
            Err(e) if e.code() == Some("NOGROUP") => {
                holdings.forget(&ids);
                self.acks.settled(ids.len());
            }
            Err(e) => {
                let error = command_error(&format!("XACK of {} entries", ids.len()), e);
                if !error.is_temporary() {
                    // Carried by every read, a refused XACK would never reach the sender
                    // that reports it.
                    self.acks.refuse(&error);
                }
                // Sent again on their own, with the retries that path has.
                self.acks.put_back(ids);
            }
        }
    }
}

impl Drop for Carried<'_> {
    fn drop(&mut self) {
        if !self.ids.is_empty() {
            self.acks.put_back(std::mem::take(&mut self.ids));
        }
    }
}

/// Sends queued acknowledgements, one `XACK` for whatever gathered while the previous one
/// was on its way, until the consumer is dropped and the queue is empty. A failed `XACK`
/// is sent again until it passes; only once the consumer is gone does it give up (see
/// [`AckQueue`]).
pub(crate) async fn send_acks(
    acks: Arc<AckQueue>,
    holdings: Arc<Holdings>,
    mut conn: Conn,
    stream: String,
    group: String,
) {
    while let Some(mut ids) = acks.due().await {
        if ids.is_empty() {
            continue;
        }
        let mut tries = 0;
        loop {
            let result = redis::cmd("XACK")
                .arg(&stream)
                .arg(&group)
                .arg(&ids)
                .query_async::<i64>(&mut conn)
                .await;
            match result {
                Ok(_) => {
                    holdings.forget(&ids);
                    break;
                }
                Err(e) if e.code() == Some("NOGROUP") => {
                    tracing::warn!(%stream, %group, count = ids.len(), "consumer group is gone; nothing left to acknowledge");
                    holdings.forget(&ids);
                    break;
                }
                // The first command after a dropped connection fails while the connection is
                // re-made; XACK is idempotent, so it is simply sent again.
                Err(e) if e.is_connection_dropped() && tries == 0 => {}
                Err(e) => {
                    let error = command_error(
                        &format!(
                            "XACK of {} entries on stream `{stream}` group `{group}`",
                            ids.len()
                        ),
                        e,
                    );
                    if acks.is_dropped() && tries >= ACK_TRIES {
                        // Nobody is left to report to; the entries stay pending.
                        tracing::error!(%stream, %group, count = ids.len(), %error, "XACK failed; these entries will be delivered again");
                        break;
                    }
                    let wait = ack_backoff(tries);
                    if error.is_temporary() {
                        tracing::warn!(%stream, %group, %error, retry_in = ?wait, "XACK failed; retrying");
                    } else {
                        if acks.refusal().is_none() {
                            tracing::error!(%stream, %group, count = ids.len(), %error, "redis refuses XACK; the consumer stops, and these entries stay pending");
                        }
                        acks.refuse(&error);
                    }
                    tokio::time::sleep(wait).await;
                }
            }
            tries += 1;
            // Whatever was acknowledged meanwhile goes along with the retry.
            ids.append(&mut acks.take_more());
        }
        acks.sent(ids.len());
    }
}

/// 50 ms doubling to 5 s, as core waits between failed acks.
fn ack_backoff(tries: u32) -> Duration {
    let ms = 50u64.saturating_mul(1 << tries.min(7));
    Duration::from_millis(ms.min(5_000))
}
