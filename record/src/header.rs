//! Record headers: their names, the set the relay writes, and a lenient
//! reader for consumers.
//!
//! Every record the relay produces carries `event_id` (the outbox id, when
//! the table has an `id` column), `event_type` (when it has one), `lsn` (the
//! commit LSN of its Postgres transaction, `X/Y`), `xid`, `commit_ts` (RFC
//! 3339, microseconds, UTC) and `seq` (the row's index in its transaction).
//! `(lsn, seq)` is the record's [`Position`]: strictly increasing in commit
//! order, which is how a restarted relay recognises what Kafka already holds.

use chrono::{DateTime, Utc};

use crate::lsn::Lsn;

/// The outbox row's id (`outbox.id`): the consumers' idempotency key.
pub const EVENT_ID: &str = "event_id";
/// The outbox row's `event_type` (`OrderCreated`, …).
pub const EVENT_TYPE: &str = "event_type";
/// The commit LSN of the Postgres transaction, `X/Y`.
pub const LSN: &str = "lsn";
/// The Postgres transaction id.
pub const XID: &str = "xid";
/// The commit time, RFC 3339 with microseconds.
pub const COMMIT_TS: &str = "commit_ts";
/// The row's index (0-based) in its transaction's outbox inserts.
pub const SEQ: &str = "seq";
/// On an event `relay verify --republish-missing` produced after its time
/// (the row's record was missing): when, RFC 3339.
pub const LATE: &str = "late";
/// Every header the relay writes of its own.
pub const RELAY_NAMES: [&str; 6] = [EVENT_ID, EVENT_TYPE, LSN, XID, COMMIT_TS, SEQ];

/// Headers the notifier adds when it dead-letters a record (the original
/// headers are kept beside them).
pub mod dlq {
    /// The full error text.
    pub const REASON: &str = "dlq_reason";
    /// A short machine-readable class (`malformed_record`, …).
    pub const ERROR_CLASS: &str = "dlq_error_class";
    pub const ORIGINAL_TOPIC: &str = "dlq_original_topic";
    pub const ORIGINAL_PARTITION: &str = "dlq_original_partition";
    pub const ORIGINAL_OFFSET: &str = "dlq_original_offset";
    /// When the notifier gave up, RFC 3339.
    pub const FAILED_AT: &str = "dlq_failed_at";
}

/// Where a record stands in commit order: `(commit LSN, seq)`. Ordered
/// lexicographically, so a later transaction or a later row of the same
/// transaction is greater.
pub type Position = (Lsn, u64);

/// The headers of one relay record, in the order the relay writes them.
/// `event_id` and `event_type` are the row's text (absent when the table has
/// no such column or the value is NULL); `commit_ts` is already formatted.
pub fn relay_headers(
    event_id: Option<String>,
    event_type: Option<String>,
    (lsn, seq): Position,
    xid: u32,
    commit_ts: String,
) -> Vec<(&'static str, String)> {
    let mut headers = Vec::with_capacity(6);
    if let Some(id) = event_id {
        headers.push((EVENT_ID, id));
    }
    if let Some(t) = event_type {
        headers.push((EVENT_TYPE, t));
    }
    headers.push((LSN, lsn.to_string()));
    headers.push((XID, xid.to_string()));
    headers.push((COMMIT_TS, commit_ts));
    headers.push((SEQ, seq.to_string()));
    headers
}

/// Formats a commit time the way the relay writes `commit_ts`.
pub fn format_commit_ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// What a record's headers say, read leniently: a header that is missing,
/// not UTF-8 or not of its type is `None` (the first header of a name wins).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    pub event_id: Option<i64>,
    pub event_type: Option<String>,
    pub lsn: Option<Lsn>,
    pub xid: Option<u32>,
    pub commit_ts: Option<DateTime<Utc>>,
    pub seq: Option<u64>,
}

