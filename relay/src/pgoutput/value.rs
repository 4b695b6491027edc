//! Column values in Postgres' text output format → JSON.
//!
//! The mapping is by column type oid and never fails: a value that does not
//! parse as its type promises is kept as its text, a JSON string. Only the
//! row-level [`row_to_json`] can fail, for tuples that do not fit their
//! relation.
//!
//! | type (oid)                                      | JSON                               |
//! |-------------------------------------------------|------------------------------------|
//! | NULL                                            | `null`                             |
//! | `int2` 21, `int4` 23, `int8` 20, `oid` 26       | number                             |
//! | `float4` 700, `float8` 701                      | number; `NaN`/`Infinity` as string |
//! | `numeric` 1700                                  | string (no precision loss)         |
//! | `bool` 16                                       | `true` / `false`                   |
//! | `json` 114, `jsonb` 3802                        | the embedded document              |
//! | `timestamptz` 1184                              | `2026-11-21T10:00:00.123456Z` (UTC)|
//! | `timestamp` 1114                                | `2026-11-21T10:00:00.123456`       |
//! | everything else (`text`, `uuid`, `date`, ...)   | string, as Postgres printed it     |
//!
//! Embedded JSON is validated and copied, not re-parsed into a tree
//! ([`Cell::Document`]): keys keep Postgres' order (for `jsonb`: by length,
//! then bytes), numbers keep every digit, and only insignificant whitespace
//! is dropped. Text that is not valid JSON stays a string. Timestamps are
//! expected in the `ISO` DateStyle, Postgres' default; `infinity` and
//! anything else unparseable stays a string.

use std::fmt::Write as _;

use chrono::{NaiveDate, NaiveDateTime, SecondsFormat, TimeDelta};
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::value::RawValue;
use serde_json::{Number, Value};

use super::{Relation, TupleData, TupleValue};

/// The `pg_type` oids the JSON mapping treats specially (plus the plain
/// string types it names, for callers' convenience).
pub mod type_oid {
    pub const BOOL: u32 = 16;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const OID: u32 = 26;
    pub const JSON: u32 = 114;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const DATE: u32 = 1082;
    pub const TIMESTAMP: u32 = 1114;
    pub const TIMESTAMPTZ: u32 = 1184;
    pub const NUMERIC: u32 = 1700;
    pub const UUID: u32 = 2950;
    pub const JSONB: u32 = 3802;
}

/// Why a tuple cannot be turned into a JSON row. Messages name the relation
/// and column, never the values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RowError {
    #[error(
        "relation {relation} (oid {relation_oid}) has {expected} columns but the tuple has {found}"
    )]
    ColumnCountMismatch {
        relation: String,
        relation_oid: u32,
        expected: usize,
        found: usize,
    },
    /// Only updates and old tuples can carry these; pgoutput does not send
    /// the value, so the row cannot be rendered in full.
    #[error("column {column} of {relation} is an unchanged TOAST value, whose content pgoutput does not send")]
    UnchangedToast { relation: String, column: String },
    #[error(
        "column {column} of {relation} arrived in binary format, which the relay never requests"
    )]
    Binary { relation: String, column: String },
}

/// One column's JSON: a mapped scalar, or a `json`/`jsonb` document kept
/// exactly as Postgres printed it (minus insignificant whitespace).
#[derive(Debug, Clone)]
pub enum Cell {
    Value(Value),
    Document(Box<RawValue>),
}

impl Cell {
    /// The value as a record key or header would carry it: `None` for
    /// NULL, a string's content, any other JSON as its text.
    pub fn as_text(&self) -> Option<String> {
        match self {
            Cell::Value(Value::Null) => None,
            Cell::Value(Value::String(s)) => Some(s.clone()),
            Cell::Value(other) => Some(other.to_string()),
            Cell::Document(raw) if raw.get() == "null" => None,
            Cell::Document(raw) => Some(raw.get().to_owned()),
        }
    }

