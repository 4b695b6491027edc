//! `relay verify`: compares the outbox table with what its topics hold and
//! reports, as text or JSON, events missing from Kafka, events present more
//! than once, events out of per-key commit order, and records with no row.
//! Exit status 0 only when all four are empty.
//!
//! ```text
//!  1. rows:    the ids in range, in one snapshot; W = pg_current_wal_lsn()
//!              after it, so every row seen committed before W
//!  2. wait:    until the slot confirmed W (the relay delivered every row seen)
//!  3. topics:  read from the start to the end (read_committed): each
//!              record's event id (header event_id; else the value's id, or
//!              payload.id of a connect-json envelope; else Debezium's id
//!              header) and position (lsn, seq headers)
//!  4. compare: missing = rows without a record; duplicated = ids with more
//!              than one; out of order = a key's positions going back;
//!              without row = records in range whose id has no row (checked
//!              again at the end: a row may have committed meanwhile)
//! ```
//!
//! Records of events written as logical decoding messages (the table-less
//! outbox) have no row by design and count as records without row.
//!
//! With `--republish-missing` the missing events are then produced, marked
//! late (see `republish`), except those the slot will still deliver.
//! Records marked late count as present; their order is not checked (they
//! are late by definition).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use outbox_record::header::{self, Position};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::config::Config;
use crate::event::TopicRouting;
use crate::lsn::Lsn;
use crate::replication::{self, quote_ident, ReplicationError};

/// Ids listed per finding (the counts are complete).
const LISTED: usize = 100;
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("connecting to Postgres")]
    Connect(#[source] ReplicationError),
    #[error("querying the outbox table")]
    Query(#[source] tokio_postgres::Error),
    #[error("reading topic {topic}")]
    Kafka {
        topic: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error(
        "relay verify compares the outbox table with the topics; there is no table (--table '')"
    )]
    NoTable,
    #[error("republishing the missing events")]
    Republish(#[source] Box<crate::republish::RepublishError>),
    #[error("topic {topic} partition {partition}: no end reached within {waited:?}")]
    Unreadable {
        topic: String,
        partition: i32,
        waited: Duration,
    },
}

/// What to compare (`relay verify`'s options).
#[derive(Clone, Debug)]
pub struct Range {
    pub from_id: Option<i64>,
    pub to_id: Option<i64>,
    /// How long to wait for the slot to confirm what the snapshot holds.
    pub wait: Duration,
    /// Produce the missing events (see `republish`).
    pub republish: bool,
}

/// One finding with its full count and the first ids.
#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct Ids {
    pub count: usize,
    pub ids: Vec<i64>,
}

impl Ids {
    fn of(ids: impl IntoIterator<Item = i64>) -> Ids {
        let mut all: Vec<i64> = ids.into_iter().collect();
        all.sort_unstable();
        Ids {
            count: all.len(),
            ids: all.into_iter().take(LISTED).collect(),
        }
    }
}

/// A record whose position is not after its key's previous record's.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct OutOfOrder {
    pub key: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub event_id: Option<i64>,
    pub after_event_id: Option<i64>,
}

/// The comparison's result.
#[derive(Debug, Serialize)]
pub struct Report {
    pub from_id: i64,
    pub to_id: i64,
    pub rows: usize,
    pub topics: Vec<String>,
    pub records: usize,
    /// Whether the slot had confirmed every row of the snapshot before the
    /// topics were read (else recent rows may show as missing).
    pub caught_up: bool,
    pub missing: Ids,
    pub duplicated: Ids,
    pub out_of_order: usize,
    pub out_of_order_examples: Vec<OutOfOrder>,
    pub without_row: Ids,
    /// Records with no event id anywhere (another writer's).
    pub unidentified: usize,
    /// Records without `lsn`/`seq` headers, whose order is not checked.
    pub unordered: usize,
    /// Records marked late (republished), whose order is not checked.
    pub late: usize,
    /// With `--republish-missing`: what was done about the missing.
    pub republished: Option<crate::republish::Republished>,
    pub ok: bool,
}

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

