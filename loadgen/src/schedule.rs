//! Open-loop arrivals: when each request is *intended* to start.
//!
//! The run is three phases, each optional:
//!
//! ```text
//!  rate
//!   ▲                         ┌──────────────── steady: --rate for --duration
//!   │                       ╱ │
//!   │                     ╱   │
//!   │ ┌──────────┐      ╱     │
//!   │ │ warm-up  │    ╱ ramp  │
//!   │ │(unmeasured)│╱ linear  │
//!   └─┴──────────┴────────────┴────────────────▶ time
//!     0        warmup   warmup+ramp         total
//! ```
//!
//! With `N(t)` the number of arrivals the rate profile asks for up to time
//! `t` (the integral of the rate), request `i` (0-based) is intended at the
//! `t` where `N(t) = i`: at a constant rate `r` that is exactly `i / r`; in
//! the ramp, where the rate grows linearly, it is the root of a quadratic.
//! Intended times depend on nothing but the index — never on how fast the
//! server answered — which is what makes the load open-loop: a slow server
//! cannot slow the arrivals down and so hide its latency (no coordinated
//! omission). The scheduler (`crate::run`) sleeps until each intended
//! instant, never past it, and latency is measured from that instant.

use std::time::Duration;

/// The arrival-rate profile of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    pub warmup: Duration,
    /// Requests per second during the warm-up.
    pub warmup_rate: f64,
    pub ramp: Duration,
    /// Requests per second at the start of the ramp; it grows linearly to
    /// `rate` at its end.
    pub ramp_from: f64,
    /// Requests per second after the ramp.
    pub rate: f64,
    /// Length of the steady phase.
    pub duration: Duration,
}

/// The part of the run an arrival falls in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Sent and counted, left out of the latency histograms.
    Warmup,
    Ramp,
    Steady,
}

impl Phase {
    /// Whether requests of this phase go into the latency histograms.
    pub fn measured(self) -> bool {
        self != Phase::Warmup
    }
}

/// One request of the schedule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Arrival {
    pub index: u64,
    /// Intended start, from the start of the run.
    pub offset: Duration,
    pub phase: Phase,
}

/// Slack for floating-point counts: `rate × seconds` that should be a whole
/// number may come out a hair above it.
const EPS: f64 = 1e-9;

impl Profile {
    /// Warm-up + ramp + steady.
    pub fn total(&self) -> Duration {
        self.warmup + self.ramp + self.duration
    }

    fn warmup_count(&self) -> f64 {
        self.warmup_rate * self.warmup.as_secs_f64()
    }

    fn ramp_count(&self) -> f64 {
        (self.ramp_from + self.rate) / 2.0 * self.ramp.as_secs_f64()
    }

    fn steady_count(&self) -> f64 {
        self.rate * self.duration.as_secs_f64()
    }

    /// How many requests the whole run sends: the indices `i` with
    /// `i < N(total)`.
    pub fn count(&self) -> u64 {
        arrivals_below(self.warmup_count() + self.ramp_count() + self.steady_count())
    }

    /// How many requests fall in the warm-up.
    pub fn warmup_arrivals(&self) -> u64 {
        arrivals_below(self.warmup_count())
    }

    /// How many requests are intended at or before `offset`.
    pub fn count_until(&self, offset: Duration) -> u64 {
        let offset = offset.min(self.total());
        // N(offset) arrivals are intended before `offset`; index N(offset)
        // itself may be due exactly at it.
        let n = self.cumulative(offset);
        let due = (n + EPS).floor() as u64 + 1;
        due.min(self.count())
    }

    /// `N(t)`: arrivals the profile asks for in `[0, t)`, as a real number.
    pub fn cumulative(&self, t: Duration) -> f64 {
        let t = t.as_secs_f64();
        let w = self.warmup.as_secs_f64();
        let r = self.ramp.as_secs_f64();
        if t <= w {
            return self.warmup_rate * t;
        }
        let s = t - w;
        if s <= r {
            let k = (self.rate - self.ramp_from) / r;
            return self.warmup_count() + self.ramp_from * s + k * s * s / 2.0;
        }
        self.warmup_count() + self.ramp_count() + self.rate * (s - r)
    }

