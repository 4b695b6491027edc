//! Latency: loadgen's open-loop sql mode (one-row transactions) at each
//! rate of `--rates`, one system at a time, each record matched at the
//! consumer to the INSERT that caused it.
//!
//! ```text
//!  loadgen ──INSERT──▶ outbox ─┬─ relay    ─▶ <db>-relay   ─┐
//!                              └─ Debezium ─▶ <db>.loadgen ─┴─▶ loadgen's consumer
//! ```
//!
//! The baseline is Postgres alone: `pg_recvlogical` on a `test_decoding`
//! slot with commit timestamps, under the same load (loadgen writing
//! only), commit→received for each transaction — the floor this machine's
//! Postgres sets for any logical-decoding consumer.
//!
//! Commit→Kafka is measured at loadgen's consumer (the topics keep
//! CreateTime, so it ends at arrival): from the relay's `commit_ts` header
//! (the commit time Postgres wrote in the WAL) and from Debezium's
//! `created_at` header (the outbox column, `now()`: the transaction's start,
//! a little before its commit, placed by the Event Router). Both are
//! Postgres's clock against the same machine's clock at arrival. Beside it,
//! loadgen's own end-to-end (the INSERT's intended start to arrival, one
//! clock, the same definition for both) and the relay's commit→ack p99
//! from its `relay_commit_to_ack_seconds` histogram.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use devstack::bench::{cpu_seconds, http_get, RelayProcess, ScratchDb};
use devstack::testing::connect;
use outbox_record::header;

use crate::connect::{tempdir, Connect, Mode};
use crate::Args;

/// One system at one rate.
pub struct Latency {
    pub system: &'static str,
    pub rate: f64,
    pub achieved: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// loadgen's end_to_end p99 (intended start → arrival).
    pub end_to_end_p99_ms: f64,
    /// The relay's own commit→ack p99, as the upper bound of its
    /// histogram bucket (relay only).
    pub ack_p99_le_ms: Option<f64>,
    pub cpu_s: f64,
    pub matched: u64,
    pub unmatched: u64,
    pub duplicates: u64,
}

/// Runs every rate against `pg_recvlogical`, the relay, then Debezium.
pub async fn run(
    args: &Args,
    db: &ScratchDb,
    slots: &[String; 3],
    topics: &crate::Topics,
) -> anyhow::Result<Vec<Latency>> {
    let mut out = Vec::new();

    // The third slot becomes the baseline's, with commit timestamps.
    let client = connect(&db.url).await?;
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&slots[2]])
        .await?;
    client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'test_decoding')",
            &[&slots[2]],
        )
        .await?;
    for &rate in &args.rates {
        let row = recvlogical(args, db, &slots[2], rate).await?;
        println!("pg_recvlogical at {rate}/s: p99 {:.2} ms", row.p99_ms);
        out.push(row);
    }

    // Each system starts where the phase before it ended: nothing to
    // catch up.
    let advance = "SELECT pg_replication_slot_advance($1, pg_current_wal_lsn())";
    client.execute(advance, &[&slots[0]]).await?;
    let mut relay = crate::spawn_relay(args, db, &slots[0], &topics.relay)?;
    relay.wait_connected(Duration::from_secs(60)).await?;
    for &rate in &args.rates {
        let cpu0 = cpu_seconds(relay.pid).unwrap_or(0.0);
        let acks0 = ack_histogram(&relay).await;
        let report = loadgen(
            args,
            db,
            &topics.relay,
            rate,
            (header::EVENT_ID, header::COMMIT_TS),
        )
        .await?;
        relay.check_running()?;
        let acks = ack_histogram(&relay).await;
        let cpu = cpu_seconds(relay.pid).unwrap_or(0.0) - cpu0;
        let mut row = latency_row("relay", rate, &report, cpu)?;
        row.ack_p99_le_ms = p99_bucket(&acks0, &acks).map(|s| s * 1000.0);
        println!("relay at {rate}/s: p99 {:.2} ms", row.p99_ms);
        out.push(row);
    }
    relay.kill().await?;

    client.execute(advance, &[&slots[1]]).await?;
    let dir = tempdir(&format!("{}-latency", db.name))?;
    let mut connect = Connect::spawn(args, db, &slots[1], &dir, Mode::Standalone)?;
    connect.wait_running(Duration::from_secs(120)).await?;
    for &rate in &args.rates {
        let cpu0 = cpu_seconds(connect.pid).unwrap_or(0.0);
        let report = loadgen(args, db, &topics.loadgen, rate, ("id", "created_at")).await;
        let report = report.with_context(|| {
            format!(
                "loadgen against Debezium (Connect's log: {})",
                dir.join("connect.log").display()
            )
        })?;
        let cpu = cpu_seconds(connect.pid).unwrap_or(0.0) - cpu0;
        let row = latency_row("debezium", rate, &report, cpu)?;
        println!("debezium at {rate}/s: p99 {:.2} ms", row.p99_ms);
        out.push(row);
    }
    connect.kill().await;
    Ok(out)
}

