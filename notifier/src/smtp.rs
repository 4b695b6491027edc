//! SMTP connections: `smtp://` (plain or STARTTLS, with `TCP_NODELAY`) and
//! `smtps://` (TLS from the first byte), kept open for reuse, and
//! pipelined (RFC 2920) when the server offers it.
//!
//! ```text
//!  without PIPELINING                      with PIPELINING
//!  ─▶ MAIL FROM     ◀─ 250                 ─▶ MAIL FROM, RCPT TO…, DATA   (one write)
//!  ─▶ RCPT TO       ◀─ 250                 ◀─ 250, 250…, 354
//!  ─▶ DATA          ◀─ 354                 ─▶ message, "."                (one write)
//!  ─▶ message, "."  ◀─ 250                 ◀─ 250
//! ```
//!
//! Either way the message and its final `.` go in one write, so every
//! write follows the server's reply to the one before: Nagle's algorithm
//! never holds one back (lettre's own send writes the message and the `.`
//! apart; on a socket without `TCP_NODELAY`, as lettre opens for
//! `smtps://`, the `.` then waits about 40 ms for a delayed ACK).
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
//!
//! TLS (STARTTLS and `smtps://`) verifies the server against the web's
//! root certificates plus, with `--smtp-ca-file`, the given ones (a mail
//! relay with a private CA).

use std::time::Duration;

use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, Certificate, TlsParameters};
use lettre::transport::smtp::commands::{Data, Ehlo, Mail, Rcpt};
use lettre::transport::smtp::extension::ClientId;
use tokio::net::TcpStream;

/// Reused SMTP connections, on lettre's SMTP connection.
///
/// Why not lettre's transport: it writes a message's body and its
/// terminating `.` line in two writes. With Nagle's algorithm on, the
/// second small write waits for the ACK of the first, which the server
/// delays (40 ms on Linux) because it has nothing to answer until the
/// terminator arrives: about 45 ms per email against a local aiosmtpd
/// (BENCHMARKS.md, `plain-lettre`: 694 emails/s on 32 connections), against
/// 2.5 ms with `TCP_NODELAY`. lettre offers no socket option, so for
/// `smtp://` this pool opens the sockets and hands them to lettre's SMTP
/// connection; and it writes each message with its `.` in one write.
pub struct ConnectionPool {
    pub(crate) host: String,
    pub(crate) port: u16,
    /// `Some(required)`: STARTTLS (`?tls=required` fails without it).
    pub(crate) starttls: Option<bool>,
    /// `smtps://`: TLS from the first byte.
    pub(crate) implicit_tls: bool,
    pub(crate) credentials: Option<Credentials>,
    /// For STARTTLS or smtps: the host to verify, the roots trusted (the
    /// web's and `--smtp-ca-file`'s). Built once, at start-up.
    tls: Option<TlsParameters>,
    timeout: Duration,
    pub(crate) hello: ClientId,
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

/// How a [`ConnectionPool`] connects and sends, beside its URL.
#[derive(Clone)]
pub struct PoolOptions {
    /// Of connecting, and of each mail transaction.
    pub timeout: Duration,
    /// Idle connections kept for reuse (one per concurrent sender is enough).
    pub max_idle: usize,
    /// Pipeline where the server offers it.
    pub pipelining: bool,
    /// Certificates trusted for TLS besides the web's roots.
    pub extra_roots: Vec<Certificate>,
}

impl ConnectionPool {
    /// For `smtp://` and `smtps://` URLs.
    pub fn from_url(url: &str, options: PoolOptions) -> Result<ConnectionPool, SetupError> {
        let url = url::Url::parse(url).map_err(|_| SetupError::Url)?;
        let implicit_tls = match url.scheme() {
            "smtp" => false,
            "smtps" => true,
            _ => return Err(SetupError::Url),
        };
        let host = url
            .host_str()
            .ok_or(SetupError::Url)?
            .trim_matches(['[', ']'])
            .to_owned();
        let starttls = url
            .query_pairs()
            .find(|(k, _)| k == "tls")
            .filter(|_| !implicit_tls)
            .map(|(_, v)| v == "required");
        let decode = |s: &str| percent_decode(s);
        let credentials = (!url.username().is_empty()).then(|| {
            Credentials::new(
                decode(url.username()),
                decode(url.password().unwrap_or_default()),
            )
        });
        let default_port = match (implicit_tls, starttls) {
            (true, _) => 465,
            (false, Some(true)) => 587,
            (false, _) => 25,
        };
        let tls = if implicit_tls || starttls.is_some() {
            let mut builder = TlsParameters::builder(host.clone());
            for root in options.extra_roots {
                builder = builder.add_root_certificate(root);
            }
            Some(builder.build().map_err(SetupError::Tls)?)
        } else {
            None
        };
        Ok(ConnectionPool {
            port: url.port().unwrap_or(default_port),
            host,
            starttls,
            implicit_tls,
            credentials,
            tls,
            timeout: options.timeout,
            // As lettre reads its URLs: a path names this client in EHLO.
            hello: match url.path().trim_matches('/') {
                "" => ClientId::default(),
                name => ClientId::Domain(name.to_owned()),
            },
            idle: std::sync::Mutex::new(Vec::new()),
            max_idle: options.max_idle,
            pipelining: options.pipelining,
        })
    }

    async fn connect(&self) -> Result<Connection, SendError> {
        let mut conn = if self.implicit_tls {
            // lettre opens the socket (no TCP_NODELAY): every write of
            // ours follows a reply, so Nagle holds none back.
            AsyncSmtpConnection::connect_tokio1(
                (self.host.as_str(), self.port),
                Some(self.timeout),
                &self.hello,
                self.tls.clone(),
                None,
            )
            .await?
        } else {
            let tcp = TcpStream::connect((self.host.as_str(), self.port)).await?;
            tcp.set_nodelay(true)?;
            AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &self.hello).await?
        };
        if let (Some(required), Some(tls)) = (self.starttls, &self.tls) {
            if conn.can_starttls() {
                conn.starttls(tls.clone(), &self.hello).await?;
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

/// One mail transaction: pipelined where the server offers it, the
/// message and its `.` in one write. A message that needs an extension
/// lettre checks for (SMTPUTF8, 8BITMIME) goes through lettre's send.
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
        Ok(text) if plain => text,
        _ => return conn.smtp.send(envelope, raw).await.map(drop),
    };
    let mut commands = vec![Mail::new(envelope.from().cloned(), vec![]).to_string()];
    for to in envelope.to() {
        commands.push(Rcpt::new(to.clone(), vec![]).to_string());
    }
    commands.push(Data.to_string());
    // `command` writes its argument in one write and reads one reply (an
    // error if negative).
    if conn.pipelining {
        // The other replies follow in order.
        conn.smtp.command(commands.concat()).await?;
        for _ in 1..commands.len() {
            conn.smtp.read_response().await?;
        }
    } else {
        for command in commands {
            conn.smtp.command(command).await?;
        }
    }
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

/// Why a pool cannot be made (the configuration is wrong).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("the SMTP URL is not smtp://host[:port] or smtps://host[:port]")]
    Url,
    #[error("setting up TLS for the SMTP server")]
    Tls(#[source] lettre::transport::smtp::Error),
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