/// Runs the whole comparison.
pub async fn verify(cfg: &Config, range: &Range) -> Result<Report, VerifyError> {
    if !cfg.has_table() {
        return Err(VerifyError::NoTable);
    }
    let params = replication::connect_params(&cfg.database_url).map_err(VerifyError::Connect)?;
    let client = replication::sql_connect(&params)
        .await
        .map_err(VerifyError::Connect)?;
    let event_cfg = cfg.event_config();
    let table = {
        let (schema, table) = cfg.table_parts();
        format!("{}.{}", quote_ident(&schema), quote_ident(&table))
    };
    let routing = match &event_cfg.routing {
        TopicRouting::Fixed(_) => "NULL::text".to_owned(),
        TopicRouting::ByColumn { column, .. } => format!("{}::text", quote_ident(column)),
    };
    let key = quote_ident(&event_cfg.key_column);

    // 1. The rows, and a WAL position every one of them committed before.
    let (from_id, to_id) = (
        range.from_id.unwrap_or(i64::MIN),
        range.to_id.unwrap_or(i64::MAX),
    );
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        .await
        .map_err(VerifyError::Query)?;
    let rows = client
        .query(
            &format!(
                "SELECT id, {key}::text, {routing} FROM {table} WHERE id BETWEEN $1 AND $2 ORDER BY id"
            ),
            &[&from_id, &to_id],
        )
        .await
        .map_err(VerifyError::Query)?;
    let wal: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .map_err(VerifyError::Query)?
        .get(0);
    client
        .batch_execute("COMMIT")
        .await
        .map_err(VerifyError::Query)?;
    let wal: Lsn = wal.parse().unwrap_or(Lsn::ZERO);
    let mut topics: BTreeSet<String> = event_cfg.static_topics().into_iter().collect();
    let mut ids = BTreeSet::new();
    for row in &rows {
        ids.insert(row.get::<_, i64>(0));
        if let TopicRouting::ByColumn { prefix, .. } = &event_cfg.routing {
            if let Some(v) = row.get::<_, Option<String>>(2).filter(|v| !v.is_empty()) {
                topics.insert(format!("{prefix}{v}"));
            }
        }
    }
    let (from_id, to_id) = match (range.from_id, range.to_id) {
        (Some(f), Some(t)) => (f, t),
        (f, t) => (
            f.or(ids.first().copied()).unwrap_or(0),
            t.or(ids.last().copied()).unwrap_or(0),
        ),
    };

    // 2. The relay delivered all of them (or we say it had not).
    let caught_up = wait_confirmed(&client, &cfg.slot, wal, range.wait).await?;

    // 3. The topics.
    let kafka = cfg.kafka_config().client_config();
    let names: Vec<String> = topics.iter().cloned().collect();
    let seen = tokio::task::spawn_blocking(move || {
        let mut all = Vec::new();
        for topic in &names {
            all.extend(read_topic(kafka.clone(), topic)?);
        }
        Ok::<_, VerifyError>(all)
    })
    .await
    .unwrap_or_else(|e| {
        Err(VerifyError::Kafka {
            topic: format!("(reader task: {e})"),
            source: rdkafka::error::KafkaError::Canceled,
        })
    })?;

    // 4. The comparison; records without a row checked against the table
    // again (committed after the snapshot).
    let mut report = compare(&ids, &seen, from_id, to_id);
    if report.without_row.count > 0 {
        let candidates = without_row(&ids, &seen, from_id, to_id);
        let now: BTreeSet<i64> = client
            .query(
                &format!("SELECT id FROM {table} WHERE id = ANY($1)"),
                &[&candidates],
            )
            .await
            .map_err(VerifyError::Query)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        report.without_row = Ids::of(candidates.into_iter().filter(|id| !now.contains(id)));
    }
    if range.republish && report.missing.count > 0 {
        let present: BTreeSet<i64> = seen.iter().filter_map(|s| s.event_id).collect();
        let missing: Vec<i64> = ids.difference(&present).copied().collect();
        let done = crate::republish::republish(cfg, &client, &missing)
            .await
            .map_err(|e| VerifyError::Republish(Box::new(e)))?;
        report.republished = Some(done);
    }
    report.topics = topics.into_iter().collect();
    report.caught_up = caught_up;
    report.ok = report.missing.count == 0
        && report.duplicated.count == 0
        && report.out_of_order == 0
        && report.without_row.count == 0;
    Ok(report)
}

