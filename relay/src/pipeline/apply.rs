//! The apply loop of a session and what it does with each message: WAL to
//! records into the sink, delivery reports to the checkpoint, the
//! confirmable position back to Postgres, and the status published on
//! `/status`. Generic over where WAL comes from ([`WalSource`]) and where
//! records go ([`Sink`], whose contract it relies on), so that
//! `pipeline::tests` can drive it with hand-made pgoutput messages and an
//! in-memory sink.

use std::future::Future;

use futures_util::future::BoxFuture;

use super::*;
use crate::message;
use crate::pgoutput::{LogicalDecodingMessage, PgTimestamp};

/// The apply loop's view of Postgres: replication messages in, standby
/// status updates out.
pub trait WalSource {
    /// The next message; cancel-safe.
    fn recv(&mut self)
        -> impl Future<Output = Result<ReplicationMessage, ReplicationError>> + Send;
    /// Tells the server that everything up to `confirmed` is done with.
    fn send_status(
        &mut self,
        confirmed: Lsn,
    ) -> impl Future<Output = Result<(), ReplicationError>> + Send;
}

impl WalSource for ReplicationStream {
    async fn recv(&mut self) -> Result<ReplicationMessage, ReplicationError> {
        ReplicationStream::recv(self).await
    }

    async fn send_status(&mut self, confirmed: Lsn) -> Result<(), ReplicationError> {
        ReplicationStream::send_status(self, confirmed, confirmed, confirmed, false).await
    }
}

