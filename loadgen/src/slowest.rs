//! The slowest requests of a run, each named by its W3C trace id, so that a
//! tail figure in the report leads to the traces, logs and records that
//! made it.
//!
//! ```text
//!  request ok ──────▶ offer(request, µs, Slow)            ┐
//!  record matched ──▶ offer(end_to_end, µs, Slow)         ├─▶ per stage: the N worst requests
//!  notifier row ────▶ offer(commit_to_notifier, µs, Slow) ┘     └─▶ report: the most downstream
//!                                                                    stage that has any
//! ```
//!
//! Every request carries a fresh trace (`TraceParent::root()`): in http mode
//! as the `traceparent` header, which order-api continues into the outbox
//! row; in sql mode in the row's `traceparent` column, when the table has
//! one. The relay copies that column into a Kafka header of the same name,
//! so a trace id named here is on the request's records.
//!
//! Memory is bounded whatever the length of the run: each stage keeps at
//! most N requests (an ordered set of (latency, request) and a map from the
//! request to its entry). A request with several events (sql mode,
//! `--rows-per-txn` > 1, one trace for the transaction) counts once, at its
//! slowest event. Warm-up requests are left out, as from the stage
//! histograms. Of requests equally slow, the first one offered stays.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use outbox_record::trace::TraceParent;

use crate::matcher::Key;
use crate::report::{SlowRequest, SlowestSummary};
use crate::stats::Stage;

/// One request, as the report names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slow {
    /// Its index in the schedule: what makes a request one.
    pub request: u64,
    /// The trace it carried; none when it carried no trace context (sql
    /// mode on an outbox without a `traceparent` column).
    pub trace: Option<TraceParent>,
    /// The record it is about (for the request stage of a transaction of
    /// several rows: the first).
    pub key: Key,
    /// The record's `event_id` header, when it was read.
    pub event_id: Option<i64>,
    /// Its intended start, from the start of the schedule.
    pub intended: Duration,
    /// Its request-stage latency, µs.
    pub request_us: u64,
}

/// The `capacity` slowest requests of one stage.
#[derive(Debug)]
pub struct Slowest {
    capacity: usize,
    /// (µs, request), fastest first.
    ranked: BTreeSet<(u64, u64)>,
    entries: HashMap<u64, (u64, Slow)>,
}

impl Slowest {
    pub fn new(capacity: usize) -> Slowest {
        Slowest {
            capacity,
            ranked: BTreeSet::new(),
            entries: HashMap::new(),
        }
    }

    /// `slow` took `us` in this stage: kept if it is among the slowest.
    pub fn offer(&mut self, us: u64, slow: Slow) {
        if self.capacity == 0 {
            return;
        }
        let request = slow.request;
        if let Some((old, entry)) = self.entries.get_mut(&request) {
            // Another event of a request already ranked: its slowest counts.
            if us > *old {
                self.ranked.remove(&(*old, request));
                self.ranked.insert((us, request));
                *old = us;
                *entry = slow;
            }
            return;
        }
        if self.ranked.len() >= self.capacity {
            match self.ranked.first() {
                Some(&(fastest, _)) if us > fastest => {
                    if let Some((_, out)) = self.ranked.pop_first() {
                        self.entries.remove(&out);
                    }
                }
                _ => return,
            }
        }
        self.ranked.insert((us, request));
        self.entries.insert(request, (us, slow));
    }

    /// The requests kept, slowest first, with their latency in µs.
    pub fn slowest_first(&self) -> Vec<(u64, Slow)> {
        self.ranked
            .iter()
            .rev()
            .filter_map(|(_, request)| self.entries.get(request).copied())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.ranked.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranked.is_empty()
    }
}

/// The slowest requests of every stage that ranks them (`request`,
/// `end_to_end`, `commit_to_notifier`).
#[derive(Debug)]
pub struct Ranking {
    stages: [Slowest; Stage::ALL.len()],
}

impl Ranking {
    /// Keeps the `n` slowest requests per stage (0: none).
    pub fn new(n: usize) -> Ranking {
        Ranking {
            stages: std::array::from_fn(|_| Slowest::new(n)),
        }
    }

    pub fn offer(&mut self, stage: Stage, us: u64, slow: Slow) {
        self.stages[stage.index()].offer(us, slow);
    }

    pub fn stage(&self, stage: Stage) -> &Slowest {
        &self.stages[stage.index()]
    }