/// Waits until slot `slot` confirmed `wal`; false if it does not exist or
/// did not within `wait`.
async fn wait_confirmed(
    client: &tokio_postgres::Client,
    slot: &str,
    wal: Lsn,
    wait: Duration,
) -> Result<bool, VerifyError> {
    let started = Instant::now();
    loop {
        let confirmed: Option<String> = client
            .query_opt(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(VerifyError::Query)?
            .and_then(|r| r.get(0));
        let Some(confirmed) = confirmed.and_then(|c| c.parse::<Lsn>().ok()) else {
            return Ok(false);
        };
        if confirmed >= wal {
            return Ok(true);
        }
        if started.elapsed() >= wait {
            tracing::warn!(slot, %confirmed, wal = %wal,
                "the slot has not confirmed every row of the snapshot; recent rows may show as missing");
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every record of `topic` from the start to its end when reading began.
fn read_topic(client_cfg: rdkafka::ClientConfig, topic: &str) -> Result<Vec<Seen>, VerifyError> {
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
                "id" => debezium_id = debezium_id.or(text.and_then(|t| t.parse().ok())),
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

fn without_row(ids: &BTreeSet<i64>, seen: &[Seen], from: i64, to: i64) -> Vec<i64> {
    seen.iter()
        .filter_map(|s| s.event_id)
        .filter(|id| (from..=to).contains(id) && !ids.contains(id))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// The comparison of rows `ids` (in `from..=to`) with the records read.
pub fn compare(ids: &BTreeSet<i64>, seen: &[Seen], from: i64, to: i64) -> Report {
    let mut counts: BTreeMap<i64, usize> = BTreeMap::new();
    let mut unidentified = 0;
    let mut unordered = 0;
    let mut late = 0;
    let mut out_of_order = 0;
    let mut examples = Vec::new();
    // Per key, the last position and event seen (records of a key share a
    // partition; `seen` is in partition order).
    let mut last: HashMap<(&str, &str), (Position, Option<i64>)> = HashMap::new();
    for s in seen {
        match s.event_id {
            Some(id) => *counts.entry(id).or_default() += 1,
            None => unidentified += 1,
        }
        if s.late {
            late += 1;
            continue;
        }
        let Some(pos) = s.position else {
            unordered += 1;
            continue;
        };
        let key = (s.topic.as_str(), s.key.as_deref().unwrap_or(""));
        if let Some((before, before_id)) = last.insert(key, (pos, s.event_id)) {
            // A replayed duplicate is reported as one; order is about the
            // rest.
            if pos <= before && !(pos == before && before_id == s.event_id) {
                out_of_order += 1;
                if examples.len() < LISTED {
                    examples.push(OutOfOrder {
                        key: key.1.to_owned(),
                        topic: s.topic.clone(),
                        partition: s.partition,
                        offset: s.offset,
                        event_id: s.event_id,
                        after_event_id: before_id,
                    });
                }
                // Keep the furthest position, so one late record counts once.
                last.insert(key, (before, before_id));
            }
        }
    }
    let missing = Ids::of(ids.iter().copied().filter(|id| !counts.contains_key(id)));
    let duplicated = Ids::of(
        counts
            .iter()
            .filter(|(id, n)| **n > 1 && (from..=to).contains(*id))
            .map(|(id, _)| *id)
            .collect::<Vec<_>>(),
    );
    let extra = Ids::of(without_row(ids, seen, from, to));
    Report {
        from_id: from,
        to_id: to,
        rows: ids.len(),
        topics: Vec::new(),
        records: seen.len(),
        caught_up: true,
        missing,
        duplicated,
        out_of_order,
        out_of_order_examples: examples,
        without_row: extra,
        unidentified,
        unordered,
        late,
        republished: None,
        ok: false,
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |ids: &Ids| {
            let shown: Vec<String> = ids.ids.iter().map(i64::to_string).collect();
            let more = if ids.count > ids.ids.len() {
                ", …"
            } else {
                ""
            };
            if ids.count == 0 {
                String::new()
            } else {
                format!("  ({}{more})", shown.join(", "))
            }
        };
        writeln!(
            f,
            "outbox ids {}..={}: {} rows",
            self.from_id, self.to_id, self.rows
        )?;
        writeln!(
            f,
            "topics {}: {} records",
            self.topics.join(", "),
            self.records
        )?;
        if !self.caught_up {
            writeln!(
                f,
                "note: the slot had not confirmed every row when the topics were read; recent rows may show as missing"
            )?;
        }
        writeln!(f)?;
        writeln!(f, "| finding | count |")?;
        writeln!(f, "|---|---:|")?;
        writeln!(
            f,
            "| missing from Kafka | {}{} |",
            self.missing.count,
            list(&self.missing)
        )?;
        writeln!(
            f,
            "| in Kafka more than once | {}{} |",
            self.duplicated.count,
            list(&self.duplicated)
        )?;
        writeln!(f, "| out of per-key commit order | {} |", self.out_of_order)?;
        writeln!(
            f,
            "| records with no row | {}{} |",
            self.without_row.count,
            list(&self.without_row)
        )?;
        writeln!(
            f,
            "| records without an event id (not compared) | {} |",
            self.unidentified
        )?;
        writeln!(
            f,
            "| records without lsn/seq (order not checked) | {} |",
            self.unordered
        )?;
        writeln!(
            f,
            "| records marked late (republished; order not checked) | {} |",
            self.late
        )?;
        for e in &self.out_of_order_examples {
            writeln!(
                f,
                "out of order: key {} in {}/{} at offset {}: event {:?} after event {:?}",
                e.key, e.topic, e.partition, e.offset, e.event_id, e.after_event_id
            )?;
        }
        if let Some(r) = &self.republished {
            writeln!(
                f,
                "republished {} missing events (marked late); {} more are in the slot's unconfirmed changes, left to the relay",
                r.produced, r.in_flight
            )?;
        }
        write!(f, "{}", if self.ok { "ok" } else { "NOT ok" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: Option<i64>, key: &str, lsn: u64, seq: u64, offset: i64) -> Seen {
        Seen {
            topic: "t".into(),
            partition: 0,
            offset,
            key: Some(key.into()),
            event_id: id,
            position: Some((Lsn(lsn), seq)),
            late: false,
        }
    }

    #[test]
    fn a_clean_topic_is_ok_and_every_finding_is_counted() {
        let ids: BTreeSet<i64> = (1..=5).collect();
        let clean = [
            rec(Some(2), "a", 10, 0, 0),
            rec(Some(1), "a", 20, 0, 1),
            rec(Some(3), "b", 20, 1, 2),
            rec(Some(4), "a", 30, 0, 3),
            rec(Some(5), "b", 40, 0, 4),
        ];
        let r = compare(&ids, &clean, 1, 5);
        assert_eq!(
            (
                r.missing.count,
                r.duplicated.count,
                r.out_of_order,
                r.without_row.count
            ),
            (0, 0, 0, 0),
            "{r:?}"
        );

        let broken = [
            rec(Some(2), "a", 10, 0, 0),
            rec(Some(2), "a", 10, 0, 1), // replayed
            rec(Some(4), "a", 30, 0, 2),
            rec(Some(1), "a", 20, 0, 3), // behind 4
            rec(Some(9), "b", 50, 0, 4), // no row
            rec(None, "b", 60, 0, 5),
        ];
        let r = compare(&ids, &broken, 1, 10);
        assert_eq!(r.missing.ids, [3, 5]);
        assert_eq!(r.duplicated.ids, [2]);
        assert_eq!(r.out_of_order, 1);
        assert_eq!(r.out_of_order_examples[0].event_id, Some(1));
        assert_eq!(r.out_of_order_examples[0].after_event_id, Some(4));
        assert_eq!(r.without_row.ids, [9]);
        assert_eq!(r.unidentified, 1);
        // Outside the range: no finding.
        assert_eq!(compare(&ids, &broken, 1, 8).without_row.count, 0);
        assert_eq!(compare(&ids, &broken, 3, 10).duplicated.count, 0);
    }

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
