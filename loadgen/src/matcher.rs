//! The Kafka side: a consumer on every partition of the outbox topic, and
//! the matching of each record to the request that caused it.
//!
//! ```text
//!  request ok ──▶ Matcher::expect(key, sent)  ─┐
//!                                              ├─▶ Matched (sent + arrived) ──▶ stages
//!  consumer ──▶ decode ──▶ Matcher::arrived(key, arrived)
//!              (key from event_id header in sql mode,
//!               (order id, status) from the value in http mode)
//! ```
//!
//! Keys: in sql mode the `event_id` header (the outbox id the INSERT
//! returned); in http mode the record's value, the outbox row as JSON:
//! `aggregate_id` is the order id, `event_type` `OrderCreated` means
//! status `CREATED`, `OrderStatusChanged` means `payload.to` — so the key is
//! (order id, status), known from the HTTP response.
//!
//! A record may arrive before its request is registered (the commit happens
//! before the response is read), so unknown records are kept for a while
//! ("early") and matched when the request registers. Records of other runs
//! or other writers never match and are dropped after [`EARLY_TTL`]. A
//! second record for an already matched key is a duplicate (counted).
//!
//! The consumer has no group: it is assigned every partition *before* the
//! load starts, one offset below each partition's high watermark. Starting
//! at the watermark itself would do as well; one below costs at most one
//! older record, which matches nothing (or a transaction marker, which is
//! never delivered), and never skips a record of the run.
//! `fetch.wait.max.ms` is low so the arrival time is close to when the
//! broker had the record.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use outbox_record::event::{ORDER_CREATED, ORDER_STATUS_CHANGED};
use outbox_record::header;
use outbox_record::trace::TraceParent;

use crate::config::Mode;

/// How long an unmatched record waits for its request to register.
pub const EARLY_TTL: Duration = Duration::from_secs(120);

/// An order's status, as far as loadgen drives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OrderStatus {
    Created,
    Paid,
    Shipped,
    Delivered,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Created => "CREATED",
            OrderStatus::Paid => "PAID",
            OrderStatus::Shipped => "SHIPPED",
            OrderStatus::Delivered => "DELIVERED",
        }
    }

    pub fn parse(s: &str) -> Option<OrderStatus> {
        [
            OrderStatus::Created,
            OrderStatus::Paid,
            OrderStatus::Shipped,
            OrderStatus::Delivered,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }

    /// The next status on the happy path (none after DELIVERED).
    pub fn next(self) -> Option<OrderStatus> {
        match self {
            OrderStatus::Created => Some(OrderStatus::Paid),
            OrderStatus::Paid => Some(OrderStatus::Shipped),
            OrderStatus::Shipped => Some(OrderStatus::Delivered),
            OrderStatus::Delivered => None,
        }
    }
}

/// What ties a record to a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Key {
    /// sql mode: the outbox id.
    Event(i64),
    /// http mode: the order and the status its event announces.
    Order(i64, OrderStatus),
}

/// A request (once it succeeded: waiting for its record).
#[derive(Clone, Copy, Debug)]
pub struct Sent {
    /// Its index in the schedule.
    pub seq: u64,
    pub intended: Instant,
    pub bucket: usize,
    pub measured: bool,
    /// The `traceparent` it carries (none: sql mode on an outbox without
    /// the column).
    pub trace: Option<TraceParent>,
    /// Its request-stage latency, µs (0 until it succeeded).
    pub request_us: u64,
}

/// A record as read, with when it arrived.
#[derive(Clone, Copy, Debug)]
pub struct Arrived {
    pub at: Instant,
    /// Wall clock at arrival, µs since the epoch.
    pub wall_us: i64,
    /// The commit-time header (`commit_ts`), µs since the epoch.
    pub commit_us: Option<i64>,
    /// The record's timestamp when it is the broker's (LogAppendTime), ms.
    pub log_append_ms: Option<i64>,
    /// The event-id header (`event_id`).
    pub event_id: Option<i64>,
}

