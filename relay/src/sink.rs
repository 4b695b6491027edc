//! Sink: hands records to Kafka and reports, per record, when Kafka has
//! acknowledged it.
//!
//! ```text
//!  pipeline ──try_send(record, txn)──▶ librdkafka queue ──▶ broker
//!      ▲                                                     │ ack (acks=all)
//!      └────────── next_report(): Delivered{txn} / Failed ◀──┘
//! ```
//!
//! The Kafka producer is idempotent (`enable.idempotence=true`, `acks=all`)
//! with `enable.gapless.guarantee=true` and no message timeout: a record is
//! retried until the broker takes it, and anything that could leave a gap in
//! a partition's sequence is a fatal error instead. So each partition holds,
//! in order, a prefix of what the relay sent to it.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, Message};
use tokio::sync::mpsc;

use crate::checkpoint::TxnId;
use crate::event::OutboxRecord;

/// What became of one record (or of the producer).
#[derive(Debug)]
pub enum DeliveryReport {
    /// Kafka acknowledged the record of transaction `txn`.
    Delivered {
        txn: TxnId,
        bytes: usize,
        topic: Arc<str>,
    },
    /// The record was not delivered; the pipeline must not confirm past it.
    Failed {
        txn: TxnId,
        bytes: usize,
        error: KafkaError,
    },
    /// The producer can no longer deliver anything (fatal librdkafka error);
    /// it has to be recreated and the stream replayed from the confirmed LSN.
    Fatal { reason: String },
    /// Kafka refused the producer's credentials or permissions: definite.
    Denied(AccessDenied),
}

use lifecycle::kafka::client_config;
pub use lifecycle::kafka::{forward_log, AccessDenied};

/// A client context that keeps the first authentication or authorization
/// failure librdkafka reports. Such failures come as error events, not as
/// results: a client whose credentials are refused simply has no broker to
/// ask, and its requests time out.
#[derive(Default)]
pub struct AccessWatch {
    denied: Mutex<Option<AccessDenied>>,
}

impl AccessWatch {
    pub fn denied(&self) -> Option<AccessDenied> {
        self.denied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl AccessWatch {
    fn keep(&self, denied: AccessDenied) {
        let mut first = self.denied.lock().unwrap_or_else(|p| p.into_inner());
        first.get_or_insert(denied);
    }
}

impl ClientContext for AccessWatch {
    fn error(&self, error: KafkaError, reason: &str) {
        match AccessDenied::from_error(&error, reason) {
            Some(denied) => self.keep(denied),
            None => tracing::warn!(error = %error, reason, "kafka client error"),
        }
    }

    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        forward_log(level, facility, message);
        if let Some(denied) = AccessDenied::from_log(level, facility, message) {
            self.keep(denied);
        }
    }
}

impl ConsumerContext for AccessWatch {}

/// Why a record was not accepted.
#[derive(Debug)]
pub enum SendError {
    /// Backpressure: the queue is full; retry after the next report.
    Full(OutboxRecord),
    /// The producer refused the record for another reason.
    Refused(KafkaError),
}

/// A destination for outbox records.
///
/// Delivery contract:
/// - records accepted by `try_send` are written in acceptance order within
///   each partition, and each is reported exactly once by `next_report`;
/// - a `Delivered` report means the broker durably acknowledged the record;
/// - after a `Failed` or `Fatal` report later records may or may not be
///   delivered: the caller must confirm nothing past the failed record and
///   replay from its last confirmed position, which can duplicate but never
///   lose or reorder a partition's prefix;
/// - `SendError::Full` is backpressure, not an error: keep the record and
///   retry once a report has freed room.
pub trait Sink {
    /// Enqueues `record` for transaction `txn` without waiting.
    fn try_send(&mut self, record: OutboxRecord, txn: TxnId) -> Result<(), SendError>;
    /// The next report; cancel-safe.
    fn next_report(&mut self) -> impl std::future::Future<Output = Option<DeliveryReport>> + Send;
    /// Records accepted and not yet reported.
    fn in_flight(&self) -> usize;
}

/// Kafka connection settings for the sink.
#[derive(Clone, Debug)]
pub struct KafkaConfig {
    pub bootstrap_servers: String,
    /// Extra librdkafka properties (`--kafka-property k=v`), applied last.
    pub properties: Vec<(String, String)>,
    /// Partitions for topics the relay creates.
    pub partitions: i32,
    /// Replication factor for topics the relay creates.
    pub replication: i32,
    /// Upper bound on bytes accepted and not yet acknowledged.
    pub max_in_flight_bytes: usize,
    /// `transactional.id` when records go in Kafka transactions
    /// (`--kafka-transactions`).
    pub transactional_id: Option<String>,
}

impl KafkaConfig {
    /// For the admin client and the dedupe reader.
    pub(crate) fn client_config(&self) -> ClientConfig {
        client_config(&self.bootstrap_servers, [], &self.properties)
    }

