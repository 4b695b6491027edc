//! Backfill (`--backfill all|after:ID`): the outbox rows committed before
//! the slot existed, delivered once and first, then the stream — the
//! hand-off from the JDBC source connector or from an outbox with history.
//!
//! **The hand-off.** The relay creates the slot with `EXPORT_SNAPSHOT`
//! and reads the table in that snapshot: a transaction committed before the
//! slot's consistent point is visible in it and never streamed, a later one
//! is streamed and not visible. So every row is in the snapshot or in the
//! stream, never both, never neither. The rows go to Kafka in id order,
//! each at position `(consistent point − 1, id)`: below every streamed
//! record (`dedupe`'s ordering holds per partition), above what was in
//! the topics before. Only once Kafka has acknowledged them all does
//! streaming start from the consistent point.
//!
//! ```text
//!  state row (intent) ─▶ CREATE_REPLICATION_SLOT … EXPORT_SNAPSHOT ─▶ SET TRANSACTION SNAPSHOT
//!     ─▶ FETCH rows id > after, in id order ─▶ Kafka, acks ─▶ state row finished ─▶ START_REPLICATION
//! ```
//!
//! **Restart.** A snapshot dies with its session, so a backfill
//! interrupted (`kill -9`, a broker failure) cannot go on in it. Its state
//! row (table `outbox_relay_backfill`, beside the outbox) is written
//! *before* the slot is created and marked finished only after the last
//! acknowledgement; while it is unfinished the slot has streamed nothing,
//! so the next session drops it and creates it again, with a new snapshot:
//! it holds every row the last one held (and those committed since, which
//! the new slot will not stream). What earlier attempts already put in
//! Kafka is read back first — records whose position lies between the
//! first attempt's consistent point and this one's — and skipped by event
//! id. Each row thus reaches Kafka once, in the default delivery mode; the
//! partition prefix argument of `dedupe` does not apply here, since rows
//! committed late (out of id order) appear only in the later snapshot.
//!
//! **Poison rows.** A row Kafka can never take stops the backfill as it
//! stops the stream, naming the event; the dead-letter options apply as
//! they do to streamed events (`dead_letter`): a named or (with
//! `--dead-letter-refused`) refused event goes to `<topic>.relay-dlq` as a
//! reference, and the dead-letter topics are read back with the rest.
//!
//! One relay at a time: the backfill holds a Postgres advisory lock on
//! its SQL connection; a second relay waits as a standby.

use std::collections::HashSet;

use tokio_postgres::Client;

use super::*;
use crate::pgoutput::PgTimestamp;
use crate::replication::quote_ident;
use crate::republish::OutboxColumns;

mod options;
mod readback;

use options::log_progress;
pub use options::{parse_backfill, BackfillFrom, BackfillProgress};
use readback::{delivered_before, topics_to_read_back};

/// The state table's name, in the outbox table's schema.
pub const STATE_TABLE: &str = "outbox_relay_backfill";
/// Rows per `FETCH`.
const FETCH_ROWS: usize = 5_000;
/// How often a running backfill logs its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// What `Session::backfill` left to the rest of the session.
pub(super) enum Backfilled {
    /// No backfill to do (none asked, or finished earlier): take the slot
    /// as usual.
    NotDue,
    /// The slot was created and its snapshot delivered: stream from here.
    Delivered(Lsn),
    /// Shutdown came first.
    Stopped,
}

/// The state row of an earlier start.
struct StateRow {
    after: i64,
    first_lsn: Option<Lsn>,
    finished: bool,
}

/// The state table, quoted, in the outbox table's schema.
fn state_table(cfg: &Config) -> String {
    let (schema, _) = cfg.table_parts();
    format!("{}.{}", quote_ident(&schema), STATE_TABLE)
}

