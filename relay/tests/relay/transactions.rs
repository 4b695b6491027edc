//! `--kafka-transactions`, in two places.
//!
//! On the test stack's Apache Kafka (KRaft, one node; the relay binary as a
//! child process, so it can be killed with `kill -9` and frozen with
//! SIGSTOP), what only a real broker shows:
//! - `a_relay_killed_inside_a_kafka_transaction_exposes_none_of_it`: a
//!   read_committed consumer never sees part of a Postgres transaction, not
//!   while it is produced and not after the relay died in its middle; after
//!   the restart every event is there once, in commit order;
//! - `a_relay_taking_over_the_slot_fences_the_one_before`: a relay that
//!   takes over the slot (same transactional.id) fences the one before it,
//!   whose open transaction is aborted and whose later commit is refused;
//! - `a_restart_finds_the_last_committed_record_behind_aborted_ones`: the
//!   exactly-once reader (`relay/src/dedupe.rs`) steps back past aborted
//!   records and transaction markers at a partition's end;
//! - `a_transaction_partly_in_kafka_is_read_again_then_taken_per_partition`:
//!   partitions' ends that hold part of a Postgres transaction (impossible
//!   with Kafka transactions, but seen while markers are being written, or
//!   on a topic written without them) are read again, and only a view that
//!   stays the same is taken.
//!
//! On librdkafka's mock cluster, what only the mock can inject (errors on
//! EndTxn): records are visible and the slot confirmed only at the Kafka
//! commit, and a commit failing with an abortable error (aborted) or with
//! PRODUCER_FENCED (producer replaced) is replayed; and a session held up
//! readying Kafka (InitProducerId errors) keeps answering its walsender.
//! The mock ignores the
//! isolation level and does not fence on a second InitProducerId, so those
//! tests read with read_uncommitted and see aborted copies.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{
    assert_commit_order, current_wal_lsn, event_id, free_port, http_get, insert_batch, outbox_ids,
    relay_args, relay_config, slot_confirmed, start, RelayProcess,
};
use devstack::kafka::{Record, TopicReader};
use devstack::testing::{create_topic, kafka_bootstrap, unique_name, wait_for, TestDb};
use outbox_record::header;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::ClientConfig;

async fn read_all(bootstrap: &str, topic: &str, committed: bool) -> anyhow::Result<Vec<i64>> {
    let reader = TopicReader::with_isolation(bootstrap, topic, true, committed)?;
    let mut ids = Vec::new();
    while let Some(r) = reader.next(Duration::from_millis(700)).await? {
        ids.push(event_id(&r));
    }
    Ok(ids)
}

// ---------------------------------------------------------------------------
// On the test stack's Apache Kafka.
// ---------------------------------------------------------------------------

/// What a relay process logged (stderr), also echoed to the test's output.
type Log = Arc<Mutex<String>>;

/// Starts the relay binary like [`RelayProcess::spawn_only`], keeping its
/// log lines for assertions.
fn spawn_logged(args: &[String]) -> anyhow::Result<(RelayProcess, Log)> {
    use tokio::io::AsyncBufReadExt;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let mut args = args[1..].to_vec();
    let listen = args.iter().position(|a| a == "--listen").expect("--listen") + 1;
    args[listen] = addr.to_string();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_relay"))
        .args(&args)
        .env("RUST_LOG", "relay=info")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let log: Log = Arc::default();
    let stderr = child.stderr.take().expect("piped stderr");
    tokio::spawn({
        let log = log.clone();
        async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("[relay {addr}] {line}");
                let mut log = log.lock().expect("log lock");
                log.push_str(&line);
                log.push('\n');
            }
        }
    });
    Ok((RelayProcess { child, addr }, log))
}

/// `kill -<signal>` to the relay process (STOP freezes it, CONT resumes it).
fn signal(p: &RelayProcess, signal: &str) -> anyhow::Result<()> {
    let pid = p.child.id().expect("the relay process runs");
    let status = std::process::Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill -{signal} {pid}: {status}");
    Ok(())
}

/// The sum of metric `name` over its label sets, from the relay's `/metrics`.
async fn metric(addr: std::net::SocketAddr, name: &str) -> anyhow::Result<f64> {
    let body = http_get(addr, "/metrics").await?;
    let mut sum = 0.0;
    for line in body.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if rest.starts_with('{') || rest.starts_with(' ') {
            let value = rest.rsplit(' ').next().unwrap_or_default();
            sum += value.parse::<f64>()?;
        }
    }
    Ok(sum)
}

