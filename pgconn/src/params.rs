//! Connection settings, parsed from a `postgres://` URL or a libpq
//! `key=value` string.
//!
//! `tokio_postgres::Config` does the parsing, except for `sslmode` (it
//! knows no `verify-ca` / `verify-full`) and `sslrootcert` (it rejects the
//! option): those two are taken out of the text first. The password is never
//! shown by `Debug`, and parse errors never quote values.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use tokio_postgres::config::Host;

use crate::error::ConnectError;

/// Default limit for TCP connect + TLS + authentication.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether and how TLS is used, as libpq's `sslmode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SslMode {
    /// Plain text only.
    Disable,
    /// TLS if the server accepts it (no certificate check), else plain text.
    #[default]
    Prefer,
    /// TLS, encrypting only: no certificate check, unless a root
    /// certificate file is given, which makes it behave as `VerifyCa` (as libpq).
    Require,
    /// TLS; the certificate chain must lead to a trusted root.
    VerifyCa,
    /// TLS; chain as `VerifyCa`, and the certificate must name the host.
    VerifyFull,
}

impl SslMode {
    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SslMode {
    type Err = ConnectError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "disable" => Ok(SslMode::Disable),
            "prefer" => Ok(SslMode::Prefer),
            "require" => Ok(SslMode::Require),
            "verify-ca" => Ok(SslMode::VerifyCa),
            "verify-full" => Ok(SslMode::VerifyFull),
            // "allow" (plain first, TLS on refusal) is not supported.
            _ => Err(ConnectError::Config(format!(
                "unsupported sslmode {s:?}: expected disable, prefer, require, verify-ca or verify-full"
            ))),
        }
    }
}

/// Where and how to connect.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectParams {
    /// Host name or IP address, or an absolute path: the directory of a
    /// Unix socket (no TLS there).
    pub host: String,
    pub port: u16,
    pub user: String,
    /// Never shown by `Debug`.
    pub password: Option<String>,
    pub dbname: String,
    pub ssl_mode: SslMode,
    /// PEM file of trusted root certificates for TLS; the Mozilla roots
    /// (webpki-roots) when absent.
    pub ssl_root_cert: Option<PathBuf>,
    /// Visible in `pg_stat_activity` and `pg_stat_replication`; empty when
    /// the URL names none (see [`ConnectParams::or_application_name`]).
    pub application_name: String,
    /// Limit for TCP connect + TLS handshake + authentication.
    pub connect_timeout: Duration,
    /// Whether the URL set `connect_timeout` (see [`ConnectParams::or_connect_timeout`]).
    connect_timeout_given: bool,
}

impl fmt::Debug for ConnectParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectParams")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("dbname", &self.dbname)
            .field("ssl_mode", &self.ssl_mode)
            .field("ssl_root_cert", &self.ssl_root_cert)
            .field("application_name", &self.application_name)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