impl Session<'_> {
    /// With `--backfill` and a backfill not finished yet: creates the slot,
    /// delivers its snapshot's rows, marks the backfill finished. See the
    /// module header.
    pub(super) async fn backfill(
        &mut self,
        params: &ConnectParams,
        client: &Client,
        conn: &mut ReplicationConnection,
        sink: &mut KafkaSink,
    ) -> Result<Backfilled, RelayError> {
        let Some(from) = self.cfg.backfill else {
            self.refuse_unfinished_backfill(client).await?;
            return Ok(Backfilled::NotDue);
        };
        let cfg = self.cfg;
        if cfg.kafka_transactions {
            return Err(RelayError::Backfill(
                "--backfill does not run with --kafka-transactions yet: backfill without it, \
                 then restart with it"
                    .into(),
            ));
        }
        if !cfg.has_table() {
            return Err(RelayError::Backfill(
                "--backfill reads the outbox table, but there is no table (--table '')".into(),
            ));
        }
        let sql = |context: &'static str| move |e| ReplicationError::from_sql(context, e);
        let state_table = state_table(cfg);
        client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {state_table} (
                    slot text PRIMARY KEY,
                    after_id bigint NOT NULL,
                    first_lsn pg_lsn,
                    slot_lsn pg_lsn,
                    attempts integer NOT NULL DEFAULT 0,
                    rows_total bigint,
                    rows_delivered bigint,
                    started_at timestamptz NOT NULL DEFAULT now(),
                    finished_at timestamptz)"
            ))
            .await
            .map_err(sql("creating the backfill state table"))?;
        let locked: bool = client
            .query_one(
                "SELECT pg_try_advisory_lock(hashtextextended($1, 0))",
                &[&format!("outbox-relay backfill {}", cfg.slot)],
            )
            .await
            .map_err(sql("taking the backfill lock"))?
            .get(0);
        if !locked {
            return Err(RelayError::BackfillBusy(cfg.slot.clone()));
        }

        let state = client
            .query_opt(
                &format!(
                    "SELECT after_id, first_lsn::text, finished_at IS NOT NULL \
                       FROM {state_table} WHERE slot = $1"
                ),
                &[&cfg.slot],
            )
            .await
            .map_err(sql("reading the backfill state"))?
            .map(|row| StateRow {
                after: row.get(0),
                first_lsn: row.get::<_, Option<String>>(1).and_then(|t| t.parse().ok()),
                finished: row.get(2),
            });
        let slot = replication::slot_state(client, &cfg.slot).await?;
        let state = match (state, slot) {
            (Some(state), _) if state.finished => return Ok(Backfilled::NotDue),
            (None, Some(_)) => {
                return Err(RelayError::Backfill(format!(
                "slot {} exists and no backfill was started with it: a backfill reads the table \
                     in the snapshot of a slot it creates. Drop the slot (relay slot drop) to \
                     backfill, or start without --backfill",
                cfg.slot
            )))
            }
            (None, None) => {
                client
                    .execute(
                        &format!("INSERT INTO {state_table} (slot, after_id) VALUES ($1, $2)"),
                        &[&cfg.slot, &from.after()],
                    )
                    .await
                    .map_err(sql("recording the backfill"))?;
                StateRow {
                    after: from.after(),
                    first_lsn: None,
                    finished: false,
                }
            }
            (Some(state), Some(info)) => {
                if info.active {
                    return Err(RelayError::BackfillBusy(cfg.slot.clone()));
                }
                tracing::warn!(slot = %cfg.slot,
                    "resuming an interrupted backfill: dropping its slot (it streamed nothing) for a new snapshot");
                client
                    .execute("SELECT pg_drop_replication_slot($1)", &[&cfg.slot])
                    .await
                    .map_err(sql("dropping the interrupted backfill's slot"))?;
                state
            }
            (Some(state), None) => state,
        };
        if state.after != from.after() {
            tracing::warn!(recorded = state.after, asked = from.after(),
                "--backfill differs from the interrupted backfill's; going on with the recorded start");
        }

        // The slot and its snapshot, imported before `conn` runs anything else.
        let (point, snapshot) = conn.create_slot_exporting(&cfg.slot).await?;
        let first = state.first_lsn.unwrap_or(point);
        let attempt: i32 = client
            .query_one(
                &format!(
                    "UPDATE {state_table} SET attempts = attempts + 1, slot_lsn = $2::text::pg_lsn, \
                        first_lsn = $3::text::pg_lsn WHERE slot = $1 RETURNING attempts"
                ),
                &[&cfg.slot, &point.to_string(), &first.to_string()],
            )
            .await
            .map_err(sql("recording the backfill's slot"))?
            .get(0);
        let snap = replication::sql_connect(params).await?;
        snap.batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{}'",
            snapshot.replace('\'', "''")
        ))
        .await
        .map_err(sql("importing the slot's snapshot"))?;
        let table = OutboxColumns::read(cfg, &snap)
            .await
            .map_err(sql("reading the outbox table's columns"))?;
        let after = state.after;
        let rows: i64 = snap
            .query_one(
                &format!("SELECT count(*) FROM {} WHERE id > $1", table.qualified),
                &[&after],
            )
            .await
            .map_err(sql("counting the rows to backfill"))?
            .get(0);
        tracing::info!(slot = %cfg.slot, at = %point, attempt, rows,
            after_id = (after != i64::MIN).then_some(after),
            "created replication slot; backfilling the rows of its snapshot before streaming");
        let mut progress = BackfillProgress {
            rows: rows as u64,
            after_id: (after != i64::MIN).then_some(after),
            attempt,
            ..BackfillProgress::default()
        };
        self.show(&progress);
        self.shared.update(|s| s.state = RelayState::Backfilling);

        // Kafka: what an earlier session left in flight lands first.
        if !self.prepare_kafka(sink).await? {
            return Ok(Backfilled::Stopped);
        }
        let position = Lsn(point.0.saturating_sub(1));
        let earlier = if attempt > 1 {
            let topics = topics_to_read_back(self.event_cfg, &snap, &table, after).await?;
            delivered_before(
                self.kafka_cfg,
                topics,
                Lsn(first.0.saturating_sub(1)),
                position,
            )
            .await?
        } else {
            HashSet::new()
        };
        if !earlier.is_empty() {
            tracing::info!(
                found = earlier.len(),
                "rows an interrupted attempt already delivered are skipped"
            );
        }

        let txn = TxnInfo {
            commit_lsn: position,
            xid: 0,
            commit_ts: PgTimestamp::from_unix_micros(chrono::Utc::now().timestamp_micros()),
        };
        let tag = *self.next_txn;
        *self.next_txn += 1;
        snap.batch_execute(&format!(
            "DECLARE relay_backfill NO SCROLL CURSOR FOR SELECT {} FROM {} WHERE id > {after} ORDER BY 1",
            table.select, table.qualified
        ))
        .await
        .map_err(sql("reading the rows to backfill"))?;
        let started = Instant::now();
        let mut logged = Instant::now();
        loop {
            if self.shutdown.is_cancelled() {
                return Ok(Backfilled::Stopped);
            }
            let batch = snap
                .query(&format!("FETCH {FETCH_ROWS} FROM relay_backfill"), &[])
                .await
                .map_err(sql("reading the rows to backfill"))?;
            if batch.is_empty() {
                break;
            }
            for row in &batch {
                let (id, tuple) = table.tuple(row);
                if earlier.contains(&id) {
                    progress.found_in_kafka += 1;
                    progress.delivered += 1;
                    continue;
                }
                let record =
                    event::build_record(self.event_cfg, &table.relation, &tuple, &txn, id as u64)?;
                // A dead-lettered event (named, or refused by Kafka in an
                // earlier attempt with --dead-letter-refused): its reference.
                let reference = self.dead_letters.reference_for(&record);
                let diverted = reference.is_some();
                let mut record = reference.unwrap_or(record);
                if !sink.has_topic(&record.topic) {
                    let prepared = sink.prepare_topic(&record.topic).await?;
                    sink.add_topic(record.topic.clone(), prepared);
                }
                if sink.place(&mut record, (position, id as u64)) == Placement::Duplicate {
                    progress.delivered += 1;
                    continue;
                }
                if diverted {
                    self.shared.metrics.dead_lettered.inc();
                    tracing::warn!(topic = %record.topic, event_id = id,
                        "backfill: producing a dead-lettered event's reference instead of the event");
                }
                let mut pending = record;
                loop {
                    match sink.try_send(pending, tag) {
                        Ok(()) => break,
                        Err(SendError::Full(back)) => {
                            pending = back;
                            let report = self.next_report_or_stall(sink).await?;
                            self.backfill_report(report, &mut progress)?;
                        }
                        Err(SendError::Refused(e)) => return Err(e),
                    }
                }
            }
            while let Some(report) = futures_util::FutureExt::now_or_never(sink.next_report()) {
                self.backfill_report(report, &mut progress)?;
            }
            if logged.elapsed() >= PROGRESS_EVERY {
                logged = Instant::now();
                log_progress(&progress, started.elapsed());
            }
            self.show(&progress);
        }
        while sink.in_flight() > 0 {
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(Backfilled::Stopped),
                report = self.next_report_or_stall(sink) => self.backfill_report(report?, &mut progress)?,
            }
        }
        client
            .execute(
                &format!(
                    "UPDATE {state_table} SET finished_at = now(), rows_total = $2, rows_delivered = $3 \
                      WHERE slot = $1"
                ),
                &[&cfg.slot, &rows, &(progress.delivered as i64)],
            )
            .await
            .map_err(sql("recording the backfill finished"))?;
        let _ = snap.batch_execute("COMMIT").await;
        progress.finished = true;
        self.show(&progress);
        log_progress(&progress, started.elapsed());
        tracing::info!(slot = %cfg.slot, rows = progress.rows, delivered = progress.delivered,
            found_in_kafka = progress.found_in_kafka, seconds = started.elapsed().as_secs_f64(),
            "backfill finished; streaming from the slot's consistent point");
        Ok(Backfilled::Delivered(point))
    }

    /// Without `--backfill`: refuses a slot whose backfill has not
    /// finished. Its slot streams nothing while the snapshot is read (a
    /// slot is inactive then), so a relay taking it without the option
    /// would put streamed records before the backfill's.
    async fn refuse_unfinished_backfill(&self, client: &Client) -> Result<(), RelayError> {
        if !self.cfg.has_table() {
            return Ok(());
        }
        let state_table = state_table(self.cfg);
        let sql = |e| ReplicationError::from_sql("reading the backfill state", e);
        let exists: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&state_table])
            .await
            .map_err(sql)?
            .get(0);
        // No state table: no backfill ever ran here.
        let unfinished = exists
            && client
                .query_opt(
                    &format!("SELECT 1 FROM {state_table} WHERE slot = $1 AND finished_at IS NULL"),
                    &[&self.cfg.slot],
                )
                .await
                .map_err(sql)?
                .is_some();
        if unfinished {
            return Err(RelayError::Backfill(format!(
                "slot {} has a backfill that has not finished ({state_table}): start with \
                 --backfill to resume it; streaming the slot now would put later events \
                 before the backfilled ones",
                self.cfg.slot
            )));
        }
        Ok(())
    }

    /// The next report; a stall (`--stall-timeout` with no report while
    /// records wait) ends the session as in the stream, unhealthy meanwhile.
    async fn next_report_or_stall(
        &self,
        sink: &mut KafkaSink,
    ) -> Result<Option<DeliveryReport>, RelayError> {
        let timeout = self.cfg.stall_timeout;
        if timeout.is_zero() {
            return Ok(sink.next_report().await);
        }
        match tokio::time::timeout(timeout, sink.next_report()).await {
            Ok(report) => Ok(report),
            Err(_) => {
                let error = RelayError::Stalled {
                    waited: timeout,
                    timeout,
                    in_flight: sink.in_flight(),
                };
                tracing::error!(error = %error, "backfill stalled");
                self.shared.metrics.stalls.inc();
                self.shared.set_stall(error.to_string());
                Err(error)
            }
        }
    }

    fn backfill_report(
        &self,
        report: Option<DeliveryReport>,
        progress: &mut BackfillProgress,
    ) -> Result<(), RelayError> {
        match report {
            Some(DeliveryReport::Delivered { topic, .. }) => {
                progress.delivered += 1;
                self.shared.clear_stall();
                self.shared
                    .metrics
                    .events
                    .get_or_create(&TopicLabel {
                        topic: topic.to_string(),
                    })
                    .inc();
                Ok(())
            }
            Some(DeliveryReport::Failed(e)) => {
                self.shared.metrics.produce_errors.inc();
                Err(e)
            }
            None => Err(RelayError::ProducerFatal("delivery reports ended".into())),
        }
    }

    fn show(&self, progress: &BackfillProgress) {
        let metrics = &self.shared.metrics;
        metrics.backfill_rows.set(progress.rows as i64);
        metrics
            .backfill_rows_delivered
            .set(progress.delivered as i64);
        self.shared.update(|s| s.backfill = Some(progress.clone()));
    }
}
