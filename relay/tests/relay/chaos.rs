//! The chaos suite: concurrent writers commit outbox transactions of random
//! sizes (ids committing out of order, some rolled back) while faults hit
//! every part at random moments; then a checker reads the topic and counts
//! what was lost, duplicated, out of per-key commit order, or produced from
//! a rolled-back transaction. All four must be 0.
//!
//! ```text
//!   writers ──▶ private Postgres ◀── TCP proxy ◀── relay processes ──▶ private Apache Kafka
//!   faults:     restart (fast,       cut for         kill -9; two       1 node: SIGSTOP for seconds
//!               immediate)           seconds         at once            3 nodes: SIGSTOP of any node;
//!                                                                       kill -9 of a partition's
//!                                                                       leader, restarted seconds
//!                                                                       later; graceful restart
//! ```
//!
//! One test per setup: one broker or three (topic replication 3,
//! `min.insync.replicas=2`), each in the relay's default `--delivery
//! exactly-once` (no Kafka transactions) and with `--kafka-transactions`
//! (the checker then reads `read_committed`); and the table-less outbox on
//! one broker: each transaction writes its events as outbox rows, as
//! logical decoding messages (`pg_logical_emit_message`), or both, in
//! random order (a ledger table the relay never reads tells the checker
//! which messages committed). The writers keep committing,
//! more slowly once `CHAOS_EVENTS` rows are in, until the last fault, so
//! every fault hits a live stream.
//!
//! `scripts/test` runs the short versions (see [`defaults`]);
//! `scripts/chaos [--cluster 3] [--kafka-transactions] [--messages] --events N
//! --faults-per-kind K` one of them at any size. The size comes from
//! `CHAOS_EVENTS`, `CHAOS_FAULTS_PER_KIND`, `CHAOS_WRITERS` and
//! `CHAOS_MAX_PAUSE_MS` (between a writer's transactions), the random seed
//! from `CHAOS_SEED` (printed, so a failing run can be repeated).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{event_id, lsn_seq, relay_args, RelayProcess};
use devstack::cluster::PgCluster;
use devstack::kafka::TopicReader;
use devstack::kafka_cluster::KafkaCluster;
use devstack::proxy::Proxy;
use outbox_record::header;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Fault {
    KillRelay,
    TwoRelays,
    RestartPostgres,
    FreezeBroker,
    CutConnections,
    /// Three brokers: `kill -9` of the leader of a partition the relay
    /// writes to, restarted 2–5 s later.
    KillLeader,
    /// Three brokers: SIGTERM (controlled shutdown) of a broker, started
    /// again.
    RestartBroker,
}

const FAULTS: [Fault; 5] = [
    Fault::KillRelay,
    Fault::TwoRelays,
    Fault::RestartPostgres,
    Fault::FreezeBroker,
    Fault::CutConnections,
];

const CLUSTER_FAULTS: [Fault; 7] = [
    Fault::KillRelay,
    Fault::TwoRelays,
    Fault::RestartPostgres,
    Fault::FreezeBroker,
    Fault::CutConnections,
    Fault::KillLeader,
    Fault::RestartBroker,
];

const PARTITIONS: i32 = 3;

/// One setup of the suite.
#[derive(Clone, Copy, Debug)]
struct Setup {
    brokers: usize,
    kafka_transactions: bool,
    /// Writers emit events as messages as well as rows.
    messages: bool,
}

impl Setup {
    fn faults(self) -> &'static [Fault] {
        if self.brokers > 1 {
            &CLUSTER_FAULTS
        } else {
            &FAULTS
        }
    }

    fn delivery(self) -> &'static str {
        if self.kafka_transactions {
            "exactly-once, --kafka-transactions (checker read_committed)"
        } else {
            "exactly-once (no Kafka transactions)"
        }
    }
}

/// The short run's size (events, faults of each kind) when `CHAOS_EVENTS`
/// and `CHAOS_FAULTS_PER_KIND` are not set: what `scripts/test` runs.
fn defaults(setup: Setup) -> (u64, u64) {
    if setup.brokers > 1 || setup.messages {
        (10_000, 3)
    } else {
        (20_000, 5)
    }
}

#[tokio::test]
async fn serial_chaos_one_broker_exactly_once() -> anyhow::Result<()> {
    chaos(Setup {
        brokers: 1,
        kafka_transactions: false,
        messages: false,
    })
    .await
}

#[tokio::test]
async fn serial_chaos_one_broker_kafka_transactions() -> anyhow::Result<()> {
    chaos(Setup {
        brokers: 1,
        kafka_transactions: true,
        messages: false,
    })
    .await
}

