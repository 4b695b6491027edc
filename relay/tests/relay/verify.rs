//! `relay verify` on Postgres and Apache Kafka: a topic the relay wrote
//! compares clean (exit 0); then each kind of damage — a duplicate, a
//! record out of its key's order, a record with no row, a row the relay
//! never delivered — is found, counted and named (exit 1); and over a
//! time range, only the rows created in it are compared.

use std::time::Duration;

use crate::common::{insert_batch, outbox_ids, read_until_all, relay_args, relay_config, start};
use devstack::kafka::{Record, TopicReader};
use devstack::testing::{create_topic, kafka_bootstrap, TestDb};
use outbox_record::header;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::Value;

/// Runs the relay binary with the test's slot and topic, then `extra`.
async fn relay_command(
    db: &TestDb,
    topic: &str,
    extra: &[&str],
) -> anyhow::Result<std::process::Output> {
    let mut args = relay_args(&db.url, &db.slot_name(), topic, &kafka_bootstrap(), &[]);
    args.remove(0);
    args.extend(extra.iter().map(|s| s.to_string()));
    Ok(tokio::process::Command::new(env!("CARGO_BIN_EXE_relay"))
        .args(&args)
        .env("RUST_LOG", "warn")
        .output()
        .await?)
}

/// Runs `relay … verify --json extra` for the test's slot and topic.
async fn verify(db: &TestDb, topic: &str, extra: &[&str]) -> anyhow::Result<(i32, Value)> {
    let args: Vec<&str> = ["verify", "--json"].iter().chain(extra).copied().collect();
    let out = relay_command(db, topic, &args).await?;
    let code = out.status.code().unwrap_or(-1);
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "verify printed no JSON ({e}), exit {code}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    Ok((code, report))
}

/// Produces a copy of `r` with `event_id` and `lsn` replaced.
async fn forge(topic: &str, r: &Record, event_id: i64, lsn: &str) -> anyhow::Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .create()?;
    let mut headers = OwnedHeaders::new();
    for (k, v) in &r.headers {
        let v = match k.as_str() {
            header::EVENT_ID => event_id.to_string(),
            header::LSN => lsn.to_owned(),
            _ => v.clone(),
        };
        headers = headers.insert(Header {
            key: k,
            value: Some(&v),
        });
    }
    let key = r.key.clone().unwrap_or_default();
    let value = r.value.clone().unwrap_or_default();
    producer
        .send(
            FutureRecord::to(topic)
                .partition(r.partition)
                .key(&key)
                .payload(&value)
                .headers(headers),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)?;
    Ok(())
}

