//! Opening a replication connection: socket, optional TLS (SSLRequest),
//! StartupMessage with `replication=database`, authentication (trust,
//! cleartext, MD5, SCRAM-SHA-256), and the simple-query replication
//! commands run before streaming.

use std::collections::HashMap;
use std::fmt;

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::fallible_iterator::FallibleIterator;
use tokio_util::codec::Framed;
use tracing::{debug, warn};

use super::codec::{Backend, BoxedIo, PgCodec};
use super::error::{ReplicationError, ServerError};
use super::params::{ConnectParams, SslMode};
use super::stream::ReplicationStream;
use super::tls;
use super::SystemInfo;
use crate::lsn::Lsn;

/// SQLSTATE object_in_use: START_REPLICATION on a slot another process streams.
const OBJECT_IN_USE: &str = "55006";

/// One text row of a simple query; `None` is SQL NULL.
pub type TextRow = Vec<Option<String>>;

/// An authenticated connection in replication mode (`replication=database`),
/// ready for replication commands and simple queries.
pub struct ReplicationConnection {
    framed: Framed<BoxedIo, PgCodec>,
    dbname: String,
    tls: bool,
    backend_pid: i32,
    server_params: HashMap<String, String>,
}

impl fmt::Debug for ReplicationConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicationConnection")
            .field("dbname", &self.dbname)
            .field("tls", &self.tls)
            .field("backend_pid", &self.backend_pid)
            .finish_non_exhaustive()
    }
}

/// What a simple query ended with.
enum Outcome {
    Rows(Vec<TextRow>),
    /// The server switched to CopyBoth (START_REPLICATION).
    CopyBoth,
}

impl ReplicationConnection {
    /// Connects, negotiates TLS as `params.ssl_mode` says, authenticates and
    /// waits for ReadyForQuery, all within `params.connect_timeout`.
    pub async fn connect(params: &ConnectParams) -> Result<Self, ReplicationError> {
        match tokio::time::timeout(params.connect_timeout, Self::connect_inner(params)).await {
            Ok(result) => result,
            Err(_elapsed) => Err(ReplicationError::ConnectTimeout {
                addr: params.addr(),
                after: params.connect_timeout,
            }),
        }
    }

    async fn connect_inner(params: &ConnectParams) -> Result<Self, ReplicationError> {
        let (io, tls) = match params.ssl_mode {
            SslMode::Disable => (open_socket(params).await?, false),
            SslMode::Prefer => match open_tls(params).await {
                Err(err @ ReplicationError::Tls { .. }) => {
                    // As libpq: a failed handshake under `prefer` retries in plain text.
                    warn!(addr = %params.addr(), error = %err, "tls handshake failed, retrying without tls (sslmode=prefer)");
                    (open_socket(params).await?, false)
                }
                other => other?,
            },
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => open_tls(params).await?,
        };
        let mut conn = ReplicationConnection {
            framed: Framed::new(io, PgCodec),
            dbname: params.dbname.clone(),
            tls,
            backend_pid: 0,
            server_params: HashMap::new(),
        };
        conn.startup(params).await?;
        debug!(addr = %params.addr(), tls, pid = conn.backend_pid, "replication connection ready");
        Ok(conn)
    }

    async fn startup(&mut self, params: &ConnectParams) -> Result<(), ReplicationError> {
        let startup = [
            ("user", params.user.as_str()),
            ("database", params.dbname.as_str()),
            ("replication", "database"),
            ("application_name", params.application_name.as_str()),
            ("client_encoding", "UTF8"),
        ];
        self.send(|buf| frontend::startup_message(startup, buf))
            .await?;
        self.authenticate(params).await?;
        loop {
            match self.next().await? {
                Backend::Message(Message::ParameterStatus(body)) => self.note_parameter(&body)?,
                Backend::Message(Message::BackendKeyData(body)) => {
                    self.backend_pid = body.process_id();
                }
                Backend::Message(Message::NoticeResponse(body)) => log_notice(body.fields()),
                Backend::Message(Message::ReadyForQuery(_)) => return Ok(()),
                Backend::Message(Message::ErrorResponse(body)) => {
                    return Err(server_error("starting session", body.fields()))
                }
                _ => return Err(unexpected("session start")),
            }
        }
    }

