//! Benchmark (P5): the relay against the design it replaces, a polling
//! baseline faithful to Kafka Connect's JDBC source connector in
//! `incrementing` mode (the seed's `poll.interval.ms` of 5 s), fed by the
//! same concurrent writers. Prints, per path, rows written, delivered,
//! skipped (committed but never delivered) and duplicated, commit→consumed
//! latency percentiles, and the ratios baseline / relay.
//!
//! ```text
//!   W writers: BEGIN; INSERT INTO outbox … RETURNING id; hold 0–H ms; COMMIT ──▶ (id, commit returned at t₀)
//!        │ (ids are allocated at INSERT, so they commit out of order)
//!        ▼
//!   Postgres ──pgoutput slot──▶ relay (release binary) ───────────────▶ topic A ─┐
//!        └────every poll.interval: SELECT … WHERE id > last ORDER BY id──▶ topic B ─┤
//!             (the polling baseline, in this process; same producer settings)     │
//!                                                                                 ▼
//!   consumer (this process, fetch.wait.max.ms=5): first arrival of each id per topic at t₁
//!   latency = t₁ − t₀ (the same client-side commit time for both paths)
//! ```
//!
//! **Why the poller skips rows.** An identity value is taken when the row
//! is inserted, but becomes visible only when its transaction commits. With
//! concurrent writers, id 41 can still be uncommitted while id 42 has
//! committed; a poll in that window returns 42 and moves `last` to 42, so
//! `WHERE id > 42` never returns 41 once it commits. Kafka Connect's docs
//! and the connector's `incrementing` mode accept exactly this ("new rows
//! only, strictly increasing column"); the relay reads the commit-ordered
//! WAL instead, so it sees every committed row, whatever its id.
//!
//! **The baseline, checked against the connector's source**
//! (confluentinc/kafka-connect-jdbc, `JdbcSourceTask.poll`,
//! `TableQuerier`, `TimestampIncrementingTableQuerier`,
//! `TimestampIncrementingCriteria.incrementingWhereClause`):
//! - the query is `SELECT * FROM outbox WHERE id > ? ORDER BY id ASC`, with
//!   no LIMIT; `?` is the highest id extracted so far (the offset starts at
//!   -1), so it is one statement, one snapshot, per poll;
//! - `poll()` hands the worker at most `batch.max.rows` (100) records per
//!   call, reading on from the same open result set in the next call, with
//!   no wait, until it is exhausted;
//! - only when the result set is exhausted is the querier reset with
//!   `lastUpdate = now`; the next query runs once `lastUpdate +
//!   poll.interval.ms` has passed (the task sleeps in slices of at most
//!   100 ms until then);
//! - the worker hands each returned record to its producer asynchronously
//!   (delivery is not awaited before the next poll).
//!
//! `--query-style limit` runs the variant the issue describes instead:
//! `… ORDER BY id LIMIT 100`, re-queried at once while a query returns a
//! full batch (each query a fresh snapshot); it skips rows the same way.
//! The baseline lives here only, never in the product.
//!
//! One command (a running stack, e.g. `scripts/test --stack-only; source
//! .run/test/env`, and `cargo build --release -p relay --bin relay
//! --examples`):
//!
//! ```text
//! DATABASE_URL=$TEST_DATABASE_URL KAFKA_BOOTSTRAP_SERVERS=$TEST_KAFKA_BOOTSTRAP_SERVERS \
//!   target/release/examples/polling_baseline
//! ```

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use devstack::bench::{
    relay_like_producer_config, AckCounter, CountingContext, RelayProcess, ScratchDb, StackArgs,
};
use devstack::testing::{connect, redact, unique_name};
use hdrhistogram::Histogram;
use outbox_record::header;
use rand::Rng;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseRecord, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use relay::config::parse_duration;
use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum QueryStyle {
    /// As the JDBC source connector: one unbounded query per poll interval,
    /// read in batches of --batch-max-rows.
    Connector,
    /// `… LIMIT --batch-max-rows`, re-queried at once after a full batch.
    Limit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Broker {
    /// The stack's broker (--kafka-bootstrap-servers).
    Stack,
    /// librdkafka's mock cluster, in this process.
    Mock,
}

#[derive(Parser, Debug)]
#[command(
    about = "relay vs a JDBC-source-connector-style polling baseline under concurrent writers"
)]
struct Args {
    #[command(flatten)]
    stack: StackArgs,
    /// Where both paths produce.
    #[arg(long, value_enum, default_value_t = Broker::Stack)]
    broker: Broker,
    /// Concurrent writer connections.
    #[arg(long, default_value_t = 8)]
    writers: usize,
    /// Rows per second, all writers together (each writer keeps its share
    /// of the schedule, catching up when a transaction ran long).
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// How long the writers write.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// Each transaction stays open a uniformly random 0..=this many
    /// milliseconds between its INSERT and its COMMIT.
    #[arg(long, default_value_t = 50)]
    max_hold_ms: u64,
    /// The connector's poll.interval.ms.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    poll_interval: Duration,
    /// The connector's batch.max.rows.
    #[arg(long, default_value_t = 100)]
    batch_max_rows: usize,
    #[arg(long, value_enum, default_value_t = QueryStyle::Connector)]
    query_style: QueryStyle,
    /// Partitions of each topic.
    #[arg(long, default_value_t = 3)]
    partitions: i32,
    /// After the writers stop: how long to wait for both paths to deliver.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    drain_timeout: Duration,
    #[arg(long, default_value = "target/release/relay")]
    relay_bin: PathBuf,
    /// Keep the benchmark database and slot afterwards.
    #[arg(long)]
    keep: bool,
}

