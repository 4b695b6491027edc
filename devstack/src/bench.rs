//! What the benchmark programs (`relay/examples/*`, `order-api/examples/*`,
//! `notifier/examples/*`) share: reading a process's memory and CPU from
//! `/proc`, running the release relay as a child process and reading its
//! `/metrics`, a Kafka producer configured like the relay's sink that
//! counts its acknowledgements, a scratch database per run, and a lean
//! keep-alive HTTP client for load ([`RawConn`]).
//!
//! ```text
//!   benchmark ──spawn──▶ relay (release binary) ──/metrics──▶ RelayProcess::events_total
//!       │                   │
//!       └── /proc/PID/{status,stat} every ~100 ms ──▶ RssSeries (VmRSS by acked progress)
//! ```
//!
//! Nothing here asserts anything: the programs print figures and ratios
//! against baselines measured in the same run.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use rdkafka::client::ClientContext;
use rdkafka::producer::{DeliveryResult, ProducerContext};
use rdkafka::ClientConfig;

use crate::testing::{connect, unique_name, url_for_database};

/// A `VmXXX:` line of `/proc/PID/status`, in KiB.
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// `VmRSS` (current resident set) of a running process, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// `VmHWM` (peak resident set) of a running process, in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM:")
}

/// utime + stime from a `/proc/.../stat` line, in clock ticks (1/100 s,
/// Linux's USER_HZ).
fn stat_ticks(stat: &str) -> Option<u64> {
    // Fields after the parenthesised command name (which may hold spaces);
    // utime and stime are the 14th and 15th fields of the whole line.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split(' ').collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// utime + stime of a running process, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_ticks(&stat).map(|t| t as f64 / 100.0)
}

/// CPU ticks of every thread of this process, by thread id.
pub fn own_thread_ticks() -> HashMap<u32, u64> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        if let Some(t) = std::fs::read_to_string(entry.path().join("stat"))
            .ok()
            .as_deref()
            .and_then(stat_ticks)
        {
            out.insert(tid, t);
        }
    }
    out
}

/// The calling thread's id (from the `/proc/thread-self` link).
pub fn current_thread_id() -> Option<u32> {
    let link = std::fs::read_link("/proc/thread-self").ok()?;
    link.file_name()?.to_str()?.parse().ok()
}

/// CPU time of work done on threads of this process: the calling thread
/// plus every thread started after [`ThreadCpu::new`] (a producer's
/// librdkafka threads, say), but not threads that ran before (an
/// in-process mock broker), so the figure is the work's own cost. Read it
/// before those threads exit.
pub struct ThreadCpu {
    /// Threads that existed before the work, other than the caller.
    preexisting: HashSet<u32>,
    /// Ticks at the start of the measured span.
    at_start: HashMap<u32, u64>,
}

impl ThreadCpu {
    /// Call on the thread doing the work, before it starts threads.
    pub fn new() -> ThreadCpu {
        let me = current_thread_id();
        let ticks = own_thread_ticks();
        ThreadCpu {
            preexisting: ticks.keys().copied().filter(|t| Some(*t) != me).collect(),
            at_start: ticks,
        }
    }

    /// Starts the measured span now (after a warm-up, say).
    pub fn restart(&mut self) {
        self.at_start = own_thread_ticks();
    }

    /// CPU seconds of the work's threads since the span started.
    pub fn seconds(&self) -> f64 {
        let ticks: u64 = own_thread_ticks()
            .iter()
            .filter(|(tid, _)| !self.preexisting.contains(tid))
            .map(|(tid, t)| t.saturating_sub(self.at_start.get(tid).copied().unwrap_or(0)))
            .sum();
        ticks as f64 / 100.0
    }
}

impl Default for ThreadCpu {
    fn default() -> Self {
        Self::new()
    }
}

