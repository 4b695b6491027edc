//! The table-less outbox on Postgres and Apache Kafka: events written with
//! `pg_logical_emit_message(true, 'outbox', …)` reach the topic as the
//! records their rows would be, in commit order with the table's rows,
//! exactly once through `kill -9`; rolled back, non-transactional or
//! malformed messages never reach consumers and never stop the relay.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::{
    assert_commit_order, event_id, read_until_all, relay_args, relay_config, start, RelayProcess,
};
use devstack::kafka::TopicReader;
use devstack::testing::{create_topic, kafka_bootstrap, wait_for, TestDb};
use outbox_record::{header, trace};
use serde_json::Value;

/// Emits `n` event messages in the current transaction, ids from the outbox
/// sequence (as order-api does), users from `first_user`; returns the ids.
const EMIT: &str = "SELECT (pg_logical_emit_message(true, 'outbox', json_build_object(\
     'id', id, 'aggregate_type', 'order', 'aggregate_id', g::text, \
     'user_id', $1::bigint + g % 7, 'event_type', 'E', 'payload', json_build_object('g', g), \
     'created_at', now())::text) IS NOT NULL), id \
     FROM (SELECT g, nextval(pg_get_serial_sequence('outbox', 'id')) AS id \
           FROM generate_series(1, $2::int) g) e ORDER BY g";

const INSERT: &str =
    "INSERT INTO outbox (aggregate_type, aggregate_id, user_id, event_type, payload) \
     SELECT 'order', g::text, ($1::bigint + g % 7), 'E', '{}'::jsonb \
     FROM generate_series(1, $2::int) g RETURNING id";

/// The `messages` ledger: what the checker knows committed (a test's
/// oracle; the relay never reads it).
async fn create_ledger(c: &tokio_postgres::Client) -> anyhow::Result<()> {
    c.batch_execute("CREATE TABLE IF NOT EXISTS test_emitted (id bigint PRIMARY KEY)")
        .await?;
    Ok(())
}

/// One transaction: `rows` outbox rows between two batches of messages
/// (half of `messages` each), every message id in the ledger too.
async fn mixed_transaction(
    c: &mut tokio_postgres::Client,
    user: i64,
    rows: i32,
    messages: i32,
) -> Result<(), tokio_postgres::Error> {
    let tx = c.transaction().await?;
    let mut ids: Vec<i64> = Vec::new();
    let first = messages / 2;
    for (n, is_row) in [(first, false), (rows, true), (messages - first, false)] {
        if n == 0 {
            continue;
        }
        let statement = if is_row { INSERT } else { EMIT };
        let out = tx.query(statement, &[&user, &n]).await?;
        if !is_row {
            ids.extend(out.iter().map(|r| r.get::<_, i64>(1)));
        }
    }
    tx.execute(
        "INSERT INTO test_emitted SELECT unnest($1::bigint[])",
        &[&ids],
    )
    .await?;
    tx.commit().await
}

/// Every event that committed: table rows and ledgered messages.
async fn committed(c: &tokio_postgres::Client) -> anyhow::Result<BTreeSet<i64>> {
    let rows = c
        .query(
            "SELECT id FROM outbox UNION ALL SELECT id FROM test_emitted",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

fn header_of<'a>(r: &'a devstack::kafka::Record, name: &str) -> &'a str {
    r.header(name).unwrap_or_else(|| panic!("no {name} header"))
}

