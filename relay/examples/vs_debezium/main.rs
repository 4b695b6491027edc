//! `scripts/bench vs-debezium`: the relay and Debezium (Kafka Connect
//! standalone with the Postgres connector and the Outbox Event Router) on
//! the same outbox, the same Apache Kafka and the same machine, one system
//! at a time.
//!
//! ```text
//!   outbox ─┬─ slot <db>_relay ─▶ relay (release binary) ─▶ topic <db>-relay               (P partitions)
//!           └─ slot <db>_dbz  ─▶ Connect + Debezium     ─▶ topic <db>.<aggregate_type>    (P partitions)
//! ```
//!
//! Phases (`--phases`, all by default), each in a scratch database:
//! - **catch-up** — a backlog written while both systems are stopped
//!   (one-row transactions, then one transaction of as many rows), then
//!   `pg_recvlogical` (the baseline: Postgres decoding and sending it, no
//!   Kafka) and each system started on it in turn: time from its start to
//!   its first and to the last record acknowledged in Kafka (the relay's
//!   `relay_events_total`; for Debezium the topic's high watermarks, which
//!   count its records: its producer is not transactional), events/s, CPU
//!   seconds and peak RSS of the whole process (the JVM's for Connect).
//! - **latency** ([`latency`]) — loadgen's open-loop sql mode at each of
//!   `--rates`.
//! - **crash** ([`crash`]) — SIGKILL and restart under load, then lost,
//!   duplicated and out-of-order events counted at the topic; Debezium
//!   also on distributed Connect with exactly-once source support.
//! - **idle** — RSS and CPU of each over `--idle-seconds` with no writes.
//! - **wal** — WAL each slot holds back after `--wal-idle` of writes to
//!   another table only (both systems running at once: nothing here is
//!   timed).
//!
//! Both slots exist before anything is written, so both see all of it.
//! Debezium's settings are printed with the results
//! ([`connect::DEBEZIUM_SETTINGS`]): tuned as its docs advise.
//!
//! Nothing here asserts anything: it prints figures and ratios.

mod compat;
mod connect;
mod crash;
mod latency;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use devstack::bench::{cpu_seconds, peak_rss_kib, rss_kib, RelayProcess, ScratchDb, StackArgs};
use devstack::testing::connect;

use crate::connect::{tempdir, Connect, Mode, Watermarks, DEBEZIUM_SETTINGS};

/// What `--phases` can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Phase {
    CatchUp,
    Latency,
    Crash,
    Idle,
    Wal,
    /// `scripts/bench debezium-compat` ([`compat`]): the relay's
    /// `--value-format debezium-outbox` against Debezium's records, alone
    /// (not among the defaults).
    Compat,
}

#[derive(Parser, Debug)]
#[command(about = "relay vs Debezium (Kafka Connect) on the same outbox and broker")]
pub struct Args {
    #[command(flatten)]
    stack: StackArgs,
    /// Which measurements to run.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "catch-up,latency,crash,idle,wal"
    )]
    phases: Vec<Phase>,
    /// Outbox rows in each backlog.
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Partitions of both topics (the stack's outbox topic has 12).
    #[arg(long, default_value_t = 12)]
    partitions: i32,
    /// The release relay binary.
    #[arg(long, default_value = "target/release/relay")]
    relay_bin: PathBuf,
    /// The release loadgen binary (the latency and crash phases' writer).
    #[arg(long, default_value = "target/release/loadgen")]
    loadgen_bin: PathBuf,
    /// Directory of the Kafka Connect and Debezium jars (scripts/bench
    /// fetches them once).
    #[arg(long, env = "DEBEZIUM_LIBS")]
    connect_libs: PathBuf,
    /// log4j2 configuration for Connect.
    #[arg(long, default_value = "kafka/log4j2.properties")]
    log4j: PathBuf,
    /// Events/s of the latency phase, each run in turn.
    #[arg(long, value_delimiter = ',', default_value = "500,1000,2000")]
    rates: Vec<f64>,
    /// loadgen's warm-up before each latency run (not measured).
    #[arg(long, default_value = "10s", value_parser = lifecycle::parse_duration)]
    latency_warmup: Duration,
    /// Measured time of each latency run.
    #[arg(long, default_value = "30s", value_parser = lifecycle::parse_duration)]
    latency_duration: Duration,
    /// Events/s while the crash phase kills each system.
    #[arg(long, default_value_t = 500.0)]
    crash_rate: f64,
    /// Length of the crash phase's load; the kills are spread evenly in it.
    #[arg(long, default_value = "60s", value_parser = lifecycle::parse_duration)]
    crash_duration: Duration,
    /// SIGKILLs of each system in the crash phase.
    #[arg(long, default_value_t = 3)]
    kills: usize,
    /// Seconds of the idle measurement.
    #[arg(long, default_value_t = 60)]
    idle_seconds: u64,
    /// How long the wal phase writes to another table before reading what
    /// each slot retains.
    #[arg(long, default_value = "10m", value_parser = lifecycle::parse_duration)]
    wal_idle: Duration,
    /// The baseline: Postgres's own client of the same slot kind.
    #[arg(long, default_value = "/usr/lib/postgresql/15/bin/pg_recvlogical")]
    pg_recvlogical: PathBuf,
    /// Give up on a run after this long.
    #[arg(long, default_value = "600s", value_parser = lifecycle::parse_duration)]
    timeout: Duration,
}

