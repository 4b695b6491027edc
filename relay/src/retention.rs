//! Retention: deletes outbox rows that were delivered and are older than
//! `--retention`, in small batches on an ordinary SQL connection, so the
//! table does not grow forever. Off unless the operator sets it.
//!
//! Which rows are delivered: the slot's `confirmed_flush_lsn` says that
//! every transaction committed before it reached Kafka, but a row does not
//! carry its commit LSN. So every `--retention-interval` the task takes a
//! *watermark*: the oldest transaction id still running (the snapshot's
//! xmin, `w`) and then the WAL insert position (`L`). Every transaction id
//! below `w` had finished when the snapshot was taken, so its commit record
//! was already written, below `L`. Once the slot's confirmed position
//! reaches `L`, every row whose `xmin` precedes `w` was delivered:
//!
//! ```text
//!  tick:  watermark (w, L) ──▶ queue ──▶ confirmed_flush_lsn ≥ L? ─▶ deletable: xmin before w
//!         DELETE … WHERE created_at < now() - retention AND xmin before w   (batches, SKIP LOCKED)
//! ```
//!
//! Never deleted: a row of a transaction still running or committed after
//! the newest confirmed watermark, a row younger than the retention, any
//! row while the slot's position does not move (relay stopped, Kafka down).
//! Deletes are not published (`outbox_pub` publishes inserts only). Only
//! the streaming relay deletes; a standby leaves it to the active one.
//!
//! `xmin` is compared by `age()`, which wraps after 2^31 transactions: a
//! watermark older than [`MAX_WATERMARK_AGE`] transactions is not used
//! (nothing is deleted until a newer one is confirmed).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::RelayError;
use crate::http::{RelayState, Shared};
use crate::lsn::Lsn;
use crate::replication::{self, ReplicationError};

/// Watermarks kept while the slot's position does not reach them (one per
/// tick: an hour at the default interval); when full, no new one is taken
/// until the oldest are confirmed.
const MAX_WATERMARKS: usize = 360;

/// Watermarks older than this many transactions are not used (`age()`
/// wraps at 2^31).
pub const MAX_WATERMARK_AGE: i32 = 1_000_000_000;

/// Batches deleted per tick at most, so one tick never runs for long.
const MAX_BATCHES_PER_TICK: usize = 100;

/// A point below which every committed row was delivered once the slot's
/// confirmed position reaches `lsn`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Watermark {
    /// The snapshot's xmin (a 64-bit transaction id).
    xmin: u64,
    /// The WAL insert position read after the snapshot.
    lsn: Lsn,
}

/// Fails when the table has no `created_at` timestamp column: retention
/// needs the rows' age.
pub async fn check_table(client: &Client, table: &str) -> Result<(), RelayError> {
    let row = client
        .query_opt(
            "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a \
              WHERE a.attrelid = to_regclass($1) AND a.attname = 'created_at' AND NOT a.attisdropped",
            &[&table],
        )
        .await
        .map_err(|e| ReplicationError::from_sql("reading the outbox table's columns", e))?;
    match row.map(|r| r.get::<_, String>(0)) {
        Some(t) if t.starts_with("timestamp") => Ok(()),
        found => Err(RelayError::RetentionTable {
            table: table.to_owned(),
            found: found.unwrap_or_else(|| "no such column".to_owned()),
        }),
    }
}

/// Deletes delivered rows older than `cfg.retention` every
/// `cfg.retention_interval` until `stop`.
pub async fn run(cfg: Config, shared: Arc<Shared>, stop: CancellationToken) {
    let Ok(params) = replication::connect_params(&cfg.database_url) else {
        return;
    };
    let (schema, table) = cfg.table_parts();
    let table = format!(
        "{}.{}",
        replication::quote_ident(&schema),
        replication::quote_ident(&table)
    );
    let mut task = Retention {
        delete_sql: format!(
            "WITH doomed AS (
                 SELECT ctid FROM {table}
                  WHERE created_at < now() - make_interval(secs => $1)
                    AND age(xmin) > age($2::text::xid)
                    AND age($2::text::xid) < $4
                  LIMIT $3
                  FOR UPDATE SKIP LOCKED)
             DELETE FROM {table} t USING doomed WHERE t.ctid = doomed.ctid"
        ),
        oldest_sql: format!(
            "SELECT extract(epoch FROM now() - created_at)::float8 FROM {table} \
              ORDER BY id LIMIT 1"
        ),
        slot: cfg.slot.clone(),
        retention: cfg.retention,
        batch: i64::from(cfg.retention_batch),
        watermarks: VecDeque::new(),
        usable: None,
    };
    shared
        .metrics
        .retention_seconds
        .set(cfg.retention.as_secs_f64());
    tracing::info!(%table, retention = ?cfg.retention, interval = ?cfg.retention_interval,
        "retention on: delivered outbox rows older than the retention are deleted");
    let mut ticker = tokio::time::interval(cfg.retention_interval.max(Duration::from_millis(10)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sql = replication::LazySql::new(params);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if shared.snapshot().state != RelayState::Streaming {
            continue;
        }
        let c = match sql.get().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "retention: cannot connect");
                continue;
            }
        };
        let round = task.tick(c, &shared, &stop).await;
        match round {
            Ok(0) => {}
            Ok(deleted) => {
                tracing::debug!(deleted, "retention: delivered outbox rows deleted")
            }
            Err(e) => {
                tracing::warn!(error = %e, "retention failed; reconnecting");
                sql.reset();
            }
        }
    }
}