    async fn authenticate(&mut self, params: &ConnectParams) -> Result<(), ReplicationError> {
        let password = || {
            params
                .password
                .as_deref()
                .map(str::as_bytes)
                .ok_or_else(|| {
                    ReplicationError::Auth(
                        "the server asks for a password but none is configured".into(),
                    )
                })
        };
        loop {
            match self.next().await? {
                Backend::Message(Message::AuthenticationOk) => return Ok(()),
                Backend::Message(Message::AuthenticationCleartextPassword) => {
                    let password = password()?;
                    self.send(|buf| frontend::password_message(password, buf))
                        .await?;
                }
                Backend::Message(Message::AuthenticationMd5Password(body)) => {
                    let hash = md5_hash(params.user.as_bytes(), password()?, body.salt());
                    self.send(|buf| frontend::password_message(hash.as_bytes(), buf))
                        .await?;
                }
                Backend::Message(Message::AuthenticationSasl(body)) => {
                    let mut mechanisms = body.mechanisms();
                    let mut scram_offered = false;
                    while let Some(mechanism) =
                        mechanisms.next().map_err(ReplicationError::from_io)?
                    {
                        scram_offered |= mechanism == SCRAM_SHA_256;
                    }
                    if !scram_offered {
                        return Err(ReplicationError::Auth(
                            "the server offers no SASL mechanism we support (SCRAM-SHA-256)".into(),
                        ));
                    }
                    self.scram(password()?).await?;
                }
                Backend::Message(Message::ErrorResponse(body)) => {
                    return Err(server_error("authentication", body.fields()))
                }
                Backend::Message(
                    Message::AuthenticationKerberosV5
                    | Message::AuthenticationScmCredential
                    | Message::AuthenticationGss
                    | Message::AuthenticationSspi,
                ) => {
                    return Err(ReplicationError::Auth(
                        "the server asks for an unsupported method (Kerberos/GSSAPI/SSPI)".into(),
                    ))
                }
                _ => return Err(unexpected("authentication")),
            }
        }
    }

    /// SCRAM-SHA-256 without channel binding (`n` flag, so servers
    /// offering SCRAM-SHA-256-PLUS over TLS accept it too).
    async fn scram(&mut self, password: &[u8]) -> Result<(), ReplicationError> {
        let mut scram = ScramSha256::new(password, ChannelBinding::unsupported());
        self.send(|buf| frontend::sasl_initial_response(SCRAM_SHA_256, scram.message(), buf))
            .await?;
        let body = match self.next().await? {
            Backend::Message(Message::AuthenticationSaslContinue(body)) => body,
            Backend::Message(Message::ErrorResponse(body)) => {
                return Err(server_error("authentication", body.fields()))
            }
            _ => return Err(unexpected("SCRAM exchange")),
        };
        scram
            .update(body.data())
            .map_err(|e| ReplicationError::Auth(format!("invalid SCRAM challenge: {e}")))?;
        self.send(|buf| frontend::sasl_response(scram.message(), buf))
            .await?;
        let body = match self.next().await? {
            Backend::Message(Message::AuthenticationSaslFinal(body)) => body,
            Backend::Message(Message::ErrorResponse(body)) => {
                return Err(server_error("authentication", body.fields()))
            }
            _ => return Err(unexpected("SCRAM exchange")),
        };
        scram.finish(body.data()).map_err(|e| {
            ReplicationError::Auth(format!("the server's SCRAM proof is invalid: {e}"))
        })
    }

    /// The server process id (`pg_stat_replication.pid`).
    pub fn backend_pid(&self) -> i32 {
        self.backend_pid
    }

    /// The database the connection replicates from.
    pub fn dbname(&self) -> &str {
        &self.dbname
    }

    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// A parameter the server reported (`server_version`, `TimeZone`, ...).
    pub fn server_parameter(&self, name: &str) -> Option<&str> {
        self.server_params.get(name).map(String::as_str)
    }