struct Measured {
    system: &'static str,
    shape: String,
    /// From the process's start to its first record in Kafka.
    first_s: f64,
    seconds: f64,
    cpu_s: f64,
    peak_rss_kib: u64,
}

impl Measured {
    fn rate(&self, events: usize) -> f64 {
        events as f64 / self.seconds
    }
}

/// The topics of one scratch database.
pub struct Topics {
    pub relay: String,
    /// Debezium's for the backlog's rows (`aggregate_type` `order`).
    pub order: String,
    /// Debezium's for loadgen's rows (`aggregate_type` `loadgen`).
    pub loadgen: String,
}

/// One scratch database with the three slots (relay, Debezium,
/// pg_recvlogical), dropped after `phase` whatever its outcome.
async fn with_scratch<T, F, Fut>(args: &Args, phase: F) -> anyhow::Result<T>
where
    F: FnOnce(ScratchDb, [String; 3]) -> Fut,
    Fut: std::future::Future<Output = (ScratchDb, anyhow::Result<T>)>,
{
    let db = ScratchDb::create(&args.stack.database_url, "vsdbz").await?;
    let slots = [
        format!("{}_relay", db.name),
        format!("{}_dbz", db.name),
        format!("{}_recv", db.name),
    ];
    let (db, result) = phase(db, slots.clone()).await;
    db.drop_with_slots(&slots).await;
    result
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    for (bin, build) in [(&args.relay_bin, "relay"), (&args.loadgen_bin, "loadgen")] {
        anyhow::ensure!(
            bin.is_file(),
            "{} is not built: cargo build --release -p {build}",
            bin.display()
        );
    }
    anyhow::ensure!(
        args.connect_libs.is_dir(),
        "{} holds no Connect jars: scripts/bench vs-debezium fetches them",
        args.connect_libs.display()
    );
    let args = &args;
    let run = |p: Phase| args.phases.contains(&p);
    if run(Phase::Compat) {
        anyhow::ensure!(args.phases == [Phase::Compat], "--phases compat runs alone");
        return compat::run(args).await;
    }
    println!(
        "vs-debezium: {} events, {} partitions, one system at a time",
        args.events, args.partitions
    );
    println!("Debezium settings beyond the essentials:");
    for (k, v) in DEBEZIUM_SETTINGS {
        println!("  {k} = {v}");
    }
    println!(
        "Debezium runs on ConnectStandalone (offsets in a file, at-least-once); the crash \
         phase's debezium-eos row on ConnectDistributed with exactly.once.source.support=enabled, \
         exactly.once.support=required, transaction.boundary=poll"
    );
    let mut rows = Vec::new();
    if run(Phase::CatchUp) {
        for rows_per_txn in [1, args.events] {
            let result = with_scratch(args, |db, slots| async move {
                let r = catch_up(args, &db, &slots, rows_per_txn).await;
                (db, r)
            })
            .await;
            rows.extend(result?);
        }
    }
    let latency = if run(Phase::Latency) {
        with_scratch(args, |db, slots| async move {
            let r = match prepare(args, &db, &slots).await {
                Ok(topics) => latency::run(args, &db, &slots, &topics).await,
                Err(e) => Err(e),
            };
            (db, r)
        })
        .await?
    } else {
        Vec::new()
    };
    let crashes = if run(Phase::Crash) {
        crash::run(args).await?
    } else {
        Vec::new()
    };
    let idle = if run(Phase::Idle) {
        with_scratch(args, |db, slots| async move {
            let r = idle_cost(args, &db, &slots).await;
            (db, r)
        })
        .await?
    } else {
        Vec::new()
    };
    let wal = if run(Phase::Wal) {
        with_scratch(args, |db, slots| async move {
            let r = wal_retained(args, &db, &slots).await;
            (db, r)
        })
        .await?
    } else {
        Vec::new()
    };

    print_catch_up(args, &rows);
    print_latency(&latency);
    print_crashes(&crashes);
    if !idle.is_empty() {
        println!();
        println!(
            "{:<10} {:>14} {:>16}",
            "idle",
            "RSS MiB",
            format!("CPU % over {}s", args.idle_seconds)
        );
        for (system, rss, cpu) in &idle {
            println!(
                "{:<10} {:>14.1} {:>16.2}",
                system,
                *rss as f64 / 1024.0,
                cpu / args.idle_seconds as f64 * 100.0
            );
        }
    }
    if !wal.is_empty() {
        println!();
        println!(
            "WAL held back after {} s of writes to another table only ({:.1} MiB written):",
            args.wal_idle.as_secs(),
            wal[0].2 as f64 / 1048576.0
        );
        println!(
            "{:<10} {:>22} {:>26}",
            "slot of", "retained (restart) MiB", "unconfirmed (flush) MiB"
        );
        for (system, (restart, flush), _) in &wal {
            println!(
                "{:<10} {:>22.2} {:>26.2}",
                system,
                *restart as f64 / 1048576.0,
                *flush as f64 / 1048576.0
            );
        }
    }

    let find = |system: &str, one_row: bool| {
        rows.iter()
            .find(|r| r.system == system && r.shape.starts_with("one-row") == one_row)
    };
    let drain = match (find("relay", true), find("debezium", true)) {
        (Some(r), Some(d)) => format!("{:.2}", r.rate(args.events) / d.rate(args.events)),
        _ => "n/a".to_owned(),
    };
    let peak = |s: &str| {
        rows.iter()
            .filter(|r| r.system == s)
            .map(|r| r.peak_rss_kib)
            .max()
    };
    let rss = match (peak("debezium"), peak("relay")) {
        (Some(d), Some(r)) if r > 0 => format!("{:.1}", d as f64 / r as f64),
        _ => "n/a".to_owned(),
    };
    let p99 = |s: &str| {
        latency
            .iter()
            .find(|l| l.system == s && l.rate == 1000.0)
            .map(|l| l.p99_ms)
    };
    let q = match (p99("debezium"), p99("relay")) {
        (Some(d), Some(r)) if r > 0.0 => format!("{:.1}", d / r),
        _ => "n/a".to_owned(),
    };
    let dup = |s: &str| {
        crashes
            .iter()
            .find(|c| c.system == s)
            .map_or("n/a".to_owned(), |c| c.duplicated.to_string())
    };
    println!();
    for one_row in [true, false] {
        if let (Some(r), Some(b)) = (find("relay", one_row), find("recvlogical", one_row)) {
            println!(
                "relay / pg_recvlogical ({}): {:.2}",
                r.shape,
                b.seconds / r.seconds
            );
        }
    }
    println!(
        "vs-debezium: drain ratio {drain}, p99 ratio at 1000/s {q}, rss ratio {rss}, duplicates after kills relay {} debezium {}",
        dup("relay"),
        dup("debezium")
    );
    Ok(())
}

