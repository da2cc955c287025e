//! The order service: places orders, then marks them paid or cancels them (compensation)
//! as payment events come back.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use stream_core::{handler_fn, Envelope, Result, Source, Streams, Subscription};
use tokio::sync::watch;
use tower::ServiceBuilder;

use crate::events::{OrderCreated, PaymentEvent};
use crate::idempotency::SkipSeenLayer;

/// Where an order stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderStatus {
    /// Placed; waiting for the payment service.
    Pending,
    /// Paid.
    Paid,
    /// The payment failed and the order was cancelled.
    Cancelled,
}

/// Counts of orders by status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OrderSummary {
    /// Orders still waiting.
    pub pending: usize,
    /// Orders paid.
    pub paid: usize,
    /// Orders cancelled.
    pub cancelled: usize,
}

/// The order service. Its state is its own; it learns about payments only from events.
#[derive(Clone)]
pub struct OrderService {
    orders: Arc<Mutex<BTreeMap<String, OrderStatus>>>,
    order_events: Source<OrderCreated>,
    changed: Arc<watch::Sender<OrderSummary>>,
    payment_events_seen: Arc<AtomicUsize>,
    redelivered: SkipSeenLayer,
}

impl OrderService {
    /// Binding the service publishes `OrderCreated` on.
    pub const ORDER_EVENTS_OUT: &'static str = "order-events-out";
    /// Binding the service consumes payment events from.
    pub const PAYMENT_EVENTS_IN: &'static str = "payment-events-in";

    /// Connects the service's source.
    pub async fn new(streams: &Streams) -> Result<Self> {
        Ok(OrderService {
            orders: Arc::default(),
            order_events: streams.source(Self::ORDER_EVENTS_OUT).await?,
            changed: Arc::new(watch::channel(OrderSummary::default()).0),
            payment_events_seen: Arc::default(),
            redelivered: SkipSeenLayer::new(100_000),
        })
    }

    /// Starts consuming payment events. The handler is a `tower` service inside the
    /// [`SkipSeenLayer`] middleware: a payment event delivered again is acknowledged
    /// without being applied twice.
    pub async fn start(&self, streams: &Streams) -> Result<Subscription> {
        let service = self.clone();
        let handler = ServiceBuilder::new()
            .layer(self.redelivered.clone())
            .service(handler_fn(move |event: Envelope<PaymentEvent>| {
                let service = service.clone();
                async move {
                    service.on_payment(event.into_payload());
                    Ok::<(), std::convert::Infallible>(())
                }
            }));
        streams
            .sink::<PaymentEvent>(Self::PAYMENT_EVENTS_IN)?
            .subscribe_service(handler)
            .await
    }

    /// Payment events acknowledged without being applied, because their message was
    /// handled before.
    pub fn redeliveries_skipped(&self) -> usize {
        self.redelivered.skipped()
    }

    /// Records a pending order and publishes `OrderCreated`, keyed by the order id.
    ///
    /// Runs in a `place_order` span: with trace export on, the trace it starts continues
    /// through the send, the payment service and back here to [`on_payment`](Self::on_payment).
    #[tracing::instrument(skip_all, fields(order_id = order_id, amount_cents = amount_cents))]
    pub async fn place_order(
        &self,
        order_id: &str,
        customer: &str,
        amount_cents: u64,
    ) -> Result<()> {
        self.orders
            .lock()
            .unwrap()
            .insert(order_id.to_owned(), OrderStatus::Pending);
        self.publish_summary();
        let event = OrderCreated {
            order_id: order_id.to_owned(),
            customer: customer.to_owned(),
            amount_cents,
        };
        self.order_events.send_keyed(order_id, &event).await?;
        tracing::debug!("order placed");
        Ok(())
    }

    /// Applies a payment event. Idempotent: only a pending order changes, so a redelivered
    /// or duplicate event changes nothing.
    #[tracing::instrument(skip_all, fields(order_id = event.order_id()))]
    pub fn on_payment(&self, event: PaymentEvent) {
        self.payment_events_seen.fetch_add(1, Ordering::SeqCst);
        let mut orders = self.orders.lock().unwrap();
        let Some(status) = orders.get_mut(event.order_id()) else {
            // Another order service instance's order, or one from an earlier run.
            tracing::debug!(
                order = event.order_id(),
                "payment event for an unknown order"
            );
            return;
        };
        if *status != OrderStatus::Pending {
            return;
        }
        *status = match event {
            PaymentEvent::PaymentCompleted { .. } => OrderStatus::Paid,
            PaymentEvent::PaymentFailed { .. } => OrderStatus::Cancelled,
        };
        tracing::debug!(status = ?*status, "order settled");
        drop(orders);
        self.publish_summary();
    }

    /// The status of one order.
    pub fn status(&self, order_id: &str) -> Option<OrderStatus> {
        self.orders.lock().unwrap().get(order_id).copied()
    }

    /// Orders by status.
    pub fn summary(&self) -> OrderSummary {
        let orders = self.orders.lock().unwrap();
        let mut summary = OrderSummary::default();
        for status in orders.values() {
            match status {
                OrderStatus::Pending => summary.pending += 1,
                OrderStatus::Paid => summary.paid += 1,
                OrderStatus::Cancelled => summary.cancelled += 1,
            }
        }
        summary
    }

    /// Waits until no order is pending.
    pub async fn all_settled(&self) {
        let mut changes = self.changed.subscribe();
        let _ = changes.wait_for(|s| s.pending == 0).await;
    }

    /// Payment events handled, redeliveries and duplicates included.
    pub fn payment_events_seen(&self) -> usize {
        self.payment_events_seen.load(Ordering::SeqCst)
    }

    fn publish_summary(&self) {
        self.changed.send_replace(self.summary());
    }
}