#[tokio::test]
async fn serial_chaos_three_brokers_exactly_once() -> anyhow::Result<()> {
    chaos(Setup {
        brokers: 3,
        kafka_transactions: false,
        messages: false,
    })
    .await
}

#[tokio::test]
async fn serial_chaos_three_brokers_kafka_transactions() -> anyhow::Result<()> {
    chaos(Setup {
        brokers: 3,
        kafka_transactions: true,
        messages: false,
    })
    .await
}

#[tokio::test]
async fn serial_chaos_one_broker_messages() -> anyhow::Result<()> {
    chaos(Setup {
        brokers: 1,
        kafka_transactions: false,
        messages: true,
    })
    .await
}

/// Rows as outbox rows (the row's id).
const INSERT_ROWS: &str =
    "INSERT INTO outbox (aggregate_type, aggregate_id, user_id, event_type, payload) \
     SELECT 'order', g::text, $1::bigint + g % 3, 'Chaos', '{}'::jsonb \
     FROM generate_series(1, $2::int) g RETURNING id";

/// Events as transactional messages, ids from the outbox sequence (as
/// order-api's message mode), ledgered for the checker.
const EMIT_MESSAGES: &str =
    "WITH e AS (SELECT g, nextval(pg_get_serial_sequence('outbox', 'id')) AS id \
       FROM generate_series(1, $2::int) g), \
     ledger AS (INSERT INTO chaos_emitted SELECT id FROM e) \
     SELECT id FROM e WHERE pg_logical_emit_message(true, 'outbox', json_build_object(\
       'id', id, 'aggregate_type', 'order', 'aggregate_id', g::text, \
       'user_id', $1::bigint + g % 3, 'event_type', 'Chaos', 'payload', '{}'::json)::text) \
       IS NOT NULL ORDER BY g";

/// What the writers did: ids of committed and of rolled-back rows.
#[derive(Default)]
struct Written {
    rolled_back: BTreeSet<i64>,
}

