//! Benchmark (P1 catch-up, P4 memory): drain a backlog of outbox inserts
//! with the relay and measure, in the same run, the two ceilings it sits
//! between: `pg_recvlogical` draining the same WAL (what Postgres can
//! decode and send) and a bare rdkafka producer pushing the same records
//! into the same broker (what the broker and librdkafka can take). Prints
//! rates, the ratios relay/pg_recvlogical and relay/bare producer, which
//! bound the relay hit, CPU time, and the relay's RSS along the drain.
//!
//! ```text
//!   fresh database ─ pgoutput slots ─ N outbox inserts (the backlog, R rows per transaction)
//!        │
//!        ├─ recv:   pg_recvlogical --slot recv --endpos END ──▶ /dev/null          (timed to exit)
//!        ├─ mock:   relay --slot relay_mock ──▶ librdkafka mock cluster (in this process)
//!        ├─ broker: relay --slot relay_kafka ──▶ the stack's broker (Kafka) ──┐ (relay runs:
//!        │                                                records read back ◀─┘  timed to N acks)
//!        ├─ bare-mock:   bare producer (this process) ──▶ fresh mock cluster        (timed to N acks)
//!        └─ bare-broker: bare producer (this process) ──▶ stack broker, fresh topic (timed to N acks)
//!
//!   relay runs: VmRSS of the relay process sampled every --rss-interval-ms,
//!   with relay_events_total (acked records) at each sample
//! ```
//!
//! The mock cluster is an in-memory broker speaking the Kafka protocol over
//! TCP: the relay run against it shows what the relay itself costs, the
//! run against the stack's broker what the whole path does. The bare
//! producer is configured like the relay's sink (`relay/src/sink/client.rs`:
//! idempotent, `acks=all`, `linger.ms=2`, zstd) and sends the very
//! records the relay produced (read back from the relay's topic on the
//! stack broker: same keys, values, headers and partitions; without a
//! broker run, records of the same shape built from the table), so relay /
//! bare producer is the share of the broker's ceiling the relay reached.
//! Its CPU is the sending thread plus the producer's librdkafka threads
//! (not the in-process mock broker). The walsender column is the CPU time
//! of the Postgres process decoding each drain's slot: near the drain's
//! wall time, Postgres is the bound.
//!
//! The verdict compares the relay with the lower of the two ceilings: within
//! 10 % of it (or faster), that side bounds the relay; below both, the relay
//! itself does. On these 2-core machines the walsender, the relay and the
//! broker also share the cores, so read the ratios, not the absolute rates.
//!
//! RSS: every relay run samples the relay's VmRSS with its acked count and
//! prints it at 10/25/50/75/100 % of the records (`--rss-csv` writes every
//! sample). The relay holds at most `--max-in-flight-bytes` (16 MiB) of
//! records unacknowledged, so its RSS should level off whatever the backlog
//! or transaction size; `--relay-arg` passes options through to try others.
//!
//! One command each (a running stack, e.g. `scripts/test --stack-only;
//! source .run/test/env`, and `cargo build --release -p relay --bin relay
//! --examples`):
//!
//! ```text
//! # P1 catch-up, 100k events, every run
//! DATABASE_URL=$TEST_DATABASE_URL KAFKA_BOOTSTRAP_SERVERS=$TEST_KAFKA_BOOTSTRAP_SERVERS \
//!   target/release/examples/backlog_drain --events 100000
//! # P4 memory: a 1M-event backlog, and one 1M-row transaction (--runs mock: relay into the mock cluster only)
//! ... backlog_drain --events 1000000 --runs recv,mock,broker,bare --rss-csv rss.csv
//! ... backlog_drain --events 1000000 --rows-per-txn 1000000 --runs recv,mock,broker,bare --rss-csv rss.csv
//! ```

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use devstack::bench::{
    cpu_seconds, peak_rss_kib, rss_kib, write_backlog, RelayProcess, RssSeries, ScratchDb,
    StackArgs,
};
use devstack::kafka::{Record, TopicReader};
use devstack::testing::{connect, redact, unique_name};
use outbox_record::header;
use tokio_postgres::Client;