fn print_catch_up(args: &Args, rows: &[Measured]) {
    if rows.is_empty() {
        return;
    }
    println!();
    println!(
        "{:<10} {:<26} {:>9} {:>9} {:>10} {:>8} {:>10}",
        "system", "backlog", "first s", "last s", "events/s", "cpu s", "peak MiB"
    );
    for r in rows {
        println!(
            "{:<10} {:<26} {:>9.2} {:>9.2} {:>10.0} {:>8.2} {:>10.1}",
            r.system,
            r.shape,
            r.first_s,
            r.seconds,
            r.rate(args.events),
            r.cpu_s,
            r.peak_rss_kib as f64 / 1024.0
        );
    }
}

fn print_latency(rows: &[latency::Latency]) {
    if rows.is_empty() {
        return;
    }
    println!();
    println!("commit→Kafka at loadgen's consumer, ms (relay: commit_ts header; Debezium: created_at header, the transaction's start;");
    println!(
        "recvlogical, the baseline: commit→received by pg_recvlogical, test_decoding, no Kafka)"
    );
    println!(
        "{:<10} {:>6} {:>9} {:>7} {:>7} {:>7} {:>8} {:>9} {:>10} {:>7} {:>9} {:>5}",
        "system",
        "rate",
        "achieved",
        "p50",
        "p99",
        "p99.9",
        "max",
        "e2e p99",
        "ack p99 ≤",
        "cpu s",
        "matched",
        "lost"
    );
    for l in rows {
        println!(
            "{:<10} {:>6.0} {:>9.0} {:>7.2} {:>7.2} {:>7.2} {:>8.2} {:>9} {:>10} {:>7.2} {:>9} {:>5}",
            l.system,
            l.rate,
            l.achieved,
            l.p50_ms,
            l.p99_ms,
            l.p999_ms,
            l.max_ms,
            if l.end_to_end_p99_ms.is_nan() {
                "-".to_owned()
            } else {
                format!("{:.2}", l.end_to_end_p99_ms)
            },
            l.ack_p99_le_ms.map_or("-".to_owned(), |v| format!("{v:.1}")),
            l.cpu_s,
            l.matched,
            l.unmatched
        );
        if l.duplicates > 0 {
            println!("  ({} duplicate records)", l.duplicates);
        }
    }
    println!("(e2e: loadgen's INSERT intended start → arrival, one clock for both; ack: the relay's commit→ack histogram bucket)");
    for l in rows.iter().filter(|l| l.system == "relay") {
        if let Some(b) = rows
            .iter()
            .find(|b| b.system == "recvlogical" && b.rate == l.rate)
        {
            println!(
                "relay p99 / pg_recvlogical p99 at {}/s: {:.1}",
                l.rate,
                l.p99_ms / b.p99_ms
            );
        }
    }
}

