//! The pool against a scripted SMTP server — plain, STARTTLS, or TLS from
//! the first byte with a certificate from a CA made for the test — that
//! records, for each mail transaction, whether the client sent RCPT and
//! DATA before the reply to MAIL (pipelined) and what message arrived.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lettre::address::Envelope;
use lettre::transport::smtp::authentication::Credentials;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio_rustls::TlsAcceptor;

use super::*;

/// How the scripted server behaves.
#[derive(Clone, Copy)]
struct Script {
    /// Lists PIPELINING in its EHLO reply.
    pipelining: bool,
    /// The reply to MAIL FROM.
    mail: &'static str,
    /// The reply to RCPT TO.
    rcpt: &'static str,
    tls: Security,
}

#[derive(Clone, Copy)]
enum Security {
    Plain,
    /// Offers STARTTLS in its first EHLO reply (the URL requires it).
    StartTls,
    /// TLS from the first byte (smtps).
    Implicit,
}

const ACCEPTS: Script = Script {
    pipelining: true,
    mail: "250 ok",
    rcpt: "250 ok",
    tls: Security::Plain,
};

fn options(pipelining: bool) -> PoolOptions {
    PoolOptions {
        timeout: Duration::from_secs(5),
        max_idle: 4,
        pipelining,
        extra_roots: Vec::new(),
    }
}

/// What the server saw of one mail transaction.
#[derive(Debug, Default, Clone)]
struct Transaction {
    /// RCPT and DATA had arrived before the server answered MAIL.
    sent_ahead: bool,
    /// The message, un-dot-stuffed, when its final `.` arrived.
    message: Option<String>,
}

struct Server {
    url: String,
    connections: Arc<Mutex<usize>>,
    transactions: Arc<Mutex<Vec<Transaction>>>,
}

impl Server {
    async fn start(script: Script) -> Server {
        Server::start_tls(script, None).await
    }

    /// With `ca`, TLS (as `script.tls` says) with a certificate it signed.
    async fn start_tls(script: Script, ca: Option<&TestCa>) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let url = match script.tls {
            Security::Plain => format!("smtp://{address}"),
            Security::StartTls => format!("smtp://{address}?tls=required"),
            Security::Implicit => format!("smtps://{address}"),
        };
        let acceptor = ca.map(TestCa::acceptor);
        let connections = Arc::new(Mutex::new(0));
        let transactions = Arc::new(Mutex::new(Vec::new()));
        let (count, seen) = (connections.clone(), transactions.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                *count.lock().unwrap() += 1;
                let (acceptor, seen) = (acceptor.clone(), seen.clone());
                tokio::spawn(async move {
                    match (script.tls, acceptor) {
                        (Security::Plain, _) | (_, None) => serve(stream, script, seen, true).await,
                        (Security::Implicit, Some(acceptor)) => {
                            if let Ok(tls) = acceptor.accept(stream).await {
                                serve(tls, script, seen, true).await;
                            }
                        }
                        (Security::StartTls, Some(acceptor)) => {
                            if let Some(tcp) = until_starttls(stream).await {
                                if let Ok(tls) = acceptor.accept(tcp).await {
                                    serve(tls, script, seen, false).await;
                                }
                            }
                        }
                    }
                });
            }
        });
        Server {
            url,
            connections,
            transactions,
        }
    }

    fn pool(&self) -> ConnectionPool {
        ConnectionPool::from_url(&self.url, options(true)).unwrap()
    }

    fn transactions(&self) -> Vec<Transaction> {
        self.transactions.lock().unwrap().clone()
    }
}

/// The plain part of a STARTTLS conversation: greeting, an EHLO reply
/// offering STARTTLS, STARTTLS answered. Returns the stream to wrap.
async fn until_starttls(stream: tokio::net::TcpStream) -> Option<tokio::net::TcpStream> {
    let mut stream = BufReader::new(stream);
    stream.write_all(b"220 scripted\r\n").await.ok()?;
    let mut line = String::new();
    loop {
        line.clear();
        if stream.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        let command = line.get(..4).unwrap_or("").to_ascii_uppercase();
        let reply: &[u8] = match command.as_str() {
            "EHLO" => b"250-scripted\r\n250 STARTTLS\r\n",
            "STAR" => b"220 go ahead\r\n",
            _ => b"530 STARTTLS first\r\n",
        };
        stream.write_all(reply).await.ok()?;
        if command == "STAR" {
            // The client sends nothing more before our 220: nothing
            // buffered is lost.
            return Some(stream.into_inner());
        }
    }
}