/// One drain of the backlog.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
enum RunKind {
    /// pg_recvlogical into /dev/null.
    Recv,
    /// The relay into the in-process mock cluster.
    Mock,
    /// The relay into the stack's broker.
    Broker,
    /// The bare producer into a fresh mock cluster.
    BareMock,
    /// The bare producer into the stack's broker (fresh topic).
    BareBroker,
    /// Both bare-producer runs.
    Bare,
}

#[derive(Parser, Debug)]
#[command(about = "relay vs pg_recvlogical vs a bare producer on the same backlog")]
struct Args {
    #[command(flatten)]
    stack: StackArgs,
    /// Outbox rows in the backlog.
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Rows per transaction (the order-api writes one; 1000000 with
    /// --events 1000000 is one 1M-row transaction).
    #[arg(long, default_value_t = 1)]
    rows_per_txn: usize,
    /// Partitions of the benchmark topics.
    #[arg(long, default_value_t = 3)]
    partitions: i32,
    /// Which drains to run, in this order: recv, mock, bare-mock, broker,
    /// bare-broker (`bare` = both bare-producer runs).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "recv,mock,broker,bare"
    )]
    runs: Vec<RunKind>,
    /// Interval of the relay's RSS samples, milliseconds.
    #[arg(long, default_value_t = 100)]
    rss_interval_ms: u64,
    /// Append the relay runs' RSS samples to this CSV file
    /// (`run,elapsed_s,progress,rss_kib`).
    #[arg(long)]
    rss_csv: Option<PathBuf>,
    /// Give up on a drain after this many seconds.
    #[arg(long, default_value_t = 1800)]
    timeout_secs: u64,
    #[arg(long, default_value = "target/release/relay")]
    relay_bin: PathBuf,
    /// Extra option for the relay runs, repeatable
    /// (e.g. --relay-arg=--max-in-flight-bytes=8388608).
    #[arg(long = "relay-arg", allow_hyphen_values = true)]
    relay_args: Vec<String>,
    #[arg(long, default_value = "/usr/lib/postgresql/15/bin/pg_recvlogical")]
    pg_recvlogical: PathBuf,
    /// Keep the benchmark database and slots afterwards.
    #[arg(long)]
    keep: bool,
}

impl Args {
    fn runs(&self) -> HashSet<RunKind> {
        let mut out = HashSet::new();
        for r in &self.runs {
            match r {
                RunKind::Bare => {
                    out.insert(RunKind::BareMock);
                    out.insert(RunKind::BareBroker);
                }
                other => {
                    out.insert(*other);
                }
            }
        }
        out
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }
}

/// What one drain took.
struct Run {
    name: &'static str,
    seconds: f64,
    /// CPU time (user + system) it used: its cost per event, which other
    /// load on the machine disturbs less than wall time.
    cpu_seconds: f64,
    /// CPU time of the Postgres walsender decoding the slot for this drain
    /// (when it is near the drain's wall time, Postgres is the bound).
    walsender_cpu_seconds: Option<f64>,
    /// Relay: process start to the first acknowledged record (start-up:
    /// connecting, reading the slot and topic state). Bare producer: its
    /// untimed warm-up (creation to the warm-up record's ack).
    first_ack_s: Option<f64>,
    /// Peak RSS of the draining process (none for the in-process producer).
    peak_rss_kib: Option<u64>,
    /// The relay's RSS along the drain.
    rss: Option<RssSeries>,
}

/// Samples a child process's peak RSS and CPU time from /proc.
#[derive(Default)]
struct Sampler {
    peak_rss_kib: u64,
    cpu_seconds: f64,
}

