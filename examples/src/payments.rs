//! The payment service: charges each order once and reports the outcome.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use stream_core::{Result, Source, Streams, Subscription};

use crate::events::{OrderCreated, PaymentEvent};

/// The payment service. A deterministic rule stands in for a payment provider: amounts above
/// the limit are refused, so a run has both outcomes.
#[derive(Clone)]
pub struct PaymentService {
    limit_cents: u64,
    decided: Arc<Mutex<HashMap<String, PaymentEvent>>>,
    orders_seen: Arc<AtomicUsize>,
    published: Arc<AtomicUsize>,
    payment_events: Source<PaymentEvent>,
}

impl PaymentService {
    /// Binding the service consumes `OrderCreated` from.
    pub const ORDER_EVENTS_IN: &'static str = "order-events-in";
    /// Binding the service publishes payment events on.
    pub const PAYMENT_EVENTS_OUT: &'static str = "payment-events-out";

    /// Connects the service's source. Orders above `limit_cents` are refused.
    pub async fn new(streams: &Streams, limit_cents: u64) -> Result<Self> {
        Ok(PaymentService {
            limit_cents,
            decided: Arc::default(),
            orders_seen: Arc::default(),
            published: Arc::default(),
            payment_events: streams.source(Self::PAYMENT_EVENTS_OUT).await?,
        })
    }

    /// Starts consuming orders.
    pub async fn start(&self, streams: &Streams) -> Result<Subscription> {
        let service = self.clone();
        streams
            .sink::<OrderCreated>(Self::ORDER_EVENTS_IN)?
            .subscribe(move |order: OrderCreated| {
                let service = service.clone();
                async move { service.on_order(order).await }
            })
            .await
    }

    /// Decides an order once and publishes the outcome. A redelivered order is not charged
    /// again: the recorded outcome is published again instead, which the order service
    /// ignores if it already has it, and which covers a crash between deciding and
    /// publishing.
    #[tracing::instrument(skip_all, fields(order_id = %order.order_id))]
    pub async fn on_order(&self, order: OrderCreated) -> Result<()> {
        self.orders_seen.fetch_add(1, Ordering::SeqCst);
        let outcome = self
            .decided
            .lock()
            .unwrap()
            .entry(order.order_id.clone())
            .or_insert_with(|| self.decide(&order))
            .clone();
        self.payment_events
            .send_keyed(order.order_id.as_str(), &outcome)
            .await?;
        self.published.fetch_add(1, Ordering::SeqCst);
        tracing::debug!(?outcome, "payment decided");
        Ok(())
    }

    fn decide(&self, order: &OrderCreated) -> PaymentEvent {
        if order.amount_cents > self.limit_cents {
            PaymentEvent::PaymentFailed {
                order_id: order.order_id.clone(),
                reason: format!(
                    "amount {} over the limit of {}",
                    order.amount_cents, self.limit_cents
                ),
            }
        } else {
            PaymentEvent::PaymentCompleted {
                order_id: order.order_id.clone(),
                payment_id: format!("pay-{}", order.order_id),
            }
        }
    }

    /// How many orders were decided (each charged at most once).
    pub fn decided(&self) -> usize {
        self.decided.lock().unwrap().len()
    }

    /// `OrderCreated` events handled, redeliveries included.
    pub fn orders_seen(&self) -> usize {
        self.orders_seen.load(Ordering::SeqCst)
    }

    /// Payment events published, republished outcomes included.
    pub fn published(&self) -> usize {
        self.published.load(Ordering::SeqCst)
    }
}
