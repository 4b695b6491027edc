//! Refused Kafka access: the first authentication or authorization failure
//! that any of the notifier's Kafka clients (the consumer, the dead-letter
//! producer) met. Retrying cannot fix one, so the consumer loop stops the
//! notifier with it (a non-zero exit naming the cause) instead of logging
//! it and waiting forever.
//!
//! librdkafka reports a refused authentication as an error event of the
//! client (its requests just time out), a broker certificate it cannot
//! verify only as a log line, and a missing ACL either as an event or as
//! the error of one operation; all end up in [`KafkaAccess::deny`].

use std::sync::{Arc, Mutex};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::ClientContext;
use tokio_util::sync::CancellationToken;

pub use lifecycle::kafka::AccessDenied;

/// Shared by every Kafka client of one notifier (it is their context).
#[derive(Clone)]
pub struct KafkaAccess {
    first: Arc<Mutex<Option<AccessDenied>>>,
    denied: CancellationToken,
}

impl Default for KafkaAccess {
    fn default() -> Self {
        KafkaAccess {
            first: Arc::default(),
            denied: CancellationToken::new(),
        }
    }
}

impl KafkaAccess {
    /// Records `denied` (the first one is kept) and wakes [`KafkaAccess::denied`].
    pub fn deny(&self, denied: AccessDenied) {
        let mut first = self.first.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            tracing::error!(error = %denied, "kafka refused access");
            *first = Some(denied);
        }
        self.denied.cancel();
    }

    /// Records `error` if it is refused access; returns whether it was.
    pub fn check(&self, error: &KafkaError, detail: impl Into<String>) -> bool {
        match AccessDenied::from_error(error, detail) {
            Some(denied) => {
                self.deny(denied);
                true
            }
            None => false,
        }
    }

    /// Forwards a librdkafka log line and records the refusal some of them
    /// are (an untrusted broker certificate, see [`AccessDenied::from_log`]).
    pub fn check_log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        lifecycle::kafka::forward_log(level, facility, message);
        if let Some(denied) = AccessDenied::from_log(level, facility, message) {
            self.deny(denied);
        }
    }

    /// The first refusal, if any.
    pub fn first(&self) -> Option<AccessDenied> {
        self.first.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits for the first refusal.
    pub async fn denied(&self) -> AccessDenied {
        self.denied.cancelled().await;
        self.first()
            .expect("a refusal is recorded before the token is cancelled")
    }
}

impl ClientContext for KafkaAccess {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        self.check_log(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if !self.check(&error, reason) {
            tracing::warn!(error = %error, reason, "kafka client error");
        }
    }
}
