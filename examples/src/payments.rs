//! The payment service: charges each order once and reports the outcome.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use stream_core::{Envelope, Output, Result, Streams, Subscription};

use crate::events::{OrderCreated, PaymentEvent};

/// The payment service: a processor from order events to payment events. A deterministic
/// rule stands in for a payment provider: amounts above the limit are refused, so a run has
/// both outcomes.
#[derive(Clone)]
pub struct PaymentService {
    limit_cents: u64,
    decided: Arc<Mutex<HashMap<String, PaymentEvent>>>,
    orders_seen: Arc<AtomicUsize>,
    published: Arc<AtomicUsize>,
}

impl PaymentService {
    /// Binding the service consumes `OrderCreated` from.
    pub const ORDER_EVENTS_IN: &'static str = "order-events-in";
    /// Binding the service publishes payment events on.
    pub const PAYMENT_EVENTS_OUT: &'static str = "payment-events-out";

    /// A service that refuses orders above `limit_cents`.
    pub fn new(limit_cents: u64) -> Self {
        PaymentService {
            limit_cents,
            decided: Arc::default(),
            orders_seen: Arc::default(),
            published: Arc::default(),
        }
    }

    /// Starts the processor: each order in, its payment event out, keyed by the order id
    /// (whatever key the order came with); the order is acknowledged once the broker
    /// accepted the payment event.
    pub async fn start(&self, streams: &Streams) -> Result<Subscription> {
        let service = self.clone();
        streams
            .processor_envelope(
                Self::ORDER_EVENTS_IN,
                Self::PAYMENT_EVENTS_OUT,
                move |order: Envelope<OrderCreated>| {
                    let service = service.clone();
                    async move {
                        let order = order.into_payload();
                        let key = order.order_id.clone();
                        let event = Output::new(service.on_order(order)).key(key);
                        Ok::<_, std::convert::Infallible>(Some(event))
                    }
                },
            )
            .await
    }

    /// Decides an order once and returns the outcome to publish. A redelivered order is
    /// not charged again: the recorded outcome is returned again instead, which the order
    /// service ignores if it already has it, and which covers a crash between deciding and
    /// publishing.
    #[tracing::instrument(skip_all, fields(order_id = %order.order_id))]
    pub fn on_order(&self, order: OrderCreated) -> PaymentEvent {
        self.orders_seen.fetch_add(1, Ordering::SeqCst);
        let outcome = self
            .decided
            .lock()
            .unwrap()
            .entry(order.order_id.clone())
            .or_insert_with(|| self.decide(&order))
            .clone();
        self.published.fetch_add(1, Ordering::SeqCst);
        tracing::debug!(?outcome, "payment decided");
        outcome
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

    /// Payment events handed to the processor to publish, republished outcomes included.
    pub fn published(&self) -> usize {
        self.published.load(Ordering::SeqCst)
    }
}
