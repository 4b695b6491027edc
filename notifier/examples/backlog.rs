//! Benchmark: how fast the release notifier works off a backlog of relay
//! records, by SMTP against the stack's sink (beside plain SMTP clients
//! sending as many emails to the same sink in the same run: the ratio says
//! what share of the sink's ceiling the notifier reaches) and into a spool
//! directory.
//!
//! ```text
//!   N OrderCreated records (key = user id, 997 users; headers and value as the relay writes them)
//!        └──▶ fresh topic <OUTBOX_TOPIC>.bench-notifier-<stamp> (partitions as the stack's topic)
//!
//!   smtp:          notifier --smtp-url SINK  (fresh group, scratch database) ──▶ aiosmtpd sink
//!   plain-nodelay: C tasks, one SMTP connection each (TCP_NODELAY, pipelined) ──▶ aiosmtpd sink
//!   plain-lettre:  C tasks sharing lettre's AsyncSmtpTransport, pool of C     ──▶ aiosmtpd sink
//!   spool:         notifier --mail-dir TMP  (fresh group, scratch database)   ──▶ .eml files
//!
//!   notifier runs: process start → notifier_emails_sent_total = N (/metrics, polled every 50 ms);
//!   then notifier_inbox must hold exactly events 1..=N, and the spool exactly N .eml files
//! ```
//!
//! C is the notifier's `--smtp-connections` default (32): the most emails
//! it has at the server at once and the SMTP connections it keeps (its
//! handlers, four per connection, wait for the inbox meanwhile). The plain
//! clients send C at a time, never more: lettre's pool opens a new
//! connection whenever none is idle, so one task per email would open
//! thousands of connections to the sink. Both plain
//! clients compose each email with the notifier's own `Composer` (about
//! 1.5 KB, printed), so only Kafka, the inbox and the notifier's pipeline
//! set the notifier apart. `plain-lettre` is lettre's pooled transport as
//! is: it sends a NOOP before reusing a connection, and without
//! `TCP_NODELAY` each email's final `.` line waits for a delayed ACK (why
//! the notifier's mailer opens its own sockets, `notifier/src/mailer.rs`),
//! so it is slower; `plain-nodelay` sends the way the notifier's mailer
//! does (`TCP_NODELAY`, and pipelined where the sink offers PIPELINING, as
//! the stack's does), with an SMTP client of its own. The ratio is against
//! the faster of the two.
//!
//! The notifier runs as it is configured by default (only the database,
//! broker, topic, group, destination and listen address are given; the
//! `NOTIFIER_*`, `SMTP_URL` and `MAIL_DIR` variables are removed from its
//! environment), on the broker's plaintext listener (`KAFKA_BOOTSTRAP_SERVERS`
//! of `.run/env`, not the services' SASL_SSL one), logging at `warn`. Its
//! CPU time and peak RSS come from `/proc`; the plain clients' CPU is this
//! process's. With `--sink-pid` (scripts/bench passes the sink's processes)
//! the sink's CPU time per run shows when the sink, Python processes on
//! these 2 cores, is the bound. With `SMTP_MAILDIR` set, the run's emails in the sink's
//! Maildir are counted per run (each at its own recipient domain) and
//! deleted afterwards (`--keep-emails` keeps them).
//!
//! Each notifier run's scratch database is dropped after it; the topic
//! stays. The program exits non-zero when the inbox or the spool does not
//! hold every event exactly once; the goals (notifier / plain ≥ 0.8, spool
//! ≥ 5,000 emails/s) are printed, not asserted.
//!
//! ```text
//! scripts/bench notifier                 # on the scripts/up stack, after a release build
//! # by hand: source .run/env; cargo build --release -p notifier --bin notifier --examples
//! SMTP_URL=$SMTP_URL SMTP_MAILDIR=$SMTP_MAILDIR DATABASE_URL=$DATABASE_URL \
//!   KAFKA_BOOTSTRAP_SERVERS=$KAFKA_BOOTSTRAP_SERVERS OUTBOX_TOPIC=$OUTBOX_TOPIC \
//!   target/release/examples/backlog --events 20000 --json bench-results/notifier.json
//! ```

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context};
use clap::{CommandFactory, Parser};
use devstack::bench::{
    cpu_seconds, http_get, metric_value, peak_rss_kib, relay_like_producer_config, ScratchDb,
    StackArgs,
};
use devstack::testing::{connect, unique_name};
use lettre::transport::smtp::{AsyncSmtpTransport, PoolConfig};
use lettre::{AsyncTransport, Message, Tokio1Executor};
use notifier::email::Composer;
use notifier::event::Decoded;
use outbox_record::event::{Item, OrderPayload, ORDER_AGGREGATE, ORDER_CREATED};
use outbox_record::header::{self, format_commit_ts};
use outbox_record::trace::TraceParent;
use outbox_record::Lsn;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Distinct customers (record keys) in the backlog: a prime, so the keys
/// spread over any partition count.
const USERS: i64 = 997;
/// The first customer's user id.
const FIRST_USER: i64 = 100_001;
/// Commit LSN and xid of the first event's (one-row) transaction.
const FIRST_LSN: u64 = 0x1_0000_0000;
const FIRST_XID: u32 = 1_000;
/// The goals: notifier by SMTP / the best plain client, and
/// the spool's emails per second.
const GOAL_SMTP_RATIO: f64 = 0.8;
const GOAL_SPOOL_RATE: f64 = 5_000.0;
/// How often the notifier's /metrics is read.
const POLL: Duration = Duration::from_millis(50);
/// The runs.
const SMTP_RUN: &str = "notifier smtp";
const NODELAY_RUN: &str = "plain-nodelay";
const LETTRE_RUN: &str = "plain-lettre";
const SPOOL_RUN: &str = "notifier spool";

