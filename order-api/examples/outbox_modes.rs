//! `scripts/bench outbox-modes` (issue #18): the outbox table against the
//! table-less outbox — each event a transactional
//! `pg_logical_emit_message(true, 'outbox', json)` — side by side in one
//! run: WAL bytes per order, order-api orders/s and latency, and the
//! relay's catch-up on the events of those orders. One mode at a time,
//! each in a scratch database of its own, with the release binaries of
//! order-api and the relay started here.
//!
//! ```text
//!  per round (--rounds, 3), per mode in turn (table, then message):
//!   scratch db ◀── order-api --outbox-mode M ◀── C closed-loop clients (keep-alive HTTP/1.1)
//!     │  W warm-up orders (before the slot: not in the backlog)
//!     │  slot <db>_relay created, CHECKPOINT, LSN₀
//!     │  N × POST /orders                         → orders/s, latency p50/p99
//!     │  LSN₁; order-api stopped                  → WAL bytes/order = (LSN₁ − LSN₀) / N
//!     │                                             (+ by resource manager: pg_walinspect)
//!     └─ relay started on the slot (its backlog: the N events)
//!          ──▶ fresh topic, partitions as the stack's outbox topic
//!                                                 → seconds from start to N acked, events/s,
//!                                                   CPU of the relay and of its walsender
//!          read back: every order's event exactly once
//! ```
//!
//! The relay does not run while the orders are written, so order-api's
//! figures are its own and the relay's are a drain of a backlog, start-up
//! included. WAL is the server's between the two LSNs: the `orders` rows
//! and their index entries (which both modes write), the outbox rows or
//! messages, commit records, and whatever else the server wrote meanwhile;
//! the breakdown by resource manager shows what is what.
//!
//! Prints each figure's median over the rounds with the ratio message /
//! table, WAL by resource manager, and every round's figures. Asserts
//! nothing about speed, but fails (after printing) when a run's topic
//! lacks an order's event or holds one twice.
//!
//! ```text
//! cargo build --release -p relay -p order-api --bins --examples
//! DATABASE_URL=… KAFKA_BOOTSTRAP_SERVERS=… target/release/examples/outbox_modes [--orders 20000]
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Parser;
use devstack::bench::{
    cpu_seconds, http_get, json_post, walsender_pid, RawConn, RelayProcess, ScratchDb, StackArgs,
};
use devstack::kafka::{partition_count, Record, TopicReader};
use devstack::testing::connect;
use hdrhistogram::Histogram;
use outbox_record::header;
use tokio_postgres::Client;

/// `--outbox-mode` of order-api.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    Table,
    Message,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Table => "table",
            Mode::Message => "message",
        }
    }
}

#[derive(Parser, Debug)]
#[command(
    about = "outbox table vs logical decoding messages: WAL per order, order-api orders/s and latency, relay catch-up"
)]
struct Args {
    #[command(flatten)]
    stack: StackArgs,
    /// Orders of each mode's measured run (and events of its backlog).
    #[arg(long, default_value_t = 20_000)]
    orders: usize,
    /// Concurrent closed-loop clients, one keep-alive connection each.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Orders before the measured run (connections, caches), written
    /// before the slot exists: not measured, not in the backlog.
    #[arg(long, default_value_t = 1_000)]
    warmup_orders: usize,
    /// Distinct customers (`user_id`, the record key) the orders cycle through.
    #[arg(long, default_value_t = 997)]
    users: usize,
    /// Modes, in this order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "table,message"
    )]
    modes: Vec<Mode>,
    /// The stack's outbox topic: the benchmark's fresh topics are named
    /// after it and get as many partitions.
    #[arg(long, env = "OUTBOX_TOPIC", default_value = "microshop.order-outbox")]
    outbox_topic: String,
    /// Partitions of the fresh topics (default: as many as --outbox-topic has).
    #[arg(long)]
    partitions: Option<i32>,
    #[arg(long, default_value = "target/release/order-api")]
    order_api_bin: PathBuf,
    #[arg(long, default_value = "target/release/relay")]
    relay_bin: PathBuf,
    /// Extra option for order-api, repeatable (e.g. --order-api-arg=--pool-size=32).
    #[arg(long = "order-api-arg", allow_hyphen_values = true)]
    order_api_args: Vec<String>,
    /// Extra option for the relay, repeatable.
    #[arg(long = "relay-arg", allow_hyphen_values = true)]
    relay_args: Vec<String>,
    /// Rounds of all modes in turn (table, message, table, message, …);
    /// the tables show each figure's median over them (the machine is
    /// shared: single runs are noisy).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Write the figures to this JSON file too.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Give up on a step after this long.
    #[arg(long, default_value = "600s", value_parser = lifecycle::parse_duration)]
    timeout: Duration,
}