fn print_crashes(rows: &[crash::Crash]) {
    if rows.is_empty() {
        return;
    }
    println!();
    println!(
        "{:<12} {:>6} {:>10} {:>9} {:>6} {:>11} {:>13} {:>8}",
        "crash", "kills", "committed", "records", "lost", "duplicated", "out of order", "no row"
    );
    for c in rows {
        println!(
            "{:<12} {:>6} {:>10} {:>9} {:>6} {:>11} {:>13} {:>8}",
            c.system,
            c.kills,
            c.committed,
            c.records,
            c.lost,
            c.duplicated,
            c.out_of_order,
            c.unknown
        );
    }
}

/// Slots and publications for both systems, and their topics, before any
/// row is written.
async fn prepare(args: &Args, db: &ScratchDb, slots: &[String; 3]) -> anyhow::Result<Topics> {
    devstack::migrations::apply(&db.url).await?;
    let client = connect(&db.url).await?;
    connect::setup(&client, &args.stack.kafka_bootstrap_servers).await?;
    for slot in slots {
        client
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[slot],
            )
            .await?;
    }
    let topics = Topics {
        relay: format!("{}-relay", db.name),
        order: format!("{}.order", db.name),
        loadgen: format!("{}.loadgen", db.name),
    };
    let bootstrap = &args.stack.kafka_bootstrap_servers;
    for t in [&topics.relay, &topics.order, &topics.loadgen] {
        devstack::kafka::create_topic(bootstrap, t, args.partitions).await?;
    }
    Ok(topics)
}