/// The two paths, as indexes into per-path arrays.
const RELAY: usize = 0;
const POLLER: usize = 1;

/// What the consumer saw, per path.
#[derive(Default)]
struct Seen {
    /// First arrival of each id.
    first: [HashMap<i64, Instant>; 2],
    /// Records read, duplicates included.
    records: [u64; 2],
    /// Records whose id could not be read.
    unreadable: [u64; 2],
}

/// One poll of the baseline: when it ran and how it moved `last`.
#[derive(Clone, Copy, Debug)]
struct PollCycle {
    started: Instant,
    last_before: i64,
    last_after: i64,
    rows: usize,
}

/// What the poller did.
#[derive(Default)]
struct PollerReport {
    cycles: Vec<PollCycle>,
    queries: u64,
    produced: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.writers == 0 || args.rate <= 0.0 || args.batch_max_rows == 0 {
        bail!("--writers, --rate and --batch-max-rows must be positive");
    }
    let db = ScratchDb::create(&args.stack.database_url, "pollbench").await?;
    let slot = format!("{}_relay", db.name);
    let result = bench(&args, &db.url, &db.name, &slot).await;
    if !args.keep {
        db.drop_with_slots(std::slice::from_ref(&slot)).await;
    }
    result
}

async fn bench(args: &Args, url: &str, db_name: &str, slot: &str) -> anyhow::Result<()> {
    devstack::migrations::apply(url).await?;
    let db = connect(url).await?;
    // The slot exists before the first write, so the relay sees every row.
    db.execute(
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
        &[&slot],
    )
    .await?;

    let topics = [unique_name("poll-relay"), unique_name("poll-jdbc")];
    let mock = match args.broker {
        Broker::Mock => Some(rdkafka::mocking::MockCluster::new(3)?),
        Broker::Stack => None,
    };
    let bootstrap = match &mock {
        Some(m) => m.bootstrap_servers(),
        None => args.stack.kafka_bootstrap_servers.clone(),
    };
    for topic in &topics {
        match &mock {
            Some(m) => m.create_topic(topic, args.partitions, 3)?,
            None => devstack::kafka::create_topic(&bootstrap, topic, args.partitions).await?,
        }
    }
    println!(
        "database {db_name} ({}); broker {bootstrap} ({:?}); topics {} (relay), {} (polling baseline)",
        redact(url),
        args.broker,
        topics[RELAY],
        topics[POLLER]
    );
    println!(
        "{} writers, {} rows/s for {:?}, each transaction held open 0–{} ms; poller: poll.interval {:?}, batch.max.rows {}, {:?} query style",
        args.writers,
        args.rate,
        args.duration,
        args.max_hold_ms,
        args.poll_interval,
        args.batch_max_rows,
        args.query_style
    );

    let seen = Arc::new(Mutex::new(Seen::default()));
    let consumer = start_consumer(&bootstrap, &topics, args.partitions, seen.clone())?;

    let mut relay =
        RelayProcess::spawn(&args.relay_bin, url, slot, &topics[RELAY], &bootstrap, &[])?;
    relay.wait_connected(Duration::from_secs(60)).await?;

    // The poller starts before the writers, as a connector already running.
    let (done_tx, done_rx) = watch::channel::<Option<Instant>>(None);
    let poller = tokio::spawn(run_poller(
        url.to_owned(),
        bootstrap.clone(),
        topics[POLLER].clone(),
        args.partitions,
        args.poll_interval,
        args.batch_max_rows,
        args.query_style,
        done_rx,
    ));

    let t0 = Instant::now();
    let writers = run_writers(args, url).await?;
    let writers_done = Instant::now();
    done_tx.send_replace(Some(writers_done));
    let mut committed: HashMap<i64, Instant> = HashMap::new();
    for (id, t) in writers.iter().flatten() {
        committed.insert(*id, *t);
    }
    println!(
        "writers done: {} rows committed in {:.1}s ({:.0} rows/s)",
        committed.len(),
        writers_done.duration_since(t0).as_secs_f64(),
        committed.len() as f64 / writers_done.duration_since(t0).as_secs_f64()
    );

    // Drain: the relay until every committed id arrived; the poller through
    // its final poll (one that started after the last commit), its acks,
    // and the consumer reading what it produced.
    let deadline = Instant::now() + args.drain_timeout;
    let relay_drained = loop {
        let have = {
            let s = seen
                .lock()
                .expect("consumer does not panic holding the lock");
            committed
                .keys()
                .filter(|id| s.first[RELAY].contains_key(id))
                .count()
        };
        if have == committed.len() {
            break Some(Instant::now());
        }
        if Instant::now() > deadline {
            println!(
                "relay: {have} of {} rows delivered when the drain timeout passed",
                committed.len()
            );
            break None;
        }
        relay.check_running()?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let report = tokio::time::timeout(args.poll_interval + args.drain_timeout, poller)
        .await
        .context("poller did not finish its final poll")???;
    loop {
        let got = seen
            .lock()
            .expect("consumer does not panic holding the lock")
            .records[POLLER];
        if got >= report.produced || Instant::now() > deadline + args.poll_interval {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Late duplicates would arrive now, if any.
    tokio::time::sleep(Duration::from_secs(1)).await;
    consumer.abort();
    relay.kill().await?;
    if let Some(t) = relay_drained {
        println!(
            "relay drained {:.2}s after the last commit; poller's final poll done, {} records produced by it",
            t.duration_since(writers_done).as_secs_f64(),
            report.produced
        );
    }

    let seen = seen
        .lock()
        .expect("consumer does not panic holding the lock");
    print_report(args, t0, &committed, &seen, &report)
}

/// Runs the writers for --duration; each returns its (id, commit returned)
/// pairs.
async fn run_writers(args: &Args, url: &str) -> anyhow::Result<Vec<Vec<(i64, Instant)>>> {
    let interval = Duration::from_secs_f64(args.writers as f64 / args.rate);
    let start = tokio::time::Instant::now() + Duration::from_millis(100);
    let end = start + args.duration;
    let mut tasks = Vec::new();
    for w in 0..args.writers {
        let mut client = connect(url).await?;
        let max_hold = args.max_hold_ms;
        // Writers are staggered across one interval.
        let first = start + interval.mul_f64(w as f64 / args.writers as f64);
        tasks.push(tokio::spawn(async move {
            let insert = client
                .prepare(
                    "INSERT INTO outbox (aggregate_type, aggregate_id, user_id, event_type, payload) \
                     VALUES ('order', $1, $2, 'OrderCreated', $3::text::jsonb) RETURNING id",
                )
                .await?;
            let mut out = Vec::new();
            let mut next = first;
            let mut n = 0u64;
            while next < end {
                tokio::time::sleep_until(next).await;
                next += interval;
                n += 1;
                let user_id: i64 = rand::rng().random_range(1..=1000);
                let hold = Duration::from_millis(rand::rng().random_range(0..=max_hold));
                let aggregate_id = format!("{w}-{n}");
                let payload = format!(
                    r#"{{"order_id":"{aggregate_id}","email":"customer{user_id}@example.com","status":"CREATED","currency":"EUR","total_cents":3998,"items":[{{"sku":"A-1","quantity":2,"unit_price_cents":1999}}]}}"#
                );
                let tx = client.transaction().await?;
                let id: i64 = tx
                    .query_one(&insert, &[&aggregate_id, &user_id, &payload])
                    .await?
                    .get(0);
                tokio::time::sleep(hold).await;
                tx.commit().await?;
                out.push((id, Instant::now()));
            }
            anyhow::Ok(out)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.push(t.await??);
    }
    Ok(all)
}

/// The polling baseline (see the header): polls until a poll that started
/// after the writers finished has completed and its records are acked.
#[allow(clippy::too_many_arguments)]
async fn run_poller(
    url: String,
    bootstrap: String,
    topic: String,
    partitions: i32,
    poll_interval: Duration,
    batch: usize,
    style: QueryStyle,
    mut writers_done: watch::Receiver<Option<Instant>>,
) -> anyhow::Result<PollerReport> {
    let mut client = connect(&url).await?;
    let acks = Arc::new(AckCounter::default());
    let producer: ThreadedProducer<CountingContext> = relay_like_producer_config(&bootstrap)
        .create_with_context(CountingContext(acks.clone()))
        .context("creating the poller's producer")?;
    let columns = "SELECT o.id, o.user_id::text, row_to_json(o)::text FROM outbox o WHERE o.id > $1 ORDER BY o.id ASC";
    let unbounded = client.prepare(columns).await?;
    let limited = client.prepare(&format!("{columns} LIMIT $2")).await?;
    let mut report = PollerReport::default();
    // The connector's incrementing offset starts at -1.
    let mut last: i64 = -1;
    let mut last_update: Option<tokio::time::Instant> = None;
    loop {
        if let Some(t) = last_update {
            tokio::time::sleep_until(t + poll_interval).await;
        }
        let started = Instant::now();
        let last_before = last;
        let mut rows_this_cycle = 0usize;
        match style {
            QueryStyle::Connector => {
                // One statement (one snapshot), read batch by batch from an
                // open portal, as poll() reads on from the open result set.
                let tx = client.transaction().await?;
                let portal = tx.bind(&unbounded, &[&last]).await?;
                report.queries += 1;
                loop {
                    let rows = tx.query_portal(&portal, batch as i32).await?;
                    if let Some(max) = produce(&producer, &topic, partitions, &rows)? {
                        last = last.max(max);
                    }
                    rows_this_cycle += rows.len();
                    if rows.len() < batch {
                        break;
                    }
                }
                tx.commit().await?;
            }
            QueryStyle::Limit => loop {
                let rows = client.query(&limited, &[&last, &(batch as i64)]).await?;
                report.queries += 1;
                if let Some(max) = produce(&producer, &topic, partitions, &rows)? {
                    last = last.max(max);
                }
                rows_this_cycle += rows.len();
                if rows.len() < batch {
                    break;
                }
            },
        }
        report.produced += rows_this_cycle as u64;
        last_update = Some(tokio::time::Instant::now());
        report.cycles.push(PollCycle {
            started,
            last_before,
            last_after: last,
            rows: rows_this_cycle,
        });
        let done = *writers_done.borrow_and_update();
        if done.is_some_and(|d| started > d) {
            break;
        }
    }
    // The worker would keep going; here, wait for the last acks.
    let deadline = Instant::now() + Duration::from_secs(60);
    while acks.acked.load(Ordering::Relaxed) + acks.failed.load(Ordering::Relaxed) < report.produced
    {
        if Instant::now() > deadline {
            bail!("poller: records not acknowledged within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    if acks.failed.load(Ordering::Relaxed) > 0 {
        bail!(
            "poller: {} records failed",
            acks.failed.load(Ordering::Relaxed)
        );
    }
    Ok(report)
}

/// Hands each row to the producer as the connector's worker does (key:
/// `user_id`, value: the row as JSON, partition as the relay picks it);
/// returns the highest id.
fn produce(
    producer: &ThreadedProducer<CountingContext>,
    topic: &str,
    partitions: i32,
    rows: &[tokio_postgres::Row],
) -> anyhow::Result<Option<i64>> {
    let mut max = None;
    for row in rows {
        let id: i64 = row.get(0);
        let key: Option<String> = row.get(1);
        let value: String = row.get(2);
        let partition =
            relay::dedupe::partition_for(key.as_deref().unwrap_or("").as_bytes(), partitions);
        let mut rec: BaseRecord<'_, str, str> =
            BaseRecord::to(topic).partition(partition).payload(&value);
        if let Some(k) = &key {
            rec = rec.key(k);
        }
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // Not expected at these rates; librdkafka's queue holds 1M.
                    rec = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => bail!("poller producer: {e}"),
            }
        }
        max = max.max(Some(id));
    }
    Ok(max)
}

/// Reads both topics from the beginning and records each id's first
/// arrival per path.
fn start_consumer(
    bootstrap: &str,
    topics: &[String; 2],
    partitions: i32,
    seen: Arc<Mutex<Seen>>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique_name("pollbench-consumer"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "5")
        .set("fetch.min.bytes", "1")
        .set("fetch.error.backoff.ms", "10")
        .create()
        .context("creating the consumer")?;
    let mut assignment = TopicPartitionList::new();
    for topic in topics {
        for p in 0..partitions {
            assignment.add_partition_offset(topic, p, Offset::Beginning)?;
        }
    }
    consumer.assign(&assignment)?;
    let relay_topic = topics[RELAY].clone();
    Ok(tokio::spawn(async move {
        loop {
            let msg = match consumer.recv().await {
                Ok(msg) => msg,
                Err(_) => {
                    // Transient (broker restart, rebalance): try again shortly.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let now = Instant::now();
            let path = if msg.topic() == relay_topic {
                RELAY
            } else {
                POLLER
            };
            let id = record_id(&msg);
            let mut s = seen.lock().expect("no panics while holding the lock");
            s.records[path] += 1;
            match id {
                Some(id) => {
                    s.first[path].entry(id).or_insert(now);
                }
                None => s.unreadable[path] += 1,
            }
        }
    }))
}

/// The outbox id of a record: the `id` field of its JSON value (both paths
/// write the row as a JSON object), else the relay's `event_id` header.
fn record_id(msg: &rdkafka::message::BorrowedMessage<'_>) -> Option<i64> {
    if let Some(id) = msg
        .payload()
        .and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok())
        .and_then(|v| v.get("id").and_then(serde_json::Value::as_i64))
    {
        return Some(id);
    }
    let headers = msg.headers()?;
    let id = header::find(headers.iter().map(|h| (h.key, h.value)), header::EVENT_ID)?;
    std::str::from_utf8(id).ok()?.trim().parse().ok()
}

fn print_report(
    args: &Args,
    t0: Instant,
    committed: &HashMap<i64, Instant>,
    seen: &Seen,
    report: &PollerReport,
) -> anyhow::Result<()> {
    let names = [
        "relay (pgoutput slot → Kafka)".to_owned(),
        format!(
            "polling baseline (JDBC incrementing, poll.interval {:?})",
            args.poll_interval
        ),
    ];
    let mut hist = Vec::new();
    let mut skipped: Vec<Vec<i64>> = Vec::new();
    let mut early = [0u64; 2];
    println!();
    println!("| path | rows written | rows delivered | rows skipped | duplicates | p50 ms | p90 ms | p99 ms | max ms |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for path in [RELAY, POLLER] {
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
        let mut missing: Vec<i64> = Vec::new();
        for (id, commit) in committed {
            match seen.first[path].get(id) {
                Some(arrived) => {
                    // The consumer can see a record before the writer's
                    // COMMIT call returns: count it as 0.
                    let us = arrived.checked_duration_since(*commit).map_or_else(
                        || {
                            early[path] += 1;
                            0
                        },
                        |d| d.as_micros() as u64,
                    );
                    h.record(us.max(1))?;
                }
                None => missing.push(*id),
            }
        }
        missing.sort_unstable();
        let delivered = committed.len() - missing.len();
        let distinct = seen.first[path].len() as u64;
        let duplicates = seen.records[path] - seen.unreadable[path] - distinct;
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        println!(
            "| {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
            names[path],
            committed.len(),
            delivered,
            missing.len(),
            duplicates,
            ms(0.50),
            ms(0.90),
            ms(0.99),
            h.max() as f64 / 1000.0
        );
        hist.push(h);
        skipped.push(missing);
    }
    println!();
    let ratio = |q: f64| {
        hist[POLLER].value_at_quantile(q) as f64 / hist[RELAY].value_at_quantile(q).max(1) as f64
    };
    println!(
        "latency ratio baseline / relay: median {:.1}×, p99 {:.1}×",
        ratio(0.50),
        ratio(0.99)
    );
    for path in [RELAY, POLLER] {
        if early[path] > 0 {
            println!(
                "({}: {} records arrived before their writer's COMMIT returned; counted as 0 ms)",
                names[path], early[path]
            );
        }
        if seen.unreadable[path] > 0 {
            println!(
                "({}: {} records without a readable id)",
                names[path], seen.unreadable[path]
            );
        }
    }
    let cycles = &report.cycles;
    println!(
        "poller: {} polls, {} queries, {} records produced, {:.0} rows per poll on average",
        cycles.len(),
        report.queries,
        report.produced,
        report.produced as f64 / cycles.len().max(1) as f64
    );
    let polled: BTreeSet<i64> = seen.first[POLLER].keys().copied().collect();
    for (path, ids) in skipped.iter().enumerate() {
        if ids.is_empty() {
            continue;
        }
        let shown: Vec<String> = ids.iter().take(12).map(i64::to_string).collect();
        println!(
            "{} skipped {} of {} rows; first skipped ids: {}{}",
            names[path],
            ids.len(),
            committed.len(),
            shown.join(", "),
            if ids.len() > shown.len() { ", …" } else { "" }
        );
    }
    // Why: for the first few ids the poller skipped, the poll that passed
    // them by while they were not yet committed.
    for id in skipped[POLLER].iter().take(5) {
        let commit = committed[id];
        let Some(c) = cycles
            .iter()
            .find(|c| c.last_before < *id && c.last_after > *id && c.started < commit)
        else {
            continue;
        };
        let higher = polled
            .range(id + 1..)
            .next()
            .copied()
            .unwrap_or(c.last_after);
        println!(
            "  id {id}: the poll at +{:.3}s moved last from {} to {} (returning e.g. id {higher}) while {id} was uncommitted; it committed at +{:.3}s, and `id > {}` never returns it",
            c.started.duration_since(t0).as_secs_f64(),
            c.last_before,
            c.last_after,
            commit.duration_since(t0).as_secs_f64(),
            c.last_after
        );
    }
    if skipped[POLLER].is_empty() {
        println!(
            "the poller skipped nothing this run: raise --writers or --max-hold-ms so that more transactions are open at each poll"
        );
    }
    let rows: Vec<usize> = cycles.iter().map(|c| c.rows).collect();
    if let (Some(min), Some(max)) = (rows.iter().min(), rows.iter().max()) {
        println!("rows per poll: min {min}, max {max}");
    }
    Ok(())
}
