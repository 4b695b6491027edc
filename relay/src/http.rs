//! The relay's HTTP endpoints on port 9101: `/metrics` (Prometheus text),
//! `/healthz` (200 while the relay is running, not failed, not stalled
//! (`--stall-timeout`) and its slot retains less WAL than
//! `--max-retained-wal`; else 503 and why) and `/status`
//! (JSON: slot, state, received/confirmed LSN, lag in bytes and seconds).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::lsn::Lsn;
use crate::metrics::Metrics;

/// What the relay is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RelayState {
    Starting,
    Connecting,
    /// Delivering the rows written before the slot existed (`--backfill`).
    Backfilling,
    Streaming,
    Reconnecting,
    /// Another relay streams the slot; this one takes over when it is free.
    Standby,
    Stopping,
    Failed,
}

/// The body of `/status`.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub slot: String,
    pub publication: String,
    pub state: RelayState,
    /// `active` while this relay streams the slot, `standby` while another
    /// one does, `none` otherwise (connecting, reconnecting, stopped).
    pub role: &'static str,
    /// Newest WAL position received from the server.
    #[serde(serialize_with = "as_text")]
    pub received_lsn: Lsn,
    /// Newest position confirmed to the server.
    #[serde(serialize_with = "as_text")]
    pub confirmed_lsn: Lsn,
    /// Server WAL position minus the confirmed position (last sample).
    pub lag_bytes: u64,
    /// Age of the oldest commit not yet acknowledged by Kafka.
    pub lag_seconds: f64,
    /// WAL retained by the slot (last sample).
    pub retained_wal_bytes: u64,
    /// Transactions received and not yet confirmable.
    pub pending_transactions: usize,
    /// Records handed to Kafka and not yet acknowledged.
    pub in_flight_records: usize,
    pub last_error: Option<String>,
    /// Why `/healthz` reports unhealthy while running (retained WAL above
    /// `--max-retained-wal`), if it does.
    pub health_problem: Option<String>,
    /// The stall `/healthz` reports until Kafka acknowledges again.
    pub stall: Option<String>,
    /// The backfill's progress (`--backfill`), once one ran in this process.
    pub backfill: Option<crate::pipeline::BackfillProgress>,
}

fn as_text<S: serde::Serializer>(lsn: &Lsn, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(lsn)
}

/// State shared by the pipeline (writer) and the HTTP handlers (readers).
pub struct Shared {
    pub metrics: Metrics,
    pub status: Mutex<Status>,
    http_addr: Mutex<Option<SocketAddr>>,
    /// `status.stall` is set (read on every acknowledgement, without the lock).
    stalled: AtomicBool,
}

impl Shared {
    pub fn new(slot: &str, publication: &str) -> Arc<Shared> {
        Arc::new(Shared {
            metrics: Metrics::new(),
            status: Mutex::new(Status {
                slot: slot.to_owned(),
                publication: publication.to_owned(),
                state: RelayState::Starting,
                role: "none",
                received_lsn: Lsn::ZERO,
                confirmed_lsn: Lsn::ZERO,
                lag_bytes: 0,
                lag_seconds: 0.0,
                retained_wal_bytes: 0,
                pending_transactions: 0,
                in_flight_records: 0,
                last_error: None,
                health_problem: None,
                stall: None,
                backfill: None,
            }),
            http_addr: Mutex::new(None),
            stalled: AtomicBool::new(false),
        })
    }

    /// Marks the relay stalled (see `--stall-timeout`) until
    /// [`Shared::clear_stall`].
    pub fn set_stall(&self, why: String) {
        self.stalled.store(true, Ordering::Relaxed);
        self.update(|s| s.stall = Some(why));
    }

    /// Kafka acknowledged a record: not stalled (any more).
    pub fn clear_stall(&self) {
        if self.stalled.swap(false, Ordering::Relaxed) {
            tracing::info!("Kafka acknowledges records again; no longer stalled");
            self.update(|s| s.stall = None);
        }
    }

    /// Applies `f` to the status. A poisoned lock (a panic while updating)
    /// still holds a usable status, so it is recovered rather than spread.
    pub fn update(&self, f: impl FnOnce(&mut Status)) {
        let mut guard = self.status.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard);
        let role = match guard.state {
            RelayState::Streaming => "active",
            RelayState::Standby => "standby",
            _ => "none",
        };
        if role != guard.role {
            self.metrics.set_role(role);
            if role == "standby" {
                // Another relay streams the slot: its lag is that relay's.
                guard.lag_bytes = 0;
                guard.lag_seconds = 0.0;
                self.metrics.lag_bytes.set(0);
                self.metrics.lag_seconds.set(0.0);
            }
        }
        guard.role = role;
    }

    /// The address the HTTP server is bound to, once it is.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        *self.http_addr.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn set_http_addr(&self, addr: Option<SocketAddr>) {
        *self.http_addr.lock().unwrap_or_else(|p| p.into_inner()) = addr;
    }

    pub fn snapshot(&self) -> Status {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/status", get(status))
        .with_state(shared)
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    shared.metrics.response()
}

async fn healthz(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let status = shared.snapshot();
    if status.state == RelayState::Failed {
        (StatusCode::SERVICE_UNAVAILABLE, "failed\n".to_owned())
    } else if let Some(stall) = status.stall {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: {stall}\n"),
        )
    } else if let Some(problem) = status.health_problem {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: {problem}\n"),
        )
    } else {
        (StatusCode::OK, "ok\n".to_owned())
    }
}

async fn status(State(shared): State<Arc<Shared>>) -> Json<Status> {
    Json(shared.snapshot())
}
