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

/// The record Kafka refused, as an operator needs to find it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefusedRecord {
    /// Its `event_id` header (the outbox row's id), when it has one.
    pub event_id: Option<String>,
    /// Key, value and headers, bytes.
    pub bytes: usize,
    pub topic: String,
    /// The producer's `message.max.bytes`.
    pub producer_limit: usize,
    /// The topic's `max.message.bytes`, when it could be read.
    pub topic_limit: Option<usize>,
}

impl std::fmt::Display for RefusedRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.event_id {
            Some(id) => write!(f, "event {id}")?,
            None => f.write_str("a record")?,
        }
        write!(f, " ({} bytes, topic {}", self.bytes, self.topic)?;
        if let Some(limit) = self.topic_limit {
            write!(f, " of max.message.bytes {limit}")?;
        }
        f.write_str(")")
    }
}

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
    /// A record no replay can deliver (too large, invalid): the relay stops
    /// rather than skip it, and every later event waits behind it.
    #[error(
        "kafka refused {refused} permanently ({error}); every later event waits behind it. \
         If it is over a size limit: raise the topic's max.message.bytes (kafka-configs.sh \
         --alter --entity-type topics --entity-name {topic} --add-config max.message.bytes=N) \
         and the relay's message.max.bytes (now {producer_limit}; --kafka-property \
         message.max.bytes=N) above its size, then restart; or dead-letter exactly this \
         event: restart with --dead-letter-event-ids {id} (--dead-letter-refused does so \
         for every refused event)",
        topic = refused.topic,
        producer_limit = refused.producer_limit,
        id = refused.event_id.as_deref().unwrap_or("<its outbox id>")
    )]
    DeliveryPermanent {
        /// Boxed: keeps every `Result<_, RelayError>` small.
        refused: Box<RefusedRecord>,
        /// In the message, not a source: the chain would say it twice.
        error: KafkaError,
    },
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
    /// The slot is missing although the topic holds this pipeline's records:
    /// it was dropped or lost. A new slot would start at the current
    /// position and skip what was committed in between. Definite.
    #[error(
        "replication slot {slot:?} does not exist, but topic {topic} already holds events up to \
         commit LSN {last}: the slot was dropped or lost, and a new slot would start at the \
         current position, skipping whatever was committed after {last} and before it. To go \
         on with nothing lost: start with --allow-new-slot and stop the relay, run `relay \
         verify --republish-missing` (publishes, marked late, the outbox rows the topic lacks), \
         and start it again"
    )]
    SlotMissing {
        slot: String,
        topic: String,
        last: Lsn,
    },
    /// `--retention` on a table without a `created_at` timestamp. Definite.
    #[error(
        "--retention needs a created_at timestamp column in the outbox table {table} (found: \
         {found}): it deletes delivered rows older than the retention; add the column or \
         leave --retention unset"
    )]
    RetentionTable { table: String, found: String },
    /// A backfill (`--backfill`) that cannot run as configured. Definite.
    #[error("backfill: {0}")]
    Backfill(String),
    /// Another relay holds the backfill of this slot: this one stands by.
    #[error("another relay backfills slot {0:?}")]
    BackfillBusy(String),
    /// `--retention` with `--table ''`. Definite.
    #[error("--retention deletes outbox rows, but there is no outbox table (--table ''); leave --retention unset")]
    RetentionWithoutTable,
    #[error("stalled: {in_flight} records waited {waited:?} for Kafka with no acknowledgement (--stall-timeout {timeout:?}); restarting the session with a new producer")]
    Stalled {
        waited: Duration,
        timeout: Duration,
        in_flight: usize,
    },
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
            | RelayError::Stalled { .. }
            | RelayError::KafkaTransaction(_)
            | RelayError::PartialTransaction { .. }
            | RelayError::BackfillBusy(_) => true,
            RelayError::Decode(_)
            | RelayError::Event(_)
            | RelayError::DeliveryPermanent { .. }
            | RelayError::KafkaAccess(_)
            | RelayError::Protocol(_)
            | RelayError::SlotMissing { .. }
            | RelayError::RetentionTable { .. }
            | RelayError::RetentionWithoutTable
            | RelayError::Backfill(_)
            | RelayError::Listen { .. } => false,
        }
    }
}