    /// As a `serde_json::Value` (a document is parsed, with serde_json's
    /// precision; use [`Cell::as_text`] or serialization for exact output).
    pub fn to_value(&self) -> Value {
        match self {
            Cell::Value(v) => v.clone(),
            Cell::Document(raw) => {
                serde_json::from_str(raw.get()).unwrap_or_else(|_| Value::String(raw.get().into()))
            }
        }
    }
}

impl PartialEq for Cell {
    fn eq(&self, other: &Cell) -> bool {
        match (self, other) {
            (Cell::Value(a), Cell::Value(b)) => a == b,
            (Cell::Document(a), Cell::Document(b)) => a.get() == b.get(),
            _ => false,
        }
    }
}

impl PartialEq<Value> for Cell {
    fn eq(&self, other: &Value) -> bool {
        match self {
            Cell::Value(v) => v == other,
            Cell::Document(_) => self.to_value() == *other,
        }
    }
}

impl Serialize for Cell {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Cell::Value(v) => v.serialize(serializer),
            Cell::Document(raw) => raw.serialize(serializer),
        }
    }
}

/// One row as JSON values, in the relation's column order.
///
/// `serde_json` is built without `preserve_order`, so a
/// `serde_json::Map` would sort the columns; this type keeps them as the
/// table declares them. Its `Serialize` writes a JSON object in that
/// order; [`JsonRow::to_json_string`] does the same to a `String`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct JsonRow {
    columns: Vec<(String, Cell)>,
}

impl JsonRow {
    /// A row from `(column, value)` pairs in column order.
    pub fn from_columns(columns: Vec<(String, Cell)>) -> JsonRow {
        JsonRow { columns }
    }

    pub fn len(&self) -> usize {
        self.columns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.columns.is_empty()
    }

    /// The value of the column called `name`.
    pub fn get(&self, name: &str) -> Option<&Cell> {
        self.columns
            .iter()
            .find_map(|(column, value)| (column == name).then_some(value))
    }

    /// `(column, value)` pairs in column order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Cell)> {
        self.columns
            .iter()
            .map(|(column, value)| (column.as_str(), value))
    }

    pub fn into_columns(self) -> Vec<(String, Cell)> {
        self.columns
    }

    /// The row as a compact JSON object, columns in order.
    pub fn to_json_string(&self) -> String {
        // Cannot fail: the writer is a Vec, every key is a string, a
        // serde_json::Value holds only finite numbers and a RawValue was
        // validated when it was made.
        serde_json::to_string(self).expect("a JsonRow always serializes")
    }
}

impl Serialize for JsonRow {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.columns.len()))?;
        for (column, value) in &self.columns {
            map.serialize_entry(column, value)?;
        }
        map.end()
    }
}

/// Maps a tuple (an Insert's new row, say) to JSON using its relation's
/// column names and types.
///
/// Errors, rather than guesses, when the tuple does not match the relation's
/// column count, holds an unchanged TOAST value (never the case for
/// inserts) or a binary value.
pub fn row_to_json(rel: &Relation, tuple: &TupleData) -> Result<JsonRow, RowError> {
    if rel.columns.len() != tuple.len() {
        return Err(RowError::ColumnCountMismatch {
            relation: rel.qualified_name(),
            relation_oid: rel.oid,
            expected: rel.columns.len(),
            found: tuple.len(),
        });
    }
    let mut columns = Vec::with_capacity(tuple.len());
    for (column, value) in rel.columns.iter().zip(tuple.iter()) {
        let json = match value {
            TupleValue::Null => Cell::Value(Value::Null),
            TupleValue::Text(text) => text_to_cell(column.type_oid, text),
            TupleValue::UnchangedToast => {
                return Err(RowError::UnchangedToast {
                    relation: rel.qualified_name(),
                    column: column.name.clone(),
                })
            }
            TupleValue::Binary(_) => {
                return Err(RowError::Binary {
                    relation: rel.qualified_name(),
                    column: column.name.clone(),
                })
            }
        };
        columns.push((column.name.clone(), json));
    }
    Ok(JsonRow { columns })
}

