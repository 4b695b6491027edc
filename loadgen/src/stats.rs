//! Latency histograms, counters and time series of one run.
//!
//! ```text
//!  request done ─┐                          ┌─▶ totals: one HDR histogram per stage
//!  record matched ┼─▶ Stats::record(stage,  ├─▶ buckets: per time-series interval (by the
//!  notifier row ──┘     µs, bucket, measured)│    request's *intended* time), a small histogram
//!                                            │    per stage + sent/ok/error counts
//!                                            └─▶ window: last 5 s by completion time (live p99)
//! ```
//!
//! Every stage is in microseconds, 1 µs .. 60 s; larger values are clamped
//! to 60 s (and so still counted). Totals keep 3 significant figures (the
//! figures in the report are within 0.1 % of the recorded values); the
//! per-interval and live histograms keep 2, which is plenty for a plot and
//! keeps a bucket at about 10 KiB per stage. Only *measured* requests (not
//! warm-up) go into the totals; the time series holds every interval, with
//! warm-up intervals flagged.
//!
//! Intervals are indexed by intended time, so a stall shows up in the
//! seconds whose requests it delayed, not in the second it ended.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Highest trackable latency: 60 s in µs.
pub const MAX_MICROS: u64 = 60_000_000;

/// A measured stretch of an event's way through the pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stage {
    /// Intended start → HTTP response read / INSERT returned.
    Request,
    /// `commit_ts` header → the broker's LogAppendTime, else arrival here.
    CommitToKafka,
    /// `commit_ts` header → arrival in loadgen's consumer.
    CommitToConsumed,
    /// Intended start → arrival in loadgen's consumer.
    EndToEnd,
    /// `commit_ts` header → `notifier_inbox.handled_at`.
    CommitToNotifier,
}

impl Stage {
    pub const ALL: [Stage; 5] = [
        Stage::Request,
        Stage::CommitToKafka,
        Stage::CommitToConsumed,
        Stage::EndToEnd,
        Stage::CommitToNotifier,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Request => "request",
            Stage::CommitToKafka => "commit_to_kafka",
            Stage::CommitToConsumed => "commit_to_consumed",
            Stage::EndToEnd => "end_to_end",
            Stage::CommitToNotifier => "commit_to_notifier",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

fn histogram<T: hdrhistogram::Counter>(sigfig: u8) -> Histogram<T> {
    // Constant, valid bounds (1 ≤ 60e6, sigfig ≤ 5): creation cannot fail.
    Histogram::new_with_bounds(1, MAX_MICROS, sigfig).expect("valid histogram bounds")
}

/// One time-series interval.
#[derive(Debug)]
pub struct Bucket {
    /// Requests intended in this interval that were started.
    pub sent: u64,
    pub ok: u64,
    pub errors: u64,
    hists: [Option<Histogram<u32>>; 5],
}

impl Bucket {
    fn new() -> Bucket {
        Bucket {
            sent: 0,
            ok: 0,
            errors: 0,
            hists: Default::default(),
        }
    }

    pub fn histogram(&self, stage: Stage) -> Option<&Histogram<u32>> {
        self.hists[stage.index()].as_ref()
    }
}

/// Counts of a run besides the latencies.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    /// Requests started, measured phases / warm-up.
    pub sent: u64,
    pub warmup_sent: u64,
    /// Requests answered with success, measured phases / warm-up.
    pub ok: u64,
    pub warmup_ok: u64,
    /// Failed requests, measured phases / warm-up.
    pub errors: u64,
    pub warmup_errors: u64,
    /// Failed requests by kind (`http 500`, `timeout`, ...), measured
    /// phases / warm-up.
    pub errors_by_kind: BTreeMap<String, u64>,
    pub warmup_errors_by_kind: BTreeMap<String, u64>,
    /// Requests that started more than 1 ms after their intended time.
    pub late_starts: u64,
    pub max_start_delay: Duration,
    /// Events committed by successful requests (rows in sql mode with
    /// --rows-per-txn > 1; one per request otherwise).
    pub events_expected: u64,
    /// Records read from the topic, of this run or not.
    pub records_read: u64,
    /// Records matched to an event of this run.
    pub matched: u64,
    /// Records of this run read a second time.
    pub duplicates: u64,
    /// commit_to_kafka measured to the broker's LogAppendTime / to the
    /// arrival here.
    pub kafka_ts_log_append: u64,
    pub kafka_ts_arrival: u64,
    /// Records without a usable `commit_ts` header.
    pub no_commit_ts: u64,
}

/// A ring of per-second histograms by completion time: the live p99.
#[derive(Debug)]
struct Window {
    start: Instant,
    /// (second since start, started requests, request and commit_to_consumed).
    slots: Vec<(u64, u64, [Histogram<u32>; 2])>,
}

/// Seconds the live percentiles look back.
pub const WINDOW_SECS: u64 = 5;

impl Window {
    fn new(start: Instant) -> Window {
        let slots = (0..=WINDOW_SECS)
            .map(|_| (u64::MAX, 0, [histogram(2), histogram(2)]))
            .collect();
        Window { start, slots }
    }

