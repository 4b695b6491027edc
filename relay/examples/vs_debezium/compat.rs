//! `scripts/bench debezium-compat`: the relay's `--value-format
//! debezium-outbox` against the real Debezium, record by record.
//!
//! ```text
//!   outbox rows ─┬─ slot <db>_relay ─▶ relay --value-format debezium-outbox ─┐
//!   (one scratch │                                                          ├─▶ outbox.event.<aggregate_type>
//!    database)   └─ slot <db>_dbz   ─▶ Connect 4.3 + Debezium 3.6.1 ─────────┘   (the same topics, one after
//!                                      EventRouter with its defaults              the other)
//! ```
//!
//! Both slots exist before any row is written, so both systems see the
//! same rows. The relay runs first (its exactly-once start needs topics
//! whose last records are its own or none), then Connect appends its
//! records to the same topics. The records are told apart by the relay's
//! `lsn` header and matched by Debezium's `id` header; for each row the
//! topic, key, value bytes and Debezium's headers must be identical
//! (the relay's headers may add only its own and `--header-columns`;
//! Debezium's connector-level `__debezium.context.*` headers are listed,
//! not compared: see [`DEBEZIUM_CONTEXT_HEADERS`]),
//! and a keyed record must land on the same partition. The router's
//! settings are its defaults except the column names
//! ([`connect::ROUTER_COLUMN_NAMES`]); the worker's converters are those of
//! [`Connect`] (keys `StringConverter`, values `JsonConverter` with
//! `schemas.enable=false`, headers the default `SimpleHeaderConverter`).
//!
//! The rows: three aggregate types (names made unique per run, so each
//! run has fresh topics), nested `jsonb` with escapes, Unicode beyond
//! U+FFFF, big numbers, a JSON string, array, `null` literal, an SQL NULL
//! payload and a NULL key (the table's NOT NULL constraints dropped in the
//! scratch database), a W3C `traceparent` column, one-row transactions and
//! a 600-row one. Exit status non-zero on any difference, each printed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use devstack::bench::ScratchDb;
use devstack::kafka::{Record, TopicReader};
use devstack::testing::connect;
use outbox_record::{header, trace};
use relay::event::debezium;

use crate::connect::{self as kconnect, tempdir, Connect, Mode, Watermarks};
use crate::Args;

/// Headers the relay adds to Debezium's (its own, and its default
/// `--header-columns`).
const RELAY_EXTRA_HEADERS: &[&str] = &[
    header::EVENT_ID,
    header::EVENT_TYPE,
    header::LSN,
    header::XID,
    header::COMMIT_TS,
    header::SEQ,
    trace::TRACEPARENT,
    trace::TRACESTATE,
];

/// Debezium's connector-level headers (`extended.headers.enabled`, on by
/// default since 3.2.1, `CommonConnectorConfig`): the connector's logical
/// name, type, task and a random id of each task start. They describe the
/// Connect task, not the event, and the relay does not write them.
const DEBEZIUM_CONTEXT_HEADERS: &str = "__debezium.context.";

/// Rows of the fixture: (aggregate type index, aggregate_id, user_id,
/// event_type, payload as SQL text of a jsonb, traceparent).
type Row = (
    usize,
    Option<&'static str>,
    i64,
    &'static str,
    Option<&'static str>,
    Option<&'static str>,
);

