//! The PNG: latency over time (top) and the percentile distribution per
//! stage (bottom), both on a log latency axis.
//!
//! ```text
//!  ┌───────────────────────────────────────────────┐
//!  │ latency over time (by intended time)          │  p50 / p99 lines, max as dots,
//!  │  ░warm-up░  request ── commit_to_consumed ──  │  for request and commit_to_consumed
//!  ├───────────────────────────────────────────────┤
//!  │ percentile distribution                       │  x: 0 %, 90 %, 99 %, 99.9 %, ...
//!  │  one line per stage                           │  (the "nines" scale of HdrHistogram plots)
//!  └───────────────────────────────────────────────┘
//! ```
//!
//! plotters draws text with `ab_glyph`, which has no system font lookup: a
//! TrueType font is loaded from `--font` (by default DejaVuSans, Debian
//! package `fonts-dejavu-core`) and registered once per process. Without it
//! the plot fails with an error saying so; the rest of the report is
//! unaffected.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::report::Report;
use crate::stats::Stage;

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error(
        "cannot read the font {path} for the PNG (install the Debian package fonts-dejavu-core, \
         or pass --font PATH to a .ttf file)"
    )]
    FontMissing {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a usable TrueType font")]
    FontInvalid { path: PathBuf },
    #[error("cannot draw {path}: {detail}")]
    Draw { path: PathBuf, detail: String },
}

/// The font registered with plotters, by path: plotters keeps fonts for
/// the life of the process (it wants `&'static` bytes), so each run of
/// `render` in a process uses the first font registered.
static FONT: OnceLock<PathBuf> = OnceLock::new();

fn register_font(path: &Path) -> Result<(), PlotError> {
    if FONT.get().is_some() {
        return Ok(());
    }
    let bytes = std::fs::read(path).map_err(|source| PlotError::FontMissing {
        path: path.to_owned(),
        source,
    })?;
    // Leaked once per process: plotters' font table needs 'static data.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).map_err(|_| {
        PlotError::FontInvalid {
            path: path.to_owned(),
        }
    })?;
    let _ = FONT.set(path.to_owned());
    Ok(())
}

/// Whether `path` holds a readable font (checked at start, to warn early).
pub fn font_readable(path: &Path) -> bool {
    FONT.get().is_some() || std::fs::metadata(path).is_ok_and(|m| m.is_file())
}

const WIDTH: u32 = 1400;
const HEIGHT: u32 = 1000;

fn color(stage: Stage) -> RGBColor {
    match stage {
        Stage::Request => RGBColor(31, 119, 180),
        Stage::CommitToKafka => RGBColor(44, 160, 44),
        Stage::CommitToConsumed => RGBColor(214, 39, 40),
        Stage::EndToEnd => RGBColor(148, 103, 189),
        Stage::CommitToNotifier => RGBColor(255, 127, 14),
    }
}

/// Draws the report's plot into `path` (PNG).
pub fn render(report: &Report, path: &Path, font: &Path) -> Result<(), PlotError> {
    register_font(font)?;
    let draw_err = |e: &dyn std::fmt::Display| PlotError::Draw {
        path: path.to_owned(),
        detail: e.to_string(),
    };
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_err(&e))?;
    let (top, bottom) = root.split_vertically(HEIGHT / 2);
    over_time(report, &top).map_err(|e| draw_err(&e))?;
    distribution(report, &bottom).map_err(|e| draw_err(&e))?;
    root.present().map_err(|e| draw_err(&e))?;
    Ok(())
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;
type DrawResult =
    Result<(), DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>>;

/// Log-axis bounds for values in ms: below the smallest, above the largest.
fn log_bounds(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (mut lo, mut hi) = (f64::MAX, 0f64);
    for v in values {
        let v = v.max(0.001);
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if hi <= 0.0 {
        return None;
    }
    // From a power of ten: plotters labels a log axis from the first power
    // of ten in range, so a partial decade below it would have no labels.
    let lo = 10f64.powf(lo.log10().floor());
    // Data in the lower 70 % of the (log) height: the legend goes above.
    let hi = lo * (hi.max(lo * 10.0) / lo).powf(1.0 / 0.7);
    Some((lo, hi))
}

/// A number with at most three significant digits, no trailing zeros.
fn short(v: f64) -> String {
    let decimals = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else {
        2
    };
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s
    }
}

fn ms_label(v: &f64) -> String {
    if *v >= 1000.0 {
        format!("{}s", short(v / 1000.0))
    } else if *v >= 1.0 {
        format!("{}ms", short(*v))
    } else {
        format!("{}µs", short(v * 1000.0))
    }
}