impl Sampler {
    fn sample(&mut self, pid: u32) {
        if let Some(rss) = peak_rss_kib(pid) {
            self.peak_rss_kib = self.peak_rss_kib.max(rss);
        }
        if let Some(cpu) = cpu_seconds(pid) {
            self.cpu_seconds = cpu;
        }
    }
}

/// Samples the CPU time of the walsender process serving a slot (same
/// machine: its pid is `active_pid` in `pg_replication_slots`).
#[derive(Default)]
struct WalSender {
    pid: Option<u32>,
    cpu_seconds: Option<f64>,
}

impl WalSender {
    async fn sample(&mut self, db: &Client, slot: &str) {
        if self.pid.is_none() {
            self.pid = devstack::bench::walsender_pid(db, slot).await;
        }
        if let Some(cpu) = self.pid.and_then(cpu_seconds) {
            self.cpu_seconds = Some(cpu);
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let db = ScratchDb::create(&args.stack.database_url, "bench").await?;
    let result = bench(&args, &db.url, &db.name).await;
    if !args.keep {
        let slots = slot_names(&db.name);
        db.drop_with_slots(&slots).await;
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
    let runs = args.runs();
    devstack::migrations::apply(url).await?;
    let db = connect(url).await?;
    let [kafka_slot, mock_slot, recv_slot] = slot_names(db_name);
    for (slot, kind) in [
        (&kafka_slot, RunKind::Broker),
        (&mock_slot, RunKind::Mock),
        (&recv_slot, RunKind::Recv),
    ] {
        if runs.contains(&kind) {
            db.execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[slot],
            )
            .await?;
        }
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
    // Settle before the first drain, so autovacuum does not pick the fresh
    // rows up in the middle of it (its WAL comes after END: no drain waits
    // for it).
    db.batch_execute("VACUUM ANALYZE outbox").await?;
    db.batch_execute("CHECKPOINT").await?;

    let mut results: Vec<Run> = Vec::new();
    if runs.contains(&RunKind::Recv) {
        results.push(run_pg_recvlogical(args, &db, url, &recv_slot, &end_lsn).await?);
    }
    // The relay's topic on the stack broker, whose records the bare
    // producer sends again. (The mock cluster keeps only the last few MB of
    // each partition, so it cannot give them back.)
    let mut relay_topic_on_broker = None;
    if runs.contains(&RunKind::Mock) {
        let topic = unique_name("bench-topic");
        let mock = rdkafka::mocking::MockCluster::new(3)?;
        mock.create_topic(&topic, args.partitions, 3)?;
        let run = run_relay(
            args,
            &db,
            url,
            &mock_slot,
            &topic,
            &mock.bootstrap_servers(),
            "relay → mock cluster (acked)",
        )
        .await?;
        results.push(run);
    }
    if runs.contains(&RunKind::Broker) {
        let topic = unique_name("bench-topic");
        devstack::kafka::create_topic(&args.stack.kafka_bootstrap_servers, &topic, args.partitions)
            .await?;
        let run = run_relay(
            args,
            &db,
            url,
            &kafka_slot,
            &topic,
            &args.stack.kafka_bootstrap_servers,
            "relay → stack broker (acked)",
        )
        .await?;
        results.push(run);
        relay_topic_on_broker = Some(topic);
    }
    let mut records: Option<Arc<Vec<Record>>> = None;
    if runs.contains(&RunKind::BareMock) || runs.contains(&RunKind::BareBroker) {
        let read = match &relay_topic_on_broker {
            Some(topic) => read_back(&args.stack.kafka_bootstrap_servers, topic, args.events)
                .await
                .map_err(|e| println!("{e:#}; building the records from the table instead"))
                .ok(),
            None => None,
        };
        records = Some(match read {
            Some(r) => r,
            None => records_from_db(url, args).await?,
        });
    }
    if let (Some(records), true) = (&records, runs.contains(&RunKind::BareMock)) {
        let topic = unique_name("bench-bare");
        let mock = rdkafka::mocking::MockCluster::new(3)?;
        mock.create_topic(&topic, args.partitions, 3)?;
        let run = run_bare(
            &mock.bootstrap_servers(),
            &topic,
            records.clone(),
            args.timeout(),
            "bare producer → mock cluster (acked)",
        )
        .await?;
        results.push(run);
    }
    if let (Some(records), true) = (&records, runs.contains(&RunKind::BareBroker)) {
        let topic = unique_name("bench-bare");
        devstack::kafka::create_topic(&args.stack.kafka_bootstrap_servers, &topic, args.partitions)
            .await?;
        let run = run_bare(
            &args.stack.kafka_bootstrap_servers,
            &topic,
            records.clone(),
            args.timeout(),
            "bare producer → stack broker (acked)",
        )
        .await?;
        results.push(run);
    }
    if let Some(r) = &records {
        let bytes: usize = r
            .iter()
            .map(|r| {
                r.value.as_ref().map_or(0, String::len)
                    + r.key.as_ref().map_or(0, String::len)
                    + r.headers
                        .iter()
                        .map(|(k, v)| k.len() + v.len())
                        .sum::<usize>()
            })
            .sum();
        println!(
            "bare producer records: {} (key + value + headers: {:.0} bytes on average)",
            r.len(),
            bytes as f64 / r.len().max(1) as f64
        );
    }

    print_report(args, wal_bytes, &results)
}

fn print_report(args: &Args, wal_bytes: i64, results: &[Run]) -> anyhow::Result<()> {
    let n = args.events as f64;
    let rate = |r: &Run| n / r.seconds;
    let find = |name: &str| results.iter().find(|r| r.name.starts_with(name));
    println!();
    println!(
        "| drain of {} events ({} per txn) | seconds | events/s | WAL MiB/s | CPU s | CPU µs/event | walsender CPU s | peak RSS MiB | first ack s |",
        args.events, args.rows_per_txn
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in results {
        let wal = if r.name.starts_with("bare") {
            "—".to_owned()
        } else {
            format!("{:.1}", wal_bytes as f64 / 1048576.0 / r.seconds)
        };
        let rss = r.peak_rss_kib.map_or("— (in-process)".to_owned(), |k| {
            format!("{:.1}", k as f64 / 1024.0)
        });
        let first = r.first_ack_s.map_or("—".to_owned(), |s| {
            if r.name.starts_with("bare") {
                format!("({s:.2})")
            } else {
                format!("{s:.2}")
            }
        });
        let walsender = r
            .walsender_cpu_seconds
            .map_or("—".to_owned(), |c| format!("{c:.2}"));
        println!(
            "| {} | {:.2} | {:.0} | {wal} | {:.2} | {:.1} | {walsender} | {rss} | {first} |",
            r.name,
            r.seconds,
            rate(r),
            r.cpu_seconds,
            r.cpu_seconds * 1e6 / n,
        );
    }
    println!(
        "(seconds: pg_recvlogical to its exit at the backlog's end LSN; relay from process start to the \
         last ack; bare producer from its first send to the last ack, after an untimed warm-up shown in parentheses; \
         walsender CPU: the Postgres process decoding the slot for that drain)"
    );
    println!();

    let recv = find("pg_recvlogical").map(rate);
    for (target, relay_name, bare_name) in [
        ("mock cluster", "relay → mock", "bare producer → mock"),
        ("stack broker", "relay → stack", "bare producer → stack"),
    ] {
        let Some(relay) = find(relay_name).map(rate) else {
            continue;
        };
        let bare = find(bare_name).map(rate);
        let ratio =
            |b: Option<f64>| b.map_or("not run".to_owned(), |b| format!("{:.2}", relay / b));
        println!(
            "relay → {target}: relay / pg_recvlogical {}, relay / bare producer {}",
            ratio(recv),
            ratio(bare)
        );
        println!("  verdict: {}", verdict(relay, recv, bare));
        let busy = |r: Option<&Run>| {
            r.and_then(|r| r.walsender_cpu_seconds.map(|c| c / r.seconds))
                .map_or("—".to_owned(), |b| format!("{:.0}%", b * 100.0))
        };
        println!(
            "  walsender CPU / wall time: {} during the relay's drain, {} during pg_recvlogical's",
            busy(find(relay_name)),
            busy(find("pg_recvlogical"))
        );
    }

    let relay_runs: Vec<&Run> = results.iter().filter(|r| r.rss.is_some()).collect();
    if !relay_runs.is_empty() {
        println!();
        println!(
            "relay RSS (VmRSS, MiB) by share of records acked, sampled every {} ms:",
            args.rss_interval_ms
        );
        println!("| relay run | samples | before 1st ack | 10% | 25% | 50% | 75% | 100% | min–max from 10% | peak (VmHWM) |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let total = args.events as u64;
        let mib =
            |k: Option<u64>| k.map_or("—".to_owned(), |k| format!("{:.1}", k as f64 / 1024.0));
        for r in relay_runs {
            let Some(s) = &r.rss else { continue };
            let range = s
                .range_from(0.10, total)
                .map_or("—".to_owned(), |(lo, hi)| {
                    format!("{:.1}–{:.1}", lo as f64 / 1024.0, hi as f64 / 1024.0)
                });
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {range} | {} |",
                r.name,
                s.samples.len(),
                mib(s.max_before_first_ack()),
                mib(s.at_progress(0.10, total)),
                mib(s.at_progress(0.25, total)),
                mib(s.at_progress(0.50, total)),
                mib(s.at_progress(0.75, total)),
                mib(s.at_progress(1.0, total)),
                mib(r.peak_rss_kib),
            );
            if let Some(path) = &args.rss_csv {
                s.append_csv(path, r.name)?;
            }
        }
        if let Some(path) = &args.rss_csv {
            println!("RSS samples appended to {}", path.display());
        }
    }
    Ok(())
}

/// Which ceiling the relay hit: the lower of the two it was measured
/// against, when it came within 10 % of it; otherwise the relay itself.
fn verdict(relay: f64, recv: Option<f64>, bare: Option<f64>) -> String {
    let mut ceilings: Vec<(&str, &str, f64)> = Vec::new();
    if let Some(r) = recv {
        ceilings.push(("pg_recvlogical", "Postgres (WAL decoding and sending)", r));
    }
    if let Some(b) = bare {
        ceilings.push(("the bare producer", "the broker (and librdkafka)", b));
    }
    ceilings.sort_by(|a, b| a.2.total_cmp(&b.2));
    let Some(&(name, who, rate)) = ceilings.first() else {
        return "no baseline measured (add recv and/or bare to --runs)".to_owned();
    };
    let ratio = relay / rate;
    if ratio >= 0.9 {
        let how = if ratio >= 1.0 {
            "at least as fast as"
        } else {
            "within 10% of"
        };
        let other = ceilings
            .get(1)
            .map(|(n, _, r)| format!(", the lower ceiling; {:.2} of {n}", relay / r))
            .unwrap_or_default();
        format!("relay {how} {name} ({ratio:.2}{other}): {who} bounds it")
    } else if ceilings.len() == 2 {
        format!(
            "below both (relay {:.2} of {}, {:.2} of {}): the relay itself is the bottleneck",
            relay / ceilings[0].2,
            ceilings[0].0,
            relay / ceilings[1].2,
            ceilings[1].0
        )
    } else {
        format!(
            "relay below {name} ({ratio:.2}); the other ceiling was not measured, so either the relay or that side bounds it"
        )
    }
}

/// Writes the backlog over up to 4 connections, without waiting for WAL
/// flush; each connection writes whole transactions of `rows_per_txn` rows
/// (one connection when a single transaction holds the whole backlog).
async fn run_pg_recvlogical(
    args: &Args,
    db: &Client,
    url: &str,
    slot: &str,
    end_lsn: &str,
) -> anyhow::Result<Run> {
    let started = Instant::now();
    let mut child =
        devstack::bench::spawn_pg_recvlogical(&args.pg_recvlogical, url, slot, end_lsn)?;
    let pid = child.id().context("pg_recvlogical pid")?;
    let mut sampler = Sampler::default();
    let mut walsender = WalSender::default();
    let status = loop {
        sampler.sample(pid);
        walsender.sample(db, slot).await;
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > args.timeout() {
            bail!("pg_recvlogical did not finish within {:?}", args.timeout());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let seconds = started.elapsed().as_secs_f64();
    if !status.success() {
        bail!("pg_recvlogical failed: {status}");
    }
    println!("pg_recvlogical: drained in {seconds:.2}s");
    Ok(Run {
        name: "pg_recvlogical → /dev/null",
        seconds,
        cpu_seconds: sampler.cpu_seconds,
        walsender_cpu_seconds: walsender.cpu_seconds,
        first_ack_s: None,
        peak_rss_kib: Some(sampler.peak_rss_kib),
        rss: None,
    })
}

/// Runs the release relay until Kafka acknowledged all N records, sampling
/// its CPU, peak RSS and (every --rss-interval-ms) VmRSS with progress.
async fn run_relay(
    args: &Args,
    db: &Client,
    url: &str,
    slot: &str,
    topic: &str,
    bootstrap: &str,
    name: &'static str,
) -> anyhow::Result<Run> {
    let extra: Vec<&str> = args.relay_args.iter().map(String::as_str).collect();
    let mut relay = RelayProcess::spawn(&args.relay_bin, url, slot, topic, bootstrap, &extra)?;
    let pid = relay.pid;
    let total = args.events as u64;
    let rss_every = Duration::from_millis(args.rss_interval_ms.max(1));
    let mut sampler = Sampler::default();
    let mut walsender = WalSender::default();
    let mut series = RssSeries::default();
    let mut acked = 0u64;
    let mut first_ack_s = None;
    let mut last_poll = Instant::now() - Duration::from_secs(1);
    let mut last_rss = Instant::now() - Duration::from_secs(1);
    let seconds = loop {
        sampler.sample(pid);
        walsender.sample(db, slot).await;
        relay.check_running()?;
        if last_poll.elapsed() >= Duration::from_millis(10) {
            last_poll = Instant::now();
            if let Some(n) = relay.events_total(topic).await {
                acked = n;
            }
            if acked > 0 && first_ack_s.is_none() {
                first_ack_s = Some(relay.started.elapsed().as_secs_f64());
            }
            if acked >= total {
                break relay.started.elapsed().as_secs_f64();
            }
        }
        if last_rss.elapsed() >= rss_every {
            last_rss = Instant::now();
            if let Some(rss) = rss_kib(pid) {
                series.push(relay.started.elapsed().as_secs_f64(), acked, rss);
            }
        }
        if relay.started.elapsed() > args.timeout() {
            bail!(
                "{name}: {acked} of {total} records acknowledged after {:?}",
                args.timeout()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    sampler.sample(pid);
    walsender.sample(db, slot).await;
    if let Some(rss) = rss_kib(pid) {
        series.push(seconds, acked, rss);
    }
    relay.kill().await?;
    println!("{name}: drained in {seconds:.2}s");
    Ok(Run {
        name,
        seconds,
        cpu_seconds: sampler.cpu_seconds,
        walsender_cpu_seconds: walsender.cpu_seconds,
        first_ack_s,
        peak_rss_kib: Some(sampler.peak_rss_kib),
        rss: Some(series),
    })
}

/// Reads the `n` records the relay wrote to `topic` (on any broker), in
/// the order the relay produced them (commit LSN, then `seq`).
async fn read_back(bootstrap: &str, topic: &str, n: usize) -> anyhow::Result<Arc<Vec<Record>>> {
    let t = Instant::now();
    let reader = TopicReader::new(bootstrap, topic, true)?;
    let mut records = reader
        .read_at_least(n, Duration::from_secs(300), Duration::from_secs(2))
        .await?;
    if records.len() < n {
        bail!(
            "read back only {} of {n} records from {topic}",
            records.len()
        );
    }
    let position = |r: &Record| {
        let lsn = r.header(header::LSN).and_then(parse_lsn).unwrap_or(0);
        let seq: u64 = r
            .header(header::SEQ)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        (lsn, seq)
    };
    records.sort_by_key(position);
    records.truncate(n);
    println!(
        "read back {} records from the relay's topic in {:.1}s (for the bare producer)",
        records.len(),
        t.elapsed().as_secs_f64()
    );
    Ok(Arc::new(records))
}

fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// Without a relay run to read back from: records of the relay's shape
/// built from the table (value: the row as JSON; headers as the relay sets
/// them, with the backlog's end LSN and the current time standing in for
/// each transaction's commit LSN and time; partition as the relay picks it).
async fn records_from_db(url: &str, args: &Args) -> anyhow::Result<Arc<Vec<Record>>> {
    let db = connect(url).await?;
    let lsn: String = db
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let now = chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string();
    let rows = db
        .query(
            "SELECT o.id::text, o.user_id::text, o.event_type, row_to_json(o)::text, o.xmin::text \
             FROM outbox o ORDER BY o.id",
            &[],
        )
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    let mut seq = 0u64;
    let mut last_xid = String::new();
    for row in rows {
        let id: String = row.get(0);
        let key: Option<String> = row.get(1);
        let event_type: Option<String> = row.get(2);
        let xid: String = row.get(4);
        if xid == last_xid {
            seq += 1;
        } else {
            seq = 0;
            last_xid.clone_from(&xid);
        }
        let partition = relay::dedupe::partition_for(
            key.as_deref().unwrap_or(id.as_str()).as_bytes(),
            args.partitions,
        );
        let mut headers = vec![(header::EVENT_ID.to_owned(), id)];
        if let Some(t) = event_type {
            headers.push((header::EVENT_TYPE.to_owned(), t));
        }
        headers.push((header::LSN.to_owned(), lsn.clone()));
        headers.push((header::XID.to_owned(), xid));
        headers.push((header::COMMIT_TS.to_owned(), now.clone()));
        headers.push((header::SEQ.to_owned(), seq.to_string()));
        out.push(Record {
            partition,
            offset: 0,
            timestamp_ms: None,
            key,
            headers,
            value: Some(row.get(3)),
        });
    }
    println!(
        "built {} records from the table (no relay run to read back from)",
        out.len()
    );
    Ok(Arc::new(out))
}

/// The broker's ceiling: a bare rdkafka producer with the relay's settings
/// sends `records` (same key, value, headers and partition as the relay's)
/// to `topic` as fast as librdkafka takes them, timed from creating the
/// producer to the last acknowledgement.
async fn run_bare(
    bootstrap: &str,
    topic: &str,
    records: Arc<Vec<Record>>,
    timeout: Duration,
    name: &'static str,
) -> anyhow::Result<Run> {
    let bootstrap = bootstrap.to_owned();
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let bare = devstack::bench::bare_produce(&bootstrap, &topic, &records, timeout)
            .with_context(|| name)?;
        println!("{name}: sent in {:.2}s", bare.seconds);
        Ok(Run {
            name,
            seconds: bare.seconds,
            cpu_seconds: bare.cpu_seconds,
            walsender_cpu_seconds: None,
            first_ack_s: Some(bare.first_ack_s),
            peak_rss_kib: None,
            rss: None,
        })
    })
    .await?
}
