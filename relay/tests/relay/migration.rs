//! The README's "Migrating in", followed step by step on Postgres and
//! Apache Kafka: the relay takes over the very topics the design before it
//! wrote, so consumers read on unchanged, and `relay verify` proves that
//! every row got there.
//!
//! ```text
//!  JDBC source connector path
//!   8 writers ──▶ outbox ◀── poller (SELECT … WHERE id > last ORDER BY id, every 200 ms) ──▶ T
//!   stop poller: N = last ─▶ relay --backfill after:N … (on T) ─▶ stop
//!     ─▶ relay verify --to-id N --republish-missing (the ids ≤ N the poller skipped, late)
//!     ─▶ relay again ─▶ relay verify: exit 0; T holds every row once
//!
//!  Debezium path
//!   slot + dbz_publication as Debezium makes them; "Debezium's" records for
//!   the first K rows; slot advanced past them (its last confirmation)
//!     ─▶ relay --slot <Debezium's> --publication dbz_publication
//!        --value-format debezium-outbox --foreign-records skip
//!     ─▶ every row once across Debezium's records and the relay's; verify exit 0
//!   (with 3 records "Debezium" produced past its confirmation: exactly
//!    those 3 come twice, and verify lists them as duplicated)
//! ```
//!
//! The commands are the README's, with the test's own `--database-url`,
//! `--slot`, `--kafka-bootstrap-servers`, `--listen` and topic names. The
//! JDBC connector is played by a poller in this module with the
//! connector's query semantics (`relay/examples/polling_baseline.rs`
//! checks them against its source) writing its records as Kafka Connect's
//! JsonConverter does. Debezium is played by records of the exact shape
//! `relay/tests/relay/debezium.rs` pins (from the real Debezium 3.6.1) and
//! a slot advanced as Debezium confirms it: running Kafka Connect with
//! Debezium is too heavy for every run of the suite (`scripts/bench
//! debezium-compat` and `vs-debezium` run the real thing).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use devstack::kafka::{Record, TopicReader};
use devstack::testing::{create_topic, kafka_bootstrap, unique_name, TestDb};
use outbox_record::header;
use rand::Rng;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::{json, Value};
use tokio::task::JoinHandle;

use crate::common::{assert_commit_order, relay_args, relay_json, RelayProcess};

/// Concurrent writers of the JDBC path.
const WRITERS: usize = 8;
/// Each writer's transaction stays open 0..=this many ms after its INSERT,
/// so ids commit out of order.
const HOLD_MS: u64 = 12;
/// The connector's poll.interval.ms in this test.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// `relay verify` lists this many ids per finding (counts are complete).
const LISTED: usize = 100;

/// The README's relay options for the JDBC connector's topic.
fn jdbc_relay_flags<'a>(topic: &'a str, backfill: &'a str) -> Vec<&'a str> {
    vec![
        "--topic",
        topic,
        "--value-format",
        "connect-json",
        "--foreign-records",
        "skip",
        "--backfill",
        backfill,
    ]
}

/// The README's relay options for Debezium's slot.
fn debezium_relay_flags(slot: &str) -> Vec<&str> {
    vec![
        "--slot",
        slot,
        "--publication",
        "dbz_publication",
        "--value-format",
        "debezium-outbox",
        "--foreign-records",
        "skip",
    ]
}

/// The test's connection options, then `flags`; without `--topic` unless
/// `flags` has one (Debezium's records are routed by aggregate type).
fn command_line(db: &TestDb, flags: &[&str]) -> Vec<String> {
    let mut args = relay_args(
        &db.url,
        &db.slot_name(),
        "unused",
        &kafka_bootstrap(),
        flags,
    );
    if !flags.contains(&"--topic") {
        let at = args.iter().position(|a| a == "--topic").expect("--topic");
        args.drain(at..at + 2);
    }
    args
}

/// The ids listed in a finding of `relay verify --json`.
fn listed(finding: &Value) -> Vec<i64> {
    finding["ids"]
        .as_array()
        .map(|ids| ids.iter().filter_map(Value::as_i64).collect())
        .unwrap_or_default()
}

