//! pgoutput decoder: turns the payload of one `XLogData` replication message
//! into a typed [`LogicalMessage`], keeps the [`RelationCache`] that gives
//! row tuples their column names and types, and maps row values to JSON.
//!
//! What this module owns:
//! - the wire format of pgoutput **protocol version 1** ([`decode`]);
//! - the relation (table schema) cache, replaced whenever Postgres sends a
//!   new `Relation` message, e.g. after `ALTER TABLE ... ADD COLUMN`;
//! - the text-value → JSON mapping ([`text_to_json`], [`row_to_json`]).
//!
//! What it guarantees:
//! - [`decode`] never panics, whatever the bytes: every read is bounds
//!   checked, no allocation is sized by a length field beyond the bytes that
//!   are actually there, and a message must be consumed exactly (truncation
//!   and trailing bytes are both errors). It is fuzzed (`relay/fuzz`).
//! - Messages of protocol versions 2–4 (streaming, two-phase commit) are
//!   rejected with [`DecodeError::Unsupported`]: the relay requests
//!   `proto_version '1'`, so seeing one means the slot was set up wrongly.
//! - Text values must be UTF-8 (the relay's databases are `UTF8`).
//!
//! How one transaction arrives (protocol v1, no streaming):
//!
//! ```text
//!  replication (XLogData payload, &[u8])
//!        │
//!        ▼
//!    decode() ──▶ LogicalMessage
//!
//!  Begin ─▶ Origin? ─▶ ( Relation | Type | Insert | Update | Delete | Truncate | Message )* ─▶ Commit
//!                          │                  │
//!                          ▼                  ▼
//!                   RelationCache::apply   RelationCache::get(relation_oid)
//!                                             │
//!                                             ▼
//!                                row_to_json(rel, tuple) ──▶ JsonRow (column order)
//! ```
//!
//! A `Relation` message precedes the first change to a table in each
//! replication session and is sent again whenever the table's schema
//! changed, so it can appear between two inserts of one transaction. A
//! non-transactional logical decoding `Message` may also arrive outside any
//! Begin/Commit pair.

mod decode;
mod value;

use std::collections::HashMap;
use std::fmt;

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};

use crate::lsn::Lsn;

pub use decode::{decode, DecodeError};
pub use value::{row_to_json, text_to_cell, text_to_json, type_oid, Cell, JsonRow, RowError};

/// One decoded pgoutput (protocol v1) message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogicalMessage {
    Begin(Begin),
    Commit(Commit),
    Origin(Origin),
    Relation(Relation),
    Type(TypeMessage),
    Insert(Insert),
    Update(Update),
    Delete(Delete),
    Truncate(Truncate),
    Message(LogicalDecodingMessage),
}

impl LogicalMessage {
    /// The message's name as the Postgres documentation spells it
    /// ("Begin", "Insert", ...), for logs and error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            LogicalMessage::Begin(_) => "Begin",
            LogicalMessage::Commit(_) => "Commit",
            LogicalMessage::Origin(_) => "Origin",
            LogicalMessage::Relation(_) => "Relation",
            LogicalMessage::Type(_) => "Type",
            LogicalMessage::Insert(_) => "Insert",
            LogicalMessage::Update(_) => "Update",
            LogicalMessage::Delete(_) => "Delete",
            LogicalMessage::Truncate(_) => "Truncate",
            LogicalMessage::Message(_) => "Message",
        }
    }
}

/// `B`: start of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Begin {
    /// LSN of the transaction's commit record.
    pub final_lsn: Lsn,
    pub commit_ts: PgTimestamp,
    pub xid: u32,
}

/// `C`: end of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    /// Currently always 0.
    pub flags: u8,
    pub commit_lsn: Lsn,
    /// End of the commit record: the position to confirm once everything up
    /// to here is durably delivered.
    pub end_lsn: Lsn,
    pub commit_ts: PgTimestamp,
}