/// One memory sample of a process during a drain.
#[derive(Clone, Copy, Debug)]
pub struct RssSample {
    pub elapsed_s: f64,
    /// Events acknowledged so far (the relay's `relay_events_total`).
    pub progress: u64,
    pub rss_kib: u64,
}

/// VmRSS over time, with the progress at each sample, so "flat" can be
/// read off: RSS at 10 %, 25 %, … of the work, and the spread after warm-up.
#[derive(Clone, Debug, Default)]
pub struct RssSeries {
    pub samples: Vec<RssSample>,
}

impl RssSeries {
    pub fn push(&mut self, elapsed_s: f64, progress: u64, rss_kib: u64) {
        self.samples.push(RssSample {
            elapsed_s,
            progress,
            rss_kib,
        });
    }

    /// RSS of the first sample at or past `fraction` of `total`.
    pub fn at_progress(&self, fraction: f64, total: u64) -> Option<u64> {
        let needed = (fraction * total as f64).ceil() as u64;
        self.samples
            .iter()
            .find(|s| s.progress >= needed.max(1))
            .map(|s| s.rss_kib)
    }

    /// Highest RSS while nothing was acknowledged yet (start-up, and
    /// Postgres decoding a large transaction before sending it).
    pub fn max_before_first_ack(&self) -> Option<u64> {
        self.samples
            .iter()
            .take_while(|s| s.progress == 0)
            .map(|s| s.rss_kib)
            .max()
    }

    /// Lowest and highest RSS from `fraction` of `total` to the end.
    pub fn range_from(&self, fraction: f64, total: u64) -> Option<(u64, u64)> {
        let needed = (fraction * total as f64).ceil() as u64;
        let rss = self
            .samples
            .iter()
            .filter(|s| s.progress >= needed.max(1))
            .map(|s| s.rss_kib);
        let (mut lo, mut hi) = (u64::MAX, 0);
        for r in rss {
            lo = lo.min(r);
            hi = hi.max(r);
        }
        (hi > 0).then_some((lo, hi))
    }

    pub fn max(&self) -> Option<u64> {
        self.samples.iter().map(|s| s.rss_kib).max()
    }

    /// Appends the samples as CSV rows `run,elapsed_s,progress,rss_kib`
    /// (writing the header when the file is new).
    pub fn append_csv(&self, path: &Path, run: &str) -> anyhow::Result<()> {
        use std::io::Write;
        let new = !path.exists();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        if new {
            writeln!(f, "run,elapsed_s,progress,rss_kib")?;
        }
        for s in &self.samples {
            writeln!(f, "{run},{:.3},{},{}", s.elapsed_s, s.progress, s.rss_kib)?;
        }
        Ok(())
    }
}

/// The stack a benchmark program runs against (`scripts/bench` passes the
/// `scripts/up` stack's through the environment).
#[derive(clap::Args, Debug, Clone)]
pub struct StackArgs {
    /// A superuser URL of the stack's Postgres (a database is created in it).
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    #[arg(
        long,
        env = "KAFKA_BOOTSTRAP_SERVERS",
        default_value = "127.0.0.1:9092"
    )]
    pub kafka_bootstrap_servers: String,
}

/// The release relay binary, running as a child process with its HTTP
/// endpoint on a free local port.
pub struct RelayProcess {
    pub child: tokio::process::Child,
    pub pid: u32,
    pub addr: SocketAddr,
    pub started: Instant,
}