/// Maps one non-NULL value to a [`Cell`]: `json`/`jsonb` documents are
/// validated and kept verbatim (compacted); everything else goes through
/// [`text_to_json`]. Never fails.
pub fn text_to_cell(type_oid: u32, text: &str) -> Cell {
    if matches!(type_oid, type_oid::JSON | type_oid::JSONB) {
        return match RawValue::from_string(compact_json(text)) {
            Ok(raw) => Cell::Document(raw),
            Err(_) => Cell::Value(Value::String(text.to_owned())),
        };
    }
    Cell::Value(text_to_json(type_oid, text))
}

/// Drops whitespace outside strings (`{"a": 1}` → `{"a":1}`), except where
/// dropping it would join two tokens (`1 2`, `true "x"`): so the result is
/// valid JSON exactly when the input was, with the same meaning.
fn compact_json(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut pending_space = false;
    for c in text.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            continue;
        }
        match c {
            ' ' | '\n' | '\r' | '\t' => pending_space = true,
            _ => {
                // Keep one space where dropping it would join two tokens
                // (`1 2`, `true false`): the result then stays invalid.
                if pending_space && joins_token(out.chars().last(), c) {
                    out.push(' ');
                }
                pending_space = false;
                if c == '"' {
                    in_string = true;
                }
                out.push(c);
            }
        }
    }
    out
}

fn joins_token(prev: Option<char>, next: char) -> bool {
    let word = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+');
    prev.is_some_and(|p| word(p) && (word(next) || next == '"'))
        || (prev == Some('"') && next == '"')
}

/// Maps one non-NULL value, in its type's text output format, to a JSON
/// value (see the module docs for the table; `json`/`jsonb` are parsed
/// into a `Value` here — rows use [`text_to_cell`], which keeps them
/// verbatim). Never fails: unparseable text is kept as a string.
pub fn text_to_json(type_oid: u32, text: &str) -> Value {
    let mapped = match type_oid {
        type_oid::INT2 | type_oid::INT4 | type_oid::INT8 | type_oid::OID => {
            text.parse::<i64>().ok().map(Value::from)
        }
        type_oid::FLOAT4 | type_oid::FLOAT8 => text
            .parse::<f64>()
            .ok()
            .and_then(Number::from_f64)
            .map(Value::Number),
        type_oid::BOOL => match text {
            "t" => Some(Value::Bool(true)),
            "f" => Some(Value::Bool(false)),
            _ => None,
        },
        type_oid::JSON | type_oid::JSONB => serde_json::from_str(text).ok(),
        type_oid::TIMESTAMPTZ => timestamptz_to_utc(text).map(Value::String),
        type_oid::TIMESTAMP => timestamp_to_iso(text).map(Value::String),
        _ => None,
    };
    mapped.unwrap_or_else(|| Value::String(text.to_owned()))
}

/// `2026-11-21 15:30:00.5+05:30` → `2026-11-21T10:00:00.500000Z`.
fn timestamptz_to_utc(text: &str) -> Option<String> {
    let (local, offset_secs) = parse_iso_timestamp(text, true)?;
    let utc = local
        .checked_sub_signed(TimeDelta::try_seconds(i64::from(offset_secs))?)?
        .and_utc();
    Some(utc.to_rfc3339_opts(SecondsFormat::Micros, true))
}

/// `2026-11-21 10:00:00.5` → `2026-11-21T10:00:00.500000`.
fn timestamp_to_iso(text: &str) -> Option<String> {
    let (at, _) = parse_iso_timestamp(text, false)?;
    let mut out = String::with_capacity(26);
    write!(out, "{}", at.format("%Y-%m-%dT%H:%M:%S%.6f")).ok()?;
    Some(out)
}