    fn slot(&mut self, now: Instant) -> &mut (u64, u64, [Histogram<u32>; 2]) {
        let sec = now.saturating_duration_since(self.start).as_secs();
        let len = self.slots.len();
        let slot = &mut self.slots[(sec % len as u64) as usize];
        if slot.0 != sec {
            slot.0 = sec;
            slot.1 = 0;
            slot.2.iter_mut().for_each(Histogram::reset);
        }
        slot
    }
}

/// Everything a run measures.
#[derive(Debug)]
pub struct Stats {
    interval: Duration,
    totals: [Histogram<u64>; 5],
    buckets: Vec<Bucket>,
    window: Window,
    pub counters: Counters,
}

impl Stats {
    pub fn new(start: Instant, interval: Duration) -> Stats {
        Stats {
            interval,
            totals: std::array::from_fn(|_| histogram(3)),
            buckets: Vec::new(),
            window: Window::new(start),
            counters: Counters::default(),
        }
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The time-series bucket of a request intended `offset` after the start.
    pub fn bucket_of(&self, offset: Duration) -> usize {
        (offset.as_nanos() / self.interval.as_nanos().max(1)) as usize
    }

    fn bucket(&mut self, index: usize) -> &mut Bucket {
        if self.buckets.len() <= index {
            self.buckets.resize_with(index + 1, Bucket::new);
        }
        &mut self.buckets[index]
    }

    /// A request was started `delay` after its intended time.
    pub fn started(&mut self, bucket: usize, measured: bool, delay: Duration, now: Instant) {
        if measured {
            self.counters.sent += 1;
        } else {
            self.counters.warmup_sent += 1;
        }
        if delay > Duration::from_millis(1) {
            self.counters.late_starts += 1;
        }
        self.counters.max_start_delay = self.counters.max_start_delay.max(delay);
        self.bucket(bucket).sent += 1;
        self.window.slot(now).1 += 1;
    }

    /// A request succeeded; its request-stage latency is recorded.
    pub fn succeeded(&mut self, bucket: usize, measured: bool, micros: u64, now: Instant) {
        if measured {
            self.counters.ok += 1;
        } else {
            self.counters.warmup_ok += 1;
        }
        self.bucket(bucket).ok += 1;
        self.record(Stage::Request, micros, bucket, measured, Some(now));
    }

    /// A request failed with an error of `kind`.
    pub fn failed(&mut self, bucket: usize, measured: bool, kind: String) {
        let by_kind = if measured {
            self.counters.errors += 1;
            &mut self.counters.errors_by_kind
        } else {
            self.counters.warmup_errors += 1;
            &mut self.counters.warmup_errors_by_kind
        };
        *by_kind.entry(kind).or_default() += 1;
        self.bucket(bucket).errors += 1;
    }

    /// Records one latency of `stage` for a request of time-series `bucket`;
    /// `completed` (when it happened) feeds the live window.
    pub fn record(
        &mut self,
        stage: Stage,
        micros: u64,
        bucket: usize,
        measured: bool,
        completed: Option<Instant>,
    ) {
        if measured {
            self.totals[stage.index()].saturating_record(micros);
        }
        self.bucket(bucket).hists[stage.index()]
            .get_or_insert_with(|| histogram(2))
            .saturating_record(micros);
        let live = match stage {
            Stage::Request => Some(0),
            Stage::CommitToConsumed => Some(1),
            _ => None,
        };
        if let (Some(i), Some(at)) = (live, completed) {
            self.window.slot(at).2[i].saturating_record(micros);
        }
    }

    /// The run's histogram of `stage` (measured requests only).
    pub fn total(&self, stage: Stage) -> &Histogram<u64> {
        &self.totals[stage.index()]
    }

    pub fn buckets(&self) -> &[Bucket] {
        &self.buckets
    }

    /// Live figures at `now`: requests started in the last full second,
    /// and p99 (µs) of request and commit_to_consumed over the last
    /// [`WINDOW_SECS`] seconds.
    pub fn live(&mut self, now: Instant) -> Live {
        let sec = now.saturating_duration_since(self.window.start).as_secs();
        let mut merged: [Histogram<u32>; 2] = [histogram(2), histogram(2)];
        let mut last_second = 0;
        for (s, started, hists) in &self.window.slots {
            if *s == u64::MAX || *s > sec || sec - *s >= WINDOW_SECS {
                continue;
            }
            if *s + 1 == sec {
                last_second = *started;
            }
            for (m, h) in merged.iter_mut().zip(hists) {
                // Same bounds: adding cannot fail.
                let _ = m.add(h);
            }
        }
        let p99 = |h: &Histogram<u32>| (!h.is_empty()).then(|| h.value_at_quantile(0.99));
        Live {
            rate_last_second: last_second,
            request_p99: p99(&merged[0]),
            consumed_p99: p99(&merged[1]),
        }
    }
}

/// What the progress line shows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Live {
    pub rate_last_second: u64,
    pub request_p99: Option<u64>,
    pub consumed_p99: Option<u64>,
}

/// `later - earlier` in µs, 0 when negative (clock granularity).
pub fn micros_between(earlier_us: i64, later_us: i64) -> u64 {
    u64::try_from(later_us.saturating_sub(earlier_us)).unwrap_or(0)
}

/// A duration in µs, saturating.
pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_is_counted_but_not_measured() {
        let t0 = Instant::now();
        let mut s = Stats::new(t0, Duration::from_secs(1));
        s.started(0, false, Duration::ZERO, t0);
        s.succeeded(0, false, 5_000, t0);
        s.started(1, true, Duration::from_millis(3), t0);
        s.succeeded(1, true, 7_000, t0);
        s.started(1, true, Duration::ZERO, t0);
        s.failed(1, true, "http 500".into());
        assert_eq!(s.total(Stage::Request).len(), 1);
        assert!(s
            .total(Stage::Request)
            .equivalent(s.total(Stage::Request).max(), 7_000));
        assert_eq!(
            (s.counters.sent, s.counters.ok, s.counters.errors),
            (2, 1, 1)
        );
        assert_eq!((s.counters.warmup_sent, s.counters.warmup_ok), (1, 1));
        assert_eq!(s.counters.late_starts, 1);
        assert_eq!(s.counters.errors_by_kind["http 500"], 1);
        // The time series keeps the warm-up interval.
        assert_eq!(s.buckets()[0].histogram(Stage::Request).unwrap().len(), 1);
        assert_eq!((s.buckets()[1].sent, s.buckets()[1].errors), (2, 1));
    }

