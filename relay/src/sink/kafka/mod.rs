//! The Kafka sink: hands records to Kafka, reports per record when Kafka
//! has acknowledged it, and owns every Kafka decision the apply loop needs:
//! each topic's partition count and (exactly-once) its partitions' last
//! positions, the partition of each record, which replayed records a
//! partition already holds, Kafka transactions, and what a Kafka error means
//! for the session (`classify_delivery`, `txn_error`, `dedupe_error`).
//!
//! ```text
//!  apply loop ──try_send(record, txn)──▶ librdkafka queue ──▶ broker
//!      ▲                                                     │ ack (acks=all)
//!      └────────── next_report(): Delivered{txn} / Failed ◀──┘
//! ```
//!
//! The Kafka producer is idempotent (`enable.idempotence=true`, `acks=all`)
//! with `enable.gapless.guarantee=true` and no message timeout: a record is
//! retried until the broker takes it, and anything that could leave a gap in
//! a partition's sequence is a fatal error instead. So each partition holds,
//! in order, a prefix of what the relay sent to it (the ground `dedupe`'s
//! exactly-once argument stands on).
//!
//! The producer's callbacks are in `context.rs`, what its errors mean in
//! `errors.rs`, records too large for their topic in `limits.rs`.

mod context;
mod errors;
mod limits;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};

use super::{DeliveryReport, KafkaConfig, Placement, SendError, Sink, SinkError};
use crate::checkpoint::TxnId;
use crate::dedupe::{self, Position, TopicState};
use crate::error::{RefusedRecord, RelayError};
use crate::event::OutboxRecord;
use context::{Report, ReportingContext, Tag};
pub use errors::{classify_delivery, dedupe_error, txn_error};
use lifecycle::kafka::AccessDenied;
use tokio::sync::mpsc;

/// Bound on each blocking transactional call.
const TXN_TIMEOUT: Duration = Duration::from_secs(60);

/// librdkafka's default `message.max.bytes`.
const LIBRDKAFKA_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// The rdkafka-backed sink.
pub struct KafkaSink {
    producer: Arc<ThreadedProducer<ReportingContext>>,
    cfg: KafkaConfig,
    /// Exactly-once: the topics' ends are read, and records they hold skipped.
    exactly_once: bool,
    /// Transactional mode: transactions initialised / one is open.
    txn_ready: bool,
    txn_open: bool,
    reports: mpsc::UnboundedReceiver<Report>,
    in_flight: usize,
    in_flight_bytes: usize,
    max_in_flight_bytes: usize,
    /// Partition count and last positions of each topic of this session.
    topic_states: HashMap<String, TopicState>,
    /// Interned topic names, so a delivery tag shares rather than copies.
    topics: HashSet<Arc<str>>,
    /// The producer's `message.max.bytes`, named when a record is refused.
    producer_limit: usize,
    /// Each topic's `max.message.bytes` when it could be read (see
    /// `over_topic_limit`).
    topic_limits: HashMap<String, usize>,
    /// The producer's `compression.type` (`None`: uncompressed).
    codec: Option<String>,
}

