//! Benchmark (#16): the relay's backfill of a table of a million rows next
//! to a plain `COPY (SELECT …) TO STDOUT` of the same rows, run side by
//! side in rounds on the stack, and a bare producer sending the backfill's
//! records into the same broker (its ceiling). Prints each run's seconds
//! and rows/s and the ratios backfill / COPY (the goal is ≥ 0.8) and
//! backfill / bare producer.
//!
//! ```text
//!   scratch database ─ migrations ─ N OrderCreated rows (write_backlog)
//!     ├─ copy:     COPY (SELECT id, <every column>::text FROM outbox ORDER BY id) TO STDOUT
//!     │            read to the end by this process                 (timed: query to last byte)
//!     └─ backfill: relay --backfill all --slot <fresh> --topic <fresh, the stack topic's partitions>
//!                  (release binary, timed from process start until /status says finished:
//!                   start-up, the slot and its snapshot, every record acknowledged by Kafka)
//!     └─ bare:     the backfill's records (read back once) sent by a bare producer configured
//!                  as the relay's sink to the same partitions of a fresh topic (timed: first
//!                  send to last ack, after an untimed warm-up)
//! ```
//!
//! The COPY selects what the backfill reads (the select list the relay
//! builds, `republish::OutboxColumns`: the id and every column as text, in
//! id order); it stops at Postgres's side of the work, the backfill goes on
//! to build the records and have Kafka acknowledge them. Each round drops
//! the backfill's slot and uses a new topic, so every run starts alike.
//!
//! ```text
//! scripts/bench backfill      # the scripts/up stack, 1,000,000 rows, 3 rounds
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use devstack::bench::{
    bare_produce, cpu_seconds, http_get, peak_rss_kib, RelayProcess, ScratchDb, StackArgs,
};
use devstack::kafka::{Record, TopicReader};
use devstack::testing::{connect, unique_name};
use futures_util::StreamExt;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    stack: StackArgs,
    /// Rows in the outbox table.
    #[arg(long, default_value_t = 1_000_000)]
    rows: usize,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The relay binary (release).
    #[arg(long, default_value = "target/release/relay")]
    relay_bin: std::path::PathBuf,
    /// The stack's topic, whose partition count the benchmark's topics take.
    #[arg(long, default_value = "microshop.order-outbox")]
    stack_topic: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let db = ScratchDb::create(&args.stack.database_url, "bench_backfill").await?;
    let slots: Vec<String> = (0..args.rounds)
        .map(|r| format!("{}_backfill_{r}", db.name))
        .collect();
    let result = bench(&args, &db.url, &slots).await;
    db.drop_with_slots(&slots).await;
    result
}