/// order-api under the closed loop.
struct Load {
    /// Answered 201.
    created: u64,
    /// Any other answer, or a broken connection.
    errors: u64,
    seconds: f64,
    /// Request sent to response read, microseconds.
    latency_us: Histogram<u64>,
}

impl Load {
    fn rate(&self) -> f64 {
        self.created as f64 / self.seconds
    }

    fn ms(&self, quantile: f64) -> f64 {
        self.latency_us.value_at_quantile(quantile) as f64 / 1000.0
    }
}

/// One resource manager's share of the measured WAL (`pg_get_wal_stats`).
struct RmgrWal {
    records: i64,
    /// Records and full-page images.
    bytes: i64,
    fpi_bytes: i64,
}

/// The WAL of the measured run.
struct Wal {
    /// `pg_current_wal_lsn()` after − before.
    bytes: i64,
    /// By resource manager, when pg_walinspect is available.
    by_rmgr: Option<BTreeMap<String, RmgrWal>>,
}

impl Wal {
    fn total(&self, f: impl Fn(&RmgrWal) -> i64) -> Option<i64> {
        self.by_rmgr.as_ref().map(|m| m.values().map(f).sum())
    }
}

/// The relay draining the backlog.
struct CatchUp {
    /// Process start to the last of the events acknowledged.
    seconds: f64,
    /// Process start to the first acknowledged.
    first_s: f64,
    cpu_s: f64,
    /// CPU time of the walsender decoding the slot for the relay.
    walsender_cpu_s: Option<f64>,
}

/// What the mode's topic held, read back after the drain.
struct Check {
    records: usize,
    /// Event ids seen more than once (extra copies).
    duplicates: usize,
    /// Orders of the run without an event in the topic.
    missing: usize,
    /// Records that are no order of the run's event.
    foreign: usize,
}

impl Check {
    fn exact(&self) -> bool {
        self.duplicates == 0 && self.missing == 0 && self.foreign == 0
    }
}

struct ModeRun {
    round: usize,
    mode: Mode,
    topic: String,
    /// Orders of the measured run in the `orders` table.
    orders: usize,
    load: Load,
    wal: Wal,
    catch_up: CatchUp,
    check: Check,
}

impl ModeRun {
    fn per_order(&self, v: i64) -> f64 {
        v as f64 / self.orders.max(1) as f64
    }

