//! The relay's Prometheus metrics. The names are a contract (SPEC.md):
//! dashboards and alerts use them.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

// prometheus-client appends `_total` to counters when it encodes them.
pub const EVENTS: &str = "relay_events";
pub const TRANSACTIONS: &str = "relay_transactions";
pub const PRODUCE_ERRORS: &str = "relay_produce_errors";
pub const LAG_BYTES: &str = "relay_lag_bytes";
pub const LAG_SECONDS: &str = "relay_lag_seconds";
pub const CONNECTED: &str = "relay_connected";
pub const SLOT_RETAINED_WAL_BYTES: &str = "relay_slot_retained_wal_bytes";
pub const COMMIT_TO_ACK_SECONDS: &str = "relay_commit_to_ack_seconds";
pub const HEARTBEATS: &str = "relay_heartbeats";
pub const DUPLICATES_SKIPPED: &str = "relay_duplicates_skipped";
pub const DEAD_LETTERED: &str = "relay_dead_lettered";
pub const ROLE: &str = "relay_role";
pub const OUTBOX_ROWS_DELETED: &str = "relay_outbox_rows_deleted";
pub const OUTBOX_OLDEST_ROW_AGE_SECONDS: &str = "relay_outbox_oldest_row_age_seconds";
pub const RETENTION_SECONDS: &str = "relay_retention_seconds";
pub const MESSAGES_REFUSED: &str = "relay_messages_refused";
pub const STALLS: &str = "relay_stalls";
pub const BACKFILL_ROWS: &str = "relay_backfill_rows";
pub const BACKFILL_ROWS_DELIVERED: &str = "relay_backfill_rows_delivered";

/// The values of `relay_role`'s `role` label.
pub const ROLES: [&str; 2] = ["active", "standby"];

