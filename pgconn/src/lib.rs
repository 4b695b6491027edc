//! Connecting to Postgres, one way for every binary (relay, notifier,
//! order-api, loadgen, devstack).
//!
//! ```text
//!  URL / key=value ──ConnectParams::from_url──▶ ConnectParams (sslmode, sslrootcert, …)
//!                                                 ├─ client_config ─▶ rustls (libpq's sslmode meaning)
//!                                                 ├─ connect ───────▶ tokio_postgres::Client
//!                                                 └─ pool ──────────▶ deadpool_postgres::Pool
//! ```
//!
//! `sslmode` means what it means to libpq, including `verify-ca` and
//! `verify-full`, which `tokio_postgres` alone does not know; managed
//! Postgres services that demand TLS are reachable from every binary.
//! Errors never quote a password. The relay's replication connection is
//! its own protocol code but uses the same parameters and TLS set-up.

mod connect;
mod error;
mod params;
mod tls;

pub use connect::{connect, pg_config, pool, PoolSettings};
pub use error::{is_certificate_rejection, sqlstate_is_transient, ConnectError};
pub use params::{ConnectParams, SslMode, DEFAULT_CONNECT_TIMEOUT};
pub use tls::{client_config, connector};