impl KafkaSink {
    pub fn new(cfg: &KafkaConfig, exactly_once: bool) -> Result<KafkaSink, SinkError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let config = cfg.producer_config();
        let producer_limit = config
            .get("message.max.bytes")
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(LIBRDKAFKA_MESSAGE_MAX_BYTES);
        let codec = ["compression.type", "compression.codec"]
            .iter()
            .filter_map(|k| config.get(k))
            .map(|v| v.trim().to_ascii_lowercase())
            .rfind(|v| v != "none");
        let producer = config
            .create_with_context(ReportingContext { reports: tx })
            .map_err(SinkError::Config)?;
        Ok(KafkaSink {
            producer: Arc::new(producer),
            cfg: cfg.clone(),
            exactly_once,
            txn_ready: false,
            txn_open: false,
            reports: rx,
            in_flight: 0,
            in_flight_bytes: 0,
            max_in_flight_bytes: cfg.max_in_flight_bytes.max(1),
            topic_states: HashMap::new(),
            topics: HashSet::new(),
            producer_limit,
            topic_limits: HashMap::new(),
            codec,
        })
    }

    /// Readies the producer for a new session that holds the slot: aborts
    /// the transaction a failed session left open (its records are
    /// replayed), initialises transactions the first time (fencing any
    /// producer with the same `transactional.id`), and forgets what the
    /// last session read of the topics: their ends are read again (after
    /// the caller has drained what is in flight).
    pub async fn start_session(&mut self) -> Result<(), RelayError> {
        self.topic_states.clear();
        if self.cfg.transactional_id.is_none() {
            return Ok(());
        }
        if self.txn_open {
            self.abort_transaction().await?;
            tracing::info!("aborted the Kafka transaction the previous session left open");
        }
        if !self.txn_ready {
            self.txn_call(|p| p.init_transactions(TXN_TIMEOUT))
                .await
                .map_err(txn_error)?;
            self.txn_ready = true;
            tracing::info!(
                "initialised Kafka transactions (any producer with this transactional.id is fenced)"
            );
        }
        Ok(())
    }

    /// Waits up to `timeout` for everything in flight to be reported,
    /// handing each report to `on_report`. Returns true when nothing is left.
    pub async fn drain(
        &mut self,
        timeout: Duration,
        mut on_report: impl FnMut(DeliveryReport),
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.in_flight > 0 {
            match tokio::time::timeout_at(deadline, self.next_report()).await {
                Ok(Some(report)) => on_report(report),
                Ok(None) | Err(_) => break,
            }
        }
        self.in_flight == 0
    }

    /// Runs a blocking transactional call on the blocking pool.
    async fn txn_call(
        &self,
        call: impl FnOnce(&ThreadedProducer<ReportingContext>) -> Result<(), KafkaError>
            + Send
            + 'static,
    ) -> Result<(), KafkaError> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || call(&producer))
            .await
            .unwrap_or(Err(KafkaError::Canceled))
    }
}

/// A topic readied for producing: its partitions' ends, and its
/// `max.message.bytes` if it could be read.
pub struct PreparedTopic {
    state: TopicState,
    max_message_bytes: Option<usize>,
}

/// Record headers as the producer takes them.
pub(crate) fn kafka_headers<'a>(headers: impl Iterator<Item = (&'a str, &'a str)>) -> OwnedHeaders {
    let capacity = headers.size_hint().0;
    headers.fold(
        OwnedHeaders::new_with_capacity(capacity),
        |all, (key, value)| {
            all.insert(Header {
                key,
                value: Some(value.as_bytes()),
            })
        },
    )
}

impl Sink for KafkaSink {
    type Topic = PreparedTopic;

    fn has_topic(&self, topic: &str) -> bool {
        self.topic_states.contains_key(topic)
    }

