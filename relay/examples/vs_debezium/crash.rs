//! Crash: under a steady open-loop load (loadgen's sql mode, one-row
//! transactions), each system is killed with SIGKILL `--kills` times and
//! restarted at once, one system at a time, each in a database of its own:
//! the relay, Debezium as Kafka Connect runs it by default (standalone,
//! at-least-once) and Debezium on distributed Connect with exactly-once
//! source support (`debezium-eos`).
//! Then its whole topic is read with a read_committed consumer and
//! compared with what Postgres committed.
//!
//! ```text
//!  loadgen ──▶ outbox ─┬─ system's slot (pgoutput) ─▶ system ─▶ topic ──▶ read_committed reader ─┐
//!                      └─ slot <db>_order (test_decoding, peeked) ─▶ ids in commit order ─────────┴─▶ compare
//! ```
//!
//! Counted per system: events lost (committed, never in the topic),
//! duplicated (records beyond the first for an id), out of per-key order (a
//! first record of an id that comes, in its key's partition, after a
//! record of a later commit of the same key) and records with no committed
//! row. The commit order is Postgres's own: `test_decoding` emits
//! transactions in commit order.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use devstack::bench::{RelayProcess, ScratchDb};
use devstack::kafka::TopicReader;
use devstack::testing::connect;
use outbox_record::header;

use crate::connect::{tempdir, Connect, Mode};
use crate::latency::millis;
use crate::Args;

/// What one system delivered across its kills.
pub struct Crash {
    pub system: &'static str,
    pub kills: usize,
    pub committed: usize,
    pub records: usize,
    pub lost: usize,
    pub duplicated: usize,
    pub out_of_order: usize,
    pub unknown: usize,
}

/// A system under test that can be killed and started again.
enum System {
    Relay(RelayProcess),
    Debezium(Connect),
}

/// Runs the crash scenario against the relay, then against Debezium.
pub async fn run(args: &Args) -> anyhow::Result<Vec<Crash>> {
    let mut out = Vec::new();
    for system in ["relay", "debezium", "debezium-eos"] {
        let db = ScratchDb::create(&args.stack.database_url, "vsdbz").await?;
        let slots = [format!("{}_sys", db.name), format!("{}_order", db.name)];
        let result = one_system(args, &db, system, &slots).await;
        db.drop_with_slots(&slots).await;
        let crash = result.with_context(|| format!("crash run of {system}"))?;
        println!(
            "{system} after {} kills: {} committed, {} lost, {} duplicated, {} out of order",
            crash.kills, crash.committed, crash.lost, crash.duplicated, crash.out_of_order
        );
        out.push(crash);
    }
    Ok(out)
}

async fn one_system(
    args: &Args,
    db: &ScratchDb,
    system: &'static str,
    [slot, order_slot]: &[String; 2],
) -> anyhow::Result<Crash> {
    devstack::migrations::apply(&db.url).await?;
    let client = connect(&db.url).await?;
    let bootstrap = &args.stack.kafka_bootstrap_servers;
    crate::connect::setup(&client, bootstrap).await?;
    client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[slot],
        )
        .await?;
    client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'test_decoding')",
            &[order_slot],
        )
        .await?;
    let (topic, id_header) = if system == "relay" {
        (format!("{}-relay", db.name), header::EVENT_ID)
    } else {
        (format!("{}.loadgen", db.name), "id")
    };
    devstack::kafka::create_topic(bootstrap, &topic, args.partitions).await?;

    let dir = tempdir(&format!("{}-crash", db.name))?;
    let start = || -> anyhow::Result<System> {
        Ok(if system == "relay" {
            System::Relay(crate::spawn_relay(args, db, slot, &topic)?)
        } else {
            let mode = if system == "debezium-eos" {
                Mode::ExactlyOnce
            } else {
                Mode::Standalone
            };
            System::Debezium(Connect::spawn(args, db, slot, &dir, mode)?)
        })
    };
    let mut running = start()?;
    wait_ready(&mut running).await?;

    let load = args.crash_duration;
    let mut loadgen = tokio::process::Command::new(&args.loadgen_bin)
        .args(["--mode", "sql", "--database-url", &db.url, "--no-kafka"])
        .args(["--rate", &args.crash_rate.to_string()])
        .args(["--duration", &millis(load), "--quiet"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("running {}", args.loadgen_bin.display()))?;
    let t0 = Instant::now();
    for k in 1..=args.kills {
        let at = load.mul_f64(k as f64 / (args.kills + 1) as f64);
        tokio::time::sleep(at.saturating_sub(t0.elapsed())).await;
        kill(running).await;
        running = start()?;
        wait_ready(&mut running).await?;
    }
    let status = loadgen.wait().await?;
    if !status.success() {
        eprintln!("loadgen ({status}) reported errors: some INSERTs failed; counted from the WAL all the same");
    }

    let committed = commit_order(db, order_slot).await?;
    let reader = TopicReader::with_isolation(bootstrap, &topic, true, true)?;
    let records = reader
        .read_at_least(committed.len(), args.timeout, Duration::from_secs(10))
        .await?;
    kill(running).await;
    if records.is_empty() && !committed.is_empty() {
        bail!("no record reached {topic} (see {})", dir.display());
    }

    let index: HashMap<i64, usize> = committed
        .iter()
        .enumerate()
        .map(|(i, &id)| (id, i))
        .collect();
    let mut seen = vec![false; committed.len()];
    let (mut duplicated, mut out_of_order, mut unknown) = (0, 0, 0);
    let mut latest: HashMap<(i32, Option<String>), usize> = HashMap::new();
    for r in &records {
        let Some(i) = r
            .header(id_header)
            .and_then(|v| v.trim().parse::<i64>().ok())
            .and_then(|id| index.get(&id).copied())
        else {
            unknown += 1;
            continue;
        };
        if std::mem::replace(&mut seen[i], true) {
            duplicated += 1;
            continue;
        }
        let last = latest.entry((r.partition, r.key.clone())).or_insert(i);
        if i < *last {
            out_of_order += 1;
        } else {
            *last = i;
        }
    }
    Ok(Crash {
        system,
        kills: args.kills,
        committed: committed.len(),
        records: records.len(),
        lost: seen.iter().filter(|s| !**s).count(),
        duplicated,
        out_of_order,
        unknown,
    })
}

async fn wait_ready(system: &mut System) -> anyhow::Result<()> {
    match system {
        System::Relay(r) => r.wait_connected(Duration::from_secs(60)).await,
        System::Debezium(c) => c.wait_running(Duration::from_secs(120)).await,
    }
}

/// SIGKILL, and reaped.
async fn kill(system: System) {
    match system {
        System::Relay(r) => {
            let _ = r.kill().await;
        }
        System::Debezium(c) => c.kill().await,
    }
}

/// The outbox ids Postgres committed, in commit order (read from a
/// `test_decoding` slot without consuming it).
async fn commit_order(db: &ScratchDb, slot: &str) -> anyhow::Result<Vec<i64>> {
    let client = connect(&db.url).await?;
    let rows = client
        .query(
            "SELECT data FROM pg_logical_slot_peek_changes($1, NULL, NULL) \
             WHERE data LIKE 'table public.outbox: INSERT:%'",
            &[&slot],
        )
        .await?;
    rows.iter()
        .map(|row| {
            let data: &str = row.get(0);
            data.split_once(" id[bigint]:")
                .and_then(|(_, rest)| rest.split(' ').next())
                .and_then(|id| id.parse().ok())
                .with_context(|| format!("no id in {data:?}"))
        })
        .collect()
}