    /// `IDENTIFY_SYSTEM`: cluster id, timeline, current WAL position, database.
    pub async fn identify_system(&mut self) -> Result<SystemInfo, ReplicationError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let [row] = rows.as_slice() else {
            return Err(ReplicationError::Protocol(format!(
                "IDENTIFY_SYSTEM returned {} rows",
                rows.len()
            )));
        };
        let field = |i: usize| -> Result<&str, ReplicationError> {
            row.get(i).and_then(Option::as_deref).ok_or_else(|| {
                ReplicationError::Protocol(format!("IDENTIFY_SYSTEM column {i} missing"))
            })
        };
        Ok(SystemInfo {
            system_id: field(0)?.to_owned(),
            timeline: field(1)?.parse().map_err(|_| {
                ReplicationError::Protocol("IDENTIFY_SYSTEM timeline is not a number".into())
            })?,
            xlogpos: parse_lsn(field(2)?)?,
            dbname: row.get(3).cloned().flatten(),
        })
    }

    /// Runs `sql` with the simple query protocol and returns all rows of
    /// all result sets as text. In replication mode this accepts both
    /// replication commands and SQL. A server error is returned after the
    /// server is ready again, so the connection stays usable.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<TextRow>, ReplicationError> {
        match self.execute(sql, "simple query").await? {
            Outcome::Rows(rows) => Ok(rows),
            Outcome::CopyBoth => Err(ReplicationError::Protocol(
                "simple query started a replication stream; use start_replication".into(),
            )),
        }
    }

    /// `CREATE_REPLICATION_SLOT "slot" LOGICAL pgoutput NOEXPORT_SNAPSHOT`;
    /// returns the consistent point (the first LSN the slot can stream).
    /// Fails with SQLSTATE 42710 when the slot exists.
    pub async fn create_slot(&mut self, slot: &str) -> Result<Lsn, ReplicationError> {
        validate_slot_name(slot)?;
        let sql = format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput NOEXPORT_SNAPSHOT",
            quote_ident(slot)
        );
        let rows = match self.execute(&sql, "creating replication slot").await? {
            Outcome::Rows(rows) => rows,
            Outcome::CopyBoth => return Err(unexpected("CREATE_REPLICATION_SLOT")),
        };
        let point = rows
            .first()
            .and_then(|row| row.get(1))
            .and_then(Option::as_deref)
            .ok_or_else(|| {
                ReplicationError::Protocol(
                    "CREATE_REPLICATION_SLOT returned no consistent point".into(),
                )
            })?;
        parse_lsn(point)
    }

    /// `START_REPLICATION SLOT "slot" LOGICAL start (proto_version '1',
    /// publication_names '"publication"', messages 'true')`. The server
    /// streams from the slot's `confirmed_flush_lsn` or `start`, whichever is
    /// later. A slot streamed by another process gives
    /// [`ReplicationError::SlotBusy`].
    pub async fn start_replication(
        mut self,
        slot: &str,
        start: Lsn,
        publication: &str,
    ) -> Result<ReplicationStream, ReplicationError> {
        validate_slot_name(slot)?;
        validate_publication_name(publication)?;
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {start} (proto_version '1', publication_names {}, messages 'true')",
            quote_ident(slot),
            quote_literal(&quote_ident(publication)),
        );
        match self.execute(&sql, "starting replication").await {
            Ok(Outcome::CopyBoth) => {
                debug!(slot, %start, publication, "replication started");
                Ok(ReplicationStream::new(self.framed, slot.to_owned()))
            }
            Ok(Outcome::Rows(_)) => Err(unexpected("START_REPLICATION")),
            Err(ReplicationError::Server { error, .. }) if error.code == OBJECT_IN_USE => {
                Err(ReplicationError::SlotBusy {
                    slot: slot.to_owned(),
                    error,
                })
            }
            Err(err) => Err(err),
        }
    }

    /// Sends Terminate and closes the connection, best effort.
    pub async fn close(mut self) -> Result<(), ReplicationError> {
        self.send(|buf| {
            frontend::terminate(buf);
            Ok(())
        })
        .await?;
        self.framed.close().await.map_err(ReplicationError::from_io)
    }

    async fn execute(
        &mut self,
        sql: &str,
        context: &'static str,
    ) -> Result<Outcome, ReplicationError> {
        self.send(|buf| frontend::query(sql, buf)).await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.next().await? {
                Backend::Message(Message::DataRow(body)) => rows.push(text_row(&body)?),
                Backend::Message(
                    Message::RowDescription(_)
                    | Message::CommandComplete(_)
                    | Message::EmptyQueryResponse,
                ) => {}
                Backend::Message(Message::ErrorResponse(body)) => {
                    error = Some(server_error(context, body.fields()));
                }
                Backend::Message(Message::NoticeResponse(body)) => log_notice(body.fields()),
                Backend::Message(Message::ParameterStatus(body)) => self.note_parameter(&body)?,
                Backend::Message(Message::ReadyForQuery(_)) => {
                    return match error {
                        Some(err) => Err(err),
                        None => Ok(Outcome::Rows(rows)),
                    }
                }
                Backend::CopyBothResponse if error.is_none() => return Ok(Outcome::CopyBoth),
                _ => return Err(unexpected(context)),
            }
        }
    }

    fn note_parameter(
        &mut self,
        body: &postgres_protocol::message::backend::ParameterStatusBody,
    ) -> Result<(), ReplicationError> {
        let name = body.name().map_err(ReplicationError::from_io)?;
        let value = body.value().map_err(ReplicationError::from_io)?;
        self.server_params.insert(name.to_owned(), value.to_owned());
        Ok(())
    }

    async fn send(
        &mut self,
        write: impl FnOnce(&mut BytesMut) -> std::io::Result<()>,
    ) -> Result<(), ReplicationError> {
        let mut buf = BytesMut::new();
        // Errors here are a NUL byte inside a string or an oversized message.
        write(&mut buf)
            .map_err(|e| ReplicationError::Config(format!("cannot encode message: {e}")))?;
        self.framed
            .send(buf.freeze())
            .await
            .map_err(ReplicationError::from_io)
    }

    async fn next(&mut self) -> Result<Backend, ReplicationError> {
        match self.framed.next().await {
            Some(Ok(msg)) => Ok(msg),
            Some(Err(err)) => Err(ReplicationError::from_io(err)),
            None => Err(ReplicationError::ConnectionLost),
        }
    }
}