    fn producer_config(&self) -> ClientConfig {
        let mut settings = vec![
            ("enable.idempotence", "true".to_owned()),
            ("acks", "all".to_owned()),
        ];
        match &self.transactional_id {
            None => settings.extend([
                ("enable.gapless.guarantee", "true".to_owned()),
                // Never give up on a record: with idempotence, librdkafka
                // keeps retrying in order until the broker takes it.
                ("message.timeout.ms", "0".to_owned()),
            ]),
            // A record not delivered within the transaction's lifetime
            // makes the transaction abortable; it is then replayed.
            Some(id) => settings.extend([
                ("transactional.id", id.clone()),
                ("transaction.timeout.ms", "60000".to_owned()),
                ("message.timeout.ms", "60000".to_owned()),
            ]),
        }
        settings.extend([
            ("linger.ms", "2".to_owned()),
            ("queue.buffering.max.messages", "1000000".to_owned()),
            ("queue.buffering.max.kbytes", "1048576".to_owned()),
        ]);
        client_config(&self.bootstrap_servers, settings, &self.properties)
    }
}

/// Bound on each blocking transactional call.
const TXN_TIMEOUT: Duration = Duration::from_secs(60);

/// Per-record delivery tag carried through librdkafka as the opaque.
struct Tag {
    txn: TxnId,
    bytes: usize,
    topic: Arc<str>,
}

struct ReportingContext {
    reports: mpsc::UnboundedSender<DeliveryReport>,
}

impl ClientContext for ReportingContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        forward_log(level, facility, message);
        if let Some(denied) = AccessDenied::from_log(level, facility, message) {
            tracing::error!(error = %denied, "kafka refused the producer");
            let _ = self.reports.send(DeliveryReport::Denied(denied));
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if let Some(denied) = AccessDenied::from_error(&error, reason) {
            tracing::error!(error = %denied, "kafka refused the producer");
            let _ = self.reports.send(DeliveryReport::Denied(denied));
            return;
        }
        let fatal = matches!(error.rdkafka_error_code(), Some(RDKafkaErrorCode::Fatal));
        if fatal {
            tracing::error!(error = %error, reason, "kafka producer fatal error");
            let _ = self.reports.send(DeliveryReport::Fatal {
                reason: format!("{error}: {reason}"),
            });
        } else {
            tracing::warn!(error = %error, reason, "kafka client error");
        }
    }
}

impl ProducerContext for ReportingContext {
    type DeliveryOpaque = Box<Tag>;

    fn delivery(&self, result: &DeliveryResult<'_>, tag: Self::DeliveryOpaque) {
        let report = match result {
            Ok(_) => DeliveryReport::Delivered {
                txn: tag.txn,
                bytes: tag.bytes,
                topic: tag.topic,
            },
            Err((error, msg)) => {
                tracing::warn!(error = %error, topic = msg.topic(), partition = msg.partition(), "kafka delivery failed");
                DeliveryReport::Failed {
                    txn: tag.txn,
                    bytes: tag.bytes,
                    error: error.clone(),
                }
            }
        };
        // The receiver lives as long as the sink; a send error means the
        // sink is being dropped and nobody waits for reports any more.
        let _ = self.reports.send(report);
    }
}