#[derive(Parser, Debug)]
#[command(about = "notifier emails/s on a backlog: SMTP vs plain SMTP clients, and the spool")]
struct Args {
    #[command(flatten)]
    stack: StackArgs,
    /// The stack's outbox topic: the benchmark topic is named after it and
    /// gets its partition count.
    #[arg(long, env = "OUTBOX_TOPIC", default_value = "microshop.order-outbox")]
    outbox_topic: String,
    /// Events in the backlog (one email each).
    #[arg(long, default_value_t = 20_000)]
    events: usize,
    /// The SMTP sink (the stack's aiosmtpd).
    #[arg(long, env = "SMTP_URL", default_value = "smtp://127.0.0.1:2525")]
    smtp_url: String,
    /// The sink's Maildir: this run's emails there are counted per run and
    /// then deleted.
    #[arg(long, env = "SMTP_MAILDIR")]
    sink_maildir: Option<PathBuf>,
    /// Leave this run's emails in the sink's Maildir.
    #[arg(long)]
    keep_emails: bool,
    /// Process ids of the SMTP sink (repeat for each of its processes), for
    /// its CPU time per run.
    #[arg(long)]
    sink_pid: Vec<u32>,
    /// The release notifier binary [default: `notifier` beside this
    /// program's directory, i.e. target/release/notifier].
    #[arg(long, env = "NOTIFIER_BIN")]
    notifier_bin: Option<PathBuf>,
    /// Where the spool run's directory is made [default: the system's
    /// temporary directory]; the notifier fsyncs every file, so the disk
    /// under it is part of the figure.
    #[arg(long)]
    spool_parent: Option<PathBuf>,
    /// Give up on a run after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// Write the figures to this JSON file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The runs to do, of `smtp` (the notifier and the plain clients by
    /// SMTP) and `spool`.
    #[arg(long, value_delimiter = ',', default_value = "smtp,spool")]
    runs: Vec<String>,
}

impl Args {
    fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }

    /// `--notifier-bin`, or `../notifier` from this program's directory
    /// (`target/release/examples/backlog` → `target/release/notifier`).
    fn notifier_bin(&self) -> anyhow::Result<PathBuf> {
        let bin = match &self.notifier_bin {
            Some(b) => b.clone(),
            None => {
                let exe = std::env::current_exe().context("locating this program")?;
                exe.parent()
                    .and_then(Path::parent)
                    .context("this program is not under target/<profile>/examples")?
                    .join("notifier")
            }
        };
        ensure!(
            bin.is_file(),
            "{} is not built: cargo build --release -p notifier --bin notifier (or --notifier-bin)",
            bin.display()
        );
        Ok(bin)
    }
}

/// The notifier options this benchmark leaves at their defaults, read
/// from its clap definition (not from the environment).
struct NotifierDefaults {
    max_in_flight_per_partition: String,
    smtp_connections: usize,
    mail_from: String,
}

impl NotifierDefaults {
    fn read() -> anyhow::Result<NotifierDefaults> {
        let cmd = notifier::config::Config::command();
        let default = |id: &str| -> anyhow::Result<String> {
            let arg = cmd
                .get_arguments()
                .find(|a| a.get_id().as_str() == id)
                .with_context(|| format!("the notifier has no option {id}"))?;
            let value = arg
                .get_default_values()
                .first()
                .with_context(|| format!("the notifier's {id} has no default"))?;
            Ok(value.to_string_lossy().into_owned())
        };
        Ok(NotifierDefaults {
            max_in_flight_per_partition: default("max_in_flight_per_partition")?,
            smtp_connections: default("smtp_connections")?
                .parse()
                .context("--smtp-connections default")?,
            mail_from: default("mail_from")?,
        })
    }
}

/// What the runs share.
struct Bench {
    args: Args,
    notifier_bin: PathBuf,
    topic: String,
    stamp: u64,
    defaults: NotifierDefaults,
    composer: Composer,
    /// `/proc/loadavg`'s three load averages at the start.
    load_average: String,
    /// Checks that failed (the program exits non-zero after the report).
    failures: Vec<String>,
}

