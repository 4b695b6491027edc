//! A session, from taking the slot to readying Kafka: one replication
//! connection, the relay's state while it lasts (the open Kafka transaction,
//! the Postgres transaction being received), and the set-up before the
//! stream loop (`Session::run`, `Session::prepare_kafka`).

use super::*;

/// The open Kafka transaction (--kafka-transactions): when it began, how
/// many records it holds, and how many of them each Postgres transaction has.
pub(super) struct KafkaBatch {
    pub(super) started: Instant,
    pub(super) records: usize,
    pub(super) txns: Vec<(TxnId, u64)>,
    /// Positions of its first and last record (for the logs).
    pub(super) first: dedupe::Position,
    pub(super) last: dedupe::Position,
}

impl KafkaBatch {
    pub(super) fn add(&mut self, txn: TxnId, position: dedupe::Position) {
        self.records += 1;
        self.last = position;
        match self.txns.last_mut() {
            Some((last, n)) if *last == txn => *n += 1,
            _ => self.txns.push((txn, 1)),
        }
    }
}

/// The transaction being received (between Begin and Commit).
pub(super) struct OpenTxn {
    pub(super) id: TxnId,
    pub(super) info: TxnInfo,
    pub(super) next_seq: u64,
    /// Exactly-once: rows found already in Kafka (skipped), rows produced.
    pub(super) skipped: u64,
    pub(super) produced: u64,
}

pub(super) struct Session<'a> {
    pub(super) cfg: &'a Config,
    pub(super) event_cfg: &'a EventConfig,
    pub(super) kafka_cfg: &'a KafkaConfig,
    pub(super) shared: &'a Arc<Shared>,
    pub(super) shutdown: &'a CancellationToken,
    pub(super) next_txn: &'a mut TxnId,
    /// A Postgres transaction several sessions found partly in Kafka: skip
    /// its records per partition after all (see `RelayError::PartialTransaction`).
    pub(super) accept_partial: Option<Lsn>,
    /// Events produced as a reference in their dead-letter topic.
    pub(super) dead_letters: &'a DeadLetters,
}