async fn serve<S: AsyncRead + AsyncWrite>(
    stream: S,
    script: Script,
    seen: Arc<Mutex<Vec<Transaction>>>,
    greet: bool,
) {
    let (read, mut write) = tokio::io::split(stream);
    let mut reader = BufReader::new(read);
    if greet {
        let _ = write.write_all(b"220 scripted\r\n").await;
    }
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let reply = match line.get(..4).unwrap_or("").to_ascii_uppercase().as_str() {
            "EHLO" if script.pipelining => "250-scripted\r\n250-PIPELINING\r\n250 8BITMIME".into(),
            "EHLO" => "250-scripted\r\n250 8BITMIME".into(),
            "MAIL" => {
                // Anything more within 200 ms, before this reply, was sent
                // without waiting for it.
                let sent_ahead = !reader.buffer().is_empty()
                    || tokio::time::timeout(Duration::from_millis(200), reader.fill_buf())
                        .await
                        .is_ok_and(|r| r.is_ok_and(|b| !b.is_empty()));
                seen.lock().unwrap().push(Transaction {
                    sent_ahead,
                    message: None,
                });
                script.mail.to_owned()
            }
            "RCPT" => script.rcpt.to_owned(),
            "DATA" if script.rcpt.starts_with('2') && script.mail.starts_with('2') => {
                let _ = write.write_all(b"354 go ahead\r\n").await;
                let mut message = String::new();
                loop {
                    line.clear();
                    if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return; // dropped before the end: nothing delivered
                    }
                    if line == ".\r\n" {
                        break;
                    }
                    message.push_str(line.strip_prefix('.').unwrap_or(&line));
                }
                if let Some(t) = seen.lock().unwrap().last_mut() {
                    t.message = Some(message);
                }
                "250 queued".into()
            }
            "DATA" => "554 no valid recipients".into(),
            "QUIT" => return,
            _ => "250 ok".into(),
        };
        if write
            .write_all(format!("{reply}\r\n").as_bytes())
            .await
            .is_err()
        {
            return;
        }
    }
}

/// A CA, and a certificate for 127.0.0.1 it signed, made with `openssl`
/// in a directory of their own.
struct TestCa {
    dir: PathBuf,
}

static CA_DIRS: AtomicUsize = AtomicUsize::new(0);

