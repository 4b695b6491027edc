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
//!
//! Here the session of steps 1, 2 and 4; reading the topics back in
//! `records.rs`, the comparison and its report in `report.rs`.

mod records;
mod report;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};

pub(crate) use records::each_record;
use records::read_topic;
pub use records::Seen;
use report::without_row;
pub use report::{compare, Ids, OutOfOrder, Report};

use crate::config::Config;
use crate::event::TopicRouting;
use crate::lsn::Lsn;
use crate::replication::{self, quote_ident, ReplicationError};

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
    /// Only rows whose `time_column` is at or after `since` and before
    /// `until`.
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub time_column: String,
    /// How long to wait for the slot to confirm what the snapshot holds.
    pub wait: Duration,
    /// Produce the missing events (see `republish`).
    pub republish: bool,
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
    let time = quote_ident(&range.time_column);
    let at = |t: Option<DateTime<Utc>>| t.map(|t| t.to_rfc3339_opts(SecondsFormat::Micros, true));
    let (since, until) = (at(range.since), at(range.until));
    let rows = client
        .query(
            &format!(
                "SELECT id, {key}::text, {routing} FROM {table} WHERE id BETWEEN $1 AND $2 \
                   AND ($3::text IS NULL OR {time} >= $3::text::timestamptz) \
                   AND ($4::text IS NULL OR {time} < $4::text::timestamptz) ORDER BY id"
            ),
            &[&from_id, &to_id, &since, &until],
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
    (report.since, report.until) = (since, until);
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