impl Bench {
    /// Recipient domain of the backlog's events (both notifier runs), or
    /// of a plain client's emails.
    fn domain(&self, run: Option<&str>) -> String {
        match run {
            Some(r) => format!("{r}.{}.notifier-bench.example", self.stamp),
            None => format!("{}.notifier-bench.example", self.stamp),
        }
    }

    /// The runs that send to the SMTP sink, with their recipient domains.
    fn sink_domains(&self) -> [(&'static str, String); 3] {
        [
            (SMTP_RUN, self.domain(None)),
            (NODELAY_RUN, self.domain(Some(NODELAY_RUN))),
            (LETTRE_RUN, self.domain(Some(LETTRE_RUN))),
        ]
    }
}

/// One measured run.
struct Run {
    name: &'static str,
    emails: u64,
    seconds: f64,
    /// Notifier runs: process start to the first email sent.
    first_email_s: Option<f64>,
    /// The notifier process's CPU time, or this process's for the plain clients.
    cpu_seconds: f64,
    /// The notifier's VmHWM (none for the in-process plain clients).
    peak_rss_kib: Option<u64>,
    /// CPU time the SMTP sink used during the run (with `--sink-pid`).
    sink_cpu_seconds: Option<f64>,
}

impl Run {
    fn rate(&self) -> f64 {
        self.emails as f64 / self.seconds
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load_average = load
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    println!(
        "machine: {} cores, load average {load_average}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    ensure!(args.events > 0, "--events must be at least 1");
    let notifier_bin = args.notifier_bin()?;
    let defaults = NotifierDefaults::read()?;
    let composer = Composer::new(&defaults.mail_from).context("the notifier's default sender")?;
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut bench = Bench {
        topic: format!("{}.bench-notifier-{stamp}", args.outbox_topic),
        args,
        notifier_bin,
        stamp,
        defaults,
        composer,
        load_average,
        failures: Vec::new(),
    };
    let started_at = SystemTime::now();
    let runs = bench_runs(&mut bench).await;
    // The sink's copies go (or are counted) whether or not every run finished.
    let swept = sweep_sink_maildir(&bench, started_at);
    let runs = runs?;
    report(&bench, &runs, swept?.as_deref())?;
    if !bench.failures.is_empty() {
        for f in &bench.failures {
            eprintln!("FAILED: {f}");
        }
        bail!("{} check(s) failed", bench.failures.len());
    }
    Ok(())
}

async fn bench_runs(bench: &mut Bench) -> anyhow::Result<Vec<Run>> {
    let args = &bench.args;
    let bootstrap = args.stack.kafka_bootstrap_servers.clone();
    let n = args.events;
    let partitions = devstack::kafka::partition_count(&bootstrap, &args.outbox_topic).await?;
    devstack::kafka::create_topic(&bootstrap, &bench.topic, partitions).await?;
    let t = Instant::now();
    let domain = bench.domain(None);
    tokio::time::timeout(
        args.timeout(),
        produce_backlog(&bootstrap, &bench.topic, n, &domain),
    )
    .await
    .context("producing the backlog timed out")??;
    let sample = record_value(0, &domain, &format_commit_ts(chrono::Utc::now()));
    println!(
        "backlog: {n} OrderCreated records in {:.1}s into {} ({partitions} partitions, as {}), \
         keys: {} users, value {} bytes",
        t.elapsed().as_secs_f64(),
        bench.topic,
        args.outbox_topic,
        USERS.min(n as i64),
        sample.len()
    );
    let email = plain_email(&bench.composer, 0, &domain)?;
    println!(
        "notifier: {} (defaults: --max-in-flight-per-partition {}, --smtp-connections {}); \
         email {} bytes; plain clients: {} connections",
        bench.notifier_bin.display(),
        bench.defaults.max_in_flight_per_partition,
        bench.defaults.smtp_connections,
        email.formatted().len(),
        bench.defaults.smtp_connections
    );

    let mut runs = Vec::new();
    if bench.args.runs.iter().any(|r| r == "smtp") {
        let smtp = Dest::Smtp(bench.args.smtp_url.clone());
        runs.push(notifier_run(bench, SMTP_RUN, "smtp", &smtp).await?);
        if let Some(run) = plain_nodelay(bench).await? {
            runs.push(run);
        }
        runs.push(plain_lettre_pool(bench).await?);
    }
    if !bench.args.runs.iter().any(|r| r == "spool") {
        return Ok(runs);
    }

    let parent = bench
        .args
        .spool_parent
        .clone()
        .unwrap_or_else(std::env::temp_dir);
    let dir = parent.join(unique_name("notifier_bench_spool"));
    let spool = notifier_run(bench, SPOOL_RUN, "spool", &Dest::Dir(dir.clone())).await;
    let files = count_eml(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    runs.push(spool?);
    match files {
        Ok(f) if f == n => {}
        Ok(f) => bench.failures.push(format!(
            "{SPOOL_RUN}: {f} .eml files in {}, expected {n}",
            dir.display()
        )),
        Err(e) => bench
            .failures
            .push(format!("{SPOOL_RUN}: counting {}: {e:#}", dir.display())),
    }
    Ok(runs)
}

/// Event `i` (0-based) of the backlog: its outbox id and customer.
fn event_id(i: usize) -> i64 {
    i as i64 + 1
}

fn user_id(i: usize) -> i64 {
    FIRST_USER + (i as i64 % USERS)
}

/// The record value the relay writes for event `i`: its outbox row as
/// JSON, the order-api's `OrderCreated` payload embedded.
fn record_value(i: usize, domain: &str, created_at: &str) -> String {
    let id = event_id(i);
    let user = user_id(i);
    let item = |sku: &str, quantity, unit_price_cents| Item {
        sku: sku.to_owned(),
        quantity,
        unit_price_cents,
    };
    let payload = OrderPayload {
        order_id: id,
        user_id: user,
        email: format!("customer-{user}@{domain}"),
        status: "CREATED".to_owned(),
        items: vec![item("A-1", 2, 1999), item("B-7", 1, 500)],
        total_cents: 4498,
        currency: "EUR".to_owned(),
        created_at: created_at.to_owned(),
        updated_at: created_at.to_owned(),
        from: None,
        to: None,
    };
    json!({
        "id": id,
        "aggregate_type": ORDER_AGGREGATE,
        "aggregate_id": id.to_string(),
        "user_id": user,
        "event_type": ORDER_CREATED,
        "payload": payload,
        "created_at": created_at,
        "traceparent": null,
        "tracestate": null,
    })
    .to_string()
}

/// Produces the backlog as the relay would: key = user id, partition =
/// murmur2 of the key (the relay's choice, Kafka's Java clients' hash:
/// librdkafka's `murmur2_random` for a non-null key), one transaction per
/// event, the relay's producer settings; returns once all are acknowledged.
async fn produce_backlog(
    bootstrap: &str,
    topic: &str,
    n: usize,
    domain: &str,
) -> anyhow::Result<()> {
    let mut cfg = relay_like_producer_config(bootstrap);
    cfg.set("partitioner", "murmur2_random");
    let producer: FutureProducer = cfg.create().context("creating the backlog producer")?;
    let created_at = format_commit_ts(chrono::Utc::now());
    let mut pending = VecDeque::new();
    for i in 0..n {
        let key = user_id(i).to_string();
        let value = record_value(i, domain, &created_at);
        let seq = 0;
        let headers = header::relay_headers(
            Some(event_id(i).to_string()),
            Some(ORDER_CREATED.to_owned()),
            (Lsn(FIRST_LSN + i as u64 * 0x100), seq),
            FIRST_XID.wrapping_add(i as u32),
            format_commit_ts(chrono::Utc::now()),
        );
        let mut owned = OwnedHeaders::new_with_capacity(headers.len());
        for (k, v) in &headers {
            owned = owned.insert(Header {
                key: k,
                value: Some(v.as_str()),
            });
        }
        let mut record = FutureRecord::to(topic)
            .key(&key)
            .payload(&value)
            .headers(owned);
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    pending.push_back(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // Backpressure: wait for the oldest acknowledgement.
                    record = back;
                    match pending.pop_front() {
                        Some(d) => acknowledged(d.await)?,
                        None => tokio::time::sleep(Duration::from_millis(1)).await,
                    }
                }
                Err((e, _)) => bail!("producing the backlog: {e}"),
            }
        }
    }
    for d in pending {
        acknowledged(d.await)?;
    }
    Ok(())
}

fn acknowledged<E>(
    delivery: Result<rdkafka::producer::future_producer::OwnedDeliveryResult, E>,
) -> anyhow::Result<()> {
    match delivery {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => bail!("a backlog record failed: {e}"),
        Err(_) => bail!("a backlog record's delivery report was lost"),
    }
}

/// Where a notifier run sends its emails.
enum Dest {
    Smtp(String),
    Dir(PathBuf),
}

/// One notifier run on a fresh group and a fresh scratch database (dropped
/// afterwards), then the inbox check.
async fn notifier_run(
    bench: &mut Bench,
    name: &'static str,
    group_suffix: &str,
    dest: &Dest,
) -> anyhow::Result<Run> {
    let db = ScratchDb::create(&bench.args.stack.database_url, "bench_notifier").await?;
    let result = async {
        devstack::migrations::apply(&db.url)
            .await
            .context("migrating the scratch database")?;
        let group = format!("notifier-bench-{}-{group_suffix}", bench.stamp);
        println!("{name}: group {group}, database {}", db.name);
        let run = drive_notifier(bench, name, &db.url, &group, dest).await?;
        if let Some(problem) = inbox_problem(&db.url, bench.args.events).await? {
            bench.failures.push(format!("{name}: {problem}"));
        }
        anyhow::Ok(run)
    }
    .await;
    db.drop_with_slots(&[]).await;
    result
}

/// Starts the notifier, waits until it sent N emails, kills it.
async fn drive_notifier(
    bench: &Bench,
    name: &'static str,
    db_url: &str,
    group: &str,
    dest: &Dest,
) -> anyhow::Result<Run> {
    let args = &bench.args;
    let n = args.events as u64;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut cmd = tokio::process::Command::new(&bench.notifier_bin);
    cmd.args(["--database-url", db_url])
        .args([
            "--kafka-bootstrap-servers",
            args.stack.kafka_bootstrap_servers.as_str(),
        ])
        .args(["--topic", bench.topic.as_str(), "--group", group])
        .args(["--listen", addr.to_string().as_str()]);
    match dest {
        Dest::Smtp(url) => cmd.args(["--smtp-url", url.as_str()]),
        Dest::Dir(dir) => cmd.arg("--mail-dir").arg(dir),
    };
    // Defaults for everything else, whatever this shell exports.
    for (key, _) in std::env::vars_os() {
        if let Some(k) = key.to_str() {
            if k.starts_with("NOTIFIER_") || k == "SMTP_URL" || k == "MAIL_DIR" {
                cmd.env_remove(k);
            }
        }
    }
    cmd.env("RUST_LOG", "warn").kill_on_drop(true);
    let sink_before = sink_cpu_total(bench);
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", bench.notifier_bin.display()))?;
    let pid = child.id().context("notifier pid")?;
    let sent_metric = format!("{}_total", notifier::metrics::EMAILS_SENT);
    let dlq_metric = format!("{}_total", notifier::metrics::DLQ);
    let mut sent = 0u64;
    let mut first_email_s = None;
    let seconds = loop {
        if let Some(status) = child.try_wait()? {
            bail!("{name}: the notifier exited after {sent} of {n} emails: {status}");
        }
        let body = tokio::time::timeout(Duration::from_secs(2), http_get(addr, "/metrics")).await;
        if let Ok(Ok(body)) = body {
            sent = metric_value(&body, &sent_metric).map_or(sent, |v| v as u64);
            if first_email_s.is_none() && sent > 0 {
                first_email_s = Some(started.elapsed().as_secs_f64());
            }
            if sent >= n {
                break started.elapsed().as_secs_f64();
            }
            let dlq = metric_value(&body, &dlq_metric).unwrap_or(0.0);
            if dlq > 0.0 {
                bail!("{name}: the notifier dead-lettered {dlq} records (see its log above)");
            }
        }
        if started.elapsed() > args.timeout() {
            bail!("{name}: {sent} of {n} emails after {:?}", args.timeout());
        }
        tokio::time::sleep(POLL).await;
    };
    let cpu = cpu_seconds(pid).unwrap_or(0.0);
    let peak = peak_rss_kib(pid);
    let sink_cpu = sink_cpu(bench, sink_before);
    child.start_kill()?;
    child.wait().await?;
    println!("{name}: {sent} emails in {seconds:.2}s");
    Ok(Run {
        name,
        emails: n,
        seconds,
        first_email_s,
        cpu_seconds: cpu,
        peak_rss_kib: peak,
        sink_cpu_seconds: sink_cpu,
    })
}

/// The CPU seconds the sink's processes used so far (`None` without
/// `--sink-pid`, or when one of them is gone).
fn sink_cpu_total(bench: &Bench) -> Option<f64> {
    if bench.args.sink_pid.is_empty() {
        return None;
    }
    bench.args.sink_pid.iter().map(|&p| cpu_seconds(p)).sum()
}

/// The sink's CPU seconds since `before`.
fn sink_cpu(bench: &Bench, before: Option<f64>) -> Option<f64> {
    Some(sink_cpu_total(bench)? - before?)
}

/// `None` when `notifier_inbox` holds exactly events 1..=N, each once;
/// otherwise what is wrong.
async fn inbox_problem(url: &str, n: usize) -> anyhow::Result<Option<String>> {
    let db = connect(url).await?;
    let row = db
        .query_one(
            "SELECT count(*), count(DISTINCT event_id), min(event_id), max(event_id) FROM notifier_inbox",
            &[],
        )
        .await
        .context("counting notifier_inbox")?;
    let (rows, distinct): (i64, i64) = (row.get(0), row.get(1));
    let (min, max): (Option<i64>, Option<i64>) = (row.get(2), row.get(3));
    let n = n as i64;
    if rows == n && distinct == n && min == Some(1) && max == Some(n) {
        return Ok(None);
    }
    Ok(Some(format!(
        "notifier_inbox holds {rows} rows ({distinct} distinct event ids, {min:?}..={max:?}), expected events 1..={n} once each"
    )))
}

/// `.eml` files in a spool directory (not the `.…tmp` files being written).
fn count_eml(dir: &Path) -> anyhow::Result<usize> {
    let mut n = 0;
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if !name.starts_with('.') && name.ends_with(".eml") {
            n += 1;
        }
    }
    Ok(n)
}

/// The email the notifier composes for event `i`, to `domain`: decoded
/// from the record value by the notifier's own decoder.
fn plain_email(composer: &Composer, i: usize, domain: &str) -> anyhow::Result<Message> {
    let value = record_value(i, domain, "2026-01-01T00:00:00.000000Z");
    match notifier::event::decode(Some(value.as_bytes()), |_| None)? {
        Decoded::Notify(event) => Ok(composer.compose(&event, Some(&TraceParent::root()))?),
        other => bail!("event {i} is no email: {other:?}"),
    }
}

/// Baseline: C tasks, each on its own SMTP connection with `TCP_NODELAY`,
/// pipelined where the sink offers it, as the notifier's mailer sends (an
/// SMTP client of its own, [`RawSmtp`], not the notifier's). Plain
/// `smtp://` URLs without login only.
async fn plain_nodelay(bench: &Bench) -> anyhow::Result<Option<Run>> {
    let name = NODELAY_RUN;
    let url = url::Url::parse(&bench.args.smtp_url).context("--smtp-url")?;
    if url.scheme() != "smtp" || url.query().is_some() || !url.username().is_empty() {
        println!("{name}: skipped (only for plain smtp:// URLs without TLS or login)");
        return Ok(None);
    }
    let host = url.host_str().context("--smtp-url has no host")?.to_owned();
    let port = url.port().unwrap_or(25);
    let n = bench.args.events;
    let domain = bench.domain(Some(name));
    let next = Arc::new(AtomicUsize::new(0));
    let sink_before = sink_cpu_total(bench);
    let cpu_before = cpu_seconds(std::process::id()).unwrap_or(0.0);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..bench.defaults.smtp_connections {
        let (host, domain, next) = (host.clone(), domain.clone(), next.clone());
        let composer = bench.composer.clone();
        tasks.spawn(async move {
            let mut conn = RawSmtp::connect(&host, port).await?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let email = plain_email(&composer, i, &domain)?;
                conn.send(email.envelope(), &email.formatted())
                    .await
                    .with_context(|| format!("{name}: email {i}"))?;
            }
            conn.quit().await
        });
    }
    join_all(&mut tasks, bench.args.timeout(), name).await?;
    let seconds = started.elapsed().as_secs_f64();
    println!("{name}: {n} emails in {seconds:.2}s");
    Ok(Some(Run {
        name,
        emails: n as u64,
        seconds,
        first_email_s: None,
        cpu_seconds: cpu_seconds(std::process::id()).unwrap_or(0.0) - cpu_before,
        peak_rss_kib: None,
        sink_cpu_seconds: sink_cpu(bench, sink_before),
    }))
}

