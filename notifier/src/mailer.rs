//! Mailer: hands a composed email to an SMTP server, or writes it as an
//! `.eml` file into a spool directory when no SMTP server is configured.
//!
//! ```text
//!  Message ──▶ SmtpMailer  ──SMTP (plain / STARTTLS / TLS, AUTH from the URL)──▶ server
//!          └─▶ SpoolMailer ──write .tmp, fsync, rename, fsync MAIL_DIR──▶ MAIL_DIR/order-event-<id>.eml
//! ```
//!
//! The spool's `Ok` means the file is durable under its final name: its
//! contents were fsync'd before the rename, and the directory (the rename)
//! after it. The directory's fsync is shared: a send waits for one that
//! started after its own rename, so the emails written at once share one
//! (see [`GroupSync`]). A file is written in one blocking task (create,
//! write, fsync, rename), not one per step.
//!
//! Errors are classified for the caller: a 5xx reply is `Permanent` (the
//! record goes to the dead-letter topic); everything else — 4xx replies,
//! refused or dropped connections, timeouts, TLS trouble, file system
//! errors — is `Transient` and retried with backoff.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use lettre::transport::smtp::client::Certificate;
use lettre::transport::smtp::AsyncSmtpTransport;
use lettre::{Message, Tokio1Executor};

