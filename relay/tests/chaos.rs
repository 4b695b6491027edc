//! The chaos suite: concurrent writers commit outbox transactions of random
//! sizes (ids committing out of order, some rolled back) while faults hit
//! every part at random moments; then a checker reads the topic and counts
//! what was lost, duplicated, out of per-key commit order, or produced from
//! a rolled-back transaction. All four must be 0.
//!
//! ```text
//!   writers ──▶ private Postgres ◀── TCP proxy ◀── relay processes ──▶ private Tansu
//!   faults:     restart (fast,       cut for         kill -9; two       SIGSTOP for
//!               immediate)           seconds         at once            seconds
//! ```
//!
//! `scripts/test` runs the short version (about 20k events, at least 5 faults
//! of each kind); `scripts/chaos --events N --faults-per-kind K` the long
//! one. The size comes from `CHAOS_EVENTS`, `CHAOS_FAULTS_PER_KIND`,
//! `CHAOS_WRITERS` and `CHAOS_MAX_PAUSE_MS` (between a writer's
//! transactions), the random seed from `CHAOS_SEED` (printed, so a failing
//! run can be repeated).

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{event_id, lsn_seq, relay_args, RelayProcess};
use devstack::cluster::PgCluster;
use devstack::kafka::TopicReader;
use devstack::proxy::Proxy;
use devstack::tansu::Tansu;
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
}

const FAULTS: [Fault; 5] = [
    Fault::KillRelay,
    Fault::TwoRelays,
    Fault::RestartPostgres,
    Fault::FreezeBroker,
    Fault::CutConnections,
];

/// What the writers did: ids of committed and of rolled-back rows.
#[derive(Default)]
struct Written {
    rolled_back: BTreeSet<i64>,
}

#[tokio::test]
async fn serial_chaos_nothing_lost_duplicated_reordered_or_rolled_back() -> anyhow::Result<()> {
    let events = env_or("CHAOS_EVENTS", 20_000);
    let per_kind = env_or("CHAOS_FAULTS_PER_KIND", 5) as usize;
    let writers_n = env_or("CHAOS_WRITERS", 8);
    let max_pause_ms = env_or("CHAOS_MAX_PAUSE_MS", 120).max(1);
    let seed = env_or(
        "CHAOS_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs(),
    );
    println!("chaos: {events} events, at least {per_kind} faults of each kind, seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);

    let cluster = PgCluster::start().await?;
    let url = cluster.url("outbox");
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
    let broker = Tansu::start().await?;
    let topic = "chaos.order-outbox";
    devstack::kafka::create_topic(&broker.bootstrap(), topic, 3).await?;
    let args = relay_args(
        &relay_url,
        "outbox_relay",
        topic,
        &broker.bootstrap(),
        &[
            "--standby-poll-interval",
            "250ms",
            "--lease",
            "3s",
            "--heartbeat-interval",
            "500ms",
        ],
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
            while !done.load(Ordering::Relaxed) && committed_rows.load(Ordering::Relaxed) < events as usize {
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
                let result: Result<Vec<i64>, tokio_postgres::Error> = async {
                    let tx = c.transaction().await?;
                    let rows = tx
                        .query(
                            "INSERT INTO outbox (aggregate_type, aggregate_id, user_id, event_type, payload) \
                             SELECT 'order', g::text, $1::bigint + g % 3, 'Chaos', '{}'::jsonb \
                             FROM generate_series(1, $2::int) g RETURNING id",
                            &[&user, &n],
                        )
                        .await?;
                    let ids = rows.iter().map(|r| r.get(0)).collect();
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
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..max_pause_ms))).await;
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
        let enough = FAULTS
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
            FAULTS[rng.random_range(0..FAULTS.len())]
        } else {
            *FAULTS
                .iter()
                .min_by_key(|f| {
                    (
                        counts.get(f).copied().unwrap_or(0),
                        rng.random_range(0..100),
                    )
                })
                .expect("five kinds")
        };
        match fault {
            Fault::KillRelay => {
                let victim = relays.remove(rng.random_range(0..relays.len()));
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
                    victim.kill_9().await?;
                }
            }
            Fault::RestartPostgres => {
                if rng.random_bool(0.5) {
                    cluster.restart_fast()?;
                } else {
                    cluster.crash()?;
                    tokio::time::sleep(Duration::from_millis(rng.random_range(0..1000))).await;
                    cluster.start_again()?;
                }
            }
            Fault::FreezeBroker => {
                broker.freeze()?;
                tokio::time::sleep(Duration::from_millis(rng.random_range(1000..4000))).await;
                broker.thaw()?;
            }
            Fault::CutConnections => {
                proxy.freeze();
                tokio::time::sleep(Duration::from_millis(rng.random_range(1000..4000))).await;
                proxy.heal();
            }
        }
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
    let table: BTreeSet<i64> = client
        .query("SELECT id FROM outbox", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let rolled_back = written.lock().unwrap().rolled_back.clone();
    let records =
        common::read_until_all(&broker.bootstrap(), topic, &table, Duration::from_secs(300)).await;
    let records = match records {
        Ok(r) => r,
        Err(e) => {
            // Read what is there to report it.
            eprintln!("{e:#}");
            TopicReader::new(&broker.bootstrap(), topic, true)?
                .read_at_least(usize::MAX, Duration::from_secs(30), Duration::from_secs(2))
                .await?
        }
    };
    let produced: Vec<i64> = records.iter().map(event_id).collect();
    let unique: BTreeSet<i64> = produced.iter().copied().collect();
    let lost = table.difference(&unique).count();
    let duplicated = produced.len() - unique.len();
    let from_rollbacks = unique.intersection(&rolled_back).count();
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
    println!("| events committed (rows in the table) | {} |", table.len());
    println!("| rows rolled back | {} |", rolled_back.len());
    println!("| records in the topic | {} |", produced.len());
    for f in FAULTS {
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
    println!("| **from rolled-back transactions** | {from_rollbacks} |");
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