/// The plain SMTP client of `plain-nodelay`: one connection with
/// `TCP_NODELAY`; each email's MAIL, RCPT and DATA in one write when the
/// server's EHLO offers PIPELINING (else each after the previous reply),
/// then the dot-stuffed message and its final `.` in one write.
struct RawSmtp {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
    pipelining: bool,
}

impl RawSmtp {
    async fn connect(host: &str, port: u16) -> anyhow::Result<RawSmtp> {
        let tcp = tokio::net::TcpStream::connect((host, port)).await?;
        tcp.set_nodelay(true)?;
        let (read, writer) = tcp.into_split();
        let mut conn = RawSmtp {
            reader: BufReader::new(read),
            writer,
            pipelining: false,
        };
        conn.expect(2).await.context("greeting")?;
        conn.writer.write_all(b"EHLO bench\r\n").await?;
        let lines = conn.expect(2).await.context("EHLO")?;
        conn.pipelining = lines
            .iter()
            .skip(1)
            .any(|l| l.eq_ignore_ascii_case("PIPELINING"));
        Ok(conn)
    }

    /// Reads one reply (all its lines); fails unless its code is `class`xx.
    async fn expect(&mut self, class: u8) -> anyhow::Result<Vec<String>> {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            ensure!(
                self.reader.read_line(&mut line).await? > 0,
                "the server closed the connection"
            );
            let line = line.trim_end();
            ensure!(
                line.len() >= 3 && line.as_bytes()[0] == b'0' + class,
                "unexpected reply {line:?}"
            );
            lines.push(line.get(4..).unwrap_or("").to_owned());
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok(lines);
            }
        }
    }

    async fn send(
        &mut self,
        envelope: &lettre::address::Envelope,
        raw: &[u8],
    ) -> anyhow::Result<()> {
        let from = envelope.from().map_or("", AsRef::<str>::as_ref);
        let mut commands = vec![format!("MAIL FROM:<{from}>\r\n")];
        for to in envelope.to() {
            commands.push(format!("RCPT TO:<{}>\r\n", AsRef::<str>::as_ref(to)));
        }
        commands.push("DATA\r\n".to_owned());
        let classes = commands.len();
        if self.pipelining {
            self.writer.write_all(commands.concat().as_bytes()).await?;
            for i in 0..classes {
                self.expect(if i + 1 == classes { 3 } else { 2 }).await?;
            }
        } else {
            for (i, command) in commands.iter().enumerate() {
                self.writer.write_all(command.as_bytes()).await?;
                self.expect(if i + 1 == classes { 3 } else { 2 }).await?;
            }
        }
        let mut data = Vec::with_capacity(raw.len() + 8);
        let mut line_start = true;
        for &b in raw {
            if line_start && b == b'.' {
                data.push(b'.');
            }
            data.push(b);
            line_start = b == b'\n';
        }
        data.extend_from_slice(b"\r\n.\r\n");
        self.writer.write_all(&data).await?;
        self.expect(2).await?;
        Ok(())
    }

    async fn quit(mut self) -> anyhow::Result<()> {
        self.writer.write_all(b"QUIT\r\n").await?;
        self.expect(2).await?;
        Ok(())
    }
}

