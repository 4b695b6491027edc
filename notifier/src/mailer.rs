//! Mailer: hands a composed email to an SMTP server, or writes it as an
//! `.eml` file into a spool directory when no SMTP server is configured.
//!
//! ```text
//!  Message ──▶ SmtpMailer  ──SMTP (plain / STARTTLS / TLS, AUTH from the URL)──▶ server
//!          └─▶ SpoolMailer ──write .tmp, fsync, rename──▶ MAIL_DIR/order-event-<id>.eml
//! ```
//!
//! Errors are classified for the caller: a 5xx reply is `Permanent` (the
//! record goes to the dead-letter topic); everything else — 4xx replies,
//! refused or dropped connections, timeouts, TLS trouble, file system
//! errors — is `Transient` and retried with backoff.

use std::path::{Path, PathBuf};
use std::time::Duration;

use lettre::transport::smtp::AsyncSmtpTransport;
use lettre::{AsyncTransport, Message, Tokio1Executor};

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why an email was not handed over.
#[derive(Debug, thiserror::Error)]
pub enum MailError {
    /// The server refused the message for good (5xx): retrying cannot help.
    #[error("mail server rejected the message permanently")]
    Permanent(#[source] BoxError),
    /// Not delivered this time; retrying may succeed.
    #[error("mail could not be delivered now")]
    Transient(#[source] BoxError),
}

impl MailError {
    pub fn is_permanent(&self) -> bool {
        matches!(self, MailError::Permanent(_))
    }
}

/// Errors setting up a mailer (definite: the configuration is wrong).
#[derive(Debug, thiserror::Error)]
pub enum MailerSetupError {
    #[error(
        "invalid SMTP URL (expected smtp://host:port, smtp://host?tls=required or smtps://host)"
    )]
    SmtpUrl(#[source] lettre::transport::smtp::Error),
    #[error("cannot create mail directory {path}")]
    MailDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("neither an SMTP URL nor a mail directory is configured")]
    NoDestination,
}

/// A destination for emails.
///
/// Delivery contract:
/// - `Ok(())` means the destination took the message (the SMTP server
///   accepted DATA with 250, or the `.eml` file was renamed into place);
/// - after `Err(Transient)` the message may or may not have arrived (a
///   connection can drop after the server accepted DATA); the caller retries
///   the same message, whose Message-ID lets the receiver drop a duplicate;
/// - after `Err(Permanent)` the message did not arrive and never will;
/// - `send` is idempotent per `key` for the spool (same file name), not for
///   SMTP (a resend is a second email with the same Message-ID).
pub trait MailSink {
    /// Sends `message`; `key` (e.g. `order-event-17`) names it where the
    /// destination needs a name.
    fn send(
        &self,
        key: &str,
        message: &Message,
    ) -> impl std::future::Future<Output = Result<(), MailError>> + Send;
}

/// SMTP through lettre's pooled tokio transport.
#[derive(Clone)]
pub struct SmtpMailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
}

impl SmtpMailer {
    /// `url`: `smtp://host:port`, `smtp://user:pass@host:587?tls=required`,
    /// `smtps://host:465`, ...
    pub fn new(url: &str, timeout: Duration) -> Result<SmtpMailer, MailerSetupError> {
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
            .map_err(MailerSetupError::SmtpUrl)?
            .timeout(Some(timeout))
            .build();
        Ok(SmtpMailer { transport })
    }
}

impl MailSink for SmtpMailer {
    async fn send(&self, _key: &str, message: &Message) -> Result<(), MailError> {
        let raw = message.formatted();
        match self.transport.send_raw(message.envelope(), &raw).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_permanent() => Err(MailError::Permanent(Box::new(e))),
            Err(e) => Err(MailError::Transient(Box::new(e))),
        }
    }
}

/// `.eml` files in a directory, one per event, written atomically.
#[derive(Clone, Debug)]
pub struct SpoolMailer {
    dir: PathBuf,
}

impl SpoolMailer {
    /// Creates `dir` if it is missing.
    pub fn new(dir: &Path) -> Result<SpoolMailer, MailerSetupError> {
        std::fs::create_dir_all(dir).map_err(|source| MailerSetupError::MailDir {
            path: dir.to_owned(),
            source,
        })?;
        Ok(SpoolMailer {
            dir: dir.to_owned(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl MailSink for SpoolMailer {
    async fn send(&self, key: &str, message: &Message) -> Result<(), MailError> {
        let raw = message.formatted();
        let tmp = self.dir.join(format!(".{key}.tmp"));
        let dest = self.dir.join(format!("{key}.eml"));
        let write = async {
            let mut file = tokio::fs::File::create(&tmp).await?;
            tokio::io::AsyncWriteExt::write_all(&mut file, &raw).await?;
            file.sync_all().await?;
            drop(file);
            tokio::fs::rename(&tmp, &dest).await
        };
        write.await.map_err(|e| MailError::Transient(Box::new(e)))
    }
}

/// The configured destination.
#[derive(Clone)]
pub enum Mailer {
    Smtp(SmtpMailer),
    Spool(SpoolMailer),
}

impl Mailer {
    /// SMTP when `smtp_url` is given, else the spool directory.
    pub fn from_config(
        smtp_url: Option<&str>,
        mail_dir: Option<&Path>,
        timeout: Duration,
    ) -> Result<Mailer, MailerSetupError> {
        match (smtp_url, mail_dir) {
            (Some(url), _) => Ok(Mailer::Smtp(SmtpMailer::new(url, timeout)?)),
            (None, Some(dir)) => Ok(Mailer::Spool(SpoolMailer::new(dir)?)),
            (None, None) => Err(MailerSetupError::NoDestination),
        }
    }

    /// For logs: never the URL (it may hold credentials).
    pub fn describe(&self) -> String {
        match self {
            Mailer::Smtp(_) => "smtp".to_owned(),
            Mailer::Spool(s) => format!("spool directory {}", s.dir().display()),
        }
    }
}

impl MailSink for Mailer {
    async fn send(&self, key: &str, message: &Message) -> Result<(), MailError> {
        match self {
            Mailer::Smtp(m) => m.send(key, message).await,
            Mailer::Spool(m) => m.send(key, message).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The pooled transport spawns its pool task: it needs a runtime.
    #[tokio::test]
    async fn smtp_urls() {
        let t = Duration::from_secs(1);
        assert!(SmtpMailer::new("smtp://127.0.0.1:2525", t).is_ok());
        assert!(SmtpMailer::new("smtp://u:p@mail.example:587?tls=required", t).is_ok());
        assert!(SmtpMailer::new("smtps://mail.example", t).is_ok());
        assert!(SmtpMailer::new("http://mail.example", t).is_err());
        assert!(matches!(
            Mailer::from_config(None, None, t),
            Err(MailerSetupError::NoDestination)
        ));
    }
}
