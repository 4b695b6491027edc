//! The table-less outbox: an event written with
//! `pg_logical_emit_message(true, 'outbox', content)` inside the business
//! transaction becomes the record an outbox row with the same fields would.
//!
//! ```text
//!  Begin ─▶ … Insert(outbox row) … Message(prefix 'outbox', content) … ─▶ Commit
//!                     │                          │ parse(): JSON object → row
//!                     ▼                          ▼
//!              event::record_from_row: same topic routing, key, value, headers;
//!              seq counts rows and messages together, in statement order
//! ```
//!
//! The content is a UTF-8 JSON object with the fields an outbox row has:
//! `aggregate_type`, `aggregate_id`, `event_type`, `payload` and the key
//! column (`user_id`) are required (not null); `id`, `created_at` (RFC 3339),
//! `traceparent`, `tracestate` and any other field are optional and become
//! columns of the row. The record's value is that row: `id` first, then the
//! outbox table's columns in its order, then the other fields by name (the
//! order-api row's order), `jsonb`-like values embedded, `created_at` as
//! the commit time when the content has none.
//!
//! The event id (`id` in the value, header `event_id`) is the content's
//! `id` when it has one (a positive integer: order-api draws it from the
//! outbox table's identity sequence, so rows and messages share one id
//! space), else the message's LSN (the end of its WAL record) as a decimal
//! number: stable across replays, unique among messages.
//!
//! What is refused, never stopping the relay:
//! - content that is not such an object goes, as it is, to the dead-letter
//!   topic `<topic>.relay-dlq` with the reason in `dlq_reason`, through the
//!   same path as every record, so the slot moves past it only once Kafka
//!   has it (`relay_dead_lettered_total`, `relay_messages_refused_total
//!   {reason="malformed"}`);
//! - a non-transactional message (`pg_logical_emit_message(false, …)`) is
//!   written to the WAL even when its transaction rolls back: logged,
//!   counted (`{reason="non_transactional"}`) and skipped, unless
//!   `--allow-non-transactional-messages` makes it a transaction of its own.

use std::collections::BTreeMap;

use outbox_record::header;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::dead_letter;
use crate::event::{record_from_row, EventConfig, OutboxRecord, TopicRouting, TxnInfo};
use crate::pgoutput::{
    text_to_cell, type_oid, Cell, JsonRow, LogicalDecodingMessage, Relation, RelationColumn,
};

/// How events written as logical decoding messages are read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageConfig {
    /// The prefix of event messages; others are not events.
    pub prefix: String,
    /// Produce non-transactional messages (each its own transaction)
    /// instead of refusing them.
    pub allow_non_transactional: bool,
}

impl Default for MessageConfig {
    fn default() -> Self {
        MessageConfig {
            prefix: DEFAULT_PREFIX.to_owned(),
            allow_non_transactional: false,
        }
    }
}

/// The default prefix of event messages.
pub const DEFAULT_PREFIX: &str = "outbox";

/// The `reason` label values of `relay_messages_refused_total`.
pub const REFUSED_MALFORMED: &str = "malformed";
pub const REFUSED_NON_TRANSACTIONAL: &str = "non_transactional";

/// The outbox table's columns, in its order, after `id`.
const ROW_ORDER: [&str; 6] = [
    "aggregate_type",
    "aggregate_id",
    "user_id",
    "event_type",
    "payload",
    "created_at",
];

/// Why a message's content is not an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub String);

/// True when `message` is an event for this relay (by its prefix).
pub fn is_event(cfg: &EventConfig, message: &LogicalDecodingMessage) -> bool {
    message.prefix == cfg.messages.prefix
}

/// The record of event message `message`, row `seq` of transaction `txn`.
pub fn build_record(
    cfg: &EventConfig,
    message: &LogicalDecodingMessage,
    txn: &TxnInfo,
    seq: u64,
) -> Result<OutboxRecord, Malformed> {
    let (rel, row) = parse(cfg, message, txn)?;
    Ok(record_from_row(cfg, &rel, &row, txn, seq))
}

/// The dead letter of a malformed event message: its content as it is, in
/// the dead-letter topic of the outbox's (fallback) topic, with the relay's
/// headers (so it is placed and deduplicated like any record), the reason
/// and the prefix.
pub fn dead_letter(
    cfg: &EventConfig,
    message: &LogicalDecodingMessage,
    txn: &TxnInfo,
    seq: u64,
    why: &Malformed,
) -> OutboxRecord {
    // What can still be read of a broken event, for its key and headers.
    let fields: BTreeMap<String, Value> = serde_json::from_slice(&message.content)
        .ok()
        .unwrap_or_default();
    let text = |name: &str| match fields.get(name) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(other) => Some(other.to_string()),
    };
    let topic = match &cfg.routing {
        TopicRouting::Fixed(t) => t,
        TopicRouting::ByColumn { fallback, .. } => fallback,
    };
    let mut headers = header::relay_headers(
        Some(lsn_event_id(message)),
        text("event_type"),
        (txn.commit_lsn, seq),
        txn.xid,
        txn.commit_ts.to_rfc3339_micros(),
    );
    headers.push((header::dlq::REASON, why.0.clone()));
    headers.push((header::dlq::ERROR_CLASS, "malformed_message".to_owned()));
    headers.push((header::dlq::ORIGINAL_TOPIC, topic.clone()));
    headers.push((PREFIX_HEADER, message.prefix.clone()));
    OutboxRecord {
        topic: dead_letter::topic_of(topic),
        partition: None,
        key: text(&cfg.key_column),
        value: message.content.to_vec(),
        headers,
        column_headers: Box::new([]),
    }
}