/// Baseline: lettre's pooled `AsyncSmtpTransport` (pool of C), C tasks.
async fn plain_lettre_pool(bench: &Bench) -> anyhow::Result<Run> {
    let name = LETTRE_RUN;
    let c = bench.defaults.smtp_connections;
    let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(&bench.args.smtp_url)
        .context("--smtp-url")?
        .timeout(Some(Duration::from_secs(10)))
        .pool_config(PoolConfig::new().max_size(u32::try_from(c)?))
        .build();
    let n = bench.args.events;
    let domain = bench.domain(Some(name));
    let next = Arc::new(AtomicUsize::new(0));
    let sink_before = sink_cpu_total(bench);
    let cpu_before = cpu_seconds(std::process::id()).unwrap_or(0.0);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..c {
        let (transport, domain, next) = (transport.clone(), domain.clone(), next.clone());
        let composer = bench.composer.clone();
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return anyhow::Ok(());
                }
                let email = plain_email(&composer, i, &domain)?;
                transport
                    .send(email)
                    .await
                    .with_context(|| format!("{name}: email {i}"))?;
            }
        });
    }
    join_all(&mut tasks, bench.args.timeout(), name).await?;
    let seconds = started.elapsed().as_secs_f64();
    transport.shutdown().await;
    println!("{name}: {n} emails in {seconds:.2}s");
    Ok(Run {
        name,
        emails: n as u64,
        seconds,
        first_email_s: None,
        cpu_seconds: cpu_seconds(std::process::id()).unwrap_or(0.0) - cpu_before,
        peak_rss_kib: None,
        sink_cpu_seconds: sink_cpu(bench, sink_before),
    })
}

