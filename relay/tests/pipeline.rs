//! The relay end to end on the real test stack: Postgres (logical
//! replication) → relay → Tansu, read back from the topic.

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use devstack::kafka::{Record, TopicReader};
use devstack::testing::{create_topic, kafka_bootstrap, wait_for, TestDb};
use relay::config::Config;
use relay::http::Shared;
use relay::lsn::Lsn;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

struct Running {
    stop: CancellationToken,
    task: JoinHandle<Result<(), relay::pipeline::RelayError>>,
    shared: Arc<Shared>,
}

impl Running {
    async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.task.await??;
        Ok(())
    }
}

fn relay_config(db: &TestDb, topic: &str, bootstrap: &str, extra: &[&str]) -> Config {
    let slot = db.slot_name();
    let mut args = vec![
        "relay",
        "--database-url",
        &db.url,
        "--slot",
        &slot,
        "--topic",
        topic,
        "--kafka-bootstrap-servers",
        bootstrap,
        "--listen",
        "127.0.0.1:0",
        "--status-interval",
        "200ms",
        "--lag-sample-interval",
        "200ms",
        "--max-backoff",
        "1s",
    ];
    args.extend_from_slice(extra);
    Config::try_parse_from(args).expect("valid test config")
}

/// Starts the relay in-process and waits until it streams (its slot exists,
/// so every later commit will reach it).
async fn start(cfg: Config) -> Running {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("relay=debug")
        .try_init();
    let stop = CancellationToken::new();
    let shared = Shared::new(&cfg.slot, &cfg.publication);
    let task = tokio::spawn(relay::pipeline::run_with(cfg, stop.clone(), shared.clone()));
    wait_for("the relay to stream", Duration::from_secs(30), || async {
        let s = shared.snapshot();
        assert!(
            s.state != relay::http::RelayState::Failed,
            "relay failed: {:?}",
            s.last_error
        );
        Ok((s.state == relay::http::RelayState::Streaming).then_some(()))
    })
    .await
    .expect("relay streams");
    Running { stop, task, shared }
}

async fn insert_event(
    client: &tokio_postgres::Client,
    user_id: i64,
    event_type: &str,
) -> anyhow::Result<i64> {
    let row = client
        .query_one(
            "INSERT INTO outbox (aggregate_type, aggregate_id, user_id, event_type, payload) \
             VALUES ('order', $1::bigint::text, $1, $2, jsonb_build_object('user', $1)) RETURNING id",
            &[&user_id, &event_type],
        )
        .await?;
    Ok(row.get(0))
}

fn lsn_seq(r: &Record) -> (Lsn, u64) {
    let lsn = r
        .header("lsn")
        .expect("lsn header")
        .parse()
        .expect("lsn parses");
    let seq = r
        .header("seq")
        .expect("seq header")
        .parse()
        .expect("seq parses");
    (lsn, seq)
}

fn event_id(r: &Record) -> i64 {
    r.header("event_id")
        .expect("event_id header")
        .parse()
        .expect("numeric id")
}

async fn slot_confirmed(db: &TestDb) -> anyhow::Result<Option<Lsn>> {
    let c = db.connect().await?;
    let row = c
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&db.slot_name()],
        )
        .await?;
    Ok(row
        .and_then(|r| r.get::<_, Option<String>>(0))
        .and_then(|s| s.parse().ok()))
}

#[tokio::test]
async fn later_id_committed_first_is_produced_first() -> anyhow::Result<()> {
    // The JDBC source connector's failure case: A takes a lower id but
    // commits after B; a poller at "id > last" skips A. The relay must emit
    // B before A, in commit order.
    let db = TestDb::create().await?;
    let topic = create_topic(1).await?;
    let relay = start(relay_config(&db, &topic, &kafka_bootstrap(), &[])).await;
    let a = db.connect().await?;
    let b = db.connect().await?;
    a.batch_execute("BEGIN").await?;
    let id_a = insert_event(&a, 7, "A").await?;
    b.batch_execute("BEGIN").await?;
    let id_b = insert_event(&b, 7, "B").await?;
    assert!(id_a < id_b);
    b.batch_execute("COMMIT").await?;
    a.batch_execute("COMMIT").await?;

    let reader = TopicReader::new(&kafka_bootstrap(), &topic, true)?;
    let records = reader
        .read_at_least(2, Duration::from_secs(30), Duration::from_secs(1))
        .await?;
    let ids: Vec<i64> = records.iter().map(event_id).collect();
    assert_eq!(ids, vec![id_b, id_a], "commit order, not id order");
    assert!(lsn_seq(&records[0]).0 < lsn_seq(&records[1]).0);
    let value: serde_json::Value = serde_json::from_str(records[0].value.as_deref().unwrap())?;
    assert_eq!(value["id"], id_b);
    assert_eq!(
        value["payload"],
        serde_json::json!({"user": 7}),
        "jsonb embedded"
    );
    assert_eq!(records[0].key.as_deref(), Some("7"));
    assert_eq!(records[0].header("event_type"), Some("B"));
    relay.stop().await
}