#[tokio::test]
async fn a_message_becomes_the_record_its_row_would_and_bad_ones_never_stop_the_relay(
) -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let topic = create_topic(3).await?;
    let relay = start(relay_config(
        &db.url,
        &db.slot_name(),
        &topic,
        &kafka_bootstrap(),
        &[],
    ))
    .await;
    let c = db.connect().await?;
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let fields = "'aggregate_type', 'order', 'aggregate_id', '9', 'user_id', 42, \
                  'event_type', 'OrderPaid', 'payload', jsonb_build_object('to', 'PAID', 'n', 1)";

    // One transaction: a row, a message with the row's fields and trace
    // context, and a message without an id.
    c.batch_execute(&format!(
        "BEGIN;
         INSERT INTO outbox (aggregate_type, aggregate_id, user_id, event_type, payload, traceparent)
           VALUES ('order', '9', 42, 'OrderPaid', jsonb_build_object('to', 'PAID', 'n', 1), '{traceparent}');
         SELECT pg_logical_emit_message(true, 'outbox', json_build_object('id',
           nextval(pg_get_serial_sequence('outbox', 'id')), {fields}, 'created_at', now(),
           'traceparent', '{traceparent}', 'tracestate', NULL)::text);
         SELECT pg_logical_emit_message(true, 'outbox', json_build_object({fields})::text);
         COMMIT;"
    ))
    .await?;
    // Never produced: a rolled-back message, a non-transactional one, one
    // with another prefix. Dead-lettered: a malformed one, then events flow on.
    c.batch_execute(&format!(
        "BEGIN;
         SELECT pg_logical_emit_message(true, 'outbox', json_build_object('id', 900001, {fields})::text);
         ROLLBACK;
         SELECT pg_logical_emit_message(false, 'outbox', json_build_object('id', 900002, {fields})::text);
         SELECT pg_logical_emit_message(true, 'not-events', json_build_object('id', 900003, {fields})::text);
         SELECT pg_logical_emit_message(true, 'outbox', '{{\"user_id\": 42, \"event_type\": \"Broken\"}}');
         SELECT pg_logical_emit_message(true, 'outbox', json_build_object('id', 900004, {fields})::text);"
    ))
    .await?;

    let expected: BTreeSet<i64> = [1, 2, 900004].into();
    let records = read_until_all(
        &kafka_bootstrap(),
        &topic,
        &expected,
        Duration::from_secs(30),
    )
    .await?;
    assert_eq!(records.len(), 4, "{records:?}");
    let (row, message) = (&records[0], &records[1]);
    let without_id = &records[2];
    assert_eq!(records[3].header(header::EVENT_ID), Some("900004"));

    // Same key, same partition, same value (but id and created_at), same
    // headers (but event_id and seq).
    assert_eq!(row.key, message.key);
    assert_eq!(row.key.as_deref(), Some("42"));
    assert_eq!(row.partition, message.partition);
    let value = |r: &devstack::kafka::Record| -> Value {
        serde_json::from_str(r.value.as_deref().expect("a value")).expect("JSON")
    };
    let (mut row_value, mut message_value) = (value(row), value(message));
    for v in [&mut row_value, &mut message_value] {
        let created_at = v["created_at"].as_str().expect("created_at").to_owned();
        assert!(
            created_at.ends_with('Z') && created_at.len() == 27,
            "{created_at}"
        );
        v["created_at"] = Value::Null;
    }
    assert_eq!(row_value["id"], 1);
    assert_eq!(message_value["id"], 2);
    message_value["id"] = 1.into();
    assert_eq!(message_value, row_value);
    assert_eq!(
        serde_json::to_string(&row_value)?,
        serde_json::to_string(&message_value)?,
        "the same columns in the same order"
    );
    for (r, seq, id) in [(row, "0", "1"), (message, "1", "2")] {
        assert_eq!(header_of(r, header::SEQ), seq);
        assert_eq!(header_of(r, header::EVENT_ID), id);
        assert_eq!(header_of(r, header::EVENT_TYPE), "OrderPaid");
        assert_eq!(header_of(r, trace::TRACEPARENT), traceparent);
    }
    assert_eq!(header_of(row, header::LSN), header_of(message, header::LSN));

    // Without an id: the message's LSN is the event id, stable and unique.
    let lsn_id: i64 = header_of(without_id, header::EVENT_ID).parse()?;
    assert!(lsn_id > 2);
    assert_eq!(value(without_id)["id"], lsn_id);
    assert_eq!(header_of(without_id, header::SEQ), "2");
    assert_eq!(without_id.header(trace::TRACEPARENT), None);

    // The malformed message, as it was written, in the dead-letter topic.
    let dlq = TopicReader::new(&kafka_bootstrap(), &format!("{topic}.relay-dlq"), true)?
        .read_at_least(1, Duration::from_secs(30), Duration::from_secs(1))
        .await?;
    assert_eq!(dlq.len(), 1);
    assert_eq!(
        dlq[0].value.as_deref(),
        Some(r#"{"user_id": 42, "event_type": "Broken"}"#)
    );
    let reason = header_of(&dlq[0], header::dlq::REASON);
    assert!(reason.contains("aggregate_type"), "{reason}");
    assert_eq!(dlq[0].key.as_deref(), Some("42"));

    let metrics = relay.shared.metrics.encode();
    for line in [
        "relay_messages_refused_total{reason=\"non_transactional\"} 1",
        "relay_messages_refused_total{reason=\"malformed\"} 1",
        "relay_dead_lettered_total 1",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    // The slot moved past all of it.
    let last = c
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get::<_, String>(0);
    wait_for("the slot to confirm past the dead letter", Duration::from_secs(30), || async {
        let confirmed: bool = c
            .query_one(
                "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $2",
                &[&last, &db.slot_name()],
            )
            .await?
            .get(0);
        Ok(confirmed.then_some(()))
    })
    .await?;
    relay.stop().await
}

#[tokio::test]
async fn a_burst_of_rows_and_messages_survives_kill_9_exactly_once_in_order() -> anyhow::Result<()>
{
    let db = TestDb::create().await?;
    let topic = create_topic(3).await?;
    let c = db.connect().await?;
    create_ledger(&c).await?;
    let args = relay_args(&db.url, &db.slot_name(), &topic, &kafka_bootstrap(), &[]);
    let mut relay = RelayProcess::spawn(&args).await?;

    // 400 transactions of 5 rows and 10 messages: 6,000 events, with two
    // kill -9 of the relay while they are written and streamed.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let url = db.url.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut c = devstack::testing::connect(&url).await?;
            for t in 0..400i64 {
                mixed_transaction(&mut c, t % 13, 5, 10).await?;
            }
            stop.store(true, Ordering::Relaxed);
            anyhow::Ok(())
        })
    };
    let reader = TopicReader::new(&kafka_bootstrap(), &topic, true)?;
    let mut seen = 0;
    for round in 1..=2 {
        seen += reader
            .read_at_least(500, Duration::from_secs(60), Duration::ZERO)
            .await?
            .len();
        assert!(seen >= 500 * round, "records flow before kill {round}");
        relay.kill_9().await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        relay = RelayProcess::spawn(&args).await?;
    }
    writer.await??;
    assert!(stop.load(Ordering::Relaxed));

    let expected = committed(&c).await?;
    assert_eq!(expected.len(), 6_000);
    let records = read_until_all(
        &kafka_bootstrap(),
        &topic,
        &expected,
        Duration::from_secs(120),
    )
    .await?;
    let produced: BTreeSet<i64> = records.iter().map(event_id).collect();
    assert_eq!(produced, expected, "every event, rows and messages");
    assert_eq!(records.len(), expected.len(), "none twice");
    assert_commit_order(&records);
    // A transaction's events in statement order: 5 messages, 5 rows, 5 messages.
    let messages: BTreeSet<i64> = c
        .query("SELECT id FROM test_emitted", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut by_lsn: std::collections::BTreeMap<String, Vec<(u64, bool)>> = Default::default();
    for r in &records {
        by_lsn
            .entry(header_of(r, header::LSN).to_owned())
            .or_default()
            .push((
                header_of(r, header::SEQ).parse()?,
                messages.contains(&event_id(r)),
            ));
    }
    assert_eq!(by_lsn.len(), 400);
    for events in by_lsn.values_mut() {
        events.sort();
        let kinds: Vec<bool> = events.iter().map(|e| e.1).collect();
        let seqs: Vec<u64> = events.iter().map(|e| e.0).collect();
        assert_eq!(seqs, (0..15).collect::<Vec<u64>>());
        assert_eq!(
            kinds,
            [[true; 5], [false; 5], [true; 5]].concat(),
            "statement order inside a transaction"
        );
    }
    relay.kill_9().await
}