/// `O`: the transaction was replicated from another node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub commit_lsn: Lsn,
    pub name: String,
}

/// `R`: the schema of a table, as needed to read its tuples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    /// Schema name; empty for `pg_catalog`.
    pub namespace: String,
    pub name: String,
    /// `relreplident` as its ASCII byte: `d` default, `n` nothing, `f` full,
    /// `i` index.
    pub replica_identity: u8,
    /// Columns in attribute order (generated columns are not sent).
    pub columns: Vec<RelationColumn>,
}

impl Relation {
    /// `namespace.name`, with the empty namespace shown as `pg_catalog`.
    pub fn qualified_name(&self) -> String {
        let namespace = if self.namespace.is_empty() {
            "pg_catalog"
        } else {
            &self.namespace
        };
        format!("{namespace}.{}", self.name)
    }
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Bit 1: the column is part of the replica identity key.
    pub flags: u8,
    pub name: String,
    /// `pg_type` oid; see [`type_oid`] for the ones the JSON mapping knows.
    pub type_oid: u32,
    /// `atttypmod`, -1 when the type has none.
    pub type_modifier: i32,
}

impl RelationColumn {
    /// Whether the column belongs to the replica identity key.
    pub fn is_key(&self) -> bool {
        self.flags & 1 != 0
    }
}

/// `Y`: a non-builtin data type used by a following `Relation`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeMessage {
    pub oid: u32,
    /// Schema name; empty for `pg_catalog`.
    pub namespace: String,
    pub name: String,
}

/// `I`: a row was inserted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    pub relation_oid: u32,
    pub new: TupleData,
}

/// `U`: a row was updated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    pub relation_oid: u32,
    /// `K`: the old key, sent when the update changed it.
    pub key: Option<TupleData>,
    /// `O`: the whole old row, sent for `REPLICA IDENTITY FULL`.
    pub old: Option<TupleData>,
    pub new: TupleData,
}

/// `D`: a row was deleted. Exactly one of `key` and `old` is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    pub relation_oid: u32,
    /// `K`: the deleted row's key.
    pub key: Option<TupleData>,
    /// `O`: the whole deleted row, for `REPLICA IDENTITY FULL`.
    pub old: Option<TupleData>,
}

/// `T`: one or more tables were truncated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    /// Bit 1: `CASCADE`; bit 2: `RESTART IDENTITY`.
    pub options: u8,
    pub relation_oids: Vec<u32>,
}

impl Truncate {
    pub fn cascade(&self) -> bool {
        self.options & 1 != 0
    }

    pub fn restart_identity(&self) -> bool {
        self.options & 2 != 0
    }
}

/// `M`: a message written with `pg_logical_emit_message`.
#[derive(Clone, PartialEq, Eq)]
pub struct LogicalDecodingMessage {
    /// Written inside the transaction (flags bit 1) rather than immediately.
    pub transactional: bool,
    pub lsn: Lsn,
    pub prefix: String,
    /// Arbitrary bytes, not necessarily text.
    pub content: Bytes,
}

/// `Debug` shows the content's length only: it may be application data.
impl fmt::Debug for LogicalDecodingMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogicalDecodingMessage")
            .field("transactional", &self.transactional)
            .field("lsn", &self.lsn)
            .field("prefix", &self.prefix)
            .field("content_len", &self.content.len())
            .finish()
    }
}

/// The column values of one row, in the relation's column order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TupleData(pub Vec<TupleValue>);

impl TupleData {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, TupleValue> {
        self.0.iter()
    }
}

/// One column value of a [`TupleData`].
#[derive(Clone, PartialEq, Eq)]
pub enum TupleValue {
    /// `n`: SQL NULL.
    Null,
    /// `u`: a TOASTed value that the change did not touch; its content is
    /// not sent (only possible in updates and old tuples).
    UnchangedToast,
    /// `t`: the value in the type's text output format.
    Text(String),
    /// `b`: the value in the type's binary format (only with `binary 'true'`,
    /// which the relay never requests).
    Binary(Vec<u8>),
}