#[tokio::test]
async fn multi_row_transaction_keeps_statement_order() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let topic = create_topic(1).await?;
    let relay = start(relay_config(&db, &topic, &kafka_bootstrap(), &[])).await;
    let c = db.connect().await?;
    c.batch_execute("BEGIN").await?;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(insert_event(&c, 100 + i, "OrderCreated").await?);
    }
    c.batch_execute("COMMIT").await?;
    let reader = TopicReader::new(&kafka_bootstrap(), &topic, true)?;
    let records = reader
        .read_at_least(5, Duration::from_secs(30), Duration::from_secs(1))
        .await?;
    assert_eq!(records.iter().map(event_id).collect::<Vec<_>>(), ids);
    let lsns: Vec<_> = records
        .iter()
        .map(|r| r.header("lsn").unwrap().to_owned())
        .collect();
    assert!(
        lsns.iter().all(|l| *l == lsns[0]),
        "one commit LSN: {lsns:?}"
    );
    let seqs: Vec<u64> = records.iter().map(|r| lsn_seq(r).1).collect();
    assert_eq!(seqs, vec![0, 1, 2, 3, 4]);
    let xids: Vec<_> = records
        .iter()
        .map(|r| r.header("xid").unwrap().to_owned())
        .collect();
    assert!(xids.iter().all(|x| *x == xids[0]));
    let ts = records[0].header("commit_ts").unwrap();
    assert!(
        ts.ends_with('Z') && ts.len() == "2026-11-21T10:00:00.123456Z".len(),
        "{ts}"
    );
    relay.stop().await
}

#[tokio::test]
async fn only_committed_outbox_inserts_are_produced() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let topic = create_topic(1).await?;
    let relay = start(relay_config(&db, &topic, &kafka_bootstrap(), &[])).await;
    let c = db.connect().await?;
    // Rolled back: never produced.
    c.batch_execute("BEGIN").await?;
    insert_event(&c, 1, "RolledBack").await?;
    c.batch_execute("ROLLBACK").await?;
    // A table outside the publication.
    c.batch_execute(
        "INSERT INTO orders (user_id, email, items, total_cents, currency) VALUES (1, 'a@b.c', '[]', 0, 'EUR')",
    )
    .await?;
    // One real event, then UPDATE and DELETE of it.
    let id = insert_event(&c, 1, "Kept").await?;
    c.execute(
        "UPDATE outbox SET event_type = 'Changed' WHERE id = $1",
        &[&id],
    )
    .await?;
    c.execute("DELETE FROM outbox WHERE id = $1", &[&id])
        .await?;
    let last = insert_event(&c, 1, "Last").await?;
    let reader = TopicReader::new(&kafka_bootstrap(), &topic, true)?;
    let records = reader
        .read_at_least(2, Duration::from_secs(30), Duration::from_secs(2))
        .await?;
    let got: Vec<(i64, String)> = records
        .iter()
        .map(|r| (event_id(r), r.header("event_type").unwrap().to_owned()))
        .collect();
    assert_eq!(
        got,
        vec![(id, "Kept".to_owned()), (last, "Last".to_owned())]
    );
    relay.stop().await
}