/// Every record of `topic` from the beginning, until nothing more arrives
/// for `quiet`. A read_committed reader stops at the first open
/// transaction: nothing at or after it is visible until it ends.
async fn read_quiet(topic: &str, committed: bool, quiet: Duration) -> anyhow::Result<Vec<Record>> {
    let reader = TopicReader::with_isolation(&kafka_bootstrap(), topic, true, committed)?;
    let mut out = Vec::new();
    while let Some(r) = reader.next(quiet).await? {
        out.push(r);
    }
    Ok(out)
}

/// The records of `topic` (from the beginning) that arrive within `window`.
async fn read_for(topic: &str, committed: bool, window: Duration) -> anyhow::Result<Vec<Record>> {
    let reader = TopicReader::with_isolation(&kafka_bootstrap(), topic, true, committed)?;
    let deadline = Instant::now() + window;
    let mut out = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(out);
        }
        if let Some(r) = reader.next(left).await? {
            out.push(r);
        }
    }
}

fn id_set(records: &[Record]) -> BTreeSet<i64> {
    records.iter().map(event_id).collect()
}

/// `visible` is exactly `expected`: nothing else leaked, nothing missing.
fn assert_visible(visible: &BTreeSet<i64>, expected: &BTreeSet<i64>, what: &str) {
    let leaked: Vec<_> = visible.difference(expected).collect();
    let missing: Vec<_> = expected.difference(visible).collect();
    assert!(
        leaked.is_empty() && missing.is_empty(),
        "{what}: {} events visible that should not be (e.g. {:?}), {} missing (e.g. {:?})",
        leaked.len(),
        &leaked[..leaked.len().min(10)],
        missing.len(),
        &missing[..missing.len().min(10)],
    );
}

/// Reads `topic` with read_committed until every id of `expected` has
/// appeared, then until 2 s pass with nothing new; every record read.
async fn read_committed_until(
    topic: &str,
    expected: &BTreeSet<i64>,
    timeout: Duration,
) -> anyhow::Result<Vec<Record>> {
    let reader = TopicReader::with_isolation(&kafka_bootstrap(), topic, true, true)?;
    let deadline = Instant::now() + timeout;
    let mut records = Vec::new();
    let mut seen = BTreeSet::new();
    while !expected.is_subset(&seen) {
        if Instant::now() >= deadline {
            let missing: Vec<_> = expected.difference(&seen).take(20).collect();
            anyhow::bail!(
                "{} of {} events not visible to read_committed in {topic} after {timeout:?}, e.g. {missing:?}",
                expected.difference(&seen).count(),
                expected.len()
            );
        }
        if let Some(r) = reader.next(Duration::from_millis(500)).await? {
            if r.header(header::EVENT_ID).is_some() {
                seen.insert(event_id(&r));
            }
            records.push(r);
        }
    }
    while let Some(r) = reader.next(Duration::from_secs(2)).await? {
        records.push(r);
    }
    Ok(records)
}