async fn catch_up(
    args: &Args,
    db: &ScratchDb,
    slots: &[String; 3],
    rows_per_txn: usize,
) -> anyhow::Result<Vec<Measured>> {
    let topics = prepare(args, db, slots).await?;
    let (relay_topic, dbz_topic) = (topics.relay, topics.order);
    devstack::bench::write_backlog(&db.url, args.events, rows_per_txn).await?;
    let shape = if rows_per_txn == 1 {
        format!("one-row txns x{}", args.events)
    } else {
        format!("one txn of {} rows", args.events)
    };
    println!("backlog written: {shape}");
    let target = args.events as u64;
    let end_lsn: String = connect(&db.url)
        .await?
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);

    let d = pg_recvlogical(args, &db.url, &slots[2], &end_lsn).await?;
    println!("pg_recvlogical: {:.2} s", d.seconds);
    let mut out = vec![Measured {
        system: "recvlogical",
        shape: shape.clone(),
        first_s: d.first_s,
        seconds: d.seconds,
        cpu_s: d.cpu_s,
        peak_rss_kib: d.peak_rss_kib,
    }];

    let mut relay = spawn_relay(args, db, &slots[0], &relay_topic)?;
    let (addr, counter) = (
        relay.addr,
        format!("relay_events_total{{topic=\"{relay_topic}\"}}"),
    );
    let relay_run = drain(
        &mut relay.child,
        relay.pid,
        relay.started,
        (target, args.timeout),
        || async {
            let body = devstack::bench::http_get(addr, "/metrics")
                .await
                .unwrap_or_default();
            devstack::bench::metric_value(&body, &counter).unwrap_or(0.0) as u64
        },
    )
    .await;
    relay.kill().await?;
    let d = relay_run.context("relay catch-up")?;
    println!("relay:    {:.2} s", d.seconds);
    out.push(Measured {
        system: "relay",
        shape: shape.clone(),
        first_s: d.first_s,
        seconds: d.seconds,
        cpu_s: d.cpu_s,
        peak_rss_kib: d.peak_rss_kib,
    });

    let dir = tempdir(&db.name)?;
    let mut connect = Connect::spawn(args, db, &slots[1], &dir, Mode::Standalone)?;
    let watermarks = Watermarks::new(&args.stack.kafka_bootstrap_servers, &dbz_topic)?;
    let dbz_run = drain(
        &mut connect.child,
        connect.pid,
        connect.started,
        (target, args.timeout),
        || async { watermarks.total().unwrap_or(0) },
    )
    .await;
    connect.kill().await;
    let d = dbz_run.with_context(|| {
        format!(
            "Debezium catch-up (Connect's log: {})",
            dir.join("connect.log").display()
        )
    })?;
    println!("debezium: {:.2} s", d.seconds);
    out.push(Measured {
        system: "debezium",
        shape,
        first_s: d.first_s,
        seconds: d.seconds,
        cpu_s: d.cpu_s,
        peak_rss_kib: d.peak_rss_kib,
    });
    Ok(out)
}

