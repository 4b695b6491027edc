//! Benchmark: drain a backlog of outbox inserts with the relay and, over the
//! same WAL, with `pg_recvlogical` (the baseline: Postgres' own logical
//! decoding client writing pgoutput to /dev/null), and print the rates,
//! their ratios, CPU time and each process's peak RSS.
//!
//! ```text
//!   fresh database ─ three pgoutput slots ─ N outbox inserts (the backlog)
//!        │
//!        ├─ pg_recvlogical --slot recv --endpos END ──▶ /dev/null            (timed to exit)
//!        ├─ relay --slot relay_mock ──▶ librdkafka mock cluster (in this process) (timed to N acks)
//!        └─ relay --slot relay_kafka ──▶ the stack's broker                   (timed to N acks)
//! ```
//!
//! The mock cluster is an in-memory broker speaking the Kafka protocol over
//! TCP: the relay run against it shows what the relay itself costs, the
//! run against the stack's broker (Tansu here) what the whole path does.
//!
//! Needs a running stack (`scripts/up`; `source .run/env`) and the release
//! relay (`cargo build --release -p relay`):
//!
//! ```text
//! cargo run --release -p relay --example backlog_drain -- --events 100000
//! ```

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use devstack::testing::{connect, redact, unique_name, url_for_database};

#[derive(Parser, Debug)]
#[command(about = "relay vs pg_recvlogical on the same backlog")]
struct Args {
    /// A superuser URL of the stack's Postgres (a database is created in it).
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    #[arg(
        long,
        env = "KAFKA_BOOTSTRAP_SERVERS",
        default_value = "127.0.0.1:9092"
    )]
    kafka_bootstrap_servers: String,
    /// Outbox rows in the backlog.
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Rows per transaction (the order-api writes one).
    #[arg(long, default_value_t = 1)]
    rows_per_txn: usize,
    /// Partitions of the benchmark topic.
    #[arg(long, default_value_t = 3)]
    partitions: i32,
    #[arg(long, default_value = "target/release/relay")]
    relay_bin: PathBuf,
    #[arg(long, default_value = "/usr/lib/postgresql/15/bin/pg_recvlogical")]
    pg_recvlogical: PathBuf,
    /// Keep the benchmark database and slots afterwards.
    #[arg(long)]
    keep: bool,
}

/// What one drain took.
struct Run {
    seconds: f64,
    /// CPU time (user + system) the process used: its cost per event,
    /// which other load on the machine disturbs less than wall time.
    cpu_seconds: f64,
    peak_rss_kib: u64,
}

/// Samples a child process's peak RSS and CPU time from /proc.
#[derive(Default)]
struct Sampler {
    peak_rss_kib: u64,
    cpu_seconds: f64,
}

impl Sampler {
    fn sample(&mut self, pid: u32) {
        if let Some(rss) = read_peak_rss_kib(pid) {
            self.peak_rss_kib = self.peak_rss_kib.max(rss);
        }
        if let Some(cpu) = read_cpu_seconds(pid) {
            self.cpu_seconds = cpu;
        }
    }

