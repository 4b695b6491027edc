//! The result of a run: a table for the terminal and the same figures, plus
//! time series and full percentile distributions, as JSON.
//!
//! ```text
//!  Stats (histograms, counters, buckets) + RunInfo ──▶ Report ──┬─▶ Display: the table (stdout)
//!                                                               ├─▶ JSON file (--json)
//!                                                               └─▶ plot::render (--png)
//! ```
//!
//! Latencies are in milliseconds with µs resolution. Percentiles come from
//! the HDR histograms (3 significant figures): a reported value is the
//! highest value equivalent to the recorded one, at most 0.1 % above it.
//! The distribution is sampled on a "nines" scale (0, 90, 99, 99.9, ... %,
//! five steps per decade) up to the resolution the count allows, then max.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::config::Mode;
use crate::schedule::{Phase, Profile};
use crate::stats::{Stage, Stats};

/// Everything a run reports (and writes as JSON).
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub loadgen_version: &'static str,
    pub mode: Mode,
    /// Wall-clock start of the schedule (RFC 3339).
    pub started_at: String,
    /// From the start of the schedule to the end of the drain.
    pub elapsed_s: f64,
    /// Ctrl-C or SIGTERM ended the schedule early.
    pub stopped_early: bool,
    pub schedule: ScheduleSummary,
    pub requests: Requests,
    /// Absent with --no-kafka.
    pub kafka: Option<KafkaSummary>,
    /// Present with --notifier-inbox.
    pub notifier: Option<NotifierSummary>,
    /// Per stage, measured requests only (no warm-up). Stages without a
    /// single value are left out.
    pub stages: BTreeMap<&'static str, StageSummary>,
    /// One entry per interval of intended time, warm-up included.
    pub time_series: Vec<IntervalSummary>,
    /// The `--slowest` slowest measured requests with their trace ids;
    /// absent when no request was measured (or with `--slowest 0`).
    pub slowest: Option<SlowestSummary>,
    /// Problems that make the exit status non-zero.
    pub findings: Vec<String>,
    /// --json or --png that could not be written (not in the JSON).
    #[serde(skip)]
    pub output_errors: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ScheduleSummary {
    pub target: String,
    pub topic: Option<String>,
    pub rate: f64,
    pub warmup_s: f64,
    pub warmup_rate: f64,
    pub ramp_s: f64,
    pub ramp_from: f64,
    pub duration_s: f64,
    pub max_in_flight: usize,
    pub request_timeout_s: f64,
    pub interval_s: f64,
    pub status_change_ratio: Option<f64>,
    pub rows_per_txn: Option<usize>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Requests {
    /// Measured requests the schedule asked for (ramp + steady).
    pub scheduled: u64,
    /// Measured requests started, succeeded, failed.
    pub sent: u64,
    pub ok: u64,
    pub errors: u64,
    pub errors_by_kind: BTreeMap<String, u64>,
    /// Requests due before the stop that never started (waiting for a slot
    /// when Ctrl-C came): their latency is unknown.
    pub not_sent: u64,
    /// Started more than 1 ms after their intended time (all phases).
    pub late_starts: u64,
    pub max_start_delay_ms: f64,
    /// Mean measured rate the schedule asked for, and the rate achieved
    /// (measured requests started / time from the end of the warm-up to
    /// the last start or the end of the schedule).
    pub requested_rate: f64,
    pub achieved_rate: f64,
    pub warmup: WarmupCounts,
}

#[derive(Clone, Debug, Serialize)]
pub struct WarmupCounts {
    pub sent: u64,
    pub ok: u64,
    pub errors: u64,
    pub errors_by_kind: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct KafkaSummary {
    /// Events committed by successful requests (warm-up included).
    pub events_expected: u64,
    pub records_read: u64,
    pub matched: u64,
    /// Events whose record did not arrive within the drain timeout.
    pub unmatched: u64,
    pub duplicates: u64,
    /// What commit_to_kafka was measured to: `log_append_time` (the
    /// broker's timestamp), `consumer_arrival`, or `mixed`.
    pub commit_to_kafka_end: &'static str,
    pub log_append_time_records: u64,
    pub consumer_arrival_records: u64,
    pub records_without_commit_ts: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct NotifierSummary {
    /// Matched events looked up in notifier_inbox.
    pub expected: u64,
    pub handled: u64,
    /// Not in notifier_inbox when the drain timeout passed.
    pub missing: u64,
    pub note: &'static str,
}

pub const NOTIFIER_NOTE: &str = "handled_at is now() of the notifier's transaction, \
i.e. when it began handling the record (before the email was sent)";

#[derive(Clone, Debug, Serialize)]
pub struct StageSummary {
    pub count: u64,
    pub min_ms: f64,
    pub mean_ms: f64,
    pub stdev_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub distribution: Vec<Point>,
}

/// One point of a percentile distribution.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Point {
    pub percentile: f64,
    pub ms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct IntervalSummary {
    /// Start of the interval, seconds from the start of the schedule.
    pub t_s: f64,
    pub phase: Phase,
    pub sent: u64,
    pub ok: u64,
    pub errors: u64,
    pub stages: BTreeMap<&'static str, IntervalStage>,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct IntervalStage {
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// The slowest requests of the run (see [`crate::slowest`]).
#[derive(Clone, Debug, Serialize)]
pub struct SlowestSummary {
    /// The stage they are ranked by: the most downstream one measured —
    /// `commit_to_notifier` (with --notifier-inbox), else `end_to_end`,
    /// else (with --no-kafka) `request`.
    pub stage: &'static str,
    /// Slowest first.
    pub requests: Vec<SlowRequest>,
}

/// One of the slowest requests.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SlowRequest {
    /// The trace id of its `traceparent` (32 hex digits), the one on its
    /// records' `traceparent` header; null when it carried none (sql mode
    /// on an outbox without a `traceparent` column).
    pub trace_id: Option<String>,
    /// Its latency in the ranking stage.
    pub ms: f64,
    /// Its intended start, seconds from the start of the schedule.
    pub t_s: f64,
    /// Its request-stage latency.
    pub request_ms: f64,
    /// The outbox id of its (slowest) record: the `event_id` header; null
    /// when no record was read (the request stage).
    pub event_id: Option<i64>,
    /// http mode: the order and the status its event announces.
    pub order_id: Option<i64>,
    pub status: Option<&'static str>,
}

/// What the run knows besides [`Stats`].
pub struct RunInfo {
    pub mode: Mode,
    pub started_at: String,
    pub elapsed: Duration,
    pub stopped_early: bool,
    pub profile: Profile,
    pub summary: ScheduleSummary,
    /// From the end of the warm-up to the last start (or the schedule's end).
    pub measured_sending: Duration,
    pub not_sent: u64,
    pub kafka: Option<(u64, Vec<String>)>,
    pub notifier: Option<NotifierSummary>,
    pub slowest: Option<SlowestSummary>,
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// The percentile distribution of `h` on a nines scale.
pub fn distribution<T: hdrhistogram::Counter>(h: &Histogram<T>) -> Vec<Point> {
    const STEPS_PER_DECADE: i32 = 5;
    let mut out = Vec::new();
    if h.is_empty() {
        return out;
    }
    let n = h.len() as f64;
    for k in 0..=(6 * STEPS_PER_DECADE) {
        let tail = 10f64.powf(-f64::from(k) / f64::from(STEPS_PER_DECADE));
        // Beyond 1/count the quantiles are all the max.
        if tail * n < 1.0 - 1e-9 {
            break;
        }
        let q = 1.0 - tail;
        out.push(Point {
            percentile: q * 100.0,
            ms: ms(h.value_at_quantile(q)),
        });
    }
    out.push(Point {
        percentile: 100.0,
        ms: ms(h.max()),
    });
    out
}

fn stage_summary(h: &Histogram<u64>) -> StageSummary {
    StageSummary {
        count: h.len(),
        min_ms: ms(h.min()),
        mean_ms: h.mean() / 1000.0,
        stdev_ms: h.stdev() / 1000.0,
        p50_ms: ms(h.value_at_quantile(0.50)),
        p90_ms: ms(h.value_at_quantile(0.90)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        p999_ms: ms(h.value_at_quantile(0.999)),
        max_ms: ms(h.max()),
        distribution: distribution(h),
    }
}

impl Report {
    pub fn build(stats: &Stats, info: RunInfo) -> Report {
        let c = &stats.counters;
        let stages = Stage::ALL
            .iter()
            .filter(|s| !stats.total(**s).is_empty())
            .map(|s| (s.name(), stage_summary(stats.total(*s))))
            .collect();
        let interval = stats.interval();
        let time_series = stats
            .buckets()
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let start = interval * i as u32;
                let phase = if start < info.profile.warmup {
                    Phase::Warmup
                } else if start < info.profile.warmup + info.profile.ramp {
                    Phase::Ramp
                } else {
                    Phase::Steady
                };
                let stages = Stage::ALL
                    .iter()
                    .filter_map(|s| {
                        let h = b.histogram(*s)?;
                        Some((
                            s.name(),
                            IntervalStage {
                                count: h.len(),
                                p50_ms: ms(h.value_at_quantile(0.5)),
                                p99_ms: ms(h.value_at_quantile(0.99)),
                                max_ms: ms(h.max()),
                            },
                        ))
                    })
                    .collect();
                IntervalSummary {
                    t_s: start.as_secs_f64(),
                    phase,
                    sent: b.sent,
                    ok: b.ok,
                    errors: b.errors,
                    stages,
                }
            })
            .collect();
        let p = &info.profile;
        let measured_scheduled = p.count() - p.warmup_arrivals();
        let measured_nominal = p.ramp + p.duration;
        let requested_rate = if measured_nominal.is_zero() {
            0.0
        } else {
            measured_scheduled as f64 / measured_nominal.as_secs_f64()
        };
        let achieved_rate = if info.measured_sending.is_zero() {
            0.0
        } else {
            c.sent as f64 / info.measured_sending.as_secs_f64()
        };
        let mut findings = Vec::new();
        let kafka = info.kafka.map(|(unmatched, sample)| {
            if unmatched > 0 {
                findings.push(format!(
                    "{unmatched} of {} events committed by successful requests never reached \
                     the topic within the drain timeout (e.g. {})",
                    c.events_expected,
                    sample.join(", ")
                ));
            }
            let end = match (c.kafka_ts_log_append, c.kafka_ts_arrival) {
                (0, _) => "consumer_arrival",
                (_, 0) => "log_append_time",
                _ => "mixed",
            };
            KafkaSummary {
                events_expected: c.events_expected,
                records_read: c.records_read,
                matched: c.matched,
                unmatched,
                duplicates: c.duplicates,
                commit_to_kafka_end: end,
                log_append_time_records: c.kafka_ts_log_append,
                consumer_arrival_records: c.kafka_ts_arrival,
                records_without_commit_ts: c.no_commit_ts,
            }
        });
        if let Some(n) = &info.notifier {
            if n.missing > 0 {
                findings.push(format!(
                    "{} of {} events were not handled by the notifier (no notifier_inbox row) \
                     within the drain timeout",
                    n.missing, n.expected
                ));
            }
        }
        Report {
            loadgen_version: env!("CARGO_PKG_VERSION"),
            mode: info.mode,
            started_at: info.started_at,
            elapsed_s: info.elapsed.as_secs_f64(),
            stopped_early: info.stopped_early,
            schedule: info.summary,
            requests: Requests {
                scheduled: measured_scheduled,
                sent: c.sent,
                ok: c.ok,
                errors: c.errors,
                errors_by_kind: c.errors_by_kind.clone(),
                not_sent: info.not_sent,
                late_starts: c.late_starts,
                max_start_delay_ms: c.max_start_delay.as_secs_f64() * 1000.0,
                requested_rate,
                achieved_rate,
                warmup: WarmupCounts {
                    sent: c.warmup_sent,
                    ok: c.warmup_ok,
                    errors: c.warmup_errors,
                    errors_by_kind: c.warmup_errors_by_kind.clone(),
                },
            },
            kafka,
            notifier: info.notifier,
            stages,
            time_series,
            slowest: info.slowest,
            findings,
            output_errors: Vec::new(),
        }
    }

    /// Whether the run found no lost events.
    pub fn passed(&self) -> bool {
        self.findings.is_empty()
    }

    pub fn to_json(&self) -> String {
        // Plain data (strings, numbers, maps with string keys): cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

/// How many of the slowest requests the table shows.
const SLOWEST_SHOWN: usize = 3;

fn secs(s: f64) -> String {
    if s.fract() == 0.0 {
        format!("{s:.0}s")
    } else {
        format!("{s:.3}s")
    }
}

/// ` (http 500: 3, timeout: 1)`, or nothing.
fn kinds(by_kind: &BTreeMap<String, u64>) -> String {
    if by_kind.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = by_kind.iter().map(|(k, n)| format!("{k}: {n}")).collect();
    format!(" ({})", parts.join(", "))
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.schedule;
        let mode = match self.mode {
            Mode::Http => "http",
            Mode::Sql => "sql",
        };
        write!(f, "loadgen {mode} → {}", s.target)?;
        if let Some(t) = &s.topic {
            write!(f, ", records from {t}")?;
        }
        writeln!(f)?;
        write!(f, "schedule:  {}/s for {}", s.rate, secs(s.duration_s))?;
        if s.ramp_s > 0.0 {
            write!(
                f,
                " after a ramp {}→{}/s over {}",
                s.ramp_from,
                s.rate,
                secs(s.ramp_s)
            )?;
        }
        if s.warmup_s > 0.0 {
            write!(
                f,
                ", warm-up {} at {}/s (not measured)",
                secs(s.warmup_s),
                s.warmup_rate
            )?;
        }
        writeln!(
            f,
            "; max {} in flight{}",
            s.max_in_flight,
            if self.stopped_early {
                "; STOPPED EARLY"
            } else {
                ""
            }
        )?;
        let r = &self.requests;
        write!(
            f,
            "requests:  {} scheduled, {} sent, {} ok, {} errors",
            r.scheduled, r.sent, r.ok, r.errors
        )?;
        write!(f, "{}", kinds(&r.errors_by_kind))?;
        if r.not_sent > 0 {
            write!(f, ", {} due but never sent", r.not_sent)?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "rate:      requested {:.1}/s, achieved {:.1}/s; {} late starts (> 1 ms after intended, max {:.3} ms)",
            r.requested_rate, r.achieved_rate, r.late_starts, r.max_start_delay_ms
        )?;
        if r.warmup.sent > 0 {
            writeln!(
                f,
                "warm-up:   {} sent, {} ok, {} errors{} (left out of the latencies)",
                r.warmup.sent,
                r.warmup.ok,
                r.warmup.errors,
                kinds(&r.warmup.errors_by_kind)
            )?;
        }
        if let Some(k) = &self.kafka {
            writeln!(
                f,
                "kafka:     {} events expected, {} matched, {} UNMATCHED, {} duplicates, {} records read; \
                 commit_to_kafka ends at {}",
                k.events_expected,
                k.matched,
                k.unmatched,
                k.duplicates,
                k.records_read,
                k.commit_to_kafka_end.replace('_', " ")
            )?;
        }
        if let Some(n) = &self.notifier {
            writeln!(
                f,
                "notifier:  {} handled of {}, {} missing ({})",
                n.handled, n.expected, n.missing, n.note
            )?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "{:<20} {:>9} {:>10} {:>10} {:>10} {:>10} {:>10}   (ms)",
            "stage", "count", "p50", "p90", "p99", "p99.9", "max"
        )?;
        for stage in Stage::ALL {
            let Some(st) = self.stages.get(stage.name()) else {
                continue;
            };
            writeln!(
                f,
                "{:<20} {:>9} {:>10.3} {:>10.3} {:>10.3} {:>10.3} {:>10.3}",
                stage.name(),
                st.count,
                st.p50_ms,
                st.p90_ms,
                st.p99_ms,
                st.p999_ms,
                st.max_ms
            )?;
        }
        if let Some(slow) = self.slowest.as_ref().filter(|s| !s.requests.is_empty()) {
            writeln!(
                f,
                "\nslowest by {} (trace ids; {} in --json):",
                slow.stage,
                slow.requests.len()
            )?;
            for r in slow.requests.iter().take(SLOWEST_SHOWN) {
                write!(
                    f,
                    "{:>30.3}   {}",
                    r.ms,
                    r.trace_id.as_deref().unwrap_or("(no trace context)")
                )?;
                match (r.order_id, r.status, r.event_id) {
                    (Some(order), Some(status), _) => write!(f, "  order {order} {status}")?,
                    (_, _, Some(event)) => write!(f, "  event {event}")?,
                    _ => {}
                }
                writeln!(f, "  at {:.3}s", r.t_s)?;
            }
        }
        for finding in &self.findings {
            writeln!(f, "\nFINDING: {finding}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_distribution_walks_the_nines_to_the_max() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        for v in 1..=10_000u64 {
            h.record(v * 10).unwrap();
        }
        let d = distribution(&h);
        assert_eq!(d[0].percentile, 0.0);
        assert!(d.iter().any(|p| (p.percentile - 99.0).abs() < 1e-9));
        assert!(d.iter().any(|p| (p.percentile - 99.99).abs() < 1e-9));
        assert!(!d
            .iter()
            .any(|p| p.percentile > 99.99 && p.percentile < 100.0));
        assert_eq!(d.last().unwrap().percentile, 100.0);
        assert!((d.last().unwrap().ms - 100.0).abs() < 0.1);
        assert!(d.windows(2).all(|w| w[0].ms <= w[1].ms));
    }

    fn info(slowest: Option<SlowestSummary>) -> RunInfo {
        let profile = Profile {
            warmup: Duration::ZERO,
            warmup_rate: 0.0,
            ramp: Duration::ZERO,
            ramp_from: 0.0,
            rate: 10.0,
            duration: Duration::from_secs(1),
        };
        RunInfo {
            mode: Mode::Http,
            started_at: "2026-01-01T00:00:00.000000Z".into(),
            elapsed: Duration::from_secs(2),
            stopped_early: false,
            profile,
            summary: ScheduleSummary {
                target: "http://127.0.0.1:8080/".into(),
                topic: Some("t".into()),
                rate: 10.0,
                warmup_s: 0.0,
                warmup_rate: 0.0,
                ramp_s: 0.0,
                ramp_from: 0.0,
                duration_s: 1.0,
                max_in_flight: 10,
                request_timeout_s: 10.0,
                interval_s: 1.0,
                status_change_ratio: Some(0.5),
                rows_per_txn: None,
            },
            measured_sending: Duration::from_secs(1),
            not_sent: 0,
            kafka: Some((0, Vec::new())),
            notifier: None,
            slowest,
        }
    }

    #[test]
    fn the_json_and_the_table_name_the_slowest_requests_trace_ids() {
        let stats = Stats::new(std::time::Instant::now(), Duration::from_secs(1));
        let slow = |trace: &str, ms: f64| SlowRequest {
            trace_id: Some(trace.into()),
            ms,
            t_s: 0.25,
            request_ms: 3.5,
            event_id: Some(17),
            order_id: Some(42),
            status: Some("PAID"),
        };
        let a = "4bf92f3577b34da6a3ce929d0e0e4736";
        let others: Vec<String> = (0..4).map(|i| format!("{i:032x}")).collect();
        let mut requests = vec![slow(a, 812.5)];
        requests.extend(others.iter().map(|t| slow(t, 10.0)));
        let report = Report::build(
            &stats,
            info(Some(SlowestSummary {
                stage: "end_to_end",
                requests,
            })),
        );
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        let slowest = &json["slowest"];
        assert_eq!(slowest["stage"], "end_to_end");
        let first = &slowest["requests"][0];
        assert_eq!(first["trace_id"], a);
        assert_eq!(first["ms"], 812.5);
        assert_eq!(first["request_ms"], 3.5);
        assert_eq!(first["t_s"], 0.25);
        assert_eq!(first["event_id"], 17);
        assert_eq!(first["order_id"], 42);
        assert_eq!(first["status"], "PAID");
        assert_eq!(slowest["requests"].as_array().unwrap().len(), 5);

        // The table shows the first few, with the full trace id.
        let table = report.to_string();
        assert!(table.contains("slowest by end_to_end"), "{table}");
        assert!(table.contains(a), "{table}");
        assert!(table.contains("order 42 PAID"), "{table}");
        assert!(table.contains(&others[1]), "{table}");
        assert!(!table.contains(&others[3]), "only a few: {table}");

        // Nothing measured: null in the JSON, nothing in the table.
        let report = Report::build(&stats, info(None));
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert!(json["slowest"].is_null(), "{}", json["slowest"]);
        assert!(!report.to_string().contains("slowest"));
    }
}