const ROWS: &[Row] = &[
    (
        0,
        Some("1001"),
        42,
        "OrderCreated",
        Some(
            r#"{"order_id": 1001, "items": [{"sku": "A-1", "qty": 2, "tags": ["x", "y"]}], "total": {"cents": 3998, "currency": "EUR"}}"#,
        ),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    ),
    (
        1,
        Some("c-7"),
        43,
        "CustomerRegistered",
        Some(
            r#"{"name": "Zoë \"Q\" O'Brien", "path": "C:\\tmp\\x", "note": "line1\nline2\ttab \u0001", "emoji": "😀 €", "slash": "a/b"}"#,
        ),
        None,
    ),
    (
        2,
        Some("s-1"),
        44,
        "ShipmentBooked",
        Some(
            r#"{"big": 123456789012345678901234567890.000000000000000000001, "neg": -0.0, "e": 1e400}"#,
        ),
        None,
    ),
    (
        0,
        None,
        45,
        "OrderCreated",
        Some(r#"{"key": "none"}"#),
        None,
    ),
    (
        0,
        Some("1002"),
        46,
        "OrderNote",
        Some(r#""just a string""#),
        None,
    ),
    (
        1,
        Some("c-8"),
        47,
        "CustomerTags",
        Some(r#"[1, "two", {"three": [3]}, null, true]"#),
        None,
    ),
    (2, Some("s-2"), 48, "ShipmentNull", Some("null"), None),
    (2, Some("s-3"), 49, "ShipmentEmpty", None, None),
    (1, Some("c-9"), 50, "CustomerEmpty", Some("{}"), None),
];

/// Rows of the bulk transaction.
const BULK: i32 = 600;

pub async fn run(args: &Args) -> anyhow::Result<()> {
    let db = ScratchDb::create(&args.stack.database_url, "dbzcompat").await?;
    let slots = [format!("{}_relay", db.name), format!("{}_dbz", db.name)];
    let result = compare(args, &db, &slots).await;
    db.drop_with_slots(&slots).await;
    result
}

async fn compare(args: &Args, db: &ScratchDb, slots: &[String; 2]) -> anyhow::Result<()> {
    let bootstrap = &args.stack.kafka_bootstrap_servers;
    devstack::migrations::apply(&db.url).await?;
    let client = connect(&db.url).await?;
    kconnect::setup(&client, bootstrap).await?;
    // A NULL key and a NULL payload are what Debezium's defaults must be
    // compared on too; the product's schema forbids both.
    client
        .batch_execute(
            "ALTER TABLE outbox ALTER COLUMN aggregate_id DROP NOT NULL, \
             DROP CONSTRAINT outbox_aggregate_id_check, ALTER COLUMN payload DROP NOT NULL",
        )
        .await?;
    for slot in slots {
        client
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[slot],
            )
            .await?;
    }
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let types = [
        format!("order_{stamp}"),
        format!("customer_{stamp}"),
        format!("shipment_{stamp}"),
    ];
    let topics: Vec<String> = types.iter().map(|t| format!("outbox.event.{t}")).collect();
    for t in &topics {
        devstack::kafka::create_topic(bootstrap, t, args.partitions).await?;
    }

    // The fixture: its first three rows in one transaction, the others one
    // each, then the bulk transaction.
    let insert = "INSERT INTO outbox (aggregate_type, aggregate_id, user_id, event_type, payload, traceparent) \
                  VALUES ($1, $2, $3, $4, $5::text::jsonb, $6)";
    let mut c = connect(&db.url).await?;
    let tx = c.transaction().await?;
    for (t, agg, user, ty, payload, trace) in &ROWS[..3] {
        tx.execute(insert, &[&types[*t], agg, user, ty, payload, trace])
            .await?;
    }
    tx.commit().await?;
    for (t, agg, user, ty, payload, trace) in &ROWS[3..] {
        c.execute(insert, &[&types[*t], agg, user, ty, payload, trace])
            .await?;
    }
    c.execute(
        "INSERT INTO outbox (aggregate_type, aggregate_id, user_id, event_type, payload) \
         SELECT ($1::text[])[1 + g % 3], (g % 17)::text, g, 'Bulk', \
                jsonb_build_object('n', g, 'nested', jsonb_build_object('arr', jsonb_build_array(g, 'x', null, true), \
                                   'deeper', jsonb_build_object('s', 'é😀\"q\"', 'f', g / 7.0))) \
         FROM generate_series(1, $2::int) g",
        &[&types.to_vec(), &BULK],
    )
    .await?;
    let rows: i64 = c
        .query_one("SELECT count(*) FROM outbox", &[])
        .await?
        .get(0);
    let rows = rows as u64;
    println!(
        "debezium-compat: {rows} outbox rows in {} transactions, topics {}",
        ROWS.len() - 1,
        topics.join(", ")
    );

    let watermarks = topics
        .iter()
        .map(|t| Watermarks::new(bootstrap, t))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let total = || -> anyhow::Result<u64> { watermarks.iter().map(Watermarks::total).sum() };

    // The relay: debezium-outbox with every other option at its default.
    let dir = tempdir(&format!("{}-compat", db.name))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let relay_log = std::fs::File::create(dir.join("relay.log"))?;
    let mut relay = tokio::process::Command::new(&args.relay_bin);
    // Its defaults, not what the environment says (scripts/bench exports
    // the stack's OUTBOX_TOPIC, which would fix the topic).
    for (name, _) in std::env::vars() {
        if name == "OUTBOX_TOPIC" || name.starts_with("RELAY_") {
            relay.env_remove(name);
        }
    }
    let mut relay = relay
        .args(["--database-url", &db.url, "--slot", &slots[0]])
        .args(["--kafka-bootstrap-servers", bootstrap])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--value-format", "debezium-outbox"])
        .env("RUST_LOG", "warn")
        .stdout(relay_log.try_clone()?)
        .stderr(relay_log)
        .kill_on_drop(true)
        .spawn()
        .context("starting the relay")?;
    let waited = wait_total(&total, rows, args.timeout, || {
        Ok(relay.try_wait()?.map(|s| format!("the relay exited: {s}")))
    })
    .await;
    let _ = relay.start_kill();
    let _ = relay.wait().await;
    waited.with_context(|| format!("relay (log: {})", dir.join("relay.log").display()))?;
    println!("relay: {rows} records");

    let config = kconnect::router_defaults_config(db, &slots[1])?;
    println!("Debezium 3.6.1 Outbox Event Router, its defaults except:");
    for (k, v) in kconnect::ROUTER_COLUMN_NAMES {
        println!("  transforms.outbox.{k} = {v}");
    }
    let mut connect = Connect::spawn_with(args, db, &dir, Mode::Standalone, config)?;
    let waited = wait_total(&total, 2 * rows, args.timeout, || {
        Ok(connect
            .child
            .try_wait()?
            .map(|s| format!("Kafka Connect exited: {s}")))
    })
    .await;
    connect.kill().await;
    waited.with_context(|| {
        format!(
            "Debezium (Connect's log: {})",
            dir.join("connect.log").display()
        )
    })?;
    println!("debezium: {rows} records");

    let mut relay_records = BTreeMap::new();
    let mut dbz_records = BTreeMap::new();
    for (t, marks) in topics.iter().zip(&watermarks) {
        let count = marks.total()? as usize;
        let reader = TopicReader::new(bootstrap, t, true)?;
        let records = reader
            .read_at_least(count, Duration::from_secs(60), Duration::from_secs(1))
            .await?;
        anyhow::ensure!(
            records.len() == count,
            "{t}: read {} of {count} records",
            records.len()
        );
        for r in records {
            let id = r
                .header(debezium::ID_HEADER)
                .map(str::to_owned)
                .unwrap_or_default();
            let side = if r.header(header::LSN).is_some() {
                &mut relay_records
            } else {
                &mut dbz_records
            };
            if side.insert(id.clone(), (t.clone(), r)).is_some() {
                bail!("two records of id {id:?} from one system in {t}");
            }
        }
    }

    println!();
    println!("Debezium's records of the fixture rows (topic, partition, key, value, headers):");
    let fixture_ids: Vec<i64> = c
        .query(
            &format!("SELECT id FROM outbox ORDER BY id LIMIT {}", ROWS.len()),
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for id in &fixture_ids {
        if let Some((topic, r)) = dbz_records.get(&id.to_string()) {
            println!(
                "  {topic} p{} key={} value={} headers={:?}",
                r.partition,
                r.key
                    .as_deref()
                    .map_or("NULL".to_owned(), |k| format!("{k:?}")),
                r.value.as_deref().unwrap_or("NULL"),
                r.headers
            );
        }
    }

    let mut diffs: Vec<String> = Vec::new();
    let mut differing = BTreeSet::new();
    let mut extras = BTreeSet::new();
    let mut debezium_only = BTreeSet::new();
    let mut same_partition = 0;
    let ids: BTreeSet<&String> = relay_records.keys().chain(dbz_records.keys()).collect();
    for id in &ids {
        let before = diffs.len();
        let (Some((rt, r)), Some((dt, d))) = (relay_records.get(*id), dbz_records.get(*id)) else {
            diffs.push(format!(
                "id {id}: only {}",
                if relay_records.contains_key(*id) {
                    "the relay"
                } else {
                    "Debezium"
                }
            ));
            continue;
        };
        let diff = |what: &str, relay: String, dbz: String| {
            (relay != dbz)
                .then(|| format!("id {id}: {what}\n    relay    {relay}\n    debezium {dbz}"))
        };
        diffs.extend(diff("topic", rt.clone(), dt.clone()));
        diffs.extend(diff("key", format!("{:?}", r.key), format!("{:?}", d.key)));
        diffs.extend(diff(
            "value",
            format!("{:?}", r.value),
            format!("{:?}", d.value),
        ));
        let (context, dbz_headers): (Vec<_>, Vec<_>) = d
            .headers
            .iter()
            .partition(|(k, _)| k.starts_with(DEBEZIUM_CONTEXT_HEADERS));
        debezium_only.extend(context.into_iter().map(|(k, _)| k.clone()));
        let dbz_names: BTreeSet<&str> = dbz_headers.iter().map(|(k, _)| k.as_str()).collect();
        let shared: Vec<&(String, String)> = r
            .headers
            .iter()
            .filter(|(k, _)| dbz_names.contains(k.as_str()))
            .collect();
        diffs.extend(diff(
            "Debezium's headers",
            format!("{shared:?}"),
            format!("{dbz_headers:?}"),
        ));
        for (k, _) in &r.headers {
            if !dbz_names.contains(k.as_str()) {
                if !RELAY_EXTRA_HEADERS.contains(&k.as_str()) {
                    diffs.push(format!("id {id}: unexpected relay header {k:?}"));
                }
                extras.insert(k.clone());
            }
        }
        if d.key.is_some() {
            diffs.extend(diff(
                "partition",
                r.partition.to_string(),
                d.partition.to_string(),
            ));
            same_partition += usize::from(r.partition == d.partition);
        }
        if diffs.len() > before {
            differing.insert(*id);
        }
    }
    // Per key, the same order in both.
    let order = |side: &BTreeMap<String, (String, Record)>| {
        let mut per_key: BTreeMap<(String, String), Vec<(i64, i64)>> = BTreeMap::new();
        for (id, (t, r)) in side {
            if let Some(k) = &r.key {
                per_key
                    .entry((t.clone(), k.clone()))
                    .or_default()
                    .push((r.offset, id.parse().unwrap_or(-1)));
            }
        }
        per_key
            .into_iter()
            .map(|(k, mut v)| {
                v.sort();
                (k, v.into_iter().map(|(_, id)| id).collect::<Vec<_>>())
            })
            .collect::<BTreeMap<_, _>>()
    };
    let (relay_order, dbz_order) = (order(&relay_records), order(&dbz_records));
    for (key, ids) in &dbz_order {
        if relay_order.get(key) != Some(ids) {
            diffs.push(format!("{key:?}: per-key order differs"));
        }
    }

    println!();
    println!(
        "compared {} rows: relay {} records, debezium {}; identical topic, key, value and Debezium's headers: {}; \
         same partition for {same_partition} keyed records",
        ids.len(),
        relay_records.len(),
        dbz_records.len(),
        ids.len() - differing.len(),
    );
    println!(
        "headers the relay adds to Debezium's: {}",
        extras.into_iter().collect::<Vec<_>>().join(", ")
    );
    println!(
        "Debezium's connector headers the relay does not write: {}",
        debezium_only.into_iter().collect::<Vec<_>>().join(", ")
    );
    if !diffs.is_empty() {
        for d in diffs.iter().take(30) {
            println!("DIFF {d}");
        }
        if diffs.len() > 30 {
            println!("DIFF … and {} more", diffs.len() - 30);
        }
        bail!("debezium-compat: {} differences", diffs.len());
    }
    anyhow::ensure!(
        ids.len() as u64 == rows,
        "{} ids for {rows} rows",
        ids.len()
    );
    println!("debezium-compat: OK, every record identical");
    Ok(())
}

/// Waits until the topics hold `target` records; `exited` names a
/// process that died.
async fn wait_total(
    total: &impl Fn() -> anyhow::Result<u64>,
    target: u64,
    timeout: Duration,
    mut exited: impl FnMut() -> anyhow::Result<Option<String>>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        if let Some(why) = exited()? {
            bail!("{why}");
        }
        let n = total().unwrap_or(0);
        if n >= target {
            return Ok(());
        }
        if started.elapsed() > timeout {
            bail!("{n} of {target} records after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