impl TestCa {
    fn make() -> TestCa {
        let n = CA_DIRS.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("smtp-tls-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        openssl(
            &dir,
            &format!(
                "req -x509 {key} -keyout ca.key -out ca.pem -days 2 -subj /CN=smtp-test-ca \
                 -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign"
            ),
        );
        openssl(
            &dir,
            &format!("req {key} -keyout server.key -out server.csr -subj /CN=127.0.0.1"),
        );
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
        )
        .unwrap();
        openssl(
            &dir,
            "x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
             -out server.pem -days 2 -extfile server.ext",
        );
        TestCa { dir }
    }

    /// The CA, read as `--smtp-ca-file` is.
    fn root(&self) -> Certificate {
        crate::mailer::read_certificates(&self.dir.join("ca.pem")).unwrap()
    }

    fn acceptor(&self) -> TlsAcceptor {
        let certs = CertificateDer::pem_file_iter(self.dir.join("server.pem"))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(self.dir.join("server.key")).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        TlsAcceptor::from(Arc::new(config))
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn openssl(dir: &Path, args: &str) {
    let out = std::process::Command::new("openssl")
        .args(args.split_whitespace())
        .current_dir(dir)
        .output()
        .expect("running openssl");
    assert!(
        out.status.success(),
        "openssl {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn envelope() -> Envelope {
    Envelope::new(
        Some("shop@example.com".parse().unwrap()),
        vec!["c@example.com".parse().unwrap()],
    )
    .unwrap()
}

const MESSAGE: &str = "Subject: hi\r\n\r\n.leading dot\r\nmiddle\r\n..two dots\r\n";

/// The message as the server reads it back: un-dot-stuffed, with the CRLF
/// that comes before the final dot.
fn received() -> String {
    format!("{MESSAGE}\r\n")
}

#[tokio::test]
async fn a_server_offering_pipelining_gets_mail_rcpt_and_data_at_once() {
    let server = Server::start(ACCEPTS).await;
    let pool = server.pool();
    for _ in 0..3 {
        pool.send(&envelope(), MESSAGE.as_bytes()).await.unwrap();
    }
    let seen = server.transactions();
    assert_eq!(seen.len(), 3);
    for t in &seen {
        assert!(t.sent_ahead, "RCPT and DATA came before MAIL's reply");
        assert_eq!(t.message.as_deref(), Some(&*received()));
    }
    assert_eq!(
        *server.connections.lock().unwrap(),
        1,
        "one connection reused"
    );
}

#[tokio::test]
async fn without_pipelining_offered_or_allowed_each_command_waits_for_its_reply() {
    let server = Server::start(Script {
        pipelining: false,
        ..ACCEPTS
    })
    .await;
    server
        .pool()
        .send(&envelope(), MESSAGE.as_bytes())
        .await
        .unwrap();
    let offered = Server::start(ACCEPTS).await;
    let off = ConnectionPool::from_url(&offered.url, options(false)).unwrap();
    off.send(&envelope(), MESSAGE.as_bytes()).await.unwrap();
    for seen in [server.transactions(), offered.transactions()] {
        assert_eq!(seen.len(), 1);
        assert!(!seen[0].sent_ahead, "RCPT waited for MAIL's reply");
        assert_eq!(seen[0].message.as_deref(), Some(&*received()));
    }
}

#[tokio::test]
async fn a_refused_pipelined_recipient_is_permanent_and_delivers_nothing() {
    let server = Server::start(Script {
        rcpt: "550 5.1.1 no such mailbox",
        ..ACCEPTS
    })
    .await;
    let error = server
        .pool()
        .send(&envelope(), MESSAGE.as_bytes())
        .await
        .unwrap_err();
    assert!(error.is_permanent(), "{error}");
    let seen = server.transactions();
    assert!(seen.iter().all(|t| t.sent_ahead && t.message.is_none()));
}

#[tokio::test]
async fn a_pipelined_mail_refused_for_now_is_transient_and_the_next_send_reconnects() {
    let server = Server::start(Script {
        mail: "451 4.3.0 try again later",
        ..ACCEPTS
    })
    .await;
    let pool = server.pool();
    for _ in 0..2 {
        let error = pool
            .send(&envelope(), MESSAGE.as_bytes())
            .await
            .unwrap_err();
        assert!(!error.is_permanent(), "{error}");
    }
    assert!(server.transactions().iter().all(|t| t.message.is_none()));
    // A refused connection is closed, never reused.
    assert_eq!(*server.connections.lock().unwrap(), 2);
}

/// smtps:// and STARTTLS against a server whose certificate comes from a
/// CA given as `--smtp-ca-file` gives it: pipelined, one connection reused.
#[tokio::test]
async fn tls_from_the_first_byte_and_starttls_trust_the_given_ca() {
    let ca = TestCa::make();
    for tls in [Security::Implicit, Security::StartTls] {
        let server = Server::start_tls(Script { tls, ..ACCEPTS }, Some(&ca)).await;
        let pool = ConnectionPool::from_url(
            &server.url,
            PoolOptions {
                extra_roots: vec![ca.root()],
                ..options(true)
            },
        )
        .unwrap();
        for _ in 0..2 {
            pool.send(&envelope(), MESSAGE.as_bytes()).await.unwrap();
        }
        let seen = server.transactions();
        assert_eq!(seen.len(), 2, "{}", server.url);
        for t in &seen {
            assert!(t.sent_ahead, "pipelined over TLS: {}", server.url);
            assert_eq!(t.message.as_deref(), Some(&*received()));
        }
        assert_eq!(*server.connections.lock().unwrap(), 1, "{}", server.url);
    }
}

#[tokio::test]
async fn a_server_certificate_from_an_unknown_ca_is_refused() {
    let ca = TestCa::make();
    for tls in [Security::Implicit, Security::StartTls] {
        let server = Server::start_tls(Script { tls, ..ACCEPTS }, Some(&ca)).await;
        let error = server
            .pool()
            .send(&envelope(), MESSAGE.as_bytes())
            .await
            .unwrap_err();
        assert!(!error.is_permanent(), "{error}");
        assert!(server.transactions().is_empty(), "{}", server.url);
    }
}

#[test]
fn data_blocks_are_dot_stuffed_and_terminated() {
    assert_eq!(data_block(".a\r\nb\r\n.c"), "..a\r\nb\r\n..c\r\n.\r\n");
    assert_eq!(data_block("a.b\r\n"), "a.b\r\n\r\n.\r\n");
}

#[test]
fn pipelining_is_read_from_the_ehlo_lines_after_the_name() {
    assert!(offers_pipelining(
        ["mx", "SIZE 1", "pipelining"].into_iter()
    ));
    assert!(!offers_pipelining(["PIPELINING", "8BITMIME"].into_iter()));
    assert!(!offers_pipelining(["mx", "XPIPELINING"].into_iter()));
}

#[test]
fn smtp_and_smtps_urls() {
    let p = ConnectionPool::from_url("smtp://127.0.0.1:2525", options(true)).expect("smtp");
    assert_eq!(
        (p.host.as_str(), p.port, p.starttls, p.implicit_tls),
        ("127.0.0.1", 2525, None, false)
    );
    assert!(p.credentials.is_none());
    let p = ConnectionPool::from_url(
        "smtp://u%40x:p%3Aw@mail.example?tls=required",
        options(true),
    )
    .expect("smtp");
    assert_eq!(
        (p.host.as_str(), p.port, p.starttls),
        ("mail.example", 587, Some(true))
    );
    assert_eq!(
        p.credentials,
        Some(Credentials::new("u@x".to_owned(), "p:w".to_owned()))
    );
    let p = ConnectionPool::from_url("smtp://mail.example?tls=opportunistic", options(true))
        .expect("smtp");
    assert_eq!((p.port, p.starttls), (25, Some(false)));
    let p = ConnectionPool::from_url("smtps://mail.example", options(true)).expect("smtps");
    assert_eq!((p.port, p.starttls, p.implicit_tls), (465, None, true));
    assert!(ConnectionPool::from_url("http://mail.example", options(true)).is_err());
    let p = ConnectionPool::from_url("smtps://mail.example/shop.example", options(true))
        .expect("smtps");
    assert_eq!(p.hello, ClientId::Domain("shop.example".to_owned()));
    assert_eq!(percent_decode("a%2Fb%zz%4"), "a/b%zz%4");
}
