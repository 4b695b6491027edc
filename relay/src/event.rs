//! Event: one outbox row, decoded from an Insert, becomes one Kafka record.
//!
//! ```text
//!  Begin{final_lsn, xid, commit_ts} ─┐
//!  Relation (columns, types) ────────┼─▶ OutboxRecord { topic, key, value, headers }
//!  Insert (tuple)  #seq in the txn ──┘
//! ```
//!
//! The record is what SPEC.md promises: topic `microshop.order-outbox` (or
//! prefix + the value of a routing column), key = the key column as text,
//! value = the row as a JSON object in column order (`jsonb` embedded), and
//! headers `event_id`, `event_type`, `lsn` (commit LSN), `xid`, `commit_ts`
//! (RFC 3339, µs) and `seq` (index of the row in its transaction).
//!
//! Columns named by `--header-columns` (a W3C `traceparent`, say) are
//! copied into headers of the same name, after the relay's own; a listed
//! column the table lacks, or a NULL, adds none.
//!
//! With `--value-format connect-json` the value is the
//! `{"schema":…,"payload":…}` envelope Kafka Connect's JsonConverter wrote
//! for the JDBC source connector this relay replaces.
//!
//! With `--value-format debezium-outbox` the record is the one Debezium
//! 3.6's Outbox Event Router (`io.debezium.transforms.outbox.EventRouter`)
//! writes with its defaults, behind Kafka Connect's `StringConverter` for
//! keys, `JsonConverter` with `schemas.enable=false` for values and the
//! default `SimpleHeaderConverter` for headers (see [`debezium_value`]):
//!
//! ```text
//!  row {id: 17, aggregate_type: "order", aggregate_id: "5", payload: {"a": 1}}
//!    ─▶ topic   outbox.event.order            route.topic.replacement outbox.event.${routedByValue}
//!       key     5                             table.field.event.key   (aggregateid → aggregate_id)
//!       value   "{\"a\": 1}"                   table.field.event.payload, a JSON string
//!       headers id=17, then the relay's own   table.field.event.id
//! ```
//!
//! The relay's own headers (`event_id`, `event_type`, `lsn`, `xid`,
//! `commit_ts`, `seq`) and the `--header-columns` ones follow Debezium's
//! `id`: `lsn` and `seq` are what its exactly-once restart reads (see
//! `dedupe`), and a consumer that reads headers by name does not see the
//! difference.

use outbox_record::header;
use serde_json::{json, Value};

use crate::lsn::Lsn;
use crate::message::MessageConfig;
use crate::pgoutput::{
    row_to_json, type_oid, Cell, JsonRow, PgTimestamp, Relation, RowError, TupleData, TupleValue,
};

/// How the record value is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ValueFormat {
    /// The row as a plain JSON object.
    Json,
    /// Kafka Connect JsonConverter envelope with `schema` and `payload`.
    ConnectJson,
    /// What Debezium's Outbox Event Router writes with its defaults: topic
    /// `outbox.event.<aggregate_type>`, key `aggregate_id`, value the
    /// `payload` column as a JSON string, header `id`.
    DebeziumOutbox,
}

/// The Debezium outbox format's names (`--value-format debezium-outbox`),
/// each the Outbox Event Router default of Debezium 3.6.1
/// (`EventRouterConfigDefinition`) it stands for, mapped to this outbox
/// table's column names.
pub mod debezium {
    /// `route.topic.replacement` `outbox.event.${routedByValue}`: the
    /// default topic prefix.
    pub const TOPIC_PREFIX: &str = "outbox.event.";
    /// `route.by.field` `aggregatetype`: the default routing column.
    pub const ROUTE_COLUMN: &str = "aggregate_type";
    /// `table.field.event.key` `aggregateid`: the default key column.
    pub const KEY_COLUMN: &str = "aggregate_id";
    /// `table.field.event.payload` `payload`: the value.
    pub const PAYLOAD_COLUMN: &str = "payload";
    /// `table.field.event.id` `id`: the column copied into the `id` header.
    pub const ID_COLUMN: &str = "id";
    /// The header the router always adds (`headers.add("id", …)`).
    pub const ID_HEADER: &str = "id";
}

