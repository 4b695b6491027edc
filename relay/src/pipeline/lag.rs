//! The lag sampler: replication lag and retained WAL, read on an ordinary
//! SQL connection every few seconds for `/status` and `/metrics`.

use super::*;

/// Samples lag and retained WAL on an ordinary SQL connection.
pub(super) async fn sample_lag(cfg: Config, shared: Arc<Shared>, stop: CancellationToken) {
    let Ok(params) = replication::connect_params(&cfg.database_url) else {
        return;
    };
    let mut sql = replication::LazySql::new(params);
    let mut ticker = tokio::time::interval(cfg.lag_sample_interval);
    // While the slot retains too much WAL: ERROR at once, then once a minute.
    let mut last_retained_error: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let c = match sql.get().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "lag sampler cannot connect");
                continue;
            }
        };
        let row = c
            .query_opt(
                "SELECT pg_current_wal_lsn()::text, restart_lsn::text \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&cfg.slot],
            )
            .await;
        match row {
            Ok(Some(row)) => {
                let current: Option<Lsn> =
                    row.get::<_, Option<String>>(0).and_then(|s| s.parse().ok());
                let restart: Option<Lsn> =
                    row.get::<_, Option<String>>(1).and_then(|s| s.parse().ok());
                let snapshot = shared.snapshot();
                let confirmed = snapshot.confirmed_lsn;
                if let Some(current) = current {
                    // A standby has no lag of its own: the relay streaming
                    // the slot reports it.
                    let lag = if snapshot.state == RelayState::Standby {
                        0
                    } else {
                        current.bytes_since(confirmed)
                    };
                    let retained = restart.map_or(0, |r| current.bytes_since(r));
                    shared.metrics.lag_bytes.set(lag as i64);
                    shared.metrics.slot_retained_wal_bytes.set(retained as i64);
                    let too_much = cfg.max_retained_wal > 0 && retained > cfg.max_retained_wal;
                    let problem = too_much.then(|| {
                        format!(
                            "slot {} retains {retained} bytes of WAL, above --max-retained-wal {}",
                            cfg.slot, cfg.max_retained_wal
                        )
                    });
                    if too_much {
                        if last_retained_error
                            .is_none_or(|t| t.elapsed() >= Duration::from_secs(60))
                        {
                            tracing::error!(slot = %cfg.slot, retained_bytes = retained,
                                max_retained_wal = cfg.max_retained_wal,
                                "slot retains too much WAL: Postgres cannot recycle it; is Kafka or the relay stuck? \
                                 (the relay never drops its slot; see `relay slot status`)");
                            last_retained_error = Some(Instant::now());
                        }
                    } else if last_retained_error.take().is_some() {
                        tracing::info!(slot = %cfg.slot, retained_bytes = retained, "retained WAL back below --max-retained-wal");
                    }
                    shared.update(|s| {
                        s.lag_bytes = lag;
                        s.retained_wal_bytes = retained;
                        s.health_problem = problem;
                    });
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(error = %e, "lag sample failed; reconnecting");
                sql.reset();
            }
        }
    }
}
