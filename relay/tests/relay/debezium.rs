//! `--value-format debezium-outbox`: the records Debezium 3.6.1's Outbox
//! Event Router writes with its defaults (behind Kafka Connect's
//! StringConverter keys, JsonConverter values with schemas.enable=false).
//! The expected bytes below are what `scripts/bench debezium-compat`
//! read from the real Debezium for the same rows (its "Debezium's records
//! of the fixture rows"); that check compares every record of a run with
//! Debezium's, this test pins them on every run of the suite.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use clap::Parser;
use devstack::kafka::{Record, TopicReader};
use devstack::testing::{kafka_bootstrap, unique_name, wait_for, TestDb};
use outbox_record::{header, trace};
use relay::config::Config;
use relay::event::debezium;

use crate::common::{assert_commit_order, relay_args, start, RelayProcess};

/// The relay's command line with `--value-format debezium-outbox` and
/// no `--topic`, so records are routed as Debezium's router routes them.
fn debezium_args(db: &TestDb, extra: &[&str]) -> Vec<String> {
    let mut extra = extra.to_vec();
    extra.extend(["--value-format", "debezium-outbox"]);
    let mut args = relay_args(
        &db.url,
        &db.slot_name(),
        "unused",
        &kafka_bootstrap(),
        &extra,
    );
    let at = args.iter().position(|a| a == "--topic").expect("--topic");
    args.drain(at..at + 2);
    args
}

/// What the product's schema forbids but Debezium's router handles: a
/// NULL key and a NULL payload.
async fn allow_nulls(db: &TestDb) -> anyhow::Result<()> {
    db.connect()
        .await?
        .batch_execute(
            "ALTER TABLE outbox ALTER COLUMN aggregate_id DROP NOT NULL, \
             DROP CONSTRAINT outbox_aggregate_id_check, ALTER COLUMN payload DROP NOT NULL",
        )
        .await?;
    Ok(())
}

/// Reads `topic` from the beginning until it holds `n` records (the
/// relay creates a routed topic at its first record).
async fn read(topic: &str, n: usize) -> anyhow::Result<Vec<Record>> {
    let reader = wait_for(
        &format!("{topic} to exist"),
        Duration::from_secs(30),
        || async { Ok(TopicReader::new(&kafka_bootstrap(), topic, true).ok()) },
    )
    .await?;
    let records = reader
        .read_at_least(n, Duration::from_secs(60), Duration::from_millis(500))
        .await?;
    anyhow::ensure!(
        records.len() == n,
        "{topic}: {} records, not {n}",
        records.len()
    );
    Ok(records)
}

fn names(r: &Record) -> Vec<&str> {
    r.headers.iter().map(|(k, _)| k.as_str()).collect()
}