impl RelayProcess {
    /// Starts `relay_bin` streaming `slot` to `topic`; `extra` are further
    /// relay options. Logs at warn so the benchmark's output stays readable.
    pub fn spawn(
        relay_bin: &Path,
        database_url: &str,
        slot: &str,
        topic: &str,
        bootstrap: &str,
        extra: &[&str],
    ) -> anyhow::Result<RelayProcess> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let started = Instant::now();
        let child = tokio::process::Command::new(relay_bin)
            .args(["--database-url", database_url, "--slot", slot])
            .args(["--topic", topic, "--kafka-bootstrap-servers", bootstrap])
            .args(["--listen", &addr.to_string()])
            .args(extra)
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (build it: cargo build --release -p relay --bin relay)",
                    relay_bin.display()
                )
            })?;
        let pid = child.id().context("relay pid")?;
        Ok(RelayProcess {
            child,
            pid,
            addr,
            started,
        })
    }

    /// Fails when the relay exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("relay exited early: {status}");
        }
        Ok(())
    }

    /// The relay's `/metrics` text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        http_get(self.addr, "/metrics").await
    }

    /// `relay_events_total{topic="…"}`: records Kafka acknowledged.
    pub async fn events_total(&self, topic: &str) -> Option<u64> {
        let body = self.metrics().await.ok()?;
        metric_value(&body, &format!("relay_events_total{{topic=\"{topic}\"}}")).map(|v| v as u64)
    }

    /// Waits (up to `timeout`) until the relay streams its slot.
    pub async fn wait_connected(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_running()?;
            if let Ok(body) = self.metrics().await {
                if metric_value(&body, "relay_connected") == Some(1.0) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("relay did not connect within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the relay (SIGKILL) and reaps it.
    pub async fn kill(mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }
}

/// The value of the sample `name` (with its labels, exactly as printed)
/// in a Prometheus text body.
pub fn metric_value(body: &str, name: &str) -> Option<f64> {
    body.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

/// A minimal HTTP/1.1 GET (no client dependency, no connection reuse).
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await?;
    Ok(buf)
}

/// `POST path` with a JSON `body` to `addr`, as the bytes [`RawConn::send`]
/// sends (built once, sent many times).
pub fn json_post(addr: SocketAddr, path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// One keep-alive HTTP/1.1 connection sending a prebuilt request (like
/// wrk): little CPU per request, so a load generator's figures are the
/// service's, not its HTTP client's. One request at a time; responses must
/// carry `Content-Length`.
pub struct RawConn {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl RawConn {
    pub async fn connect(addr: SocketAddr) -> std::io::Result<RawConn> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(RawConn {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    /// Sends `request`, reads the whole response, returns its status.
    pub async fn send(&mut self, request: &[u8]) -> std::io::Result<u16> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let invalid = || std::io::Error::new(std::io::ErrorKind::InvalidData, "bad response");
        self.stream.write_all(request).await?;
        self.buf.clear();
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..end]).map_err(|_| invalid())?;
                let status: u16 = head
                    .get(9..12)
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(invalid)?;
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())
                            .flatten()
                    })
                    .ok_or_else(invalid)?;
                while self.buf.len() < end + 4 + len {
                    if self.stream.read_buf(&mut self.buf).await? == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                }
                return Ok(status);
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}

/// The pid of the walsender streaming `slot` (its `active_pid`), once a
/// client streams it: on the same machine its CPU time is in `/proc`
/// ([`cpu_seconds`]), the share of a drain Postgres spent decoding.
pub async fn walsender_pid(db: &tokio_postgres::Client, slot: &str) -> Option<u32> {
    db.query_opt(
        "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL",
        &[&slot],
    )
    .await
    .ok()
    .flatten()
    .and_then(|row| row.get::<_, Option<i32>>(0))
    .and_then(|p| u32::try_from(p).ok())
}

/// `pg_recvlogical` (`bin`) streaming `slot` of the database at `url` to
/// `/dev/null` until `end_lsn` (pgoutput, the stack's `outbox_pub`): the
/// benchmarks' baseline for how fast Postgres decodes and sends a backlog.
pub fn spawn_pg_recvlogical(
    bin: &Path,
    url: &str,
    slot: &str,
    end_lsn: &str,
) -> anyhow::Result<tokio::process::Child> {
    tokio::process::Command::new(bin)
        .args(["--dbname", url, "--slot", slot, "--start", "--no-loop"])
        .args(["--endpos", end_lsn, "--file", "/dev/null"])
        .args([
            "-o",
            "proto_version=1",
            "-o",
            "publication_names=outbox_pub",
        ])
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))
}

