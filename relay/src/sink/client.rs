//! What the relay's Kafka clients share: the connection settings
//! ([`KafkaConfig`], with the producer's), the client context that catches
//! refused credentials ([`AccessWatch`], for the admin client and the
//! exactly-once reader), and the errors of setting Kafka up ([`SinkError`]).

use std::sync::Mutex;

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::ClientConfig;

use lifecycle::kafka::client_config;
use lifecycle::kafka::{forward_log, AccessDenied};

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
    /// Exactly-once: pass over records without `lsn`/`seq` headers (another
    /// writer's) when finding each partition's last record
    /// (`--foreign-records skip`) instead of refusing the topic.
    pub skip_foreign_records: bool,
}

impl KafkaConfig {
    /// For the admin client and the dedupe reader.
    pub(crate) fn client_config(&self) -> ClientConfig {
        client_config(&self.bootstrap_servers, [], &self.properties)
    }

    pub(super) fn producer_config(&self) -> ClientConfig {
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
            // Chosen by measuring (BENCHMARKS.md, "Producer compression"):
            // 11x fewer bytes on the broker than none, catch-up and relay
            // CPU within the runs' noise of none. A --kafka-property wins.
            ("compression.type", "zstd".to_owned()),
            ("linger.ms", "2".to_owned()),
            ("queue.buffering.max.messages", "1000000".to_owned()),
            ("queue.buffering.max.kbytes", "1048576".to_owned()),
        ]);
        client_config(&self.bootstrap_servers, settings, &self.properties)
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
