//! Errors of the replication connection and of slot/publication setup.
//!
//! Every error is classified by [`ReplicationError::is_transient`]:
//! transient errors (connection lost, server restarting, slot held by
//! another process, anything unknown) are retried with a bounded backoff;
//! definite errors (bad credentials, bad configuration, a slot that belongs
//! to another plugin or database, missing privileges) stop the relay with a
//! message saying why. `Display` never prints the cause chain nor a password.

use std::fmt;
use std::io;
use std::time::Duration;

use tokio_postgres::fallible_iterator::FallibleIterator;

use pgconn::{is_certificate_rejection, ConnectError, SslMode};

/// An error reported by the server (the fields of an `ErrorResponse`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerError {
    /// `ERROR`, `FATAL` or `PANIC` (not localized).
    pub severity: String,
    /// The five-character SQLSTATE, e.g. `55006`.
    pub code: String,
    /// The primary human-readable message.
    pub message: String,
    /// Optional secondary message.
    pub detail: Option<String>,
    /// Optional suggestion.
    pub hint: Option<String>,
}

impl ServerError {
    /// Reads the fields of an `ErrorResponse` or `NoticeResponse` body.
    pub(crate) fn from_fields(
        mut fields: postgres_protocol::message::backend::ErrorFields<'_>,
    ) -> io::Result<ServerError> {
        let mut err = ServerError {
            severity: String::new(),
            code: String::new(),
            message: String::new(),
            detail: None,
            hint: None,
        };
        let mut localized_severity = None;
        while let Some(field) = fields.next()? {
            let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
            match field.type_() {
                b'V' => err.severity = value,
                b'S' => localized_severity = Some(value),
                b'C' => err.code = value,
                b'M' => err.message = value,
                b'D' => err.detail = Some(value),
                b'H' => err.hint = Some(value),
                _ => {}
            }
        }
        if err.severity.is_empty() {
            err.severity = localized_severity.unwrap_or_default();
        }
        Ok(err)
    }

    /// Converts the server error carried by a `tokio_postgres` error.
    pub(crate) fn from_db_error(db: &tokio_postgres::error::DbError) -> ServerError {
        ServerError {
            severity: db.severity().to_owned(),
            code: db.code().code().to_owned(),
            message: db.message().to_owned(),
            detail: db.detail().map(str::to_owned),
            hint: db.hint().map(str::to_owned),
        }
    }

    /// Whether retrying later may succeed: false for authentication,
    /// privilege, missing database, invalid name/syntax/parameter and
    /// prerequisite-state errors (28000, 28P01, 42501, 3D000, 42601, 42602,
    /// 22023, 55000); true for everything else.
    pub fn is_transient(&self) -> bool {
        pgconn::sqlstate_is_transient(&self.code)
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)
    }
}