/// A request and its record.
#[derive(Clone, Copy, Debug)]
pub struct Matched {
    pub key: Key,
    pub sent: Sent,
    pub arrived: Arrived,
}

/// What became of an arriving record.
#[derive(Debug)]
pub enum Arrival {
    Matched(Matched),
    /// A second record for a key already matched.
    Duplicate,
    /// No request known (yet): kept for [`EARLY_TTL`].
    Unknown,
}

/// Requests waiting for records, and records waiting for requests.
#[derive(Debug, Default)]
pub struct Matcher {
    pending: HashMap<Key, Sent>,
    early: HashMap<Key, Arrived>,
    done: HashSet<Key>,
}

impl Matcher {
    /// A request succeeded and will produce the record `key`; returns the
    /// match at once when the record came first.
    pub fn expect(&mut self, key: Key, sent: Sent) -> Option<Matched> {
        match self.early.remove(&key) {
            Some(arrived) => {
                self.done.insert(key);
                Some(Matched { key, sent, arrived })
            }
            None => {
                self.pending.insert(key, sent);
                None
            }
        }
    }

    /// A record arrived.
    pub fn arrived(&mut self, key: Key, arrived: Arrived) -> Arrival {
        if let Some(sent) = self.pending.remove(&key) {
            self.done.insert(key);
            return Arrival::Matched(Matched { key, sent, arrived });
        }
        if self.done.contains(&key) {
            return Arrival::Duplicate;
        }
        self.early.entry(key).or_insert(arrived);
        Arrival::Unknown
    }

    /// Requests whose record has not arrived.
    pub fn missing(&self) -> usize {
        self.pending.len()
    }

    /// A few of the keys still missing (for the log).
    pub fn missing_sample(&self, n: usize) -> Vec<Key> {
        self.pending.keys().take(n).copied().collect()
    }

    /// Drops unmatched records that arrived before `cutoff`.
    pub fn prune(&mut self, cutoff: Instant) {
        self.early.retain(|_, a| a.at >= cutoff);
    }
}

/// Why a record is not one loadgen can match.
#[derive(Debug, PartialEq, Eq)]
pub enum Skip {
    NoEventId,
    NotJson,
    OtherEvent,
}

/// The key of a record: from the `event_id` header (sql mode) or the value
/// (http mode).
pub fn key_of(mode: Mode, event_id: Option<i64>, value: Option<&[u8]>) -> Result<Key, Skip> {
    match mode {
        Mode::Sql => event_id.map(Key::Event).ok_or(Skip::NoEventId),
        Mode::Http => {
            let row: serde_json::Value = value
                .and_then(|v| serde_json::from_slice(v).ok())
                .ok_or(Skip::NotJson)?;
            let order_id = match &row["aggregate_id"] {
                serde_json::Value::String(s) => s.parse::<i64>().ok(),
                serde_json::Value::Number(n) => n.as_i64(),
                _ => None,
            }
            .ok_or(Skip::OtherEvent)?;
            let status = match row["event_type"].as_str() {
                Some(ORDER_CREATED) => Some(OrderStatus::Created),
                Some(ORDER_STATUS_CHANGED) => {
                    row["payload"]["to"].as_str().and_then(OrderStatus::parse)
                }
                _ => None,
            }
            .ok_or(Skip::OtherEvent)?;
            Ok(Key::Order(order_id, status))
        }
    }
}