async fn join_all(
    tasks: &mut tokio::task::JoinSet<anyhow::Result<()>>,
    timeout: Duration,
    name: &str,
) -> anyhow::Result<()> {
    let all = async {
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(timeout, all)
        .await
        .with_context(|| format!("{name}: not done after {timeout:?}"))?
}

/// The emails of one SMTP run found in the sink's Maildir.
struct SinkCount {
    run: &'static str,
    /// The run's recipient domain.
    domain: String,
    emails: usize,
}

/// Counts the emails of this benchmark's SMTP runs in the sink's Maildir
/// (by recipient domain, among files written since the benchmark started)
/// and deletes them unless `--keep-emails`; `None` without a Maildir.
fn sweep_sink_maildir(bench: &Bench, since: SystemTime) -> anyhow::Result<Option<Vec<SinkCount>>> {
    let Some(root) = &bench.args.sink_maildir else {
        return Ok(None);
    };
    let mut counts: Vec<SinkCount> = bench
        .sink_domains()
        .into_iter()
        .map(|(run, domain)| SinkCount {
            run,
            domain,
            emails: 0,
        })
        .collect();
    let since = since - Duration::from_secs(2);
    for sub in ["new", "cur"] {
        let dir = root.join(sub);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
        };
        for entry in entries {
            let entry = entry?;
            let recent = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t >= since);
            if !recent {
                continue;
            }
            let path = entry.path();
            let Some(domain) = std::fs::read(&path)
                .ok()
                .and_then(|raw| recipient_domain(&raw))
            else {
                continue;
            };
            if let Some(c) = counts.iter_mut().find(|c| c.domain == domain) {
                c.emails += 1;
                if !bench.args.keep_emails {
                    std::fs::remove_file(&path)
                        .with_context(|| format!("deleting {}", path.display()))?;
                }
            }
        }
    }
    Ok(Some(counts))
}