/// Everything that can go wrong on a replication connection or while
/// preparing its slot and publication.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicationError {
    /// The connection URL or settings are invalid. Definite.
    #[error("invalid connection settings: {0}")]
    Config(String),

    /// A slot or publication name Postgres would reject or truncate. Definite.
    #[error("invalid {kind} name {name:?}: {reason}")]
    InvalidName {
        kind: &'static str,
        name: String,
        reason: &'static str,
    },

    /// The TCP (or Unix socket) connection could not be opened. Transient.
    #[error("could not connect to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },

    /// Connecting, TLS and authentication took longer than the connect timeout. Transient.
    #[error("timed out after {after:?} connecting to {addr}")]
    ConnectTimeout { addr: String, after: Duration },

    /// The server answered the SSLRequest with "no", and the ssl mode requires TLS. Definite.
    #[error("server {addr} does not accept TLS, but sslmode={mode} requires it")]
    TlsRefused { addr: String, mode: SslMode },

    /// The TLS handshake failed. Definite when the certificate was rejected,
    /// transient otherwise.
    #[error("TLS handshake with {addr} failed")]
    Tls {
        addr: String,
        #[source]
        source: io::Error,
    },

    /// The root certificate file could not be read or holds no certificate. Definite.
    #[error("cannot use TLS root certificates from {path}: {reason}")]
    RootCert { path: String, reason: String },

    /// Authentication failed on the client side: no password given, an
    /// unsupported method, or a server that failed to prove it knows the
    /// password (SCRAM). Server-side failures are [`ReplicationError::Server`]
    /// with SQLSTATE 28P01/28000. Definite.
    #[error("authentication failed: {0}")]
    Auth(String),

    /// Reading from or writing to the connection failed. Transient.
    #[error("I/O error on the replication connection")]
    Io(#[source] io::Error),

    /// The server closed the connection. Transient.
    #[error("replication connection closed by the server")]
    ConnectionLost,

    /// The server ended the CopyBoth stream (CopyDone). Transient.
    #[error("server ended the replication stream")]
    StreamEnded,

    /// The server sent something the protocol does not allow here. Transient
    /// (unknown), since a reconnect starts from a clean state.
    #[error("protocol violation: {0}")]
    Protocol(String),

    /// The server reported an error. Transient or definite by SQLSTATE
    /// (see [`ServerError::is_transient`]).
    #[error("{context}: {error}")]
    Server {
        context: &'static str,
        error: Box<ServerError>,
    },

    /// `START_REPLICATION` failed because another process streams the slot
    /// (SQLSTATE 55006). Transient: the other process may go away; an HA
    /// standby waits on this.
    #[error("replication slot {slot:?} is in use by another process: {error}")]
    SlotBusy {
        slot: String,
        error: Box<ServerError>,
    },

    /// The slot exists but does not use `pgoutput` (or is a physical slot). Definite.
    #[error("replication slot {slot:?} uses output plugin {plugin}, expected pgoutput")]
    SlotWrongPlugin { slot: String, plugin: String },

    /// Postgres invalidated the slot (`wal_status` `lost`): the WAL it still
    /// needed was removed, so the events committed after its confirmed
    /// position may never reach Kafka through it. Definite: the relay never
    /// replaces a slot by itself.
    #[error(
        "replication slot {slot:?} was invalidated by Postgres (wal_status lost: the WAL it \
         needed was removed, e.g. past max_slot_wal_keep_size); events committed after its \
         confirmed position {confirmed} may be missing from Kafka. The relay does not replace \
         a slot by itself. To go on with nothing lost: `relay slot drop --slot {slot} --yes`; \
         start the relay with --allow-new-slot (it creates a new slot at the current position) \
         and stop it; `relay verify --republish-missing` (publishes, marked late, the outbox \
         rows committed in between that the topic lacks); start the relay again"
    )]
    SlotLost { slot: String, confirmed: String },

    /// The slot exists but was created in another database. Definite.
    #[error("replication slot {slot:?} belongs to database {database:?}, not {expected:?}")]
    SlotOtherDatabase {
        slot: String,
        database: String,
        expected: String,
    },

    /// The SQL connection and the replication connection point at different databases. Definite.
    #[error(
        "SQL connection is to database {sql:?} but the replication connection to {replication:?}"
    )]
    DatabaseMismatch { sql: String, replication: String },

    /// The outbox table to publish does not exist. Definite.
    #[error("table {0} does not exist (for events written only as logical decoding messages, start with --table '')")]
    TableMissing(String),

    /// Opening the ordinary SQL connection failed without a server error:
    /// definite when the server's certificate was rejected, transient otherwise.
    #[error("sql connect")]
    SqlConnect(#[source] ConnectError),

    /// A query on the ordinary SQL connection failed without a server error
    /// (connection closed, I/O). Transient.
    #[error("{context}: SQL connection failed")]
    Sql {
        context: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
}

impl ReplicationError {
    /// Whether retrying (with backoff) may succeed. Unknown errors are transient.
    pub fn is_transient(&self) -> bool {
        match self {
            ReplicationError::Config(_)
            | ReplicationError::InvalidName { .. }
            | ReplicationError::TlsRefused { .. }
            | ReplicationError::RootCert { .. }
            | ReplicationError::Auth(_)
            | ReplicationError::SlotWrongPlugin { .. }
            | ReplicationError::SlotLost { .. }
            | ReplicationError::SlotOtherDatabase { .. }
            | ReplicationError::DatabaseMismatch { .. }
            | ReplicationError::TableMissing(_) => false,
            ReplicationError::Tls { source, .. } => !is_certificate_rejection(source),
            ReplicationError::SqlConnect(e) => e.is_transient(),
            ReplicationError::Server { error, .. } => error.is_transient(),
            ReplicationError::Connect { .. }
            | ReplicationError::ConnectTimeout { .. }
            | ReplicationError::Io(_)
            | ReplicationError::ConnectionLost
            | ReplicationError::StreamEnded
            | ReplicationError::Protocol(_)
            | ReplicationError::SlotBusy { .. }
            | ReplicationError::Sql { .. } => true,
        }
    }

    /// The server's error, when the server reported one.
    pub fn server_error(&self) -> Option<&ServerError> {
        match self {
            ReplicationError::Server { error, .. } | ReplicationError::SlotBusy { error, .. } => {
                Some(error.as_ref())
            }
            _ => None,
        }
    }

    /// The server's SQLSTATE, when the server reported an error.
    pub fn sqlstate(&self) -> Option<&str> {
        self.server_error().map(|e| e.code.as_str())
    }

    /// Wraps a `tokio_postgres` error from the SQL connection: server errors
    /// keep their SQLSTATE and message, others become [`ReplicationError::Sql`].
    pub(crate) fn from_sql(context: &'static str, err: tokio_postgres::Error) -> ReplicationError {
        match err.as_db_error() {
            Some(db) => ReplicationError::Server {
                context,
                error: Box::new(ServerError::from_db_error(db)),
            },
            None => ReplicationError::Sql {
                context,
                source: err,
            },
        }
    }

    /// Wraps an I/O error from the framed connection: undecodable bytes are a
    /// protocol violation, anything else an I/O failure.
    pub(crate) fn from_io(err: io::Error) -> ReplicationError {
        match err.kind() {
            io::ErrorKind::InvalidData | io::ErrorKind::InvalidInput => {
                ReplicationError::Protocol(err.to_string())
            }
            io::ErrorKind::UnexpectedEof => ReplicationError::ConnectionLost,
            _ => ReplicationError::Io(err),
        }
    }
}

impl From<ConnectError> for ReplicationError {
    fn from(e: ConnectError) -> Self {
        match e {
            ConnectError::Config(msg) => ReplicationError::Config(msg),
            ConnectError::RootCert { path, reason } => ReplicationError::RootCert { path, reason },
            // A server error keeps its SQLSTATE (and its classification).
            ConnectError::Postgres { source, .. } if source.as_db_error().is_some() => {
                ReplicationError::from_sql("sql connect", source)
            }
            other => ReplicationError::SqlConnect(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: &str) -> ReplicationError {
        ReplicationError::Server {
            context: "test",
            error: Box::new(ServerError {
                severity: "FATAL".into(),
                code: code.into(),
                message: "m".into(),
                detail: None,
                hint: None,
            }),
        }
    }

    #[test]
    fn classifies_server_errors_by_sqlstate() {
        for transient in ["57P01", "57P02", "57P03", "53300", "XX000", "08006"] {
            assert!(server(transient).is_transient(), "{transient}");
        }
        for definite in ["28P01", "28000", "42501", "3D000"] {
            assert!(!server(definite).is_transient(), "{definite}");
        }
    }

    #[test]
    fn display_includes_sqlstate_and_message() {
        assert_eq!(server("28P01").to_string(), "test: FATAL 28P01: m");
    }

    #[test]
    fn certificate_rejection_is_definite() {
        let rejected = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        let tls = |source| ReplicationError::Tls {
            addr: "h:1".into(),
            source,
        };
        assert!(!tls(rejected).is_transient());
        assert!(tls(reset).is_transient());
    }
}