    fn prepare_topic(&self, topic: &str) -> BoxFuture<'static, Result<PreparedTopic, RelayError>> {
        let cfg = self.cfg.clone();
        let topic = topic.to_owned();
        let exactly_once = self.exactly_once;
        async move {
            crate::topics::ensure_topics(&cfg, std::slice::from_ref(&topic)).await?;
            let (state, max_message_bytes) = futures_util::join!(
                dedupe::load(&cfg, &topic, exactly_once),
                crate::topics::max_message_bytes(&cfg, &topic)
            );
            let state = state.map_err(dedupe_error)?;
            if exactly_once {
                tracing::info!(%topic, partitions = state.partitions, last = ?state.last,
                    "read each partition's last position");
            }
            Ok(PreparedTopic {
                state,
                max_message_bytes,
            })
        }
        .boxed()
    }

    fn add_topic(&mut self, topic: String, prepared: PreparedTopic) {
        if let Some(limit) = prepared.max_message_bytes {
            self.topic_limits.insert(topic.clone(), limit);
        }
        self.topic_states.insert(topic, prepared.state);
    }

    /// The partition is murmur2 of the key (the `event_id` header when the
    /// row has no key), as Kafka's Java clients choose it, so a replayed
    /// record lands where it did before.
    fn place(&mut self, record: &mut OutboxRecord, at: Position) -> Placement {
        let Some(topic) = self.topic_states.get(&record.topic) else {
            // The loop prepares every topic first; the producer's own
            // partitioner is the answer for a topic it did not.
            return Placement::Produce;
        };
        let partition = dedupe::partition_for(record.partition_key().as_bytes(), topic.partitions);
        record.partition = Some(partition);
        if self.exactly_once && topic.holds(partition, at) {
            Placement::Duplicate
        } else {
            Placement::Produce
        }
    }

    fn try_send(&mut self, record: OutboxRecord, txn: TxnId) -> Result<(), SendError> {
        let bytes = record.size();
        if let Some(limit) = self.over_topic_limit(&record) {
            return Err(SendError::Refused(RelayError::DeliveryPermanent {
                refused: Box::new(self.refused(&record, Some(limit))),
                error: KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
            }));
        }
        if self.in_flight > 0 && self.in_flight_bytes + bytes > self.max_in_flight_bytes {
            return Err(SendError::Full(record));
        }
        let headers = kafka_headers(record.all_headers());
        let topic = match self.topics.get(record.topic.as_str()) {
            Some(t) => t.clone(),
            None => {
                let t: Arc<str> = Arc::from(record.topic.as_str());
                self.topics.insert(t.clone());
                t
            }
        };
        let mut base =
            BaseRecord::with_opaque_to(&record.topic, Box::new(Tag { txn, bytes, topic }))
                .payload(&record.value)
                .headers(headers);
        if let Some(key) = &record.key {
            base = base.key(key.as_bytes());
        }
        if let Some(partition) = record.partition {
            base = base.partition(partition);
        }
        match self.producer.send(base) {
            Ok(()) => {
                self.in_flight += 1;
                self.in_flight_bytes += bytes;
                Ok(())
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                Err(SendError::Full(record))
            }
            Err((e, _)) => Err(SendError::Refused(classify_delivery(e, || {
                self.refused(&record, None)
            }))),
        }
    }

    async fn next_report(&mut self) -> Option<DeliveryReport> {
        let report = self.reports.recv().await?;
        Some(match report {
            Report::Delivered { txn, bytes, topic } => {
                self.in_flight = self.in_flight.saturating_sub(1);
                self.in_flight_bytes = self.in_flight_bytes.saturating_sub(bytes);
                DeliveryReport::Delivered { txn, topic }
            }
            Report::Failed {
                bytes,
                error,
                event_id,
                topic,
            } => {
                self.in_flight = self.in_flight.saturating_sub(1);
                self.in_flight_bytes = self.in_flight_bytes.saturating_sub(bytes);
                DeliveryReport::Failed(classify_delivery(error, || RefusedRecord {
                    event_id,
                    bytes,
                    producer_limit: self.producer_limit,
                    topic_limit: self.topic_limits.get(&*topic).copied(),
                    topic: topic.to_string(),
                }))
            }
            Report::Fatal { reason } => {
                // A producer that may not do what it must (e.g. no ACL for
                // idempotent writes) fails fatally: that is refused access.
                match self
                    .producer
                    .client()
                    .fatal_error()
                    .and_then(|(code, reason)| AccessDenied::new(code, reason))
                {
                    Some(denied) => DeliveryReport::Failed(RelayError::KafkaAccess(denied)),
                    None => DeliveryReport::Failed(RelayError::ProducerFatal(reason)),
                }
            }
            Report::Denied(denied) => DeliveryReport::Failed(RelayError::KafkaAccess(denied)),
        })
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn purge(&mut self) {
        use rdkafka::producer::PurgeConfig;
        self.producer
            .purge(PurgeConfig::default().queue().inflight());
    }

    fn transactional(&self) -> bool {
        self.cfg.transactional_id.is_some()
    }

    fn transaction_open(&self) -> bool {
        self.txn_open
    }

    fn begin_transaction(&mut self) -> Result<(), RelayError> {
        self.producer.begin_transaction().map_err(txn_error)?;
        self.txn_open = true;
        Ok(())
    }

    /// Flushes and commits the open transaction, retrying what Kafka calls
    /// retriable; a transaction that must be aborted is aborted (its
    /// records are replayed by the next session).
    async fn commit_transaction(&mut self) -> Result<(), RelayError> {
        let mut attempt = 0;
        loop {
            match self.txn_call(|p| p.commit_transaction(TXN_TIMEOUT)).await {
                Ok(()) => {
                    self.txn_open = false;
                    return Ok(());
                }
                Err(KafkaError::Transaction(e)) if e.is_retriable() && attempt < 3 => attempt += 1,
                Err(e) => {
                    if matches!(&e, KafkaError::Transaction(t) if t.txn_requires_abort()) {
                        tracing::warn!(error = %e, "kafka transaction must be aborted; replaying it");
                        let _ = self.abort_transaction().await;
                    }
                    return Err(txn_error(e));
                }
            }
        }
    }

    async fn abort_transaction(&mut self) -> Result<(), RelayError> {
        self.txn_call(|p| p.abort_transaction(TXN_TIMEOUT))
            .await
            .map_err(txn_error)?;
        self.txn_open = false;
        Ok(())
    }
}