/// 0.5 ms, 1 ms, 2 ms, … 32.8 s: resolves milliseconds and still sees a
/// backlog measured in tens of seconds.
pub fn commit_to_ack_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 17)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicLabel {
    pub topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabel {
    pub role: String,
}

/// Every metric the relay exports.
pub struct Metrics {
    pub registry: Registry,
    /// Records acknowledged by Kafka, by topic.
    pub events: Family<TopicLabel, Counter>,
    /// Postgres transactions fully acknowledged (confirmable).
    pub transactions: Counter,
    /// Records Kafka failed to take, and fatal producer errors.
    pub produce_errors: Counter,
    pub lag_bytes: Gauge,
    pub lag_seconds: Gauge<f64, AtomicU64>,
    pub connected: Gauge,
    pub slot_retained_wal_bytes: Gauge,
    pub commit_to_ack_seconds: Histogram,
    pub heartbeats: Counter,
    pub duplicates_skipped: Counter,
    /// Events produced as a reference in their dead-letter topic.
    pub dead_lettered: Counter,
    /// 1 for the relay's role (`active`, `standby`), 0 for the other.
    pub role: Family<RoleLabel, Gauge>,
    /// Delivered outbox rows deleted by retention.
    pub outbox_rows_deleted: Counter,
    /// Age of the oldest row left in the outbox (sampled by retention).
    pub outbox_oldest_row_age_seconds: Gauge<f64, AtomicU64>,
    /// `--retention` (0: off).
    pub retention_seconds: Gauge<f64, AtomicU64>,
    /// Event messages not produced as events, by reason (see `message`).
    pub messages_refused: Family<ReasonLabel, Counter>,
    /// Sessions restarted because Kafka acknowledged nothing for
    /// `--stall-timeout` while records waited.
    pub stalls: Counter,
    /// Rows the running or last backfill delivers (`--backfill`).
    pub backfill_rows: Gauge,
    /// Of those, acknowledged by Kafka (or found there from an
    /// interrupted attempt).
    pub backfill_rows_delivered: Gauge,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let events = Family::<TopicLabel, Counter>::default();
        registry.register(
            EVENTS,
            "Outbox records acknowledged by Kafka",
            events.clone(),
        );
        let transactions = Counter::default();
        registry.register(
            TRANSACTIONS,
            "Postgres transactions whose records Kafka acknowledged",
            transactions.clone(),
        );
        let produce_errors = Counter::default();
        registry.register(
            PRODUCE_ERRORS,
            "Records Kafka did not take, and fatal producer errors",
            produce_errors.clone(),
        );
        let lag_bytes = Gauge::default();
        registry.register(
            LAG_BYTES,
            "Server WAL position minus the confirmed position, in bytes",
            lag_bytes.clone(),
        );
        let lag_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            LAG_SECONDS,
            "Age of the commit of the oldest record not yet acknowledged by Kafka (0 when caught up)",
            lag_seconds.clone(),
        );
        let connected = Gauge::default();
        registry.register(
            CONNECTED,
            "1 while the replication stream is connected",
            connected.clone(),
        );
        let slot_retained_wal_bytes = Gauge::default();
        registry.register(
            SLOT_RETAINED_WAL_BYTES,
            "WAL the slot keeps Postgres from recycling (current WAL position minus restart_lsn)",
            slot_retained_wal_bytes.clone(),
        );
        let commit_to_ack_seconds = Histogram::new(commit_to_ack_buckets());
        registry.register(
            COMMIT_TO_ACK_SECONDS,
            "From a record's Postgres commit to Kafka's acknowledgement of it",
            commit_to_ack_seconds.clone(),
        );
        let heartbeats = Counter::default();
        registry.register(
            HEARTBEATS,
            "This relay's heartbeat messages received back through the slot",
            heartbeats.clone(),
        );
        let duplicates_skipped = Counter::default();
        registry.register(
            DUPLICATES_SKIPPED,
            "Replayed records skipped because their partition already held them (exactly-once)",
            duplicates_skipped.clone(),
        );
        let dead_lettered = Counter::default();
        registry.register(
            DEAD_LETTERED,
            "Events Kafka could not take, produced as a reference in their topic's dead-letter topic instead",
            dead_lettered.clone(),
        );
        let role = Family::<RoleLabel, Gauge>::default();
        for r in ROLES {
            role.get_or_create(&RoleLabel { role: r.to_owned() }).set(0);
        }
        registry.register(
            ROLE,
            "1 for this relay's role: active (it streams the slot) or standby (another relay does); both 0 while it connects",
            role.clone(),
        );
        let outbox_rows_deleted = Counter::default();
        registry.register(
            OUTBOX_ROWS_DELETED,
            "Delivered outbox rows deleted by retention (--retention)",
            outbox_rows_deleted.clone(),
        );
        let outbox_oldest_row_age_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            OUTBOX_OLDEST_ROW_AGE_SECONDS,
            "Age of the oldest row left in the outbox table, sampled by retention (0 while retention is off or the table is empty); above the retention, rows wait for delivery",
            outbox_oldest_row_age_seconds.clone(),
        );
        let retention_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            RETENTION_SECONDS,
            "The retention of delivered outbox rows (--retention; 0: off)",
            retention_seconds.clone(),
        );
        let messages_refused = Family::<ReasonLabel, Counter>::default();
        for reason in [
            crate::message::REFUSED_MALFORMED,
            crate::message::REFUSED_NON_TRANSACTIONAL,
        ] {
            // Exported at 0 from the start, so alerts see increases.
            let _ = messages_refused.get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            });
        }
        registry.register(
            MESSAGES_REFUSED,
            "Event messages (--message-prefix) not produced as events: malformed (dead-lettered instead) or non_transactional (skipped)",
            messages_refused.clone(),
        );
        let stalls = Counter::default();
        registry.register(
            STALLS,
            "Sessions restarted because records waited --stall-timeout for Kafka with no acknowledgement",
            stalls.clone(),
        );
        let backfill_rows = Gauge::default();
        registry.register(
            BACKFILL_ROWS,
            "Outbox rows written before the slot existed that the backfill (--backfill) delivers",
            backfill_rows.clone(),
        );
        let backfill_rows_delivered = Gauge::default();
        registry.register(
            BACKFILL_ROWS_DELIVERED,
            "Of relay_backfill_rows, those Kafka acknowledged (or held from an interrupted attempt)",
            backfill_rows_delivered.clone(),
        );
        Metrics {
            registry,
            backfill_rows,
            backfill_rows_delivered,
            messages_refused,
            stalls,
            role,
            outbox_rows_deleted,
            outbox_oldest_row_age_seconds,
            retention_seconds,
            duplicates_skipped,
            dead_lettered,
            commit_to_ack_seconds,
            heartbeats,
            events,
            transactions,
            produce_errors,
            lag_bytes,
            lag_seconds,
            connected,
            slot_retained_wal_bytes,
        }
    }

    /// Sets `relay_role` to `role` ("active", "standby", or another
    /// value for neither).
    pub fn set_role(&self, role: &str) {
        for r in ROLES {
            self.role
                .get_or_create(&RoleLabel { role: r.to_owned() })
                .set(i64::from(r == role));
        }
    }

    /// Counts an event message refused for `reason`.
    pub fn message_refused(&self, reason: &str) {
        self.messages_refused
            .get_or_create(&ReasonLabel {
                reason: reason.to_owned(),
            })
            .inc();
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