/// The header naming a dead-lettered message's prefix.
pub const PREFIX_HEADER: &str = "message_prefix";

/// The event id of a message without an `id`: its LSN as a number.
fn lsn_event_id(message: &LogicalDecodingMessage) -> String {
    message.lsn.0.to_string()
}

/// The row a message's content describes, and a relation giving its
/// columns the types their JSON values have (for `connect-json`).
fn parse(
    cfg: &EventConfig,
    message: &LogicalDecodingMessage,
    txn: &TxnInfo,
) -> Result<(Relation, JsonRow), Malformed> {
    let text = std::str::from_utf8(&message.content)
        .map_err(|_| Malformed("the content is not UTF-8".into()))?;
    let mut fields: BTreeMap<String, &RawValue> = serde_json::from_str(text)
        .map_err(|e| Malformed(format!("the content is not a JSON object: {e}")))?;
    let mut required = vec![
        "aggregate_type",
        "aggregate_id",
        "event_type",
        "payload",
        cfg.key_column.as_str(),
    ];
    if let TopicRouting::ByColumn { column, .. } = &cfg.routing {
        required.push(column);
    }
    for name in required {
        match fields.get(name) {
            None => return Err(Malformed(format!("the content has no {name:?}"))),
            Some(raw) if raw.get() == "null" => {
                return Err(Malformed(format!("the content's {name:?} is null")))
            }
            Some(_) => {}
        }
    }
    let id = match fields.remove("id") {
        None => lsn_event_id(message),
        Some(raw) => match raw.get().parse::<i64>() {
            Ok(id) if id > 0 => id.to_string(),
            _ => {
                return Err(Malformed(format!(
                    "the content's \"id\" is {}, not a positive integer",
                    raw.get()
                )))
            }
        },
    };
    let created_at = match fields.remove("created_at") {
        None => txn.commit_ts.to_rfc3339_micros(),
        Some(raw) => timestamp(raw).ok_or_else(|| {
            Malformed(format!(
                "the content's \"created_at\" is {}, not an RFC 3339 timestamp",
                raw.get()
            ))
        })?,
    };

    let mut columns = Vec::with_capacity(fields.len() + 2);
    let mut cells = Vec::with_capacity(fields.len() + 2);
    let mut push = |name: &str, type_oid: u32, cell: Cell| {
        columns.push(RelationColumn {
            flags: u8::from(name == "id"),
            name: name.to_owned(),
            type_oid,
            type_modifier: -1,
        });
        cells.push((name.to_owned(), cell));
    };
    push(
        "id",
        type_oid::INT8,
        Cell::Value(Value::from(id.parse::<u64>().unwrap_or_default())),
    );
    for name in ROW_ORDER {
        if name == "created_at" {
            push(
                name,
                type_oid::TIMESTAMPTZ,
                Cell::Value(Value::String(created_at.clone())),
            );
        } else if let Some(raw) = fields.remove(name) {
            let (oid, cell) = typed(raw);
            push(name, oid, cell);
        }
    }
    for (name, raw) in fields {
        let (oid, cell) = typed(raw);
        push(&name, oid, cell);
    }
    let rel = Relation {
        oid: 0,
        namespace: cfg.schema.clone(),
        // Without a table (`--table ''`), the name the connect-json schema
        // of an `outbox` table has.
        name: if cfg.table.is_empty() {
            DEFAULT_PREFIX.to_owned()
        } else {
            cfg.table.clone()
        },
        replica_identity: b'd',
        columns,
    };
    Ok((rel, JsonRow::from_columns(cells)))
}

/// A JSON value as a column: its type and the cell a row of that type
/// would hold (objects and arrays as `jsonb` documents, compacted alike).
fn typed(raw: &RawValue) -> (u32, Cell) {
    let value: Value = serde_json::from_str(raw.get()).unwrap_or(Value::Null);
    match value {
        Value::Object(_) | Value::Array(_) => {
            (type_oid::JSONB, text_to_cell(type_oid::JSONB, raw.get()))
        }
        Value::Number(n) if n.is_i64() => (type_oid::INT8, Cell::Value(Value::Number(n))),
        Value::Number(n) => (type_oid::FLOAT8, Cell::Value(Value::Number(n))),
        Value::Bool(b) => (type_oid::BOOL, Cell::Value(Value::Bool(b))),
        other => (type_oid::TEXT, Cell::Value(other)),
    }
}

/// An RFC 3339 timestamp (`T` or a space between date and time, as
/// Postgres' `to_json(now())` and its text output write them), as the
/// relay writes a `timestamptz` column: UTC with microseconds.
fn timestamp(raw: &RawValue) -> Option<String> {
    let Ok(Value::String(s)) = serde_json::from_str::<Value>(raw.get()) else {
        return None;
    };
    let s = s.trim();
    let normalized = match s.as_bytes().get(10) {
        Some(b' ') => format!("{}T{}", &s[..10], &s[11..]),
        _ => s.to_owned(),
    };
    // Postgres writes `+00` for a whole-hour offset; RFC 3339 wants `+00:00`.
    let with_minutes = match normalized
        .len()
        .checked_sub(3)
        .map(|i| normalized.split_at(i))
    {
        Some((head, tail))
            if (tail.starts_with('+') || tail.starts_with('-'))
                && tail[1..].bytes().all(|b| b.is_ascii_digit()) =>
        {
            format!("{head}{tail}:00")
        }
        _ => normalized,
    };
    let t = chrono::DateTime::parse_from_rfc3339(&with_minutes).ok()?;
    Some(header::format_commit_ts(t.with_timezone(&chrono::Utc)))
}

#[cfg(test)]
mod tests;