/// Parses Postgres' ISO DateStyle output,
/// `YYYY-MM-DD HH:MM:SS[.ffffff][±HH[:MM[:SS]]][ BC]`, the zone present
/// exactly when `with_zone`. Returns the local time and the zone's offset
/// east of UTC in seconds (0 without a zone).
fn parse_iso_timestamp(text: &str, with_zone: bool) -> Option<(NaiveDateTime, i32)> {
    let mut c = Cursor(text.as_bytes());
    let (year, _) = c.digits(4, 9)?;
    c.literal(b'-')?;
    let month = c.fixed(2)?;
    c.literal(b'-')?;
    let day = c.fixed(2)?;
    c.literal(b' ')?;
    let hour = c.fixed(2)?;
    c.literal(b':')?;
    let minute = c.fixed(2)?;
    c.literal(b':')?;
    let second = c.fixed(2)?;
    let micros = if c.eat(b'.') {
        let (fraction, digits) = c.digits(1, 6)?;
        fraction * 10u32.pow(6 - digits)
    } else {
        0
    };
    let offset_secs = if with_zone {
        let sign = match c.next()? {
            b'+' => 1,
            b'-' => -1,
            _ => return None,
        };
        let hours = c.fixed(2)?;
        let minutes = if c.eat(b':') { c.fixed(2)? } else { 0 };
        let seconds = if c.eat(b':') { c.fixed(2)? } else { 0 };
        let secs = i32::try_from(hours * 3600 + minutes * 60 + seconds).ok()?;
        if minutes >= 60 || seconds >= 60 || secs >= 86_400 {
            return None;
        }
        sign * secs
    } else {
        0
    };
    let year = i32::try_from(year).ok()?;
    let year = match c.0 {
        b"" => year,
        // There is no year 0: 1 BC is astronomical year 0.
        b" BC" if year > 0 => 1 - year,
        _ => return None,
    };
    let at = NaiveDate::from_ymd_opt(year, month, day)?
        .and_hms_micro_opt(hour, minute, second, micros)?;
    Some((at, offset_secs))
}

