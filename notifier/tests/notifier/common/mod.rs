//! Test support: records shaped like the relay's, notifier instances run
//! in-process through `run_with`, and readers for what a user would check —
//! the emails in a Maildir, committed offsets, `/metrics`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use devstack::testing::{kafka_bootstrap, unique_name, wait_for};
use notifier::config::Config;
use notifier::http::Shared;
use outbox_record::event::{Item, OrderPayload};
use outbox_record::{header, Lsn};

/// The shared SMTP sink of the test stack.
pub fn sink_smtp_url() -> String {
    sink_maildir();
    let port = std::env::var("TEST_SMTP_PORT").expect("TEST_SMTP_PORT (source .run/test/env)");
    format!("smtp://127.0.0.1:{port}")
}

/// The shared sink's Maildir. The sink creates `tmp/`, `new/` and `cur/`
/// when it starts; they are made again here should anything have removed
/// them since (a delivery into a missing `tmp/` fails with 451).
pub fn sink_maildir() -> PathBuf {
    let root = PathBuf::from(std::env::var("TEST_SMTP_MAILDIR").expect("TEST_SMTP_MAILDIR"));
    for sub in ["tmp", "new", "cur"] {
        std::fs::create_dir_all(root.join(sub)).expect("creating the sink's Maildir folders");
    }
    root
}

/// Where emails go in a test.
pub enum Dest {
    Smtp(String),
    Dir(PathBuf),
}

/// A notifier configuration for a test: its own database, topic and group,
/// an ephemeral HTTP port and short intervals.
pub fn config(db_url: &str, topic: &str, group: &str, dest: &Dest) -> Config {
    config_on(&kafka_bootstrap(), db_url, topic, group, dest)
}

/// [`config`] against another broker (the mock cluster).
pub fn config_on(bootstrap: &str, db_url: &str, topic: &str, group: &str, dest: &Dest) -> Config {
    let mut args = vec![
        "notifier".to_owned(),
        "--database-url".into(),
        db_url.into(),
        "--kafka-bootstrap-servers".into(),
        bootstrap.into(),
        "--topic".into(),
        topic.into(),
        "--group".into(),
        group.into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--commit-interval".into(),
        "200ms".into(),
        "--initial-backoff".into(),
        "100ms".into(),
        "--max-backoff".into(),
        "1s".into(),
        "--smtp-timeout".into(),
        "5s".into(),
        // Faster group membership changes on the test broker.
        "--kafka-property".into(),
        "session.timeout.ms=6000".into(),
        "--kafka-property".into(),
        "heartbeat.interval.ms=500".into(),
    ];
    match dest {
        Dest::Smtp(url) => args.extend(["--smtp-url".into(), url.clone()]),
        Dest::Dir(dir) => args.extend(["--mail-dir".into(), dir.display().to_string()]),
    }
    Config::try_parse_from(args).expect("test config parses")
}

/// Logs of the notifier under test, with `RUST_LOG=notifier=debug` etc.
pub fn init_tracing() {
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}

/// A notifier running in this process.
pub struct Running {
    pub shared: Arc<Shared>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), notifier::NotifierError>>,
}

impl Running {
    pub fn start(cfg: Config) -> Running {
        init_tracing();
        let shared = Shared::new();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(notifier::run_with(cfg, shutdown.clone(), shared.clone()));
        Running {
            shared,
            shutdown,
            task,
        }
    }

    /// Graceful shutdown: commits offsets, leaves the group.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let result = tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .context("notifier did not stop within 30s")?
            .context("notifier task panicked")?;
        result.map_err(|e| anyhow::anyhow!(notifier::handler::error_chain(&e)))
    }

    /// `/metrics` over HTTP, as Prometheus would scrape it.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let addr = wait_for("http address", Duration::from_secs(10), || async {
            Ok(self.shared.http_addr())
        })
        .await?;
        let body = reqwest::get(format!("http://{addr}/metrics"))
            .await?
            .error_for_status()?
            .text()
            .await?;
        Ok(body)
    }

    /// The value of one sample line of `/metrics` (0 when absent).
    pub async fn metric(&self, sample: &str) -> anyhow::Result<f64> {
        let text = self.metrics().await?;
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0))
    }
}

/// Produces records the way the relay does.
pub struct Relay {
    producer: FutureProducer,
    pub topic: String,
}

impl Relay {
    /// On the test broker, records batched as the relay batches them under
    /// load (up to 1000 per batch), so consumers resume from offsets inside
    /// multi-record batches after rebalances and restarts.
    pub fn new(topic: &str) -> anyhow::Result<Relay> {
        Relay::on(&kafka_bootstrap(), topic, 1000)
    }