    fn events_per_s(&self) -> f64 {
        self.orders as f64 / self.catch_up.seconds
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    for (bin, build) in [
        (&args.order_api_bin, "order-api"),
        (&args.relay_bin, "relay"),
    ] {
        anyhow::ensure!(
            bin.is_file(),
            "{} is not built: cargo build --release -p {build}",
            bin.display()
        );
    }
    anyhow::ensure!(
        args.orders > 0 && args.concurrency > 0 && args.users > 0 && args.rounds > 0,
        "--orders, --concurrency, --users and --rounds must be positive"
    );
    let bootstrap = &args.stack.kafka_bootstrap_servers;
    let partitions = match args.partitions {
        Some(p) => p,
        None => partition_count(bootstrap, &args.outbox_topic).await?,
    };
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    println!(
        "outbox-modes: {} rounds of {} orders per mode (after {} warm-up orders) from {} \
         closed-loop clients (keep-alive HTTP/1.1, {} customers), one mode at a time; fresh \
         topics of {partitions} partitions (as {}); order-api {} and relay {} with their defaults{}",
        args.rounds,
        args.orders,
        args.warmup_orders,
        args.concurrency,
        args.users,
        args.outbox_topic,
        args.order_api_bin.display(),
        args.relay_bin.display(),
        extra_args_note(&args),
    );
    let mut runs = Vec::new();
    for round in 1..=args.rounds {
        for &mode in &args.modes {
            let topic = format!(
                "{}.bench-outbox-modes-{stamp}-{round}-{}",
                args.outbox_topic,
                mode.as_str()
            );
            runs.push(run_mode(&args, round, mode, &topic, partitions).await?);
        }
    }
    report(&args, &runs);
    if let Some(path) = &args.json {
        write_json(path, &args, partitions, &runs)?;
        println!("figures written to {}", path.display());
    }
    let failed: Vec<&ModeRun> = runs.iter().filter(|r| !r.check.exact()).collect();
    if !failed.is_empty() {
        for r in &failed {
            eprintln!(
                "FAILED: round {}, {} mode: {} of {} orders' events missing, {} duplicated, \
                 {} foreign in {}",
                r.round,
                r.mode.as_str(),
                r.check.missing,
                r.orders,
                r.check.duplicates,
                r.check.foreign,
                r.topic
            );
        }
        bail!("{} run(s) did not deliver every event once", failed.len());
    }
    Ok(())
}

fn extra_args_note(args: &Args) -> String {
    let mut out = String::new();
    if !args.order_api_args.is_empty() {
        out += &format!(" (order-api {})", args.order_api_args.join(" "));
    }
    if !args.relay_args.is_empty() {
        out += &format!(" (relay {})", args.relay_args.join(" "));
    }
    out
}

/// One mode in a scratch database, dropped (with the slot) afterwards
/// whatever the outcome.
async fn run_mode(
    args: &Args,
    round: usize,
    mode: Mode,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<ModeRun> {
    let db = ScratchDb::create(&args.stack.database_url, "outbox_modes").await?;
    let slot = format!("{}_relay", db.name);
    let result = measure(args, round, mode, &db, &slot, topic, partitions).await;
    db.drop_with_slots(&[slot]).await;
    result
}

async fn measure(
    args: &Args,
    round: usize,
    mode: Mode,
    db: &ScratchDb,
    slot: &str,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<ModeRun> {
    println!(
        "\n== round {round}, {} mode (database {})",
        mode.as_str(),
        db.name
    );
    devstack::migrations::apply(&db.url).await?;
    let sql = connect(&db.url).await?;
    let walinspect = sql
        .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
        .await
        .map_err(|e| println!("no WAL breakdown (pg_walinspect: {e})"))
        .is_ok();
    let requests = Arc::new(order_requests(args.users));

    let mut api = OrderApi::spawn(&args.order_api_bin, &db.url, mode, &args.order_api_args)?;
    api.wait_ready(Duration::from_secs(30)).await?;
    if args.warmup_orders > 0 {
        let warm = closed_loop(
            api.addr,
            &requests,
            args.warmup_orders,
            args.concurrency,
            args.timeout,
        )
        .await?;
        println!(
            "warm-up: {} orders in {:.1}s ({} errors)",
            warm.created, warm.seconds, warm.errors
        );
    }
    let last_warm_up_id: i64 = sql
        .query_one("SELECT coalesce(max(id), 0) FROM orders", &[])
        .await?
        .get(0);
    // The slot holds everything from here on (the relay is not running);
    // after the checkpoint every mode's run starts with the same full-page
    // image state.
    sql.execute(
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
        &[&slot],
    )
    .await?;
    sql.batch_execute("CHECKPOINT").await?;
    let lsn_before = current_lsn(&sql).await?;
    let load = closed_loop(
        api.addr,
        &requests,
        args.orders,
        args.concurrency,
        args.timeout,
    )
    .await?;
    let lsn_after = current_lsn(&sql).await?;
    api.stop().await?;

    let wal_bytes: i64 = sql
        .query_one(
            "SELECT ($1::text::pg_lsn - $2::text::pg_lsn)::bigint",
            &[&lsn_after, &lsn_before],
        )
        .await?
        .get(0);
    let by_rmgr = if walinspect {
        Some(wal_by_rmgr(&sql, &lsn_before, &lsn_after).await?)
    } else {
        None
    };
    let order_ids: HashSet<i64> = sql
        .query("SELECT id FROM orders WHERE id > $1", &[&last_warm_up_id])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let outbox_rows: i64 = sql
        .query_one("SELECT count(*) FROM outbox", &[])
        .await?
        .get(0);
    println!(
        "order-api: {} created ({} orders in the table, {} errors) in {:.2}s: {:.0} orders/s, \
         latency ms p50 {:.2} p99 {:.2} max {:.2}; WAL {lsn_before} → {lsn_after}: {:.1} MiB; \
         outbox rows (warm-up included): {outbox_rows}",
        load.created,
        order_ids.len(),
        load.errors,
        load.seconds,
        load.rate(),
        load.ms(0.50),
        load.ms(0.99),
        load.latency_us.max() as f64 / 1000.0,
        wal_bytes as f64 / 1048576.0,
    );

    devstack::kafka::create_topic(&args.stack.kafka_bootstrap_servers, topic, partitions).await?;
    let catch_up = drain(args, &sql, &db.url, slot, topic, order_ids.len() as u64).await?;
    println!(
        "relay: {} events into {topic} in {:.2}s from its start (first record at {:.2}s): \
         {:.0} events/s, relay CPU {:.2}s, walsender CPU {}",
        order_ids.len(),
        catch_up.seconds,
        catch_up.first_s,
        order_ids.len() as f64 / catch_up.seconds,
        catch_up.cpu_s,
        catch_up
            .walsender_cpu_s
            .map_or("unknown".to_owned(), |s| format!("{s:.2}s")),
    );
    let check = check_topic(args, topic, &order_ids).await?;
    println!(
        "topic: {} records; every order's event exactly once: {}",
        check.records,
        if check.exact() { "yes" } else { "NO" }
    );
    Ok(ModeRun {
        round,
        mode,
        topic: topic.to_owned(),
        orders: order_ids.len(),
        load,
        wal: Wal {
            bytes: wal_bytes,
            by_rmgr,
        },
        catch_up,
        check,
    })
}

async fn current_lsn(sql: &Client) -> anyhow::Result<String> {
    Ok(sql
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0))
}

/// The WAL between two LSNs by resource manager (pg_walinspect).
async fn wal_by_rmgr(
    sql: &Client,
    from: &str,
    to: &str,
) -> anyhow::Result<BTreeMap<String, RmgrWal>> {
    let rows = sql
        .query(
            "SELECT \"resource_manager/record_type\", count, fpi_size, combined_size \
             FROM pg_get_wal_stats($1::text::pg_lsn, $2::text::pg_lsn, false) WHERE count > 0",
            &[&from, &to],
        )
        .await
        .context("pg_get_wal_stats")?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get(0),
                RmgrWal {
                    records: r.get(1),
                    fpi_bytes: r.get(2),
                    bytes: r.get(3),
                },
            )
        })
        .collect())
}