/// A topic being readied, and the record that needs it.
type Preparing<T> = (BoxFuture<'static, Result<T, RelayError>>, PendingInsert);

impl Session<'_> {
    pub(super) async fn stream_loop<S: Sink, W: WalSource>(
        &mut self,
        stream: &mut W,
        sink: &mut S,
        st: &mut StreamState,
    ) -> Result<(), RelayError> {
        let mut ticker = tokio::time::interval(self.cfg.status_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Armed (st.confirm_armed) when the confirmable position moved.
        let confirm_timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(confirm_timer);
        // With --kafka-transactions: commits a Kafka transaction that reached
        // its age while no Postgres transaction is half-received.
        let batch_timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(batch_timer);
        let mut batch_armed = false;
        // A topic seen for the first time is readied here, between the
        // loop's turns, while status updates keep flowing; no new WAL is
        // read until it is ready.
        let mut preparing: Option<Preparing<S::Topic>> = None;
        loop {
            match &st.kbatch {
                Some(b) if !batch_armed => {
                    batch_armed = true;
                    batch_timer.as_mut().reset(
                        tokio::time::Instant::from_std(b.started)
                            + self.cfg.transaction_max_duration,
                    );
                }
                None => batch_armed = false,
                Some(_) => {}
            }
            if !st.confirm_armed && st.cp.confirmed() > st.last_sent {
                st.confirm_armed = true;
                confirm_timer
                    .as_mut()
                    .reset(tokio::time::Instant::now() + CONFIRM_DELAY);
            }
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Ok(()),
                report = sink.next_report() => {
                    let Some(report) = report else {
                        return Err(RelayError::ProducerFatal("delivery reports ended".into()));
                    };
                    apply_report(self.shared, &mut st.cp, report, !sink.transactional())?;
                    st.last_ack = tokio::time::Instant::now();
                    self.shared.clear_stall();
                    self.send_held(sink, st)?;
                }
                _ = &mut confirm_timer, if st.confirm_armed => {
                    self.confirm_if_moved(stream, st, false).await?;
                }
                _ = &mut batch_timer, if batch_armed && st.open.is_none() => {
                    self.commit_batch(sink, st).await?;
                }
                prepared = async { (&mut preparing.as_mut().expect("guarded").0).await },
                    if preparing.is_some() =>
                {
                    let (_, pending) = preparing.take().expect("guarded");
                    sink.add_topic(pending.record.topic.clone(), prepared?);
                    self.admit(pending, sink, st)?;
                }
                _ = ticker.tick() => {
                    if let Some(lease) = self.lease() {
                        if st.last_contact.elapsed() > lease {
                            // Possibly cut off from Postgres while Kafka still
                            // listens: stop writing before another relay can
                            // take the slot (see --lease).
                            sink.purge();
                            return Err(RelayError::LeaseExpired(lease));
                        }
                    }
                    if let Some(stalled) = self.stalled(sink, st) {
                        // Postgres talks, Kafka does not acknowledge: a new
                        // session and producer; what waited is replayed.
                        sink.purge();
                        return Err(stalled);
                    }
                    self.confirm_if_moved(stream, st, true).await?;
                    self.publish_status(sink, st);
                }
                msg = stream.recv(), if st.held.is_empty() && preparing.is_none() => {
                    st.last_contact = Instant::now();
                    match msg? {
                        ReplicationMessage::XLogData { wal_end, data, .. } => {
                            st.received = st.received.max(wal_end);
                            if let Some(pending) = self.handle_wal(&data, sink, st).await? {
                                // A topic routed by column, seen for the
                                // first time.
                                preparing = Some((sink.prepare_topic(&pending.record.topic), pending));
                            }
                            if st.cp.is_idle() {
                                st.cp.idle_position(wal_end);
                            }
                        }
                        ReplicationMessage::Keepalive { wal_end, reply_requested, .. } => {
                            st.received = st.received.max(wal_end);
                            st.cp.idle_position(wal_end);
                            if reply_requested {
                                self.confirm_if_moved(stream, st, true).await?;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Applies one pgoutput message. An Insert whose topic the sink does
    /// not have yet comes back, to be admitted once the topic is ready.
    pub(super) async fn handle_wal<S: Sink>(
        &mut self,
        data: &[u8],
        sink: &mut S,
        st: &mut StreamState,
    ) -> Result<Option<PendingInsert>, RelayError> {
        match pgoutput::decode(data)? {
            LogicalMessage::Begin(b) => {
                if st.open.is_some() {
                    return Err(RelayError::Protocol(
                        "Begin inside an open transaction".into(),
                    ));
                }
                let id = st.cp.begin(b.commit_ts.unix_micros());
                st.open = Some(OpenTxn {
                    id,
                    info: TxnInfo {
                        commit_lsn: b.final_lsn,
                        xid: b.xid,
                        commit_ts: b.commit_ts,
                    },
                    next_seq: 0,
                    skipped: 0,
                    produced: 0,
                });
            }
            LogicalMessage::Commit(c) => {
                let txn = st
                    .open
                    .take()
                    .ok_or_else(|| RelayError::Protocol("Commit without Begin".into()))?;
                if txn.next_seq > 0 {
                    self.shared.metrics.transactions.inc();
                }
                st.cp.commit(txn.id, c.end_lsn);
                if let Some(b) = &st.kbatch {
                    if b.records >= self.cfg.transaction_max_records
                        || b.started.elapsed() >= self.cfg.transaction_max_duration
                    {
                        self.commit_batch(sink, st).await?;
                    }
                }
            }
            LogicalMessage::Relation(rel) => {
                if self.event_cfg.is_outbox(&rel) {
                    event::check_relation(self.event_cfg, &rel)?;
                }
                st.relations.apply(rel);
            }
            LogicalMessage::Insert(ins) => {
                let rel = st.relations.get(ins.relation_oid).ok_or_else(|| {
                    RelayError::Protocol(format!(
                        "Insert for relation {} before its Relation message",
                        ins.relation_oid
                    ))
                })?;
                if !self.event_cfg.is_outbox(rel) {
                    return Ok(None);
                }
                let txn = st
                    .open
                    .as_mut()
                    .ok_or_else(|| RelayError::Protocol("Insert outside a transaction".into()))?;
                let seq = txn.next_seq;
                let record = event::build_record(self.event_cfg, rel, &ins.new, &txn.info, seq)?;
                txn.next_seq += 1;
                let (id, at) = (txn.id, (txn.info.commit_lsn, seq));
                let reference = self.dead_letters.reference_for(&record);
                let pending = PendingInsert {
                    diverted: reference.is_some(),
                    record: reference.unwrap_or(record),
                    txn: id,
                    at,
                    malformed: None,
                    then_commit: None,
                };
                return self.stage(pending, sink, st);
            }
            // Not produced: other changes, origins, types, and logical
            // messages other than heartbeats (counted; see `heartbeat`).
            LogicalMessage::Update(_)
            | LogicalMessage::Delete(_)
            | LogicalMessage::Truncate(_)
            | LogicalMessage::Origin(_)
            | LogicalMessage::Type(_) => {}
            LogicalMessage::Message(m) => {
                if heartbeat::is_own(&m, &self.cfg.slot) {
                    self.shared.metrics.heartbeats.inc();
                } else if message::is_event(self.event_cfg, &m) {
                    return self.event_message(&m, sink, st);
                }
            }
        }
        Ok(None)
    }

    /// An event written as a logical decoding message (see `message`).
    fn event_message<S: Sink>(
        &mut self,
        m: &LogicalDecodingMessage,
        sink: &mut S,
        st: &mut StreamState,
    ) -> Result<Option<PendingInsert>, RelayError> {
        let mut then_commit = None;
        if !m.transactional {
            if !self.event_cfg.messages.allow_non_transactional {
                self.shared
                    .metrics
                    .message_refused(message::REFUSED_NON_TRANSACTIONAL);
                tracing::warn!(lsn = %m.lsn, prefix = %m.prefix, bytes = m.content.len(),
                    "skipped a non-transactional event message: Postgres writes it even when its \
                     transaction rolls back; emit events with pg_logical_emit_message(true, …), \
                     or start the relay with --allow-non-transactional-messages");
                return Ok(None);
            }
            if st.open.is_some() {
                return Err(RelayError::Protocol(
                    "non-transactional Message inside a transaction".into(),
                ));
            }
            // A transaction of its own, at the message's position.
            let now = chrono::Utc::now().timestamp_micros();
            st.open = Some(OpenTxn {
                id: st.cp.begin(now),
                info: TxnInfo {
                    commit_lsn: m.lsn,
                    xid: 0,
                    commit_ts: PgTimestamp::from_unix_micros(now),
                },
                next_seq: 0,
                skipped: 0,
                produced: 0,
            });
            then_commit = Some(m.lsn);
        }
        let txn = st.open.as_mut().ok_or_else(|| {
            RelayError::Protocol("transactional Message outside a transaction".into())
        })?;
        let seq = txn.next_seq;
        txn.next_seq += 1;
        let (record, malformed) = match message::build_record(self.event_cfg, m, &txn.info, seq) {
            Ok(record) => (record, None),
            Err(why) => (
                message::dead_letter(self.event_cfg, m, &txn.info, seq, &why),
                Some(why.0),
            ),
        };
        let (id, at) = (txn.id, (txn.info.commit_lsn, seq));
        if then_commit.is_some() {
            st.open = None;
        }
        let reference = match malformed {
            None => self.dead_letters.reference_for(&record),
            Some(_) => None,
        };
        let pending = PendingInsert {
            diverted: reference.is_some(),
            record: reference.unwrap_or(record),
            txn: id,
            at,
            malformed,
            then_commit,
        };
        self.stage(pending, sink, st)
    }

    /// A stall: records wait for Kafka and none was acknowledged for
    /// `--stall-timeout`. Marks `/healthz` unhealthy and counts it.
    fn stalled<S: Sink>(&self, sink: &S, st: &StreamState) -> Option<RelayError> {
        let timeout = self.cfg.stall_timeout;
        let in_flight = sink.in_flight() + st.held.len();
        let waited = st.last_ack.elapsed();
        if timeout.is_zero() || in_flight == 0 || waited < timeout {
            return None;
        }
        let error = RelayError::Stalled {
            waited,
            timeout,
            in_flight,
        };
        tracing::error!(error = %error, "relay stalled");
        self.shared.metrics.stalls.inc();
        self.shared.set_stall(error.to_string());
        Some(error)
    }

    pub(super) async fn confirm_if_moved<W: WalSource>(
        &self,
        stream: &mut W,
        st: &mut StreamState,
        force: bool,
    ) -> Result<(), RelayError> {
        st.confirm_armed = false;
        let confirmed = st.cp.confirmed();
        if force || confirmed > st.last_sent {
            stream.send_status(confirmed).await?;
            st.last_sent = confirmed;
            self.shared.update(|s| s.confirmed_lsn = confirmed);
        }
        Ok(())
    }

    pub(super) fn publish_status<S: Sink>(&self, sink: &S, st: &StreamState) {
        let lag_seconds = st
            .cp
            .oldest_pending_commit_micros()
            .map(|t| (chrono::Utc::now().timestamp_micros() - t).max(0) as f64 / 1e6)
            .unwrap_or(0.0);
        self.shared.metrics.lag_seconds.set(lag_seconds);
        self.shared.update(|s| {
            s.received_lsn = st.received;
            s.confirmed_lsn = st.cp.confirmed();
            s.lag_seconds = lag_seconds;
            s.pending_transactions = st.cp.pending_transactions();
            s.in_flight_records = sink.in_flight();
        });
    }
}

pub(super) struct StreamState {
    pub(super) cp: Checkpoint,
    pub(super) relations: RelationCache,
    pub(super) open: Option<OpenTxn>,
    /// Records not yet accepted by the sink, in stream order.
    pub(super) held: VecDeque<(OutboxRecord, TxnId)>,
    /// Newest position sent to Postgres in a standby status update.
    pub(super) last_sent: Lsn,
    /// A status update is due within CONFIRM_DELAY.
    pub(super) confirm_armed: bool,
    /// When the server last sent anything (for the lease).
    pub(super) last_contact: Instant,
    /// When Kafka last acknowledged a record, or the session began (for
    /// stall detection).
    /// (tokio's clock, which tests can pause)
    pub(super) last_ack: tokio::time::Instant,
    /// With --kafka-transactions: the open Kafka transaction.
    pub(super) kbatch: Option<KafkaBatch>,
    pub(super) received: Lsn,
}

/// Applies a delivery report. `ack`: a delivered record counts toward
/// confirmation (false with Kafka transactions, where only the commit does).
pub(super) fn apply_report(
    shared: &Shared,
    cp: &mut Checkpoint,
    report: DeliveryReport,
    ack: bool,
) -> Result<(), RelayError> {
    match report {
        DeliveryReport::Delivered { txn, topic } => {
            shared
                .metrics
                .events
                .get_or_create(&TopicLabel {
                    topic: topic.to_string(),
                })
                .inc();
            if let Some(commit) = cp.commit_micros(txn) {
                let age = chrono::Utc::now().timestamp_micros() - commit;
                shared
                    .metrics
                    .commit_to_ack_seconds
                    .observe(age.max(0) as f64 / 1e6);
            }
            if ack {
                cp.acked(txn);
            }
            Ok(())
        }
        DeliveryReport::Failed(error) => {
            shared.metrics.produce_errors.inc();
            Err(error)
        }
    }
}
