//! The relay's operator commands (`relay slot …`, `relay verify …`) and
//! their options.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::parse_duration;

/// Operator commands; without one, the relay runs.
#[derive(clap::Subcommand, Clone, Debug)]
pub enum Command {
    /// Inspect or drop the replication slot (`--slot`, on `--database-url`).
    Slot {
        #[command(subcommand)]
        action: SlotAction,
    },
    /// Compare the outbox table with the topics (`--topic`, or the routed
    /// ones): events missing from Kafka, present more than once, out of
    /// per-key commit order, and records with no row. Exit status 0 when
    /// there are none, 1 when there are, 2 when the comparison failed.
    Verify {
        /// First outbox id compared (default: the table's smallest).
        #[arg(long)]
        from_id: Option<i64>,
        /// Last outbox id compared (default: the table's largest).
        #[arg(long)]
        to_id: Option<i64>,
        /// Only rows created at or after this time (`--time-column`): an
        /// RFC 3339 time (`2026-12-05T10:00:00Z`) or a duration back from
        /// now (`2h`, `7d`).
        #[arg(long, value_parser = parse_time)]
        since: Option<DateTime<Utc>>,
        /// Only rows created before this time (as `--since`).
        #[arg(long, value_parser = parse_time)]
        until: Option<DateTime<Utc>>,
        /// The outbox column `--since` and `--until` compare.
        #[arg(long, default_value = "created_at")]
        time_column: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// How long to wait for the slot (`--slot`) to confirm every row
        /// compared before reading the topics.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        wait: Duration,
        /// Then produce the missing events from their rows, marked late
        /// (header `late`), except those the slot will still deliver.
        /// Refused while a relay streams the slot.
        #[arg(long)]
        republish_missing: bool,
    },
}

#[derive(clap::Subcommand, Clone, Debug)]
pub enum SlotAction {
    /// Show the slot: plugin, activity, confirmed and restart LSN, retained WAL.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Drop the slot. Every change it has not confirmed is lost to the relay
    /// (a new slot starts at the current WAL position). Refused while a relay
    /// streams it.
    Drop {
        /// Really drop it.
        #[arg(long)]
        yes: bool,
    },
}

/// A point in time: RFC 3339, or a duration back from now.
pub fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(at) = DateTime::parse_from_rfc3339(s.trim()) {
        return Ok(at.with_timezone(&Utc));
    }
    match parse_duration(s) {
        Ok(ago) => chrono::TimeDelta::from_std(ago)
            .ok()
            .and_then(|ago| Utc::now().checked_sub_signed(ago))
            .ok_or_else(|| format!("{s:?} reaches back too far")),
        Err(_) => Err(format!(
            "{s:?} is neither an RFC 3339 time (2026-12-05T10:00:00Z) nor a duration back from now (2h, 7d)"
        )),
    }
}