/// Which topic a record goes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TopicRouting {
    /// Every record to one topic.
    Fixed(String),
    /// `prefix` + the value of `column`; rows where it is NULL or empty go
    /// to `fallback`.
    ByColumn {
        column: String,
        prefix: String,
        fallback: String,
    },
}

/// What the relay produces from which table.
#[derive(Clone, Debug)]
pub struct EventConfig {
    /// Schema of the outbox table.
    pub schema: String,
    /// Name of the outbox table.
    pub table: String,
    pub key_column: String,
    pub routing: TopicRouting,
    pub value_format: ValueFormat,
    /// Columns copied into headers of the same name.
    pub header_columns: Vec<String>,
    /// Events written as logical decoding messages (see `message`).
    pub messages: MessageConfig,
}

impl EventConfig {
    /// True when `rel` is the configured outbox table.
    pub fn is_outbox(&self, rel: &Relation) -> bool {
        let namespace = if rel.namespace.is_empty() {
            "pg_catalog"
        } else {
            rel.namespace.as_str()
        };
        namespace == self.schema && rel.name == self.table
    }

    /// Every topic this configuration can name up front (for creation).
    pub fn static_topics(&self) -> Vec<String> {
        match &self.routing {
            TopicRouting::Fixed(t) => vec![t.clone()],
            TopicRouting::ByColumn { fallback, .. } => vec![fallback.clone()],
        }
    }
}

/// The transaction a row belongs to (from its Begin message).
#[derive(Clone, Copy, Debug)]
pub struct TxnInfo {
    pub commit_lsn: Lsn,
    pub xid: u32,
    pub commit_ts: PgTimestamp,
}

/// One Kafka record, ready to produce.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboxRecord {
    pub topic: String,
    /// Set by the pipeline (see `dedupe::partition_for`); `None` leaves the
    /// choice to the producer's partitioner.
    pub partition: Option<i32>,
    pub key: Option<String>,
    pub value: Vec<u8>,
    pub headers: Vec<(&'static str, String)>,
    /// From `--header-columns`: (column name, its value as text). Boxed:
    /// usually empty, and records wait in queues by the thousand.
    pub column_headers: Box<[(String, String)]>,
}

impl OutboxRecord {
    /// What places the record on a partition: its key, else its event
    /// id, else nothing.
    pub fn partition_key(&self) -> &str {
        self.key
            .as_deref()
            .or_else(|| self.header(header::EVENT_ID))
            .unwrap_or("")
    }

    /// The value of the relay's header `name` (not the columns').
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every header, the relay's own first, then the columns'.
    pub fn all_headers(&self) -> impl Iterator<Item = (&str, &str)> {
        self.headers.iter().map(|(k, v)| (*k, v.as_str())).chain(
            self.column_headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        )
    }

