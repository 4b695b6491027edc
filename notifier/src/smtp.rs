//! SMTP connections for `smtp://` URLs: opened with `TCP_NODELAY`, kept
//! open for reuse, and pipelined (RFC 2920) when the server offers it.
//!
//! ```text
//!  without PIPELINING (lettre's send)      with PIPELINING
//!  ─▶ MAIL FROM     ◀─ 250                 ─▶ MAIL FROM, RCPT TO…, DATA   (one write)
//!  ─▶ RCPT TO       ◀─ 250                 ◀─ 250, 250…, 354
//!  ─▶ DATA          ◀─ 354                 ─▶ message, "."                (one write)
//!  ─▶ message, "."  ◀─ 250                 ◀─ 250
//! ```
//!
//! Pipelining halves the round trips an email waits for, and the writes
//! and wake-ups both sides pay per email (5 writes become 2). DATA ends
//! the pipelined group, as RFC 2920 requires: the message goes only after
//! the 354. The replies come in command order; the first refusal decides
//! the error, and the connection is then closed unanswered — a server that
//! answered DATA with 354 after a refused RCPT sees the connection drop
//! before the message's end, so nothing is delivered.
//!
//! lettre's connection knows no PIPELINING, so the pool sends one EHLO of
//! its own per new connection (after STARTTLS, before AUTH) and reads the
//! server's extensions from its reply. Messages that need SMTPUTF8 or
//! 8BITMIME (the notifier's are ASCII) go through lettre's send, which
//! checks those extensions.

use std::time::Duration;

use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, TlsParameters};
use lettre::transport::smtp::commands::{Data, Ehlo, Mail, Rcpt};
use lettre::transport::smtp::extension::ClientId;
use tokio::net::TcpStream;

/// Reused SMTP connections on sockets with `TCP_NODELAY`.
///
/// Why not lettre's transport: it writes a message's body and its
/// terminating `.` line in two writes. With Nagle's algorithm on, the
/// second small write waits for the ACK of the first, which the server
/// delays (40 ms on Linux) because it has nothing to answer until the
/// terminator arrives: about 45 ms per email against a local aiosmtpd,
/// against 2.5 ms with `TCP_NODELAY` (measured with a Python client writing
/// the same way). lettre offers no socket option, so this pool opens the
/// sockets and hands them to lettre's SMTP connection.
pub struct ConnectionPool {
    pub(crate) host: String,
    pub(crate) port: u16,
    /// `Some(required)`: STARTTLS (`?tls=required` fails without it).
    pub(crate) starttls: Option<bool>,
    pub(crate) credentials: Option<Credentials>,
    timeout: Duration,
    hello: ClientId,
    idle: std::sync::Mutex<Vec<Connection>>,
    /// Idle connections kept for reuse (one per concurrent sender is enough).
    max_idle: usize,
    /// Pipeline where the server offers it (`--smtp-pipelining`).
    pipelining: bool,
}

/// An open connection and what its server offers beyond lettre's view.
struct Connection {
    smtp: AsyncSmtpConnection,
    /// The server's EHLO reply listed PIPELINING.
    pipelining: bool,
}

impl ConnectionPool {
    /// For `smtp://` URLs; `None` for any other scheme.
    pub fn from_url(
        url: &str,
        timeout: Duration,
        max_idle: usize,
        pipelining: bool,
    ) -> Option<ConnectionPool> {
        let url = url::Url::parse(url).ok()?;
        if url.scheme() != "smtp" {
            return None;
        }
        let host = url.host_str()?.trim_matches(['[', ']']).to_owned();
        let starttls = url
            .query_pairs()
            .find(|(k, _)| k == "tls")
            .map(|(_, v)| v == "required");
        let decode = |s: &str| percent_decode(s);
        let credentials = (!url.username().is_empty()).then(|| {
            Credentials::new(
                decode(url.username()),
                decode(url.password().unwrap_or_default()),
            )
        });
        Some(ConnectionPool {
            port: url
                .port()
                .unwrap_or(if starttls == Some(true) { 587 } else { 25 }),
            host,
            starttls,
            credentials,
            timeout,
            hello: ClientId::default(),
            idle: std::sync::Mutex::new(Vec::new()),
            max_idle,
            pipelining,
        })
    }