/// Producer settings of the relay's sink in its default (non-transactional,
/// exactly-once) mode, as `relay/src/sink/client.rs` `KafkaConfig::producer_config`
/// sets them: idempotent, `acks=all`, gapless, never timing a record out,
/// `linger.ms=2`, a queue of up to 1M records / 1 GiB, zstd compression.
/// Keep the two in step.
pub fn relay_like_producer_config(bootstrap: &str) -> ClientConfig {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("enable.gapless.guarantee", "true")
        .set("message.timeout.ms", "0")
        .set("compression.type", "zstd")
        .set("linger.ms", "2")
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "1048576");
    cfg
}

/// A database made for one benchmark run, dropped (with its replication
/// slots) by [`ScratchDb::drop_with_slots`].
pub struct ScratchDb {
    admin: tokio_postgres::Client,
    pub name: String,
    /// URL of the scratch database (same server and user as the admin URL).
    pub url: String,
}

impl ScratchDb {
    /// `CREATE DATABASE <prefix>_…` through `admin_url` (a superuser URL).
    pub async fn create(admin_url: &str, prefix: &str) -> anyhow::Result<ScratchDb> {
        let name = unique_name(prefix);
        let admin = connect(admin_url).await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await?;
        let url = url_for_database(admin_url, &name);
        Ok(ScratchDb { admin, name, url })
    }