#[tokio::test]
async fn without_a_table_only_messages_are_relayed() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let topic = create_topic(1).await?;
    let publication = format!("{}_pub", db.slot_name());
    let relay = start(relay_config(
        &db.url,
        &db.slot_name(),
        &topic,
        &kafka_bootstrap(),
        &["--table", "", "--publication", &publication],
    ))
    .await;
    let c = db.connect().await?;
    let published: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_publication_tables WHERE pubname = $1",
            &[&publication],
        )
        .await?
        .get(0);
    assert_eq!(published, 0, "a publication of no table");
    // The outbox table exists in the test database, but is not relayed.
    crate::common::insert_event(&c, 7, "AsRow").await?;
    c.execute(EMIT, &[&7i64, &3i32]).await?;
    let records = TopicReader::new(&kafka_bootstrap(), &topic, true)?
        .read_at_least(3, Duration::from_secs(30), Duration::from_secs(2))
        .await?;
    let types: Vec<&str> = records
        .iter()
        .map(|r| header_of(r, header::EVENT_TYPE))
        .collect();
    assert_eq!(types, ["E", "E", "E"], "the messages, not the row");
    relay.stop().await?;

    // Retention deletes rows: without a table it is refused at start.
    let refused = relay::pipeline::run(
        relay_config(
            &db.url,
            &db.slot_name(),
            &topic,
            &kafka_bootstrap(),
            &["--table", "", "--retention", "1h"],
        ),
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .expect_err("refused");
    assert!(refused.to_string().contains("no outbox table"), "{refused}");
    Ok(())
}
