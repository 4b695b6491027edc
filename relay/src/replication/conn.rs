//! Opening a replication connection: socket and TLS (`transport`),
//! StartupMessage with `replication=database`, authentication (trust,
//! cleartext, MD5, SCRAM-SHA-256), and the simple-query replication
//! commands run before streaming.

use std::fmt;

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio_postgres::fallible_iterator::FallibleIterator;
use tokio_util::codec::Framed;
use tracing::{debug, warn};

use super::codec::{Backend, BoxedIo, PgCodec};
use super::error::{ReplicationError, ServerError};
use super::names::{quote_ident, quote_literal, validate_publication_name, validate_slot_name};
use super::stream::ReplicationStream;
use super::transport::{open_socket, open_tls};
use super::SystemInfo;
use crate::lsn::Lsn;
use pgconn::{ConnectParams, SslMode};

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
                Backend::Message(Message::ParameterStatus(_)) => {}
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

    /// The database the connection replicates from.
    pub fn dbname(&self) -> &str {
        &self.dbname
    }

    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        self.tls
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

    /// `CREATE_REPLICATION_SLOT "slot" LOGICAL pgoutput EXPORT_SNAPSHOT`;
    /// returns the consistent point and the name of the snapshot it
    /// exported: the database as of that point, importable with `SET
    /// TRANSACTION SNAPSHOT` until this connection runs its next command.
    /// Every transaction committed before the point is visible in it; every
    /// later one is streamed by the slot (the backfill's hand-off).
    pub async fn create_slot_exporting(
        &mut self,
        slot: &str,
    ) -> Result<(Lsn, String), ReplicationError> {
        validate_slot_name(slot)?;
        let sql = format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT",
            quote_ident(slot)
        );
        let rows = match self.execute(&sql, "creating replication slot").await? {
            Outcome::Rows(rows) => rows,
            Outcome::CopyBoth => return Err(unexpected("CREATE_REPLICATION_SLOT")),
        };
        let field = |i: usize| rows.first().and_then(|row| row.get(i)).cloned().flatten();
        match (field(1), field(2)) {
            (Some(point), Some(snapshot)) => Ok((parse_lsn(&point)?, snapshot)),
            _ => Err(ReplicationError::Protocol(
                "CREATE_REPLICATION_SLOT … EXPORT_SNAPSHOT returned no consistent point or snapshot"
                    .into(),
            )),
        }
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
                Backend::Message(Message::ParameterStatus(_)) => {}
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