#[tokio::test]
async fn verify_finds_every_kind_of_damage_and_nothing_on_a_clean_topic() -> anyhow::Result<()> {
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
    for t in 0..30 {
        insert_batch(&c, t * 10, 10).await?;
    }
    let ids = outbox_ids(&c).await?;
    let records = read_until_all(&kafka_bootstrap(), &topic, &ids, Duration::from_secs(30)).await?;

    let (code, clean) = verify(&db, &topic, &[]).await?;
    assert_eq!(code, 0, "{clean:#}");
    assert_eq!(clean["ok"], true);
    assert_eq!(clean["rows"], 300);
    assert_eq!(clean["records"], 300);
    assert_eq!(clean["caught_up"], true);
    assert_eq!(clean["from_id"], *ids.first().unwrap());
    assert_eq!(clean["to_id"], *ids.last().unwrap());

    // Damage: a duplicate of the 10th record, an early record produced again
    // under a new id after its key's later ones (out of order, and no row),
    // and a row the relay never delivers (stopped).
    let tenth = &records[9];
    let tenth_id: i64 = tenth.header(header::EVENT_ID).unwrap().parse()?;
    forge(&topic, tenth, tenth_id, tenth.header(header::LSN).unwrap()).await?;
    let first = &records[0];
    forge(&topic, first, 900_000, first.header(header::LSN).unwrap()).await?;
    relay.stop().await?;
    insert_batch(&c, 7, 1).await?;
    let undelivered = *outbox_ids(&c).await?.last().unwrap();

    let (code, damaged) = verify(&db, &topic, &["--to-id", "1000000", "--wait", "1s"]).await?;
    assert_eq!(code, 1, "{damaged:#}");
    assert_eq!(damaged["ok"], false);
    assert_eq!(damaged["caught_up"], false, "the relay is stopped");
    assert_eq!(damaged["missing"]["ids"], serde_json::json!([undelivered]));
    assert_eq!(damaged["duplicated"]["ids"], serde_json::json!([tenth_id]));
    assert_eq!(damaged["without_row"]["ids"], serde_json::json!([900_000]));
    // Both forged records came after later records of their keys (the
    // duplicate, too, when its key had moved on).
    let late: Vec<i64> = damaged["out_of_order_examples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_id"].as_i64().unwrap())
        .collect();
    assert!(late.contains(&900_000), "{damaged:#}");
    assert_eq!(
        damaged["out_of_order"].as_u64().unwrap() as usize,
        late.len()
    );
    assert!((1..=2).contains(&late.len()), "{damaged:#}");

    // A range that leaves the damage out has no missing, duplicated or
    // extra events (the undelivered row is the newest).
    let (first_id, last_id) = (*ids.first().unwrap(), *ids.last().unwrap());
    let (from, to) = if tenth_id > first_id {
        (first_id, tenth_id - 1)
    } else {
        (tenth_id + 1, last_id)
    };
    let (code, part) = verify(
        &db,
        &topic,
        &[
            "--from-id",
            &from.to_string(),
            "--to-id",
            &to.to_string(),
            "--wait",
            "1s",
        ],
    )
    .await?;
    assert_eq!(part["missing"]["count"], 0, "{part:#}");
    assert_eq!(part["duplicated"]["count"], 0, "{part:#}");
    assert_eq!(part["without_row"]["count"], 0, "{part:#}");
    // Order is a property of the topic, whatever the range.
    assert_eq!(part["out_of_order"], damaged["out_of_order"]);
    assert_eq!(code, 1);

    // Plain text for a person, and a clear error for a bad setup.
    let out = relay_command(&db, &topic, &["--table", "", "verify"]).await?;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no table"));
    let _ = TopicReader::new(&kafka_bootstrap(), &topic, true)?;
    Ok(())
}

/// Inserts `n` rows created one hour apart from `first` (RFC 3339).
async fn insert_dated(c: &tokio_postgres::Client, first: &str, n: i32) -> anyhow::Result<()> {
    c.execute(
        "INSERT INTO outbox (aggregate_type, aggregate_id, user_id, event_type, payload, created_at) \
         SELECT 'order', g::text, g, 'E', '{}'::jsonb, $1::text::timestamptz + g * interval '1 hour' \
         FROM generate_series(0, $2::int - 1) g",
        &[&first, &n],
    )
    .await?;
    Ok(())
}