/// `pg_recvlogical` streaming the slot to `/dev/null` until `end_lsn`:
/// how fast Postgres itself decodes and sends this backlog (no Kafka).
/// Its first record is not observable: `first_s` is its whole time.
async fn pg_recvlogical(
    args: &Args,
    url: &str,
    slot: &str,
    end_lsn: &str,
) -> anyhow::Result<Drained> {
    let started = Instant::now();
    let mut child =
        devstack::bench::spawn_pg_recvlogical(&args.pg_recvlogical, url, slot, end_lsn)?;
    let pid = child.id().context("pg_recvlogical pid")?;
    let (mut cpu_s, mut peak) = (0.0, 0);
    let status = loop {
        cpu_s = cpu_seconds(pid).unwrap_or(cpu_s);
        peak = peak_rss_kib(pid).unwrap_or(peak);
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > args.timeout {
            bail!("pg_recvlogical did not finish within {:?}", args.timeout);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    anyhow::ensure!(status.success(), "pg_recvlogical failed: {status}");
    let seconds = started.elapsed().as_secs_f64();
    Ok(Drained {
        first_s: seconds,
        seconds,
        cpu_s,
        peak_rss_kib: peak,
    })
}

/// What one drain measured.
struct Drained {
    first_s: f64,
    seconds: f64,
    cpu_s: f64,
    peak_rss_kib: u64,
}

/// Waits until `progress` reaches the backlog; returns seconds from the
/// process's start to its first and last record, its CPU seconds and its
/// peak RSS (KiB).
async fn drain<F, Fut>(
    child: &mut tokio::process::Child,
    pid: u32,
    started: Instant,
    (target, timeout): (u64, Duration),
    mut progress: F,
) -> anyhow::Result<Drained>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = u64>,
{
    let mut first_s = None;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("exited early: {status}");
        }
        let done = progress().await;
        if done > 0 && first_s.is_none() {
            first_s = Some(started.elapsed().as_secs_f64());
        }
        if done >= target {
            let seconds = started.elapsed().as_secs_f64();
            return Ok(Drained {
                first_s: first_s.unwrap_or(seconds),
                seconds,
                cpu_s: cpu_seconds(pid).unwrap_or(0.0),
                peak_rss_kib: peak_rss_kib(pid).unwrap_or(0),
            });
        }
        if started.elapsed() > timeout {
            bail!("{done} of {target} records after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// RSS and CPU of each system streaming an idle outbox.
async fn idle_cost(
    args: &Args,
    db: &ScratchDb,
    slots: &[String; 3],
) -> anyhow::Result<Vec<(&'static str, u64, f64)>> {
    let relay_topic = prepare(args, db, slots).await?.relay;
    let idle = Duration::from_secs(args.idle_seconds);
    let mut out = Vec::new();

    let mut relay = spawn_relay(args, db, &slots[0], &relay_topic)?;
    relay.wait_connected(Duration::from_secs(60)).await?;
    let cpu0 = cpu_seconds(relay.pid).unwrap_or(0.0);
    tokio::time::sleep(idle).await;
    relay.check_running()?;
    out.push((
        "relay",
        rss_kib(relay.pid).unwrap_or(0),
        cpu_seconds(relay.pid).unwrap_or(0.0) - cpu0,
    ));
    relay.kill().await?;

    let dir = tempdir(&db.name)?;
    let mut connect = Connect::spawn(args, db, &slots[1], &dir, Mode::Standalone)?;
    connect.wait_running(Duration::from_secs(120)).await?;
    let cpu0 = cpu_seconds(connect.pid).unwrap_or(0.0);
    tokio::time::sleep(idle).await;
    out.push((
        "debezium",
        rss_kib(connect.pid).unwrap_or(0),
        cpu_seconds(connect.pid).unwrap_or(0.0) - cpu0,
    ));
    connect.kill().await;
    Ok(out)
}

/// Both systems on an outbox that gets no rows while another table of the
/// same database takes writes for `--wal-idle`: how much WAL each slot
/// still holds back then (from its `restart_lsn`) and has not confirmed
/// (from its `confirmed_flush_lsn`), and the WAL written meanwhile.
async fn wal_retained(
    args: &Args,
    db: &ScratchDb,
    slots: &[String; 3],
) -> anyhow::Result<Vec<(&'static str, (i64, i64), i64)>> {
    let relay_topic = prepare(args, db, slots).await?.relay;
    let client = connect(&db.url).await?;
    client
        .batch_execute("CREATE TABLE other (id bigserial PRIMARY KEY, filler text NOT NULL)")
        .await?;
    let mut relay = spawn_relay(args, db, &slots[0], &relay_topic)?;
    relay.wait_connected(Duration::from_secs(60)).await?;
    let dir = tempdir(&format!("{}-wal", db.name))?;
    let mut connect = Connect::spawn(args, db, &slots[1], &dir, Mode::Standalone)?;
    connect.wait_running(Duration::from_secs(120)).await?;
    let start: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let deadline = Instant::now() + args.wal_idle;
    while Instant::now() < deadline {
        client
            .execute(
                "INSERT INTO other (filler) SELECT repeat('x', 1000) FROM generate_series(1, 20)",
                &[],
            )
            .await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    relay.check_running()?;
    let mut out = Vec::new();
    for (system, slot) in [("relay", &slots[0]), ("debezium", &slots[1])] {
        let row = client
            .query_one(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, \
                        pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint, \
                        pg_wal_lsn_diff(pg_current_wal_lsn(), $2::text::pg_lsn)::bigint \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[slot, &start],
            )
            .await?;
        out.push((system, (row.get(0), row.get(1)), row.get(2)));
    }
    relay.kill().await?;
    connect.kill().await;
    Ok(out)
}

/// The release relay on `slot`, into `topic`, with its defaults.
fn spawn_relay(
    args: &Args,
    db: &ScratchDb,
    slot: &str,
    topic: &str,
) -> anyhow::Result<RelayProcess> {
    RelayProcess::spawn(
        &args.relay_bin,
        &db.url,
        slot,
        topic,
        &args.stack.kafka_bootstrap_servers,
        &[],
    )
}