    fn finish(self, seconds: f64) -> Run {
        Run {
            seconds,
            cpu_seconds: self.cpu_seconds,
            peak_rss_kib: self.peak_rss_kib,
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let db_name = unique_name("bench");
    let admin = connect(&args.database_url).await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {db_name}"))
        .await?;
    let url = url_for_database(&args.database_url, &db_name);
    let result = bench(&args, &url, &db_name).await;
    if !args.keep {
        let db = connect(&url).await?;
        // A slot stays active until its walsender notices the client left.
        let deadline = Instant::now() + Duration::from_secs(10);
        for slot in slot_names(&db_name) {
            while db
                .execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await
                .is_err()
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        drop(db);
        let _ = admin
            .batch_execute(&format!("DROP DATABASE {db_name} WITH (FORCE)"))
            .await;
    }
    result
}

fn slot_names(db_name: &str) -> [String; 3] {
    [
        format!("{db_name}_relay_kafka"),
        format!("{db_name}_relay_mock"),
        format!("{db_name}_recv"),
    ]
}

async fn bench(args: &Args, url: &str, db_name: &str) -> anyhow::Result<()> {
    devstack::migrations::apply(url).await?;
    let db = connect(url).await?;
    let [kafka_slot, mock_slot, recv_slot] = slot_names(db_name);
    for slot in [&kafka_slot, &mock_slot, &recv_slot] {
        db.execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[slot],
        )
        .await?;
    }
    let start_lsn: String = db
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);

    println!(
        "backlog: {} events in transactions of {} row(s) into {} ({})",
        args.events,
        args.rows_per_txn,
        db_name,
        redact(url)
    );
    let t = Instant::now();
    write_backlog(url, args.events, args.rows_per_txn).await?;
    let end_lsn: String = db
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let wal_bytes: i64 = db
        .query_one(
            "SELECT ($1::text::pg_lsn - $2::text::pg_lsn)::bigint",
            &[&end_lsn, &start_lsn],
        )
        .await?
        .get(0);
    println!(
        "backlog written in {:.1}s: WAL {start_lsn} → {end_lsn} ({:.1} MiB)",
        t.elapsed().as_secs_f64(),
        wal_bytes as f64 / 1048576.0
    );

    let baseline = run_pg_recvlogical(args, url, &recv_slot, &end_lsn).await?;
    let topic = unique_name("bench-topic");
    let mock = rdkafka::mocking::MockCluster::new(3)?;
    mock.create_topic(&topic, args.partitions, 3)?;
    let relay_mock = run_relay(args, url, &mock_slot, &topic, &mock.bootstrap_servers()).await?;
    drop(mock);
    devstack::kafka::create_topic(&args.kafka_bootstrap_servers, &topic, args.partitions).await?;
    let relay = run_relay(
        args,
        url,
        &kafka_slot,
        &topic,
        &args.kafka_bootstrap_servers,
    )
    .await?;

    let rate = |r: &Run| args.events as f64 / r.seconds;
    let mib_s = |r: &Run| wal_bytes as f64 / 1048576.0 / r.seconds;
    println!();
    println!(
        "| drain of {} events | seconds | events/s | WAL MiB/s | CPU s | CPU µs/event | peak RSS MiB |",
        args.events
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (name, r) in [
        ("pg_recvlogical → /dev/null", &baseline),
        ("relay → mock cluster (acked)", &relay_mock),
        ("relay → stack broker (acked)", &relay),
    ] {
        println!(
            "| {name} | {:.2} | {:.0} | {:.1} | {:.2} | {:.1} | {:.1} |",
            r.seconds,
            rate(r),
            mib_s(r),
            r.cpu_seconds,
            r.cpu_seconds * 1e6 / args.events as f64,
            r.peak_rss_kib as f64 / 1024.0
        );
    }
    println!();
    println!(
        "relay / pg_recvlogical throughput ratio: {:.2} with the mock cluster, {:.2} with the stack's broker",
        rate(&relay_mock) / rate(&baseline),
        rate(&relay) / rate(&baseline)
    );
    Ok(())
}

/// Writes the backlog over 4 connections, without waiting for WAL flush.
async fn write_backlog(url: &str, events: usize, rows_per_txn: usize) -> anyhow::Result<()> {
    const WRITERS: usize = 4;
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let client = connect(url).await?;
        let share = events / WRITERS + usize::from(w < events % WRITERS);
        tasks.push(tokio::spawn(async move {
            client.batch_execute("SET synchronous_commit = off").await?;
            let stmt = client
                .prepare(
                    "INSERT INTO outbox (aggregate_type, aggregate_id, user_id, event_type, payload) \
                     SELECT 'order', (($1::bigint * 1000000) + g)::text, ($1::bigint * 1000 + g % 1000), 'OrderCreated', \
                     jsonb_build_object('order_id', $1::bigint * 1000000 + g, 'email', 'customer' || g || '@example.com', \
                       'status', 'CREATED', 'currency', 'EUR', 'total_cents', 3998, \
                       'items', jsonb_build_array(jsonb_build_object('sku', 'A-1', 'quantity', 2, 'unit_price_cents', 1999))) \
                     FROM generate_series($2::int, $3::int) g",
                )
                .await?;
            let mut done = 0usize;
            while done < share {
                let n = rows_per_txn.min(share - done);
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

async fn run_pg_recvlogical(
    args: &Args,
    url: &str,
    slot: &str,
    end_lsn: &str,
) -> anyhow::Result<Run> {
    let started = Instant::now();
    let mut child = tokio::process::Command::new(&args.pg_recvlogical)
        .args(["--dbname", url, "--slot", slot, "--start", "--no-loop"])
        .args(["--endpos", end_lsn, "--file", "/dev/null"])
        .args([
            "-o",
            "proto_version=1",
            "-o",
            "publication_names=outbox_pub",
        ])
        .spawn()
        .with_context(|| format!("starting {}", args.pg_recvlogical.display()))?;
    let pid = child.id().context("pg_recvlogical pid")?;
    let mut sampler = Sampler::default();
    let status = loop {
        sampler.sample(pid);
        if let Some(status) = child.try_wait()? {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let seconds = started.elapsed().as_secs_f64();
    if !status.success() {
        bail!("pg_recvlogical failed: {status}");
    }
    Ok(sampler.finish(seconds))
}

async fn run_relay(
    args: &Args,
    url: &str,
    slot: &str,
    topic: &str,
    bootstrap: &str,
) -> anyhow::Result<Run> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let started = Instant::now();
    let mut child = tokio::process::Command::new(&args.relay_bin)
        .args(["--database-url", url, "--slot", slot, "--topic", topic])
        .args(["--kafka-bootstrap-servers", bootstrap])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .with_context(|| {
            format!(
                "starting {} (build it: cargo build --release -p relay)",
                args.relay_bin.display()
            )
        })?;
    let pid = child.id().context("relay pid")?;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let needle = format!("relay_events_total{{topic=\"{topic}\"}} {}", args.events);
    let mut sampler = Sampler::default();
    let mut last_poll = Instant::now() - Duration::from_secs(1);
    let seconds = loop {
        sampler.sample(pid);
        if let Some(status) = child.try_wait()? {
            bail!("relay exited early: {status}");
        }
        if last_poll.elapsed() >= Duration::from_millis(10) {
            last_poll = Instant::now();
            if let Ok(body) = http_get(addr, "/metrics").await {
                if body.contains(&needle) {
                    break started.elapsed().as_secs_f64();
                }
            }
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("relay did not drain the backlog within 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    sampler.sample(pid);
    child.start_kill()?;
    child.wait().await?;
    Ok(sampler.finish(seconds))
}

/// `VmHWM` (peak resident set) of a running process, in KiB.
fn read_peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// utime + stime of a running process, in seconds (clock ticks of 1/100 s,
/// Linux's USER_HZ).
fn read_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await?;
    Ok(buf)
}
