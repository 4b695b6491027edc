//! The notifier's HTTP endpoints on port 9102: `/metrics` (Prometheus text)
//! and `/healthz` (200 while the notifier runs and has not failed).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::metrics::Metrics;

/// State shared by the consumer loop (writer) and the HTTP handlers.
pub struct Shared {
    pub metrics: Metrics,
    failed: AtomicBool,
    http_addr: Mutex<Option<SocketAddr>>,
}

impl Shared {
    pub fn new() -> Arc<Shared> {
        Arc::new(Shared {
            metrics: Metrics::new(),
            failed: AtomicBool::new(false),
            http_addr: Mutex::new(None),
        })
    }

    /// The address the HTTP server is bound to, once it is.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        *self.http_addr.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn set_http_addr(&self, addr: Option<SocketAddr>) {
        *self.http_addr.lock().unwrap_or_else(|p| p.into_inner()) = addr;
    }

    pub(crate) fn set_failed(&self) {
        self.failed.store(true, Ordering::Relaxed);
    }

    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }
}

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(shared)
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    shared.metrics.response()
}

async fn healthz(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    if shared.is_failed() {
        (StatusCode::SERVICE_UNAVAILABLE, "failed\n")
    } else {
        (StatusCode::OK, "ok\n")
    }
}
