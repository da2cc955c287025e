//! The consume engine: the fetch window and the ack loop ([`inbound`]), the dispatch of
//! deliveries to handlers under per-key order ([`dispatch`], [`keyed`], [`batch`]), the
//! attempts of one delivery ([`worker`]) and the life of a subscription ([`supervise`]).
//!
//! Nothing here is public: the public face ([`Sink`](crate::Sink), [`Deliveries`](crate::Deliveries),
//! [`Subscription`](crate::Subscription)) is built on it.

pub(crate) mod batch;
pub(crate) mod dispatch;
pub(crate) mod inbound;
pub(crate) mod keyed;
pub(crate) mod supervise;
pub(crate) mod worker;
