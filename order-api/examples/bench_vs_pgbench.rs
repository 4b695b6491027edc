//! Orders per second: order-api against pgbench running the same two-insert
//! transaction on the same database, plus latency at a fixed open-loop rate.
//! A benchmark prints figures; it asserts nothing.
//!
//! ```text
//!  fresh test database ─▶ pgbench -M prepared, N clients, T s     → tx/s
//!                      ─▶ order-api in-process, N concurrent POST  → orders/s, ratio
//!                      ─▶ order-api, open loop at R orders/s       → p50/p90/p99/max
//! ```
//!
//! Run against the test stack (`scripts/test --stack-only` starts it):
//!
//! ```sh
//! source .run/test/env
//! cargo run --release -p order-api --example bench_vs_pgbench
//! ```
//!
//! The HTTP load generator runs in this process, so it shares the machine's
//! CPUs with the service (as pgbench shares them with Postgres).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use devstack::bench::{json_post, RawConn};
use devstack::testing::TestDb;
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(about = "order-api orders/s vs pgbench, and p99 latency at a fixed rate")]
struct Args {
    /// Concurrent clients (pgbench -c) and concurrent HTTP requests; also the pool size.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Seconds of each closed-loop measurement (after a 2 s warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Rounds of pgbench then order-api; the medians are compared (the
    /// machine is shared, so single runs are noisy).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Open-loop arrival rate, orders per second.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Seconds of the open-loop measurement.
    #[arg(long, default_value_t = 10)]
    rate_seconds: u64,
    /// HTTP client of the closed loop (the open loop always uses reqwest).
    #[arg(long, value_enum, default_value = "raw")]
    client: LoadClient,
    /// The pgbench binary.
    #[arg(long, default_value = "/usr/lib/postgresql/15/bin/pgbench")]
    pgbench: String,
}

const ORDER: &str = r#"{"user_id":42,"email":"bench@example.com","currency":"EUR","items":[{"sku":"A-1","quantity":2,"unit_price_cents":1999}]}"#;

/// The transaction order-api runs for POST /orders, as a pgbench script:
/// the orders row (returning what the API returns), then its outbox row
/// with the same payload fields.
const PGBENCH_SCRIPT: &str = r#"\set uid random(1, 100000)
BEGIN;
INSERT INTO orders (user_id, email, status, items, total_cents, currency) VALUES (:uid, 'bench@example.com', 'CREATED', '[{"sku": "A-1", "quantity": 2, "unit_price_cents": 1999}]', 3998, 'EUR') RETURNING id, user_id, email, status, items, total_cents, currency, created_at, updated_at \gset
INSERT INTO outbox (aggregate_type, aggregate_id, user_id, event_type, payload) VALUES ('order', :id, :uid, 'OrderCreated', jsonb_build_object('order_id', :id::bigint, 'user_id', :uid::bigint, 'email', 'bench@example.com', 'status', 'CREATED', 'items', '[{"sku": "A-1", "quantity": 2, "unit_price_cents": 1999}]'::jsonb, 'total_cents', 3998, 'currency', 'EUR', 'created_at', now(), 'updated_at', now()));
END;
"#;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Runtime::new().context("runtime")?;
    rt.block_on(bench(args))
}

async fn bench(args: Args) -> anyhow::Result<()> {
    let db = TestDb::create().await.context("a fresh test database")?;
    println!(
        "database: fresh test database {} ({} clients/connections, {} rounds of {} s each, \
         pgbench and order-api alternating)",
        db.name, args.concurrency, args.rounds, args.seconds
    );

    let mut cfg = order_api::config::Config::for_database(&db.url);
    cfg.listen = "127.0.0.1:0".parse()?;
    cfg.pool_size = args.concurrency;
    let server = order_api::bind(cfg).await?;
    let addr = server.local_addr();
    let base = format!("http://{addr}");
    let shutdown = CancellationToken::new();
    let serving = tokio::spawn(server.serve(shutdown.clone()));
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency * 2)
        .build()?;

    // Warm-up: connections, prepared statements, caches.
    closed_loop(
        &http,
        addr,
        args.client,
        args.concurrency,
        Duration::from_secs(2),
    )
    .await?;
    pgbench(&args, &db, 2).await?;

    let mut pg_rates = Vec::new();
    let mut api_rates = Vec::new();
    for round in 1..=args.rounds {
        let pg_tps = pgbench(&args, &db, args.seconds).await?;
        let cpu_before = process_cpu_seconds();
        let (ok, errors, elapsed) = closed_loop(
            &http,
            addr,
            args.client,
            args.concurrency,
            Duration::from_secs(args.seconds),
        )
        .await?;
        let cpu = process_cpu_seconds() - cpu_before;
        let api_rate = ok as f64 / elapsed.as_secs_f64();
        println!(
            "round {round}: pgbench {pg_tps:.1} tx/s; order-api {api_rate:.1} orders/s \
             ({errors} errors; service + HTTP client used {:.0} µs CPU per order); ratio {:.2}",
            cpu / ok.max(1) as f64 * 1e6,
            api_rate / pg_tps
        );
        pg_rates.push(pg_tps);
        api_rates.push(api_rate);
    }
    let (pg, api) = (median(&mut pg_rates), median(&mut api_rates));
    println!(
        "pgbench  (BEGIN; INSERT orders; INSERT outbox; END, -M prepared, -c {} -j 2), median: {pg:.1} tx/s",
        args.concurrency
    );
    println!(
        "order-api (POST /orders, {} concurrent, in-process {:?} client), median: {api:.1} orders/s",
        args.concurrency, args.client
    );
    println!(
        "ratio order-api / pgbench (medians): {:.2} (target >= 0.8)",
        api / pg
    );

    open_loop(
        &http,
        &base,
        args.rate,
        Duration::from_secs(args.rate_seconds),
    )
    .await?;

    shutdown.cancel();
    serving.await??;
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// CPU seconds (user + system) this process has used, from /proc/self/stat
/// (0 where that does not exist).
fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields overall, in clock ticks (100 per second on Linux).
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