    #[test]
    fn values_beyond_the_range_are_clamped_not_lost() {
        let t0 = Instant::now();
        let mut s = Stats::new(t0, Duration::from_secs(1));
        s.record(Stage::EndToEnd, 10 * MAX_MICROS, 0, true, None);
        s.record(Stage::EndToEnd, 0, 0, true, None);
        assert_eq!(s.total(Stage::EndToEnd).len(), 2);
        assert!(s.total(Stage::EndToEnd).max() >= MAX_MICROS);
        assert_eq!(micros_between(10, 5), 0);
        assert_eq!(micros_between(5, 10), 5);
    }

    #[test]
    fn the_live_window_forgets_old_seconds() {
        let t0 = Instant::now();
        let mut s = Stats::new(t0, Duration::from_secs(1));
        s.started(0, true, Duration::ZERO, t0);
        s.succeeded(0, true, 900_000, t0);
        for i in 0..10 {
            s.started(
                0,
                true,
                Duration::ZERO,
                t0 + Duration::from_millis(1000 + i),
            );
            s.succeeded(0, true, 1_000, t0 + Duration::from_millis(1000 + i));
        }
        let live = s.live(t0 + Duration::from_millis(2500));
        assert_eq!(live.rate_last_second, 10);
        assert!(live.request_p99.unwrap() >= 890_000);
        let later = s.live(t0 + Duration::from_secs(5) + Duration::from_millis(500));
        assert!(later.request_p99.unwrap() < 2_000, "{later:?}");
        assert_eq!(s.live(t0 + Duration::from_secs(30)).request_p99, None);
    }
}