/// The outbox ids in commit order (these tests commit one transaction at a
/// time on one connection, so that is id order).
async fn ids_in_commit_order(c: &tokio_postgres::Client) -> anyhow::Result<Vec<i64>> {
    Ok(c.query("SELECT id FROM outbox ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// `records` (one topic, as read) hold every id of `table_ids` exactly
/// once and nothing else, each partition in commit and statement order.
fn assert_exactly_once_in_order(records: &[Record], table_ids: &[i64]) {
    let mut read: Vec<i64> = records.iter().map(event_id).collect();
    read.sort_unstable();
    let distinct = {
        let mut d = read.clone();
        d.dedup();
        d
    };
    assert_eq!(
        read.len(),
        distinct.len(),
        "{} records visible more than once",
        read.len() - distinct.len()
    );
    let mut expected = table_ids.to_vec();
    expected.sort_unstable();
    let missing: Vec<_> = expected
        .iter()
        .filter(|id| distinct.binary_search(id).is_err())
        .take(20)
        .collect();
    assert!(missing.is_empty(), "events missing, e.g. {missing:?}");
    assert_eq!(read, expected, "exactly the outbox table's events");
    // Per partition, (lsn, seq) strictly increases, and ids come in the
    // order the table committed them.
    assert_commit_order(records);
    let rank: HashMap<i64, usize> = table_ids
        .iter()
        .enumerate()
        .map(|(i, id)| (*id, i))
        .collect();
    let mut last: HashMap<i32, (usize, i64)> = HashMap::new();
    for r in records {
        let id = event_id(r);
        if let Some((prev, prev_id)) = last.insert(r.partition, (rank[&id], id)) {
            assert!(
                prev < rank[&id],
                "partition {}: event {id} after {prev_id}, against commit order",
                r.partition
            );
        }
    }
}

/// Waits until no walsender streams `slot`.
async fn wait_slot_inactive(c: &tokio_postgres::Client, slot: &str) -> anyhow::Result<()> {
    wait_for(
        "the slot to be released",
        Duration::from_secs(60),
        || async {
            let row = c
                .query_one(
                    "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await?;
            Ok((!row.get::<_, bool>(0)).then_some(()))
        },
    )
    .await
}

/// How often each event id occurs in `records`.
fn copies(records: &[Record]) -> HashMap<i64, usize> {
    let mut n = HashMap::new();
    for r in records
        .iter()
        .filter(|r| r.header(header::EVENT_ID).is_some())
    {
        *n.entry(event_id(r)).or_default() += 1;
    }
    n
}

#[tokio::test]
async fn a_relay_killed_inside_a_kafka_transaction_exposes_none_of_it() -> anyhow::Result<()> {
    // One Postgres transaction of ROWS rows, --transaction-max-records above
    // it: one Kafka transaction. --max-in-flight-bytes keeps a few records
    // in flight, so producing it takes long enough to kill the relay inside.
    const ROWS: i32 = 25_000;
    let db = TestDb::create().await?;
    let topic = create_topic(3).await?;
    let slot = db.slot_name();
    let args = |extra: &[&str]| {
        let mut all = vec![
            "--kafka-transactions",
            "--transaction-max-records",
            "1000000",
        ];
        all.extend_from_slice(extra);
        relay_args(&db.url, &slot, &topic, &kafka_bootstrap(), &all)
    };
    let (mut first, _) = spawn_logged(&args(&["--max-in-flight-bytes", "1024"]))?;
    first.wait_state("streaming").await?;
    let c = db.connect().await?;

    // A small transaction committed before: read_committed readers see it,
    // so seeing nothing of the big one below is not a reader seeing nothing.
    insert_batch(&c, 1, 5).await?;
    let small = outbox_ids(&c).await?;
    read_committed_until(&topic, &small, Duration::from_secs(60)).await?;

    insert_batch(&c, 100, ROWS).await?;
    let big: BTreeSet<i64> = outbox_ids(&c).await?.difference(&small).copied().collect();
    assert_eq!(big.len(), ROWS as usize);

    // It is being produced: a read_uncommitted reader sees its records.
    let uncommitted = TopicReader::with_isolation(&kafka_bootstrap(), &topic, true, false)?;
    let mut written = 0usize;
    let deadline = Instant::now() + Duration::from_secs(120);
    while written < 100 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {written} records of the big transaction produced in 120 s"
        );
        if let Some(r) = uncommitted.next(Duration::from_millis(500)).await? {
            written += usize::from(big.contains(&event_id(&r)));
        }
    }
    // While it is open, read_committed shows the small transaction only.
    let while_open = id_set(&read_for(&topic, true, Duration::from_secs(3)).await?);
    let delivered = metric(first.addr, "relay_events_total").await?;
    first.kill_9().await?;
    assert!(
        delivered < (small.len() + big.len()) as f64,
        "precondition: killed before the whole transaction was delivered ({delivered} records were)"
    );
    assert_visible(
        &while_open,
        &small,
        "read_committed while the Kafka transaction is open",
    );
    while let Some(r) = uncommitted.next(Duration::from_secs(1)).await? {
        written += usize::from(big.contains(&event_id(&r)));
    }
    println!("killed with {written} of {ROWS} records of the transaction written (uncommitted)");
    assert!(
        (100..ROWS as usize).contains(&written),
        "precondition: killed inside the transaction ({written} records written)"
    );

    // Dead relay, transaction still open on the broker (until the restarted
    // relay's producer aborts it, or its timeout): still nothing.
    let after_kill = id_set(&read_quiet(&topic, true, Duration::from_secs(3)).await?);
    assert_visible(
        &after_kill,
        &small,
        "read_committed after the relay died inside the transaction",
    );

    // The restarted relay (same transactional.id, no throttle) aborts the
    // dead transaction, replays the Postgres transaction and commits it.
    let (mut second, _) = spawn_logged(&args(&[]))?;
    second.wait_state("streaming").await?;
    let all = outbox_ids(&c).await?;
    let records = read_committed_until(&topic, &all, Duration::from_secs(150)).await?;
    assert_exactly_once_in_order(&records, &ids_in_commit_order(&c).await?);
    // Aborted records are not taken for written ones (that would be loss,
    // caught above too); at most the small transaction is a replay.
    let skipped = metric(second.addr, "relay_duplicates_skipped_total").await?;
    assert!(skipped <= small.len() as f64, "{skipped} skipped");
    second.kill_9().await
}

#[tokio::test]
async fn a_relay_taking_over_the_slot_fences_the_one_before() -> anyhow::Result<()> {
    // A commits a Kafka transaction 8 s after it began: long enough to be
    // frozen with one open. B commits quickly.
    const A_TXN: Duration = Duration::from_secs(8);
    let db = TestDb::create().await?;
    let topic = create_topic(3).await?;
    let slot = db.slot_name();
    let c = db.connect().await?;
    let args = |max_duration: &str| {
        relay_args(
            &db.url,
            &slot,
            &topic,
            &kafka_bootstrap(),
            &[
                "--kafka-transactions",
                "--transaction-max-duration",
                max_duration,
                "--standby-poll-interval",
                "250ms",
            ],
        )
    };
    let (mut a, a_log) = spawn_logged(&args(&format!("{}s", A_TXN.as_secs())))?;
    a.wait_state("streaming").await?;
    // Same --slot, so the same transactional.id; waits while A streams.
    let (mut b, _) = spawn_logged(&args("200ms"))?;
    b.wait_state("standby").await?;

    insert_batch(&c, 10, 10).await?;
    let batch0 = outbox_ids(&c).await?;
    read_committed_until(&topic, &batch0, Duration::from_secs(60)).await?;

    // A produces batch1 in a Kafka transaction and is frozen before it
    // commits it.
    insert_batch(&c, 20, 10).await?;
    let batch1: BTreeSet<i64> = outbox_ids(&c).await?.difference(&batch0).copied().collect();
    let uncommitted = TopicReader::with_isolation(&kafka_bootstrap(), &topic, true, false)?;
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !batch1.is_subset(&seen) {
        anyhow::ensure!(Instant::now() < deadline, "A did not produce batch1");
        if let Some(r) = uncommitted.next(Duration::from_millis(500)).await? {
            seen.insert(event_id(&r));
        }
    }
    let produced_at = Instant::now();
    signal(&a, "STOP")?;
    let visible = id_set(&read_quiet(&topic, true, Duration::from_secs(2)).await?);
    assert_visible(
        &visible,
        &batch0,
        "precondition: A is frozen with batch1 in an open transaction",
    );

    // batch2 reaches A's connection while A is frozen.
    insert_batch(&c, 30, 5).await?;
    let batch2_end = current_wal_lsn(&c).await?;
    let a_walsender: i32 = c
        .query_one(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?
        .get(0);
    wait_for(
        "batch2 to be sent to A",
        Duration::from_secs(30),
        || async {
            let sent: Option<String> = c
                .query_opt(
                    "SELECT sent_lsn::text FROM pg_stat_replication WHERE pid = $1",
                    &[&a_walsender],
                )
                .await?
                .and_then(|r| r.get(0));
            let sent = sent.and_then(|s| s.parse::<relay::lsn::Lsn>().ok());
            Ok(sent.filter(|s| *s >= batch2_end))
        },
    )
    .await?;

    // Postgres ends A's walsender; B takes the slot over. Its
    // InitProducerId bumps the epoch of the shared transactional.id (A's is
    // fenced) and aborts A's open transaction; B replays batch1 and batch2.
    c.execute("SELECT pg_terminate_backend($1)", &[&a_walsender])
        .await?;
    b.wait_state("streaming").await?;
    insert_batch(&c, 40, 5).await?;
    read_committed_until(&topic, &outbox_ids(&c).await?, Duration::from_secs(60)).await?;

    // A wakes up past its transaction's age: it tries to commit batch1
    // (and holds batch2 in its socket). The broker refuses: fenced.
    tokio::time::sleep(
        (produced_at + A_TXN + Duration::from_secs(1)).saturating_duration_since(Instant::now()),
    )
    .await;
    signal(&a, "CONT")?;
    wait_for("A to be fenced", Duration::from_secs(60), || async {
        Ok(a_log
            .lock()
            .expect("log lock")
            .to_lowercase()
            .contains("fenced")
            .then_some(()))
    })
    .await?;
    // It stops streaming (standby: B holds the slot) and writes nothing.
    a.wait_state("standby").await?;
    let a_errors = metric(a.addr, "relay_produce_errors_total").await?;
    assert!(a_errors >= 1.0, "A's refused commit is counted");
    let fenced_lines: Vec<String> = a_log
        .lock()
        .expect("log lock")
        .lines()
        .filter(|l| l.to_lowercase().contains("fenced"))
        .map(str::to_owned)
        .collect();
    println!("A, after SIGCONT:\n{}", fenced_lines.join("\n"));

    insert_batch(&c, 50, 5).await?;
    let all = outbox_ids(&c).await?;
    let records = read_committed_until(&topic, &all, Duration::from_secs(60)).await?;
    assert_exactly_once_in_order(&records, &ids_in_commit_order(&c).await?);

    // read_uncommitted: batch1 twice (A's aborted copy, B's replay), so A
    // did write it and isolation hid it; everything else once, so A wrote
    // nothing after B took over.
    let raw = copies(&read_quiet(&topic, false, Duration::from_secs(2)).await?);
    for id in &all {
        let expected = if batch1.contains(id) { 2 } else { 1 };
        assert_eq!(
            raw.get(id),
            Some(&expected),
            "copies of event {id} in the log"
        );
    }
    assert_eq!(raw.len(), all.len());
    assert!(a.child.try_wait()?.is_none(), "A stays up as a standby");
    a.kill_9().await?;
    b.kill_9().await
}

/// Writes `per_partition` records without relay headers to each partition
/// of `topic` in a Kafka transaction of another transactional.id, and
/// aborts it.
async fn write_and_abort(topic: &str, partitions: i32, per_partition: usize) -> anyhow::Result<()> {
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        const T: Duration = Duration::from_secs(30);
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", kafka_bootstrap())
            .set("transactional.id", unique_name("other_writer"))
            .create()?;
        producer.init_transactions(T)?;
        producer.begin_transaction()?;
        for p in 0..partitions {
            for _ in 0..per_partition {
                producer
                    .send(
                        BaseRecord::<str, str>::to(&topic)
                            .partition(p)
                            .key("x")
                            .payload("aborted"),
                    )
                    .map_err(|(e, _)| e)?;
            }
        }
        producer.flush(T)?;
        producer.abort_transaction(T)?;
        anyhow::Ok(())
    })
    .await?
}

#[tokio::test]
async fn a_restart_finds_the_last_committed_record_behind_aborted_ones() -> anyhow::Result<()> {
    // More than 64 per partition: reading from the end, then from 64 before
    // it, finds nothing committed; the reader must step back further.
    const ABORTED: usize = 100;
    const PARTITIONS: i32 = 2;
    let db = TestDb::create().await?;
    let topic = create_topic(PARTITIONS).await?;
    let slot = db.slot_name();
    let at_start = format!("{slot}_start");
    let c = db.connect().await?;
    // A copy of the slot before anything is written, to put the slot back
    // there later.
    c.execute(
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
        &[&slot],
    )
    .await?;
    c.execute(
        "SELECT pg_copy_logical_replication_slot($1, $2)",
        &[&slot, &at_start],
    )
    .await?;
    let args = relay_args(
        &db.url,
        &slot,
        &topic,
        &kafka_bootstrap(),
        &[
            "--kafka-transactions",
            "--transaction-max-duration",
            "200ms",
        ],
    );
    let (mut first, _) = spawn_logged(&args)?;
    first.wait_state("streaming").await?;
    insert_batch(&c, 10, 20).await?;
    insert_batch(&c, 20, 30).await?;
    insert_batch(&c, 30, 25).await?;
    let committed = outbox_ids(&c).await?;
    read_committed_until(&topic, &committed, Duration::from_secs(60)).await?;
    first.kill_9().await?;
    wait_slot_inactive(&c, &slot).await?;

    // Another writer's aborted transaction ends both partitions: records
    // without relay headers (the reader would refuse them as another
    // writer's, were they visible) and the abort markers.
    write_and_abort(&topic, PARTITIONS, ABORTED).await?;
    let raw = read_quiet(&topic, false, Duration::from_secs(2)).await?;
    for p in 0..PARTITIONS {
        let tail: Vec<&Record> = raw
            .iter()
            .filter(|r| r.partition == p)
            .rev()
            .take(ABORTED)
            .collect();
        assert!(
            tail.len() == ABORTED && tail.iter().all(|r| r.header(header::EVENT_ID).is_none()),
            "partition {p} ends with the aborted records"
        );
    }

    // As if the relay had died after the Kafka commits and before
    // confirming them: the slot goes back to where it started (same name,
    // so same transactional.id), and Postgres replays everything.
    c.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await?;
    c.execute(
        "SELECT pg_copy_logical_replication_slot($1, $2)",
        &[&at_start, &slot],
    )
    .await?;
    c.execute("SELECT pg_drop_replication_slot($1)", &[&at_start])
        .await?;
    insert_batch(&c, 40, 15).await?;
    insert_batch(&c, 50, 10).await?;

    let (mut second, second_log) = spawn_logged(&args)?;
    second.wait_state("streaming").await?;
    let all = outbox_ids(&c).await?;
    let records = read_committed_until(&topic, &all, Duration::from_secs(60)).await?;
    assert_exactly_once_in_order(&records, &ids_in_commit_order(&c).await?);
    let skipped = metric(second.addr, "relay_duplicates_skipped_total").await?;
    assert_eq!(
        skipped,
        committed.len() as f64,
        "every replayed record already committed is skipped, nothing else"
    );
    assert!(
        !second_log
            .lock()
            .expect("log lock")
            .contains("another writer"),
        "aborted records taken for another writer's"
    );
    second.kill_9().await
}

#[tokio::test]
async fn a_transaction_partly_in_kafka_is_read_again_then_taken_per_partition() -> anyhow::Result<()>
{
    // Partition 0's last record claims a position beyond any transaction
    // (written without a Kafka transaction, as by a relay before
    // --kafka-transactions): every row that hashes there counts as written,
    // the others not. A Postgres transaction with a row in partition 0 (key
    // user_id 1) and one in partition 2 (user_id 2) then looks partly written, which
    // Kafka transactions make impossible; the relay reads the ends again
    // (a marker still being written would be there by then), and when the
    // view stays the same it skips per partition.
    let db = TestDb::create().await?;
    let topic = create_topic(3).await?;
    {
        let topic = topic.clone();
        tokio::task::spawn_blocking(move || {
            let producer: BaseProducer = ClientConfig::new()
                .set("bootstrap.servers", kafka_bootstrap())
                .create()?;
            let headers = rdkafka::message::OwnedHeaders::new()
                .insert(rdkafka::message::Header {
                    key: header::LSN,
                    value: Some("FF/0"),
                })
                .insert(rdkafka::message::Header {
                    key: header::SEQ,
                    value: Some("0"),
                });
            producer
                .send(
                    BaseRecord::<str, str>::to(&topic)
                        .partition(0)
                        .key("1")
                        .payload("{}")
                        .headers(headers),
                )
                .map_err(|(e, _)| e)?;
            producer.flush(Duration::from_secs(30))?;
            anyhow::Ok(())
        })
        .await??;
    }
    let c = db.connect().await?;
    let slot = db.slot_name();
    let args = relay_args(
        &db.url,
        &slot,
        &topic,
        &kafka_bootstrap(),
        // The forged record stands for events of an earlier slot.
        &["--kafka-transactions", "--allow-new-slot"],
    );
    let (mut relay, log) = spawn_logged(&args)?;
    relay.wait_state("streaming").await?;
    // user_id (the key) 0 + g % 7: 1 and 2.
    insert_batch(&c, 0, 2).await?;
    let ids = ids_in_commit_order(&c).await?;
    assert_eq!(ids.len(), 2);
    wait_for(
        "the relay to take the view per partition",
        Duration::from_secs(120),
        || async {
            Ok(log
                .lock()
                .unwrap()
                .contains("skipping per partition")
                .then_some(()))
        },
    )
    .await?;
    let readings = log
        .lock()
        .unwrap()
        .matches("hold only part of the Postgres transaction")
        .count();
    assert_eq!(
        readings, 3,
        "three sessions find the same view before the next takes it"
    );

    // The row of partition 2 once, committed; the row "held" by partition
    // 0's record not produced; and the relay streams on.
    insert_batch(&c, 1, 1).await?; // user_id 2
    let all = ids_in_commit_order(&c).await?;
    let expected: BTreeSet<i64> = [ids[1], all[2]].into();
    let records = read_committed_until(&topic, &expected, Duration::from_secs(60)).await?;
    let mut relayed: Vec<i64> = records
        .iter()
        .filter(|r| r.header(header::EVENT_ID).is_some())
        .map(event_id)
        .collect();
    relayed.sort_unstable();
    assert_eq!(relayed, expected.into_iter().collect::<Vec<_>>());
    relay.kill_9().await
}

// ---------------------------------------------------------------------------
// On librdkafka's mock cluster.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn records_are_visible_and_confirmed_only_at_the_kafka_commit() -> anyhow::Result<()> {
    let mock = MockCluster::new(3)?;
    let topic = unique_name("txn");
    mock.create_topic(&topic, 2, 3)?;
    let bootstrap = mock.bootstrap_servers();
    let db = TestDb::create().await?;
    let relay = start(relay_config(
        &db.url,
        &db.slot_name(),
        &topic,
        &bootstrap,
        &["--kafka-transactions", "--transaction-max-duration", "6s"],
    ))
    .await;
    let c = db.connect().await?;
    let before = current_wal_lsn(&c).await?;
    insert_batch(&c, 10, 5).await?;
    let end = current_wal_lsn(&c).await?;

    // Produced and acknowledged, inside a Kafka transaction that commits
    // only after --transaction-max-duration: the slot must not move yet.
    let produced = wait_for(
        "the records to be produced",
        Duration::from_secs(5),
        || async {
            let ids = read_all(&bootstrap, &topic, false).await?;
            Ok((ids.len() == 5).then_some(ids))
        },
    )
    .await?;
    assert_eq!(
        produced.into_iter().collect::<BTreeSet<_>>(),
        outbox_ids(&c).await?
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let confirmed = slot_confirmed(&c, &db.slot_name()).await?.expect("slot");
    assert!(
        confirmed <= before,
        "confirmed {confirmed} on acks, before the Kafka commit"
    );

    // After the commit (about 6 s after the transaction began) it moves.
    wait_for(
        "confirmation after the commit",
        Duration::from_secs(20),
        || async {
            Ok(slot_confirmed(&c, &db.slot_name())
                .await?
                .filter(|l| *l >= end))
        },
    )
    .await?;
    assert_eq!(read_all(&bootstrap, &topic, false).await?.len(), 5, "once");
    relay.stop().await
}

/// The first Kafka commit fails with `error`; the relay must recover, commit
/// a replay of the same Postgres transaction, and confirm the slot. Returns
/// the event ids in topic order (the mock keeps aborted records visible, so
/// a replay shows as a second copy) and the produce-error count.
async fn first_commit_fails_with(
    error: RDKafkaRespErr,
) -> anyhow::Result<(Vec<i64>, Vec<i64>, u64)> {
    let mock = MockCluster::new(3)?;
    let topic = unique_name("txn_err");
    mock.create_topic(&topic, 1, 3)?;
    let bootstrap = mock.bootstrap_servers();
    let db = TestDb::create().await?;
    // At-least-once: with exactly-once the replay would be deduplicated
    // against the aborted copies, which the mock (unlike Kafka's
    // read_committed readers) still shows.
    let relay = start(relay_config(
        &db.url,
        &db.slot_name(),
        &topic,
        &bootstrap,
        &[
            "--kafka-transactions",
            "--transaction-max-duration",
            "200ms",
            "--delivery",
            "at-least-once",
        ],
    ))
    .await;
    mock.request_errors(RDKafkaApiKey::EndTxn, &[error]);
    let c = db.connect().await?;
    insert_batch(&c, 10, 5).await?;
    let end = current_wal_lsn(&c).await?;
    wait_for(
        "confirmation after a successful commit",
        Duration::from_secs(30),
        || async {
            Ok(slot_confirmed(&c, &db.slot_name())
                .await?
                .filter(|l| *l >= end))
        },
    )
    .await?;
    let errors = relay.shared.metrics.produce_errors.get();
    assert!(
        !relay.task.is_finished(),
        "the relay recovers instead of exiting"
    );
    let ids = read_all(&bootstrap, &topic, false).await?;
    let mut expected: Vec<i64> = outbox_ids(&c).await?.into_iter().collect();
    expected.sort_unstable();
    relay.stop().await?;
    Ok((ids, expected, errors))
}

#[tokio::test]
async fn an_abortable_commit_error_aborts_and_replays_the_transaction() -> anyhow::Result<()> {
    // EndTxn errors it has no case for are "permanent" for librdkafka: the transaction
    // must be aborted (txn_requires_abort).
    let (ids, expected, errors) =
        first_commit_fails_with(RDKafkaRespErr::RD_KAFKA_RESP_ERR_TRANSACTION_COORDINATOR_FENCED)
            .await?;
    assert!(errors >= 1, "the failed commit is counted");
    // The aborted attempt, then the replay of the same Postgres transaction
    // in a new Kafka transaction, in the same order.
    assert_eq!(ids, [expected.clone(), expected].concat());
    Ok(())
}

#[tokio::test]
async fn a_fenced_producer_is_replaced_and_the_transaction_replayed() -> anyhow::Result<()> {
    // PRODUCER_FENCED at the commit is fatal for the producer instance.
    let (ids, expected, errors) =
        first_commit_fails_with(RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED).await?;
    assert!(errors >= 1, "the failed commit is counted");
    assert_eq!(ids, [expected.clone(), expected].concat());
    Ok(())
}

#[tokio::test]
async fn a_relay_readying_kafka_keeps_answering_the_walsender() -> anyhow::Result<()> {
    // The relay takes the slot, then readies Kafka (init_transactions here).
    // The coordinator answers InitProducerId with a retriable error for a
    // while, slowly: the session stays in that phase for seconds. Its
    // walsender must get standby replies meanwhile (or it would wait for one
    // until wal_sender_timeout, and hold up a fast shutdown that long).
    let mock = MockCluster::new(3)?;
    let topic = unique_name("txn_setup");
    mock.create_topic(&topic, 2, 3)?;
    let bootstrap = mock.bootstrap_servers();
    let db = TestDb::create().await?;
    let slot = db.slot_name();
    mock.request_errors(
        RDKafkaApiKey::InitProducerId,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS; 40],
    );
    for broker in 1..=3 {
        mock.broker_round_trip_time(broker, Duration::from_millis(300))?;
    }
    let cfg = relay_config(
        &db.url,
        &slot,
        &topic,
        &bootstrap,
        &["--kafka-transactions", "--status-interval", "1s"],
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let shared = relay::http::Shared::new(&cfg.slot, &cfg.publication);
    let task = tokio::spawn(relay::pipeline::run_with(cfg, stop.clone(), shared.clone()));

    // The walsender's reply_time, while the relay is not streaming yet.
    let c = db.connect().await?;
    let mut replies = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while replies.len() < 3 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the walsender got {} distinct replies in 30 s while the relay readied Kafka",
            replies.len()
        );
        let state = shared.snapshot().state;
        anyhow::ensure!(
            state != relay::http::RelayState::Streaming,
            "precondition: the relay streams already ({} replies seen): \
             the injected InitProducerId errors did not hold it up",
            replies.len()
        );
        let row = c
            .query_opt(
                "SELECT r.reply_time::text FROM pg_stat_replication r \
                 JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = $1",
                &[&slot],
            )
            .await?;
        if let Some(Some(t)) = row.map(|r| r.get::<_, Option<String>>(0)) {
            replies.insert(t);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Once Kafka answers, the relay streams, and produces in a transaction.
    mock.clear_request_errors(RDKafkaApiKey::InitProducerId);
    for broker in 1..=3 {
        mock.broker_round_trip_time(broker, Duration::ZERO)?;
    }
    wait_for("the relay to stream", Duration::from_secs(60), || async {
        Ok((shared.snapshot().state == relay::http::RelayState::Streaming).then_some(()))
    })
    .await?;
    insert_batch(&c, 10, 5).await?;
    let expected = outbox_ids(&c).await?;
    let ids = wait_for("the records", Duration::from_secs(30), || async {
        let ids = read_all(&bootstrap, &topic, false).await?;
        Ok((ids.len() >= expected.len()).then_some(ids))
    })
    .await?;
    assert_eq!(ids.into_iter().collect::<BTreeSet<_>>(), expected);
    stop.cancel();
    task.await??;
    Ok(())
}