    /// Records batched up to `batch` per request.
    pub fn on(bootstrap: &str, topic: &str, batch: usize) -> anyhow::Result<Relay> {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("batch.num.messages", batch.to_string())
            .create()?;
        Ok(Relay {
            producer,
            topic: topic.to_owned(),
        })
    }

    /// One outbox record: key = user id, value = the outbox row with the
    /// payload embedded, headers as the relay writes them.
    pub async fn send_event(
        &self,
        event_id: i64,
        user_id: i64,
        event_type: &str,
        payload: &Value,
    ) -> anyhow::Result<(i32, i64)> {
        let value = json!({
            "id": event_id,
            "aggregate_type": "order",
            "aggregate_id": payload.get("order_id").map(|v| v.to_string()).unwrap_or_default(),
            "user_id": user_id,
            "event_type": event_type,
            "payload": payload,
            "created_at": "2026-01-01T00:00:00.000000Z",
        })
        .to_string();
        // The headers the relay writes, from the contract crate.
        let headers = header::relay_headers(
            Some(event_id.to_string()),
            Some(event_type.to_owned()),
            (Lsn(0x16B_3748), 0),
            750,
            now_rfc3339(),
        );
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        self.send_raw(&user_id.to_string(), value.as_bytes(), &headers)
            .await
    }

    /// Any record; returns its (partition, offset).
    pub async fn send_raw(
        &self,
        key: &str,
        value: &[u8],
        headers: &[(&str, &str)],
    ) -> anyhow::Result<(i32, i64)> {
        let mut hs = OwnedHeaders::new();
        for (k, v) in headers {
            hs = hs.insert(Header {
                key: k,
                value: Some(*v),
            });
        }
        let record = FutureRecord::to(&self.topic)
            .key(key)
            .payload(value)
            .headers(hs);
        let delivery = self
            .producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)
            .context("producing test record")?;
        Ok((delivery.partition, delivery.offset))
    }
}

pub fn now_rfc3339() -> String {
    header::format_commit_ts(chrono::Utc::now())
}

/// A payload as the order-api writes it (the contract's `OrderPayload`).
pub fn order_payload(order_id: i64, email: &str, status: &str) -> Value {
    let item = |sku: &str, quantity, unit_price_cents| Item {
        sku: sku.to_owned(),
        quantity,
        unit_price_cents,
    };
    serde_json::to_value(OrderPayload {
        order_id,
        user_id: 42,
        email: email.to_owned(),
        status: status.to_owned(),
        items: vec![item("A-1", 2, 1999), item("B-7", 1, 500)],
        total_cents: 4498,
        currency: "EUR".into(),
        created_at: "2026-01-01T00:00:00.000000Z".into(),
        updated_at: "2026-01-01T00:00:00.000000Z".into(),
        from: None,
        to: None,
    })
    .expect("payload serialises")
}

pub fn status_payload(order_id: i64, email: &str, from: &str, to: &str) -> Value {
    let mut p = order_payload(order_id, email, to);
    p["from"] = json!(from);
    p["to"] = json!(to);
    p
}

/// A recipient domain unique to one test, so tests sharing the SMTP sink
/// find their own emails.
pub fn unique_domain() -> String {
    format!("{}.test", unique_name("n").replace('_', "-"))
}

/// The headers of one email that tests look at.
#[derive(Clone, Debug)]
pub struct Mail {
    pub file: PathBuf,
    pub to: String,
    pub subject: String,
    pub message_id: String,
    pub event_id: Option<i64>,
    /// The W3C trace the email belongs to.
    pub traceparent: Option<String>,
    pub raw: String,
}

/// Reads emails from a Maildir (`new/`) or a spool directory (`*.eml`),
/// parsing each file once.
pub struct MailReader {
    dirs: Vec<PathBuf>,
    seen: HashMap<PathBuf, Option<Mail>>,
}

impl MailReader {
    pub fn maildir(root: &Path) -> MailReader {
        MailReader {
            dirs: vec![root.join("new"), root.join("cur")],
            seen: HashMap::new(),
        }
    }

    pub fn spool(dir: &Path) -> MailReader {
        MailReader {
            dirs: vec![dir.to_owned()],
            seen: HashMap::new(),
        }
    }

    /// Every email whose To contains `needle`.
    pub fn to(&mut self, needle: &str) -> anyhow::Result<Vec<Mail>> {
        for dir in &self.dirs {
            let entries = match std::fs::read_dir(dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            };
            for entry in entries {
                let path = entry?.path();
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if name.starts_with('.') || self.seen.contains_key(&path) {
                    continue;
                }
                let mail = match std::fs::read_to_string(&path) {
                    Ok(raw) => parse_mail(&path, raw),
                    // Moved from new/ to cur/ meanwhile: seen again there.
                    Err(_) => continue,
                };
                self.seen.insert(path, mail);
            }
        }
        let mut out: Vec<Mail> = self
            .seen
            .values()
            .flatten()
            .filter(|m| m.to.contains(needle))
            .cloned()
            .collect();
        out.sort_by_key(|m| m.event_id);
        Ok(out)
    }
}