async fn open_socket(params: &ConnectParams) -> Result<BoxedIo, ReplicationError> {
    let connect_err = |source| ReplicationError::Connect {
        addr: params.addr(),
        source,
    };
    if params.is_unix_socket() {
        #[cfg(unix)]
        {
            let socket = tokio::net::UnixStream::connect(params.socket_path())
                .await
                .map_err(connect_err)?;
            return Ok(Box::new(socket));
        }
        #[cfg(not(unix))]
        return Err(ReplicationError::Config(
            "Unix sockets are not supported on this platform".into(),
        ));
    }
    let socket = TcpStream::connect((params.host.as_str(), params.port))
        .await
        .map_err(connect_err)?;
    socket.set_nodelay(true).map_err(connect_err)?;
    Ok(Box::new(socket))
}

/// Opens the socket and asks for TLS. Returns the stream and whether it is
/// encrypted (`prefer` continues in plain text when the server says no).
async fn open_tls(params: &ConnectParams) -> Result<(BoxedIo, bool), ReplicationError> {
    if params.is_unix_socket() {
        if params.ssl_mode == SslMode::Prefer {
            return Ok((open_socket(params).await?, false));
        }
        return Err(ReplicationError::Config(format!(
            "sslmode={} needs TCP; TLS is not available over a Unix socket",
            params.ssl_mode
        )));
    }
    let (connector, name) = tls::connector(params)?;
    let addr = params.addr();
    let mut socket = TcpStream::connect((params.host.as_str(), params.port))
        .await
        .map_err(|source| ReplicationError::Connect {
            addr: addr.clone(),
            source,
        })?;
    let _ = socket.set_nodelay(true);
    let mut request = BytesMut::new();
    frontend::ssl_request(&mut request);
    socket
        .write_all(&request)
        .await
        .map_err(ReplicationError::Io)?;
    // Exactly one byte: anything the server sent after it (it must not)
    // stays unread rather than being mistaken for TLS-protected data.
    match socket.read_u8().await.map_err(ReplicationError::from_io)? {
        b'S' => {
            let stream = connector
                .connect(name, socket)
                .await
                .map_err(|source| ReplicationError::Tls { addr, source })?;
            Ok((Box::new(stream), true))
        }
        b'N' if params.ssl_mode == SslMode::Prefer => Ok((Box::new(socket), false)),
        b'N' => Err(ReplicationError::TlsRefused {
            addr,
            mode: params.ssl_mode,
        }),
        other => Err(ReplicationError::Protocol(format!(
            "unexpected answer {other:#04x} to SSLRequest"
        ))),
    }
}

