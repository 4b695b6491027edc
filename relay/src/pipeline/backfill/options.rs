//! What `--backfill` asks for (`all` or `after:ID`) and how far a
//! backfill got (`/status`, the console).

use std::time::Duration;

/// Which rows `--backfill` delivers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackfillFrom {
    /// Every row of the table.
    All,
    /// Rows with an id greater than this one.
    After(i64),
}

impl BackfillFrom {
    /// The exclusive lower bound of the ids delivered.
    pub(super) fn after(self) -> i64 {
        match self {
            BackfillFrom::All => i64::MIN,
            BackfillFrom::After(id) => id,
        }
    }
}

/// Parses `all` or `after:ID`.
pub fn parse_backfill(text: &str) -> Result<BackfillFrom, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("all") {
        return Ok(BackfillFrom::All);
    }
    match text
        .strip_prefix("after:")
        .map(|id| id.trim().parse::<i64>())
    {
        Some(Ok(id)) => Ok(BackfillFrom::After(id)),
        _ => Err(format!(
            "expected `all` or `after:ID` (rows with a greater id), got {text:?}"
        )),
    }
}

/// Progress, for `/status`, `/metrics` and the console.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct BackfillProgress {
    /// Rows of the snapshot to deliver (id greater than `after_id`).
    pub rows: u64,
    /// Of those, acknowledged by Kafka in this attempt or found there
    /// from an earlier one.
    pub delivered: u64,
    /// Rows found in Kafka from an earlier, interrupted attempt.
    pub found_in_kafka: u64,
    pub after_id: Option<i64>,
    /// 1 for the first attempt, more after interruptions.
    pub attempt: i32,
    pub finished: bool,
}

pub(super) fn log_progress(progress: &BackfillProgress, elapsed: Duration) {
    let rate = progress.delivered as f64 / elapsed.as_secs_f64().max(1e-3);
    let left = progress.rows.saturating_sub(progress.delivered);
    tracing::info!(
        delivered = progress.delivered,
        rows = progress.rows,
        percent = format!(
            "{:.1}",
            100.0 * progress.delivered as f64 / progress.rows.max(1) as f64
        ),
        rows_per_second = rate.round() as u64,
        eta_seconds = (left as f64 / rate.max(1.0)).round() as u64,
        "backfill progress"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_backfill_start() {
        assert_eq!(parse_backfill("all"), Ok(BackfillFrom::All));
        assert_eq!(
            parse_backfill("after:41235"),
            Ok(BackfillFrom::After(41235))
        );
        assert_eq!(parse_backfill(" after: -3 "), Ok(BackfillFrom::After(-3)));
        for bad in ["", "41235", "after:", "after:x", "from:1"] {
            assert!(parse_backfill(bad).is_err(), "{bad:?}");
        }
        assert_eq!(BackfillFrom::All.after(), i64::MIN);
        assert_eq!(BackfillFrom::After(7).after(), 7);
    }
}
