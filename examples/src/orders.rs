//! The order service: places orders, then marks them paid or cancels them (compensation)
//! as payment events come back.
//!
//! An order and its `OrderCreated` event are written in one transaction, the event through
//! a transactional outbox that a relay publishes: in PostgreSQL
//! ([`OrderService::with_postgres`]), or in memory for tests and the demo
//! ([`OrderService::new`]). An order is never placed without its event, nor an event
//! published for an order that was not placed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use stream_core::{handler_fn, Envelope, Error, ErrorKind, Result, Streams, Subscription};
use stream_outbox::{MemoryOutbox, Outbox, Relay, RelayHandle};
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

/// Where orders and their events are written.
// One per service, behind an `Arc`: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Store {
    Memory(MemoryOutbox),
    Postgres {
        // One connection, held for each transaction: enough for an example; a service
        // would use a pool.
        client: tokio::sync::Mutex<tokio_postgres::Client>,
        outbox: Outbox,
    },
}

/// The order service. Its state is its own; it learns about payments only from events.
#[derive(Clone)]
pub struct OrderService {
    /// This instance's orders as they stand (the database, when there is one, is the
    /// record; this mirrors what this instance placed and saw settled).
    orders: Arc<Mutex<BTreeMap<String, OrderStatus>>>,
    store: Arc<Store>,
    relay: Arc<Mutex<Option<RelayHandle>>>,
    changed: Arc<watch::Sender<OrderSummary>>,
    payment_events_seen: Arc<AtomicUsize>,
    redelivered: SkipSeenLayer,
}

impl OrderService {
    /// Binding the service publishes `OrderCreated` on.
    pub const ORDER_EVENTS_OUT: &'static str = "order-events-out";
    /// Binding the service consumes payment events from.
    pub const PAYMENT_EVENTS_IN: &'static str = "payment-events-in";

    /// A service that keeps its orders and outbox in memory, with its relay running.
    pub async fn new(streams: &Streams) -> Result<Self> {
        let outbox = MemoryOutbox::new();
        let relay = Relay::new(outbox.clone(), streams.clone()).spawn();
        Ok(OrderService::with_store(Store::Memory(outbox), relay))
    }