fn text_row(
    body: &postgres_protocol::message::backend::DataRowBody,
) -> Result<TextRow, ReplicationError> {
    let buf = body.buffer();
    let mut row = Vec::new();
    let mut ranges = body.ranges();
    while let Some(range) = ranges.next().map_err(ReplicationError::from_io)? {
        row.push(match range {
            None => None,
            Some(range) => {
                let bytes = buf.get(range).ok_or_else(|| {
                    ReplicationError::Protocol("DataRow field out of bounds".into())
                })?;
                Some(
                    String::from_utf8(bytes.to_vec()).map_err(|_| {
                        ReplicationError::Protocol("DataRow field is not UTF-8".into())
                    })?,
                )
            }
        });
    }
    Ok(row)
}

fn server_error(
    context: &'static str,
    fields: postgres_protocol::message::backend::ErrorFields<'_>,
) -> ReplicationError {
    match ServerError::from_fields(fields) {
        Ok(error) => ReplicationError::Server {
            context,
            error: Box::new(error),
        },
        Err(err) => ReplicationError::from_io(err),
    }
}

pub(crate) fn log_notice(fields: postgres_protocol::message::backend::ErrorFields<'_>) {
    if let Ok(notice) = ServerError::from_fields(fields) {
        if notice.severity == "WARNING" {
            warn!(code = %notice.code, message = %notice.message, "server warning");
        } else {
            debug!(severity = %notice.severity, code = %notice.code, message = %notice.message, "server notice");
        }
    }
}

fn unexpected(context: &str) -> ReplicationError {
    ReplicationError::Protocol(format!("unexpected message during {context}"))
}

fn parse_lsn(text: &str) -> Result<Lsn, ReplicationError> {
    text.parse()
        .map_err(|_| ReplicationError::Protocol(format!("invalid LSN {text:?} from server")))
}

/// Postgres accepts slot names of lower-case letters, digits and `_`, up to 63 bytes.
pub(crate) fn validate_slot_name(name: &str) -> Result<(), ReplicationError> {
    let invalid = |reason| ReplicationError::InvalidName {
        kind: "replication slot",
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() || name.len() > 63 {
        return Err(invalid("must be 1 to 63 bytes long"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(invalid(
            "may contain only lower-case letters, digits and underscores",
        ));
    }
    Ok(())
}

/// Publication names are identifiers: non-empty, at most 63 bytes (longer
/// ones would be truncated silently), no NUL.
pub(crate) fn validate_publication_name(name: &str) -> Result<(), ReplicationError> {
    let invalid = |reason| ReplicationError::InvalidName {
        kind: "publication",
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() || name.len() > 63 {
        return Err(invalid("must be 1 to 63 bytes long"));
    }
    if name.contains('\0') {
        return Err(invalid("may not contain NUL"));
    }
    Ok(())
}

/// `"name"` with inner quotes doubled: an identifier in SQL and in
/// replication commands.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `'text'` with inner quotes doubled (standard-conforming strings; the
/// replication command lexer knows no backslash escapes either).
pub(crate) fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_identifiers_and_literals() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal(&quote_ident("it's")), "'\"it''s\"'");
    }

    #[test]
    fn validates_names() {
        assert!(validate_slot_name("outbox_relay_1").is_ok());
        for bad in ["", "Upper", "a-b", "a\"b", &"x".repeat(64)] {
            let err = validate_slot_name(bad).unwrap_err();
            assert!(!err.is_transient());
        }
        assert!(validate_publication_name("Outbox Pub \"1\"").is_ok());
        assert!(validate_publication_name("a\0b").is_err());
    }
}