    /// The rate the profile asks for at `t` (requests per second).
    pub fn rate_at(&self, t: Duration) -> f64 {
        if t < self.warmup {
            self.warmup_rate
        } else if t < self.warmup + self.ramp {
            let s = (t - self.warmup).as_secs_f64() / self.ramp.as_secs_f64();
            self.ramp_from + (self.rate - self.ramp_from) * s
        } else {
            self.rate
        }
    }

    /// Request `index`, or `None` past the end of the run.
    pub fn arrival(&self, index: u64) -> Option<Arrival> {
        let i = index as f64;
        let wc = self.warmup_count();
        if i < wc - EPS {
            return Some(Arrival {
                index,
                offset: secs(i / self.warmup_rate),
                phase: Phase::Warmup,
            });
        }
        let rc = self.ramp_count();
        let m = i - wc;
        if m < rc - EPS {
            let a = self.ramp_from;
            let k = (self.rate - a) / self.ramp.as_secs_f64();
            // a·s + k·s²/2 = m, solved in the form that stays exact when
            // k is 0 and does not cancel when it is small.
            let s = if m <= 0.0 {
                0.0
            } else {
                2.0 * m / (a + (a * a + 2.0 * k * m).max(0.0).sqrt())
            };
            return Some(Arrival {
                index,
                offset: self.warmup + secs(s),
                phase: Phase::Ramp,
            });
        }
        let m = (m - rc).max(0.0);
        if m < self.steady_count() - EPS {
            return Some(Arrival {
                index,
                offset: self.warmup + self.ramp + secs(m / self.rate),
                phase: Phase::Steady,
            });
        }
        None
    }

    /// Every arrival, in order.
    pub fn arrivals(&self) -> impl Iterator<Item = Arrival> + '_ {
        (0..).map_while(|i| self.arrival(i))
    }
}

/// The number of whole indices `i ≥ 0` with `i < n`.
fn arrivals_below(n: f64) -> u64 {
    if n <= EPS {
        0
    } else {
        (n - EPS).ceil() as u64
    }
}