async fn bench(args: &Args, url: &str, slots: &[String]) -> anyhow::Result<()> {
    let bootstrap = &args.stack.kafka_bootstrap_servers;
    let partitions = devstack::kafka::partition_count(bootstrap, &args.stack_topic)
        .await
        .with_context(|| format!("reading the partitions of {}", args.stack_topic))?;
    devstack::migrations::apply(url).await?;
    let started = Instant::now();
    devstack::bench::write_backlog(url, args.rows, 10_000).await?;
    let db = connect(url).await?;
    db.batch_execute("VACUUM ANALYZE outbox").await?;
    println!(
        "{} rows written in {:.1} s; topic partitions {partitions} (as {})",
        args.rows,
        started.elapsed().as_secs_f64(),
        args.stack_topic
    );
    let select = select_list(&db).await?;
    println!(
        "\n  round  run       seconds    rows/s  relay CPU s  peak RSS MiB  backfill/COPY  backfill/bare"
    );
    let (mut ratios, mut bare_ratios) = (Vec::new(), Vec::new());
    let mut records: Option<Arc<Vec<Record>>> = None;
    for (round, slot) in slots.iter().enumerate() {
        let copy = copy_seconds(&db, &select).await?;
        println!(
            "  {round:>5}  copy     {copy:>8.2}  {:>8.0}",
            args.rows as f64 / copy
        );
        let topic = unique_name("bench-backfill");
        devstack::kafka::create_topic(bootstrap, &topic, partitions).await?;
        let (backfill, cpu, rss) = backfill_seconds(args, url, slot, &topic).await?;
        let ratio = copy / backfill;
        ratios.push(ratio);
        let records = match &records {
            Some(r) => r.clone(),
            None => records
                .insert(read_back(bootstrap, &topic, args.rows).await?)
                .clone(),
        };
        let bare_topic = unique_name("bench-backfill-bare");
        devstack::kafka::create_topic(bootstrap, &bare_topic, partitions).await?;
        let bare = {
            let bootstrap = bootstrap.clone();
            tokio::task::spawn_blocking(move || {
                bare_produce(&bootstrap, &bare_topic, &records, Duration::from_secs(600))
            })
            .await??
        };
        let bare_ratio = bare.seconds / backfill;
        bare_ratios.push(bare_ratio);
        println!(
            "  {round:>5}  backfill {backfill:>8.2}  {:>8.0}  {cpu:>11.2}  {rss:>12.1}  {ratio:>13.2}  {bare_ratio:>13.2}",
            args.rows as f64 / backfill
        );
        println!(
            "  {round:>5}  bare     {:>8.2}  {:>8.0}  {:>11.2}",
            bare.seconds,
            args.rows as f64 / bare.seconds,
            bare.cpu_seconds
        );
        // The killed relay's walsender lets go of the slot in a moment.
        let mut tries = 0;
        while let Err(e) = db
            .execute("SELECT pg_drop_replication_slot($1)", &[slot])
            .await
        {
            tries += 1;
            anyhow::ensure!(tries < 100, "dropping slot {slot}: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        db.execute("DELETE FROM outbox_relay_backfill", &[]).await?;
    }
    ratios.sort_by(f64::total_cmp);
    bare_ratios.sort_by(f64::total_cmp);
    println!(
        "\nmedians of {} rounds (rows per second): backfill / COPY {:.2} (goal ≥ 0.8); \
         backfill / bare producer {:.2}",
        ratios.len(),
        ratios[ratios.len() / 2],
        bare_ratios[bare_ratios.len() / 2]
    );
    Ok(())
}

/// The backfill's records, read back from its topic.
async fn read_back(bootstrap: &str, topic: &str, n: usize) -> anyhow::Result<Arc<Vec<Record>>> {
    let reader = TopicReader::new(bootstrap, topic, true)?;
    let records = reader
        .read_at_least(n, Duration::from_secs(300), Duration::from_secs(2))
        .await?;
    anyhow::ensure!(
        records.len() >= n,
        "read back {} of {n} records",
        records.len()
    );
    Ok(Arc::new(records))
}

/// The relay's select list: the id, then every column as text.
async fn select_list(db: &tokio_postgres::Client) -> anyhow::Result<String> {
    let columns = db
        .query(
            "SELECT attname::text FROM pg_attribute WHERE attrelid = 'outbox'::regclass \
              AND attnum > 0 AND NOT attisdropped AND attgenerated = '' ORDER BY attnum",
            &[],
        )
        .await?;
    Ok(std::iter::once("id".to_owned())
        .chain(
            columns
                .iter()
                .map(|c| format!("\"{}\"::text", c.get::<_, String>(0))),
        )
        .collect::<Vec<_>>()
        .join(", "))
}

/// Seconds to read every row through `COPY … TO STDOUT`.
async fn copy_seconds(db: &tokio_postgres::Client, select: &str) -> anyhow::Result<f64> {
    let started = Instant::now();
    let stream = db
        .copy_out(&format!(
            "COPY (SELECT {select} FROM outbox ORDER BY 1) TO STDOUT"
        ))
        .await?;
    futures_util::pin_mut!(stream);
    let mut bytes = 0usize;
    while let Some(chunk) = stream.next().await {
        bytes += chunk?.len();
    }
    anyhow::ensure!(bytes > 0, "COPY returned nothing");
    Ok(started.elapsed().as_secs_f64())
}

/// Seconds from the relay's start until its backfill finished, and the
/// relay's CPU seconds and peak RSS (MiB) by then.
async fn backfill_seconds(
    args: &Args,
    url: &str,
    slot: &str,
    topic: &str,
) -> anyhow::Result<(f64, f64, f64)> {
    let mut relay = RelayProcess::spawn(
        &args.relay_bin,
        url,
        slot,
        topic,
        &args.stack.kafka_bootstrap_servers,
        &["--backfill", "all"],
    )?;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        relay.check_running()?;
        anyhow::ensure!(
            Instant::now() < deadline,
            "the backfill did not finish in 10 minutes"
        );
        let response = http_get(relay.addr, "/status").await.unwrap_or_default();
        let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let parsed: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        if parsed["backfill"]["finished"] == true {
            let seconds = relay.started.elapsed().as_secs_f64();
            let delivered = parsed["backfill"]["delivered"].as_u64().unwrap_or(0);
            anyhow::ensure!(
                delivered == args.rows as u64,
                "the backfill delivered {delivered} of {} rows",
                args.rows
            );
            let cpu = cpu_seconds(relay.pid).unwrap_or(0.0);
            let rss = peak_rss_kib(relay.pid).unwrap_or(0) as f64 / 1024.0;
            relay.kill().await?;
            return Ok((seconds, cpu, rss));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
