//! `scripts/bench vs-debezium`: the relay and Debezium (Kafka Connect
//! standalone with the Postgres connector and the Outbox Event Router) on
//! the same outbox, the same Apache Kafka and the same machine, one system
//! at a time.
//!
//! ```text
//!   backlog ─▶ outbox ─┬─ slot <db>_relay ─▶ relay (release binary) ─▶ topic <db>-relay (P partitions)
//!   (both stopped)     └─ slot <db>_dbz  ─▶ Connect + Debezium     ─▶ topic <db>.order  (P partitions)
//! ```
//!
//! Measured so far: **catch-up** — a backlog written while both systems are
//! stopped (one-row transactions, then one transaction of as many rows),
//! then `pg_recvlogical` (the baseline: Postgres decoding and sending it,
//! no Kafka) and each system started on it in turn: time from its start to its
//! first and to the last record acknowledged in Kafka (the relay's `relay_events_total`; for
//! Debezium the topic's high watermarks, which count its records: its
//! producer is not transactional), events/s, CPU seconds and peak RSS of the
//! whole process (the JVM's for Connect). Then **idle cost**: RSS and CPU of
//! each over `--idle-seconds` with no writes.
//!
//! Both slots exist before the backlog is written, so both see all of it.
//! Debezium's settings are printed with the results (`DEBEZIUM_SETTINGS`):
//! tuned as its docs advise for throughput and latency.
//!
//! Nothing here asserts anything: it prints figures and ratios.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use devstack::bench::{cpu_seconds, peak_rss_kib, rss_kib, RelayProcess, ScratchDb, StackArgs};
use devstack::testing::connect;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

#[derive(Parser, Debug)]
#[command(about = "relay vs Debezium (Kafka Connect) on the same backlog and broker")]
struct Args {
    #[command(flatten)]
    stack: StackArgs,
    /// Outbox rows in each backlog.
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Partitions of both topics (the stack's outbox topic has 12).
    #[arg(long, default_value_t = 12)]
    partitions: i32,
    /// The release relay binary.
    #[arg(long, default_value = "target/release/relay")]
    relay_bin: PathBuf,
    /// Directory of the Kafka Connect and Debezium jars (scripts/bench
    /// fetches them once).
    #[arg(long, env = "DEBEZIUM_LIBS")]
    connect_libs: PathBuf,
    /// log4j2 configuration for Connect.
    #[arg(long, default_value = "kafka/log4j2.properties")]
    log4j: PathBuf,
    /// Seconds of the idle measurement.
    #[arg(long, default_value_t = 60)]
    idle_seconds: u64,
    /// The baseline: Postgres's own client of the same slot kind.
    #[arg(long, default_value = "/usr/lib/postgresql/15/bin/pg_recvlogical")]
    pg_recvlogical: PathBuf,
    /// Give up on a run after this long.
    #[arg(long, default_value = "600s", value_parser = lifecycle::parse_duration)]
    timeout: Duration,
}

/// Debezium's connector and worker settings beyond the essentials: as its
/// documentation advises for low latency and high throughput (batches and
/// queue larger than the defaults 2048/8192, a short poll interval instead
/// of 500 ms, the producer's linger at 1 ms, offsets flushed every second).
const DEBEZIUM_SETTINGS: &[(&str, &str)] = &[
    ("poll.interval.ms", "5"),
    ("max.batch.size", "8192"),
    ("max.queue.size", "65536"),
    ("producer.override.linger.ms", "1"),
    ("producer.override.batch.size", "262144"),
    ("offset.flush.interval.ms", "1000"),
    ("heap (-Xmx)", "1G"),
];

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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.relay_bin.is_file(),
        "{} is not built: cargo build --release -p relay",
        args.relay_bin.display()
    );
    anyhow::ensure!(
        args.connect_libs.is_dir(),
        "{} holds no Connect jars: scripts/bench vs-debezium fetches them",
        args.connect_libs.display()
    );
    println!(
        "vs-debezium: {} events, {} partitions, one system at a time",
        args.events, args.partitions
    );
    println!("Debezium settings beyond the essentials:");
    for (k, v) in DEBEZIUM_SETTINGS {
        println!("  {k} = {v}");
    }
    let mut rows = Vec::new();
    for rows_per_txn in [1, args.events] {
        let db = ScratchDb::create(&args.stack.database_url, "vsdbz").await?;
        let slots = [
            format!("{}_relay", db.name),
            format!("{}_dbz", db.name),
            format!("{}_recv", db.name),
        ];
        let result = catch_up(&args, &db, &slots, rows_per_txn).await;
        db.drop_with_slots(&slots).await;
        rows.extend(result?);
    }
    let idle = {
        let db = ScratchDb::create(&args.stack.database_url, "vsdbz").await?;
        let slots = [
            format!("{}_relay", db.name),
            format!("{}_dbz", db.name),
            format!("{}_recv", db.name),
        ];
        let result = idle_cost(&args, &db, &slots).await;
        db.drop_with_slots(&slots).await;
        result?
    };

    println!();
    println!(
        "{:<10} {:<26} {:>9} {:>9} {:>10} {:>8} {:>10}",
        "system", "backlog", "first s", "last s", "events/s", "cpu s", "peak MiB"
    );
    for r in &rows {
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
    let find = |system: &str, one_row: bool| {
        rows.iter()
            .find(|r| r.system == system && r.shape.starts_with("one-row") == one_row)
    };
    let (relay, dbz) = (find("relay", true), find("debezium", true));
    let drain = match (relay, dbz) {
        (Some(r), Some(d)) => r.rate(args.events) / d.rate(args.events),
        _ => f64::NAN,
    };
    let peak = |s: &str| {
        rows.iter()
            .filter(|r| r.system == s)
            .map(|r| r.peak_rss_kib)
            .max()
            .unwrap_or(0) as f64
    };
    let rss = peak("debezium") / peak("relay");
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
        "vs-debezium: drain ratio {drain:.2}, p99 ratio at 1000/s n/a (not measured yet), rss ratio {rss:.1}, duplicates after kills relay n/a debezium n/a"
    );
    Ok(())
}

