//! Dead letters: records that can never be handled go, unchanged, to
//! `<topic>.dlq`, with why and where from in headers, and consumption goes on.
//!
//! ```text
//!  record (key, value, headers) ──▶ <topic>.dlq: same key, same value,
//!                                    original headers + dlq_reason, dlq_error_class,
//!                                    dlq_original_topic, dlq_original_partition,
//!                                    dlq_original_offset, dlq_failed_at
//! ```
//!
//! A dead letter counts as handled only once Kafka acknowledged it
//! (`acks=all`, idempotent producer); a failed produce is transient and the
//! caller retries while holding the partition's stored offset. Dead letters are
//! at least once: a crash after the acknowledgement and before the offset
//! commit produces the same dead letter again (same original
//! topic/partition/offset headers, by which readers of the DLQ can dedupe).

use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, Message};

use lifecycle::kafka::Created;

use crate::access::KafkaAccess;

pub use outbox_record::header::dlq::{
    ERROR_CLASS, FAILED_AT, ORIGINAL_OFFSET, ORIGINAL_PARTITION, ORIGINAL_TOPIC, REASON,
};

/// Errors producing a dead letter (transient: retried; except refused
/// access, which is also reported to [`KafkaAccess`] and stops the notifier).
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("creating the dead-letter producer")]
    Create(#[source] KafkaError),
    #[error("producing to dead-letter topic {topic}")]
    Produce {
        topic: String,
        #[source]
        source: KafkaError,
    },
}

/// The dead-letter topic and its producer (clones share the producer).
#[derive(Clone)]
pub struct DeadLetterQueue {
    producer: FutureProducer<KafkaAccess>,
    access: KafkaAccess,
    topic: String,
}

impl DeadLetterQueue {
    /// `base` carries the bootstrap servers and extra client properties;
    /// refused access is reported to `access`.
    pub fn new(
        base: &ClientConfig,
        topic: &str,
        access: &KafkaAccess,
    ) -> Result<DeadLetterQueue, DlqError> {
        let mut cfg = base.clone();
        cfg.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", "30000");
        let producer = cfg
            .create_with_context(access.clone())
            .map_err(DlqError::Create)?;
        Ok(DeadLetterQueue {
            producer,
            access: access.clone(),
            topic: topic.to_owned(),
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Whether the broker knows the topic (with at least one partition),
    /// asked for up to 5 s, or until Kafka refused access.
    async fn exists(&self) -> bool {
        let (producer, topic) = (self.producer.clone(), self.topic.clone());
        let access = self.access.clone();
        // Blocking metadata requests: not on a runtime thread; short ones,
        // so that refused credentials end the wait at once.
        let found = tokio::task::spawn_blocking(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                let metadata = producer
                    .client()
                    .fetch_metadata(Some(&topic), Duration::from_millis(500));
                if let Ok(m) = metadata {
                    return m.topics().iter().any(|t| {
                        t.name() == topic && t.error().is_none() && !t.partitions().is_empty()
                    });
                }
                if access.first().is_some() || std::time::Instant::now() >= deadline {
                    return false;
                }
            }
        })
        .await;
        found.unwrap_or(false)
    }

    /// Creates the topic (one partition) unless it exists. Best effort: on a
    /// cluster where the notifier may not create topics, an operator creates
    /// it, and producing reports what is wrong.
    pub async fn ensure_topic(&self, base: &ClientConfig) {
        if self.exists().await || self.access.first().is_some() {
            return;
        }
        let created = lifecycle::kafka::create_topics(
            base,
            &[self.topic.as_str()],
            1,
            1,
            Duration::from_secs(15),
        )
        .await;
        match created {
            Ok(results) => {
                for (topic, result) in results {
                    match result {
                        Ok(Created::New) => tracing::info!(%topic, "created dead-letter topic"),
                        Ok(Created::Existed) => {}
                        Err(code) => {
                            tracing::warn!(%topic, error = %code, "cannot create dead-letter topic")
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(topic = %self.topic, error = %e, "cannot create dead-letter topic")
            }
        }
    }

    /// Produces `original` to the dead-letter topic and waits for the
    /// acknowledgement. `reason` is the full error text.
    pub async fn send(
        &self,
        original: &OwnedMessage,
        class: &str,
        reason: &str,
    ) -> Result<(), DlqError> {
        let partition = original.partition().to_string();
        let offset = original.offset().to_string();
        let failed_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let mut headers = OwnedHeaders::new();
        if let Some(hs) = original.headers() {
            for h in hs.iter() {
                headers = headers.insert(Header {
                    key: h.key,
                    value: h.value,
                });
            }
        }
        for (key, value) in [
            (REASON, reason),
            (ERROR_CLASS, class),
            (ORIGINAL_TOPIC, original.topic()),
            (ORIGINAL_PARTITION, partition.as_str()),
            (ORIGINAL_OFFSET, offset.as_str()),
            (FAILED_AT, failed_at.as_str()),
        ] {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        let mut record = FutureRecord::<[u8], [u8]>::to(&self.topic).headers(headers);
        if let Some(key) = original.key() {
            record = record.key(key);
        }
        if let Some(value) = original.payload() {
            record = record.payload(value);
        }
        self.producer
            .send(record, Timeout::After(Duration::from_secs(30)))
            .await
            .map(|_| ())
            .map_err(|(source, _)| {
                self.access.check(
                    &source,
                    format!("producing to dead-letter topic {}", self.topic),
                );
                DlqError::Produce {
                    topic: self.topic.clone(),
                    source,
                }
            })
    }
}