/// One loadgen run (warm-up, then `--latency-duration` at `rate`); its JSON
/// report. loadgen exits non-zero when it finds a problem (a record
/// missing, say): the report is read all the same and the problem shows in
/// the table.
async fn loadgen(
    args: &Args,
    db: &ScratchDb,
    topic: &str,
    rate: f64,
    (event_id, commit_time): (&str, &str),
) -> anyhow::Result<serde_json::Value> {
    let json = std::env::temp_dir().join(format!("vs-debezium-{}-{topic}-{rate}.json", db.name));
    let _ = std::fs::remove_file(&json);
    let status = tokio::process::Command::new(&args.loadgen_bin)
        .args(["--mode", "sql", "--database-url", &db.url])
        .args([
            "--kafka-bootstrap-servers",
            &args.stack.kafka_bootstrap_servers,
        ])
        .args(["--topic", topic, "--rate", &rate.to_string()])
        .args(["--warmup", &millis(args.latency_warmup)])
        .args(["--duration", &millis(args.latency_duration)])
        .args([
            "--event-id-header",
            event_id,
            "--commit-time-header",
            commit_time,
        ])
        .args(["--drain-timeout", "15s", "--quiet"])
        .arg("--json")
        .arg(&json)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .status()
        .await
        .with_context(|| format!("running {}", args.loadgen_bin.display()))?;
    read_report(&json).with_context(|| format!("loadgen ({status}) wrote no report"))
}