#[tokio::test]
async fn records_are_debeziums_outbox_router_records() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    allow_nulls(&db).await?;
    let suffix = unique_name("dbz");
    let (order, customer, shipment) = (
        format!("order_{suffix}"),
        format!("customer_{suffix}"),
        format!("shipment_{suffix}"),
    );
    let cfg = Config::try_parse_from(debezium_args(&db, &[]))?;
    let relay = start(cfg).await;

    let insert = "INSERT INTO outbox (aggregate_type, aggregate_id, user_id, event_type, payload, traceparent) \
                  VALUES ($1, $2, $3, $4, $5::text::jsonb, $6) RETURNING id";
    let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut client = db.connect().await?;
    let tx = client.transaction().await?;
    let mut ids = Vec::new();
    for (agg_type, agg_id, payload, traceparent) in [
        (
            &order,
            Some("1001"),
            Some(
                r#"{"order_id": 1001, "items": [{"sku": "A-1", "qty": 2, "tags": ["x", "y"]}], "total": {"cents": 3998, "currency": "EUR"}}"#,
            ),
            Some(trace),
        ),
        (
            &customer,
            Some("c-7"),
            Some(
                r#"{"name": "Zoë \"Q\" O'Brien", "path": "C:\\tmp\\x", "note": "line1\nline2\ttab \u0001", "emoji": "😀 €", "slash": "a/b"}"#,
            ),
            None,
        ),
        (&order, None, Some(r#"{"key": "none"}"#), None),
    ] {
        let row = tx
            .query_one(
                insert,
                &[agg_type, &agg_id, &42i64, &"E", &payload, &traceparent],
            )
            .await?;
        ids.push(row.get::<_, i64>(0));
    }
    tx.commit().await?;
    for (agg_id, payload) in [(Some("s-3"), None), (Some("s-2"), Some("null"))] {
        let row = client
            .query_one(
                insert,
                &[&shipment, &agg_id, &43i64, &"S", &payload, &None::<&str>],
            )
            .await?;
        ids.push(row.get::<_, i64>(0));
    }

    let mut orders = read(&format!("outbox.event.{order}"), 2).await?;
    let customers = read(&format!("outbox.event.{customer}"), 1).await?;
    let mut shipments = read(&format!("outbox.event.{shipment}"), 2).await?;
    relay.stop().await?;
    assert_commit_order(&orders);
    // Partitions are read in any order: by id.
    let id = |r: &Record| {
        r.header(debezium::ID_HEADER)
            .and_then(|v| v.parse::<i64>().ok())
    };
    orders.sort_by_key(id);
    shipments.sort_by_key(id);

    // Nested jsonb: the text Postgres prints (keys by length, then bytes;
    // ", " and ": "), as one JSON string.
    let r = &orders[0];
    assert_eq!(r.key.as_deref(), Some("1001"));
    assert_eq!(
        r.value.as_deref(),
        Some(
            r#""{\"items\": [{\"qty\": 2, \"sku\": \"A-1\", \"tags\": [\"x\", \"y\"]}], \"total\": {\"cents\": 3998, \"currency\": \"EUR\"}, \"order_id\": 1001}""#
        )
    );
    // Debezium's `id` first, then the relay's own, then --header-columns.
    assert_eq!(
        names(r),
        [
            &[debezium::ID_HEADER][..],
            &header::RELAY_NAMES,
            &[trace::TRACEPARENT]
        ]
        .concat()
    );
    assert_eq!(
        r.header(debezium::ID_HEADER),
        Some(ids[0].to_string().as_str())
    );
    assert_eq!(
        r.header(header::EVENT_ID),
        Some(ids[0].to_string().as_str())
    );
    assert_eq!(r.header(trace::TRACEPARENT), Some(trace));
    // Placed as Kafka's Java producer (Debezium's) places the key.
    assert_eq!(r.partition, relay::dedupe::partition_for(b"1001", 3));

    // Escapes as Jackson writes them, U+1F600 as its surrogates.
    let r = &customers[0];
    assert_eq!(r.key.as_deref(), Some("c-7"));
    assert_eq!(
        r.value.as_deref(),
        Some(
            r#""{\"name\": \"Zoë \\\"Q\\\" O'Brien\", \"note\": \"line1\\nline2\\ttab \\u0001\", \"path\": \"C:\\\\tmp\\\\x\", \"emoji\": \"\uD83D\uDE00 €\", \"slash\": \"a/b\"}""#
        )
    );
    assert_eq!(
        names(r),
        [[debezium::ID_HEADER].as_slice(), &header::RELAY_NAMES].concat()
    );

    // A NULL key: no key (placed by its event id).
    let r = &orders[1];
    assert_eq!(r.key, None);
    assert_eq!(r.value.as_deref(), Some(r#""{\"key\": \"none\"}""#));
    assert_eq!(
        r.header(debezium::ID_HEADER),
        Some(ids[2].to_string().as_str())
    );

    // An SQL NULL payload is the JSON null; a jsonb null the string "null".
    assert_eq!(shipments[0].key.as_deref(), Some("s-3"));
    assert_eq!(shipments[0].value.as_deref(), Some("null"));
    assert_eq!(shipments[1].value.as_deref(), Some(r#""null""#));
    Ok(())
}

#[tokio::test]
async fn kill_9_mid_stream_delivers_every_row_once() -> anyhow::Result<()> {
    const ROWS: i64 = 3000;
    let db = TestDb::create().await?;
    let suffix = unique_name("dbzk");
    let types: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|t| format!("{t}_{suffix}"))
        .collect();
    let args = debezium_args(&db, &[]);
    let relay = RelayProcess::spawn(&args).await?;

    // Rows in transactions of 1..=25, spread over the three types and 40 keys.
    let writer = {
        let (url, types) = (db.url.clone(), types.clone());
        tokio::spawn(async move {
            let client = devstack::testing::connect(&url).await?;
            let mut written = 0i64;
            let mut n = 0i64;
            while written < ROWS {
                n = n % 25 + 1;
                let batch = n.min(ROWS - written);
                client
                    .execute(
                        "INSERT INTO outbox (aggregate_type, aggregate_id, user_id, event_type, payload) \
                         SELECT ($1::text[])[1 + (($2::bigint + g) % 3)], (($2::bigint + g) % 40)::text, 1, 'E', \
                                jsonb_build_object('n', $2::bigint + g, 'nested', jsonb_build_object('k', 'v', 'a', jsonb_build_array(1, 'two'))) \
                         FROM generate_series(1, $3::bigint) g",
                        &[&types, &written, &batch],
                    )
                    .await?;
                written += batch;
                // Spread over a few seconds, so the kill lands mid-stream.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            anyhow::Ok(written)
        })
    };
    // Kill once records flow.
    let first = format!("outbox.event.{}", types[0]);
    wait_for("records to flow", Duration::from_secs(60), || {
        let first = first.clone();
        async move {
            let reader = match TopicReader::new(&kafka_bootstrap(), &first, true) {
                Ok(r) => r,
                Err(_) => return Ok(None),
            };
            let got = reader
                .read_at_least(200, Duration::from_secs(2), Duration::ZERO)
                .await?;
            Ok((got.len() >= 200).then_some(()))
        }
    })
    .await?;
    relay.kill_9().await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let relay = RelayProcess::spawn(&args).await?;
    assert_eq!(writer.await??, ROWS);

    // Every row exactly once, in its type's topic, in commit order.
    let client = db.connect().await?;
    let rows: BTreeMap<i64, (String, String, String)> = client
        .query(
            "SELECT id, aggregate_type, aggregate_id, payload::text FROM outbox",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
        .collect();
    assert_eq!(rows.len() as i64, ROWS);
    let mut seen = BTreeSet::new();
    for t in &types {
        let expected = rows.values().filter(|(ty, _, _)| ty == t).count();
        let topic = format!("outbox.event.{t}");
        let records = read(&topic, expected).await?;
        for r in &records {
            let id: i64 = r.header(debezium::ID_HEADER).expect("id header").parse()?;
            assert!(seen.insert(id), "event {id} twice");
            let (ty, key, payload) = &rows[&id];
            assert_eq!(ty, t);
            assert_eq!(r.key.as_deref(), Some(key.as_str()));
            // ASCII without controls: serde_json escapes as Jackson does.
            assert_eq!(
                r.value.as_deref(),
                Some(serde_json::to_string(payload)?.as_str())
            );
        }
        assert_commit_order(&records);
    }
    assert_eq!(seen.len() as i64, ROWS, "every row once");
    relay.kill_9().await
}