/// `Debug` shows lengths, never the values: rows must not end up in logs.
impl fmt::Debug for TupleValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TupleValue::Null => f.write_str("Null"),
            TupleValue::UnchangedToast => f.write_str("UnchangedToast"),
            TupleValue::Text(text) => write!(f, "Text({} bytes)", text.len()),
            TupleValue::Binary(bytes) => write!(f, "Binary({} bytes)", bytes.len()),
        }
    }
}

/// A Postgres `TimestampTz` as sent on the wire: microseconds since
/// 2000-01-01 00:00:00 UTC. `i64::MAX` / `i64::MIN` are Postgres'
/// `infinity` / `-infinity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PgTimestamp(pub i64);

impl PgTimestamp {
    /// Microseconds from the Unix epoch to the Postgres epoch (2000-01-01).
    const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

    /// The instant `micros` microseconds after the Unix epoch.
    pub fn from_unix_micros(micros: i64) -> PgTimestamp {
        PgTimestamp(micros.saturating_sub(Self::PG_EPOCH_UNIX_MICROS))
    }

    /// Microseconds since the Unix epoch. The infinities stay at
    /// `i64::MAX` / `i64::MIN`; finite values that would overflow saturate.
    pub fn unix_micros(&self) -> i64 {
        match self.0 {
            i64::MIN | i64::MAX => self.0,
            micros => micros.saturating_add(Self::PG_EPOCH_UNIX_MICROS),
        }
    }

    /// The instant as a chrono UTC time; `None` for the infinities and for
    /// the few Postgres years (past 262143) chrono cannot represent.
    pub fn to_chrono(&self) -> Option<DateTime<Utc>> {
        match self.0 {
            i64::MIN | i64::MAX => None,
            _ => DateTime::<Utc>::from_timestamp_micros(self.unix_micros()),
        }
    }

    /// RFC 3339 in UTC with exactly six fractional digits and a `Z`, e.g.
    /// `2026-11-21T10:00:00.123456Z`. Instants chrono cannot represent are
    /// written as Postgres does for the infinities: `infinity` /
    /// `-infinity`.
    pub fn to_rfc3339_micros(&self) -> String {
        match self.to_chrono() {
            Some(at) => at.to_rfc3339_opts(SecondsFormat::Micros, true),
            None if self.0 < 0 => "-infinity".to_owned(),
            None => "infinity".to_owned(),
        }
    }
}

impl fmt::Display for PgTimestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339_micros())
    }
}

/// The schemas of the relations seen in this replication session, keyed by
/// relation oid.
///
/// Postgres sends a `Relation` message before the first change to a table
/// in a session and again after its schema changed; feed every one to
/// [`RelationCache::apply`] before decoding the changes that follow it.
/// The cache does not outlive the replication connection: a new session
/// resends the relations it needs.
#[derive(Debug, Clone, Default)]
pub struct RelationCache {
    relations: HashMap<u32, Relation>,
}

impl RelationCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores `rel`, replacing any earlier schema of the same oid (which is
    /// returned), so the following tuples are read with the new columns.
    pub fn apply(&mut self, rel: Relation) -> Option<Relation> {
        self.relations.insert(rel.oid, rel)
    }

    pub fn get(&self, oid: u32) -> Option<&Relation> {
        self.relations.get(&oid)
    }

    pub fn len(&self) -> usize {
        self.relations.len()
    }

    pub fn is_empty(&self) -> bool {
        self.relations.is_empty()
    }
}

/// A little builder for hand-made pgoutput messages, shared by the tests of
/// the submodules.
#[cfg(test)]
pub(crate) mod wire {
    /// Appends big-endian fields to a message, starting with its tag.
    #[derive(Debug, Clone)]
    pub(crate) struct Msg(Vec<u8>);