impl ConnectParams {
    /// Parses a `postgres://user:pw@host:port/db?sslmode=..` URL or a libpq
    /// `host=.. user=..` string. Defaults: host `localhost`, port 5432,
    /// database = user, sslmode `prefer`, no application_name, connect
    /// timeout 30 s. Supports one host only.
    pub fn from_url(url: &str) -> Result<Self, ConnectError> {
        let (rest, ssl) = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            take_ssl_options_from_url(url)?
        } else {
            take_ssl_options_from_key_values(url)?
        };
        let config: tokio_postgres::Config = rest.parse().map_err(|e: tokio_postgres::Error| {
            // The cause names the option but never its value.
            let cause = std::error::Error::source(&e)
                .map(|c| c.to_string())
                .unwrap_or_else(|| e.to_string());
            ConnectError::Config(format!("invalid connection string: {cause}"))
        })?;
        let host = match config.get_hosts() {
            [] => match config.get_hostaddrs() {
                [] => "localhost".to_owned(),
                [addr] => addr.to_string(),
                _ => return Err(ConnectError::Config("only one host is supported".into())),
            },
            [Host::Tcp(host)] => host.clone(),
            #[cfg(unix)]
            [Host::Unix(path)] => path
                .to_str()
                .ok_or_else(|| ConnectError::Config("socket path is not UTF-8".into()))?
                .to_owned(),
            _ => return Err(ConnectError::Config("only one host is supported".into())),
        };
        let port = match config.get_ports() {
            [] => 5432,
            [port] => *port,
            _ => return Err(ConnectError::Config("only one port is supported".into())),
        };
        let user = config
            .get_user()
            .ok_or_else(|| ConnectError::Config("no user given".into()))?
            .to_owned();
        let password = config
            .get_password()
            .map(|p| String::from_utf8(p.to_vec()))
            .transpose()
            .map_err(|_| ConnectError::Config("password is not UTF-8".into()))?;
        Ok(ConnectParams {
            host,
            port,
            dbname: config.get_dbname().unwrap_or(&user).to_owned(),
            user,
            password,
            ssl_mode: ssl.mode.unwrap_or_default(),
            ssl_root_cert: ssl.root_cert.map(PathBuf::from),
            application_name: config.get_application_name().unwrap_or("").to_owned(),
            connect_timeout: config
                .get_connect_timeout()
                .copied()
                .unwrap_or(DEFAULT_CONNECT_TIMEOUT),
            connect_timeout_given: config.get_connect_timeout().is_some(),
        })
    }

    /// Sets `application_name` to `name` unless the URL named one.
    pub fn or_application_name(mut self, name: &str) -> Self {
        if self.application_name.is_empty() {
            self.application_name = name.to_owned();
        }
        self
    }

    /// Sets the connect timeout to `limit` unless the URL set one.
    pub fn or_connect_timeout(mut self, limit: Duration) -> Self {
        if !self.connect_timeout_given {
            self.connect_timeout = limit;
        }
        self
    }

    /// Whether `host` names a Unix socket directory.
    pub fn is_unix_socket(&self) -> bool {
        self.host.starts_with('/')
    }

    /// `host:port` (or the socket path), for messages.
    pub fn addr(&self) -> String {
        if self.is_unix_socket() {
            self.socket_path()
        } else if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Path of the Unix socket, as libpq builds it.
    pub fn socket_path(&self) -> String {
        format!("{}/.s.PGSQL.{}", self.host.trim_end_matches('/'), self.port)
    }
}

/// The options `tokio_postgres::Config` cannot take.
#[derive(Default)]
struct SslOptions {
    mode: Option<SslMode>,
    root_cert: Option<String>,
}

impl SslOptions {
    /// Takes `key = value` if it is one of ours; returns whether it was.
    fn take(&mut self, key: &str, value: &str) -> Result<bool, ConnectError> {
        match key {
            "sslmode" => self.mode = Some(value.parse()?),
            "sslrootcert" => self.root_cert = Some(value.to_owned()),
            _ => return Ok(false),
        }
        Ok(true)
    }
}

/// Removes `sslmode` and `sslrootcert` from the query string of a URL.
fn take_ssl_options_from_url(url: &str) -> Result<(String, SslOptions), ConnectError> {
    let mut ssl = SslOptions::default();
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), ssl));
    };
    let mut kept = Vec::new();
    for pair in query.split('&') {
        if let Some((key, value)) = pair.split_once('=') {
            if ssl.take(&percent_decode(key)?, &percent_decode(value)?)? {
                continue;
            }
        }
        kept.push(pair);
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, ssl))
}

fn percent_decode(s: &str) -> Result<String, ConnectError> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|v| v.into_owned())
        .map_err(|_| ConnectError::Config("URL option is not UTF-8 after decoding".into()))
}