#[tokio::test]
async fn confirms_after_ack_and_resumes_after_restart() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let topic = create_topic(2).await?;
    let cfg = relay_config(&db, &topic, &kafka_bootstrap(), &[]);
    let relay = start(cfg.clone()).await;
    let c = db.connect().await?;
    for u in 0..10 {
        insert_event(&c, u, "First").await?;
    }
    let end: String = c
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let end: Lsn = end.parse()?;
    // The slot's confirmed position reaches the inserts' commits.
    wait_for(
        "confirmed_flush_lsn to pass the inserts",
        Duration::from_secs(30),
        || async { Ok(slot_confirmed(&db).await?.filter(|l| *l >= end)) },
    )
    .await?;
    let status = relay.shared.snapshot();
    assert!(status.confirmed_lsn >= end, "{status:?}");
    relay.stop().await?;

    // While the relay is down, more events; a new relay picks them up.
    for u in 0..10 {
        insert_event(&c, u, "Second").await?;
    }
    let relay = start(cfg).await;
    let reader = TopicReader::new(&kafka_bootstrap(), &topic, true)?;
    let records = reader
        .read_at_least(20, Duration::from_secs(30), Duration::from_secs(2))
        .await?;
    let mut ids: Vec<i64> = records.iter().map(event_id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 20, "every event present");
    assert_eq!(
        records.len(),
        20,
        "a clean stop confirms everything: no replay"
    );
    relay.stop().await
}

#[tokio::test]
async fn concurrent_writers_every_event_in_commit_order_per_key() -> anyhow::Result<()> {
    const WRITERS: i64 = 10;
    const EVENTS_PER_WRITER: i64 = 2_000;
    let db = TestDb::create().await?;
    let topic = create_topic(3).await?;
    let relay = start(relay_config(&db, &topic, &kafka_bootstrap(), &[])).await;
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let mut client = db.connect().await?;
        writers.push(tokio::spawn(async move {
            // Deterministic per-writer transaction sizes between 1 and 25.
            let mut state = (w as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut left = EVENTS_PER_WRITER;
            while left > 0 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let n = ((state % 25) as i64 + 1).min(left);
                let tx = client.build_transaction().start().await?;
                tx.execute(
                    "INSERT INTO outbox (aggregate_type, aggregate_id, user_id, event_type, payload) \
                     SELECT 'order', g::text, ($1::bigint * 100 + g % 7), 'E', '{}'::jsonb FROM generate_series(1, $2::int) g",
                    &[&w, &(n as i32)],
                )
                .await?;
                tx.commit().await?;
                left -= n;
            }
            anyhow::Ok(())
        }));
    }
    for w in writers {
        w.await??;
    }
    let total = (WRITERS * EVENTS_PER_WRITER) as usize;
    let reader = TopicReader::new(&kafka_bootstrap(), &topic, true)?;
    let records = reader
        .read_at_least(total, Duration::from_secs(180), Duration::from_secs(2))
        .await?;
    let mut ids: Vec<i64> = records.iter().map(event_id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), total, "every event present");
    assert_eq!(records.len(), total, "no duplicates without a crash");
    // Within each partition, (lsn, seq) strictly increases: commit order, then statement order.
    let mut last: std::collections::HashMap<i32, (Lsn, u64)> = Default::default();
    for r in &records {
        let pos = lsn_seq(r);
        if let Some(prev) = last.insert(r.partition, pos) {
            assert!(
                prev < pos,
                "partition {} out of order: {prev:?} then {pos:?}",
                r.partition
            );
        }
    }
    relay.stop().await
}

#[tokio::test]
async fn status_and_metrics_endpoints() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let topic = create_topic(1).await?;
    let relay = start(relay_config(&db, &topic, &kafka_bootstrap(), &[])).await;
    let c = db.connect().await?;
    insert_event(&c, 5, "E").await?;
    let addr = wait_for("http to listen", Duration::from_secs(10), || async {
        Ok(relay.shared.http_addr())
    })
    .await?;
    let metrics = wait_for(
        "the event to be counted",
        Duration::from_secs(30),
        || async {
            let body = http_get(addr, "/metrics").await?;
            Ok(body
                .contains(&format!("relay_events_total{{topic=\"{topic}\"}} 1"))
                .then_some(body))
        },
    )
    .await?;
    assert!(metrics.contains("relay_connected 1"), "{metrics}");
    assert!(metrics.contains("relay_transactions_total 1"), "{metrics}");
    let status: serde_json::Value = serde_json::from_str(&http_get(addr, "/status").await?)?;
    assert_eq!(status["state"], "streaming");
    assert_eq!(status["slot"], db.slot_name());
    assert!(status["confirmed_lsn"].as_str().unwrap().contains('/'));
    assert!(http_get(addr, "/healthz").await?.starts_with("ok"));
    relay.stop().await
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await?;
    Ok(buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default())
}
