//! The producer's callbacks: librdkafka's delivery reports, errors and
//! log lines, turned into `Report`s on a channel the sink reads in
//! `next_report` (the callbacks run on librdkafka's threads).

use std::sync::Arc;

use lifecycle::kafka::{forward_log, AccessDenied};
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Headers;
use rdkafka::producer::{DeliveryResult, ProducerContext};
use rdkafka::Message;
use tokio::sync::mpsc;

use crate::checkpoint::TxnId;

/// What librdkafka reported, before `next_report` classifies it.
#[derive(Debug)]
pub(super) enum Report {
    Delivered {
        txn: TxnId,
        bytes: usize,
        topic: Arc<str>,
    },
    Failed {
        bytes: usize,
        error: KafkaError,
        /// The record's `event_id` header, to name it if it can never be
        /// delivered.
        event_id: Option<String>,
        topic: Arc<str>,
    },
    /// The producer can no longer deliver anything (fatal librdkafka error);
    /// it has to be recreated and the stream replayed from the confirmed LSN.
    Fatal { reason: String },
    /// Kafka refused the producer's credentials or permissions: definite.
    Denied(AccessDenied),
}

/// Per-record delivery tag carried through librdkafka as the opaque.
pub(super) struct Tag {
    pub(super) txn: TxnId,
    pub(super) bytes: usize,
    pub(super) topic: Arc<str>,
}

pub(super) struct ReportingContext {
    pub(super) reports: mpsc::UnboundedSender<Report>,
}

impl ClientContext for ReportingContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        forward_log(level, facility, message);
        if let Some(denied) = AccessDenied::from_log(level, facility, message) {
            tracing::error!(error = %denied, "kafka refused the producer");
            let _ = self.reports.send(Report::Denied(denied));
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if let Some(denied) = AccessDenied::from_error(&error, reason) {
            tracing::error!(error = %denied, "kafka refused the producer");
            let _ = self.reports.send(Report::Denied(denied));
            return;
        }
        let fatal = matches!(error.rdkafka_error_code(), Some(RDKafkaErrorCode::Fatal));
        if fatal {
            tracing::error!(error = %error, reason, "kafka producer fatal error");
            let _ = self.reports.send(Report::Fatal {
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
            Ok(_) => Report::Delivered {
                txn: tag.txn,
                bytes: tag.bytes,
                topic: tag.topic,
            },
            Err((error, msg)) => {
                tracing::warn!(error = %error, topic = msg.topic(), partition = msg.partition(), "kafka delivery failed");
                let event_id = msg.headers().and_then(|headers| {
                    let pairs = headers.iter().map(|h| (h.key, h.value));
                    outbox_record::header::find(pairs, outbox_record::header::EVENT_ID)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                });
                Report::Failed {
                    bytes: tag.bytes,
                    error: error.clone(),
                    event_id,
                    topic: tag.topic,
                }
            }
        };
        // The receiver lives as long as the sink; a send error means the
        // sink is being dropped and nobody waits for reports any more.
        let _ = self.reports.send(report);
    }
}
