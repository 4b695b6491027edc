//! What a Kafka error means for the relay: retried by replaying from the
//! confirmed position, or definite (the relay stops and names the cause).

use lifecycle::kafka::AccessDenied;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::dedupe;
use crate::error::{RefusedRecord, RelayError};

/// Errors a replay cannot fix stop the relay, naming the record (`refused`);
/// the rest are retried.
pub fn classify_delivery(error: KafkaError, refused: impl FnOnce() -> RefusedRecord) -> RelayError {
    if let Some(denied) = AccessDenied::from_error(&error, "producing a record") {
        return RelayError::KafkaAccess(denied);
    }
    let permanent = matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidRecord
        )
    );
    if permanent {
        RelayError::DeliveryPermanent {
            refused: Box::new(refused()),
            error,
        }
    } else {
        RelayError::Delivery(error)
    }
}

/// A fenced or otherwise fatal producer is replaced; the rest is retried by
/// replaying from the confirmed position. Refused access (no ACL for the
/// transactional id) stops the relay.
pub fn txn_error(e: KafkaError) -> RelayError {
    if let Some(denied) = AccessDenied::from_error(&e, format!("Kafka transaction: {e}")) {
        return RelayError::KafkaAccess(denied);
    }
    match &e {
        KafkaError::Transaction(t) if t.is_fatal() => RelayError::ProducerFatal(e.to_string()),
        _ => RelayError::KafkaTransaction(e),
    }
}

/// Reading a topic's end (exactly-once) without the right to: definite.
pub fn dedupe_error(e: dedupe::DedupeError) -> RelayError {
    match &e {
        dedupe::DedupeError::Kafka { topic, source } => {
            let detail = format!(
                "reading the ends of topic {topic} for the exactly-once restart \
                 (READ on the topic, DESCRIBE on group outbox-relay-dedupe)"
            );
            match AccessDenied::from_error(source, detail) {
                Some(denied) => RelayError::KafkaAccess(denied),
                None => RelayError::Dedupe(e),
            }
        }
        _ => RelayError::Dedupe(e),
    }
}