/// `pg_recvlogical` printing each transaction's commit time while loadgen
/// writes at `rate` (no Kafka): commit→received, for transactions that
/// committed after the warm-up.
async fn recvlogical(
    args: &Args,
    db: &ScratchDb,
    slot: &str,
    rate: f64,
) -> anyhow::Result<Latency> {
    use tokio::io::AsyncBufReadExt;

    let mut child = tokio::process::Command::new(&args.pg_recvlogical)
        .args([
            "--dbname", &db.url, "--slot", slot, "--start", "--file", "-",
        ])
        .args(["-o", "include-timestamp=on", "-o", "skip-empty-xacts=on"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", args.pg_recvlogical.display()))?;
    let pid = child.id().context("pg_recvlogical pid")?;
    let stdout = child.stdout.take().context("pg_recvlogical stdout")?;
    let measured_from = chrono::Utc::now() + args.latency_warmup;
    let reader = tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let mut ms = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            let now = chrono::Utc::now();
            // "COMMIT 1234 (at 2026-12-01 05:16:41.007875+00)"
            let Some(at) = line
                .strip_prefix("COMMIT ")
                .and_then(|l| l.split_once("(at "))
                .map(|(_, t)| t.trim_end_matches(')'))
            else {
                continue;
            };
            let Ok(commit) = chrono::DateTime::parse_from_str(at, "%Y-%m-%d %H:%M:%S%.f%#z") else {
                continue;
            };
            if commit >= measured_from {
                ms.push((now - commit.to_utc()).num_microseconds().unwrap_or(0) as f64 / 1000.0);
            }
        }
        ms
    });
    let cpu0 = cpu_seconds(pid).unwrap_or(0.0);
    let status = tokio::process::Command::new(&args.loadgen_bin)
        .args([
            "--mode",
            "sql",
            "--database-url",
            &db.url,
            "--no-kafka",
            "--quiet",
        ])
        .args(["--rate", &rate.to_string()])
        .args(["--warmup", &millis(args.latency_warmup)])
        .args(["--duration", &millis(args.latency_duration)])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .status()
        .await
        .with_context(|| format!("running {}", args.loadgen_bin.display()))?;
    // What is still on its way arrives well within this.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu_s = cpu_seconds(pid).unwrap_or(0.0) - cpu0;
    let _ = child.start_kill();
    let _ = child.wait().await;
    let mut ms = reader.await?;
    anyhow::ensure!(
        !ms.is_empty(),
        "pg_recvlogical received no transaction (loadgen: {status})"
    );
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() as f64 * q) as usize).min(ms.len() - 1)];
    Ok(Latency {
        system: "recvlogical",
        rate,
        achieved: ms.len() as f64 / args.latency_duration.as_secs_f64(),
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        p999_ms: at(0.999),
        max_ms: ms[ms.len() - 1],
        end_to_end_p99_ms: f64::NAN,
        ack_p99_le_ms: None,
        cpu_s,
        matched: ms.len() as u64,
        unmatched: 0,
        duplicates: 0,
    })
}

/// A duration as loadgen's options take it.
pub fn millis(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

fn read_report(path: &Path) -> anyhow::Result<serde_json::Value> {
    let text = std::fs::read_to_string(path)?;
    Ok(serde_json::from_str(&text)?)
}

fn latency_row(
    system: &'static str,
    rate: f64,
    report: &serde_json::Value,
    cpu_s: f64,
) -> anyhow::Result<Latency> {
    let f = |path: &str| {
        report
            .pointer(path)
            .and_then(serde_json::Value::as_f64)
            .with_context(|| format!("loadgen's report has no {path}"))
    };
    let n = |path: &str| f(path).map(|v| v as u64);
    Ok(Latency {
        system,
        rate,
        achieved: f("/requests/achieved_rate")?,
        p50_ms: f("/stages/commit_to_kafka/p50_ms")?,
        p99_ms: f("/stages/commit_to_kafka/p99_ms")?,
        p999_ms: f("/stages/commit_to_kafka/p999_ms")?,
        max_ms: f("/stages/commit_to_kafka/max_ms")?,
        end_to_end_p99_ms: f("/stages/end_to_end/p99_ms")?,
        ack_p99_le_ms: None,
        cpu_s,
        matched: n("/kafka/matched")?,
        unmatched: n("/kafka/unmatched")?,
        duplicates: n("/kafka/duplicates")?,
    })
}

/// `relay_commit_to_ack_seconds` buckets: (upper bound in seconds,
/// cumulative count).
async fn ack_histogram(relay: &RelayProcess) -> Vec<(f64, f64)> {
    let body = http_get(relay.addr, "/metrics").await.unwrap_or_default();
    body.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("relay_commit_to_ack_seconds_bucket{le=\"")?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect()
}

/// The upper bound of the bucket holding the 99th percentile of what was
/// observed between two scrapes.
fn p99_bucket(before: &[(f64, f64)], after: &[(f64, f64)]) -> Option<f64> {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|&(le, n)| {
            let n0 = before
                .iter()
                .find(|(l, _)| *l == le)
                .map_or(0.0, |(_, n)| *n);
            (le, n - n0)
        })
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    delta
        .iter()
        .find(|(_, n)| *n >= 0.99 * total)
        .map(|(le, _)| *le)
}
