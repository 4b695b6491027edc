//! Pipeline: the relay's event loop, from the replication stream to Kafka
//! and back to the slot's confirmed position.
//!
//! ```text
//!            ┌──────────────── supervisor: reconnect with backoff + jitter ───────────────┐
//!            │                                                                             │
//!  Postgres ─┴▶ ReplicationStream ─▶ pgoutput::decode ─▶ event::build_record ─▶ KafkaSink ─┐
//!       ▲                                   │ Begin/Commit                                 │ acks
//!       │                                   ▼                                              ▼
//!       └──────────── send_status(confirmed) ◀──────────── Checkpoint ◀────────────────────┘
//! ```
//!
//! One session is one replication connection. Once it holds the slot it
//! readies Kafka (`Session::prepare_kafka`), answering the walsender with
//! status updates meanwhile. Its loop is a
//! `tokio::select!` with this priority (`biased`):
//! 1. shutdown — stop reading, wait (bounded) for Kafka's acks, confirm, exit;
//! 2. delivery reports — they move the confirmable position;
//! 3. the confirmation timer — once the confirmable position moved, a standby
//!    status update goes out within [`CONFIRM_DELAY`] (coalescing the acks
//!    of a burst into one update instead of one per transaction);
//! 4. with `--kafka-transactions`, the batch timer — commit the open Kafka
//!    transaction once it is `--transaction-max-duration` old and no
//!    Postgres transaction is half-received (records then count toward
//!    confirmation only at that commit, not at their acks);
//! 5. the status timer — a standby status update every `--status-interval`,
//!    so the server never times the relay out, even when idle (and the
//!    `--lease` check);
//! 6. new WAL — read only while the sink accepts records (backpressure: a
//!    record refused with `Full` is held and retried after the next ack).
//!
//! Records are produced as their Insert messages arrive (their headers come
//! from the Begin message), so memory stays flat whatever a transaction's
//! size. Session errors are transient (reconnect, replay from the confirmed
//! position: duplicates possible, loss impossible) or definite (stop with a
//! message and a non-zero exit). Kafka refusing the relay's credentials or
//! an operation (no ACL for the topic, the exactly-once reader's group or
//! the transactional id) is definite: [`RelayError::KafkaAccess`], or
//! `SinkError::Denied` when found while looking up or creating topics.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use tokio_util::sync::CancellationToken;

use crate::checkpoint::{Checkpoint, TxnId};
use crate::config::{Config, Delivery};
use crate::dedupe;
use crate::event::{self, EventConfig, OutboxRecord, TxnInfo};
use crate::heartbeat;
use crate::http::{RelayState, Shared};
use crate::lsn::Lsn;
use crate::metrics::TopicLabel;
use crate::pgoutput::{self, LogicalMessage, RelationCache};
use crate::replication::{
    self, ConnectParams, ReplicationConnection, ReplicationError, ReplicationMessage,
    ReplicationStream,
};
use crate::sink::{self, AccessDenied, DeliveryReport, KafkaConfig, KafkaSink, SendError, Sink};
use crate::sql;

/// How long a moved confirmable position may wait before it is sent to
/// Postgres: short enough that the slot follows Kafka's acks closely, long
/// enough that a burst of acks costs one status update, not thousands.
pub const CONFIRM_DELAY: Duration = Duration::from_millis(10);

/// How many sessions in a row find the same Postgres transaction only partly
/// in Kafka (with Kafka transactions) before the relay takes that view as it
/// is.
const PARTIAL_TRANSACTION_READS: u32 = 3;

