//! The notifier's Prometheus metrics. The names are a contract (SPEC.md):
//! dashboards and alerts use them.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

// prometheus-client appends `_total` to counters when it encodes them.
pub const EVENTS: &str = "notifier_events";
pub const EMAILS_SENT: &str = "notifier_emails_sent";
pub const DUPLICATES: &str = "notifier_duplicates";
pub const DLQ: &str = "notifier_dlq";
pub const END_TO_END_SECONDS: &str = "notifier_end_to_end_seconds";
pub const INBOX_ROWS_DELETED: &str = "notifier_inbox_rows_deleted";

/// What became of one record.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    /// The email was sent.
    sent,
    /// Already in the inbox: nothing sent.
    duplicate,
    /// Unknown event type or a status without an email: nothing sent.
    skipped,
    /// Sent to the dead-letter topic.
    dlq,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    /// `OrderCreated`, `OrderStatusChanged`, `other` (unknown types, kept
    /// out of the label to bound its cardinality) or `none` (no type at all).
    pub event_type: String,
    pub outcome: Outcome,
}

/// The label value for an event type.
pub fn event_type_label(event_type: Option<&str>) -> String {
    match event_type {
        Some(t @ (crate::event::ORDER_CREATED | crate::event::ORDER_STATUS_CHANGED)) => {
            t.to_owned()
        }
        Some(_) => "other".to_owned(),
        None => "none".to_owned(),
    }
}

/// Every metric the notifier exports.
pub struct Metrics {
    pub registry: Registry,
    pub events: Family<EventLabels, Counter>,
    pub emails_sent: Counter,
    pub duplicates: Counter,
    pub dlq: Counter,
    pub end_to_end_seconds: Histogram,
    /// Inbox rows deleted by `--inbox-retention`.
    pub inbox_rows_deleted: Counter,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let events = Family::<EventLabels, Counter>::default();
        registry.register(
            EVENTS,
            "Records handled, by event type and outcome (sent, duplicate, skipped, dlq)",
            events.clone(),
        );
        let emails_sent = Counter::default();
        registry.register(
            EMAILS_SENT,
            "Emails taken by the SMTP server or written to the mail directory",
            emails_sent.clone(),
        );
        let duplicates = Counter::default();
        registry.register(
            DUPLICATES,
            "Records whose event was already in notifier_inbox (nothing sent)",
            duplicates.clone(),
        );
        let dlq = Counter::default();
        registry.register(
            DLQ,
            "Records produced to the dead-letter topic",
            dlq.clone(),
        );
        // 1 ms .. ~65 s
        let end_to_end_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 17));
        registry.register(
            END_TO_END_SECONDS,
            "From the Postgres commit (commit_ts header) to the record being handled",
            end_to_end_seconds.clone(),
        );
        let inbox_rows_deleted = Counter::default();
        registry.register(
            INBOX_ROWS_DELETED,
            "notifier_inbox rows deleted by --inbox-retention",
            inbox_rows_deleted.clone(),
        );
        Metrics {
            registry,
            inbox_rows_deleted,
            events,
            emails_sent,
            duplicates,
            dlq,
            end_to_end_seconds,
        }
    }

    /// Counts one handled record.
    pub fn record(&self, event_type: Option<&str>, outcome: Outcome) {
        self.events
            .get_or_create(&EventLabels {
                event_type: event_type_label(event_type),
                outcome,
            })
            .inc();
        match outcome {
            Outcome::sent => {
                self.emails_sent.inc();
            }
            Outcome::duplicate => {
                self.duplicates.inc();
            }
            Outcome::dlq => {
                self.dlq.inc();
            }
            Outcome::skipped => {}
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        lifecycle::http::encode(&self.registry)
    }

    /// What `/metrics` answers.
    pub fn response(&self) -> axum::response::Response {
        lifecycle::http::metrics_response(&self.registry)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_names_are_exported() {
        let m = Metrics::new();
        m.record(Some("OrderCreated"), Outcome::sent);
        m.record(Some("Brand-new"), Outcome::skipped);
        m.record(None, Outcome::dlq);
        m.record(Some("OrderStatusChanged"), Outcome::duplicate);
        m.end_to_end_seconds.observe(0.2);
        let text = m.encode();
        for needle in [
            "notifier_events_total{event_type=\"OrderCreated\",outcome=\"sent\"} 1",
            "notifier_events_total{event_type=\"other\",outcome=\"skipped\"} 1",
            "notifier_emails_sent_total 1",
            "notifier_duplicates_total 1",
            "notifier_dlq_total 1",
            "notifier_end_to_end_seconds_count 1",
        ] {
            assert!(text.contains(needle), "{needle} missing in\n{text}");
        }
    }
}