/// `--since` and `--until` compare the rows created in a time range (by
/// `created_at`, or `--time-column`): 20 rows of January delivered, 10 of
/// today delivered, then (relay stopped) 3 rows of March never delivered.
/// March alone: the 3 missing; January alone, a window of it, and the last
/// hour: clean, with nothing from outside the range reported as a record
/// with no row. A time that is not one is refused (exit 2).
#[tokio::test]
async fn verify_over_a_time_range_compares_the_rows_created_in_it() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let topic = create_topic(2).await?;
    let relay = start(relay_config(
        &db.url,
        &db.slot_name(),
        &topic,
        &kafka_bootstrap(),
        &[],
    ))
    .await;
    let c = db.connect().await?;
    insert_dated(&c, "2026-01-01T00:00:00Z", 20).await?;
    insert_batch(&c, 100, 10).await?;
    read_until_all(
        &kafka_bootstrap(),
        &topic,
        &outbox_ids(&c).await?,
        Duration::from_secs(30),
    )
    .await?;
    relay.stop().await?;
    insert_dated(&c, "2026-03-01T00:00:00Z", 3).await?;
    let march: Vec<i64> = outbox_ids(&c)
        .await?
        .into_iter()
        .rev()
        .take(3)
        .rev()
        .collect();

    let (code, r) = verify(
        &db,
        &topic,
        &[
            "--since",
            "2026-02-01T00:00:00Z",
            "--until",
            "2026-04-01T00:00:00+02:00",
            "--wait",
            "1s",
        ],
    )
    .await?;
    assert_eq!(code, 1, "{r:#}");
    assert_eq!(r["rows"], 3, "{r:#}");
    assert_eq!(r["missing"]["ids"], serde_json::json!(march), "{r:#}");
    assert_eq!(r["since"], "2026-02-01T00:00:00.000000Z");
    assert_eq!(r["until"], "2026-03-31T22:00:00.000000Z");

    let clean = |r: &Value| {
        r["missing"]["count"] == 0
            && r["duplicated"]["count"] == 0
            && r["without_row"]["count"] == 0
            && r["out_of_order"] == 0
    };
    let (code, r) = verify(
        &db,
        &topic,
        &["--until", "2026-02-01T00:00:00Z", "--wait", "1s"],
    )
    .await?;
    assert!(code == 0 && r["rows"] == 20 && clean(&r), "{r:#}");
    let window = [
        "--since",
        "2026-01-01T05:00:00Z",
        "--until",
        "2026-01-01T10:00:00Z",
        "--wait",
        "1s",
    ];
    let (code, r) = verify(&db, &topic, &window).await?;
    assert!(code == 0 && r["rows"] == 5 && clean(&r), "{r:#}");
    let (code, r) = verify(&db, &topic, &["--since", "1h", "--wait", "1s"]).await?;
    assert!(code == 0 && r["rows"] == 10 && clean(&r), "{r:#}");

    let out = relay_command(&db, &topic, &["verify", "--since", "yesterday"]).await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("neither an RFC 3339 time"), "{stderr}");
    Ok(())
}

#[tokio::test]
async fn republish_produces_lost_events_late_and_leaves_in_flight_ones_to_the_relay(
) -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let topic = create_topic(3).await?;
    let cfg = || relay_config(&db.url, &db.slot_name(), &topic, &kafka_bootstrap(), &[]);
    let relay = start(cfg()).await;
    let c = db.connect().await?;
    for t in 0..10 {
        insert_batch(&c, t * 10, 10).await?;
    }
    read_until_all(
        &kafka_bootstrap(),
        &topic,
        &outbox_ids(&c).await?,
        Duration::from_secs(30),
    )
    .await?;
    // While a relay streams the slot, nothing is republished.
    let refused = relay::republish::republish(&cfg(), &c, &[1]).await;
    assert!(
        matches!(
            refused,
            Err(relay::republish::RepublishError::SlotActive(_))
        ),
        "{refused:?}"
    );
    relay.stop().await?;

    // Committed while the relay is stopped: in the slot's unconfirmed
    // changes, so left to the relay.
    insert_batch(&c, 500, 3).await?;
    let (code, first) = verify(&db, &topic, &["--wait", "1s", "--republish-missing"]).await?;
    assert_eq!(code, 1, "{first:#}");
    assert_eq!(first["missing"]["count"], 3);
    assert_eq!(first["republished"]["in_flight"], 3, "{first:#}");
    assert_eq!(first["republished"]["produced"], 0);

    // The slot moved past them (as a lost slot, or a poller that skipped
    // them, would leave them): now they are lost, and republished.
    c.execute(
        "SELECT pg_replication_slot_advance($1, pg_current_wal_lsn())",
        &[&db.slot_name()],
    )
    .await?;
    let (_, second) = verify(&db, &topic, &["--wait", "1s", "--republish-missing"]).await?;
    assert_eq!(second["republished"]["produced"], 3, "{second:#}");
    assert_eq!(second["republished"]["in_flight"], 0);
    let (code, after) = verify(&db, &topic, &["--wait", "1s"]).await?;
    assert_eq!(code, 0, "{after:#}");
    assert_eq!(after["late"], 3);
    assert_eq!(after["records"], 103);

    // The late records are the relay's records of those rows, marked late.
    let records = TopicReader::new(&kafka_bootstrap(), &topic, true)?
        .read_at_least(103, Duration::from_secs(30), Duration::from_secs(1))
        .await?;
    let late: Vec<&Record> = records
        .iter()
        .filter(|r| r.header(header::LATE).is_some())
        .collect();
    assert_eq!(late.len(), 3);
    for r in &late {
        let v: Value = serde_json::from_str(r.value.as_deref().unwrap())?;
        assert_eq!(
            r.header(header::EVENT_ID),
            Some(v["id"].to_string().as_str())
        );
        assert_eq!(r.key.as_deref(), Some(v["user_id"].to_string().as_str()));
        assert_eq!(v["event_type"], "E");
    }

    // The relay starts again over them: exactly-once reads them as the
    // partitions' ends, and the next events flow, once.
    let relay = start(cfg()).await;
    insert_batch(&c, 900, 5).await?;
    let all = outbox_ids(&c).await?;
    let records = read_until_all(&kafka_bootstrap(), &topic, &all, Duration::from_secs(30)).await?;
    assert_eq!(records.len(), 108, "each event once");
    relay.stop().await?;
    let (code, last) = verify(&db, &topic, &["--wait", "10s"]).await?;
    assert_eq!(code, 0, "{last:#}");
    Ok(())
}