/// How often a session answers the walsender while it readies Kafka (at
/// most; `--status-interval` when shorter).
const SETUP_STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// Why the relay stopped or a session ended.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("replication")]
    Replication(#[from] replication::ReplicationError),
    #[error("could not decode a pgoutput message")]
    Decode(#[from] pgoutput::DecodeError),
    #[error("could not turn an outbox row into a record")]
    Event(#[from] event::EventError),
    #[error("kafka")]
    Sink(#[from] sink::SinkError),
    #[error("exactly-once")]
    Dedupe(#[from] dedupe::DedupeError),
    #[error("kafka refused a record permanently ({0}); fix the cause (e.g. message.max.bytes) and restart")]
    DeliveryPermanent(#[source] KafkaError),
    #[error("kafka did not deliver a record ({0}); replaying from the confirmed position")]
    Delivery(#[source] KafkaError),
    #[error("kafka producer failed fatally: {0}; recreating it and replaying from the confirmed position")]
    ProducerFatal(String),
    /// Kafka refused the relay's credentials or an operation (no ACL).
    #[error(transparent)]
    KafkaAccess(AccessDenied),
    #[error("unexpected replication stream: {0}")]
    Protocol(String),
    #[error("kafka transaction failed; replaying from the confirmed position")]
    KafkaTransaction(#[source] KafkaError),
    /// Exactly-once with Kafka transactions: the partitions' last committed
    /// records hold part of one Postgres transaction.
    #[error(
        "the topic's partitions hold only part of the Postgres transaction committed at {commit_lsn}, \
         which Kafka transactions make impossible: their ends were read before every transaction marker \
         was written (or the topic was written without transactions, or its partition count changed); \
         reading them again"
    )]
    PartialTransaction { commit_lsn: Lsn },
    #[error("no message from Postgres for {0:?} (--lease): stopped producing and dropped the queue, so that a relay taking over the slot cannot be overtaken by this one")]
    LeaseExpired(Duration),
    #[error("sql connection")]
    Sql(#[from] tokio_postgres::Error),
    #[error("cannot listen for HTTP on {addr}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl RelayError {
    /// Transient errors end a session and are retried with backoff; the
    /// others stop the relay.
    pub fn is_transient(&self) -> bool {
        match self {
            RelayError::Replication(e) => e.is_transient(),
            RelayError::Sink(e) => e.is_transient(),
            RelayError::Dedupe(e) => e.is_transient(),
            RelayError::Delivery(_)
            | RelayError::ProducerFatal(_)
            | RelayError::LeaseExpired(_)
            | RelayError::KafkaTransaction(_)
            | RelayError::PartialTransaction { .. }
            | RelayError::Sql(_) => true,
            RelayError::Decode(_)
            | RelayError::Event(_)
            | RelayError::DeliveryPermanent(_)
            | RelayError::KafkaAccess(_)
            | RelayError::Protocol(_)
            | RelayError::Listen { .. } => false,
        }
    }
}

pub use lifecycle::error_chain;

/// Runs the relay until `shutdown` is cancelled (Ok) or a definite error.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> Result<(), RelayError> {
    let shared = Shared::new(&cfg.slot, &cfg.publication);
    run_with(cfg, shutdown, shared).await
}

/// [`run`] with caller-provided shared state (tests read `/status` from it).
pub async fn run_with(
    cfg: Config,
    shutdown: CancellationToken,
    shared: Arc<Shared>,
) -> Result<(), RelayError> {
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| RelayError::Listen {
            addr: cfg.listen,
            source,
        })?;
    shared.set_http_addr(listener.local_addr().ok());
    let http_stop = shutdown.child_token();
    let http = tokio::spawn({
        let app = crate::http::router(shared.clone());
        let stop = http_stop.clone();
        async move {
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
            {
                tracing::error!(error = %e, "http server failed");
            }
        }
    });
    let sampler = tokio::spawn(sample_lag(
        cfg.clone(),
        shared.clone(),
        shutdown.child_token(),
    ));
    if !cfg.lease.is_zero()
        && (cfg.heartbeat_interval.is_zero() || cfg.heartbeat_interval >= cfg.lease)
    {
        tracing::warn!(lease = ?cfg.lease, heartbeat_interval = ?cfg.heartbeat_interval,
            "--lease is off: it needs heartbeats more frequent than the lease");
    }
    let heartbeat = match ConnectParams::from_url(&cfg.database_url) {
        Ok(params) if !cfg.heartbeat_interval.is_zero() => Some(tokio::spawn(heartbeat::run(
            params,
            cfg.slot.clone(),
            cfg.heartbeat_interval,
            shutdown.child_token(),
        ))),
        // A bad URL is reported by the session below.
        _ => None,
    };

    let result = supervise(&cfg, &shared, &shutdown).await;
    if let Err(e) = &result {
        shared.update(|s| {
            s.state = RelayState::Failed;
            s.last_error = Some(error_chain(e));
        });
    }
    http_stop.cancel();
    sampler.abort();
    if let Some(h) = heartbeat {
        h.abort();
    }
    let _ = http.await;
    result
}

/// Reconnects after transient errors with bounded exponential backoff and
/// jitter; returns on shutdown or a definite error.
async fn supervise(
    cfg: &Config,
    shared: &Arc<Shared>,
    shutdown: &CancellationToken,
) -> Result<(), RelayError> {
    let params = ConnectParams::from_url(&cfg.database_url)?;
    let event_cfg = cfg.event_config();
    let kafka_cfg = cfg.kafka_config();
    let mut sink: Option<KafkaSink> = None;
    let mut next_txn: TxnId = 0;
    let mut attempt: u32 = 0;
    // The same partial transaction seen by consecutive sessions.
    let mut partial: Option<(Lsn, u32)> = None;
    let mut accept_partial: Option<Lsn> = None;
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
        };
        let result = session.run(&params, &mut sink).await;
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
            Err(RelayError::Replication(ReplicationError::SlotBusy { error, .. })) => {
                // Another relay streams the slot: stand by and poll, so the
                // slot is taken over moments after it is released.
                if shared.snapshot().state != RelayState::Standby {
                    tracing::info!(slot = %cfg.slot, reason = %error, poll_ms = cfg.standby_poll_interval.as_millis() as u64,
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
            Err(e) if e.is_transient() => {
                if matches!(
                    e,
                    RelayError::ProducerFatal(_) | RelayError::LeaseExpired(_)
                ) {
                    // A new producer: the old one's queue was purged.
                    sink = None;
                }
                if started.elapsed() > Duration::from_secs(30) {
                    attempt = 0;
                }
                let delay = backoff(attempt, cfg.max_backoff);
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

/// 250 ms · 2^attempt, capped at `max`, with ±25 % jitter.
fn backoff(attempt: u32, max: Duration) -> Duration {
    let base = Duration::from_millis(250).saturating_mul(2u32.saturating_pow(attempt.min(16)));
    let capped = base.min(max);
    let jitter = rand::rng().random_range(0.75..1.25);
    capped.mul_f64(jitter)
}

/// The open Kafka transaction (--kafka-transactions): when it began, how
/// many records it holds, and how many of them each Postgres transaction has.
struct KafkaBatch {
    started: Instant,
    records: usize,
    txns: Vec<(TxnId, u64)>,
    /// Positions of its first and last record (for the logs).
    first: dedupe::Position,
    last: dedupe::Position,
}

impl KafkaBatch {
    fn add(&mut self, txn: TxnId, position: dedupe::Position) {
        self.records += 1;
        self.last = position;
        match self.txns.last_mut() {
            Some((last, n)) if *last == txn => *n += 1,
            _ => self.txns.push((txn, 1)),
        }
    }
}

/// A fenced or otherwise fatal producer is replaced; the rest is retried by
/// replaying from the confirmed position. Refused access (no ACL for the
/// transactional id) stops the relay.
fn txn_error(e: KafkaError) -> RelayError {
    if let Some(denied) = AccessDenied::from_error(&e, format!("Kafka transaction: {e}")) {
        return RelayError::KafkaAccess(denied);
    }
    match &e {
        KafkaError::Transaction(t) if t.is_fatal() => RelayError::ProducerFatal(e.to_string()),
        _ => RelayError::KafkaTransaction(e),
    }
}

/// The transaction being received (between Begin and Commit).
struct OpenTxn {
    id: TxnId,
    info: TxnInfo,
    next_seq: u64,
    /// Exactly-once: rows found already in Kafka (skipped), rows produced.
    held: u64,
    produced: u64,
}

struct Session<'a> {
    cfg: &'a Config,
    event_cfg: &'a EventConfig,
    kafka_cfg: &'a KafkaConfig,
    shared: &'a Arc<Shared>,
    shutdown: &'a CancellationToken,
    next_txn: &'a mut TxnId,
    /// A Postgres transaction several sessions found partly in Kafka: skip
    /// its records per partition after all (see `RelayError::PartialTransaction`).
    accept_partial: Option<Lsn>,
}

impl Session<'_> {
    /// The lease, when it can work: heartbeats guarantee a message from the
    /// server more often than it expires, even while the outbox is idle.
    fn lease(&self) -> Option<Duration> {
        let (lease, heartbeat) = (self.cfg.lease, self.cfg.heartbeat_interval);
        (!lease.is_zero() && !heartbeat.is_zero() && heartbeat < lease).then_some(lease)
    }

    fn transactional(&self) -> bool {
        self.kafka_cfg.transactional_id.is_some()
    }

    /// Commits the open Kafka transaction (at a Postgres transaction
    /// boundary): first hands it every held record, then commits; only then
    /// do its records count toward confirmation.
    async fn commit_batch(
        &mut self,
        sink: &mut KafkaSink,
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
        let mut attempt = 0;
        loop {
            match sink.commit_transaction().await {
                Ok(()) => break,
                Err(KafkaError::Transaction(e)) if e.is_retriable() && attempt < 3 => attempt += 1,
                Err(e) => {
                    self.shared.metrics.produce_errors.inc();
                    let abortable =
                        matches!(&e, KafkaError::Transaction(t) if t.txn_requires_abort());
                    if abortable {
                        tracing::warn!(error = %e, records = batch.records,
                            first = ?batch.first, last = ?batch.last,
                            "kafka transaction must be aborted; replaying it");
                        let _ = sink.abort_transaction().await;
                    }
                    return Err(txn_error(e));
                }
            }
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

    fn exactly_once(&self) -> bool {
        self.cfg.delivery == Delivery::ExactlyOnce
    }

    async fn run(
        &mut self,
        params: &ConnectParams,
        sink_slot: &mut Option<KafkaSink>,
    ) -> Result<(), RelayError> {
        let cfg = self.cfg;
        // Setup on an ordinary SQL connection: publication and slot state.
        let client = sql::connect(params).await?;
        let (schema, table) = cfg.table_parts();
        replication::ensure_publication(&client, &cfg.publication, &format!("{schema}.{table}"))
            .await?;
        let mut conn = ReplicationConnection::connect(params).await?;
        let system = conn.identify_system().await?;
        let slot_confirmed = match replication::prepare_slot(&client, &mut conn, &cfg.slot).await? {
            replication::PreparedSlot::Existing(info) => {
                info.confirmed_flush_lsn.unwrap_or(Lsn::ZERO)
            }
            replication::PreparedSlot::Created { consistent_point } => {
                tracing::info!(slot = %cfg.slot, at = %consistent_point, "created replication slot");
                consistent_point
            }
        };
        drop(client);
        tracing::info!(slot = %cfg.slot, system_id = %system.system_id, server_lsn = %system.xlogpos,
            confirmed = %slot_confirmed, "starting replication");

        // Topics exist before the first record is produced.
        sink::ensure_topics(self.kafka_cfg, &self.event_cfg.static_topics()).await?;
        if sink_slot.is_none() {
            *sink_slot = Some(KafkaSink::new(self.kafka_cfg)?);
        }
        let sink = sink_slot.as_mut().expect("set just above");

        // Fails with SlotBusy while another relay streams the slot (this one
        // is then a standby, see `supervise`).
        let mut stream = conn
            .start_replication(&cfg.slot, Lsn::ZERO, &cfg.publication)
            .await?;
        // Kafka's side of the session, while the walsender already streams:
        // standby status updates keep answering it meanwhile (the position
        // does not move), or it would wait for a reply until
        // wal_sender_timeout, and hold up a fast shutdown that long.
        let topics = {
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
            let topics = prepared?;
            if let Some(e) = lost {
                return Err(e.into());
            }
            topics
        };
        let Some(topics) = topics else {
            return Ok(());
        };

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
            topics,
            last_sent: slot_confirmed,
            confirm_armed: false,
            last_contact: Instant::now(),
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
                    if !committed && sink.txn_open {
                        let _ = sink.abort_transaction().await;
                    }
                    state.kbatch = None;
                }
                let shared = self.shared.clone();
                let cp = &mut state.cp;
                let ack = !self.transactional();
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
    /// reads each topic's partitions (and, exactly-once, their last
    /// positions). `None` when shutdown came first.
    async fn prepare_kafka(
        &self,
        sink: &mut KafkaSink,
    ) -> Result<Option<HashMap<String, dedupe::TopicState>>, RelayError> {
        if self.transactional() {
            // A transaction a failed session left open is aborted (its
            // records are replayed).
            if sink.txn_open {
                sink.abort_transaction().await.map_err(txn_error)?;
                tracing::info!("aborted the Kafka transaction the previous session left open");
            }
            if !sink.txn_ready {
                sink.init_transactions().await.map_err(txn_error)?;
                tracing::info!(
                    "initialised Kafka transactions (any producer with this transactional.id is fenced)"
                );
            }
        }
        // What a previous session left in flight lands (or fails) before
        // the partitions' ends are read, or it could be written twice.
        while sink.in_flight() > 0 {
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(None),
                report = sink.next_report() => match report {
                    Some(DeliveryReport::Fatal { reason }) => return Err(RelayError::ProducerFatal(reason)),
                    Some(DeliveryReport::Denied(denied)) => return Err(RelayError::KafkaAccess(denied)),
                    None => return Err(RelayError::ProducerFatal("delivery reports ended".into())),
                    Some(_) => {}
                },
            }
        }
        let mut topics = HashMap::new();
        for topic in self.event_cfg.static_topics() {
            let state = dedupe::load(self.kafka_cfg, &topic, self.exactly_once())
                .await
                .map_err(dedupe_error)?;
            if self.exactly_once() {
                tracing::info!(%topic, partitions = state.partitions, last = ?state.last, "read each partition's last position");
            }
            topics.insert(topic, state);
        }
        Ok(Some(topics))
    }

    async fn stream_loop(
        &mut self,
        stream: &mut ReplicationStream,
        sink: &mut KafkaSink,
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
                    apply_report(self.shared, &mut st.cp, report, !self.transactional())?;
                    self.send_held(sink, st)?;
                }
                _ = &mut confirm_timer, if st.confirm_armed => {
                    self.confirm_if_moved(stream, st, false).await?;
                }
                _ = &mut batch_timer, if batch_armed && st.open.is_none() => {
                    self.commit_batch(sink, st).await?;
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
                    self.confirm_if_moved(stream, st, true).await?;
                    self.publish_status(sink, st);
                }
                msg = stream.recv(), if st.held.is_empty() => {
                    st.last_contact = Instant::now();
                    match msg? {
                        ReplicationMessage::XLogData { wal_end, data, .. } => {
                            st.received = st.received.max(wal_end);
                            self.handle_wal(&data, sink, st).await?;
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

    async fn handle_wal(
        &mut self,
        data: &[u8],
        sink: &mut KafkaSink,
        st: &mut StreamState,
    ) -> Result<(), RelayError> {
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
                    held: 0,
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
                    return Ok(());
                }
                let txn = st
                    .open
                    .as_mut()
                    .ok_or_else(|| RelayError::Protocol("Insert outside a transaction".into()))?;
                let seq = txn.next_seq;
                let mut record =
                    event::build_record(self.event_cfg, rel, &ins.new, &txn.info, seq)?;
                txn.next_seq += 1;
                let id = txn.id;
                let position = (txn.info.commit_lsn, seq);
                if !st.topics.contains_key(&record.topic) {
                    // A topic routed by column, seen for the first time.
                    sink::ensure_topics(self.kafka_cfg, std::slice::from_ref(&record.topic))
                        .await?;
                    let state = dedupe::load(self.kafka_cfg, &record.topic, self.exactly_once())
                        .await
                        .map_err(dedupe_error)?;
                    st.topics.insert(record.topic.clone(), state);
                }
                let topic = &st.topics[&record.topic];
                // The relay picks the partition (murmur2 of the key, as Kafka's
                // Java clients do), so a replayed record lands where it did before.
                let key = record
                    .key
                    .as_deref()
                    .or_else(|| {
                        record
                            .headers
                            .iter()
                            .find(|(k, _)| *k == "event_id")
                            .map(|(_, v)| v.as_str())
                    })
                    .unwrap_or("");
                let partition = dedupe::partition_for(key.as_bytes(), topic.partitions);
                record.partition = Some(partition);
                let held = self.exactly_once() && topic.holds(partition, position);
                if let Some(open) = st.open.as_mut() {
                    if held {
                        open.held += 1;
                    } else {
                        open.produced += 1;
                    }
                    // A Kafka transaction holds whole Postgres transactions and
                    // commits atomically: the partitions' ends cannot show part
                    // of one. If they seem to, they were read before every
                    // partition had its transaction marker (acting on it would
                    // duplicate), or a reader erred (it could lose the rest).
                    if self.transactional()
                        && open.held > 0
                        && open.produced > 0
                        && self.accept_partial != Some(open.info.commit_lsn)
                    {
                        return Err(RelayError::PartialTransaction {
                            commit_lsn: open.info.commit_lsn,
                        });
                    }
                }
                if held {
                    self.shared.metrics.duplicates_skipped.inc();
                    return Ok(());
                }
                if self.transactional() {
                    if st.kbatch.is_none() {
                        sink.begin_transaction().map_err(txn_error)?;
                        st.kbatch = Some(KafkaBatch {
                            started: Instant::now(),
                            records: 0,
                            txns: Vec::new(),
                            first: position,
                            last: position,
                        });
                    }
                    if let Some(b) = st.kbatch.as_mut() {
                        b.add(id, position);
                    }
                }
                st.cp.record_sent(id);
                st.held.push_back((record, id));
                self.send_held(sink, st)?;
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
                }
            }
        }
        Ok(())
    }

    /// Hands held records to the sink in order until it pushes back.
    fn send_held(&self, sink: &mut KafkaSink, st: &mut StreamState) -> Result<(), RelayError> {
        while let Some((record, txn)) = st.held.pop_front() {
            match sink.try_send(record, txn) {
                Ok(()) => {}
                Err(SendError::Full(record)) => {
                    st.held.push_front((record, txn));
                    break;
                }
                Err(SendError::Refused(e)) => return Err(classify_delivery(e)),
            }
        }
        Ok(())
    }

    async fn confirm_if_moved(
        &self,
        stream: &mut ReplicationStream,
        st: &mut StreamState,
        force: bool,
    ) -> Result<(), RelayError> {
        st.confirm_armed = false;
        let confirmed = st.cp.confirmed();
        if force || confirmed > st.last_sent {
            stream
                .send_status(confirmed, confirmed, confirmed, false)
                .await?;
            st.last_sent = confirmed;
            self.shared.update(|s| s.confirmed_lsn = confirmed);
        }
        Ok(())
    }

    fn publish_status(&self, sink: &KafkaSink, st: &StreamState) {
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

struct StreamState {
    cp: Checkpoint,
    relations: RelationCache,
    open: Option<OpenTxn>,
    /// Records not yet accepted by the sink, in stream order.
    held: VecDeque<(OutboxRecord, TxnId)>,
    /// Partition count and (exactly-once) last position per partition, of
    /// every topic this session produces to.
    topics: HashMap<String, dedupe::TopicState>,
    /// Newest position sent to Postgres in a standby status update.
    last_sent: Lsn,
    /// A status update is due within CONFIRM_DELAY.
    confirm_armed: bool,
    /// When the server last sent anything (for the lease).
    last_contact: Instant,
    /// With --kafka-transactions: the open Kafka transaction.
    kbatch: Option<KafkaBatch>,
    received: Lsn,
}

/// Applies a delivery report. `ack`: a delivered record counts toward
/// confirmation (false with Kafka transactions, where only the commit does).
fn apply_report(
    shared: &Shared,
    cp: &mut Checkpoint,
    report: DeliveryReport,
    ack: bool,
) -> Result<(), RelayError> {
    match report {
        DeliveryReport::Delivered { txn, topic, .. } => {
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
        DeliveryReport::Failed { error, .. } => {
            shared.metrics.produce_errors.inc();
            Err(classify_delivery(error))
        }
        DeliveryReport::Fatal { reason } => {
            shared.metrics.produce_errors.inc();
            Err(RelayError::ProducerFatal(reason))
        }
        DeliveryReport::Denied(denied) => {
            shared.metrics.produce_errors.inc();
            Err(RelayError::KafkaAccess(denied))
        }
    }
}

/// Reading a topic's end (exactly-once) without the right to: definite.
fn dedupe_error(e: dedupe::DedupeError) -> RelayError {
    match &e {
        dedupe::DedupeError::Kafka { topic, source } => {
            let detail = format!(
                "reading the ends of topic {topic} for the exactly-once restart \
                 (READ on the topic, DESCRIBE on group outbox-relay-dedupe)"
            );
            match AccessDenied::from_error(source, detail) {
                Some(denied) => RelayError::KafkaAccess(denied),
                None => RelayError::Dedupe(e),
            }
        }
        _ => RelayError::Dedupe(e),
    }
}

/// Errors a replay cannot fix stop the relay; the rest are retried.
fn classify_delivery(error: KafkaError) -> RelayError {
    if let Some(denied) = AccessDenied::from_error(&error, "producing a record") {
        return RelayError::KafkaAccess(denied);
    }
    let permanent = matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidRecord
        )
    );
    if permanent {
        RelayError::DeliveryPermanent(error)
    } else {
        RelayError::Delivery(error)
    }
}

/// Samples lag and retained WAL on an ordinary SQL connection.
async fn sample_lag(cfg: Config, shared: Arc<Shared>, stop: CancellationToken) {
    let Ok(params) = ConnectParams::from_url(&cfg.database_url) else {
        return;
    };
    let mut client = None;
    let mut ticker = tokio::time::interval(cfg.lag_sample_interval);
    // While the slot retains too much WAL: ERROR at once, then once a minute.
    let mut last_retained_error: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if client.is_none() {
            match sql::connect(&params).await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    tracing::debug!(error = %e, "lag sampler cannot connect");
                    continue;
                }
            }
        }
        let Some(c) = &client else { continue };
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
                client = None;
            }
        }
    }
}
