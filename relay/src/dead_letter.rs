//! Dead-lettering one event that Kafka can never take (a poison record), so
//! that the events behind it flow again.
//!
//! ```text
//!  row ──build_record──▶ record ──reference_for?──▶ its topic         (every other event)
//!                                    └─────▶ <topic>.relay-dlq: a reference (event id, size, reason),
//!                                            same key, same lsn/seq/xid/commit_ts headers
//! ```
//!
//! Which events: those the operator names (`--dead-letter-event-ids`), and,
//! when the operator opted in (`--dead-letter-refused`), each event Kafka
//! refused permanently: the session that hit it ends, and the replay from
//! the confirmed position diverts it. Without either, a refused record stops
//! the relay with a message naming it (`RelayError::DeliveryPermanent`).
//!
//! The reference goes through the same path as every record: the
//! dead-letter topic is created like any routed topic, placed by key and
//! deduplicated by `(lsn, seq)` on restart, so it is written exactly once.
//! The event itself is not in its topic: consumers of that key see the
//! events before and after it, in order, and the gap is named in the
//! dead-letter topic (`relay_dead_lettered_total`, alert
//! `RelayDeadLettered`).

use std::collections::HashMap;
use std::sync::Mutex;

use outbox_record::header;
use serde_json::json;

use crate::error::{RefusedRecord, RelayError};
use crate::event::OutboxRecord;

/// The dead-letter topic of `topic`.
pub fn topic_of(topic: &str) -> String {
    format!("{topic}.relay-dlq")
}

/// The events to divert, with the reason of each.
#[derive(Debug, Default)]
pub struct DeadLetters {
    /// event id → reason.
    events: Mutex<HashMap<String, String>>,
    /// Divert what Kafka refuses permanently, without asking.
    automatic: bool,
}

impl DeadLetters {
    /// `named`: the operator's event ids; `automatic`: also each event Kafka
    /// refuses permanently.
    pub fn new(named: &[String], automatic: bool) -> DeadLetters {
        let events = named
            .iter()
            .map(|id| {
                (
                    id.clone(),
                    "dead-lettered by the operator (--dead-letter-event-ids)".to_owned(),
                )
            })
            .collect();
        DeadLetters {
            events: Mutex::new(events),
            automatic,
        }
    }

    fn events(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.events.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// After a session ended with `error`: true if the event it names will be
    /// diverted from now on (automatic mode, and the record has an id), so
    /// a replay moves past it.
    pub fn learn(&self, error: &RelayError) -> bool {
        let RelayError::DeliveryPermanent { refused, error } = error else {
            return false;
        };
        let (true, Some(id)) = (self.automatic, refused.event_id.as_ref()) else {
            return false;
        };
        let mut events = self.events();
        if events.contains_key(id) {
            // Diverted and still refused: the reference itself cannot go.
            return false;
        }
        events.insert(id.clone(), reason(refused, error));
        true
    }

    /// The reference that replaces `record` when its event is one to divert.
    pub fn reference_for(&self, record: &OutboxRecord) -> Option<OutboxRecord> {
        let events = self.events();
        if events.is_empty() {
            return None;
        }
        let id = record.header(header::EVENT_ID)?;
        events.get(id).map(|reason| reference(record, reason))
    }
}

fn reason(refused: &RefusedRecord, error: &rdkafka::error::KafkaError) -> String {
    format!(
        "kafka refused it permanently ({error}): {} bytes, the producer's message.max.bytes {}",
        refused.bytes, refused.producer_limit
    )
}

/// The reference that stands for `record` in the dead-letter topic: its
/// key, its relay headers (so it is placed and deduplicated like the event
/// would have been) plus `dlq_reason` and `dlq_original_topic`, and a JSON
/// value naming the event instead of carrying it.
fn reference(record: &OutboxRecord, reason: &str) -> OutboxRecord {
    let header = |name: &str| record.header(name).map(str::to_owned);
    let value = json!({
        "dead_lettered": true,
        "event_id": header(header::EVENT_ID),
        "event_type": header(header::EVENT_TYPE),
        "original_topic": record.topic,
        "bytes": record.size(),
        "reason": reason,
        "lsn": header(header::LSN),
        "seq": header(header::SEQ),
    });
    let mut headers = record.headers.clone();
    headers.push((header::dlq::REASON, reason.to_owned()));
    headers.push((header::dlq::ORIGINAL_TOPIC, record.topic.clone()));
    OutboxRecord {
        topic: topic_of(&record.topic),
        partition: None,
        key: record.key.clone(),
        value: value.to_string().into_bytes(),
        headers,
        column_headers: record.column_headers.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(event_id: &str) -> OutboxRecord {
        OutboxRecord {
            topic: "orders".into(),
            partition: Some(3),
            key: Some("42".into()),
            value: vec![b'x'; 2_000_000],
            headers: vec![
                (header::EVENT_ID, event_id.into()),
                (header::EVENT_TYPE, "OrderCreated".into()),
                (header::LSN, "0/16B3748".into()),
                (header::SEQ, "0".into()),
            ],
            column_headers: Box::new([]),
        }
    }

    fn refused(event_id: Option<&str>) -> RelayError {
        RelayError::DeliveryPermanent {
            refused: Box::new(RefusedRecord {
                event_id: event_id.map(str::to_owned),
                bytes: 2_000_123,
                topic: "orders".into(),
                producer_limit: 1_000_000,
                topic_limit: Some(1_048_588),
            }),
            error: rdkafka::error::KafkaError::MessageProduction(
                rdkafka::error::RDKafkaErrorCode::MessageSizeTooLarge,
            ),
        }
    }

    #[test]
    fn named_events_become_references_in_the_dead_letter_topic() {
        let dl = DeadLetters::new(&["7".into()], false);
        assert_eq!(dl.reference_for(&record("8")), None);
        let r = dl.reference_for(&record("7")).expect("diverted");
        assert_eq!(r.topic, "orders.relay-dlq");
        assert_eq!(r.key.as_deref(), Some("42"));
        assert_eq!(r.partition, None, "placed in its own topic");
        let v: serde_json::Value = serde_json::from_slice(&r.value).unwrap();
        assert_eq!(v["event_id"], "7");
        assert_eq!(v["original_topic"], "orders");
        assert!(v["bytes"].as_u64().unwrap() > 2_000_000);
        assert!(r.value.len() < 1000, "a reference, not the event");
        let names: Vec<&str> = r.headers.iter().map(|(k, _)| *k).collect();
        assert!(names.starts_with(&[
            header::EVENT_ID,
            header::EVENT_TYPE,
            header::LSN,
            header::SEQ
        ]));
        assert!(names.contains(&header::dlq::REASON), "{names:?}");
    }

    #[test]
    fn refused_events_are_learned_only_when_opted_in_and_once() {
        let manual = DeadLetters::new(&[], false);
        assert!(!manual.learn(&refused(Some("7"))));
        assert_eq!(manual.reference_for(&record("7")), None);

        let auto = DeadLetters::new(&[], true);
        assert!(
            !auto.learn(&refused(None)),
            "no event id: nothing to divert by"
        );
        assert!(auto.learn(&refused(Some("7"))));
        let r = auto.reference_for(&record("7")).expect("diverted");
        let v: serde_json::Value = serde_json::from_slice(&r.value).unwrap();
        assert!(
            v["reason"].as_str().unwrap().contains("2000123 bytes"),
            "{v}"
        );
        // Refused again although diverted: the reference itself cannot go.
        assert!(!auto.learn(&refused(Some("7"))));
    }
}