/// One prebuilt `POST /orders` body per customer.
fn order_requests(users: usize) -> Vec<String> {
    (0..users)
        .map(|u| {
            format!(
                r#"{{"user_id":{},"email":"customer{u}@example.com","currency":"EUR","items":[{{"sku":"A-1","quantity":2,"unit_price_cents":1999}}]}}"#,
                u + 1
            )
        })
        .collect()
}

/// `orders` POST /orders from `concurrency` closed loops (each sends its
/// next order when the last one is answered), order `i` for customer
/// `i mod users`. Connections are opened before the clock starts.
async fn closed_loop(
    addr: SocketAddr,
    bodies: &Arc<Vec<String>>,
    orders: usize,
    concurrency: usize,
    timeout: Duration,
) -> anyhow::Result<Load> {
    let requests: Arc<Vec<Vec<u8>>> = Arc::new(
        bodies
            .iter()
            .map(|b| json_post(addr, "/orders", b))
            .collect(),
    );
    let mut conns = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        conns.push(
            RawConn::connect(addr)
                .await
                .with_context(|| format!("connecting to order-api at {addr}"))?,
        );
    }
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|conn| {
            let (requests, next) = (requests.clone(), next.clone());
            tokio::spawn(async move {
                let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
                let (mut created, mut errors) = (0u64, 0u64);
                let mut conn = Some(conn);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= orders {
                        break;
                    }
                    let request = &requests[i % requests.len()];
                    let t = Instant::now();
                    if conn.is_none() {
                        conn = RawConn::connect(addr).await.ok();
                    }
                    let status = match conn.as_mut() {
                        Some(c) => c.send(request).await.ok(),
                        None => None,
                    };
                    match status {
                        Some(201) => {
                            created += 1;
                            latency.saturating_record(t.elapsed().as_micros() as u64);
                        }
                        Some(_) => errors += 1,
                        None => {
                            conn = None;
                            errors += 1;
                        }
                    }
                }
                anyhow::Ok((created, errors, latency))
            })
        })
        .collect();
    let joined = tokio::time::timeout(timeout, futures_util::future::join_all(tasks))
        .await
        .with_context(|| format!("{orders} orders not written within {timeout:?}"))?;
    let seconds = started.elapsed().as_secs_f64();
    let mut load = Load {
        created: 0,
        errors: 0,
        seconds,
        latency_us: Histogram::new_with_bounds(1, 60_000_000, 3)?,
    };
    for task in joined {
        let (created, errors, latency) = task??;
        load.created += created;
        load.errors += errors;
        load.latency_us.add(&latency)?;
    }
    Ok(load)
}