impl Session<'_> {
    /// The lease, when it can work: heartbeats guarantee a message from the
    /// server more often than it expires, even while the outbox is idle.
    pub(super) fn lease(&self) -> Option<Duration> {
        let (lease, heartbeat) = (self.cfg.lease, self.cfg.heartbeat_interval);
        (!lease.is_zero() && !heartbeat.is_zero() && heartbeat < lease).then_some(lease)
    }

    /// Commits the open Kafka transaction (at a Postgres transaction
    /// boundary): first hands it every held record, then commits; only then
    /// do its records count toward confirmation.
    pub(super) async fn commit_batch<S: Sink>(
        &mut self,
        sink: &mut S,
        st: &mut StreamState,
    ) -> Result<(), RelayError> {
        while !st.held.is_empty() {
            let Some(report) = sink.next_report().await else {
                return Err(RelayError::ProducerFatal("delivery reports ended".into()));
            };
            apply_report(self.shared, &mut st.cp, report, false)?;
            self.send_held(sink, st)?;
        }
        let Some(batch) = st.kbatch.take() else {
            return Ok(());
        };
        if let Err(e) = sink.commit_transaction().await {
            self.shared.metrics.produce_errors.inc();
            tracing::warn!(error = %error_chain(&e), records = batch.records,
                first = ?batch.first, last = ?batch.last,
                "kafka transaction not committed; its records are replayed");
            return Err(e);
        }
        tracing::debug!(records = batch.records, first = ?batch.first, last = ?batch.last,
            "committed kafka transaction");
        for (id, n) in batch.txns {
            for _ in 0..n {
                st.cp.acked(id);
            }
        }
        Ok(())
    }

    /// Before a missing slot is created: fails if a topic this pipeline
    /// writes to already holds its records (their `lsn` headers), since the
    /// slot was then dropped or lost rather than never made.
    async fn refuse_new_slot_over_records(&self) -> Result<(), RelayError> {
        for topic in self.event_cfg.static_topics() {
            crate::topics::ensure_topics(self.kafka_cfg, std::slice::from_ref(&topic)).await?;
            let state = dedupe::load(self.kafka_cfg, &topic, true)
                .await
                .map_err(crate::sink::kafka::dedupe_error)?;
            if let Some((last, _)) = state.last.iter().flatten().max() {
                return Err(RelayError::SlotMissing {
                    slot: self.cfg.slot.clone(),
                    topic,
                    last: *last,
                });
            }
        }
        Ok(())
    }

    pub(super) fn exactly_once(&self) -> bool {
        self.cfg.delivery == Delivery::ExactlyOnce
    }

    pub(super) async fn run(
        &mut self,
        params: &ConnectParams,
        sink_slot: &mut Option<KafkaSink>,
    ) -> Result<(), RelayError> {
        let cfg = self.cfg;
        // Setup on an ordinary SQL connection: publication and slot state.
        let client = replication::sql_connect(params).await?;
        let (schema, table) = cfg.table_parts();
        let qualified = format!("{schema}.{table}");
        let table = cfg.has_table().then_some(qualified.as_str());
        if table.is_none() {
            tracing::info!("no outbox table (--table ''): relaying event messages only");
        }
        replication::ensure_publication(&client, &cfg.publication, table).await?;
        if let (false, Some(table)) = (cfg.retention.is_zero(), table) {
            crate::retention::check_table(&client, table).await?;
        }
        let mut conn = ReplicationConnection::connect(params).await?;
        let system = conn.identify_system().await?;
        if sink_slot.is_none() {
            *sink_slot = Some(KafkaSink::new(self.kafka_cfg, self.exactly_once())?);
        }
        let sink = sink_slot.as_mut().expect("set just above");
        let slot_confirmed = match self.backfill(params, &client, &mut conn, sink).await? {
            Backfilled::Stopped => return Ok(()),
            Backfilled::Delivered(point) => point,
            Backfilled::NotDue => {
                if self.exactly_once()
                    && !cfg.allow_new_slot
                    && replication::slot_state(&client, &cfg.slot).await?.is_none()
                {
                    self.refuse_new_slot_over_records().await?;
                }
                match replication::prepare_slot(&client, &mut conn, &cfg.slot).await? {
                    replication::PreparedSlot::Existing(info) => {
                        info.confirmed_flush_lsn.unwrap_or(Lsn::ZERO)
                    }
                    replication::PreparedSlot::Created { consistent_point } => {
                        tracing::info!(slot = %cfg.slot, at = %consistent_point, "created replication slot");
                        consistent_point
                    }
                }
            }
        };
        drop(client);
        tracing::info!(slot = %cfg.slot, system_id = %system.system_id, server_lsn = %system.xlogpos,
            confirmed = %slot_confirmed, "starting replication");

        // Fails with SlotBusy while another relay streams the slot (this one
        // is then a standby, see `supervise`).
        let mut stream = conn
            .start_replication(&cfg.slot, Lsn::ZERO, &cfg.publication)
            .await?;
        // Kafka's side of the session, while the walsender already streams:
        // standby status updates keep answering it meanwhile (the position
        // does not move), or it would wait for a reply until
        // wal_sender_timeout, and hold up a fast shutdown that long.
        let ready = {
            let prepare = self.prepare_kafka(sink);
            tokio::pin!(prepare);
            let mut ticker = tokio::time::interval(cfg.status_interval.min(SETUP_STATUS_INTERVAL));
            // A failed update ends the session only once Kafka is ready:
            // dropping a transactional call half-way would leave the
            // producer's state unknown.
            let mut lost: Option<ReplicationError> = None;
            let prepared = loop {
                tokio::select! {
                    biased;
                    prepared = &mut prepare => break prepared,
                    _ = ticker.tick(), if lost.is_none() => {
                        if let Err(e) = stream
                            .send_status(slot_confirmed, slot_confirmed, slot_confirmed, false)
                            .await
                        {
                            lost = Some(e);
                        }
                    }
                }
            };
            let ready = prepared?;
            if let Some(e) = lost {
                return Err(e.into());
            }
            ready
        };
        if !ready {
            return Ok(());
        }

        self.shared.metrics.connected.set(1);
        self.shared.update(|s| {
            s.state = RelayState::Streaming;
            s.confirmed_lsn = slot_confirmed;
            s.last_error = None;
        });
        let mut state = StreamState {
            cp: Checkpoint::starting_at(slot_confirmed, *self.next_txn),
            relations: RelationCache::new(),
            open: None,
            held: VecDeque::new(),
            last_sent: slot_confirmed,
            confirm_armed: false,
            last_contact: Instant::now(),
            last_ack: tokio::time::Instant::now(),
            kbatch: None,
            received: slot_confirmed,
        };
        let result = self.stream_loop(&mut stream, sink, &mut state).await;
        *self.next_txn = state.cp.next_id();
        match result {
            Ok(()) => {
                // Graceful stop: wait (bounded) for acks, confirm them, close.
                self.shared.update(|s| s.state = RelayState::Stopping);
                if state.kbatch.is_some() {
                    // Whole Postgres transactions only: commit at a boundary,
                    // else abort (the open one is replayed on restart).
                    let committed =
                        state.open.is_none() && self.commit_batch(sink, &mut state).await.is_ok();
                    if !committed && sink.transaction_open() {
                        let _ = sink.abort_transaction().await;
                    }
                    state.kbatch = None;
                }
                let shared = self.shared.clone();
                let cp = &mut state.cp;
                let ack = !sink.transactional();
                let drained = sink
                    .drain(cfg.shutdown_timeout, |r| {
                        let _ = apply_report(&shared, cp, r, ack);
                    })
                    .await;
                if !drained {
                    tracing::warn!(
                        in_flight = sink.in_flight(),
                        "shutdown timeout: unacknowledged records will be replayed on restart"
                    );
                }
                let confirmed = state.cp.confirmed();
                let _ = stream
                    .send_status(confirmed, confirmed, confirmed, false)
                    .await;
                let _ = stream.finish().await;
                tracing::info!(confirmed = %confirmed, "relay stopped cleanly");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Readies Kafka for a session that holds the slot: aborts what the
    /// previous session left open (`--kafka-transactions`; the first
    /// session fences older producers with the same `transactional.id`),
    /// waits for the previous session's records still in flight, then
    /// readies each topic known up front (creates it if need be, reads its
    /// partitions and, exactly-once, their last positions). False when
    /// shutdown came first.
    pub(super) async fn prepare_kafka(&self, sink: &mut KafkaSink) -> Result<bool, RelayError> {
        sink.start_session().await?;
        // What a previous session left in flight lands (or fails) before
        // the partitions' ends are read, or it could be written twice.
        while sink.in_flight() > 0 {
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(false),
                report = sink.next_report() => match report {
                    Some(DeliveryReport::Failed(
                        e @ (RelayError::ProducerFatal(_) | RelayError::KafkaAccess(_)),
                    )) => return Err(e),
                    None => return Err(RelayError::ProducerFatal("delivery reports ended".into())),
                    Some(_) => {}
                },
            }
        }
        for topic in self.event_cfg.static_topics() {
            let prepared = sink.prepare_topic(&topic).await?;
            sink.add_topic(topic, prepared);
        }
        Ok(true)
    }
}