struct Retention {
    /// The batch delete and the oldest row's age, on the quoted,
    /// schema-qualified table.
    delete_sql: String,
    oldest_sql: String,
    slot: String,
    retention: Duration,
    batch: i64,
    /// Taken, not yet confirmed, oldest first.
    watermarks: VecDeque<Watermark>,
    /// The newest confirmed one.
    usable: Option<Watermark>,
}

impl Retention {
    /// One round: a new watermark, the confirmed ones, the deletes, the
    /// oldest row's age. Returns the rows deleted.
    async fn tick(
        &mut self,
        c: &Client,
        shared: &Shared,
        stop: &CancellationToken,
    ) -> Result<u64, tokio_postgres::Error> {
        if self.watermarks.len() < MAX_WATERMARKS {
            // One statement: the snapshot is taken before the LSN is read.
            let row = c
                .query_one(
                    "SELECT pg_snapshot_xmin(pg_current_snapshot())::text, \
                            pg_current_wal_insert_lsn()::text",
                    &[],
                )
                .await?;
            let (xmin, lsn): (String, String) = (row.get(0), row.get(1));
            if let (Ok(xmin), Ok(lsn)) = (xmin.parse(), lsn.parse()) {
                self.watermarks.push_back(Watermark { xmin, lsn });
            }
        }
        let confirmed: Option<Lsn> = c
            .query_opt(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot],
            )
            .await?
            .and_then(|r| r.get::<_, Option<String>>(0))
            .and_then(|s| s.parse().ok());
        if let Some(confirmed) = confirmed {
            self.usable = confirmed_watermark(&mut self.watermarks, confirmed).or(self.usable);
        }
        let mut deleted = 0;
        if let Some(w) = self.usable {
            // The 32-bit xid of the watermark, for age().
            let xid = (w.xmin % (1 << 32)) as i64;
            for _ in 0..MAX_BATCHES_PER_TICK {
                if stop.is_cancelled() {
                    break;
                }
                let n = c
                    .execute(
                        &self.delete_sql,
                        &[
                            &self.retention.as_secs_f64(),
                            &xid.to_string(),
                            &self.batch,
                            &MAX_WATERMARK_AGE,
                        ],
                    )
                    .await?;
                deleted += n;
                shared.metrics.outbox_rows_deleted.inc_by(n);
                if (n as i64) < self.batch {
                    break;
                }
            }
        }
        let oldest: Option<f64> = c.query_opt(&self.oldest_sql, &[]).await?.map(|r| r.get(0));
        shared
            .metrics
            .outbox_oldest_row_age_seconds
            .set(oldest.unwrap_or(0.0).max(0.0));
        Ok(deleted)
    }
}

/// Takes from `queue` every watermark the slot's `confirmed` position
/// covers; returns the newest of them.
fn confirmed_watermark(queue: &mut VecDeque<Watermark>, confirmed: Lsn) -> Option<Watermark> {
    let mut newest = None;
    while let Some(w) = queue.front() {
        if w.lsn > confirmed {
            break;
        }
        newest = queue.pop_front();
    }
    newest
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(xmin: u64, lsn: u64) -> Watermark {
        Watermark {
            xmin,
            lsn: Lsn(lsn),
        }
    }

    #[test]
    fn the_newest_watermark_at_or_below_the_confirmed_position_is_taken() {
        let mut q: VecDeque<_> = [w(10, 100), w(12, 200), w(15, 300)].into();
        assert_eq!(confirmed_watermark(&mut q, Lsn(99)), None);
        assert_eq!(q.len(), 3);
        assert_eq!(confirmed_watermark(&mut q, Lsn(200)), Some(w(12, 200)));
        assert_eq!(q, [w(15, 300)]);
        assert_eq!(confirmed_watermark(&mut q, Lsn(250)), None);
        assert_eq!(confirmed_watermark(&mut q, Lsn(1000)), Some(w(15, 300)));
        assert!(q.is_empty());
    }
}
