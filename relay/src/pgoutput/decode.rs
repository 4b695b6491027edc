//! The byte-level decoder for pgoutput protocol v1 messages.
//!
//! All integers are big-endian; strings are NUL-terminated. Every read goes
//! through [`Reader`], which checks bounds and reports what it was reading
//! when the bytes ran out, so [`decode`] returns an error, never panics.

use bytes::Bytes;

use super::{
    Begin, Commit, Delete, Insert, LogicalDecodingMessage, LogicalMessage, Origin, PgTimestamp,
    Relation, RelationColumn, Truncate, TupleData, TupleValue, TypeMessage, Update,
};
use crate::lsn::Lsn;

/// Why a buffer is not a valid pgoutput v1 message.
///
/// `what` fields name the field being read, e.g. `"Relation.columns.name"`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty pgoutput message")]
    Empty,
    #[error("unknown pgoutput message tag {}", tag_text(*.0))]
    UnknownTag(u8),
    /// A message of protocol version 2 or later (streaming, two-phase).
    #[error(
        "pgoutput message '{tag}' ({name}) belongs to protocol version 2+, \
         the relay requests proto_version 1"
    )]
    Unsupported { tag: char, name: &'static str },
    #[error("pgoutput message truncated while reading {what}")]
    Truncated { what: &'static str },
    #[error("pgoutput string {what} lacks its NUL terminator")]
    UnterminatedString { what: &'static str },
    #[error("pgoutput {what} is not valid UTF-8")]
    InvalidUtf8 {
        what: &'static str,
        #[source]
        source: std::str::Utf8Error,
    },
    #[error("pgoutput {what} has negative length {len}")]
    NegativeLength { what: &'static str, len: i32 },
    #[error("pgoutput {what}: expected {expected}, found {}", tag_text(*.found))]
    UnexpectedByte {
        what: &'static str,
        expected: &'static str,
        found: u8,
    },
    #[error("{count} trailing byte(s) after a complete pgoutput {message} message")]
    TrailingBytes { message: &'static str, count: usize },
}

/// A tag byte as `'X'` when printable, else as hex.
fn tag_text(byte: u8) -> String {
    if byte.is_ascii_graphic() {
        format!("'{}'", char::from(byte))
    } else {
        format!("0x{byte:02x}")
    }
}

/// The name of a protocol v2+ message tag, if `tag` is one.
fn later_protocol_message(tag: u8) -> Option<&'static str> {
    Some(match tag {
        b'S' => "Stream Start",
        b'E' => "Stream Stop",
        b'c' => "Stream Commit",
        b'A' => "Stream Abort",
        b'b' => "Begin Prepare",
        b'P' => "Prepare",
        b'K' => "Commit Prepared",
        b'r' => "Rollback Prepared",
        b'p' => "Stream Prepare",
        _ => return None,
    })
}

/// Decodes one pgoutput protocol v1 message: the whole payload of an
/// `XLogData` message, tag byte included.
///
/// The buffer must hold exactly one message; extra bytes are an error.
/// Never panics.
pub fn decode(buf: &[u8]) -> Result<LogicalMessage, DecodeError> {
    let (&tag, body) = buf.split_first().ok_or(DecodeError::Empty)?;
    let mut r = Reader { rest: body };
    let msg = match tag {
        b'B' => LogicalMessage::Begin(Begin {
            final_lsn: r.lsn("Begin.final_lsn")?,
            commit_ts: PgTimestamp(r.i64("Begin.commit_ts")?),
            xid: r.u32("Begin.xid")?,
        }),
        b'C' => LogicalMessage::Commit(Commit {
            flags: r.u8("Commit.flags")?,
            commit_lsn: r.lsn("Commit.commit_lsn")?,
            end_lsn: r.lsn("Commit.end_lsn")?,
            commit_ts: PgTimestamp(r.i64("Commit.commit_ts")?),
        }),
        b'O' => LogicalMessage::Origin(Origin {
            commit_lsn: r.lsn("Origin.commit_lsn")?,
            name: r.string("Origin.name")?,
        }),
        b'R' => LogicalMessage::Relation(relation(&mut r)?),
        b'Y' => LogicalMessage::Type(TypeMessage {
            oid: r.u32("Type.oid")?,
            namespace: r.string("Type.namespace")?,
            name: r.string("Type.name")?,
        }),
        b'I' => {
            let relation_oid = r.u32("Insert.relation_oid")?;
            r.expect(b'N', "Insert", "'N'")?;
            LogicalMessage::Insert(Insert {
                relation_oid,
                new: tuple_data(&mut r)?,
            })
        }
        b'U' => LogicalMessage::Update(update(&mut r)?),
        b'D' => LogicalMessage::Delete(delete(&mut r)?),
        b'T' => LogicalMessage::Truncate(truncate(&mut r)?),
        b'M' => LogicalMessage::Message(LogicalDecodingMessage {
            transactional: r.u8("Message.flags")? & 1 != 0,
            lsn: r.lsn("Message.lsn")?,
            prefix: r.string("Message.prefix")?,
            content: Bytes::copy_from_slice(r.len_prefixed("Message.content")?),
        }),
        other => {
            return Err(match later_protocol_message(other) {
                Some(name) => DecodeError::Unsupported {
                    tag: char::from(other),
                    name,
                },
                None => DecodeError::UnknownTag(other),
            })
        }
    };
    r.finish(msg.kind())?;
    Ok(msg)
}

fn relation(r: &mut Reader<'_>) -> Result<Relation, DecodeError> {
    let oid = r.u32("Relation.oid")?;
    let namespace = r.string("Relation.namespace")?;
    let name = r.string("Relation.name")?;
    let replica_identity = r.u8("Relation.replica_identity")?;
    let count = r.u16("Relation.column_count")?;
    // A column takes at least 10 bytes (flags, "\0", type oid, typmod).
    let mut columns = Vec::with_capacity(usize::from(count).min(r.remaining() / 10));
    for _ in 0..count {
        columns.push(RelationColumn {
            flags: r.u8("Relation.columns.flags")?,
            name: r.string("Relation.columns.name")?,
            type_oid: r.u32("Relation.columns.type_oid")?,
            type_modifier: r.i32("Relation.columns.type_modifier")?,
        });
    }
    Ok(Relation {
        oid,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

fn update(r: &mut Reader<'_>) -> Result<Update, DecodeError> {
    let relation_oid = r.u32("Update.relation_oid")?;
    let (mut key, mut old) = (None, None);
    match r.u8("Update.tuple_kind")? {
        b'K' => key = Some(tuple_data(r)?),
        b'O' => old = Some(tuple_data(r)?),
        b'N' => {
            return Ok(Update {
                relation_oid,
                key,
                old,
                new: tuple_data(r)?,
            })
        }
        found => {
            return Err(DecodeError::UnexpectedByte {
                what: "Update tuple kind",
                expected: "'K', 'O' or 'N'",
                found,
            })
        }
    }
    r.expect(b'N', "Update new tuple kind", "'N'")?;
    Ok(Update {
        relation_oid,
        key,
        old,
        new: tuple_data(r)?,
    })
}

fn delete(r: &mut Reader<'_>) -> Result<Delete, DecodeError> {
    let relation_oid = r.u32("Delete.relation_oid")?;
    match r.u8("Delete.tuple_kind")? {
        b'K' => Ok(Delete {
            relation_oid,
            key: Some(tuple_data(r)?),
            old: None,
        }),
        b'O' => Ok(Delete {
            relation_oid,
            key: None,
            old: Some(tuple_data(r)?),
        }),
        found => Err(DecodeError::UnexpectedByte {
            what: "Delete tuple kind",
            expected: "'K' or 'O'",
            found,
        }),
    }
}

fn truncate(r: &mut Reader<'_>) -> Result<Truncate, DecodeError> {
    let what = "Truncate.relation_count";
    let count = r.i32(what)?;
    let count =
        usize::try_from(count).map_err(|_| DecodeError::NegativeLength { what, len: count })?;
    let options = r.u8("Truncate.options")?;
    let mut relation_oids = Vec::with_capacity(count.min(r.remaining() / 4));
    for _ in 0..count {
        relation_oids.push(r.u32("Truncate.relation_oids")?);
    }
    Ok(Truncate {
        options,
        relation_oids,
    })
}

fn tuple_data(r: &mut Reader<'_>) -> Result<TupleData, DecodeError> {
    let count = r.u16("TupleData.column_count")?;
    // Every column takes at least its kind byte.
    let mut values = Vec::with_capacity(usize::from(count).min(r.remaining()));
    for _ in 0..count {
        let value = match r.u8("TupleData.column_kind")? {
            b'n' => TupleValue::Null,
            b'u' => TupleValue::UnchangedToast,
            b't' => {
                let what = "TupleData text value";
                TupleValue::Text(utf8(r.len_prefixed(what)?, what)?)
            }
            b'b' => TupleValue::Binary(r.len_prefixed("TupleData binary value")?.to_vec()),
            found => {
                return Err(DecodeError::UnexpectedByte {
                    what: "TupleData column kind",
                    expected: "'n', 'u', 't' or 'b'",
                    found,
                })
            }
        };
        values.push(value);
    }
    Ok(TupleData(values))
}

fn utf8(bytes: &[u8], what: &'static str) -> Result<String, DecodeError> {
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|source| DecodeError::InvalidUtf8 { what, source })
}

/// A bounds-checked cursor over the bytes of one message.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.rest.len()
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let (head, tail) = self
            .rest
            .split_at_checked(n)
            .ok_or(DecodeError::Truncated { what })?;
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let (head, tail) = self
            .rest
            .split_first_chunk::<N>()
            .ok_or(DecodeError::Truncated { what })?;
        self.rest = tail;
        Ok(*head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        self.array::<1>(what).map(|[byte]| byte)
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        self.array(what).map(u16::from_be_bytes)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.array(what).map(u32::from_be_bytes)
    }

    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        self.array(what).map(i32::from_be_bytes)
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        self.array(what).map(i64::from_be_bytes)
    }

    fn lsn(&mut self, what: &'static str) -> Result<Lsn, DecodeError> {
        self.array(what).map(|bytes| Lsn(u64::from_be_bytes(bytes)))
    }

    /// A NUL-terminated UTF-8 string.
    fn string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let len = self
            .rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::UnterminatedString { what })?;
        let bytes = self.take(len, what)?;
        self.take(1, what)?; // the NUL found above
        utf8(bytes, what)
    }

    /// An Int32 length followed by that many bytes.
    fn len_prefixed(&mut self, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let len = self.i32(what)?;
        let n = usize::try_from(len).map_err(|_| DecodeError::NegativeLength { what, len })?;
        self.take(n, what)
    }

    /// Consumes one byte that must be `byte`.
    fn expect(
        &mut self,
        byte: u8,
        what: &'static str,
        expected: &'static str,
    ) -> Result<(), DecodeError> {
        match self.u8(what)? {
            found if found == byte => Ok(()),
            found => Err(DecodeError::UnexpectedByte {
                what,
                expected,
                found,
            }),
        }
    }

    /// Succeeds only when the whole message was consumed.
    fn finish(self, message: &'static str) -> Result<(), DecodeError> {
        match self.rest.len() {
            0 => Ok(()),
            count => Err(DecodeError::TrailingBytes { message, count }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::wire::{Col, Msg};
    use super::*;

    const TS: i64 = 848_570_400_123_456; // 2026-11-21T10:00:00.123456Z

    fn begin() -> Vec<u8> {
        Msg::new(b'B')
            .u64(0x16_B374_D848)
            .i64(TS)
            .u32(7_654_321)
            .build()
    }

    fn commit() -> Vec<u8> {
        Msg::new(b'C')
            .u8(0)
            .u64(0x16_B374_D848)
            .u64(0x16_B374_D8A0)
            .i64(TS)
            .build()
    }

    fn origin() -> Vec<u8> {
        Msg::new(b'O').u64(0x1_0000_0002).cstr("node-a").build()
    }

    fn relation_msg() -> Vec<u8> {
        Msg::new(b'R')
            .u32(16384)
            .cstr("public")
            .cstr("outbox")
            .u8(b'd')
            .u16(3)
            .u8(1)
            .cstr("id")
            .u32(20)
            .i32(-1)
            .u8(0)
            .cstr("topic")
            .u32(1043)
            .i32(259)
            .u8(0)
            .cstr("payload")
            .u32(3802)
            .i32(-1)
            .build()
    }

    fn type_msg() -> Vec<u8> {
        Msg::new(b'Y').u32(90210).cstr("").cstr("mood").build()
    }

    fn insert() -> Vec<u8> {
        Msg::new(b'I')
            .u32(16384)
            .u8(b'N')
            .tuple(&[Col::Text("42"), Col::Null, Col::Text("{\"é\":1}")])
            .build()
    }

    fn update_plain() -> Vec<u8> {
        Msg::new(b'U')
            .u32(16384)
            .u8(b'N')
            .tuple(&[Col::Text("1"), Col::Toast])
            .build()
    }

    fn update_key() -> Vec<u8> {
        Msg::new(b'U')
            .u32(16384)
            .u8(b'K')
            .tuple(&[Col::Text("1"), Col::Null])
            .u8(b'N')
            .tuple(&[Col::Text("2"), Col::Text("x")])
            .build()
    }

    fn update_old() -> Vec<u8> {
        Msg::new(b'U')
            .u32(16384)
            .u8(b'O')
            .tuple(&[Col::Text("1"), Col::Text("old")])
            .u8(b'N')
            .tuple(&[Col::Text("1"), Col::Binary(&[0, 1])])
            .build()
    }

    fn delete_key() -> Vec<u8> {
        Msg::new(b'D')
            .u32(16384)
            .u8(b'K')
            .tuple(&[Col::Text("9")])
            .build()
    }

    fn delete_old() -> Vec<u8> {
        Msg::new(b'D')
            .u32(16384)
            .u8(b'O')
            .tuple(&[Col::Text("9"), Col::Text("")])
            .build()
    }

    fn truncate_msg() -> Vec<u8> {
        Msg::new(b'T').i32(2).u8(3).u32(16384).u32(16390).build()
    }

    fn message() -> Vec<u8> {
        Msg::new(b'M')
            .u8(1)
            .u64(0x2_0000_0010)
            .cstr("outbox")
            .len_bytes(&[0xff, 0x00, 0x61])
            .build()
    }

    /// Every valid message the tests build, with its name.
    fn valid_messages() -> Vec<(&'static str, Vec<u8>)> {
        vec![
            ("begin", begin()),
            ("commit", commit()),
            ("origin", origin()),
            ("relation", relation_msg()),
            ("type", type_msg()),
            ("insert", insert()),
            ("update_plain", update_plain()),
            ("update_key", update_key()),
            ("update_old", update_old()),
            ("delete_key", delete_key()),
            ("delete_old", delete_old()),
            ("truncate", truncate_msg()),
            ("message", message()),
        ]
    }

    fn text(s: &str) -> TupleValue {
        TupleValue::Text(s.to_owned())
    }

    #[test]
    fn decodes_begin() {
        assert_eq!(
            decode(&begin()),
            Ok(LogicalMessage::Begin(Begin {
                final_lsn: Lsn(0x16_B374_D848),
                commit_ts: PgTimestamp(TS),
                xid: 7_654_321,
            }))
        );
        let LogicalMessage::Begin(b) = decode(&begin()).expect("valid") else {
            unreachable!()
        };
        assert_eq!(b.final_lsn.to_string(), "16/B374D848");
        assert_eq!(
            b.commit_ts.to_rfc3339_micros(),
            "2026-11-21T10:00:00.123456Z"
        );
    }

    #[test]
    fn decodes_commit() {
        assert_eq!(
            decode(&commit()),
            Ok(LogicalMessage::Commit(Commit {
                flags: 0,
                commit_lsn: Lsn(0x16_B374_D848),
                end_lsn: Lsn(0x16_B374_D8A0),
                commit_ts: PgTimestamp(TS),
            }))
        );
    }

    #[test]
    fn decodes_origin() {
        assert_eq!(
            decode(&origin()),
            Ok(LogicalMessage::Origin(Origin {
                commit_lsn: Lsn(0x1_0000_0002),
                name: "node-a".to_owned(),
            }))
        );
    }

    #[test]
    fn decodes_relation() {
        let column = |flags, name: &str, type_oid, type_modifier| RelationColumn {
            flags,
            name: name.to_owned(),
            type_oid,
            type_modifier,
        };
        let expected = Relation {
            oid: 16384,
            namespace: "public".to_owned(),
            name: "outbox".to_owned(),
            replica_identity: b'd',
            columns: vec![
                column(1, "id", 20, -1),
                column(0, "topic", 1043, 259),
                column(0, "payload", 3802, -1),
            ],
        };
        assert_eq!(
            decode(&relation_msg()),
            Ok(LogicalMessage::Relation(expected))
        );
        let Ok(LogicalMessage::Relation(rel)) = decode(&relation_msg()) else {
            unreachable!()
        };
        let keys: Vec<bool> = rel.columns.iter().map(RelationColumn::is_key).collect();
        assert_eq!(keys, [true, false, false]);
    }

    #[test]
    fn decodes_relation_without_columns() {
        let buf = Msg::new(b'R')
            .u32(1)
            .cstr("")
            .cstr("t")
            .u8(b'n')
            .u16(0)
            .build();
        let Ok(LogicalMessage::Relation(rel)) = decode(&buf) else {
            panic!("{:?}", decode(&buf))
        };
        assert_eq!(
            (
                rel.namespace.as_str(),
                rel.replica_identity,
                rel.columns.len()
            ),
            ("", b'n', 0)
        );
    }

    #[test]
    fn decodes_type() {
        assert_eq!(
            decode(&type_msg()),
            Ok(LogicalMessage::Type(TypeMessage {
                oid: 90210,
                namespace: String::new(),
                name: "mood".to_owned(),
            }))
        );
    }

    #[test]
    fn decodes_insert() {
        assert_eq!(
            decode(&insert()),
            Ok(LogicalMessage::Insert(Insert {
                relation_oid: 16384,
                new: TupleData(vec![text("42"), TupleValue::Null, text("{\"é\":1}")]),
            }))
        );
    }

    #[test]
    fn decodes_every_update_shape() {
        assert_eq!(
            decode(&update_plain()),
            Ok(LogicalMessage::Update(Update {
                relation_oid: 16384,
                key: None,
                old: None,
                new: TupleData(vec![text("1"), TupleValue::UnchangedToast]),
            }))
        );
        assert_eq!(
            decode(&update_key()),
            Ok(LogicalMessage::Update(Update {
                relation_oid: 16384,
                key: Some(TupleData(vec![text("1"), TupleValue::Null])),
                old: None,
                new: TupleData(vec![text("2"), text("x")]),
            }))
        );
        assert_eq!(
            decode(&update_old()),
            Ok(LogicalMessage::Update(Update {
                relation_oid: 16384,
                key: None,
                old: Some(TupleData(vec![text("1"), text("old")])),
                new: TupleData(vec![text("1"), TupleValue::Binary(vec![0, 1])]),
            }))
        );
    }

    #[test]
    fn decodes_delete_with_key_or_old_row() {
        assert_eq!(
            decode(&delete_key()),
            Ok(LogicalMessage::Delete(Delete {
                relation_oid: 16384,
                key: Some(TupleData(vec![text("9")])),
                old: None,
            }))
        );
        assert_eq!(
            decode(&delete_old()),
            Ok(LogicalMessage::Delete(Delete {
                relation_oid: 16384,
                key: None,
                old: Some(TupleData(vec![text("9"), text("")])),
            }))
        );
    }

    #[test]
    fn decodes_truncate() {
        let expected = Truncate {
            options: 3,
            relation_oids: vec![16384, 16390],
        };
        assert!(expected.cascade() && expected.restart_identity());
        assert_eq!(
            decode(&truncate_msg()),
            Ok(LogicalMessage::Truncate(expected))
        );

        let none = Msg::new(b'T').i32(0).u8(0).build();
        assert_eq!(
            decode(&none),
            Ok(LogicalMessage::Truncate(Truncate {
                options: 0,
                relation_oids: vec![],
            }))
        );
    }

    #[test]
    fn decodes_logical_decoding_message() {
        assert_eq!(
            decode(&message()),
            Ok(LogicalMessage::Message(LogicalDecodingMessage {
                transactional: true,
                lsn: Lsn(0x2_0000_0010),
                prefix: "outbox".to_owned(),
                content: Bytes::from_static(&[0xff, 0x00, 0x61]),
            }))
        );
        let non_tx = Msg::new(b'M').u8(0).u64(5).cstr("").len_bytes(b"").build();
        let Ok(LogicalMessage::Message(m)) = decode(&non_tx) else {
            panic!("{:?}", decode(&non_tx))
        };
        assert!(!m.transactional && m.content.is_empty() && m.prefix.is_empty());
    }

    #[test]
    fn kind_names_the_message() {
        let kinds: Vec<&str> = valid_messages()
            .iter()
            .map(|(_, buf)| decode(buf).map(|m| m.kind()).unwrap_or("error"))
            .collect();
        assert_eq!(
            kinds,
            [
                "Begin", "Commit", "Origin", "Relation", "Type", "Insert", "Update", "Update",
                "Update", "Delete", "Delete", "Truncate", "Message"
            ]
        );
    }

    #[test]
    fn every_proper_prefix_of_a_valid_message_is_an_error() {
        for (name, buf) in valid_messages() {
            assert!(decode(&buf).is_ok(), "{name} should decode");
            for len in 0..buf.len() {
                let prefix = buf.get(..len).unwrap_or_default();
                let result = decode(prefix);
                assert!(
                    result.is_err(),
                    "{name} cut to {len} bytes decoded: {result:?}"
                );
            }
        }
        assert_eq!(decode(&[]), Err(DecodeError::Empty));
        assert_eq!(
            decode(b"B"),
            Err(DecodeError::Truncated {
                what: "Begin.final_lsn"
            })
        );
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        for (name, mut buf) in valid_messages() {
            buf.push(0);
            assert_eq!(
                decode(&buf).map_err(|e| matches!(e, DecodeError::TrailingBytes { count: 1, .. })),
                Err(true),
                "{name}"
            );
        }
        let err = decode(&Msg::new(b'B').u64(0).i64(0).u32(0).raw(b"xy").build()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "2 trailing byte(s) after a complete pgoutput Begin message"
        );
    }

    #[test]
    fn protocol_v2_and_later_messages_are_unsupported() {
        let cases = [
            (b'S', "Stream Start"),
            (b'E', "Stream Stop"),
            (b'c', "Stream Commit"),
            (b'A', "Stream Abort"),
            (b'b', "Begin Prepare"),
            (b'P', "Prepare"),
            (b'K', "Commit Prepared"),
            (b'r', "Rollback Prepared"),
            (b'p', "Stream Prepare"),
        ];
        for (tag, name) in cases {
            // The body is irrelevant: the tag alone decides.
            let buf = Msg::new(tag).u32(1).u8(1).build();
            assert_eq!(
                decode(&buf),
                Err(DecodeError::Unsupported {
                    tag: char::from(tag),
                    name
                })
            );
        }
        assert_eq!(
            decode(b"S").unwrap_err().to_string(),
            "pgoutput message 'S' (Stream Start) belongs to protocol version 2+, \
             the relay requests proto_version 1"
        );
    }

    #[test]
    fn unknown_tags_are_rejected() {
        assert_eq!(decode(b"Z\0\0"), Err(DecodeError::UnknownTag(b'Z')));
        assert_eq!(decode(&[0]), Err(DecodeError::UnknownTag(0)));
        assert_eq!(
            decode(b"x").unwrap_err().to_string(),
            "unknown pgoutput message tag 'x'"
        );
        assert_eq!(
            decode(&[0xfe]).unwrap_err().to_string(),
            "unknown pgoutput message tag 0xfe"
        );
    }

    #[test]
    fn missing_nul_terminator_is_an_error() {
        let buf = Msg::new(b'O').u64(1).raw(b"node-a").build();
        assert_eq!(
            decode(&buf),
            Err(DecodeError::UnterminatedString {
                what: "Origin.name"
            })
        );
        let buf = Msg::new(b'Y').u32(1).cstr("public").raw(b"mood").build();
        assert_eq!(
            decode(&buf),
            Err(DecodeError::UnterminatedString { what: "Type.name" })
        );
    }

    #[test]
    fn invalid_utf8_is_an_error() {
        let bad_text = Msg::new(b'I')
            .u32(1)
            .u8(b'N')
            .u16(1)
            .u8(b't')
            .len_bytes(&[0x61, 0xc3, 0x28])
            .build();
        assert!(matches!(
            decode(&bad_text),
            Err(DecodeError::InvalidUtf8 {
                what: "TupleData text value",
                ..
            })
        ));
        let bad_name = Msg::new(b'O').u64(1).raw(&[0xff, 0xfe]).u8(0).build();
        assert!(matches!(
            decode(&bad_name),
            Err(DecodeError::InvalidUtf8 {
                what: "Origin.name",
                ..
            })
        ));
        // The message content is bytes, not text: anything goes there.
        assert!(decode(&message()).is_ok());
    }

    #[test]
    fn huge_counts_and_lengths_fail_without_allocating() {
        let relation = Msg::new(b'R')
            .u32(1)
            .cstr("s")
            .cstr("t")
            .u8(b'd')
            .u16(u16::MAX)
            .build();
        assert_eq!(
            decode(&relation),
            Err(DecodeError::Truncated {
                what: "Relation.columns.flags"
            })
        );
        let tuple = Msg::new(b'I')
            .u32(1)
            .u8(b'N')
            .u16(u16::MAX)
            .u8(b'n')
            .build();
        assert_eq!(
            decode(&tuple),
            Err(DecodeError::Truncated {
                what: "TupleData.column_kind"
            })
        );
        let truncate = Msg::new(b'T').i32(i32::MAX).u8(0).u32(1).build();
        assert_eq!(
            decode(&truncate),
            Err(DecodeError::Truncated {
                what: "Truncate.relation_oids"
            })
        );
        let text = Msg::new(b'I')
            .u32(1)
            .u8(b'N')
            .u16(1)
            .u8(b't')
            .i32(i32::MAX)
            .raw(b"ab")
            .build();
        assert_eq!(
            decode(&text),
            Err(DecodeError::Truncated {
                what: "TupleData text value"
            })
        );
        let content = Msg::new(b'M').u8(0).u64(0).cstr("p").i32(i32::MAX).build();
        assert_eq!(
            decode(&content),
            Err(DecodeError::Truncated {
                what: "Message.content"
            })
        );
    }

    #[test]
    fn negative_lengths_are_an_error() {
        let text = Msg::new(b'I')
            .u32(1)
            .u8(b'N')
            .u16(1)
            .u8(b't')
            .i32(-1)
            .build();
        assert_eq!(
            decode(&text),
            Err(DecodeError::NegativeLength {
                what: "TupleData text value",
                len: -1
            })
        );
        let truncate = Msg::new(b'T').i32(-5).u8(0).build();
        assert_eq!(
            decode(&truncate),
            Err(DecodeError::NegativeLength {
                what: "Truncate.relation_count",
                len: -5
            })
        );
    }

    #[test]
    fn bad_submessage_tags_are_an_error() {
        let insert_without_n = Msg::new(b'I').u32(1).u8(b'K').tuple(&[]).build();
        assert!(matches!(
            decode(&insert_without_n),
            Err(DecodeError::UnexpectedByte { found: b'K', .. })
        ));
        let bad_kind = Msg::new(b'I').u32(1).u8(b'N').u16(1).u8(b'x').build();
        assert_eq!(
            decode(&bad_kind).unwrap_err().to_string(),
            "pgoutput TupleData column kind: expected 'n', 'u', 't' or 'b', found 'x'"
        );
        let update_bad = Msg::new(b'U').u32(1).u8(b'X').build();
        assert!(matches!(
            decode(&update_bad),
            Err(DecodeError::UnexpectedByte { found: b'X', .. })
        ));
        let update_key_without_new = Msg::new(b'U')
            .u32(1)
            .u8(b'K')
            .tuple(&[])
            .u8(b'O')
            .tuple(&[])
            .build();
        assert!(matches!(
            decode(&update_key_without_new),
            Err(DecodeError::UnexpectedByte { found: b'O', .. })
        ));
        // Delete needs exactly one of K / O; N is not allowed.
        let delete_new = Msg::new(b'D').u32(1).u8(b'N').tuple(&[]).build();
        assert!(matches!(
            decode(&delete_new),
            Err(DecodeError::UnexpectedByte { found: b'N', .. })
        ));
    }

    /// xorshift64*: a deterministic stand-in for a fuzzer.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: usize) -> usize {
            usize::try_from(self.next() % n.max(1) as u64).unwrap_or(0)
        }
    }

    #[test]
    fn random_and_mutated_buffers_never_panic() {
        use super::super::{row_to_json, text_to_json, RelationCache};

        let seeds = valid_messages();
        let mut cache = RelationCache::new();
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let tags = b"BCORYIUDTMSEcAbPKrpnutbN";
        let mut decoded = 0usize;
        for i in 0..100_000 {
            let buf: Vec<u8> = if i % 2 == 0 {
                // Pure noise, often behind a real tag.
                let len = rng.below(48);
                let mut buf: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                if let Some(first) = buf.first_mut() {
                    if rng.below(4) != 0 {
                        *first = tags[rng.below(tags.len())];
                    }
                }
                buf
            } else {
                // A valid message with a few bytes changed, cut or appended.
                let (_, seed) = &seeds[rng.below(seeds.len())];
                let mut buf = seed.clone();
                for _ in 0..1 + rng.below(3) {
                    let at = rng.below(buf.len());
                    if let Some(byte) = buf.get_mut(at) {
                        *byte = match rng.below(4) {
                            0 => 0,
                            1 => 0xff,
                            _ => rng.next() as u8,
                        };
                    }
                }
                match rng.below(4) {
                    0 => buf.truncate(rng.below(buf.len() + 1)),
                    1 => buf.push(rng.next() as u8),
                    _ => {}
                }
                buf
            };
            match decode(&buf) {
                Ok(LogicalMessage::Relation(rel)) => {
                    decoded += 1;
                    cache.apply(rel);
                }
                Ok(LogicalMessage::Insert(ins)) => {
                    decoded += 1;
                    if let Some(rel) = cache.get(ins.relation_oid) {
                        let _ = row_to_json(rel, &ins.new).map(|row| row.to_json_string());
                    }
                    for value in ins.new.iter() {
                        if let TupleValue::Text(text) = value {
                            for oid in [16, 20, 21, 700, 114, 1114, 1184] {
                                let _ = text_to_json(oid, text);
                            }
                        }
                    }
                }
                Ok(msg) => {
                    decoded += 1;
                    let _ = format!("{msg:?}");
                }
                Err(err) => {
                    let _ = err.to_string();
                }
            }
        }
        // The mutations leave many messages valid; make sure the test does
        // reach the decoders' success paths.
        assert!(decoded > 1_000, "only {decoded} buffers decoded");
    }

    /// Writes the valid messages as a seed corpus for `relay/fuzz`:
    /// `cargo test -p relay --lib pgoutput -- --ignored write_fuzz_seed_corpus`.
    #[test]
    #[ignore = "writes files; run on demand to seed the fuzzer"]
    fn write_fuzz_seed_corpus() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/decode");
        std::fs::create_dir_all(&dir).expect("create corpus dir");
        let mut stream = Vec::new();
        for (name, buf) in valid_messages() {
            std::fs::write(dir.join(format!("seed-{name}")), &buf).expect("write seed");
            // The fuzz target also reads its input as a sequence of
            // u16-length-prefixed messages; seed that shape too.
            let len = u16::try_from(buf.len()).expect("seeds are small");
            stream.extend_from_slice(&len.to_be_bytes());
            stream.extend_from_slice(&buf);
        }
        std::fs::write(dir.join("seed-stream"), &stream).expect("write seed");
    }
}