/// The wall clock in µs since the epoch.
pub fn wall_micros() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("cannot create the Kafka consumer")]
    Create(#[source] rdkafka::error::KafkaError),
    #[error("cannot read the metadata of topic {topic}")]
    Metadata {
        topic: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("topic {0} does not exist or has no partitions")]
    NoTopic(String),
    #[error("cannot assign the partitions of {topic}")]
    Assign {
        topic: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },
}

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// A consumer assigned to every partition of `topic`, positioned at (just
/// below) the current end. Blocking (metadata and watermark requests): call
/// it from `spawn_blocking`.
pub fn assign_at_end(
    bootstrap: &str,
    topic: &str,
    properties: &[(String, String)],
) -> Result<StreamConsumer, ConsumerError> {
    let settings = [
        ("client.id", "loadgen".to_owned()),
        // No group membership (partitions are assigned); librdkafka still
        // wants an id, and nothing is ever committed under it.
        ("group.id", format!("loadgen-{}", std::process::id())),
        ("enable.auto.commit", "false".to_owned()),
        ("enable.auto.offset.store", "false".to_owned()),
        ("enable.partition.eof", "false".to_owned()),
        ("fetch.wait.max.ms", "5".to_owned()),
        ("fetch.min.bytes", "1".to_owned()),
    ];
    let consumer: StreamConsumer = lifecycle::kafka::client_config(bootstrap, settings, properties)
        .create()
        .map_err(ConsumerError::Create)?;
    let metadata = consumer
        .fetch_metadata(Some(topic), METADATA_TIMEOUT)
        .map_err(|source| ConsumerError::Metadata {
            topic: topic.to_owned(),
            source,
        })?;
    let partitions = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .filter(|t| t.error().is_none())
        .map_or(0, |t| t.partitions().len()) as i32;
    if partitions == 0 {
        return Err(ConsumerError::NoTopic(topic.to_owned()));
    }
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, METADATA_TIMEOUT)
            .map_err(|source| ConsumerError::Metadata {
                topic: topic.to_owned(),
                source,
            })?;
        let start = (high - 1).max(low).max(0);
        tracing::debug!(%topic, partition = p, low, high, start, "consumer start");
        tpl.add_partition_offset(topic, p, Offset::Offset(start))
            .map_err(|source| ConsumerError::Assign {
                topic: topic.to_owned(),
                source,
            })?;
    }
    consumer
        .assign(&tpl)
        .map_err(|source| ConsumerError::Assign {
            topic: topic.to_owned(),
            source,
        })?;
    Ok(consumer)
}

/// Which headers carry what loadgen reads (`--event-id-header`,
/// `--commit-time-header`).
#[derive(Clone, Debug)]
pub struct HeaderNames {
    pub event_id: String,
    pub commit_time: String,
}

impl Default for HeaderNames {
    /// The relay's: `event_id` and `commit_ts`.
    fn default() -> HeaderNames {
        HeaderNames {
            event_id: header::EVENT_ID.to_owned(),
            commit_time: header::COMMIT_TS.to_owned(),
        }
    }
}