fn over_time(report: &Report, area: &Area<'_>) -> DrawResult {
    let stages = [Stage::Request, Stage::CommitToConsumed];
    let series = &report.time_series;
    let values = series.iter().flat_map(|b| {
        stages
            .iter()
            .filter_map(|s| b.stages.get(s.name()))
            .flat_map(|st| [st.p50_ms, st.max_ms])
    });
    let title = format!(
        "latency over time (by intended start; {} mode, {}/s)",
        match report.mode {
            crate::config::Mode::Http => "http",
            crate::config::Mode::Sql => "sql",
        },
        report.schedule.rate
    );
    let Some((lo, hi)) = log_bounds(values) else {
        return no_data(area, &title);
    };
    let step = report.schedule.interval_s;
    let end = (series.len() as f64 * step).max(step);
    let mut chart = ChartBuilder::on(area)
        .margin(15)
        .caption(title, ("sans-serif", 22))
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..end, (lo..hi).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("seconds since start")
        .y_desc("latency")
        .y_labels(12)
        .y_label_formatter(&ms_label)
        .label_style(("sans-serif", 14))
        .draw()?;
    if report.schedule.warmup_s > 0.0 {
        let shade = RGBColor(220, 220, 220).mix(0.5).filled();
        chart
            .draw_series([Rectangle::new(
                [(0.0, lo), (report.schedule.warmup_s, hi)],
                shade,
            )])?
            .label("warm-up (not measured)")
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 16, y + 6)], shade));
    }
    for stage in stages {
        let c = color(stage);
        let points = |f: fn(&crate::report::IntervalStage) -> f64| {
            series
                .iter()
                .filter_map(move |b| {
                    b.stages
                        .get(stage.name())
                        .map(|st| (b.t_s + step / 2.0, f(st).max(0.001)))
                })
                .collect::<Vec<_>>()
        };
        let p50 = points(|s| s.p50_ms);
        if p50.is_empty() {
            continue;
        }
        let light = c.mix(0.45);
        chart
            .draw_series(LineSeries::new(p50, light.stroke_width(2)))?
            .label(format!("{} p50", stage.name()))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], light.stroke_width(2)));
        chart
            .draw_series(LineSeries::new(points(|s| s.p99_ms), c.stroke_width(3)))?
            .label(format!("{} p99", stage.name()))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], c.stroke_width(3)));
        chart
            .draw_series(
                points(|s| s.max_ms)
                    .into_iter()
                    .map(|p| Circle::new(p, 3, c.filled())),
            )?
            .label(format!("{} max", stage.name()))
            .legend(move |(x, y)| Circle::new((x + 8, y), 3, c.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .label_font(("sans-serif", 13))
        .draw()?;
    Ok(())
}

/// x of a percentile on the nines scale: 0 → 0, 90 → 1, 99 → 2, ...
fn nines(percentile: f64) -> f64 {
    let tail = (1.0 - percentile / 100.0).max(1e-9);
    -tail.log10()
}

fn nines_label(x: &f64) -> String {
    let p = 100.0 * (1.0 - 10f64.powf(-x));
    let s = format!("{p:.6}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}%")
}

fn distribution(report: &Report, area: &Area<'_>) -> DrawResult {
    let title = "percentile distribution (measured requests)";
    let values = report
        .stages
        .values()
        .flat_map(|s| s.distribution.iter().map(|p| p.ms));
    let Some((lo, hi)) = log_bounds(values) else {
        return no_data(area, title);
    };
    // The max is drawn one step past the last finite percentile.
    let last_x = report
        .stages
        .values()
        .filter_map(|s| {
            s.distribution
                .iter()
                .rev()
                .nth(1)
                .map(|p| nines(p.percentile))
        })
        .fold(0f64, f64::max);
    let x_end = (last_x + 0.5).ceil().max(2.0);
    let mut chart = ChartBuilder::on(area)
        .margin(15)
        .caption(title, ("sans-serif", 22))
        .x_label_area_size(40)
        .y_label_area_size(70)
        // A hair past x_end so its tick is drawn too.
        .build_cartesian_2d((0f64..x_end + 1e-6).step(1.0), (lo..hi).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("percentile (the last point of each line is the max)")
        .y_desc("latency")
        .x_label_formatter(&nines_label)
        .y_labels(12)
        .y_label_formatter(&ms_label)
        .label_style(("sans-serif", 14))
        .draw()?;
    for stage in Stage::ALL {
        let Some(summary) = report.stages.get(stage.name()) else {
            continue;
        };
        let c = color(stage);
        let n = summary.distribution.len();
        let pts: Vec<(f64, f64)> = summary
            .distribution
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let x = if i + 1 == n && n > 1 {
                    // The max: just past the last percentile.
                    nines(summary.distribution[n - 2].percentile) + 0.3
                } else {
                    nines(p.percentile)
                };
                (x.min(x_end), p.ms.max(0.001))
            })
            .collect();
        let label = match (stage, report.kafka.as_ref().map(|k| k.commit_to_kafka_end)) {
            // Without LogAppendTime both end at the arrival here: the
            // lines coincide.
            (Stage::CommitToKafka, Some("consumer_arrival")) => format!(
                "{} (n={}; to arrival, = commit_to_consumed)",
                stage.name(),
                summary.count
            ),
            _ => format!("{} (n={})", stage.name(), summary.count),
        };
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(3)))?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], c.stroke_width(3)));
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 2, c.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .label_font(("sans-serif", 13))
        .draw()?;
    Ok(())
}

fn no_data(area: &Area<'_>, title: &str) -> DrawResult {
    area.draw(&Text::new(
        format!("{title}: no data"),
        (20, 20),
        ("sans-serif", 20).into_font(),
    ))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nines_scale() {
        assert!((nines(0.0) - 0.0).abs() < 1e-12);
        assert!((nines(90.0) - 1.0).abs() < 1e-9);
        assert!((nines(99.9) - 3.0).abs() < 1e-9);
        assert_eq!(nines_label(&0.0), "0%");
        assert_eq!(nines_label(&2.0), "99%");
        assert_eq!(nines_label(&4.0), "99.99%");
        assert_eq!(ms_label(&2.0), "2ms");
        assert_eq!(ms_label(&0.05), "50µs");
        assert_eq!(ms_label(&1500.0), "1.5s");
        assert_eq!(ms_label(&12.345), "12.3ms");
    }
}
