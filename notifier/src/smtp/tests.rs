//! The pool against a scripted SMTP server that records, for each mail
//! transaction, whether the client sent RCPT and DATA before the reply to
//! MAIL (pipelined) and what message arrived.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lettre::address::Envelope;
use lettre::transport::smtp::authentication::Credentials;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

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
}

const ACCEPTS: Script = Script {
    pipelining: true,
    mail: "250 ok",
    rcpt: "250 ok",
};

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
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("smtp://{}", listener.local_addr().unwrap());
        let connections = Arc::new(Mutex::new(0));
        let transactions = Arc::new(Mutex::new(Vec::new()));
        let (count, seen) = (connections.clone(), transactions.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                *count.lock().unwrap() += 1;
                tokio::spawn(serve(stream, script, seen.clone()));
            }
        });
        Server {
            url,
            connections,
            transactions,
        }
    }

    fn pool(&self) -> ConnectionPool {
        ConnectionPool::from_url(&self.url, Duration::from_secs(5), 4, true).unwrap()
    }

    fn transactions(&self) -> Vec<Transaction> {
        self.transactions.lock().unwrap().clone()
    }
}

async fn serve(stream: tokio::net::TcpStream, script: Script, seen: Arc<Mutex<Vec<Transaction>>>) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let _ = write.write_all(b"220 scripted\r\n").await;
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

fn envelope() -> Envelope {
    Envelope::new(
        Some("shop@example.com".parse().unwrap()),
        vec!["c@example.com".parse().unwrap()],
    )
    .unwrap()
}

const MESSAGE: &str = "Subject: hi\r\n\r\n.leading dot\r\nmiddle\r\n..two dots\r\n";

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
        // The bytes lettre's DATA writer produces, un-stuffed: the message
        // plus the CRLF before the final dot.
        assert_eq!(t.message.as_deref(), Some(&*format!("{MESSAGE}\r\n")));
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
    let off = ConnectionPool::from_url(&offered.url, Duration::from_secs(5), 4, false).unwrap();
    off.send(&envelope(), MESSAGE.as_bytes()).await.unwrap();
    for seen in [server.transactions(), offered.transactions()] {
        assert_eq!(seen.len(), 1);
        assert!(!seen[0].sent_ahead, "RCPT waited for MAIL's reply");
        assert_eq!(seen[0].message.as_deref(), Some(&*format!("{MESSAGE}\r\n")));
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
fn smtp_urls_go_through_the_pool_and_smtps_through_lettre() {
    let t = Duration::from_secs(1);
    let p = ConnectionPool::from_url("smtp://127.0.0.1:2525", t, 4, true).expect("smtp");
    assert_eq!(
        (p.host.as_str(), p.port, p.starttls),
        ("127.0.0.1", 2525, None)
    );
    assert!(p.credentials.is_none());
    let p = ConnectionPool::from_url("smtp://u%40x:p%3Aw@mail.example?tls=required", t, 4, true)
        .expect("smtp");
    assert_eq!(
        (p.host.as_str(), p.port, p.starttls),
        ("mail.example", 587, Some(true))
    );
    assert_eq!(
        p.credentials,
        Some(Credentials::new("u@x".to_owned(), "p:w".to_owned()))
    );
    let p = ConnectionPool::from_url("smtp://mail.example?tls=opportunistic", t, 4, true)
        .expect("smtp");
    assert_eq!((p.port, p.starttls), (25, Some(false)));
    assert!(ConnectionPool::from_url("smtps://mail.example", t, 4, true).is_none());
    assert_eq!(percent_decode("a%2Fb%zz%4"), "a/b%zz%4");
}