use crate::smtp::{ConnectionPool, PoolOptions};

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
    #[error("SMTP")]
    Smtp(#[source] crate::smtp::SetupError),
    #[error("cannot read certificates from {path} (--smtp-ca-file: PEM)")]
    CaFile {
        path: PathBuf,
        #[source]
        source: BoxError,
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

/// SMTP, through the [`ConnectionPool`]: `smtp://` (plain or STARTTLS,
/// `TCP_NODELAY`) and `smtps://` (TLS from the first byte), pipelined where
/// the server offers it. At most `max_idle` sends at once, each on a
/// connection of its own: the pool bounds only the connections it keeps
/// idle, so the bound on open connections is here. A caller holds its
/// connection for the send alone, so more callers than connections (the
/// handlers, each also waiting for its inbox batch to commit) keep the
/// connections busy.
#[derive(Clone)]
pub struct SmtpMailer {
    pool: Arc<ConnectionPool>,
    sending: Arc<tokio::sync::Semaphore>,
}

impl SmtpMailer {
    /// `url`: `smtp://host:port`, `smtp://user:pass@host:587?tls=required`,
    /// `smtps://host:465`, ...; up to `options.max_idle` connections, kept
    /// open for reuse.
    pub fn new(url: &str, options: PoolOptions) -> Result<SmtpMailer, MailerSetupError> {
        // lettre's parser says what is wrong with a URL.
        AsyncSmtpTransport::<Tokio1Executor>::from_url(url).map_err(MailerSetupError::SmtpUrl)?;
        let connections = options.max_idle.max(1);
        let pool = ConnectionPool::from_url(url, options).map_err(MailerSetupError::Smtp)?;
        Ok(SmtpMailer {
            pool: Arc::new(pool),
            sending: Arc::new(tokio::sync::Semaphore::new(connections)),
        })
    }
}

impl MailSink for SmtpMailer {
    async fn send(&self, _key: &str, message: &Message) -> Result<(), MailError> {
        let raw = message.formatted();
        // Never closed: the mailer owns the semaphore.
        let _connection = self
            .sending
            .acquire()
            .await
            .map_err(|e| MailError::Transient(Box::new(e)))?;
        match self.pool.send(message.envelope(), &raw).await {
            Ok(()) => Ok(()),
            Err(e) if e.is_permanent() => Err(MailError::Permanent(Box::new(e))),
            Err(e) => Err(MailError::Transient(Box::new(e))),
        }
    }
}

/// The certificates of a PEM file (`--smtp-ca-file`), to trust for the
/// SMTP server's TLS besides the web's roots.
pub fn read_certificates(path: &Path) -> Result<Certificate, MailerSetupError> {
    let pem = std::fs::read(path).map_err(|source| MailerSetupError::CaFile {
        path: path.to_owned(),
        source: Box::new(source),
    })?;
    const BEGIN: &[u8] = b"-----BEGIN CERTIFICATE-----";
    if !pem.windows(BEGIN.len()).any(|w| w == BEGIN) {
        return Err(MailerSetupError::CaFile {
            path: path.to_owned(),
            source: "no -----BEGIN CERTIFICATE----- block in it".into(),
        });
    }
    Certificate::from_pem(&pem).map_err(|source| MailerSetupError::CaFile {
        path: path.to_owned(),
        source: Box::new(source),
    })
}

/// `.eml` files in a directory, one per event, written atomically and
/// durably (see the module header).
#[derive(Clone, Debug)]
pub struct SpoolMailer {
    dir: PathBuf,
    /// The directory's fsync, shared by the sends waiting for one.
    dir_sync: Arc<GroupSync>,
    /// Files being written at once (see [`SPOOL_WRITERS`]).
    writers: Arc<tokio::sync::Semaphore>,
}

/// Files written into the spool at once. A writer mostly waits for its
/// fsync, and a journaled file system commits the fsyncs waiting together:
/// on the benchmark's ext4, 32 writers wrote 3,200–4,100 files/s where 4
/// wrote 2,300–2,900 (BENCHMARKS.md). (Creating and renaming take the
/// directory's lock; writers waiting for it spin, at 4 writers as at 32.)
const SPOOL_WRITERS: usize = 32;

/// One operation (an fsync) shared by the callers waiting for it: a caller
/// returns once a run that *started after it arrived* has succeeded, so
/// everything the caller did before arriving (a rename) is covered; callers
/// arriving while a run is under way share the next one.
#[derive(Debug, Default)]
pub struct GroupSync {
    /// Tickets handed out: caller n arrived n-th.
    arrived: std::sync::atomic::AtomicU64,
    /// Every caller with a ticket up to this is covered by a finished run.
    covered: tokio::sync::Mutex<u64>,
}

impl GroupSync {
    /// Waits until a run of `op` started after this call covers it; runs
    /// `op` itself when no run under way or finished does.
    pub async fn after<F, Fut, E>(&self, op: F) -> Result<(), E>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<(), E>>,
    {
        use std::sync::atomic::Ordering::SeqCst;
        let ticket = self.arrived.fetch_add(1, SeqCst) + 1;
        let mut covered = self.covered.lock().await;
        if *covered >= ticket {
            return Ok(()); // A run that started after we arrived finished.
        }
        // Every ticket up to `upto` was taken before this run starts.
        let upto = self.arrived.load(SeqCst);
        op().await?;
        *covered = upto;
        Ok(())
    }
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
            dir_sync: Arc::default(),
            writers: Arc::new(tokio::sync::Semaphore::new(SPOOL_WRITERS)),
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
        let write = move || -> std::io::Result<()> {
            use std::io::Write;
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&raw)?;
            file.sync_all()?;
            drop(file);
            std::fs::rename(&tmp, &dest)
        };
        let transient = |e: std::io::Error| MailError::Transient(Box::new(e));
        {
            // Never closed.
            let _writer = self
                .writers
                .acquire()
                .await
                .map_err(|e| transient(std::io::Error::other(e)))?;
            blocking(write).await.map_err(transient)?;
        }
        // The rename is durable once the directory is.
        let dir = self.dir.clone();
        self.dir_sync
            .after(|| blocking(move || std::fs::File::open(&dir)?.sync_all()))
            .await
            .map_err(transient)
    }
}

/// Runs file system calls on the blocking pool.
async fn blocking(f: impl FnOnce() -> std::io::Result<()> + Send + 'static) -> std::io::Result<()> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
}

/// The configured destination.
#[derive(Clone)]
pub enum Mailer {
    Smtp(SmtpMailer),
    Spool(SpoolMailer),
}

