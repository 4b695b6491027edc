//! What can go wrong connecting, and whether retrying may help.

use std::io;

/// SQLSTATEs that will not go away by retrying; everything else is transient.
const DEFINITE_SQLSTATES: &[&str] = &[
    "28000", // invalid_authorization_specification (no pg_hba.conf entry, ...)
    "28P01", // invalid_password
    "42501", // insufficient_privilege
    "3D000", // invalid_catalog_name: the database does not exist
    "42601", // syntax_error
    "42602", // invalid_name
    "22023", // invalid_parameter_value (bad slot name, unsupported proto_version)
    "55000", // object_not_in_prerequisite_state (wal_level < logical, slot invalidated)
];

/// Whether an error with this SQLSTATE may go away by retrying: false for
/// authentication, privilege, missing database, invalid name/syntax/parameter
/// and prerequisite-state errors; true for everything else.
pub fn sqlstate_is_transient(code: &str) -> bool {
    !DEFINITE_SQLSTATES.contains(&code)
}

/// Why a connection (or a pool) could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL or settings are invalid. Definite. Never quotes a value.
    #[error("invalid connection settings: {0}")]
    Config(String),
    /// The root certificate file could not be read or holds no certificate. Definite.
    #[error("cannot use TLS root certificates from {path}: {reason}")]
    RootCert { path: String, reason: String },
    /// Connecting, TLS or authentication failed.
    #[error("connecting to Postgres at {addr}")]
    Postgres {
        addr: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

impl ConnectError {
    /// Whether retrying (with backoff) may succeed: settings, a rejected
    /// server certificate and definite SQLSTATEs (a wrong password, a missing
    /// database) are not worth it; an unreachable server is.
    pub fn is_transient(&self) -> bool {
        match self {
            ConnectError::Config(_) | ConnectError::RootCert { .. } => false,
            ConnectError::Postgres { source, .. } => {
                if let Some(db) = source.as_db_error() {
                    return sqlstate_is_transient(db.code().code());
                }
                !is_rejected_certificate_in(source)
            }
        }
    }
}

/// Whether a TLS handshake error is the server's certificate being rejected
/// (retrying will not help) rather than a network failure.
pub fn is_certificate_rejection(err: &io::Error) -> bool {
    err.get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .is_some_and(rejects_certificate)
}

/// The rustls errors that mean the server's certificate was refused.
fn rejects_certificate(err: &rustls::Error) -> bool {
    matches!(
        err,
        rustls::Error::InvalidCertificate(_)
            | rustls::Error::NoCertificatesPresented
            | rustls::Error::UnsupportedNameType
    )
}

/// A rejected certificate anywhere in the error's source chain.
fn is_rejected_certificate_in(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cause {
        let rejected = match e.downcast_ref::<io::Error>() {
            Some(io) => is_certificate_rejection(io),
            None => e
                .downcast_ref::<rustls::Error>()
                .is_some_and(rejects_certificate),
        };
        if rejected {
            return true;
        }
        cause = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_split_into_transient_and_definite() {
        for transient in ["57P01", "57P02", "57P03", "53300", "XX000", "08006"] {
            assert!(sqlstate_is_transient(transient), "{transient}");
        }
        for definite in ["28P01", "28000", "42501", "3D000"] {
            assert!(!sqlstate_is_transient(definite), "{definite}");
        }
    }

    #[test]
    fn a_rejected_certificate_is_definite_a_reset_is_not() {
        let rejected = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        assert!(is_certificate_rejection(&rejected));
        assert!(is_rejected_certificate_in(&rejected));
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert!(!is_certificate_rejection(&reset));
        assert!(!is_rejected_certificate_in(&reset));
    }
}