    impl Msg {
        pub(crate) fn new(tag: u8) -> Self {
            Msg(vec![tag])
        }

        pub(crate) fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }

        pub(crate) fn u16(mut self, v: u16) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }

        pub(crate) fn u32(mut self, v: u32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }

        pub(crate) fn i32(mut self, v: i32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }

        pub(crate) fn u64(mut self, v: u64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }

        pub(crate) fn i64(mut self, v: i64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }

        pub(crate) fn raw(mut self, bytes: &[u8]) -> Self {
            self.0.extend_from_slice(bytes);
            self
        }

        /// A NUL-terminated string.
        pub(crate) fn cstr(self, s: &str) -> Self {
            self.raw(s.as_bytes()).u8(0)
        }

        /// A TupleData: column count, then each column.
        pub(crate) fn tuple(self, cols: &[Col<'_>]) -> Self {
            let count = u16::try_from(cols.len()).expect("test tuples are small");
            cols.iter().fold(self.u16(count), |msg, col| match col {
                Col::Null => msg.u8(b'n'),
                Col::Toast => msg.u8(b'u'),
                Col::Text(text) => msg.u8(b't').len_bytes(text.as_bytes()),
                Col::Binary(bytes) => msg.u8(b'b').len_bytes(bytes),
            })
        }

        /// An Int32 length followed by the bytes.
        pub(crate) fn len_bytes(self, bytes: &[u8]) -> Self {
            let len = i32::try_from(bytes.len()).expect("test values are small");
            self.i32(len).raw(bytes)
        }

        pub(crate) fn build(self) -> Vec<u8> {
            self.0
        }
    }

    /// A column value for [`Msg::tuple`].
    #[derive(Debug, Clone, Copy)]
    pub(crate) enum Col<'a> {
        Null,
        Toast,
        Text(&'a str),
        Binary(&'a [u8]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relation(oid: u32, columns: &[(&str, u32)]) -> Relation {
        Relation {
            oid,
            namespace: "public".to_owned(),
            name: "outbox".to_owned(),
            replica_identity: b'd',
            columns: columns
                .iter()
                .map(|&(name, type_oid)| RelationColumn {
                    flags: 0,
                    name: name.to_owned(),
                    type_oid,
                    type_modifier: -1,
                })
                .collect(),
        }
    }

    #[test]
    fn relation_cache_replaces_schema_on_new_relation() {
        let mut cache = RelationCache::new();
        assert!(cache.is_empty());
        assert!(cache.apply(relation(16384, &[("id", 20)])).is_none());
        assert!(cache.apply(relation(16385, &[("x", 25)])).is_none());

        let previous = cache.apply(relation(16384, &[("id", 20), ("payload", 3802)]));
        assert_eq!(previous.map(|r| r.columns.len()), Some(1));
        assert_eq!(cache.len(), 2);
        let names: Vec<&str> = cache
            .get(16384)
            .map(|r| r.columns.iter().map(|c| c.name.as_str()).collect())
            .unwrap_or_default();
        assert_eq!(names, ["id", "payload"]);
        assert_eq!(cache.get(16385).map(|r| r.columns.len()), Some(1));
        assert!(cache.get(1).is_none());
    }

    #[test]
    fn relation_cache_feeds_row_mapping_after_alter_table() {
        use wire::{Col, Msg};

        let mut cache = RelationCache::new();
        let before = Msg::new(b'R')
            .u32(16384)
            .cstr("public")
            .cstr("outbox")
            .u8(b'd')
            .u16(1)
            .u8(1)
            .cstr("id")
            .u32(20)
            .i32(-1)
            .build();
        let after = Msg::new(b'R')
            .u32(16384)
            .cstr("public")
            .cstr("outbox")
            .u8(b'd')
            .u16(2)
            .u8(1)
            .cstr("id")
            .u32(20)
            .i32(-1)
            .u8(0)
            .cstr("note")
            .u32(25)
            .i32(-1)
            .build();
        let insert = |cols: &[Col<'_>]| Msg::new(b'I').u32(16384).u8(b'N').tuple(cols).build();

        let mut rows = Vec::new();
        for buf in [
            before,
            insert(&[Col::Text("1")]),
            after,
            insert(&[Col::Text("2"), Col::Text("hi")]),
        ] {
            match decode(&buf) {
                Ok(LogicalMessage::Relation(rel)) => {
                    cache.apply(rel);
                }
                Ok(LogicalMessage::Insert(ins)) => {
                    let rel = cache.get(ins.relation_oid).expect("relation was sent");
                    rows.push(row_to_json(rel, &ins.new).map(|row| row.to_json_string()));
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(
            rows,
            [
                Ok(r#"{"id":1}"#.to_owned()),
                Ok(r#"{"id":2,"note":"hi"}"#.to_owned())
            ]
        );
    }

    #[test]
    fn qualified_name_shows_pg_catalog_for_empty_namespace() {
        let mut rel = relation(1, &[]);
        assert_eq!(rel.qualified_name(), "public.outbox");
        rel.namespace.clear();
        assert_eq!(rel.qualified_name(), "pg_catalog.outbox");
    }

    #[test]
    fn pg_timestamp_converts_from_the_2000_epoch() {
        let zero = PgTimestamp(0);
        assert_eq!(zero.unix_micros(), 946_684_800_000_000);
        assert_eq!(zero.to_rfc3339_micros(), "2000-01-01T00:00:00.000000Z");

        // 2026-11-21T10:00:00.123456Z
        let unix = 1_795_255_200_123_456;
        let ts = PgTimestamp(unix - 946_684_800_000_000);
        assert_eq!(ts.unix_micros(), unix);
        assert_eq!(ts.to_rfc3339_micros(), "2026-11-21T10:00:00.123456Z");
        assert_eq!(ts.to_string(), "2026-11-21T10:00:00.123456Z");
        assert_eq!(ts.to_chrono().map(|t| t.timestamp_micros()), Some(unix));

        assert_eq!(
            PgTimestamp(-1).to_rfc3339_micros(),
            "1999-12-31T23:59:59.999999Z"
        );
    }

    #[test]
    fn pg_timestamp_infinities_and_extremes_do_not_panic() {
        assert_eq!(PgTimestamp(i64::MAX).to_rfc3339_micros(), "infinity");
        assert_eq!(PgTimestamp(i64::MIN).to_rfc3339_micros(), "-infinity");
        assert_eq!(PgTimestamp(i64::MAX).unix_micros(), i64::MAX);
        assert_eq!(PgTimestamp(i64::MIN).unix_micros(), i64::MIN);
        assert_eq!(PgTimestamp(i64::MAX - 1).unix_micros(), i64::MAX);
        assert!(PgTimestamp(i64::MAX).to_chrono().is_none());
        assert_eq!(PgTimestamp(i64::MAX - 1).to_rfc3339_micros(), "infinity");
        assert_eq!(PgTimestamp(i64::MIN + 1).to_rfc3339_micros(), "-infinity");
    }

    #[test]
    fn debug_output_hides_row_values() {
        let tuple = TupleData(vec![
            TupleValue::Text("secret@example.com".to_owned()),
            TupleValue::Binary(vec![1, 2]),
            TupleValue::Null,
            TupleValue::UnchangedToast,
        ]);
        let debug = format!("{tuple:?}");
        assert!(!debug.contains("secret"), "{debug}");
        assert!(debug.contains("Text(18 bytes)"), "{debug}");

        let msg = LogicalDecodingMessage {
            transactional: true,
            lsn: Lsn(1),
            prefix: "p".to_owned(),
            content: Bytes::from_static(b"hidden"),
        };
        assert!(!format!("{msg:?}").contains("hidden"));
    }
}
