//! Reading a topic back for `relay verify` (and the backfill's resume):
//! every record from the start to the end the topic had when reading
//! began, each reduced to what the comparison needs (`Seen`): its event id
//! in whichever format wrote it, its key and its `(lsn, seq)` position.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use outbox_record::header::{self, Position};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use super::VerifyError;
use crate::lsn::Lsn;

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// A record as the comparison needs it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub event_id: Option<i64>,
    pub position: Option<Position>,
    /// Marked late (`late` header): republished.
    pub late: bool,
}

/// Every record of `topic` from the start to its end when reading began.
pub(super) fn read_topic(
    client_cfg: rdkafka::ClientConfig,
    topic: &str,
) -> Result<Vec<Seen>, VerifyError> {
    let mut seen = Vec::new();
    each_record(client_cfg, topic, |s| seen.push(s))?;
    Ok(seen)
}

/// Hands `f` every record of `topic` from the start to its end when
/// reading began (the backfill keeps only some: it does not hold them all).
pub(crate) fn each_record(
    mut client_cfg: rdkafka::ClientConfig,
    topic: &str,
    mut f: impl FnMut(Seen),
) -> Result<(), VerifyError> {
    let kafka = |source| VerifyError::Kafka {
        topic: topic.to_owned(),
        source,
    };
    let consumer: BaseConsumer = client_cfg
        .set("group.id", "outbox-relay-verify")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .create()
        .map_err(kafka)?;
    let partitions = crate::dedupe::partition_count(&consumer, topic).map_err(kafka)?;
    let mut ends: HashMap<i32, i64> = HashMap::new();
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, METADATA_TIMEOUT)
            .map_err(kafka)?;
        if high > low {
            assignment
                .add_partition_offset(topic, p, Offset::Offset(low))
                .map_err(kafka)?;
            ends.insert(p, high);
        }
    }
    if ends.is_empty() {
        return Ok(());
    }
    consumer.assign(&assignment).map_err(kafka)?;
    let mut progress = Instant::now();
    const STUCK: Duration = Duration::from_secs(30);
    while !ends.is_empty() {
        if let Some(msg) = consumer.poll(Duration::from_millis(200)) {
            let msg = msg.map_err(kafka)?;
            progress = Instant::now();
            if msg.offset() < ends.get(&msg.partition()).copied().unwrap_or(i64::MIN) {
                f(seen_of(topic, &msg));
            }
        }
        // A partition is done once the reader's position reached its end
        // (transaction markers at the end are passed over, not returned).
        let positions = consumer.position().map_err(kafka)?;
        ends.retain(|p, end| {
            let at = positions
                .find_partition(topic, *p)
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                });
            at.is_none_or(|o| o < *end)
        });
        if let Some((&partition, _)) = ends.iter().next() {
            if progress.elapsed() >= STUCK {
                return Err(VerifyError::Unreadable {
                    topic: topic.to_owned(),
                    partition,
                    waited: STUCK,
                });
            }
        }
    }
    Ok(())
}

fn seen_of<M: Message>(topic: &str, msg: &M) -> Seen {
    let mut relay_id = None;
    let mut debezium_id = None;
    let mut lsn = None;
    let mut seq = None;
    let mut late = false;
    if let Some(headers) = msg.headers() {
        for h in headers.iter() {
            let text = h.value.and_then(|v| std::str::from_utf8(v).ok());
            match h.key {
                header::EVENT_ID => relay_id = relay_id.or(text.and_then(|t| t.parse().ok())),
                // Debezium's outbox event router names the event `id`.
                crate::event::debezium::ID_HEADER => {
                    debezium_id = debezium_id.or(text.and_then(|t| t.parse().ok()))
                }
                header::LSN => lsn = lsn.or(text.and_then(|t| t.parse::<Lsn>().ok())),
                header::SEQ => seq = seq.or(text.and_then(|t| t.parse::<u64>().ok())),
                header::LATE => late = true,
                _ => {}
            }
        }
    }
    let event_id = relay_id
        .or_else(|| msg.payload().and_then(value_id))
        .or(debezium_id);
    Seen {
        topic: topic.to_owned(),
        partition: msg.partition(),
        offset: msg.offset(),
        key: msg.key().map(|k| String::from_utf8_lossy(k).into_owned()),
        event_id,
        position: lsn.zip(seq),
        late,
    }
}

/// The event id in a record's value: the row's `id` (this relay's JSON, the
/// JDBC source connector without schemas) or `payload.id` (a connect-json
/// envelope).
fn value_id(value: &[u8]) -> Option<i64> {
    let v: serde_json::Value = serde_json::from_slice(value).ok()?;
    let id = match v.get("payload") {
        Some(p) if v.get("schema").is_some() => p.get("id")?,
        _ => v.get("id")?,
    };
    id.as_i64().or_else(|| id.as_str()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_in_every_format() {
        assert_eq!(value_id(br#"{"id":7,"user_id":1}"#), Some(7));
        assert_eq!(
            value_id(br#"{"schema":{"type":"struct"},"payload":{"id":8}}"#),
            Some(8)
        );
        assert_eq!(value_id(br#"{"id":"9"}"#), Some(9));
        assert_eq!(value_id(br#"{"payload":{"id":1}}"#), None, "no envelope");
        assert_eq!(value_id(b"not json"), None);
    }
}
