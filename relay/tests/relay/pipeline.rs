//! The relay end to end on the real test stack: Postgres (logical
//! replication) → relay → Apache Kafka, read back from the topic.

use std::time::Duration;

use crate::common::{
    current_wal_lsn, event_id, http_get, insert_event, lsn_seq, relay_config, slot_confirmed, start,
};
use devstack::kafka::TopicReader;
use devstack::testing::{create_topic, kafka_bootstrap, wait_for, TestDb};
use outbox_record::{header, trace};
use relay::lsn::Lsn;

fn config(db: &TestDb, topic: &str) -> relay::config::Config {
    relay_config(&db.url, &db.slot_name(), topic, &kafka_bootstrap(), &[])
}

#[tokio::test]
async fn later_id_committed_first_is_produced_first() -> anyhow::Result<()> {
    // The JDBC source connector's failure case: A takes a lower id but
    // commits after B; a poller at "id > last" skips A. The relay must emit
    // B before A, in commit order.
    let db = TestDb::create().await?;
    let topic = create_topic(1).await?;
    let relay = start(config(&db, &topic)).await;
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
    assert_eq!(records[0].header(header::EVENT_TYPE), Some("B"));
    relay.stop().await
}

#[tokio::test]
async fn multi_row_transaction_keeps_statement_order() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let topic = create_topic(1).await?;
    let relay = start(config(&db, &topic)).await;
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
        .map(|r| r.header(header::LSN).unwrap().to_owned())
        .collect();
    assert!(
        lsns.iter().all(|l| *l == lsns[0]),
        "one commit LSN: {lsns:?}"
    );
    let seqs: Vec<u64> = records.iter().map(|r| lsn_seq(r).1).collect();
    assert_eq!(seqs, vec![0, 1, 2, 3, 4]);
    let xids: Vec<_> = records
        .iter()
        .map(|r| r.header(header::XID).unwrap().to_owned())
        .collect();
    assert!(xids.iter().all(|x| *x == xids[0]));
    let ts = records[0].header(header::COMMIT_TS).unwrap();
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
    let relay = start(config(&db, &topic)).await;
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
        .map(|r| {
            (
                event_id(r),
                r.header(header::EVENT_TYPE).unwrap().to_owned(),
            )
        })
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
    let cfg = config(&db, &topic);
    let relay = start(cfg.clone()).await;
    let c = db.connect().await?;
    for u in 0..10 {
        insert_event(&c, u, "First").await?;
    }
    let end = current_wal_lsn(&c).await?;
    // The slot's confirmed position reaches the inserts' commits.
    wait_for(
        "confirmed_flush_lsn to pass the inserts",
        Duration::from_secs(30),
        || async {
            Ok(slot_confirmed(&c, &db.slot_name())
                .await?
                .filter(|l| *l >= end))
        },
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
    let relay = start(config(&db, &topic)).await;
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
    let relay = start(config(&db, &topic)).await;
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

/// Topic creation as the relay, the notifier's dead-letter queue and the
/// test harness do it (`lifecycle::kafka::create_topics`), on Apache Kafka:
/// a new topic is created with the partitions asked for, an existing one is
/// reported as such (not an error), and a name Kafka refuses is an error of
/// that topic alone.
#[tokio::test]
async fn topics_are_created_once_and_a_refused_name_fails_alone() -> anyhow::Result<()> {
    use lifecycle::kafka::{create_topics, Created};
    use rdkafka::consumer::{BaseConsumer, Consumer};

    let name = devstack::testing::unique_name("created");
    let mut config = rdkafka::ClientConfig::new();
    config.set("bootstrap.servers", kafka_bootstrap());
    let timeout = Duration::from_secs(20);
    let first = create_topics(&config, &[&name], 4, 1, timeout).await?;
    assert_eq!(first, vec![(name.clone(), Ok(Created::New))]);

    let again = create_topics(&config, &[&name, "no spaces allowed"], 4, 1, timeout).await?;
    let result = |topic: &str| again.iter().find(|(t, _)| t == topic).map(|(_, r)| *r);
    assert_eq!(result(&name), Some(Ok(Created::Existed)));
    assert!(
        matches!(result("no spaces allowed"), Some(Err(_))),
        "{again:?}"
    );

    let client: BaseConsumer = config.create()?;
    let md = client.fetch_metadata(Some(&name), Duration::from_secs(10))?;
    assert_eq!(md.topics()[0].partitions().len(), 4);
    Ok(())
}

/// A W3C `traceparent` and `tracestate` written into the outbox row (the
/// columns of migration V5) reach the record as headers of those names (the
/// default `--header-columns`), after the relay's own headers; a row
/// without them gets no such headers.
#[tokio::test]
async fn a_traceparent_column_becomes_a_header() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let c = db.connect().await?;
    let topic = create_topic(1).await?;
    let relay = start(config(&db, &topic)).await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let traced: i64 = c
        .query_one(
            "INSERT INTO outbox (aggregate_type, aggregate_id, user_id, event_type, payload, \
                                 traceparent, tracestate) \
             VALUES ('order', '1', 1, 'OrderCreated', '{}', $1, 'congo=t61rcWkgMzE') RETURNING id",
            &[&traceparent],
        )
        .await?
        .get(0);
    let untraced = insert_event(&c, 2, "OrderCreated").await?;

    let reader = TopicReader::new(&kafka_bootstrap(), &topic, true)?;
    let records = reader
        .read_at_least(2, Duration::from_secs(30), Duration::from_secs(1))
        .await?;
    assert_eq!(records.len(), 2);
    let by_id = |id: i64| records.iter().find(|r| event_id(r) == id).expect("record");
    assert_eq!(by_id(traced).header(trace::TRACEPARENT), Some(traceparent));
    assert_eq!(
        by_id(traced).header(trace::TRACESTATE),
        Some("congo=t61rcWkgMzE")
    );
    let names: Vec<&str> = by_id(traced)
        .headers
        .iter()
        .map(|(k, _)| k.as_str())
        .collect();
    assert_eq!(
        names[names.len() - 2..],
        [trace::TRACEPARENT, trace::TRACESTATE],
        "{names:?}"
    );
    assert_eq!(by_id(untraced).header(trace::TRACEPARENT), None);
    assert_eq!(by_id(untraced).header(trace::TRACESTATE), None);
    relay.stop().await
}