    /// The report's list: the most downstream stage with any request
    /// (commit_to_notifier, else end_to_end, else request); `None` when
    /// none has one.
    pub fn summary(&self) -> Option<SlowestSummary> {
        let stage = Stage::ALL
            .into_iter()
            .rev()
            .find(|s| !self.stage(*s).is_empty())?;
        let requests = self
            .stage(stage)
            .slowest_first()
            .into_iter()
            .map(|(us, s)| {
                let (event_id, order) = match s.key {
                    Key::Event(id) => (Some(id), None),
                    Key::Order(id, status) => (s.event_id, Some((id, status.as_str()))),
                };
                SlowRequest {
                    trace_id: s.trace.map(|t| t.trace_id_hex()),
                    ms: us as f64 / 1000.0,
                    t_s: s.intended.as_secs_f64(),
                    request_ms: s.request_us as f64 / 1000.0,
                    event_id,
                    order_id: order.map(|o| o.0),
                    status: order.map(|o| o.1),
                }
            })
            .collect();
        Some(SlowestSummary {
            stage: stage.name(),
            requests,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matcher::OrderStatus;

    fn slow(request: u64) -> Slow {
        Slow {
            request,
            trace: Some(TraceParent::root()),
            key: Key::Event(i64::try_from(request).unwrap() + 1000),
            event_id: None,
            intended: Duration::from_millis(request * 10),
            request_us: 500,
        }
    }

    fn order(s: &Slowest) -> Vec<(u64, u64)> {
        s.slowest_first()
            .into_iter()
            .map(|(us, s)| (us, s.request))
            .collect()
    }

    #[test]
    fn only_the_n_slowest_are_kept_slowest_first() {
        let mut s = Slowest::new(3);
        // 1000 requests with latencies in a scrambled order.
        for r in 0..1000u64 {
            s.offer((r * 7919) % 1000, slow(r));
        }
        assert_eq!(s.len(), 3);
        let kept = order(&s);
        let us: Vec<u64> = kept.iter().map(|k| k.0).collect();
        assert_eq!(us, [999, 998, 997]);
        // Each entry is the request that had that latency.
        for (us, r) in kept {
            assert_eq!((r * 7919) % 1000, us);
        }
        assert_eq!(s.entries.len(), 3, "the map is bounded too");
    }

    #[test]
    fn a_request_counts_once_at_its_slowest_event() {
        let mut s = Slowest::new(2);
        s.offer(100, slow(1));
        s.offer(300, slow(1));
        s.offer(200, slow(1));
        s.offer(150, slow(2));
        s.offer(50, slow(3));
        assert_eq!(order(&s), [(300, 1), (150, 2)]);
        // The entry is the one of the slowest event.
        let mut later = slow(2);
        later.event_id = Some(77);
        s.offer(400, later);
        assert_eq!(order(&s), [(400, 2), (300, 1)]);
        assert_eq!(s.slowest_first()[0].1.event_id, Some(77));
        // A request pushed out comes back when a later event of it is slow.
        s.offer(500, slow(3));
        assert_eq!(order(&s), [(500, 3), (400, 2)]);
    }

    #[test]
    fn ties_keep_the_first_and_zero_keeps_nothing() {
        let mut s = Slowest::new(1);
        s.offer(10, slow(1));
        s.offer(10, slow(2));
        assert_eq!(order(&s), [(10, 1)]);
        let mut none = Slowest::new(0);
        none.offer(10, slow(1));
        assert!(none.is_empty());
    }

    #[test]
    fn the_summary_ranks_by_the_most_downstream_stage() {
        let mut r = Ranking::new(10);
        assert!(r.summary().is_none());
        r.offer(Stage::Request, 9_000, slow(1));
        assert_eq!(r.summary().unwrap().stage, "request");
        let tp = TraceParent::root();
        let matched = Slow {
            request: 2,
            trace: Some(tp),
            key: Key::Order(42, OrderStatus::Paid),
            event_id: Some(17),
            intended: Duration::from_millis(1500),
            request_us: 2_500,
        };
        r.offer(Stage::EndToEnd, 12_345, matched);
        let sum = r.summary().unwrap();
        assert_eq!(sum.stage, "end_to_end");
        let first = &sum.requests[0];
        assert_eq!(first.trace_id.as_deref(), Some(tp.trace_id_hex().as_str()));
        assert_eq!(first.ms, 12.345);
        assert_eq!(first.t_s, 1.5);
        assert_eq!(first.request_ms, 2.5);
        assert_eq!(
            (first.event_id, first.order_id, first.status),
            (Some(17), Some(42), Some("PAID"))
        );
        r.offer(Stage::CommitToNotifier, 1_000, matched);
        assert_eq!(r.summary().unwrap().stage, "commit_to_notifier");

        // sql mode: the key is the event; no trace without the column.
        let mut r = Ranking::new(10);
        r.offer(
            Stage::EndToEnd,
            1,
            Slow {
                trace: None,
                ..slow(5)
            },
        );
        let s = &r.summary().unwrap().requests[0];
        assert_eq!((s.trace_id.as_deref(), s.event_id), (None, Some(1005)));
        assert_eq!((s.order_id, s.status), (None, None));
    }
}