fn parse_mail(path: &Path, raw: String) -> Option<Mail> {
    let head = raw.split("\r\n\r\n").next()?.split("\n\n").next()?;
    // Unfold continuation lines.
    let unfolded = head
        .replace("\r\n", "\n")
        .replace("\n ", " ")
        .replace("\n\t", " ");
    let header = |name: &str| {
        unfolded.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    };
    Some(Mail {
        file: path.to_owned(),
        to: header("To")?,
        subject: header("Subject").unwrap_or_default(),
        message_id: header("Message-ID").unwrap_or_default(),
        event_id: header("X-Outbox-Event-Id").and_then(|v| v.parse().ok()),
        traceparent: header("Traceparent"),
        raw,
    })
}

/// Waits until at least `count` emails to `needle` are there.
pub async fn wait_mails(
    reader: &mut MailReader,
    needle: &str,
    count: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<Mail>> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let mails = reader.to(needle)?;
        if mails.len() >= count {
            return Ok(mails);
        }
        if std::time::Instant::now() >= deadline {
            anyhow::bail!(
                "timed out after {timeout:?}: {} of {count} emails to {needle}",
                mails.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The group's committed offset of `topic`/`partition` (None if nothing committed).
pub fn committed_offset(group: &str, topic: &str, partition: i32) -> anyhow::Result<Option<i64>> {
    Ok(committed_offsets(group, topic, partition..partition + 1)?
        .get(&partition)
        .copied())
}

/// The group's committed offsets of `topic`'s `partitions` (those with one).
pub fn committed_offsets(
    group: &str,
    topic: &str,
    partitions: std::ops::Range<i32>,
) -> anyhow::Result<std::collections::BTreeMap<i32, i64>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(tpl, Duration::from_secs(10))?;
    Ok(committed
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect())
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// An SMTP sink this test owns (to stop and restart it): the stack's
/// (`scripts/lib/smtp-sink.py`, aiosmtpd delivering into a Maildir), one
/// process.
pub struct OwnSmtp {
    pub port: u16,
    pub maildir: PathBuf,
    child: Option<std::process::Child>,
}

impl OwnSmtp {
    pub async fn start() -> anyhow::Result<OwnSmtp> {
        let maildir = std::env::temp_dir().join(unique_name("notifier_smtp"));
        let mut s = OwnSmtp {
            port: free_port()?,
            maildir,
            child: None,
        };
        s.restart().await?;
        Ok(s)
    }

    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on the same port and waits until it accepts.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        let sink = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/lib/smtp-sink.py");
        let child = std::process::Command::new("/usr/bin/python3")
            .arg(sink)
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg(&self.maildir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting the SMTP sink (scripts/lib/smtp-sink.py)")?;
        self.child = Some(child);
        let port = self.port;
        wait_for(
            "the SMTP sink to accept",
            Duration::from_secs(20),
            || async move {
                Ok(tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .ok()
                    .map(|_| ()))
            },
        )
        .await
    }

    /// Kills the server (SIGKILL) and waits until the port refuses.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }
}

impl Drop for OwnSmtp {
    fn drop(&mut self) {
        let _ = self.kill();
        let _ = std::fs::remove_dir_all(&self.maildir);
    }
}

/// A minimal SMTP server for failure cases, offering PIPELINING: answers
/// the first `failing_rcpts` RCPT TO commands (of recipients containing
/// `failing_to`, or all) with `failure` (e.g. `451 ...` or `550 ...`), the
/// later ones with 250; takes `delay` to answer each message (a slow
/// server); counts the messages it accepted and how many were in progress
/// at once.
pub struct FakeSmtp {
    pub url: String,
    pub accepted: Arc<std::sync::atomic::AtomicUsize>,
    /// The `X-Outbox-Event-Id` of every accepted email, in arrival order.
    pub event_ids: Arc<std::sync::Mutex<Vec<i64>>>,
    /// Every accepted email: its event id, when its DATA command came and
    /// when the server accepted it.
    pub spans: Arc<std::sync::Mutex<Vec<Span>>>,
    /// The most messages in progress (DATA sent, not yet answered) at once.
    pub peak: Arc<std::sync::atomic::AtomicUsize>,
}

/// An accepted email at a [`FakeSmtp`]: its event id, when its DATA
/// command came, when the server accepted it.
pub type Span = (i64, std::time::Instant, std::time::Instant);

/// How a [`FakeSmtp`] misbehaves.
pub struct FakeBehaviour {
    pub failure: &'static str,
    pub failing_rcpts: usize,
    pub failing_to: Option<&'static str>,
    pub delay: Duration,
}

impl FakeSmtp {
    pub async fn start(failure: &'static str, failing_rcpts: usize) -> anyhow::Result<FakeSmtp> {
        FakeSmtp::with(FakeBehaviour {
            failure,
            failing_rcpts,
            failing_to: None,
            delay: Duration::ZERO,
        })
        .await
    }

    /// Accepts every message, each after `delay`.
    pub async fn slow(delay: Duration) -> anyhow::Result<FakeSmtp> {
        FakeSmtp::with(FakeBehaviour {
            failure: "250 ok",
            failing_rcpts: 0,
            failing_to: None,
            delay,
        })
        .await
    }

    pub async fn with(behaviour: FakeBehaviour) -> anyhow::Result<FakeSmtp> {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let FakeBehaviour {
            failure,
            failing_rcpts,
            failing_to,
            delay,
        } = behaviour;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("smtp://{}", listener.local_addr()?);
        let accepted = Arc::new(AtomicUsize::new(0));
        let event_ids = Arc::new(std::sync::Mutex::new(Vec::new()));
        let spans = Arc::new(std::sync::Mutex::new(Vec::new()));
        let peak = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let rcpts = Arc::new(AtomicUsize::new(0));
        let (counter, ids, all_spans, max) = (
            accepted.clone(),
            event_ids.clone(),
            spans.clone(),
            peak.clone(),
        );
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (accepted, rcpts, ids) = (counter.clone(), rcpts.clone(), ids.clone());
                let (spans, peak, open) = (all_spans.clone(), max.clone(), open.clone());
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut lines = BufReader::new(read).lines();
                    let _ = write.write_all(b"220 fake test server\r\n").await;
                    let mut in_data = false;
                    let mut event_id = None;
                    let mut data_began = std::time::Instant::now();
                    while let Ok(Some(line)) = lines.next_line().await {
                        let answer = if in_data {
                            if line != "." {
                                if let Some(v) = line.strip_prefix("X-Outbox-Event-Id:") {
                                    event_id = v.trim().parse::<i64>().ok();
                                }
                                continue;
                            }
                            in_data = false;
                            tokio::time::sleep(delay).await;
                            accepted.fetch_add(1, Ordering::SeqCst);
                            if let Some(id) = event_id.take() {
                                ids.lock().unwrap().push(id);
                                spans.lock().unwrap().push((
                                    id,
                                    data_began,
                                    std::time::Instant::now(),
                                ));
                            }
                            open.fetch_sub(1, Ordering::SeqCst);
                            "250 queued".to_owned()
                        } else {
                            match line.get(..4).unwrap_or("").to_ascii_uppercase().as_str() {
                                // Offers PIPELINING, as real servers do: the
                                // notifier's MAIL, RCPT and DATA come at once
                                // and are answered in order.
                                "EHLO" => "250-fake test server\r\n250 PIPELINING".to_owned(),
                                "HELO" => "250 fake test server".to_owned(),
                                "RCPT"
                                    if failing_to.is_none_or(|to| line.contains(to))
                                        && rcpts.fetch_add(1, Ordering::SeqCst) < failing_rcpts =>
                                {
                                    failure.to_owned()
                                }
                                "DATA" => {
                                    in_data = true;
                                    data_began = std::time::Instant::now();
                                    let now = open.fetch_add(1, Ordering::SeqCst) + 1;
                                    peak.fetch_max(now, Ordering::SeqCst);
                                    "354 go ahead".to_owned()
                                }
                                "QUIT" => {
                                    let _ = write.write_all(b"221 bye\r\n").await;
                                    break;
                                }
                                _ => "250 ok".to_owned(),
                            }
                        };
                        if write
                            .write_all(format!("{answer}\r\n").as_bytes())
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                });
            }
        });
        Ok(FakeSmtp {
            url,
            accepted,
            event_ids,
            spans,
            peak,
        })
    }

    /// The most messages the server had in progress at once.
    pub fn peak(&self) -> usize {
        self.peak.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The event ids of the accepted emails, in arrival order.
    pub fn arrivals(&self) -> Vec<i64> {
        self.event_ids.lock().unwrap().clone()
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// How many emails were accepted for each event id.
    pub fn emails_per_event(&self) -> HashMap<i64, usize> {
        let mut per = HashMap::new();
        for id in self.event_ids.lock().unwrap().iter() {
            *per.entry(*id).or_insert(0) += 1;
        }
        per
    }
}
