//! The events the services exchange. Each service owns its state; these are the only thing
//! they share.

use serde::{Deserialize, Serialize};

/// Published by the order service to `order-events` when a customer places an order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderCreated {
    /// The order's id, also the message key: events of one order stay in order.
    pub order_id: String,
    /// Who ordered.
    pub customer: String,
    /// What the payment service must charge.
    pub amount_cents: u64,
}

/// Published by the payment service to `payment-events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum PaymentEvent {
    /// The customer was charged.
    PaymentCompleted {
        /// The order paid for.
        order_id: String,
        /// The payment's id.
        payment_id: String,
    },
    /// The charge was refused; the order service compensates by cancelling the order.
    PaymentFailed {
        /// The order that could not be paid.
        order_id: String,
        /// Why.
        reason: String,
    },
}

impl PaymentEvent {
    /// The order this event is about.
    pub fn order_id(&self) -> &str {
        match self {
            PaymentEvent::PaymentCompleted { order_id, .. }
            | PaymentEvent::PaymentFailed { order_id, .. } => order_id,
        }
    }
}
