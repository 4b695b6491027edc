//! Pipeline: the relay's event loop, from the replication stream to Kafka
//! and back to the slot's confirmed position. This file holds the entry
//! points and the error type; the jobs are in their own files, in the order
//! a row meets them: `supervisor` (reconnect with backoff), `session` (take
//! the slot, ready Kafka), `apply` (the apply loop: WAL → records → acks →
//! confirmation; generic over its [`WalSource`] and its [`Sink`], so
//! `tests` drives it with hand-made pgoutput messages and an in-memory
//! sink) with `admit` (a record into the sink, in order), and beside them
//! `lag` (the lag sampler).
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

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::checkpoint::{Checkpoint, TxnId};
use crate::config::{Config, Delivery};
use crate::dead_letter::DeadLetters;
use crate::dedupe;
pub use crate::error::RelayError;
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
use crate::sink::{DeliveryReport, KafkaConfig, KafkaSink, Placement, SendError, Sink};
use crate::topics;

mod admit;
mod apply;
mod backfill;
mod lag;
mod session;
mod supervisor;
#[cfg(test)]
mod tests;

use admit::*;
pub use apply::WalSource;
use apply::*;
use backfill::Backfilled;
pub use backfill::{
    parse_backfill, BackfillFrom, BackfillProgress, STATE_TABLE as BACKFILL_STATE_TABLE,
};
use lag::*;
use session::*;
use supervisor::*;

/// How long a moved confirmable position may wait before it is sent to
/// Postgres: short enough that the slot follows Kafka's acks closely (and a
/// restart replays little), long enough that a burst of acks costs one
/// status update, not thousands. At 10 ms, a catch-up of 100k one-row
/// transactions cost the relay 7.7 CPU seconds; at 100 ms, 3.6 (BENCHMARKS.md,
/// "vs Debezium").
pub const CONFIRM_DELAY: Duration = Duration::from_millis(100);

/// How many sessions in a row find the same Postgres transaction only partly
/// in Kafka (with Kafka transactions) before the relay takes that view as it
/// is.
const PARTIAL_TRANSACTION_READS: u32 = 3;

/// How often a session answers the walsender while it readies Kafka (at
/// most; `--status-interval` when shorter).
const SETUP_STATUS_INTERVAL: Duration = Duration::from_secs(1);

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
    if !cfg.retention.is_zero() && !cfg.has_table() {
        return Err(RelayError::RetentionWithoutTable);
    }
    let http_stop = shutdown.child_token();
    let (http_addr, http) = lifecycle::http::serve(
        cfg.listen,
        crate::http::router(shared.clone()),
        http_stop.clone(),
    )
    .await
    .map_err(|source| RelayError::Listen {
        addr: cfg.listen,
        source,
    })?;
    shared.set_http_addr(Some(http_addr));
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
    let retention = (!cfg.retention.is_zero()).then(|| {
        tokio::spawn(crate::retention::run(
            cfg.clone(),
            shared.clone(),
            shutdown.child_token(),
        ))
    });
    let heartbeat = match replication::connect_params(&cfg.database_url) {
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
    if let Some(h) = retention {
        h.abort();
    }
    if let Some(h) = heartbeat {
        h.abort();
    }
    let _ = http.await;
    result
}
