//! The supervisor: one session after another on the same slot, with
//! bounded exponential backoff and jitter after transient errors; it returns
//! on shutdown or a definite error.

use super::*;

/// Reconnects after transient errors with bounded exponential backoff and
/// jitter; returns on shutdown or a definite error.
pub(super) async fn supervise(
    cfg: &Config,
    shared: &Arc<Shared>,
    shutdown: &CancellationToken,
) -> Result<(), RelayError> {
    let params = replication::connect_params(&cfg.database_url)?;
    let event_cfg = cfg.event_config();
    let kafka_cfg = cfg.kafka_config();
    let mut sink: Option<KafkaSink> = None;
    let mut next_txn: TxnId = 0;
    let mut attempt: u32 = 0;
    // The same partial transaction seen by consecutive sessions.
    let mut partial: Option<(Lsn, u32)> = None;
    let mut accept_partial: Option<Lsn> = None;
    let dead_letters = DeadLetters::new(&cfg.dead_letter_event_ids, cfg.dead_letter_refused);
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        shared.update(|s| {
            if s.state != RelayState::Standby {
                s.state = RelayState::Connecting;
            }
        });
        let started = Instant::now();
        let mut session = Session {
            cfg,
            event_cfg: &event_cfg,
            kafka_cfg: &kafka_cfg,
            shared,
            shutdown,
            next_txn: &mut next_txn,
            accept_partial,
            dead_letters: &dead_letters,
        };
        let mut result = session.run(&params, &mut sink).await;
        if let Err(RelayError::DeliveryPermanent { refused, .. }) = &mut result {
            if refused.topic_limit.is_none() {
                // Rare, and worth naming: the limit the record is measured against.
                refused.topic_limit = topics::max_message_bytes(&kafka_cfg, &refused.topic).await;
            }
        }
        shared.metrics.connected.set(0);
        if let Err(RelayError::PartialTransaction { commit_lsn }) = &result {
            let reads = match partial {
                Some((lsn, n)) if lsn == *commit_lsn => n + 1,
                _ => 1,
            };
            partial = Some((*commit_lsn, reads));
            if reads >= PARTIAL_TRANSACTION_READS {
                // The same view each time: not a marker still being written.
                // The records were written without Kafka transactions (or
                // the partition count changed); each partition's own end is
                // then what counts, as without transactions.
                tracing::warn!(commit_lsn = %commit_lsn, reads,
                    "the partitions' ends still hold part of this transaction; skipping per partition");
                accept_partial = Some(*commit_lsn);
            }
        }
        match result {
            Ok(()) => return Ok(()),
            Err(
                e @ (RelayError::Replication(ReplicationError::SlotBusy { .. })
                | RelayError::BackfillBusy(_)),
            ) => {
                // Another relay streams (or backfills) the slot: stand by
                // and poll, so the slot is taken over moments after it is
                // released.
                if shared.snapshot().state != RelayState::Standby {
                    tracing::info!(slot = %cfg.slot, reason = %e, poll_ms = cfg.standby_poll_interval.as_millis() as u64,
                        "standby: another relay streams the slot");
                }
                attempt = 0;
                shared.update(|s| {
                    s.state = RelayState::Standby;
                    s.last_error = None;
                });
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(cfg.standby_poll_interval) => {}
                }
            }
            Err(e) if dead_letters.learn(&e) => {
                // Opted in: the replay produces the event's reference in the
                // dead-letter topic instead (see `dead_letter`).
                tracing::error!(error = %error_chain(&e),
                    "dead-lettering the refused event (--dead-letter-refused) and replaying");
                shared.update(|s| {
                    s.state = RelayState::Reconnecting;
                    s.last_error = Some(error_chain(&e));
                });
            }
            Err(e) if e.is_transient() => {
                if matches!(
                    e,
                    RelayError::ProducerFatal(_)
                        | RelayError::LeaseExpired(_)
                        | RelayError::Stalled { .. }
                ) {
                    // A new producer: the old one's queue was purged.
                    sink = None;
                }
                if started.elapsed() > Duration::from_secs(30) {
                    attempt = 0;
                }
                let delay = lifecycle::Backoff {
                    initial: RECONNECT_INITIAL_BACKOFF,
                    max: cfg.max_backoff,
                }
                .jittered(attempt.saturating_add(1));
                attempt = attempt.saturating_add(1);
                let chain = error_chain(&e);
                tracing::warn!(error = %chain, retry_in_ms = delay.as_millis() as u64, "replication session ended; reconnecting");
                shared.update(|s| {
                    s.state = RelayState::Reconnecting;
                    s.last_error = Some(chain);
                });
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(e) => {
                tracing::error!(error = %error_chain(&e), "relay stopped");
                return Err(e);
            }
        }
    }
}

/// The first reconnect waits about this long; each later one twice as long,
/// up to `--max-backoff`.
pub(super) const RECONNECT_INITIAL_BACKOFF: Duration = Duration::from_millis(250);