#[tokio::test]
async fn a_dropped_slot_is_recovered_with_nothing_lost() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let topic = create_topic(3).await?;
    let cfg =
        |extra: &[&str]| relay_config(&db.url, &db.slot_name(), &topic, &kafka_bootstrap(), extra);
    let c = db.connect().await?;
    let relay = start(cfg(&[])).await;
    insert_batch(&c, 10, 20).await?;
    read_until_all(
        &kafka_bootstrap(),
        &topic,
        &outbox_ids(&c).await?,
        Duration::from_secs(30),
    )
    .await?;
    relay.stop().await?;

    // The gap: committed while the slot is gone.
    insert_batch(&c, 20, 10).await?;
    c.execute("SELECT pg_drop_replication_slot($1)", &[&db.slot_name()])
        .await?;
    let refused = relay::pipeline::run(cfg(&[]), tokio_util::sync::CancellationToken::new())
        .await
        .expect_err("no new slot over the topic's events unasked");
    assert!(
        refused.to_string().contains("--republish-missing"),
        "{refused}"
    );

    // The way its message names: a new slot, stopped; republish; start.
    let relay = start(cfg(&["--allow-new-slot"])).await;
    insert_batch(&c, 30, 5).await?;
    let (code, during) = verify(&db, &topic, &["--wait", "10s"]).await?;
    assert_eq!(code, 1);
    assert_eq!(during["missing"]["count"], 10, "the gap: {during:#}");
    relay.stop().await?;
    let (_, republished) = verify(&db, &topic, &["--republish-missing"]).await?;
    assert_eq!(
        republished["republished"]["produced"], 10,
        "{republished:#}"
    );
    let relay = start(cfg(&[])).await;
    insert_batch(&c, 40, 5).await?;
    let all = outbox_ids(&c).await?;
    let records = read_until_all(&kafka_bootstrap(), &topic, &all, Duration::from_secs(30)).await?;
    assert_eq!(records.len(), 40, "every event once");
    let (code, after) = verify(&db, &topic, &["--wait", "10s"]).await?;
    assert_eq!(code, 0, "{after:#}");
    assert_eq!(after["late"], 10);
    relay.stop().await
}