/// The release order-api on a free local port.
struct OrderApi {
    child: tokio::process::Child,
    addr: SocketAddr,
}

impl OrderApi {
    /// Logs at warn, as the relay in the benchmarks: its per-order info
    /// line would be work the table and message modes share.
    fn spawn(bin: &Path, url: &str, mode: Mode, extra: &[String]) -> anyhow::Result<OrderApi> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let child = tokio::process::Command::new(bin)
            .args(["--database-url", url, "--listen", &addr.to_string()])
            .args(["--outbox-mode", mode.as_str()])
            .args(extra)
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(OrderApi { child, addr })
    }

    /// Waits until `/readyz` answers 200 (the database answers).
    async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("order-api exited early: {status}");
            }
            if let Ok(r) = http_get(self.addr, "/readyz").await {
                if r.starts_with("HTTP/1.1 200") {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("order-api not ready within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills it (SIGKILL: nothing is in flight) and reaps it.
    async fn stop(mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }
}

/// Starts the relay on `slot` and waits until Kafka acknowledged `events`
/// records (`relay_events_total`), timed from the process's start.
async fn drain(
    args: &Args,
    sql: &Client,
    url: &str,
    slot: &str,
    topic: &str,
    events: u64,
) -> anyhow::Result<CatchUp> {
    let extra: Vec<&str> = args.relay_args.iter().map(String::as_str).collect();
    let mut relay = RelayProcess::spawn(
        &args.relay_bin,
        url,
        slot,
        topic,
        &args.stack.kafka_bootstrap_servers,
        &extra,
    )?;
    let mut first_s = None;
    let mut cpu_s = 0.0;
    let (mut walsender, mut walsender_cpu_s) = (None, None);
    let seconds = loop {
        relay.check_running()?;
        if let Some(cpu) = cpu_seconds(relay.pid) {
            cpu_s = cpu;
        }
        if walsender.is_none() {
            walsender = walsender_pid(sql, slot).await;
        }
        if let Some(cpu) = walsender.and_then(cpu_seconds) {
            walsender_cpu_s = Some(cpu);
        }
        let acked = relay.events_total(topic).await.unwrap_or(0);
        if acked > 0 && first_s.is_none() {
            first_s = Some(relay.started.elapsed().as_secs_f64());
        }
        if acked >= events {
            break relay.started.elapsed().as_secs_f64();
        }
        if relay.started.elapsed() > args.timeout {
            bail!(
                "relay: {acked} of {events} events acknowledged after {:?}",
                args.timeout
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    if let Some(cpu) = cpu_seconds(relay.pid) {
        cpu_s = cpu;
    }
    if let Some(cpu) = walsender.and_then(cpu_seconds) {
        walsender_cpu_s = Some(cpu);
    }
    relay.kill().await?;
    Ok(CatchUp {
        seconds,
        first_s: first_s.unwrap_or(seconds),
        cpu_s,
        walsender_cpu_s,
    })
}

/// Reads the whole topic back: each record's event id once, and each
/// order of the run (by `aggregate_id`) with exactly one event.
async fn check_topic(args: &Args, topic: &str, order_ids: &HashSet<i64>) -> anyhow::Result<Check> {
    let reader = TopicReader::new(&args.stack.kafka_bootstrap_servers, topic, true)?;
    let records = reader
        .read_at_least(order_ids.len(), args.timeout, Duration::from_secs(2))
        .await?;
    let mut event_ids = HashSet::new();
    let mut per_order: HashMap<i64, usize> = HashMap::new();
    let (mut duplicates, mut foreign) = (0, 0);
    for r in &records {
        let Some(event_id) = r.header(header::EVENT_ID) else {
            foreign += 1;
            continue;
        };
        if !event_ids.insert(event_id.to_owned()) {
            duplicates += 1;
            continue;
        }
        match aggregate_id(r).filter(|id| order_ids.contains(id)) {
            Some(id) => *per_order.entry(id).or_default() += 1,
            None => foreign += 1,
        }
    }
    // Two event ids for one order: an order's event twice under new ids.
    duplicates += per_order.values().map(|n| n - 1).sum::<usize>();
    Ok(Check {
        records: records.len(),
        duplicates,
        missing: order_ids.len() - per_order.len(),
        foreign,
    })
}

/// The order an `OrderCreated` record is about: `aggregate_id` of its value.
fn aggregate_id(r: &Record) -> Option<i64> {
    if r.header(header::EVENT_TYPE) != Some("OrderCreated") {
        return None;
    }
    let value: serde_json::Value = serde_json::from_str(r.value.as_deref()?).ok()?;
    match value.get("aggregate_id")? {
        serde_json::Value::String(s) => s.parse().ok(),
        v => v.as_i64(),
    }
}

/// The side-by-side tables (Markdown, as BENCHMARKS.md shows them):
/// each figure's median over the rounds, WAL by resource manager over
/// all rounds, then every round.
fn report(args: &Args, runs: &[ModeRun]) {
    let mut modes: Vec<Mode> = Vec::new();
    for r in runs {
        if !modes.contains(&r.mode) {
            modes.push(r.mode);
        }
    }
    let of = |m: Mode| runs.iter().filter(move |r| r.mode == m);
    let names: Vec<&str> = modes.iter().map(|m| m.as_str()).collect();
    let ratio_col = modes == [Mode::Table, Mode::Message];
    println!();
    println!(
        "| {} orders per mode, median of {} round(s) | {} |{}",
        args.orders,
        args.rounds,
        names.join(" | "),
        if ratio_col { " message / table |" } else { "" }
    );
    println!(
        "|---|{}{}",
        "---:|".repeat(modes.len()),
        if ratio_col { "---:|" } else { "" }
    );
    let row = |name: &str, f: &dyn Fn(&ModeRun) -> Option<f64>, digits: usize| {
        let values: Vec<Option<f64>> = modes
            .iter()
            .map(|&m| median(of(m).filter_map(f).collect()))
            .collect();
        let cells: Vec<String> = values
            .iter()
            .map(|v| v.map_or("—".to_owned(), |v| group(v, digits)))
            .collect();
        let ratio = match (ratio_col, values.first(), values.get(1)) {
            (true, Some(Some(t)), Some(Some(m))) if *t != 0.0 => format!(" {:.2} |", m / t),
            (true, _, _) => " — |".to_owned(),
            _ => String::new(),
        };
        println!("| {name} | {} |{ratio}", cells.join(" | "));
    };
    row(
        "WAL bytes per order",
        &|r| Some(r.per_order(r.wal.bytes)),
        0,
    );
    row(
        "WAL records per order",
        &|r| r.wal.total(|w| w.records).map(|n| r.per_order(n)),
        2,
    );
    row(
        "of the bytes: full-page images per order",
        &|r| r.wal.total(|w| w.fpi_bytes).map(|n| r.per_order(n)),
        0,
    );
    row("order-api orders/s", &|r| Some(r.load.rate()), 0);
    row("order-api latency p50 ms", &|r| Some(r.load.ms(0.50)), 2);
    row("order-api latency p99 ms", &|r| Some(r.load.ms(0.99)), 2);
    row(
        "relay catch-up s (start-up included)",
        &|r| Some(r.catch_up.seconds),
        2,
    );
    row("relay catch-up events/s", &|r| Some(r.events_per_s()), 0);
    row("relay first record s", &|r| Some(r.catch_up.first_s), 2);
    row("relay CPU s", &|r| Some(r.catch_up.cpu_s), 2);
    row(
        "walsender CPU s (decoding for the relay)",
        &|r| r.catch_up.walsender_cpu_s,
        2,
    );
    let cells: Vec<String> = modes
        .iter()
        .map(|&m| {
            let records: usize = of(m).map(|r| r.check.records).sum();
            let orders: usize = of(m).map(|r| r.orders).sum();
            let exact = of(m).all(|r| r.check.exact());
            format!(
                "{} of {}{}",
                group(records as f64, 0),
                group(orders as f64, 0),
                if exact {
                    ", each once"
                } else {
                    " — NOT each once"
                }
            )
        })
        .collect();
    println!(
        "| events in the topics (all rounds) | {} |{}",
        cells.join(" | "),
        if ratio_col { " |" } else { "" }
    );

    // By resource manager, all rounds together: what the bytes are.
    let mut rmgrs: Vec<&String> = runs
        .iter()
        .filter_map(|r| r.wal.by_rmgr.as_ref())
        .flat_map(|m| m.keys())
        .collect();
    rmgrs.sort();
    rmgrs.dedup();
    if !rmgrs.is_empty() {
        println!();
        println!(
            "| WAL per order by resource manager, all rounds (records; bytes incl. full-page images) | {} |",
            names.join(" | ")
        );
        println!("|---|{}", "---:|".repeat(modes.len()));
        for name in rmgrs {
            let cells: Vec<String> = modes
                .iter()
                .map(|&m| {
                    let orders: usize = of(m).map(|r| r.orders).sum();
                    let mut seen = false;
                    let (mut records, mut bytes) = (0i64, 0i64);
                    for w in of(m).filter_map(|r| r.wal.by_rmgr.as_ref()?.get(name)) {
                        seen = true;
                        records += w.records;
                        bytes += w.bytes;
                    }
                    let per = |v: i64| v as f64 / orders.max(1) as f64;
                    if seen {
                        format!("{:.2}; {}", per(records), group(per(bytes), 0))
                    } else {
                        "—".to_owned()
                    }
                })
                .collect();
            println!("| {name} | {} |", cells.join(" | "));
        }
    }

    println!();
    println!("| round | mode | WAL bytes/order | orders/s | p50 ms | p99 ms | relay s | relay events/s | relay CPU s | walsender CPU s | errors |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in runs {
        println!(
            "| {} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {} | {:.2} | {} | {} |",
            r.round,
            r.mode.as_str(),
            group(r.per_order(r.wal.bytes), 0),
            group(r.load.rate(), 0),
            r.load.ms(0.50),
            r.load.ms(0.99),
            r.catch_up.seconds,
            group(r.events_per_s(), 0),
            r.catch_up.cpu_s,
            r.catch_up
                .walsender_cpu_s
                .map_or("—".to_owned(), |s| format!("{s:.2}")),
            r.load.errors
        );
    }
    println!();
    println!(
        "WAL: pg_current_wal_lsn() after − before the measured orders, divided by them; the \
         whole server's, so it includes the orders rows and their index entries that both modes \
         write (and anything else written meanwhile: see the breakdown). A checkpoint just \
         before each run; the outbox rows' later deletion (relay --retention, vacuum) is not in it."
    );
    println!(
        "order-api: {} closed-loop clients, latency from sending a request to reading its \
         answer (a closed loop waits for each answer, so it shows no queueing behind it); \
         the relay was not running.",
        args.concurrency
    );
    println!(
        "relay: started on the slot holding the run's events, timed from process start to the \
         last event acknowledged (relay_events_total), then the topic read back."
    );
}

/// The median (`None` for no values).
fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// `v` with `digits` decimals, thousands separated by commas.
fn group(v: f64, digits: usize) -> String {
    let s = format!("{v:.digits$}");
    let (int, frac) = s.split_once('.').map_or((s.as_str(), ""), |(i, f)| (i, f));
    let (sign, int) = int.strip_prefix('-').map_or(("", int), |i| ("-", i));
    let mut out = String::new();
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if frac.is_empty() {
        format!("{sign}{out}")
    } else {
        format!("{sign}{out}.{frac}")
    }
}

fn write_json(path: &Path, args: &Args, partitions: i32, runs: &[ModeRun]) -> anyhow::Result<()> {
    let runs_json: Vec<serde_json::Value> = runs
        .iter()
        .map(|r| {
            let by_rmgr: Option<serde_json::Map<String, serde_json::Value>> =
                r.wal.by_rmgr.as_ref().map(|m| {
                    m.iter()
                        .map(|(k, w)| {
                            (
                                k.clone(),
                                serde_json::json!({
                                    "records": w.records,
                                    "bytes": w.bytes,
                                    "fpi_bytes": w.fpi_bytes,
                                }),
                            )
                        })
                        .collect()
                });
            serde_json::json!({
                "round": r.round,
                "mode": r.mode.as_str(),
                "orders": r.orders,
                "order_api": {
                    "created": r.load.created,
                    "errors": r.load.errors,
                    "seconds": r.load.seconds,
                    "orders_per_s": r.load.rate(),
                    "p50_ms": r.load.ms(0.50),
                    "p99_ms": r.load.ms(0.99),
                    "max_ms": r.load.latency_us.max() as f64 / 1000.0,
                },
                "wal": {
                    "bytes": r.wal.bytes,
                    "bytes_per_order": r.per_order(r.wal.bytes),
                    "by_resource_manager": by_rmgr,
                },
                "relay": {
                    "seconds": r.catch_up.seconds,
                    "events_per_s": r.events_per_s(),
                    "first_record_s": r.catch_up.first_s,
                    "cpu_s": r.catch_up.cpu_s,
                    "walsender_cpu_s": r.catch_up.walsender_cpu_s,
                },
                "topic": {
                    "name": r.topic,
                    "records": r.check.records,
                    "duplicates": r.check.duplicates,
                    "missing": r.check.missing,
                    "foreign": r.check.foreign,
                },
            })
        })
        .collect();
    let doc = serde_json::json!({
        "orders": args.orders,
        "concurrency": args.concurrency,
        "warmup_orders": args.warmup_orders,
        "partitions": partitions,
        "runs": runs_json,
    });
    std::fs::write(path, serde_json::to_string_pretty(&doc)?)
        .with_context(|| format!("writing {}", path.display()))
}