/// A forward-only reader over ASCII text that never panics.
struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn next(&mut self) -> Option<u8> {
        let (&byte, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(byte)
    }

    fn eat(&mut self, byte: u8) -> bool {
        match self.0.split_first() {
            Some((&first, rest)) if first == byte => {
                self.0 = rest;
                true
            }
            _ => false,
        }
    }

    fn literal(&mut self, byte: u8) -> Option<()> {
        self.eat(byte).then_some(())
    }

    /// Between `min` and `max` (≤ 9, so the value fits a u32) decimal
    /// digits: their value and how many there were.
    fn digits(&mut self, min: u32, max: u32) -> Option<(u32, u32)> {
        let mut value = 0u32;
        let mut count = 0u32;
        while count < max {
            match self.0.split_first() {
                Some((&byte, rest)) if byte.is_ascii_digit() => {
                    value = value * 10 + u32::from(byte - b'0');
                    count += 1;
                    self.0 = rest;
                }
                _ => break,
            }
        }
        (count >= min).then_some((value, count))
    }

    fn fixed(&mut self, n: u32) -> Option<u32> {
        self.digits(n, n).map(|(value, _)| value)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::RelationColumn;
    use super::*;

    fn map(type_oid: u32, text: &str) -> Value {
        text_to_json(type_oid, text)
    }

    #[test]
    fn integers_become_numbers() {
        assert_eq!(map(type_oid::INT2, "-32768"), json!(-32768));
        assert_eq!(map(type_oid::INT4, "2147483647"), json!(2_147_483_647));
        assert_eq!(map(type_oid::INT8, "-9223372036854775808"), json!(i64::MIN));
        assert_eq!(map(type_oid::INT8, "9223372036854775807"), json!(i64::MAX));
        assert_eq!(map(type_oid::OID, "4294967295"), json!(4_294_967_295u32));
        // Not an integer after all: kept as text.
        assert_eq!(map(type_oid::INT8, "12abc"), json!("12abc"));
        assert_eq!(
            map(type_oid::INT8, "99999999999999999999"),
            json!("99999999999999999999")
        );
    }

    #[test]
    fn floats_become_numbers_when_finite() {
        assert_eq!(map(type_oid::FLOAT8, "1.5"), json!(1.5));
        assert_eq!(map(type_oid::FLOAT4, "-0.25"), json!(-0.25));
        assert_eq!(map(type_oid::FLOAT8, "1e+300"), json!(1e300));
        assert_eq!(map(type_oid::FLOAT8, "NaN"), json!("NaN"));
        assert_eq!(map(type_oid::FLOAT8, "Infinity"), json!("Infinity"));
        assert_eq!(map(type_oid::FLOAT4, "-Infinity"), json!("-Infinity"));
        assert_eq!(map(type_oid::FLOAT8, "x"), json!("x"));
    }

    #[test]
    fn numeric_stays_an_exact_string() {
        let many_digits = "123456789012345678901234567890.000000000000000000000000000001";
        assert_eq!(map(type_oid::NUMERIC, many_digits), json!(many_digits));
        assert_eq!(map(type_oid::NUMERIC, "0.1"), json!("0.1"));
        assert_eq!(map(type_oid::NUMERIC, "NaN"), json!("NaN"));
    }

    #[test]
    fn bool_maps_t_and_f() {
        assert_eq!(map(type_oid::BOOL, "t"), json!(true));
        assert_eq!(map(type_oid::BOOL, "f"), json!(false));
        assert_eq!(map(type_oid::BOOL, "maybe"), json!("maybe"));
    }

    #[test]
    fn json_and_jsonb_are_embedded() {
        let nested = r#"{"order": {"id": 7, "lines": [{"sku": "A-1", "qty": 2}], "paid": true, "note": null}}"#;
        let expected = json!({"order": {"id": 7, "lines": [{"sku": "A-1", "qty": 2}], "paid": true, "note": null}});
        assert_eq!(map(type_oid::JSONB, nested), expected);
        assert_eq!(
            map(type_oid::JSON, "[1, \"two\", 3.5]"),
            json!([1, "two", 3.5])
        );
        assert_eq!(
            map(type_oid::JSON, "\"just a string\""),
            json!("just a string")
        );
        assert_eq!(map(type_oid::JSONB, "null"), Value::Null);
        // Not JSON after all: kept as raw text rather than failing.
        assert_eq!(map(type_oid::JSON, "{broken"), json!("{broken"));
    }

    #[test]
    fn documents_are_kept_verbatim_but_compact() {
        let cell =
            |text: &str| serde_json::to_string(&text_to_cell(type_oid::JSONB, text)).unwrap();
        // Every digit survives, and keys keep the order Postgres printed.
        assert_eq!(
            cell(r#"{"b": 1, "a": 123456789012345678901234567890.123456789}"#),
            r#"{"b":1,"a":123456789012345678901234567890.123456789}"#
        );
        // Whitespace inside strings is content.
        assert_eq!(
            cell("{\"note\": \"two  spaces\\\" \\n\", \"x\": [1, 2]}"),
            r#"{"note":"two  spaces\" \n","x":[1,2]}"#
        );
        assert_eq!(cell(" null "), "null");
        // Dropping the space would make `12` out of invalid `1 2`.
        assert_eq!(cell("[1 2]"), r#""[1 2]""#);
        assert_eq!(cell("{broken"), r#""{broken""#);
        assert_eq!(text_to_cell(type_oid::JSONB, "null").as_text(), None);
        assert_eq!(
            text_to_cell(type_oid::INT4, "5"),
            Cell::Value(json!(5)),
            "other types map as text_to_json does"
        );
    }

    #[test]
    fn compacting_never_changes_validity_or_meaning() {
        // Random strings over JSON's token alphabet: whenever the input is
        // valid JSON the cell is the same document, otherwise the input
        // stays a string, verbatim.
        const ALPHABET: &[u8] = b"{}[]\":,.0123456789-+eE tfnrulsa\\\n\t";
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut valid = 0;
        for _ in 0..200_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 12) as usize + 1;
            let text: String = (0..len)
                .map(|i| ALPHABET[((state >> (i * 5)) as usize + i * 7) % ALPHABET.len()] as char)
                .collect();
            // Syntax (RawValue's test) and, where serde_json can represent
            // the numbers, meaning.
            let syntax_ok = serde_json::from_str::<serde::de::IgnoredAny>(&text).is_ok();
            match text_to_cell(type_oid::JSON, &text) {
                Cell::Document(raw) => {
                    assert!(syntax_ok, "{text:?} became {raw}");
                    valid += 1;
                    if let Ok(v) = serde_json::from_str::<Value>(&text) {
                        let compacted: Value = serde_json::from_str(raw.get()).unwrap();
                        assert_eq!(compacted, v, "{text:?}");
                    }
                }
                Cell::Value(Value::String(s)) => {
                    assert!(!syntax_ok, "{text:?} is JSON");
                    assert_eq!(s, text);
                }
                other => panic!("{text:?}: {other:?}"),
            }
        }
        assert!(
            valid > 1000,
            "the generator makes valid documents too ({valid})"
        );
    }

    #[test]
    fn timestamptz_is_normalised_to_utc() {
        let cases = [
            (
                "2026-11-21 10:00:00.123456+00",
                "2026-11-21T10:00:00.123456Z",
            ),
            ("2026-11-21 15:30:00.5+05:30", "2026-11-21T10:00:00.500000Z"),
            ("2026-11-21 02:00:00-08", "2026-11-21T10:00:00.000000Z"),
            ("2026-01-01 01:00:00+05:30", "2025-12-31T19:30:00.000000Z"),
            (
                "2026-12-31 20:00:00.000001-04",
                "2027-01-01T00:00:00.000001Z",
            ),
            (
                "1900-01-01 00:00:00+05:53:28",
                "1899-12-31T18:06:32.000000Z",
            ),
            (
                "2024-02-29 23:59:59.999999+00",
                "2024-02-29T23:59:59.999999Z",
            ),
            ("0044-03-15 12:00:00+00 BC", "-0043-03-15T12:00:00.000000Z"),
        ];
        for (text, expected) in cases {
            assert_eq!(map(type_oid::TIMESTAMPTZ, text), json!(expected), "{text}");
        }
    }

    #[test]
    fn timestamptz_keeps_infinity_and_junk_as_text() {
        for text in [
            "infinity",
            "-infinity",
            "2026-11-21 10:00:00",            // zone missing
            "2026-11-21T10:00:00+00",         // not Postgres' output style
            "2026-02-30 10:00:00+00",         // no such day
            "2026-11-21 10:00:00+24",         // offset out of range
            "2026-11-21 10:00:00.1234567+00", // more than microseconds
            "2026-11-21 10:00:00+00 AD",
            "0000-01-01 00:00:00+00 BC",
            "",
        ] {
            assert_eq!(map(type_oid::TIMESTAMPTZ, text), json!(text), "{text}");
        }
    }

    #[test]
    fn timestamp_without_zone_has_no_suffix() {
        assert_eq!(
            map(type_oid::TIMESTAMP, "2026-11-21 10:00:00.123456"),
            json!("2026-11-21T10:00:00.123456")
        );
        assert_eq!(
            map(type_oid::TIMESTAMP, "2026-11-21 10:00:00"),
            json!("2026-11-21T10:00:00.000000")
        );
        assert_eq!(map(type_oid::TIMESTAMP, "infinity"), json!("infinity"));
        // A zone where none belongs: left alone.
        assert_eq!(
            map(type_oid::TIMESTAMP, "2026-11-21 10:00:00+00"),
            json!("2026-11-21 10:00:00+00")
        );
    }

    #[test]
    fn string_types_and_unknown_types_stay_text() {
        let uuid = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
        assert_eq!(map(type_oid::UUID, uuid), json!(uuid));
        assert_eq!(
            map(type_oid::TEXT, "héllo \"quoted\""),
            json!("héllo \"quoted\"")
        );
        assert_eq!(map(type_oid::VARCHAR, "42"), json!("42"));
        assert_eq!(map(type_oid::BPCHAR, "ab   "), json!("ab   "));
        assert_eq!(map(type_oid::NAME, "outbox"), json!("outbox"));
        assert_eq!(map(type_oid::DATE, "2026-11-21"), json!("2026-11-21"));
        // inet, interval, a custom enum: their text.
        assert_eq!(map(869, "10.0.0.1"), json!("10.0.0.1"));
        assert_eq!(map(1186, "1 day 02:00:00"), json!("1 day 02:00:00"));
        assert_eq!(map(90210, "happy"), json!("happy"));
    }

    fn outbox_relation() -> Relation {
        let column = |name: &str, type_oid| RelationColumn {
            flags: 0,
            name: name.to_owned(),
            type_oid,
            type_modifier: -1,
        };
        Relation {
            oid: 16384,
            namespace: "public".to_owned(),
            name: "outbox".to_owned(),
            replica_identity: b'd',
            columns: vec![
                column("id", type_oid::INT8),
                column("aggregate_id", type_oid::UUID),
                column("topic", type_oid::TEXT),
                column("payload", type_oid::JSONB),
                column("created_at", type_oid::TIMESTAMPTZ),
                column("amount", type_oid::NUMERIC),
                column("note", type_oid::TEXT),
            ],
        }
    }

    fn text(s: &str) -> TupleValue {
        TupleValue::Text(s.to_owned())
    }

    #[test]
    fn row_maps_columns_in_order() {
        let tuple = TupleData(vec![
            text("7"),
            text("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            text("orders"),
            text(r#"{"z": 1, "a": [true]}"#),
            text("2026-11-21 11:00:00.25+01"),
            text("12345678901234567890.12345678901234567890"),
            TupleValue::Null,
        ]);
        let row = row_to_json(&outbox_relation(), &tuple).expect("row fits relation");
        let names: Vec<&str> = row.iter().map(|(name, _)| name).collect();
        assert_eq!(
            names,
            [
                "id",
                "aggregate_id",
                "topic",
                "payload",
                "created_at",
                "amount",
                "note"
            ]
        );
        assert_eq!(row.len(), 7);
        assert_eq!(row.get("id").map(Cell::to_value), Some(json!(7)));
        assert_eq!(row.get("note").map(Cell::to_value), Some(Value::Null));
        assert_eq!(row.get("note").and_then(Cell::as_text), None);
        assert_eq!(row.get("id").and_then(Cell::as_text).as_deref(), Some("7"));
        assert_eq!(row.get("missing"), None);
        assert_eq!(
            row.to_json_string(),
            concat!(
                r#"{"id":7,"aggregate_id":"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11","#,
                r#""topic":"orders","payload":{"z":1,"a":[true]},"#,
                r#""created_at":"2026-11-21T10:00:00.250000Z","#,
                r#""amount":"12345678901234567890.12345678901234567890","note":null}"#
            )
        );
        assert_eq!(serde_json::to_string(&row).ok(), Some(row.to_json_string()));
        assert_eq!(
            row.into_columns().first().map(|(name, _)| name.as_str()),
            Some("id")
        );
    }

    #[test]
    fn row_column_count_mismatch_is_an_error() {
        let err = row_to_json(&outbox_relation(), &TupleData(vec![text("1")])).unwrap_err();
        assert_eq!(
            err,
            RowError::ColumnCountMismatch {
                relation: "public.outbox".to_owned(),
                relation_oid: 16384,
                expected: 7,
                found: 1,
            }
        );
        assert_eq!(
            err.to_string(),
            "relation public.outbox (oid 16384) has 7 columns but the tuple has 1"
        );
    }

    #[test]
    fn row_with_toast_or_binary_value_is_an_error() {
        let mut values = vec![TupleValue::Null; 7];
        values[3] = TupleValue::UnchangedToast;
        assert_eq!(
            row_to_json(&outbox_relation(), &TupleData(values.clone())),
            Err(RowError::UnchangedToast {
                relation: "public.outbox".to_owned(),
                column: "payload".to_owned(),
            })
        );
        values[3] = TupleValue::Binary(vec![1, 2, 3]);
        let err = row_to_json(&outbox_relation(), &TupleData(values)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "column payload of public.outbox arrived in binary format, which the relay never requests"
        );
    }

    #[test]
    fn empty_relation_maps_to_empty_object() {
        let mut rel = outbox_relation();
        rel.columns.clear();
        let row = row_to_json(&rel, &TupleData::default()).expect("empty fits empty");
        assert!(row.is_empty());
        assert_eq!(row.to_json_string(), "{}");
    }
}