/// A record's event id as a consumer finds it: the relay's `event_id`
/// header, else `payload.id` of the connect-json envelope (the JDBC
/// connector's records), else Debezium's `id` header.
fn record_id(r: &Record) -> Option<i64> {
    if let Some(id) = r.header(header::EVENT_ID) {
        return id.parse().ok();
    }
    if let Some(v) = r
        .value
        .as_deref()
        .and_then(|v| serde_json::from_str::<Value>(v).ok())
    {
        if let Some(id) = v["payload"]["id"].as_i64() {
            return Some(id);
        }
    }
    r.header("id")?.parse().ok()
}

/// Reads `topics` from the beginning until every id in `expected` has
/// appeared, then on until they stay quiet; every record, per topic.
async fn read_all(topics: &[String], expected: &BTreeSet<i64>) -> anyhow::Result<Vec<Vec<Record>>> {
    let readers = topics
        .iter()
        .map(|t| TopicReader::new(&kafka_bootstrap(), t, true))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut records = vec![Vec::new(); topics.len()];
    let mut seen = BTreeSet::new();
    loop {
        let mut quiet = true;
        for (reader, records) in readers.iter().zip(&mut records) {
            while let Some(r) = reader.next(Duration::from_millis(300)).await? {
                quiet = false;
                seen.extend(record_id(&r));
                records.push(r);
            }
        }
        if expected.is_subset(&seen) && quiet {
            return Ok(records);
        }
        if tokio::time::Instant::now() >= deadline {
            let missing: Vec<_> = expected.difference(&seen).take(20).collect();
            anyhow::bail!(
                "{} of {} events never reached {topics:?}, e.g. {missing:?}",
                expected.difference(&seen).count(),
                expected.len()
            );
        }
    }
}

/// How many records each event id has.
fn counts(records: &[Record]) -> BTreeMap<i64, usize> {
    let mut count = BTreeMap::new();
    for r in records {
        let id = record_id(r).unwrap_or_else(|| panic!("a record without an event id: {r:?}"));
        *count.entry(id).or_default() += 1;
    }
    count
}

async fn table_ids(c: &tokio_postgres::Client, sql: &str) -> anyhow::Result<BTreeSet<i64>> {
    Ok(c.query(sql, &[]).await?.iter().map(|r| r.get(0)).collect())
}

/// Writers as an application's: one row per transaction, each held open a
/// random moment, so ids (taken at INSERT) commit out of order. Each
/// returns how many rows it committed.
fn spawn_writers(url: &str, stop: &Arc<AtomicBool>) -> Vec<JoinHandle<anyhow::Result<usize>>> {
    (0..WRITERS)
        .map(|w| {
            let (url, stop) = (url.to_owned(), stop.clone());
            tokio::spawn(async move {
                let mut client = devstack::testing::connect(&url).await?;
                let insert = client
                    .prepare(
                        "INSERT INTO outbox (aggregate_type, aggregate_id, user_id, event_type, payload) \
                         VALUES ('order', $1, $2, 'OrderCreated', $3::text::jsonb) RETURNING id",
                    )
                    .await?;
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let (user, hold) = {
                        let mut rng = rand::rng();
                        (
                            rng.random_range(1..=40i64),
                            rng.random_range(0..=HOLD_MS),
                        )
                    };
                    let aggregate = format!("{w}-{n}");
                    let payload = format!(
                        r#"{{"order_id": "{aggregate}", "items": [{{"sku": "A-1", "quantity": 2}}], "note": "say \"hi\""}}"#
                    );
                    let tx = client.transaction().await?;
                    tx.query_one(&insert, &[&aggregate, &user, &payload]).await?;
                    tokio::time::sleep(Duration::from_millis(hold)).await;
                    tx.commit().await?;
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                anyhow::Ok(n)
            })
        })
        .collect()
}

/// What the poller did.
struct Polled {
    /// Ids it produced.
    produced: BTreeSet<i64>,
    /// Its incrementing offset at the stop: the highest id it extracted.
    last: i64,
    polls: usize,
}

/// The outbox table's columns as the JDBC connector's schema lists them
/// (and `--value-format connect-json` does: optional but for the key).
fn connect_schema() -> Value {
    let field = |name: &str, ty: &str| json!({"type": ty, "optional": name != "id", "field": name});
    let mut created_at = field("created_at", "int64");
    created_at["name"] = json!("org.apache.kafka.connect.data.Timestamp");
    created_at["version"] = json!(1);
    json!({
        "type": "struct",
        "fields": [
            field("id", "int64"),
            field("aggregate_type", "string"),
            field("aggregate_id", "string"),
            field("user_id", "int64"),
            field("event_type", "string"),
            field("payload", "string"),
            created_at,
            field("traceparent", "string"),
            field("tracestate", "string"),
        ],
        "optional": false,
        "name": "outbox",
    })
}

