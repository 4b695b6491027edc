//! Heartbeats: keep the slot moving while the outbox is idle.
//!
//! When nothing is written to the outbox, pgoutput sends the relay nothing
//! to confirm, while other tables (and other databases of the cluster) keep
//! writing WAL the slot must retain. Every `--heartbeat-interval` the relay
//! writes a non-transactional logical decoding message on an ordinary SQL
//! connection:
//!
//! ```text
//!   heartbeat task ── SELECT pg_logical_emit_message(false, PREFIX, slot) ──▶ WAL
//!                                                                           │
//!   pipeline ◀── pgoutput Message (prefix PREFIX, content = slot) ◀──────────┘
//!      └─ counted in relay_heartbeats_total; when nothing is pending its
//!         position is confirmed, so the slot advances past the idle WAL
//! ```
//!
//! No heartbeat table is needed (Debezium needs one) and heartbeats are
//! never produced to Kafka. Every slot on the database sees every relay's
//! heartbeats; each relay counts only its own (content = its slot name),
//! but any of them moves an idle relay's position.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::pgoutput::LogicalDecodingMessage;
use crate::replication::{ConnectParams, LazySql};

/// The logical decoding message prefix of relay heartbeats.
pub const PREFIX: &str = "outbox-relay.heartbeat";

/// True for a heartbeat this relay (slot `slot`) wrote.
pub fn is_own(message: &LogicalDecodingMessage, slot: &str) -> bool {
    message.prefix == PREFIX && message.content.as_ref() == slot.as_bytes()
}

/// Emits a heartbeat every `interval` until `stop`; failures are logged and
/// retried on the next tick (the replication session reports connection
/// trouble on its own).
pub async fn run(params: ConnectParams, slot: String, interval: Duration, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sql = LazySql::new(params);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let c = match sql.get().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat: cannot connect");
                continue;
            }
        };
        let sent = c
            .execute(
                "SELECT pg_logical_emit_message(false, $1, $2::text)",
                &[&PREFIX, &slot],
            )
            .await;
        if let Err(e) = sent {
            tracing::warn!(error = %e, "heartbeat failed; reconnecting");
            sql.reset();
        }
    }
}