/// The time of arrival and the headers loadgen reads from a message.
pub fn arrived_of<M: Message>(msg: &M, names: &HeaderNames) -> Arrived {
    let at = Instant::now();
    let wall_us = wall_micros();
    // Per record: look up only the two headers needed, nothing allocated.
    let text = |name: &str| {
        let hs = msg.headers()?;
        let value = header::find(hs.iter().map(|h| (h.key, h.value)), name)?;
        std::str::from_utf8(value).ok()
    };
    let commit_us = text(&names.commit_time)
        .and_then(header::parse_commit_ts)
        .map(|t| t.timestamp_micros());
    let event_id = text(&names.event_id).and_then(|t| t.trim().parse().ok());
    let log_append_ms = match msg.timestamp() {
        rdkafka::Timestamp::LogAppendTime(ms) => Some(ms),
        _ => None,
    };
    Arrived {
        at,
        wall_us,
        commit_us,
        log_append_ms,
        event_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arrived(at: Instant) -> Arrived {
        Arrived {
            at,
            wall_us: 0,
            commit_us: None,
            log_append_ms: None,
            event_id: Some(1),
        }
    }

    fn sent(at: Instant) -> Sent {
        Sent {
            seq: 0,
            intended: at,
            bucket: 0,
            measured: true,
            trace: None,
            request_us: 0,
        }
    }

    #[test]
    fn records_match_whichever_comes_first() {
        let now = Instant::now();
        let mut m = Matcher::default();
        assert!(m.expect(Key::Event(1), sent(now)).is_none());
        assert_eq!(m.missing(), 1);
        assert!(matches!(
            m.arrived(Key::Event(1), arrived(now)),
            Arrival::Matched(_)
        ));
        assert!(matches!(
            m.arrived(Key::Event(1), arrived(now)),
            Arrival::Duplicate
        ));
        // The record before the response.
        assert!(matches!(
            m.arrived(Key::Event(2), arrived(now)),
            Arrival::Unknown
        ));
        assert!(m.expect(Key::Event(2), sent(now)).is_some());
        assert_eq!(m.missing(), 0);
        // Records of nobody are forgotten.
        m.arrived(Key::Event(3), arrived(now));
        m.prune(now + Duration::from_secs(1));
        assert!(m.expect(Key::Event(3), sent(now)).is_none());
        assert_eq!(m.missing(), 1);
    }

    fn message(headers: &[(&str, &str)]) -> rdkafka::message::OwnedMessage {
        let mut hs = rdkafka::message::OwnedHeaders::new();
        for (k, v) in headers {
            hs = hs.insert(rdkafka::message::Header {
                key: k,
                value: Some(*v),
            });
        }
        rdkafka::message::OwnedMessage::new(
            None,
            None,
            "t".into(),
            rdkafka::Timestamp::CreateTime(1),
            0,
            0,
            Some(hs),
        )
    }

    #[test]
    fn headers_are_read_by_the_configured_names() {
        let relay = message(&[
            (header::EVENT_ID, "41"),
            (header::COMMIT_TS, "2026-12-01T05:10:00.000001Z"),
        ]);
        let a = arrived_of(&relay, &HeaderNames::default());
        assert_eq!(a.event_id, Some(41));
        assert_eq!(a.commit_us, Some(1_796_101_800_000_001));
        assert_eq!(a.log_append_ms, None);

        // Debezium's Outbox Event Router: the id as `id`, a timestamptz
        // column placed as a header in ISO-8601.
        let debezium = message(&[("id", "42"), ("created_at", "2026-12-01T05:10:00.5Z")]);
        assert_eq!(
            arrived_of(&debezium, &HeaderNames::default()).event_id,
            None
        );
        let names = HeaderNames {
            event_id: "id".into(),
            commit_time: "created_at".into(),
        };
        let a = arrived_of(&debezium, &names);
        assert_eq!(a.event_id, Some(42));
        assert_eq!(a.commit_us, Some(1_796_101_800_500_000));
    }

    #[test]
    fn keys_from_the_relays_record_format() {
        let created = br#"{"id":7,"aggregate_type":"order","aggregate_id":"42","user_id":1,
            "event_type":"OrderCreated","payload":{"order_id":42,"status":"CREATED"}}"#;
        assert_eq!(
            key_of(Mode::Http, Some(7), Some(created)),
            Ok(Key::Order(42, OrderStatus::Created))
        );
        let changed = br#"{"id":8,"aggregate_id":"42","event_type":"OrderStatusChanged",
            "payload":{"from":"CREATED","to":"PAID"}}"#;
        assert_eq!(
            key_of(Mode::Http, Some(8), Some(changed)),
            Ok(Key::Order(42, OrderStatus::Paid))
        );
        let other = br#"{"aggregate_id":"1","event_type":"Something"}"#;
        assert_eq!(key_of(Mode::Http, None, Some(other)), Err(Skip::OtherEvent));
        assert_eq!(
            key_of(Mode::Http, None, Some(b"\x00garbage")),
            Err(Skip::NotJson)
        );
        assert_eq!(key_of(Mode::Sql, Some(9), None), Ok(Key::Event(9)));
        assert_eq!(key_of(Mode::Sql, None, Some(created)), Err(Skip::NoEventId));
    }
}