/// Slots and publications for both systems, before any row is written.
async fn prepare(args: &Args, db: &ScratchDb, slots: &[String; 3]) -> anyhow::Result<[String; 2]> {
    devstack::migrations::apply(&db.url).await?;
    let client = connect(&db.url).await?;
    client
        .batch_execute("CREATE PUBLICATION debezium_pub FOR TABLE outbox")
        .await?;
    for slot in slots {
        client
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[slot],
            )
            .await?;
    }
    let topics = [format!("{}-relay", db.name), format!("{}.order", db.name)];
    for t in &topics {
        devstack::kafka::create_topic(&args.stack.kafka_bootstrap_servers, t, args.partitions)
            .await?;
    }
    Ok(topics)
}

async fn catch_up(
    args: &Args,
    db: &ScratchDb,
    slots: &[String; 3],
    rows_per_txn: usize,
) -> anyhow::Result<Vec<Measured>> {
    let [relay_topic, dbz_topic] = prepare(args, db, slots).await?;
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
    let mut connect = Connect::spawn(args, db, &slots[1], &dir)?;
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
    let [relay_topic, _] = prepare(args, db, slots).await?;
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
    let mut connect = Connect::spawn(args, db, &slots[1], &dir)?;
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

fn tempdir(name: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("vs-debezium-{name}"));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Kafka Connect standalone with the Debezium connector, as a child process.
struct Connect {
    child: tokio::process::Child,
    pid: u32,
    started: Instant,
    rest: u16,
}

impl Connect {
    fn spawn(args: &Args, db: &ScratchDb, slot: &str, dir: &Path) -> anyhow::Result<Connect> {
        let pg = pgconn::ConnectParams::from_url(&db.url).context("database URL")?;
        let rest = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let setting = |k: &str| {
            DEBEZIUM_SETTINGS
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| *v)
                .expect("listed")
        };
        let worker = format!(
            "bootstrap.servers={bootstrap}\n\
             key.converter=org.apache.kafka.connect.storage.StringConverter\n\
             value.converter=org.apache.kafka.connect.json.JsonConverter\n\
             value.converter.schemas.enable=false\n\
             offset.storage.file.filename={offsets}\n\
             offset.flush.interval.ms={flush}\n\
             listeners=http://127.0.0.1:{rest}\n\
             connector.client.config.override.policy=All\n",
            bootstrap = args.stack.kafka_bootstrap_servers,
            offsets = dir.join("offsets").display(),
            flush = setting("offset.flush.interval.ms"),
        );
        let mut connector = format!(
            "name=outbox-debezium\n\
             connector.class=io.debezium.connector.postgresql.PostgresConnector\n\
             tasks.max=1\n\
             plugin.name=pgoutput\n\
             database.hostname={host}\n\
             database.port={port}\n\
             database.user={user}\n\
             database.password={password}\n\
             database.dbname={dbname}\n\
             topic.prefix=vsdbz\n\
             slot.name={slot}\n\
             publication.name=debezium_pub\n\
             publication.autocreate.mode=disabled\n\
             table.include.list=public.outbox\n\
             snapshot.mode=no_data\n\
             transforms=outbox\n\
             transforms.outbox.type=io.debezium.transforms.outbox.EventRouter\n\
             transforms.outbox.table.field.event.id=id\n\
             transforms.outbox.table.field.event.key=user_id\n\
             transforms.outbox.table.field.event.payload=payload\n\
             transforms.outbox.route.by.field=aggregate_type\n\
             transforms.outbox.route.topic.replacement={dbname}.${{routedByValue}}\n\
             transforms.outbox.table.fields.additional.placement=event_type:header:event_type\n\
             transforms.outbox.table.expand.json.payload=true\n",
            host = pg.host,
            port = pg.port,
            user = pg.user,
            password = pg.password.unwrap_or_default(),
            dbname = db.name,
        );
        for key in [
            "poll.interval.ms",
            "max.batch.size",
            "max.queue.size",
            "producer.override.linger.ms",
            "producer.override.batch.size",
        ] {
            connector.push_str(&format!("{key}={}\n", setting(key)));
        }
        let (worker_file, connector_file) = (
            dir.join("worker.properties"),
            dir.join("connector.properties"),
        );
        std::fs::write(&worker_file, worker)?;
        std::fs::write(&connector_file, connector)?;
        let log = std::fs::File::create(dir.join("connect.log"))?;
        let started = Instant::now();
        let child = tokio::process::Command::new("java")
            .arg(format!("-Xmx{}", setting("heap (-Xmx)")))
            .arg("-cp")
            .arg(format!("{}/*", args.connect_libs.display()))
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                args.log4j.display()
            ))
            .arg("org.apache.kafka.connect.cli.ConnectStandalone")
            .arg(&worker_file)
            .arg(&connector_file)
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting Kafka Connect (java)")?;
        let pid = child.id().context("connect pid")?;
        Ok(Connect {
            child,
            pid,
            started,
            rest,
        })
    }

    /// Waits until the connector's task runs.
    async fn wait_running(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let addr = format!("127.0.0.1:{}", self.rest).parse()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("Kafka Connect exited: {status}");
            }
            if let Ok(body) =
                devstack::bench::http_get(addr, "/connectors/outbox-debezium/status").await
            {
                if body.matches("\"RUNNING\"").count() >= 2 {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("the Debezium connector did not run within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn kill(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// The sum of a topic's high watermarks: its record count when no
/// transactional producer wrote to it.
struct Watermarks {
    consumer: BaseConsumer,
    topic: String,
    partitions: i32,
}

impl Watermarks {
    fn new(bootstrap: &str, topic: &str) -> anyhow::Result<Watermarks> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .create()?;
        let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let partitions = md.topics()[0].partitions().len() as i32;
        Ok(Watermarks {
            consumer,
            topic: topic.to_owned(),
            partitions,
        })
    }

    fn total(&self) -> anyhow::Result<u64> {
        let mut sum = 0;
        for p in 0..self.partitions {
            let (_, high) =
                self.consumer
                    .fetch_watermarks(&self.topic, p, Duration::from_secs(5))?;
            sum += high.max(0) as u64;
        }
        Ok(sum)
    }
}
