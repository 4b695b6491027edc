//! Ordinary SQL connections (tokio-postgres) and pools (deadpool-postgres),
//! with TLS as `sslmode` says.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::config::SslMode as PgSslMode;
use tokio_postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::error::ConnectError;
use crate::params::{ConnectParams, SslMode};
use crate::tls::client_config;

/// The `tokio_postgres` configuration for `params`. TLS is negotiated by
/// the connector of [`connect`] / [`pool`]: `prefer` tries it, the verify
/// modes and `require` insist on it.
pub fn pg_config(params: &ConnectParams) -> tokio_postgres::Config {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(&params.host)
        .port(params.port)
        .user(&params.user)
        .dbname(&params.dbname)
        .connect_timeout(params.connect_timeout)
        .ssl_mode(match params.ssl_mode {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => PgSslMode::Require,
        });
    if !params.application_name.is_empty() {
        cfg.application_name(&params.application_name);
    }
    if let Some(pw) = &params.password {
        cfg.password(pw);
    }
    cfg
}

fn make_tls(params: &ConnectParams) -> Result<MakeRustlsConnect, ConnectError> {
    Ok(MakeRustlsConnect::new(client_config(params)?))
}

/// Opens a SQL connection described by `params` and drives it in the
/// background (its end is logged at debug level).
pub async fn connect(params: &ConnectParams) -> Result<Client, ConnectError> {
    let (client, conn) = pg_config(params)
        .connect(make_tls(params)?)
        .await
        .map_err(|source| ConnectError::Postgres {
            addr: params.addr(),
            source,
        })?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "sql connection closed");
        }
    });
    Ok(client)
}

/// Size and patience of a [`pool`].
#[derive(Clone, Copy, Debug)]
pub struct PoolSettings {
    pub max_size: usize,
    /// Limit for waiting on a free connection, creating and recycling one.
    pub timeout: Duration,
}

/// A pool of connections described by `params`. No connection is opened
/// until the first use, so a service can start with the database down.
pub fn pool(params: &ConnectParams, settings: PoolSettings) -> Result<Pool, ConnectError> {
    let manager = Manager::from_config(
        pg_config(params),
        make_tls(params)?,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(settings.max_size.max(1))
        .wait_timeout(Some(settings.timeout))
        .create_timeout(Some(settings.timeout))
        .recycle_timeout(Some(settings.timeout))
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| ConnectError::Config(e.to_string()))
}
