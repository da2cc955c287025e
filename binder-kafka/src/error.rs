//! Turning librdkafka errors into the library's [`ErrorKind`]s.

use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode as Code;
use stream_core::{Error, ErrorKind};

/// The kind of error `error` is, so that core knows what may be retried.
pub(crate) fn kind_of(error: &KafkaError) -> ErrorKind {
    match error {
        KafkaError::Canceled => ErrorKind::Closed,
        KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_) => ErrorKind::Config,
        KafkaError::NoMessageReceived => ErrorKind::Timeout,
        KafkaError::MessageConsumptionFatal(_) => ErrorKind::Broker,
        _ => match error.rdkafka_error_code() {
            Some(code) => kind_of_code(code),
            None => ErrorKind::Broker,
        },
    }
}

pub(crate) fn kind_of_code(code: Code) -> ErrorKind {
    match code {
        Code::MessageSizeTooLarge | Code::InvalidMessageSize | Code::MessageBatchTooLarge => {
            ErrorKind::PayloadTooLarge
        }
        Code::UnknownTopicOrPartition | Code::UnknownTopic | Code::UnknownPartition => {
            ErrorKind::DestinationNotFound
        }
        Code::MessageTimedOut
        | Code::OperationTimedOut
        | Code::RequestTimedOut
        | Code::TimedOutQueue
        | Code::QueueFull => ErrorKind::Timeout,
        Code::BrokerTransportFailure
        | Code::AllBrokersDown
        | Code::Resolve
        | Code::NetworkException
        | Code::BrokerNotAvailable
        | Code::LeaderNotAvailable
        | Code::NotLeaderForPartition
        | Code::CoordinatorNotAvailable
        | Code::CoordinatorLoadInProgress
        | Code::NotCoordinator
        | Code::WaitingForCoordinator
        | Code::NotEnoughReplicas
        | Code::NotEnoughReplicasAfterAppend => ErrorKind::Connection,
        _ => ErrorKind::Broker,
    }
}

/// `error` as a library error whose message starts with `context`.
pub(crate) fn convert(error: KafkaError, context: impl std::fmt::Display) -> Error {
    let kind = kind_of(&error);
    Error::new(kind, format!("{context}: {error}")).with_source(error)
}