async fn chaos(setup: Setup) -> anyhow::Result<()> {
    let (default_events, default_per_kind) = defaults(setup);
    let events = env_or("CHAOS_EVENTS", default_events);
    let per_kind = env_or("CHAOS_FAULTS_PER_KIND", default_per_kind) as usize;
    let writers_n = env_or("CHAOS_WRITERS", 8);
    let max_pause_ms = env_or("CHAOS_MAX_PAUSE_MS", 120).max(1);
    let seed = env_or(
        "CHAOS_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs(),
    );
    let faults = setup.faults();
    println!(
        "chaos: {} broker(s), {}{}: {events} events, at least {per_kind} faults of each kind, seed {seed}",
        setup.brokers,
        setup.delivery(),
        if setup.messages { ", rows and messages" } else { "" }
    );
    let mut rng = StdRng::seed_from_u64(seed);

    let cluster = PgCluster::start().await?;
    let url = cluster.url("outbox");
    devstack::testing::connect(&url)
        .await?
        .batch_execute("CREATE TABLE chaos_emitted (id bigint PRIMARY KEY)")
        .await?;
    let pg_port: u16 = url
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split('/').next())
        .and_then(|p| p.parse().ok())
        .expect("port in the cluster URL");
    let proxy = Proxy::start(format!("127.0.0.1:{pg_port}").parse()?).await?;
    let relay_url = url.replacen(
        &format!(":{pg_port}/"),
        &format!(":{}/", proxy.addr.port()),
        1,
    );
    let broker_start = Instant::now();
    let broker = KafkaCluster::start(setup.brokers).await?;
    let nodes = broker.node_ids();
    println!(
        "chaos: {} Kafka node(s) up in {:.0} s, logs in {}",
        nodes.len(),
        broker_start.elapsed().as_secs_f64(),
        broker.log_dir().display()
    );
    let topic = "chaos.order-outbox";
    devstack::kafka::create_topic_replicated(
        &broker.bootstrap(),
        topic,
        PARTITIONS,
        setup.brokers as i32,
    )
    .await?;
    let mut extra = vec![
        "--standby-poll-interval",
        "250ms",
        "--lease",
        "3s",
        "--heartbeat-interval",
        "500ms",
    ];
    if setup.kafka_transactions {
        extra.push("--kafka-transactions");
    }
    let args = relay_args(
        &relay_url,
        "outbox_relay",
        topic,
        &broker.bootstrap(),
        &extra,
    );
    let mut relays: Vec<RelayProcess> = vec![RelayProcess::spawn(&args).await?];

    // Writers: transactions of 1..=20 rows, held open for a random moment so
    // ids commit out of order; 5 % rolled back.
    let written = Arc::new(Mutex::new(Written::default()));
    let committed_rows = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..writers_n {
        let (url, written, committed_rows, done) = (
            url.clone(),
            written.clone(),
            committed_rows.clone(),
            done.clone(),
        );
        let mut rng = StdRng::seed_from_u64(seed ^ (w + 1).wrapping_mul(0x9E37_79B9));
        writers.push(tokio::spawn(async move {
            let mut client = None;
            while !done.load(Ordering::Relaxed) {
                let Some(c) = &mut client else {
                    client = devstack::testing::connect(&url).await.ok();
                    if client.is_none() {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    continue;
                };
                let n: i32 = rng.random_range(1..=20);
                let user: i64 = rng.random_range(1..=50);
                let hold = Duration::from_millis(rng.random_range(0..30));
                let rollback = rng.random_bool(0.05);
                // With messages: of the n events, `as_messages` are messages,
                // emitted before or after the rows.
                let as_messages = if setup.messages {
                    rng.random_range(0..=n)
                } else {
                    0
                };
                let messages_first = rng.random_bool(0.5);
                let result: Result<Vec<i64>, tokio_postgres::Error> = async {
                    let tx = c.transaction().await?;
                    let mut ids: Vec<i64> = Vec::new();
                    let mut parts = [(INSERT_ROWS, n - as_messages), (EMIT_MESSAGES, as_messages)];
                    if messages_first {
                        parts.reverse();
                    }
                    for (statement, count) in parts {
                        if count > 0 {
                            let rows = tx.query(statement, &[&user, &count]).await?;
                            ids.extend(rows.iter().map(|r| r.get::<_, i64>(0)));
                        }
                    }
                    tokio::time::sleep(hold).await;
                    if rollback {
                        tx.rollback().await?;
                    } else {
                        tx.commit().await?;
                    }
                    Ok(ids)
                }
                .await;
                match result {
                    Ok(ids) if rollback => written.lock().unwrap().rolled_back.extend(ids),
                    Ok(ids) => {
                        committed_rows.fetch_add(ids.len(), Ordering::Relaxed);
                    }
                    // Whether it committed is for the table to say.
                    Err(_) => client = None,
                }
                // Once the run's events are in, a trickle until the last
                // fault, so no fault hits an idle stream.
                let pause = if committed_rows.load(Ordering::Relaxed) < events as usize {
                    rng.random_range(0..max_pause_ms)
                } else {
                    rng.random_range(250..2000)
                };
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        }));
    }

    // Faults, at random moments, until the writers are done and every kind
    // happened often enough.
    let mut counts: BTreeMap<Fault, usize> = BTreeMap::new();
    let started = Instant::now();
    let mut last_progress = Instant::now();
    loop {
        if last_progress.elapsed() >= Duration::from_secs(60) {
            last_progress = Instant::now();
            println!(
                "chaos: {:.0} s, {} rows committed, faults {counts:?}",
                started.elapsed().as_secs_f64(),
                committed_rows.load(Ordering::Relaxed)
            );
        }
        let enough = faults
            .iter()
            .all(|f| counts.get(f).copied().unwrap_or(0) >= per_kind);
        if enough && committed_rows.load(Ordering::Relaxed) >= events as usize {
            break;
        }
        if started.elapsed() > Duration::from_secs(60 * 60) {
            anyhow::bail!("chaos run did not finish within an hour");
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1500))).await;
        // The least exercised kind first, then random.
        let fault = if enough {
            faults[rng.random_range(0..faults.len())]
        } else {
            *faults
                .iter()
                .min_by_key(|f| {
                    (
                        counts.get(f).copied().unwrap_or(0),
                        rng.random_range(0..100),
                    )
                })
                .expect("a kind")
        };
        let fault_started = Instant::now();
        // Each fault on a line with the wall-clock time, to read beside the
        // relays' logs.
        println!(
            "chaos: {} {fault:?} begins (relays {:?})",
            chrono::Utc::now().format("%H:%M:%S%.3f"),
            relays.iter().map(|r| r.child.id()).collect::<Vec<_>>()
        );
        match fault {
            Fault::KillRelay => {
                let victim = relays.remove(rng.random_range(0..relays.len()));
                println!("chaos: kill -9 of relay {:?}", victim.child.id());
                victim.kill_9().await?;
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..800))).await;
                if relays.is_empty() {
                    relays.push(RelayProcess::spawn_only(&args)?);
                }
            }
            Fault::TwoRelays => {
                relays.push(RelayProcess::spawn_only(&args)?);
                tokio::time::sleep(Duration::from_millis(rng.random_range(500..2500))).await;
                while relays.len() > 1 {
                    let victim = relays.remove(rng.random_range(0..relays.len()));
                    println!("chaos: kill -9 of relay {:?}", victim.child.id());
                    victim.kill_9().await?;
                }
            }
            Fault::RestartPostgres => {
                if rng.random_bool(0.5) {
                    cluster.restart_fast()?;
                } else {
                    println!("chaos: Postgres crash (immediate stop)");
                    cluster.crash()?;
                    tokio::time::sleep(Duration::from_millis(rng.random_range(0..1000))).await;
                    cluster.start_again()?;
                }
            }
            Fault::FreezeBroker => {
                let node = nodes[rng.random_range(0..nodes.len())];
                broker.freeze(node)?;
                tokio::time::sleep(Duration::from_millis(rng.random_range(1000..4000))).await;
                broker.thaw(node)?;
            }
            Fault::CutConnections => {
                proxy.freeze();
                tokio::time::sleep(Duration::from_millis(rng.random_range(1000..4000))).await;
                proxy.heal();
            }
            Fault::KillLeader => {
                // From a whole cluster: two brokers down would stall
                // (min.insync.replicas=2), not test anything more.
                let t = Instant::now();
                broker.wait_in_sync(Duration::from_secs(120)).await?;
                let in_sync = t.elapsed();
                let partition = rng.random_range(0..PARTITIONS);
                let node = leader(&broker, topic, partition).await?;
                broker.kill9(node)?;
                let down = Duration::from_millis(rng.random_range(2000..5000));
                tokio::time::sleep(down).await;
                let t = Instant::now();
                broker.restart(node).await?;
                println!(
                    "chaos: {:.0} s, kill -9 of broker {node} (leader of partition {partition}; \
                     all replicas in sync after {:.1} s), restarted {:.1} s later, back in {:.1} s, \
                     {} rows committed",
                    started.elapsed().as_secs_f64(),
                    in_sync.as_secs_f64(),
                    down.as_secs_f64(),
                    t.elapsed().as_secs_f64(),
                    committed_rows.load(Ordering::Relaxed),
                );
            }
            Fault::RestartBroker => {
                let t = Instant::now();
                broker.wait_in_sync(Duration::from_secs(120)).await?;
                let in_sync = t.elapsed();
                let node = nodes[rng.random_range(0..nodes.len())];
                let t = Instant::now();
                broker.stop(node).await?;
                let stopped = t.elapsed();
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..1000))).await;
                broker.restart(node).await?;
                println!(
                    "chaos: {:.0} s, broker {node} restarted (all replicas in sync after {:.1} s; \
                     SIGTERM took {:.1} s, down {:.1} s), {} rows committed",
                    started.elapsed().as_secs_f64(),
                    in_sync.as_secs_f64(),
                    stopped.as_secs_f64(),
                    t.elapsed().as_secs_f64(),
                    committed_rows.load(Ordering::Relaxed)
                );
            }
        }
        if fault_started.elapsed() > Duration::from_secs(20) {
            println!(
                "chaos: {:.0} s, {fault:?} took {:.0} s",
                started.elapsed().as_secs_f64(),
                fault_started.elapsed().as_secs_f64()
            );
        }
        println!(
            "chaos: {} {fault:?} ends",
            chrono::Utc::now().format("%H:%M:%S%.3f")
        );
        *counts.entry(fault).or_default() += 1;
    }
    done.store(true, Ordering::Relaxed);
    for w in writers {
        w.await?;
    }
    if relays.is_empty() {
        relays.push(RelayProcess::spawn_only(&args)?);
    }
    let fault_seconds = started.elapsed();

    // The checker.
    let client = devstack::testing::connect(&url).await?;
    // Committed events: rows, and messages by their ledger.
    let table: BTreeSet<i64> = client
        .query(
            "SELECT id FROM outbox UNION ALL SELECT id FROM chaos_emitted",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let rolled_back = written.lock().unwrap().rolled_back.clone();
    let read_committed = setup.kafka_transactions;
    let records = crate::common::read_until_all_isolated(
        &broker.bootstrap(),
        topic,
        &table,
        Duration::from_secs(300),
        read_committed,
    )
    .await;
    let records = match records {
        Ok(r) => r,
        Err(e) => {
            // Read what is there to report it.
            eprintln!("{e:#}");
            TopicReader::with_isolation(&broker.bootstrap(), topic, true, read_committed)?
                .read_at_least(usize::MAX, Duration::from_secs(30), Duration::from_secs(2))
                .await?
        }
    };
    // With Kafka transactions: what the log holds besides, in aborted
    // transactions (a read_uncommitted reader sees those too).
    let uncommitted = if read_committed {
        let reader = TopicReader::new(&broker.bootstrap(), topic, true)?;
        Some(
            reader
                .read_at_least(
                    records.len(),
                    Duration::from_secs(120),
                    Duration::from_secs(2),
                )
                .await?,
        )
    } else {
        None
    };
    let produced: Vec<i64> = records.iter().map(event_id).collect();
    let unique: BTreeSet<i64> = produced.iter().copied().collect();
    let lost = table.difference(&unique).count();
    let duplicated = produced.len() - unique.len();
    // A record of a row that never committed: not in the table. (A
    // rolled-back row's id alone does not tell: after a Postgres crash the
    // identity sequence restarts from its last WAL-logged value, so ids a
    // rolled-back transaction took can return on rows that commit later.)
    let from_rollbacks = unique.difference(&table).count();
    let reused_ids = rolled_back.intersection(&table).count();
    let mut per_key: HashMap<String, (relay::lsn::Lsn, u64)> = HashMap::new();
    let mut out_of_order = 0;
    for r in &records {
        let key = r.key.clone().unwrap_or_default();
        let pos = lsn_seq(r);
        if let Some(prev) = per_key.insert(key, pos) {
            if prev >= pos {
                out_of_order += 1;
            }
        }
    }
    println!();
    println!("| chaos run (seed {seed}) | value |");
    println!("|---|---:|");
    println!(
        "| brokers | {} |",
        if setup.brokers > 1 {
            format!(
                "{} (topic replication {}, min.insync.replicas 2)",
                setup.brokers, setup.brokers
            )
        } else {
            "1".to_owned()
        }
    );
    println!("| delivery | {} |", setup.delivery());
    if setup.messages {
        let messages: i64 = client
            .query_one("SELECT count(*) FROM chaos_emitted", &[])
            .await?
            .get(0);
        println!("| events committed | {} |", table.len());
        println!("| of them written as messages | {messages} |");
    } else {
        println!("| events committed (rows in the table) | {} |", table.len());
    }
    println!("| rows rolled back | {} |", rolled_back.len());
    println!("| records in the topic | {} |", produced.len());
    if let Some(all) = &uncommitted {
        println!(
            "| records in aborted Kafka transactions (read_uncommitted − read_committed) | {} |",
            all.len().saturating_sub(produced.len())
        );
    }
    for &f in faults {
        println!(
            "| faults: {f:?} | {} |",
            counts.get(&f).copied().unwrap_or(0)
        );
    }
    println!(
        "| run time with faults | {:.0} s |",
        fault_seconds.as_secs_f64()
    );
    println!("| **lost** | {lost} |");
    println!("| **duplicated** | {duplicated} |");
    println!("| **out of per-key commit order** | {out_of_order} |");
    println!("| **not committed (from rolled-back transactions)** | {from_rollbacks} |");
    println!("| rolled-back ids reused by later commits (after a crash) | {reused_ids} |");
    if lost > 0 {
        // Where the lost events are, if anywhere (aborted transactions).
        let lost_ids: BTreeSet<i64> = table.difference(&unique).copied().collect();
        let mut found: BTreeMap<i32, Vec<(i64, i64, String)>> = BTreeMap::new();
        for r in uncommitted.iter().flatten() {
            if lost_ids.contains(&event_id(r)) {
                found.entry(r.partition).or_default().push((
                    r.offset,
                    event_id(r),
                    r.header(header::LSN).unwrap_or("").to_owned(),
                ));
            }
        }
        for (p, v) in &found {
            let (first, last) = (v.first().expect("one"), v.last().expect("one"));
            println!(
                "lost events in partition {p} (read_uncommitted): {} records, offsets {}..={} \
                 (event {} lsn {} .. event {} lsn {})",
                v.len(),
                first.0,
                last.0,
                first.1,
                first.2,
                last.1,
                last.2
            );
        }
    }
    for r in relays {
        r.kill_9().await?;
    }
    assert_eq!(
        (lost, duplicated, out_of_order, from_rollbacks),
        (0, 0, 0, 0),
        "lost, duplicated, out of order, rolled back"
    );
    assert!(table.len() >= events as usize);
    Ok(())
}

/// The leader of `topic`/`partition`, waiting out an election.
async fn leader(broker: &KafkaCluster, topic: &str, partition: i32) -> anyhow::Result<i32> {
    devstack::testing::wait_for(
        &format!("a leader of {topic}/{partition}"),
        Duration::from_secs(60),
        || async { Ok(broker.leader_of(topic, partition).await.ok().flatten()) },
    )
    .await
}
