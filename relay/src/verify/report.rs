//! The comparison of `relay verify`: rows against the records read back,
//! and the report it prints (text) or returns (JSON).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use outbox_record::header::Position;
use serde::Serialize;

use super::Seen;

/// Ids listed per finding (the counts are complete).
const LISTED: usize = 100;

/// One finding with its full count and the first ids.
#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct Ids {
    pub count: usize,
    pub ids: Vec<i64>,
}

impl Ids {
    pub(super) fn of(ids: impl IntoIterator<Item = i64>) -> Ids {
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
    /// The time range (`--since`, `--until`), RFC 3339.
    pub since: Option<String>,
    pub until: Option<String>,
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

pub(super) fn without_row(ids: &BTreeSet<i64>, seen: &[Seen], from: i64, to: i64) -> Vec<i64> {
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
        since: None,
        until: None,
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
        let created = match (&self.since, &self.until) {
            (None, None) => String::new(),
            (since, until) => format!(
                " created in [{}, {})",
                since.as_deref().unwrap_or("…"),
                until.as_deref().unwrap_or("…")
            ),
        };
        writeln!(
            f,
            "outbox ids {}..={}{created}: {} rows",
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
    use crate::lsn::Lsn;

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
}
