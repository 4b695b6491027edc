//! `relay verify --republish-missing`: produces the events `verify` found
//! missing from Kafka, built from their rows as the relay builds every
//! record, marked late (header `late`), so consumers get them after all.
//!
//! A republished event must not disturb the relay's exactly-once restart
//! (see `dedupe`), which takes each partition's last position as the line
//! below which replayed records are already there. So:
//!
//! ```text
//!   C = the slot's confirmed position (the current WAL position without a slot)
//!   every partition's last position  <  (C − 1, id)  <  every record still to come
//!                    (delivered and confirmed)          (commits after C)
//! ```
//!
//! Each event goes out at position `(C − 1, its id)`: above what the
//! confirmed slot already delivered (a commit record ends at least a few
//! dozen bytes after its commit LSN), below any transaction the slot will
//! still stream (they commit at or after `C`). That holds only while no
//! relay streams the slot and every partition's last record is confirmed:
//! it refuses while the slot is active, and while a partition holds a
//! record beyond `C` (a relay killed before confirming what Kafka had; start
//! and stop it once, so it confirms).
//!
//! Nor is a row republished that the slot will still deliver: the slot's
//! unconfirmed changes are read without consuming them
//! (`pg_logical_slot_peek_binary_changes`, decoded like the stream), and
//! missing rows found there are left to the relay ("in flight").

use std::collections::BTreeSet;
use std::time::Duration;

use outbox_record::header;
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::config::Config;
use crate::dedupe;
use crate::event::{self, TxnInfo};
use crate::lsn::Lsn;
use crate::pgoutput::{
    LogicalMessage, PgTimestamp, Relation, RelationCache, RelationColumn, TupleData, TupleValue,
};
use crate::replication::quote_ident;
use crate::sink::kafka::kafka_headers;

/// The header marking a republished event (its value: when, RFC 3339).
pub use outbox_record::header::LATE;