/// The JDBC source connector in `incrementing` mode on `id`, as
/// `polling_baseline` reproduces it: every poll interval one statement
/// `SELECT * FROM outbox WHERE id > ? ORDER BY id ASC` with `?` the
/// highest id extracted so far (starting at -1). Each row becomes what
/// the connector's worker writes through JsonConverter
/// (`schemas.enable=true`) with a StringConverter key of `user_id` (as a
/// ValueToKey/ExtractField key): the connect-json envelope, `jsonb` as the
/// text the driver returns, timestamps as epoch milliseconds, no headers;
/// placed by murmur2 of the key, as Kafka's Java producer places it.
/// Stops after the poll during which `stop` is seen set.
fn spawn_poller(
    url: String,
    topic: String,
    stop: Arc<AtomicBool>,
) -> JoinHandle<anyhow::Result<Polled>> {
    tokio::spawn(async move {
        let client = devstack::testing::connect(&url).await?;
        let bootstrap = kafka_bootstrap();
        let partitions = devstack::kafka::partition_count(&bootstrap, &topic).await?;
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .create()?;
        let query = client
            .prepare(
                "SELECT id, aggregate_type, aggregate_id, user_id, event_type, payload::text, \
                        floor(extract(epoch FROM created_at) * 1000)::bigint, traceparent, tracestate \
                   FROM outbox WHERE id > $1 ORDER BY id ASC",
            )
            .await?;
        let schema = connect_schema();
        let mut polled = Polled {
            produced: BTreeSet::new(),
            last: -1,
            polls: 0,
        };
        loop {
            let stopping = stop.load(Ordering::Relaxed);
            let rows = client.query(&query, &[&polled.last]).await?;
            let mut acks = Vec::with_capacity(rows.len());
            for row in &rows {
                let id: i64 = row.get(0);
                let user_id: i64 = row.get(3);
                let value = json!({
                    "schema": schema,
                    "payload": {
                        "id": id,
                        "aggregate_type": row.get::<_, String>(1),
                        "aggregate_id": row.get::<_, String>(2),
                        "user_id": user_id,
                        "event_type": row.get::<_, String>(4),
                        "payload": row.get::<_, String>(5),
                        "created_at": row.get::<_, i64>(6),
                        "traceparent": row.get::<_, Option<String>>(7),
                        "tracestate": row.get::<_, Option<String>>(8),
                    },
                })
                .to_string();
                let key = user_id.to_string();
                let partition = relay::dedupe::partition_for(key.as_bytes(), partitions);
                let ack = producer
                    .send_result(
                        FutureRecord::to(&topic)
                            .partition(partition)
                            .key(&key)
                            .payload(&value),
                    )
                    .map_err(|(e, _)| e)?;
                acks.push(ack);
                polled.last = polled.last.max(id);
                polled.produced.insert(id);
            }
            for ack in acks {
                match ack.await {
                    Ok(Ok(_)) => {}
                    Ok(Err((e, _))) => anyhow::bail!("the poller's record failed: {e}"),
                    Err(_) => anyhow::bail!("the poller's producer went away"),
                }
            }
            polled.polls += 1;
            if stopping {
                return Ok(polled);
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    })
}

#[tokio::test]
async fn the_jdbc_connector_path_hands_over_with_nothing_lost() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let c = db.connect().await?;
    let topic = create_topic(3).await?;

    // The connector runs (started first, as one already running) while
    // the application writes.
    let stop_poller = Arc::new(AtomicBool::new(false));
    let poller = spawn_poller(db.url.clone(), topic.clone(), stop_poller.clone());
    let stop_writers = Arc::new(AtomicBool::new(false));
    let writers = spawn_writers(&db.url, &stop_writers);
    tokio::time::sleep(Duration::from_secs(4)).await;

    // 1. Stop the connector; its last offset is N.
    stop_poller.store(true, Ordering::Relaxed);
    let polled = poller.await??;
    let n = polled.last;
    // Every transaction that took an id ≤ N has ended by now (each is
    // held at most HOLD_MS): the ids ≤ N the poller never produced are
    // the ones it skipped for good.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let up_to_n = table_ids(&c, &format!("SELECT id FROM outbox WHERE id <= {n}")).await?;
    let skipped: Vec<i64> = up_to_n.difference(&polled.produced).copied().collect();
    eprintln!(
        "poller: {} polls, {} rows produced, last offset {n}; skipped {} ids ≤ {n}: {:?}",
        polled.polls,
        polled.produced.len(),
        skipped.len(),
        &skipped[..skipped.len().min(20)]
    );
    assert!(
        polled.produced.len() >= 500,
        "the poller produced only {} rows",
        polled.produced.len()
    );
    assert!(
        !skipped.is_empty(),
        "the writers never made the poller skip a row (hold transactions longer)"
    );

    // 2. The relay on the connector's topic, in its format, from after N;
    // the writers keep writing.
    let after = format!("after:{n}");
    let relay_args = command_line(&db, &jdbc_relay_flags(&topic, &after));
    let relay = RelayProcess::spawn(&relay_args).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // 3. Stopped, `relay verify` over the connector's share finds exactly
    // what it skipped and publishes it, late.
    let status = relay.terminate().await?;
    assert!(status.success(), "the relay stopped with {status}");
    let (code, report) = relay_json(
        &relay_args,
        &[
            "verify",
            "--to-id",
            &n.to_string(),
            "--wait",
            "0s",
            "--republish-missing",
            "--json",
        ],
    )
    .await?;
    assert_eq!(code, 1, "rows were missing: {report:#}");
    assert_eq!(report["missing"]["count"], skipped.len(), "{report:#}");
    assert_eq!(
        listed(&report["missing"]),
        skipped[..skipped.len().min(LISTED)],
        "{report:#}"
    );
    assert_eq!(
        report["republished"]["produced"],
        skipped.len(),
        "{report:#}"
    );
    assert_eq!(report["republished"]["in_flight"], 0, "{report:#}");
    assert_eq!(report["duplicated"]["count"], 0, "{report:#}");
    assert_eq!(report["without_row"]["count"], 0, "{report:#}");
    assert_eq!(report["out_of_order"], 0, "{report:#}");

    // 4. The relay again, the same command (the finished backfill is not
    // repeated); then `relay verify` over everything exits 0.
    let relay = RelayProcess::spawn(&relay_args).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_writers.store(true, Ordering::Relaxed);
    let mut written = 0;
    for w in writers {
        written += w.await??;
    }
    let all = table_ids(&c, "SELECT id FROM outbox").await?;
    assert_eq!(all.len(), written);
    let (code, report) = relay_json(&relay_args, &["verify", "--json"]).await?;
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["ok"], true);
    assert_eq!(report["caught_up"], true, "{report:#}");
    assert_eq!(report["rows"], all.len());
    assert_eq!(report["records"], all.len());
    assert_eq!(report["late"], skipped.len());

    // A consumer reading the topic from the start: every row once, the
    // skipped ones marked late, one envelope whoever wrote the record.
    let records = read_all(std::slice::from_ref(&topic), &all)
        .await?
        .remove(0);
    let count = counts(&records);
    let twice: Vec<_> = count.iter().filter(|(_, n)| **n > 1).take(10).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    assert_eq!(count.keys().copied().collect::<BTreeSet<_>>(), all);
    let late: Vec<i64> = records
        .iter()
        .filter(|r| r.header(header::LATE).is_some())
        .filter_map(record_id)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(late, skipped);
    let payloads: BTreeMap<i64, String> = c
        .query("SELECT id, payload::text FROM outbox", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let by_relay = records
        .iter()
        .filter(|r| r.header(header::EVENT_ID).is_some())
        .count();
    assert_eq!(by_relay, all.len() - polled.produced.len());
    for r in &records {
        let v: Value = serde_json::from_str(r.value.as_deref().expect("a value"))?;
        let id = record_id(r).expect("an id");
        assert_eq!(v["payload"]["id"], id, "{v}");
        assert_eq!(
            r.key.as_deref(),
            Some(v["payload"]["user_id"].to_string().as_str())
        );
        // The same fields, the same types (the relay marks NOT NULL
        // columns optional: pgoutput does not say which are).
        let fields = |v: &Value| -> Vec<(Value, Value)> {
            v["schema"]["fields"]
                .as_array()
                .expect("fields")
                .iter()
                .map(|f| (f["field"].clone(), f["type"].clone()))
                .collect()
        };
        assert_eq!(fields(&v), fields(&json!({"schema": connect_schema()})));
        // The jsonb payload as a JSON string, the same document.
        let payload: Value = serde_json::from_str(v["payload"]["payload"].as_str().expect("text"))?;
        assert_eq!(payload, serde_json::from_str::<Value>(&payloads[&id])?);
    }
    let relayed: Vec<Record> = records
        .into_iter()
        .filter(|r| r.header(header::LSN).is_some() && r.header(header::LATE).is_none())
        .collect();
    assert_commit_order(&relayed);
    let status = relay.terminate().await?;
    assert!(status.success(), "the relay stopped with {status}");
    Ok(())
}

/// Inserts `n` rows in one transaction, spread over the aggregate types
/// and a few keys, and touches Debezium's heartbeat table as its
/// `heartbeat.action.query` does; the new ids.
async fn insert_rows(
    c: &tokio_postgres::Client,
    types: &[String],
    n: i32,
) -> anyhow::Result<Vec<i64>> {
    let ids = c
        .query(
            "INSERT INTO outbox (aggregate_type, aggregate_id, user_id, event_type, payload) \
             SELECT ($1::text[])[1 + g % 2], 'agg-' || (g % 7), 1 + g % 5, 'E', \
                    jsonb_build_object('n', g, 'note', 'a \"quoted\" word', 'items', jsonb_build_array(1, 'two')) \
             FROM generate_series(1, $2::int) g RETURNING id",
            &[&types, &n],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    c.execute(
        "INSERT INTO debezium_heartbeat (id, ts) VALUES (1, now()) \
         ON CONFLICT (id) DO UPDATE SET ts = excluded.ts",
        &[],
    )
    .await?;
    Ok(ids)
}

/// Produces Debezium's records of rows `ids`: what its Outbox Event Router
/// writes with its defaults (`relay/tests/relay/debezium.rs` pins them):
/// topic `outbox.event.<aggregate_type>`, key `aggregate_id`, value the
/// payload's text as one JSON string, header `id`, and Debezium's
/// extended context headers; placed by murmur2 of the key.
async fn produce_as_debezium(c: &tokio_postgres::Client, ids: &[i64]) -> anyhow::Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .set("enable.idempotence", "true")
        .create()?;
    let rows = c
        .query(
            "SELECT id, aggregate_type, aggregate_id, payload::text FROM outbox \
             WHERE id = ANY($1) ORDER BY id",
            &[&ids],
        )
        .await?;
    anyhow::ensure!(rows.len() == ids.len(), "rows {ids:?} not all there");
    for row in rows {
        let (id, aggregate_type, key, payload): (i64, String, String, String) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let topic = format!("{}{aggregate_type}", relay::event::debezium::TOPIC_PREFIX);
        let partitions = devstack::kafka::partition_count(&kafka_bootstrap(), &topic).await?;
        let value = relay::event::debezium_value(Some(&payload));
        let id = id.to_string();
        let mut headers = OwnedHeaders::new();
        for (k, v) in [
            ("id", id.as_str()),
            ("__debezium.context.connectorLogicalName", "microshop"),
            ("__debezium.context.connectorName", "outbox-connector"),
            ("__debezium.context.taskId", "0"),
            ("__debezium.context.runId", "1733300000000"),
        ] {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        producer
            .send(
                FutureRecord::to(&topic)
                    .partition(relay::dedupe::partition_for(key.as_bytes(), partitions))
                    .key(&key)
                    .payload(&value)
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
    }
    Ok(())
}

/// Debezium delivered rows and confirmed its slot past the first `K` of
/// them; it produced `unflushed` more before it was stopped without
/// confirming those. The relay takes over the slot with the README's
/// flags; the topics end up with every row, each once but for those
/// `unflushed`, which `relay verify` lists as duplicated.
async fn debezium_hand_off(unflushed: i32) -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let c = db.connect().await?;
    let slot = db.slot_name();
    let suffix = unique_name("mig");
    let types = [format!("order_{suffix}"), format!("customer_{suffix}")];
    let topics: Vec<String> = types
        .iter()
        .map(|t| format!("{}{t}", relay::event::debezium::TOPIC_PREFIX))
        .collect();
    for t in &topics {
        devstack::kafka::create_topic(&kafka_bootstrap(), t, 3).await?;
    }

    // Debezium's set-up: its publication (publication.autocreate.mode
    // all_tables), a heartbeat table, its pgoutput slot.
    c.batch_execute(
        "CREATE PUBLICATION dbz_publication FOR ALL TABLES; \
         CREATE TABLE debezium_heartbeat (id int PRIMARY KEY, ts timestamptz NOT NULL)",
    )
    .await?;
    c.execute(
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
        &[&slot],
    )
    .await?;

    // Debezium streams: three transactions delivered and confirmed ...
    let mut delivered = Vec::new();
    for _ in 0..3 {
        delivered.extend(insert_rows(&c, &types, 10).await?);
    }
    let confirmed: String = c
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    // ... and one more delivered, not confirmed when it stopped.
    let mut unconfirmed = Vec::new();
    if unflushed > 0 {
        unconfirmed = insert_rows(&c, &types, unflushed).await?;
    }
    let produced: Vec<i64> = delivered.iter().chain(&unconfirmed).copied().collect();
    produce_as_debezium(&c, &produced).await?;
    c.execute(
        "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)",
        &[&slot, &confirmed],
    )
    .await?;
    // Committed while Kafka Connect is down.
    for _ in 0..2 {
        insert_rows(&c, &types, 10).await?;
    }

    // The relay on Debezium's slot and publication.
    let args = command_line(&db, &debezium_relay_flags(&slot));
    let relay = RelayProcess::spawn(&args).await?;
    for _ in 0..2 {
        insert_rows(&c, &types, 10).await?;
    }

    let all = table_ids(&c, "SELECT id FROM outbox").await?;
    let per_topic = read_all(&topics, &all).await?;
    let records: Vec<Record> = per_topic.iter().flatten().cloned().collect();
    let count = counts(&records);
    assert_eq!(
        count.keys().copied().collect::<BTreeSet<_>>(),
        all,
        "no gap"
    );
    let twice: BTreeSet<i64> = count
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(
        twice,
        unconfirmed.iter().copied().collect::<BTreeSet<_>>(),
        "twice: exactly what Debezium produced past its confirmed position"
    );
    assert!(count.values().all(|n| *n <= 2));
    // The relay wrote every row Debezium had not confirmed, in commit
    // order per partition.
    let by_relay: Vec<Record> = records
        .iter()
        .filter(|r| r.header(header::LSN).is_some())
        .cloned()
        .collect();
    let relayed: BTreeSet<i64> = by_relay.iter().filter_map(record_id).collect();
    let confirmed_ids: BTreeSet<i64> = delivered.iter().copied().collect();
    assert_eq!(
        relayed,
        all.difference(&confirmed_ids).copied().collect(),
        "the relay starts where Debezium confirmed"
    );
    for of_topic in &per_topic {
        let of_relay: Vec<Record> = of_topic
            .iter()
            .filter(|r| r.header(header::LSN).is_some())
            .cloned()
            .collect();
        assert_commit_order(&of_relay);
    }

    // `relay verify` with the same options, while the relay runs.
    let (code, report) = relay_json(&args, &["verify", "--json"]).await?;
    assert_eq!(report["rows"], all.len(), "{report:#}");
    assert_eq!(report["missing"]["count"], 0, "{report:#}");
    assert_eq!(report["without_row"]["count"], 0, "{report:#}");
    assert_eq!(report["out_of_order"], 0, "{report:#}");
    assert_eq!(
        listed(&report["duplicated"]),
        unconfirmed,
        "verify lists what came twice: {report:#}"
    );
    assert_eq!(code, if unflushed == 0 { 0 } else { 1 }, "{report:#}");
    // Above the duplicates, the comparison is clean.
    if let Some(last) = unconfirmed.last() {
        let from = (last + 1).to_string();
        let (code, rest) = relay_json(&args, &["verify", "--from-id", &from, "--json"]).await?;
        assert_eq!(code, 0, "{rest:#}");
    }
    let status = relay.terminate().await?;
    assert!(status.success(), "the relay stopped with {status}");
    Ok(())
}

#[tokio::test]
async fn the_debezium_path_takes_over_its_slot_with_no_gap() -> anyhow::Result<()> {
    debezium_hand_off(0).await
}

#[tokio::test]
async fn records_debezium_produced_past_its_confirmed_position_come_twice_and_verify_lists_them(
) -> anyhow::Result<()> {
    debezium_hand_off(3).await
}