    async fn connect(&self) -> Result<Connection, SendError> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port)).await?;
        tcp.set_nodelay(true)?;
        let mut conn =
            AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &self.hello).await?;
        if let Some(required) = self.starttls {
            if conn.can_starttls() {
                conn.starttls(TlsParameters::new(self.host.clone())?, &self.hello)
                    .await?;
            } else if required {
                conn.abort().await;
                return Err(SendError::NoStartTls);
            }
        }
        // What lettre's EHLO learned, it keeps to itself but for the
        // extensions it knows; ask again (after STARTTLS, whose EHLO is the
        // one that counts, and before AUTH).
        let pipelining = self.pipelining
            && offers_pipelining(conn.command(Ehlo::new(self.hello.clone())).await?.message());
        if let Some(credentials) = &self.credentials {
            conn.auth(&[Mechanism::Plain, Mechanism::Login], credentials)
                .await?;
        }
        Ok(Connection {
            smtp: conn,
            pipelining,
        })
    }

    fn take_idle(&self) -> Option<Connection> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    fn put_idle(&self, conn: Connection) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.max_idle {
            idle.push(conn);
        }
    }

    /// Sends on an idle connection, or a new one. A reused connection the
    /// server may have closed meanwhile gets one more try on a new one.
    pub async fn send(&self, envelope: &Envelope, raw: &[u8]) -> Result<(), SendError> {
        if let Some(conn) = self.take_idle() {
            match self.send_on(conn, envelope, raw).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_permanent() => return Err(e),
                Err(e) => {
                    tracing::debug!(error = %e, "reused smtp connection failed; opening a new one")
                }
            }
        }
        let conn = tokio::time::timeout(self.timeout, self.connect())
            .await
            .map_err(|_| SendError::Timeout(self.timeout))??;
        self.send_on(conn, envelope, raw).await
    }

    async fn send_on(
        &self,
        mut conn: Connection,
        envelope: &Envelope,
        raw: &[u8],
    ) -> Result<(), SendError> {
        match tokio::time::timeout(self.timeout, transaction(&mut conn, envelope, raw)).await {
            Ok(Ok(())) => {
                self.put_idle(conn);
                Ok(())
            }
            Ok(Err(e)) => {
                // After a refusal the connection could go on, but its state
                // is not worth trusting (and pipelined replies may still be
                // unread): close it.
                conn.smtp.abort().await;
                Err(e.into())
            }
            Err(_) => Err(SendError::Timeout(self.timeout)),
        }
    }
}

/// One mail transaction: pipelined where the server offers it and the
/// message needs no extension lettre would check for.
async fn transaction(
    conn: &mut Connection,
    envelope: &Envelope,
    raw: &[u8],
) -> Result<(), lettre::transport::smtp::Error> {
    let plain = raw.is_ascii()
        && envelope
            .from()
            .is_none_or(|a| AsRef::<str>::as_ref(a).is_ascii())
        && envelope
            .to()
            .iter()
            .all(|a| AsRef::<str>::as_ref(a).is_ascii());
    let message = match std::str::from_utf8(raw) {
        Ok(text) if conn.pipelining && plain => text,
        _ => return conn.smtp.send(envelope, raw).await.map(drop),
    };
    let mut commands = Mail::new(envelope.from().cloned(), vec![]).to_string();
    for to in envelope.to() {
        commands.push_str(&Rcpt::new(to.clone(), vec![]).to_string());
    }
    commands.push_str(&Data.to_string());
    // `command` writes its argument in one write and reads one reply (an
    // error if negative); the other replies follow in order.
    conn.smtp.command(&commands).await?;
    for _ in envelope.to() {
        conn.smtp.read_response().await?;
    }
    conn.smtp.read_response().await?;
    conn.smtp.command(data_block(message)).await?;
    Ok(())
}

/// The message as DATA sends it: dot-stuffed (a line that begins with `.`
/// gets another), ended by CRLF `.` CRLF — the bytes lettre writes in two
/// writes, in one.
fn data_block(message: &str) -> String {
    let mut out = String::with_capacity(message.len() + 8);
    if message.starts_with('.') {
        out.push('.');
    }
    out.push_str(&message.replace("\r\n.", "\r\n.."));
    out.push_str("\r\n.\r\n");
    out
}

/// Whether an EHLO reply's lines list PIPELINING (the first line is the
/// server's name).
fn offers_pipelining<'a>(lines: impl Iterator<Item = &'a str>) -> bool {
    lines.skip(1).any(|line| {
        line.split_whitespace()
            .next()
            .is_some_and(|keyword| keyword.eq_ignore_ascii_case("PIPELINING"))
    })
}

/// Why an SMTP send failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Smtp(#[from] lettre::transport::smtp::Error),
    #[error("smtp connection failed")]
    Io(#[from] std::io::Error),
    #[error("the server offers no STARTTLS (tls=required)")]
    NoStartTls,
    #[error("smtp timed out after {0:?}")]
    Timeout(Duration),
}

impl SendError {
    /// A 5xx reply: the server refused the message for good.
    pub fn is_permanent(&self) -> bool {
        matches!(self, SendError::Smtp(e) if e.is_permanent())
    }
}

/// `%XX` sequences of a URL's user or password decoded (invalid ones kept).
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests;