async fn pgbench(args: &Args, db: &TestDb, seconds: u64) -> anyhow::Result<f64> {
    let dir = std::env::temp_dir().join(devstack::testing::unique_name("bench"));
    std::fs::create_dir_all(&dir)?;
    let script = dir.join("create_order.sql");
    std::fs::write(&script, PGBENCH_SCRIPT)?;
    let run = |secs: u64| {
        let mut cmd = tokio::process::Command::new(&args.pgbench);
        cmd.args(["-n", "-M", "prepared", "-j", "2"])
            .arg("-c")
            .arg(args.concurrency.to_string())
            .arg("-T")
            .arg(secs.to_string())
            .arg("-f")
            .arg(&script)
            .arg(&db.url);
        cmd
    };
    let out = run(seconds).output().await.context("running pgbench")?;
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "pgbench failed: {}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let failed = stdout
        .lines()
        .find(|l| l.starts_with("number of failed transactions"))
        .unwrap_or("");
    if !failed.is_empty() && !failed.contains(": 0 ") {
        bail!("pgbench had failures: {failed}");
    }
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no tps in pgbench output:\n{stdout}"))
}

async fn post_order(http: &reqwest::Client, url: &str) -> bool {
    match http
        .post(url)
        .header("content-type", "application/json")
        .body(ORDER)
        .send()
        .await
    {
        Ok(r) => {
            let created = r.status().as_u16() == 201;
            // Read the body so the connection is reused.
            let _ = r.bytes().await;
            created
        }
        Err(_) => false,
    }
}

/// The closed loop's HTTP client.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LoadClient {
    /// A minimal keep-alive HTTP/1.1 client (prebuilt request bytes, like
    /// wrk): little CPU, so the figure is the service's.
    Raw,
    /// reqwest (hyper): a realistic Rust client, which costs about as much
    /// CPU per request as the service does.
    Reqwest,
}

/// `concurrency` loops of POST /orders for `duration`: (created, errors, elapsed).
async fn closed_loop(
    http: &reqwest::Client,
    addr: std::net::SocketAddr,
    client: LoadClient,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<(u64, u64, Duration)> {
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let url = format!("http://{addr}/orders");
    let raw_request: Arc<[u8]> = json_post(addr, "/orders", ORDER).into();
    let start = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (http, url, raw_request) = (http.clone(), url.clone(), raw_request.clone());
            let (ok, errors, stop) = (ok.clone(), errors.clone(), stop.clone());
            tokio::spawn(async move {
                let mut conn = None;
                while !stop.load(Ordering::Relaxed) {
                    let created = match client {
                        LoadClient::Reqwest => post_order(&http, &url).await,
                        LoadClient::Raw => {
                            if conn.is_none() {
                                conn = RawConn::connect(addr).await.ok();
                            }
                            match conn.as_mut() {
                                Some(c) => match c.send(&raw_request).await {
                                    Ok(status) => status == 201,
                                    Err(_) => {
                                        conn = None;
                                        false
                                    }
                                },
                                None => false,
                            }
                        }
                    };
                    if created {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(duration).await;
    // Count what completed within the window.
    let (done, failed, elapsed) = (
        ok.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
        start.elapsed(),
    );
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await?;
    }
    Ok((done, failed, elapsed))
}

/// Requests at a fixed arrival rate whatever the response times (latency
/// counted from each request's scheduled time, so queueing shows).
async fn open_loop(
    http: &reqwest::Client,
    base: &str,
    rate: u64,
    duration: Duration,
) -> anyhow::Result<()> {
    let total = rate * duration.as_secs();
    let url = format!("{base}/orders");
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let scheduled = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(scheduled).await;
        let (http, url) = (http.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let ok = post_order(&http, &url).await;
            (ok, scheduled.elapsed())
        }));
    }
    let mut latencies = Vec::with_capacity(tasks.len());
    let mut errors = 0u64;
    for t in tasks {
        let (ok, latency) = t.await?;
        if ok {
            latencies.push(latency);
        } else {
            errors += 1;
        }
    }
    let achieved = total as f64 / start.elapsed().as_secs_f64();
    latencies.sort();
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i].as_secs_f64() * 1000.0
    };
    println!(
        "open loop {rate} orders/s for {} s: {total} sent, {} created, {errors} errors, \
         {achieved:.0}/s completed; latency ms p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2} max {:.2}",
        duration.as_secs(),
        latencies.len(),
        pct(0.50),
        pct(0.90),
        pct(0.99),
        pct(0.999),
        latencies
            .last()
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
    );
    Ok(())
}