/// Errors setting up Kafka.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("invalid Kafka configuration: {0}")]
    Config(#[source] KafkaError),
    #[error("creating topic {topic}: {code}")]
    CreateTopic {
        topic: String,
        code: RDKafkaErrorCode,
    },
    #[error("talking to Kafka")]
    Kafka(#[source] KafkaError),
    #[error(transparent)]
    Denied(AccessDenied),
}

impl SinkError {
    /// Configuration errors and refused access are definite; the rest is
    /// worth retrying.
    pub fn is_transient(&self) -> bool {
        !matches!(self, SinkError::Config(_) | SinkError::Denied(_))
    }
}

/// The rdkafka-backed sink.
pub struct KafkaSink {
    producer: Arc<ThreadedProducer<ReportingContext>>,
    /// Transactional mode: transactions initialised / one is open.
    pub txn_ready: bool,
    pub txn_open: bool,
    reports: mpsc::UnboundedReceiver<DeliveryReport>,
    in_flight: usize,
    in_flight_bytes: usize,
    max_in_flight_bytes: usize,
    /// Interned topic names, so a delivery tag shares rather than copies.
    topics: HashSet<Arc<str>>,
}

impl KafkaSink {
    pub fn new(cfg: &KafkaConfig) -> Result<KafkaSink, SinkError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let producer = cfg
            .producer_config()
            .create_with_context(ReportingContext { reports: tx })
            .map_err(SinkError::Config)?;
        Ok(KafkaSink {
            producer: Arc::new(producer),
            txn_ready: false,
            txn_open: false,
            reports: rx,
            in_flight: 0,
            in_flight_bytes: 0,
            max_in_flight_bytes: cfg.max_in_flight_bytes.max(1),
            topics: HashSet::new(),
        })
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

    /// `init_transactions`: fences any earlier producer with the same
    /// `transactional.id` (another relay on this slot) and aborts what it
    /// left open.
    pub async fn init_transactions(&mut self) -> Result<(), KafkaError> {
        self.txn_call(|p| p.init_transactions(TXN_TIMEOUT)).await?;
        self.txn_ready = true;
        Ok(())
    }

    pub fn begin_transaction(&mut self) -> Result<(), KafkaError> {
        self.producer.begin_transaction()?;
        self.txn_open = true;
        Ok(())
    }

    /// Flushes and commits the open transaction.
    pub async fn commit_transaction(&mut self) -> Result<(), KafkaError> {
        self.txn_call(|p| p.commit_transaction(TXN_TIMEOUT)).await?;
        self.txn_open = false;
        Ok(())
    }

    pub async fn abort_transaction(&mut self) -> Result<(), KafkaError> {
        self.txn_call(|p| p.abort_transaction(TXN_TIMEOUT)).await?;
        self.txn_open = false;
        Ok(())
    }

    /// Drops every queued record that was not sent yet (used when this
    /// relay must stop writing).
    pub fn purge(&self) {
        use rdkafka::producer::PurgeConfig;
        self.producer
            .purge(PurgeConfig::default().queue().inflight());
    }
}

impl Sink for KafkaSink {
    fn try_send(&mut self, record: OutboxRecord, txn: TxnId) -> Result<(), SendError> {
        let bytes = record.size();
        if self.in_flight > 0 && self.in_flight_bytes + bytes > self.max_in_flight_bytes {
            return Err(SendError::Full(record));
        }
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (k, v) in &record.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
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
            Err((e, _)) => Err(SendError::Refused(e)),
        }
    }

    async fn next_report(&mut self) -> Option<DeliveryReport> {
        let mut report = self.reports.recv().await?;
        if let DeliveryReport::Fatal { .. } = &report {
            // A producer that may not do what it must (e.g. no ACL for
            // idempotent writes) fails fatally: that is refused access.
            if let Some(denied) = self
                .producer
                .client()
                .fatal_error()
                .and_then(|(code, reason)| AccessDenied::new(code, reason))
            {
                report = DeliveryReport::Denied(denied);
            }
        }
        if let DeliveryReport::Delivered { bytes, .. } | DeliveryReport::Failed { bytes, .. } =
            &report
        {
            self.in_flight = self.in_flight.saturating_sub(1);
            self.in_flight_bytes = self.in_flight_bytes.saturating_sub(*bytes);
        }
        Some(report)
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }
}