    /// Drops `slots` (waiting up to 10 s for each to become inactive: a
    /// slot stays active until its walsender notices the client left), then
    /// the database. Best effort: a benchmark's result matters more.
    pub async fn drop_with_slots(self, slots: &[String]) {
        if let Ok(db) = connect(&self.url).await {
            let deadline = Instant::now() + Duration::from_secs(10);
            for slot in slots {
                while db
                    .execute(
                        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
                        &[slot],
                    )
                    .await
                    .is_err()
                    && Instant::now() < deadline
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        let _ = self
            .admin
            .batch_execute(&format!("DROP DATABASE {} WITH (FORCE)", self.name))
            .await;
    }
}

/// Writes `events` `OrderCreated` outbox rows, `rows_per_txn` to a
/// transaction (four writers at most; `synchronous_commit=off`).
pub async fn write_backlog(url: &str, events: usize, rows_per_txn: usize) -> anyhow::Result<()> {
    let rows_per_txn = rows_per_txn.max(1);
    let txns = events.div_ceil(rows_per_txn);
    let writers = txns.clamp(1, 4);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let client = connect(url).await?;
        // Transactions w, w + writers, …; the last one may be shorter.
        let mine: Vec<usize> = (w..txns)
            .step_by(writers)
            .map(|t| rows_per_txn.min(events - t * rows_per_txn))
            .collect();
        tasks.push(tokio::spawn(async move {
            client.batch_execute("SET synchronous_commit = off").await?;
            let stmt = client
                .prepare(
                    "INSERT INTO outbox (aggregate_type, aggregate_id, user_id, event_type, payload) \
                     SELECT 'order', (($1::bigint * 10000000) + g)::text, ($1::bigint * 1000 + g % 1000), 'OrderCreated', \
                     jsonb_build_object('order_id', $1::bigint * 10000000 + g, 'email', 'customer' || g || '@example.com', \
                       'status', 'CREATED', 'currency', 'EUR', 'total_cents', 3998, \
                       'items', jsonb_build_array(jsonb_build_object('sku', 'A-1', 'quantity', 2, 'unit_price_cents', 1999))) \
                     FROM generate_series($2::int, $3::int) g",
                )
                .await?;
            let mut done = 0usize;
            for n in mine {
                let first = i32::try_from(done + 1)?;
                let last = i32::try_from(done + n)?;
                client.execute(&stmt, &[&(w as i64), &first, &last]).await?;
                done += n;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// What [`bare_produce`] measured.
#[derive(Debug, Clone, Copy)]
pub struct BareRun {
    /// First send to the last acknowledgement.
    pub seconds: f64,
    /// CPU time of the sending thread and librdkafka's threads.
    pub cpu_seconds: f64,
    /// The untimed warm-up: creation to the warm-up record's ack.
    pub first_ack_s: f64,
}

/// The broker's ceiling for `records`: a bare producer configured as the
/// relay's sink ([`relay_like_producer_config`]) sends them to the same
/// partitions of `topic` (fresh) and waits for every acknowledgement.
/// Blocking: run it on a blocking thread.
pub fn bare_produce(
    bootstrap: &str,
    topic: &str,
    records: &[crate::kafka::Record],
    timeout: Duration,
) -> anyhow::Result<BareRun> {
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{BaseRecord, ThreadedProducer};

    let mut cpu = ThreadCpu::new();
    let created = Instant::now();
    let counter = Arc::new(AckCounter::default());
    let producer: ThreadedProducer<CountingContext> = relay_like_producer_config(bootstrap)
        .create_with_context(CountingContext(counter.clone()))
        .context("creating the bare producer")?;
    // Warm-up, not timed: one record to partition 0 of the (fresh) topic,
    // acknowledged. A producer sending at once after its creation waits
    // about 0.5 s for its idempotent producer id (librdkafka retries the
    // request on a timer when no broker connection is up yet); the relay
    // pays that while it reads its slot and topic state.
    let warm_up: BaseRecord<'_, str, str> = BaseRecord::to(topic)
        .partition(0)
        .key("warm-up")
        .payload("{}");
    producer
        .send(warm_up)
        .map_err(|(e, _)| e)
        .context("bare producer warm-up")?;
    while counter.reported() < 1 {
        if created.elapsed() > Duration::from_secs(60) {
            bail!("warm-up record not acknowledged within 60 s");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let first_ack_s = created.elapsed().as_secs_f64();
    counter.acked.store(0, Ordering::Relaxed);
    cpu.restart();
    let started = Instant::now();
    for r in records {
        let mut headers = OwnedHeaders::new_with_capacity(r.headers.len());
        for (k, v) in &r.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let mut rec: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic)
            .partition(r.partition)
            .payload(r.value.as_deref().unwrap_or("").as_bytes())
            .headers(headers);
        if let Some(k) = &r.key {
            rec = rec.key(k.as_bytes());
        }
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // Backpressure: wait for acks to free room.
                    rec = back;
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err((e, _)) => bail!("bare producer: {e}"),
            }
        }
    }
    let n = records.len() as u64;
    while counter.reported() < n {
        if started.elapsed() > timeout {
            bail!(
                "{} of {n} acknowledged after {timeout:?}",
                counter.acked.load(Ordering::Relaxed)
            );
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu_seconds = cpu.seconds();
    let failed = counter.failed.load(Ordering::Relaxed);
    if failed > 0 {
        bail!("{failed} records failed");
    }
    Ok(BareRun {
        seconds,
        cpu_seconds,
        first_ack_s,
    })
}

/// Delivery reports counted by a [`CountingContext`] producer.
#[derive(Debug, Default)]
pub struct AckCounter {
    pub acked: AtomicU64,
    pub failed: AtomicU64,
}

impl AckCounter {
    /// Records acknowledged or failed so far.
    pub fn reported(&self) -> u64 {
        self.acked.load(Ordering::Relaxed) + self.failed.load(Ordering::Relaxed)
    }
}

/// A producer context that counts delivery reports into an [`AckCounter`].
pub struct CountingContext(pub Arc<AckCounter>);

impl ClientContext for CountingContext {}

impl ProducerContext for CountingContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.0.acked.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.0.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}
