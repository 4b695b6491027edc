//! Ordinary SQL connections (tokio-postgres) to the same database as the
//! replication connection, with the same parameters and TLS settings: used
//! for publication/slot setup and lag sampling.

use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{Client, Socket};

use crate::replication::{ConnectParams, ReplicationError, SslMode};

/// Opens a SQL connection described by `params` and drives it in the
/// background.
pub async fn connect(params: &ConnectParams) -> Result<Client, ReplicationError> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(&params.host)
        .port(params.port)
        .user(&params.user)
        .dbname(&params.dbname)
        .application_name(&params.application_name)
        .connect_timeout(params.connect_timeout);
    if let Some(pw) = &params.password {
        cfg.password(pw);
    }
    use tokio_postgres::config::SslMode as PgSslMode;
    match params.ssl_mode {
        SslMode::Disable => {
            cfg.ssl_mode(PgSslMode::Disable);
            connect_with(&cfg, tokio_postgres::NoTls).await
        }
        mode => {
            cfg.ssl_mode(if mode == SslMode::Prefer {
                PgSslMode::Prefer
            } else {
                PgSslMode::Require
            });
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new(
                crate::replication::tls_client_config(params)?,
            );
            connect_with(&cfg, tls).await
        }
    }
}

async fn connect_with<T>(cfg: &tokio_postgres::Config, tls: T) -> Result<Client, ReplicationError>
where
    T: MakeTlsConnect<Socket>,
    T::Stream: Send + 'static,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    let (client, conn) = cfg
        .connect(tls)
        .await
        .map_err(|e| ReplicationError::from_sql("sql connect", e))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "sql connection closed");
        }
    });
    Ok(client)
}