#[derive(Debug, thiserror::Error)]
pub enum RepublishError {
    #[error("querying Postgres")]
    Query(#[source] tokio_postgres::Error),
    #[error("slot {0} is active: a relay streams it, and events republished now could land among its records; stop it first")]
    SlotActive(String),
    #[error(
        "topic {topic} partition {partition} holds a record at {lsn} (seq {seq}), beyond the slot's \
         confirmed position {confirmed}: the relay stopped before confirming what Kafka had. Start \
         it and stop it once (it confirms on a graceful stop), then republish"
    )]
    Unconfirmed {
        topic: String,
        partition: i32,
        lsn: Lsn,
        seq: u64,
        confirmed: Lsn,
    },
    #[error("reading topic {0}")]
    Topic(String, #[source] dedupe::DedupeError),
    #[error("building the record of event {0}")]
    Event(i64, #[source] event::EventError),
    #[error("producing to Kafka")]
    Kafka(#[source] rdkafka::error::KafkaError),
}

/// What [`republish`] did.
#[derive(Debug, Default, serde::Serialize, PartialEq, Eq)]
pub struct Republished {
    /// Events produced, marked late.
    pub produced: usize,
    /// Missing rows the slot will still deliver (left to the relay).
    pub in_flight: usize,
}

/// Produces the events of rows `missing` that the slot will not deliver.
pub async fn republish(
    cfg: &Config,
    client: &tokio_postgres::Client,
    missing: &[i64],
) -> Result<Republished, RepublishError> {
    if missing.is_empty() {
        return Ok(Republished::default());
    }
    let confirmed = position_below_the_stream(client, &cfg.slot).await?;
    let pending = in_flight(cfg, client).await?;
    let ids: Vec<i64> = missing
        .iter()
        .copied()
        .filter(|id| !pending.contains(id))
        .collect();
    let in_flight = missing.len() - ids.len();
    if ids.is_empty() {
        return Ok(Republished {
            produced: 0,
            in_flight,
        });
    }
    let ids = &ids[..];
    let event_cfg = cfg.event_config();
    let kafka = cfg.kafka_config();
    let (rel, rows) = rows(cfg, client, ids).await?;
    let txn = TxnInfo {
        commit_lsn: Lsn(confirmed.0.saturating_sub(1)),
        xid: 0,
        commit_ts: PgTimestamp::from_unix_micros(chrono::Utc::now().timestamp_micros()),
    };
    let late = header::format_commit_ts(chrono::Utc::now());
    let mut records = Vec::with_capacity(rows.len());
    for (id, tuple) in rows {
        let record = event::build_record(&event_cfg, &rel, &tuple, &txn, id as u64)
            .map_err(|e| RepublishError::Event(id, e))?;
        records.push(record);
    }

    // Each topic's partitions, and that no partition is ahead of the slot.
    let topics: BTreeSet<String> = records.iter().map(|r| r.topic.clone()).collect();
    let mut partitions = std::collections::HashMap::new();
    for topic in topics {
        let state = dedupe::load(&kafka, &topic, true)
            .await
            .map_err(|e| RepublishError::Topic(topic.clone(), e))?;
        for (p, last) in state.last.iter().enumerate() {
            if let Some((lsn, seq)) = last {
                if *lsn >= txn.commit_lsn {
                    return Err(RepublishError::Unconfirmed {
                        topic,
                        partition: p as i32,
                        lsn: *lsn,
                        seq: *seq,
                        confirmed,
                    });
                }
            }
        }
        partitions.insert(topic, state.partitions);
    }

    let producer: FutureProducer = kafka
        .client_config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .map_err(RepublishError::Kafka)?;
    let mut sends = Vec::with_capacity(records.len());
    for record in &records {
        let partition =
            dedupe::partition_for(record.partition_key().as_bytes(), partitions[&record.topic]);
        let headers = kafka_headers(record.all_headers().chain([(LATE, late.as_str())]));
        let mut out = FutureRecord::to(&record.topic)
            .partition(partition)
            .payload(&record.value)
            .headers(headers);
        if let Some(key) = &record.key {
            out = out.key(key);
        }
        sends.push(producer.send(out, Duration::from_secs(60)));
    }
    for sent in futures_util::future::join_all(sends).await {
        sent.map_err(|(e, _)| RepublishError::Kafka(e))?;
    }
    Ok(Republished {
        produced: records.len(),
        in_flight,
    })
}

/// The outbox ids of the inserts the slot has not confirmed: what it will
/// stream next (read without consuming; the slot must not be active).
async fn in_flight(
    cfg: &Config,
    client: &tokio_postgres::Client,
) -> Result<BTreeSet<i64>, RepublishError> {
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&cfg.slot],
        )
        .await
        .map_err(RepublishError::Query)?
        .is_some();
    if !exists {
        return Ok(BTreeSet::new());
    }
    let changes = client
        .query(
            "SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL, \
             'proto_version', '1', 'publication_names', $2)",
            &[&cfg.slot, &cfg.publication],
        )
        .await
        .map_err(RepublishError::Query)?;
    let event_cfg = cfg.event_config();
    let mut relations = RelationCache::new();
    let mut ids = BTreeSet::new();
    for change in &changes {
        let data: Vec<u8> = change.get(0);
        match crate::pgoutput::decode(&data) {
            Ok(LogicalMessage::Relation(rel)) => {
                relations.apply(rel);
            }
            Ok(LogicalMessage::Insert(ins)) => {
                let Some(rel) = relations.get(ins.relation_oid) else {
                    continue;
                };
                if !event_cfg.is_outbox(rel) {
                    continue;
                }
                if let Ok(row) = crate::pgoutput::row_to_json(rel, &ins.new) {
                    if let Some(id) = row
                        .get("id")
                        .and_then(|c| c.as_text())
                        .and_then(|t| t.parse().ok())
                    {
                        ids.insert(id);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(ids)
}

/// The slot's confirmed position, refusing while a relay streams it; the
/// current WAL position when there is no slot (a new one starts after it).
async fn position_below_the_stream(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<Lsn, RepublishError> {
    let row = client
        .query_opt(
            "SELECT active, confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(RepublishError::Query)?;
    let text: Option<String> = match row {
        Some(row) if row.get::<_, bool>(0) => {
            return Err(RepublishError::SlotActive(slot.to_owned()))
        }
        Some(row) => row.get(1),
        None => client
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .map_err(RepublishError::Query)?
            .get(0),
    };
    Ok(text.and_then(|t| t.parse().ok()).unwrap_or(Lsn::ZERO))
}

/// The outbox table's columns as pgoutput describes them (generated
/// columns are not sent), and the rows `ids` as text, in id order.
async fn rows(
    cfg: &Config,
    client: &tokio_postgres::Client,
    ids: &[i64],
) -> Result<(Relation, Vec<(i64, TupleData)>), RepublishError> {
    let table = OutboxColumns::read(cfg, client)
        .await
        .map_err(RepublishError::Query)?;
    let rows = client
        .query(
            &format!(
                "SELECT {} FROM {} WHERE id = ANY($1) ORDER BY 1",
                table.select, table.qualified
            ),
            &[&ids],
        )
        .await
        .map_err(RepublishError::Query)?;
    let tuples = rows.iter().map(|r| table.tuple(r)).collect();
    Ok((table.relation, tuples))
}

/// The outbox table read as the stream sees it: its columns as pgoutput
/// describes them (generated columns are not sent), and a select list
/// giving the id and then every column as text (`relay verify
/// --republish-missing` and the backfill build records from it).
pub(crate) struct OutboxColumns {
    pub relation: Relation,
    /// The table, schema-qualified and quoted.
    pub qualified: String,
    /// `id, "col"::text, …`
    pub select: String,
}

impl OutboxColumns {
    pub async fn read(
        cfg: &Config,
        client: &tokio_postgres::Client,
    ) -> Result<OutboxColumns, tokio_postgres::Error> {
        let (schema, table) = cfg.table_parts();
        let qualified = format!("{}.{}", quote_ident(&schema), quote_ident(&table));
        let columns = client
            .query(
                "SELECT attname::text, atttypid::oid, atttypmod FROM pg_attribute \
                  WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped \
                    AND attgenerated = '' ORDER BY attnum",
                &[&qualified],
            )
            .await?;
        let columns: Vec<RelationColumn> = columns
            .iter()
            .map(|c| RelationColumn {
                flags: u8::from(c.get::<_, String>(0) == "id"),
                name: c.get(0),
                type_oid: c.get(1),
                type_modifier: c.get(2),
            })
            .collect();
        let select = std::iter::once("id".to_owned())
            .chain(
                columns
                    .iter()
                    .map(|c| format!("{}::text", quote_ident(&c.name))),
            )
            .collect::<Vec<_>>()
            .join(", ");
        let relation = Relation {
            oid: 0,
            namespace: schema,
            name: table,
            replica_identity: b'd',
            columns,
        };
        Ok(OutboxColumns {
            relation,
            qualified,
            select,
        })
    }

    /// A row of the select list: its id and its columns as pgoutput sends them.
    pub fn tuple(&self, row: &tokio_postgres::Row) -> (i64, TupleData) {
        let values = (1..=self.relation.columns.len())
            .map(|i| match row.get::<_, Option<String>>(i) {
                Some(text) => TupleValue::Text(text),
                None => TupleValue::Null,
            })
            .collect();
        (row.get::<_, i64>(0), TupleData(values))
    }
}
