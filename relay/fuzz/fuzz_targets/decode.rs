//! Fuzz target `decode`: arbitrary bytes into the pgoutput decoder and, for
//! the inserts it yields, into the row → JSON mapping.
//!
//! The input is used three ways:
//! 1. as one whole XLogData payload for `decode`;
//! 2. as a stream of messages, each behind a big-endian u16 length, so that
//!    Relation messages fill a `RelationCache` and later Insert messages are
//!    mapped with `row_to_json` against it (or, for an unknown relation,
//!    against a made-up relation with one column of each mapped type);
//! 3. as the text of a value of every type the mapping knows.
//!
//! Besides "never panics", it checks that a mapped row has one value per
//! column and serialises to a JSON object.

#![no_main]

use libfuzzer_sys::fuzz_target;
use relay::pgoutput::{
    decode, row_to_json, text_to_cell, text_to_json, type_oid, LogicalMessage, Relation,
    RelationCache, RelationColumn,
};

const MAPPED_TYPES: [u32; 18] = [
    type_oid::BOOL,
    type_oid::NAME,
    type_oid::INT8,
    type_oid::INT2,
    type_oid::INT4,
    type_oid::TEXT,
    type_oid::OID,
    type_oid::JSON,
    type_oid::FLOAT4,
    type_oid::FLOAT8,
    type_oid::BPCHAR,
    type_oid::VARCHAR,
    type_oid::DATE,
    type_oid::TIMESTAMP,
    type_oid::TIMESTAMPTZ,
    type_oid::NUMERIC,
    type_oid::UUID,
    type_oid::JSONB,
];

/// A relation with `columns` columns cycling through the mapped types.
fn made_up_relation(oid: u32, columns: usize) -> Relation {
    Relation {
        oid,
        namespace: "fuzz".to_owned(),
        name: "made_up".to_owned(),
        replica_identity: b'd',
        columns: (0..columns)
            .map(|i| RelationColumn {
                flags: 0,
                name: format!("c{i}"),
                type_oid: MAPPED_TYPES[i % MAPPED_TYPES.len()],
                type_modifier: -1,
            })
            .collect(),
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = decode(data).map_err(|err| err.to_string());

    let mut cache = RelationCache::new();
    let mut rest = data;
    while let Some((len, tail)) = rest.split_first_chunk::<2>() {
        let len = usize::from(u16::from_be_bytes(*len)).min(tail.len());
        let (message, tail) = tail.split_at(len);
        rest = tail;
        match decode(message) {
            Ok(LogicalMessage::Relation(rel)) => {
                cache.apply(rel);
            }
            Ok(LogicalMessage::Insert(insert)) => {
                let rel = match cache.get(insert.relation_oid) {
                    Some(rel) => rel.clone(),
                    None => made_up_relation(insert.relation_oid, insert.new.len()),
                };
                if let Ok(row) = row_to_json(&rel, &insert.new) {
                    assert_eq!(row.len(), rel.columns.len());
                    let json = row.to_json_string();
                    assert!(json.starts_with('{') && json.ends_with('}'));
                }
            }
            Ok(other) => {
                let _ = format!("{other:?}");
            }
            Err(err) => {
                let _ = err.to_string();
            }
        }
    }

    if let Ok(text) = std::str::from_utf8(data) {
        for oid in MAPPED_TYPES {
            let _ = text_to_json(oid, text);
            let _ = text_to_cell(oid, text).as_text();
        }
    }
});
