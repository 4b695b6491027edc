//! order-api: the curl-driven order service. Every order change commits its
//! `orders` row and its `outbox` event in one Postgres transaction; the relay
//! streams the outbox to Kafka.
//!
//! ```text
//!  HTTP ──▶ http (parse, validate: 400/413/415/422) ──▶ store (one transaction)
//!                                                         ├─ orders  INSERT/UPDATE
//!                                                         ├─ outbox  INSERT (OrderCreated / OrderStatusChanged),
//!                                                         │          or a logical decoding message (--outbox-mode message)
//!                                                         └─ idempotency_keys (with an Idempotency-Key)
//! ```
//!
//! Modules: [`order`] (the domain: validation, status machine, event
//! payloads), [`store`] (SQL), [`http`] (routes and middleware), [`error`]
//! (problem+json), [`metrics`], [`config`]; the shutdown signal is `lifecycle::on_signal`.
//!
//! Tests and benchmarks drive [`bind`] + [`Server::serve`] (or [`run`])
//! in-process.

pub mod config;
pub mod error;
pub mod http;
pub mod metrics;
pub mod order;
pub mod store;

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::http::AppState;
use crate::metrics::Metrics;
use crate::store::{Outbox, PoolConfig, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up the database pool")]
    Store(#[source] StoreError),
    #[error("cannot use the outbox mode")]
    Outbox(#[source] StoreError),
    #[error("the HTTP server failed")]
    Serve(#[source] std::io::Error),
}

pub use lifecycle::error_chain;

/// A bound, not yet serving, service.
pub struct Server {
    listener: tokio::net::TcpListener,
    state: AppState,
    config: Config,
}

/// Binds the listen address and builds the pool. In table mode no
/// connection is opened yet: the service starts with the database down and
/// `/readyz` says so. In message mode one connection checks `wal_level`
/// first and a server that cannot decode the messages is refused; if the
/// database is down the service starts and `/readyz` repeats the check.
pub async fn bind(config: Config) -> Result<Server, Error> {
    let pool = store::pool(
        &config.database_url,
        &PoolConfig {
            max_size: config.pool_size,
            timeout: config.pool_timeout,
        },
    )
    .map_err(Error::Store)?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| Error::Bind {
            addr: config.listen,
            source,
        })?;
    let store = Store::new(pool, config.idempotency_ttl, config.outbox());
    match store.outbox() {
        Outbox::Table => tracing::info!(outbox_mode = "table", "outbox events are outbox rows"),
        Outbox::Message { prefix } => {
            match store.check_wal_level().await {
                Ok(()) => {}
                Err(e @ StoreError::WalLevel(_)) => return Err(Error::Outbox(e)),
                Err(e) => tracing::warn!(
                    error = %error_chain(&e),
                    "cannot check wal_level now; /readyz checks it until it can"
                ),
            }
            tracing::info!(
                outbox_mode = "message",
                prefix = %prefix,
                "outbox events are logical decoding messages"
            );
        }
    }
    let state = AppState {
        store,
        metrics: Arc::new(Metrics::new()),
        body_limit: config.body_limit,
        request_timeout: config.request_timeout,
    };
    Ok(Server {
        listener,
        state,
        config,
    })
}

impl Server {
    /// The bound address (the real port when the config said port 0).
    pub fn local_addr(&self) -> SocketAddr {
        // A bound TcpListener always has a local address.
        self.listener.local_addr().unwrap_or(self.config.listen)
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.state.metrics.clone()
    }

    /// Serves until `shutdown` is cancelled, then stops accepting, lets
    /// in-flight requests finish (at most the shutdown timeout) and closes
    /// the pool.
    pub async fn serve(self, shutdown: CancellationToken) -> Result<(), Error> {
        let addr = self.local_addr();
        let store = self.state.store.clone();
        let janitor = tokio::spawn(expire_keys(
            store.clone(),
            self.config.idempotency_ttl,
            shutdown.child_token(),
        ));
        tracing::info!(%addr, "order-api listening");
        let app = http::router(self.state);
        let server = axum::serve(self.listener, app)
            .with_graceful_shutdown(shutdown.clone().cancelled_owned())
            .into_future();
        let grace = self.config.shutdown_timeout;
        let result = tokio::select! {
            r = server => r.map_err(Error::Serve),
            _ = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
                tracing::warn!(timeout = ?grace, "in-flight requests did not finish in time");
                Ok(())
            }
        };
        janitor.abort();
        store.pool().close();
        tracing::info!("order-api stopped");
        result
    }
}

/// Binds and serves until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    bind(config).await?.serve(shutdown).await
}

/// Deletes expired idempotency keys now and then (expired keys are already
/// ignored by lookups; this only bounds the table).
async fn expire_keys(store: Store, ttl: Duration, stop: CancellationToken) {
    let every = ttl.clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match store.delete_expired_keys().await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(deleted = n, "expired idempotency keys deleted"),
            Err(e) => {
                tracing::debug!(error = %error_chain(&e), "cannot delete expired idempotency keys")
            }
        }
    }
}