/// The domain of an email's `To:` address (headers only).
fn recipient_domain(raw: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(raw);
    text.lines()
        .take_while(|l| !l.trim().is_empty())
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("to").then(|| value.trim())
        })
        .and_then(|to| to.rsplit_once('@'))
        .map(|(_, d)| d.trim_end_matches('>').trim().to_ascii_lowercase())
}

fn report(bench: &Bench, runs: &[Run], swept: Option<&[SinkCount]>) -> anyhow::Result<()> {
    let plain_best = runs
        .iter()
        .filter(|r| r.name.starts_with("plain"))
        .max_by(|a, b| a.rate().total_cmp(&b.rate()));
    let ratio = |r: &Run| -> Option<f64> {
        match (
            r.name == SMTP_RUN || r.name.starts_with("plain"),
            plain_best,
        ) {
            (true, Some(best)) => Some(r.rate() / best.rate()),
            _ => None,
        }
    };
    let smtp = runs.iter().find(|r| r.name == SMTP_RUN);
    let spool = runs.iter().find(|r| r.name == SPOOL_RUN);
    println!();
    println!(
        "| run ({} events, topic {}) | emails | seconds | emails/s | ratio | CPU s | peak RSS MiB | sink CPU s | first email s |",
        bench.args.events, bench.topic
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let dash = || "—".to_owned();
    for r in runs {
        println!(
            "| {} | {} | {:.2} | {:.0} | {} | {:.2} | {} | {} | {} |",
            r.name,
            r.emails,
            r.seconds,
            r.rate(),
            ratio(r).map_or_else(dash, |x| format!("{x:.2}")),
            r.cpu_seconds,
            r.peak_rss_kib
                .map_or_else(dash, |k| format!("{:.1}", k as f64 / 1024.0)),
            r.sink_cpu_seconds.map_or_else(dash, |c| format!("{c:.2}")),
            r.first_email_s.map_or_else(dash, |s| format!("{s:.2}")),
        );
    }
    println!(
        "(notifier runs: from process start, start-up included, to notifier_emails_sent_total = N; \
         CPU s of the notifier process. plain runs: first connection to the last reply, C = {} \
         connections; CPU s of this process. ratio: emails/s over the fastest plain client's)",
        bench.defaults.smtp_connections
    );
    if let Some(swept) = swept {
        let counts: Vec<String> = swept
            .iter()
            .filter(|c| runs.iter().any(|r| r.name == c.run))
            .map(
                |SinkCount {
                     run,
                     domain,
                     emails,
                 }| {
                    // More than N: the notifier sent some again after a
                    // transient failure (same Message-ID); fewer: lost.
                    let odd = if *emails == bench.args.events {
                        ""
                    } else {
                        " (≠ N!)"
                    };
                    format!("{run} {emails} to @{domain}{odd}")
                },
            )
            .collect();
        println!(
            "sink Maildir, emails of this run: {} ({})",
            counts.join(", "),
            if bench.args.keep_emails {
                "kept"
            } else {
                "deleted"
            }
        );
    }
    println!();
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    let smtp_ratio = smtp.and_then(ratio);
    if let (Some(x), Some(best)) = (smtp_ratio, plain_best) {
        println!(
            "goal: notifier by SMTP / {} ≥ {GOAL_SMTP_RATIO}: {x:.2} ({})",
            best.name,
            met(x >= GOAL_SMTP_RATIO)
        );
    }
    if let Some(s) = spool {
        println!(
            "goal: notifier into the spool ≥ {GOAL_SPOOL_RATE:.0} emails/s: {:.0} ({})",
            s.rate(),
            met(s.rate() >= GOAL_SPOOL_RATE)
        );
    }

    if let Some(path) = &bench.args.json {
        let runs_json: Vec<serde_json::Value> = runs
            .iter()
            .map(|r| {
                json!({
                    "run": r.name,
                    "emails": r.emails,
                    "seconds": r.seconds,
                    "emails_per_s": r.rate(),
                    "ratio": ratio(r),
                    "cpu_seconds": r.cpu_seconds,
                    "peak_rss_mib": r.peak_rss_kib.map(|k| k as f64 / 1024.0),
                    "sink_cpu_seconds": r.sink_cpu_seconds,
                    "first_email_s": r.first_email_s,
                })
            })
            .collect();
        let doc = json!({
            "events": bench.args.events,
            "topic": bench.topic,
            "users": USERS,
            "notifier_defaults": {
                "max_in_flight_per_partition": bench.defaults.max_in_flight_per_partition,
                "smtp_connections": bench.defaults.smtp_connections,
            },
            "load_average_at_start": bench.load_average,
            "runs": runs_json,
            "goals": {
                "smtp_ratio": { "goal": GOAL_SMTP_RATIO, "value": smtp_ratio },
                "spool_emails_per_s": { "goal": GOAL_SPOOL_RATE, "value": spool.map(Run::rate) },
            },
            "failures": bench.failures,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        println!("figures written to {}", path.display());
    }
    Ok(())
}
