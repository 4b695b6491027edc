//! Replication connection: a Postgres connection in logical replication
//! mode streaming a `pgoutput` slot, built on `postgres_protocol` messages
//! because `tokio-postgres` cannot open one (no `replication=database`
//! startup parameter, no CopyBoth).
//!
//! Owns: connection settings ([`ConnectParams`]), TLS and authentication
//! (trust, cleartext, MD5, SCRAM-SHA-256), replication commands
//! (`IDENTIFY_SYSTEM`, `CREATE_REPLICATION_SLOT`, `START_REPLICATION`), the
//! CopyBoth stream ([`ReplicationStream`]), and slot/publication setup
//! ([`prepare_slot`], [`ensure_publication`]).
//!
//! Guarantees:
//! - [`ReplicationStream::recv`] is cancel-safe; use it in `tokio::select!`.
//! - Slots and publications are created when missing, never dropped or
//!   altered; a slot with the wrong plugin or database is a definite error.
//! - Every error says whether a retry may help
//!   ([`ReplicationError::is_transient`]); a slot held by another process is
//!   [`ReplicationError::SlotBusy`]. Passwords never appear in `Debug`,
//!   `Display` or logs.
//! - The module only reports positions; what to confirm, and when, is the
//!   checkpoint module's decision ([`ReplicationStream::send_status`]).
//!
//! ```text
//!  relay                                                 walsender
//!    │── SSLRequest ─────────────────────────────────────────▶│  (sslmode ≠ disable)
//!    │◀─ 'S' ─ TLS handshake ─────────────────────────────────│
//!    │── StartupMessage(user, database, replication=database) ▶│
//!    │◀─ Authentication{Ok|CleartextPassword|MD5|SASL…} ──────│
//!    │── PasswordMessage / SASLInitialResponse / SASLResponse ▶│
//!    │◀─ ParameterStatus*, BackendKeyData, ReadyForQuery ─────│
//!    │── IDENTIFY_SYSTEM (CREATE_REPLICATION_SLOT if missing) ▶│
//!    │◀─ RowDescription, DataRow, CommandComplete, ReadyForQuery
//!    │── START_REPLICATION SLOT "s" LOGICAL X/Y (…) ──────────▶│
//!    │◀─ CopyBothResponse ('W') ──────────────────────────────│
//!    │◀─ CopyData 'w' XLogData (pgoutput B, R, I, C …) ────────│  recv()
//!    │◀─ CopyData 'k' keepalive (reply requested?) ───────────│  recv()
//!    │── CopyData 'r' standby status (written/flushed/applied) ▶│  send_status()
//!    │── CopyDone … ◀─ CopyDone, ReadyForQuery ── Terminate ──▶│  finish()
//! ```

mod codec;
mod conn;
mod error;
mod names;
mod slot;
mod stream;
mod transport;

pub use conn::{ReplicationConnection, TextRow};
pub use error::{ReplicationError, ServerError};
pub use pgconn::{ConnectParams, SslMode, DEFAULT_CONNECT_TIMEOUT};
pub use slot::{ensure_publication, prepare_slot, slot_state, PreparedSlot, SlotInfo, PLUGIN};
pub use stream::{ReplicationMessage, ReplicationStream};

pub(crate) use names::quote_ident;

use crate::lsn::Lsn;

/// The relay's `application_name` unless the URL names one: visible in
/// `pg_stat_replication`.
pub const DEFAULT_APPLICATION_NAME: &str = "relay";

/// The relay's connection settings from `--database-url`.
pub fn connect_params(url: &str) -> Result<ConnectParams, ReplicationError> {
    Ok(ConnectParams::from_url(url)?.or_application_name(DEFAULT_APPLICATION_NAME))
}

/// An ordinary SQL connection with the replication connection's settings
/// (slot and publication set-up, lag sampling, heartbeats).
pub async fn sql_connect(
    params: &ConnectParams,
) -> Result<tokio_postgres::Client, ReplicationError> {
    Ok(pgconn::connect(params).await?)
}

/// An ordinary SQL connection of a background task (the lag sampler,
/// heartbeats, retention): made on first use, and again after the task
/// found it broken.
pub struct LazySql {
    params: ConnectParams,
    client: Option<tokio_postgres::Client>,
}

impl LazySql {
    pub fn new(params: ConnectParams) -> LazySql {
        LazySql {
            params,
            client: None,
        }
    }

    /// The connection, connecting first if there is none.
    pub async fn get(&mut self) -> Result<&tokio_postgres::Client, ReplicationError> {
        let client = match self.client.take() {
            Some(c) => c,
            None => sql_connect(&self.params).await?,
        };
        Ok(self.client.insert(client))
    }

    /// Forgets the connection after a failed query: the next
    /// [`LazySql::get`] connects again.
    pub fn reset(&mut self) {
        self.client = None;
    }
}

/// The answer to `IDENTIFY_SYSTEM`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SystemInfo {
    /// Cluster identifier (decimal text, it does not fit an i64 reliably).
    pub system_id: String,
    /// Current timeline.
    pub timeline: u32,
    /// Current WAL flush position.
    pub xlogpos: Lsn,
    /// Database of the connection (`None` for a physical replication connection).
    pub dbname: Option<String>,
}