impl Meta {
    /// Reads `(name, value)` pairs, e.g. from rdkafka's
    /// `headers.iter().map(|h| (h.key, h.value))`.
    pub fn read<'a>(headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>) -> Meta {
        let mut meta = Meta::default();
        let mut seen = [false; 6];
        for (name, value) in headers {
            let text = value
                .and_then(|v| std::str::from_utf8(v).ok())
                .map(str::trim);
            let slot = match name {
                EVENT_ID => 0,
                EVENT_TYPE => 1,
                LSN => 2,
                XID => 3,
                COMMIT_TS => 4,
                SEQ => 5,
                _ => continue,
            };
            if std::mem::replace(&mut seen[slot], true) {
                continue;
            }
            let Some(text) = text else { continue };
            match slot {
                0 => meta.event_id = text.parse().ok(),
                1 => meta.event_type = Some(text.to_owned()).filter(|t| !t.is_empty()),
                2 => meta.lsn = text.parse().ok(),
                3 => meta.xid = text.parse().ok(),
                4 => meta.commit_ts = parse_commit_ts(text),
                _ => meta.seq = text.parse().ok(),
            }
        }
        meta
    }

    /// `(lsn, seq)`, when both headers are there and well formed.
    pub fn position(&self) -> Option<Position> {
        Some((self.lsn?, self.seq?))
    }
}

/// Parses a `commit_ts` header (RFC 3339, any offset) to UTC.
pub fn parse_commit_ts(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text.trim())
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// The first header called `name`, from `(name, value)` pairs.
pub fn find<'a>(
    headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
    name: &str,
) -> Option<&'a [u8]> {
    headers
        .into_iter()
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(h: &[(&'static str, String)]) -> Vec<(&'static str, Option<Vec<u8>>)> {
        h.iter()
            .map(|(k, v)| (*k, Some(v.as_bytes().to_vec())))
            .collect()
    }

    #[test]
    fn what_the_relay_writes_reads_back() {
        let ts = parse_commit_ts("2026-11-30T10:00:00.000005Z").unwrap();
        let written = relay_headers(
            Some("17".into()),
            Some("OrderCreated".into()),
            (Lsn(0x1_0000_00A0), 3),
            777,
            format_commit_ts(ts),
        );
        let names: Vec<_> = written.iter().map(|(k, _)| *k).collect();
        assert_eq!(names, [EVENT_ID, EVENT_TYPE, LSN, XID, COMMIT_TS, SEQ]);
        assert_eq!(written[2].1, "1/A0");
        assert_eq!(written[4].1, "2026-11-30T10:00:00.000005Z");
        let owned = pairs(&written);
        let meta = Meta::read(owned.iter().map(|(k, v)| (*k, v.as_deref())));
        assert_eq!(
            meta,
            Meta {
                event_id: Some(17),
                event_type: Some("OrderCreated".into()),
                lsn: Some(Lsn(0x1_0000_00A0)),
                xid: Some(777),
                commit_ts: Some(ts),
                seq: Some(3),
            }
        );
        assert_eq!(meta.position(), Some((Lsn(0x1_0000_00A0), 3)));
    }

    #[test]
    fn reading_is_lenient_and_the_first_header_wins() {
        let h: Vec<(&str, Option<&[u8]>)> = vec![
            (EVENT_ID, Some(b"x1")),
            (EVENT_ID, Some(b"5")),
            (LSN, Some(b"0/10")),
            (SEQ, None),
            (EVENT_TYPE, Some(b" ")),
            (COMMIT_TS, Some(&[0xff, 0xfe])),
            ("other", Some(b"1")),
        ];
        let meta = Meta::read(h.iter().copied());
        assert_eq!(meta.event_id, None, "the first event_id is not a number");
        assert_eq!(meta.lsn, Some(Lsn(0x10)));
        assert_eq!(meta.position(), None, "no seq value");
        assert_eq!(meta.event_type, None);
        assert_eq!(meta.commit_ts, None);
        assert_eq!(find(h.iter().copied(), "other"), Some(&b"1"[..]));
        assert_eq!(find(h.iter().copied(), SEQ), None);
    }

    #[test]
    fn commit_ts_keeps_microseconds_and_any_offset() {
        let us = |s: &str| parse_commit_ts(s).map(|t| t.timestamp_micros());
        assert_eq!(us("1970-01-01T00:00:01.000002Z"), Some(1_000_002));
        assert_eq!(
            us("2026-01-01T00:00:00.5+01:00"),
            Some(1_767_222_000_500_000)
        );
        assert_eq!(us("yesterday"), None);
    }

    #[test]
    fn positions_order_by_lsn_then_seq() {
        assert!((Lsn(1), 9) < (Lsn(2), 0));
        assert!((Lsn(2), 0) < (Lsn(2), 1));
    }
}