/// Splits a libpq `key=value` string (values bare or single-quoted, with
/// backslash escapes), removes our options, and writes the rest back
/// quoted, so that `tokio_postgres` only ever sees well-formed text.
fn take_ssl_options_from_key_values(s: &str) -> Result<(String, SslOptions), ConnectError> {
    let mut ssl = SslOptions::default();
    let mut rest = String::new();
    let mut chars = s.char_indices().peekable();
    let bad = |at: usize, what: &str| {
        ConnectError::Config(format!("invalid connection string at byte {at}: {what}"))
    };
    loop {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = chars.peek() else {
            break;
        };
        let mut key = String::new();
        while let Some((_, c)) = chars.next_if(|(_, c)| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        if chars.next_if(|(_, c)| *c == '=').is_none() {
            // Do not echo the word: it may be a misplaced password.
            return Err(bad(start, "expected `keyword=value`"));
        }
        if key.is_empty() {
            return Err(bad(start, "missing keyword before `=`"));
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if(|(_, c)| *c == '\'').is_some() {
            loop {
                match chars.next() {
                    Some((_, '\'')) => break,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, c)) => value.push(c),
                        None => return Err(bad(start, "unterminated quoted value")),
                    },
                    Some((_, c)) => value.push(c),
                    None => return Err(bad(start, "unterminated quoted value")),
                }
            }
        } else {
            while let Some((_, c)) = chars.next_if(|(_, c)| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some((_, escaped)) = chars.next() {
                        value.push(escaped);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        if ssl.take(&key, &value)? {
            continue;
        }
        let quoted = value.replace('\\', "\\\\").replace('\'', "\\'");
        rest.push_str(&format!("{key}='{quoted}' "));
    }
    Ok((rest, ssl))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_url_with_ssl_options() {
        let p = ConnectParams::from_url(
            "postgres://relay:s%40cret@db.example:6543/shop?sslmode=verify-full&application_name=r1&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=5",
        )
        .unwrap();
        assert_eq!(p.host, "db.example");
        assert_eq!(p.port, 6543);
        assert_eq!(p.user, "relay");
        assert_eq!(p.password.as_deref(), Some("s@cret"));
        assert_eq!(p.dbname, "shop");
        assert_eq!(p.ssl_mode, SslMode::VerifyFull);
        assert_eq!(p.ssl_root_cert, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(p.application_name, "r1");
        assert_eq!(p.connect_timeout, Duration::from_secs(5));
        let p = p.or_connect_timeout(Duration::from_secs(1));
        assert_eq!(p.connect_timeout, Duration::from_secs(5), "the URL's wins");
    }

    #[test]
    fn parses_key_value_string_with_defaults() {
        let p = ConnectParams::from_url(
            "host=127.0.0.1 user=relay password='it\\'s a \\\\ pw' sslmode = require",
        )
        .unwrap();
        assert_eq!(p.host, "127.0.0.1");
        assert_eq!(p.port, 5432);
        assert_eq!(p.password.as_deref(), Some("it's a \\ pw"));
        assert_eq!(p.dbname, "relay");
        assert_eq!(p.ssl_mode, SslMode::Require);
        assert_eq!(p.application_name, "");
        assert_eq!(
            p.clone().or_application_name("relay").application_name,
            "relay"
        );
        assert_eq!(p.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        let p = p.or_connect_timeout(Duration::from_secs(1));
        assert_eq!(p.connect_timeout, Duration::from_secs(1));
    }

    #[test]
    fn debug_and_errors_hide_the_password() {
        let p = ConnectParams::from_url("postgres://u:hunter2@h/d").unwrap();
        assert!(!format!("{p:?}").contains("hunter2"));
        for bad in [
            "host=h user=u hunter2",
            "host=h user=u password='hunter2",
            "postgres://u:hunter2@h/d?sslmode=bogus",
            "postgres://u:hunter2@h:notaport/d",
            "postgres://u:hunter2@h/d?bogus=hunter2",
        ] {
            let err = ConnectParams::from_url(bad).unwrap_err();
            assert!(!err.is_transient(), "{bad}");
            assert!(!err.to_string().contains("hunter2"), "{bad}: {err}");
        }
    }

    #[test]
    fn rejects_multiple_hosts_and_missing_user() {
        assert!(ConnectParams::from_url("postgres://u@a,b/d").is_err());
        assert!(ConnectParams::from_url("host=a").is_err());
    }
}
