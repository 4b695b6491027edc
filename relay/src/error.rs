//! The relay's error: why a session ended or the relay stopped, and which
//! of those are worth another session (`is_transient`). Kafka's errors are
//! classified by the Kafka sink (`sink::kafka`), Postgres's by `replication`.

use std::time::Duration;

use rdkafka::error::KafkaError;

use crate::dedupe;
use crate::event;
use crate::lsn::Lsn;
use crate::pgoutput;
use crate::replication;
use crate::sink::{self, AccessDenied};

/// Why the relay stopped or a session ended.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("replication")]
    Replication(#[from] replication::ReplicationError),
    #[error("could not decode a pgoutput message")]
    Decode(#[from] pgoutput::DecodeError),
    #[error("could not turn an outbox row into a record")]
    Event(#[from] event::EventError),
    #[error("kafka")]
    Sink(#[from] sink::SinkError),
    #[error("exactly-once")]
    Dedupe(#[from] dedupe::DedupeError),
    #[error("kafka refused a record permanently ({0}); fix the cause (e.g. message.max.bytes) and restart")]
    DeliveryPermanent(#[source] KafkaError),
    #[error("kafka did not deliver a record ({0}); replaying from the confirmed position")]
    Delivery(#[source] KafkaError),
    #[error("kafka producer failed fatally: {0}; recreating it and replaying from the confirmed position")]
    ProducerFatal(String),
    /// Kafka refused the relay's credentials or an operation (no ACL).
    #[error(transparent)]
    KafkaAccess(AccessDenied),
    #[error("unexpected replication stream: {0}")]
    Protocol(String),
    #[error("kafka transaction failed; replaying from the confirmed position")]
    KafkaTransaction(#[source] KafkaError),
    /// Exactly-once with Kafka transactions: the partitions' last committed
    /// records hold part of one Postgres transaction.
    #[error(
        "the topic's partitions hold only part of the Postgres transaction committed at {commit_lsn}, \
         which Kafka transactions make impossible: their ends were read before every transaction marker \
         was written (or the topic was written without transactions, or its partition count changed); \
         reading them again"
    )]
    PartialTransaction { commit_lsn: Lsn },
    #[error("no message from Postgres for {0:?} (--lease): stopped producing and dropped the queue, so that a relay taking over the slot cannot be overtaken by this one")]
    LeaseExpired(Duration),
    #[error("cannot listen for HTTP on {addr}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl RelayError {
    /// Transient errors end a session and are retried with backoff; the
    /// others stop the relay.
    pub fn is_transient(&self) -> bool {
        match self {
            RelayError::Replication(e) => e.is_transient(),
            RelayError::Sink(e) => e.is_transient(),
            RelayError::Dedupe(e) => e.is_transient(),
            RelayError::Delivery(_)
            | RelayError::ProducerFatal(_)
            | RelayError::LeaseExpired(_)
            | RelayError::KafkaTransaction(_)
            | RelayError::PartialTransaction { .. } => true,
            RelayError::Decode(_)
            | RelayError::Event(_)
            | RelayError::DeliveryPermanent(_)
            | RelayError::KafkaAccess(_)
            | RelayError::Protocol(_)
            | RelayError::Listen { .. } => false,
        }
    }
}