    /// Approximate bytes this record holds in the producer queue.
    pub fn size(&self) -> usize {
        self.topic.len()
            + self.key.as_ref().map_or(0, String::len)
            + self.value.len()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
            + self
                .column_headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}

/// Why an outbox row could not become a record.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("outbox row could not be decoded")]
    Row(#[from] RowError),
    #[error("outbox table {table} has no column {column:?} (configured as the {role})")]
    MissingColumn {
        table: String,
        column: String,
        role: &'static str,
    },
}

/// Checks that the relation has the columns the configuration names.
pub fn check_relation(cfg: &EventConfig, rel: &Relation) -> Result<(), EventError> {
    let mut required = vec![(cfg.key_column.as_str(), "record key")];
    if let TopicRouting::ByColumn { column, .. } = &cfg.routing {
        required.push((column.as_str(), "routing column"));
    }
    if cfg.value_format == ValueFormat::DebeziumOutbox {
        // Debezium stops on both ("Unable to find payload field …").
        required.push((debezium::PAYLOAD_COLUMN, "Debezium outbox payload"));
        required.push((debezium::ID_COLUMN, "Debezium outbox event id"));
    }
    for (column, role) in required {
        if !rel.columns.iter().any(|c| c.name == column) {
            return Err(EventError::MissingColumn {
                table: rel.qualified_name(),
                column: column.to_owned(),
                role,
            });
        }
    }
    Ok(())
}

/// Builds the record for row `seq` (0-based) of transaction `txn`.
pub fn build_record(
    cfg: &EventConfig,
    rel: &Relation,
    tuple: &TupleData,
    txn: &TxnInfo,
    seq: u64,
) -> Result<OutboxRecord, EventError> {
    let row = row_to_json(rel, tuple)?;
    let mut record = record_from_row(cfg, rel, &row, txn, seq);
    if cfg.value_format == ValueFormat::DebeziumOutbox {
        // The payload exactly as Postgres printed it (the JSON row drops
        // whitespace inside json/jsonb), as Debezium reads it.
        let raw = rel
            .columns
            .iter()
            .position(|c| c.name == debezium::PAYLOAD_COLUMN)
            .and_then(|i| match tuple.0.get(i) {
                Some(TupleValue::Text(text)) => Some(text.as_str()),
                _ => None,
            });
        if let Some(raw) = raw {
            record.value = debezium_value(Some(raw));
        }
    }
    Ok(record)
}

/// The record of a decoded row (`rel` gives its column types); also used
/// for events written as logical decoding messages (see `message`).
pub fn record_from_row(
    cfg: &EventConfig,
    rel: &Relation,
    row: &JsonRow,
    txn: &TxnInfo,
    seq: u64,
) -> OutboxRecord {
    let text = |v: Option<&Cell>| v.and_then(Cell::as_text);
    let topic = match &cfg.routing {
        TopicRouting::Fixed(t) => t.clone(),
        TopicRouting::ByColumn {
            column,
            prefix,
            fallback,
        } => match text(row.get(column)) {
            Some(v) if !v.is_empty() => format!("{prefix}{v}"),
            _ => fallback.clone(),
        },
    };
    let key = text(row.get(&cfg.key_column));
    let mut headers = header::relay_headers(
        text(row.get("id")),
        text(row.get("event_type")),
        (txn.commit_lsn, seq),
        txn.xid,
        txn.commit_ts.to_rfc3339_micros(),
    );
    if cfg.value_format == ValueFormat::DebeziumOutbox {
        if let Some(id) = text(row.get(debezium::ID_COLUMN)) {
            headers.insert(0, (debezium::ID_HEADER, id));
        }
    }
    let column_headers = cfg
        .header_columns
        .iter()
        .filter_map(|c| Some((c.clone(), text(row.get(c))?)))
        .collect();
    let value = match cfg.value_format {
        ValueFormat::Json => row.to_json_string().into_bytes(),
        ValueFormat::ConnectJson => connect_json(rel, row).to_string().into_bytes(),
        // A table row's is replaced by its raw text in `build_record`.
        ValueFormat::DebeziumOutbox => {
            debezium_value(text(row.get(debezium::PAYLOAD_COLUMN)).as_deref())
        }
    };
    OutboxRecord {
        topic,
        partition: None,
        key,
        value,
        headers,
        column_headers,
    }
}

/// The JsonConverter envelope (`schemas.enable=true`) as the JDBC source
/// connector produced it: integers as int16/32/64, booleans, floats,
/// timestamps as Connect `Timestamp` (epoch milliseconds), dates as Connect
/// `Date` (epoch days), everything else — `numeric`, `json`/`jsonb`, text —
/// as strings. pgoutput does not carry nullability, so every column except
/// the replica-identity key is marked optional.
fn connect_json(rel: &Relation, row: &JsonRow) -> Value {
    let mut fields = Vec::with_capacity(rel.columns.len());
    let mut payload = serde_json::Map::new();
    for (col, (name, value)) in rel.columns.iter().zip(row.iter()) {
        let (schema_type, logical) = match col.type_oid {
            type_oid::INT2 => ("int16", None),
            type_oid::INT4 => ("int32", None),
            type_oid::INT8 | type_oid::OID => ("int64", None),
            type_oid::BOOL => ("boolean", None),
            type_oid::FLOAT4 => ("float", None),
            type_oid::FLOAT8 => ("double", None),
            type_oid::TIMESTAMPTZ | type_oid::TIMESTAMP => {
                ("int64", Some("org.apache.kafka.connect.data.Timestamp"))
            }
            type_oid::DATE => ("int32", Some("org.apache.kafka.connect.data.Date")),
            _ => ("string", None),
        };
        let mut field = json!({
            "type": schema_type,
            "optional": !col.is_key(),
            "field": name,
        });
        if let Some(logical) = logical {
            field["name"] = json!(logical);
            field["version"] = json!(1);
        }
        fields.push(field);
        let value = match value {
            Cell::Value(v) => v.clone(),
            // json/jsonb: a string, as the JDBC connector gave them.
            Cell::Document(raw) => Value::String(raw.get().to_owned()),
        };
        let converted = match (&value, logical) {
            (Value::Null, _) => Value::Null,
            (Value::String(s), Some("org.apache.kafka.connect.data.Timestamp")) => {
                timestamp_millis(s).map_or_else(|| Value::String(s.clone()), Value::from)
            }
            (Value::String(s), Some(_)) => {
                date_days(s).map_or_else(|| Value::String(s.clone()), Value::from)
            }
            (v, _) if schema_type == "string" && !v.is_string() => Value::String(v.to_string()),
            (_, _) => value,
        };
        payload.insert(name.to_owned(), converted);
    }
    // Key order inside `payload` follows serde_json's map (sorted); the
    // schema's `fields` array carries the column order.
    json!({
        "schema": {
            "type": "struct",
            "fields": fields,
            "optional": false,
            "name": rel.name,
        },
        "payload": payload,
    })
}

/// The value Debezium's Outbox Event Router writes for a payload column
/// through Kafka Connect's `JsonConverter` with `schemas.enable=false`.
///
/// The router's value is the payload column itself when no
/// `table.fields.additional.placement` puts a field in the envelope
/// (`EventRouterDelegate`, `onlyHeadersInOutputMessage`), and its Connect
/// schema is the column's: for `json`/`jsonb`, `text` and `varchar` a string
/// (`io.debezium.data.Json` for JSON, holding the text Postgres printed,
/// `ReplicationMessageColumnValueResolver`) unless
/// `table.expand.json.payload` is set, which is off by default. The
/// converter writes a string as a JSON string literal with Jackson's
/// escaping — `\"`, `\\`, `\b \f \n \r \t`, other controls as `\u00XX`,
/// characters beyond U+FFFF as their UTF-16 surrogates `\uXXXX\uXXXX`
/// (hex in upper case), everything else (`/`, DEL, other non-ASCII) as it
/// is — and a NULL of an optional column as `null`. Checked against
/// Kafka 4.3's converter by `scripts/bench debezium-compat`.
pub fn debezium_value(payload: Option<&str>) -> Vec<u8> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    fn unicode_escape(out: &mut Vec<u8>, unit: u16) {
        out.extend_from_slice(b"\\u");
        for shift in [12, 8, 4, 0] {
            out.push(HEX[usize::from((unit >> shift) & 0xf)]);
        }
    }
    let Some(text) = payload else {
        return b"null".to_vec();
    };
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(text.len() + text.len() / 8 + 2);
    out.push(b'"');
    let mut run = 0;
    for (i, c) in text.char_indices() {
        let escape: &[u8] = match c {
            '"' => b"\\\"",
            '\\' => b"\\\\",
            '\n' => b"\\n",
            '\r' => b"\\r",
            '\t' => b"\\t",
            '\u{8}' => b"\\b",
            '\u{c}' => b"\\f",
            '\0'..='\u{1f}' | '\u{10000}'.. => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[run..i]);
        run = i + c.len_utf8();
        if escape.is_empty() {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                unicode_escape(&mut out, *unit);
            }
        } else {
            out.extend_from_slice(escape);
        }
    }
    out.extend_from_slice(&bytes[run..]);
    out.push(b'"');
    out
}

fn timestamp_millis(s: &str) -> Option<i64> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Some(t.timestamp_millis());
    }
    chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
        .ok()
        .map(|t| t.and_utc().timestamp_millis())
}

fn date_days(s: &str) -> Option<i64> {
    let d = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()?;
    let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1)?;
    Some((d - epoch).num_days())
}

#[cfg(test)]
mod tests;