/// Seconds to a `Duration`, rounded to the nanosecond.
fn secs(s: f64) -> Duration {
    Duration::from_nanos((s * 1e9).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steady(rate: f64, secs: u64) -> Profile {
        Profile {
            warmup: Duration::ZERO,
            warmup_rate: rate,
            ramp: Duration::ZERO,
            ramp_from: 0.0,
            rate,
            duration: Duration::from_secs(secs),
        }
    }

    #[test]
    fn constant_rate_is_exactly_i_over_rate() {
        let p = steady(100.0, 3);
        let all: Vec<Arrival> = p.arrivals().collect();
        assert_eq!(all.len(), 300);
        assert_eq!(p.count(), 300);
        for (i, a) in all.iter().enumerate() {
            assert_eq!(a.index, i as u64);
            assert_eq!(
                a.offset,
                Duration::from_millis(10 * i as u64),
                "request {i}"
            );
            assert_eq!(a.phase, Phase::Steady);
        }
        // A rate that does not divide a second: rounded to the nanosecond.
        let p = steady(3.0, 2);
        let offsets: Vec<u64> = p.arrivals().map(|a| a.offset.as_nanos() as u64).collect();
        assert_eq!(
            offsets,
            [
                0,
                333_333_333,
                666_666_667,
                1_000_000_000,
                1_333_333_333,
                1_666_666_667
            ]
        );
    }

    #[test]
    fn fractional_counts_round_up() {
        // 2.5 arrivals asked for: indices 0, 1, 2 (at 0 s, 0.4 s, 0.8 s).
        let p = Profile {
            duration: Duration::from_secs(1),
            ..steady(2.5, 0)
        };
        let all: Vec<Duration> = p.arrivals().map(|a| a.offset).collect();
        assert_eq!(
            all,
            [
                Duration::ZERO,
                Duration::from_millis(400),
                Duration::from_millis(800)
            ]
        );
        assert_eq!(p.count(), 3);
    }

    #[test]
    fn warmup_comes_first_then_the_measured_phases() {
        let p = Profile {
            warmup: Duration::from_secs(2),
            warmup_rate: 10.0,
            ..steady(50.0, 1)
        };
        let all: Vec<Arrival> = p.arrivals().collect();
        assert_eq!(all.len(), 20 + 50);
        assert_eq!(p.warmup_arrivals(), 20);
        assert!(all[..20].iter().all(|a| a.phase == Phase::Warmup));
        assert!(all[20..].iter().all(|a| a.phase == Phase::Steady));
        assert_eq!(all[19].offset, Duration::from_millis(1900));
        assert_eq!(all[20].offset, Duration::from_secs(2));
        assert_eq!(all[21].offset, Duration::from_millis(2020));
        assert_eq!(all[69].offset, Duration::from_millis(2980));
    }

    #[test]
    fn a_ramp_from_zero_follows_the_quadratic() {
        // 0 → 100/s over 10 s: N(s) = 5 s², so request i is at sqrt(i/5).
        let p = Profile {
            ramp: Duration::from_secs(10),
            ..steady(100.0, 0)
        };
        assert_eq!(p.count(), 500);
        for a in p.arrivals() {
            let want = (a.index as f64 / 5.0).sqrt();
            let got = a.offset.as_secs_f64();
            assert!(
                (got - want).abs() < 1e-9,
                "request {}: {got} vs {want}",
                a.index
            );
            assert_eq!(a.phase, Phase::Ramp);
        }
    }

    #[test]
    fn a_ramps_rate_increases_linearly() {
        // 10 → 110/s over 10 s, then 2 s steady: per second of the ramp,
        // 15, 25, 35, ... arrivals (the mean rate over that second).
        let p = Profile {
            ramp: Duration::from_secs(10),
            ramp_from: 10.0,
            ..steady(110.0, 2)
        };
        let mut per_second = [0u64; 12];
        for a in p.arrivals() {
            per_second[a.offset.as_secs() as usize] += 1;
        }
        for (sec, n) in per_second.iter().enumerate().take(10) {
            let want = 15.0 + 10.0 * sec as f64;
            assert!(
                (*n as f64 - want).abs() <= 1.0,
                "second {sec}: {n} vs {want}"
            );
        }
        assert_eq!(per_second[10], 110);
        assert_eq!(per_second[11], 110);
        // The instantaneous rate (1 / gap) grows with time, linearly.
        let all: Vec<Arrival> = p.arrivals().collect();
        for w in all.windows(2).filter(|w| w[1].phase == Phase::Ramp) {
            let gap = (w[1].offset - w[0].offset).as_secs_f64();
            let mid = (w[0].offset + w[1].offset).as_secs_f64() / 2.0;
            let want = 10.0 + 10.0 * mid;
            assert!(
                ((1.0 / gap) - want).abs() / want < 0.02,
                "at {mid}s: {} vs {want}",
                1.0 / gap
            );
        }
        // The steady phase picks up exactly where the ramp's integral ends.
        let first_steady = all.iter().find(|a| a.phase == Phase::Steady).unwrap();
        assert_eq!(first_steady.index, 600);
        assert_eq!(first_steady.offset, Duration::from_secs(10));
        assert_eq!(p.rate_at(Duration::from_secs(5)), 60.0);
    }

    #[test]
    fn count_until_counts_due_arrivals() {
        let p = steady(10.0, 5);
        assert_eq!(p.count_until(Duration::ZERO), 1);
        assert_eq!(p.count_until(Duration::from_millis(150)), 2);
        assert_eq!(p.count_until(Duration::from_millis(200)), 3);
        assert_eq!(p.count_until(Duration::from_secs(60)), 50);
    }
}