impl Mailer {
    /// SMTP when `smtp_url` is given (see [`PoolOptions`]), else the spool
    /// directory.
    pub fn from_config(
        smtp_url: Option<&str>,
        mail_dir: Option<&Path>,
        smtp: PoolOptions,
    ) -> Result<Mailer, MailerSetupError> {
        match (smtp_url, mail_dir) {
            (Some(url), _) => Ok(Mailer::Smtp(SmtpMailer::new(url, smtp)?)),
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

    fn options() -> PoolOptions {
        PoolOptions {
            timeout: std::time::Duration::from_secs(1),
            max_idle: 4,
            pipelining: true,
            extra_roots: Vec::new(),
        }
    }

    #[test]
    fn smtp_urls() {
        assert!(SmtpMailer::new("smtp://127.0.0.1:2525", options()).is_ok());
        assert!(SmtpMailer::new("smtp://u:p@mail.example:587?tls=required", options()).is_ok());
        assert!(SmtpMailer::new("smtps://mail.example", options()).is_ok());
        assert!(SmtpMailer::new("http://mail.example", options()).is_err());
        assert!(SmtpMailer::new("smtp://mail.example?tls=sometimes", options()).is_err());
        assert!(matches!(
            Mailer::from_config(None, None, options()),
            Err(MailerSetupError::NoDestination)
        ));
    }

    #[test]
    fn a_ca_file_must_hold_pem_certificates() {
        let missing = Path::new("/nonexistent/ca.pem");
        assert!(matches!(
            read_certificates(missing),
            Err(MailerSetupError::CaFile { .. })
        ));
        let dir = std::env::temp_dir().join(format!("ca-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let garbage = dir.join("garbage.pem");
        std::fs::write(&garbage, "not a certificate").unwrap();
        let error = read_certificates(&garbage).unwrap_err();
        assert!(error.to_string().contains("garbage.pem"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Ten callers at once while a run is under way: they share the next
    /// run instead of one each, and none returns before a run that started
    /// after it arrived.
    #[tokio::test]
    async fn group_sync_shares_one_run_among_the_callers_waiting() {
        use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
        let sync = Arc::new(GroupSync::default());
        let runs = Arc::new(AtomicU64::new(0));
        let (release, hold) = tokio::sync::oneshot::channel::<()>();
        let first = {
            let (sync, runs) = (sync.clone(), runs.clone());
            tokio::spawn(async move {
                sync.after(|| async move {
                    runs.fetch_add(1, SeqCst);
                    hold.await.ok();
                    Ok::<(), ()>(())
                })
                .await
            })
        };
        while runs.load(SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        // Arriving during the first run: it does not cover them.
        let waiters: Vec<_> = (0..10)
            .map(|_| {
                let (sync, runs) = (sync.clone(), runs.clone());
                tokio::spawn(async move {
                    let counter = runs.clone();
                    sync.after(|| async move {
                        counter.fetch_add(1, SeqCst);
                        Ok::<(), ()>(())
                    })
                    .await
                    .unwrap();
                    runs.load(SeqCst)
                })
            })
            .collect();
        tokio::task::yield_now().await;
        release.send(()).unwrap();
        first.await.unwrap().unwrap();
        for w in waiters {
            assert_eq!(w.await.unwrap(), 2, "each waited for the second run");
        }
        assert_eq!(runs.load(SeqCst), 2, "one run for the ten");
        // A failed run covers nobody: the next caller runs again.
        assert_eq!(
            sync.after(|| async { Err::<(), _>("full") }).await,
            Err("full")
        );
        sync.after(|| async { Ok::<(), ()>(()) }).await.unwrap();
    }

    #[tokio::test]
    async fn the_spool_writes_each_email_under_its_name_and_no_temporary_file() {
        let dir = std::env::temp_dir().join(format!("spool-unit-{}", std::process::id()));
        let spool = SpoolMailer::new(&dir).unwrap();
        let message = Message::builder()
            .from("shop@example.com".parse().unwrap())
            .to("c@example.com".parse().unwrap())
            .subject("hi")
            .body("body".to_owned())
            .unwrap();
        let sends: Vec<_> = (0..20)
            .map(|i| {
                let (spool, message) = (spool.clone(), message.clone());
                tokio::spawn(async move { spool.send(&format!("order-event-{i}"), &message).await })
            })
            .collect();
        for s in sends {
            s.await.unwrap().unwrap();
        }
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let mut expected: Vec<String> = (0..20).map(|i| format!("order-event-{i}.eml")).collect();
        expected.sort();
        assert_eq!(names, expected);
        let body = std::fs::read_to_string(dir.join("order-event-3.eml")).unwrap();
        assert!(body.contains("Subject: hi"), "{body}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