    /// A service that keeps its orders (table `orders`) and its outbox in the PostgreSQL
    /// database at `url`, creating the tables if needed, with its relay running.
    pub async fn with_postgres(streams: &Streams, url: &str) -> Result<Self> {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .map_err(|e| database_error("connecting", e))?;
        tokio::spawn(connection);
        let outbox = Outbox::new();
        outbox.install(&client).await?;
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS orders (
                     id text PRIMARY KEY,
                     customer text NOT NULL,
                     amount_cents bigint NOT NULL,
                     status text NOT NULL
                 )",
            )
            .await
            .map_err(|e| database_error("creating the orders table", e))?;
        let relay = Relay::new(outbox.reader(url)?, streams.clone()).spawn();
        let store = Store::Postgres {
            client: tokio::sync::Mutex::new(client),
            outbox,
        };
        Ok(OrderService::with_store(store, relay))
    }

    /// [`with_postgres`](Self::with_postgres) when `database` is set, else [`new`](Self::new).
    pub async fn open(streams: &Streams, database: Option<&str>) -> Result<Self> {
        match database {
            Some(url) => OrderService::with_postgres(streams, url).await,
            None => OrderService::new(streams).await,
        }
    }

    fn with_store(store: Store, relay: RelayHandle) -> Self {
        OrderService {
            orders: Arc::default(),
            store: Arc::new(store),
            relay: Arc::new(Mutex::new(Some(relay))),
            changed: Arc::new(watch::channel(OrderSummary::default()).0),
            payment_events_seen: Arc::default(),
            redelivered: SkipSeenLayer::new(100_000),
        }
    }

    /// Stops the outbox relay once the batch in hand is published.
    pub async fn stop(&self) -> Result<()> {
        let relay = self.relay.lock().unwrap().take();
        match relay {
            Some(relay) => relay.shutdown().await,
            None => Ok(()),
        }
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
                async move { service.on_payment(event.into_payload()).await }
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

    /// Records a pending order and, in the same transaction, its `OrderCreated` event
    /// (keyed by the order id) for the relay to publish.
    ///
    /// Runs in a `place_order` span: with trace export on, the trace it starts continues
    /// through the outbox write, the payment service and back here to
    /// [`on_payment`](Self::on_payment).
    #[tracing::instrument(skip_all, fields(order_id = order_id, amount_cents = amount_cents))]
    pub async fn place_order(
        &self,
        order_id: &str,
        customer: &str,
        amount_cents: u64,
    ) -> Result<()> {
        let event = OrderCreated {
            order_id: order_id.to_owned(),
            customer: customer.to_owned(),
            amount_cents,
        };
        // Known as pending before its event can leave: the payment for it may come back
        // before this call returns, and a payment for an unknown order is ignored.
        self.orders
            .lock()
            .unwrap()
            .insert(order_id.to_owned(), OrderStatus::Pending);
        if let Err(e) = self
            .record_order(order_id, customer, amount_cents, &event)
            .await
        {
            self.orders.lock().unwrap().remove(order_id);
            return Err(e);
        }
        self.publish_summary();
        tracing::debug!("order placed");
        Ok(())
    }

    /// Writes the order and its `OrderCreated` event in one transaction.
    async fn record_order(
        &self,
        order_id: &str,
        customer: &str,
        amount_cents: u64,
        event: &OrderCreated,
    ) -> Result<()> {
        match &*self.store {
            Store::Memory(outbox) => {
                let mut tx = outbox.transaction();
                tx.send(Self::ORDER_EVENTS_OUT, order_id, event)?;
                tx.commit();
            }
            Store::Postgres { client, outbox } => {
                let mut client = client.lock().await;
                let tx = client
                    .transaction()
                    .await
                    .map_err(|e| database_error("starting a transaction", e))?;
                tx.execute(
                    "INSERT INTO orders (id, customer, amount_cents, status)
                     VALUES ($1, $2, $3, 'pending')",
                    &[&order_id, &customer, &(amount_cents as i64)],
                )
                .await
                .map_err(|e| database_error("recording the order", e))?;
                outbox
                    .send(&tx, Self::ORDER_EVENTS_OUT, order_id, event)
                    .await?;
                tx.commit()
                    .await
                    .map_err(|e| database_error("committing the order", e))?;
            }
        }
        Ok(())
    }

    /// Applies a payment event. Idempotent: only a pending order changes, so a redelivered
    /// or duplicate event changes nothing.
    #[tracing::instrument(skip_all, fields(order_id = event.order_id()))]
    pub async fn on_payment(&self, event: PaymentEvent) -> Result<()> {
        self.payment_events_seen.fetch_add(1, Ordering::SeqCst);
        let settled = match event {
            PaymentEvent::PaymentCompleted { .. } => OrderStatus::Paid,
            PaymentEvent::PaymentFailed { .. } => OrderStatus::Cancelled,
        };
        if let Store::Postgres { client, .. } = &*self.store {
            let status = match settled {
                OrderStatus::Paid => "paid",
                _ => "cancelled",
            };
            client
                .lock()
                .await
                .execute(
                    "UPDATE orders SET status = $2 WHERE id = $1 AND status = 'pending'",
                    &[&event.order_id(), &status],
                )
                .await
                .map_err(|e| database_error("settling the order", e))?;
        }
        let mut orders = self.orders.lock().unwrap();
        let Some(status) = orders.get_mut(event.order_id()) else {
            // Another order service instance's order, or one from an earlier run.
            tracing::debug!(
                order = event.order_id(),
                "payment event for an unknown order"
            );
            return Ok(());
        };
        if *status != OrderStatus::Pending {
            return Ok(());
        }
        *status = settled;
        tracing::debug!(status = ?*status, "order settled");
        drop(orders);
        self.publish_summary();
        Ok(())
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

fn database_error(doing: &str, error: tokio_postgres::Error) -> Error {
    Error::new(ErrorKind::Connection, format!("orders database: {doing}")).with_source(error)
}
