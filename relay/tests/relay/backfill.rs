//! `--backfill` on Postgres and Apache Kafka: the rows written before the
//! slot existed reach the topic once, first, and the stream follows with
//! no gap and no overlap — while a writer keeps committing through the
//! slot's creation, and with the relay killed (`kill -9`) twice in the
//! middle of the backfill (and a relay without `--backfill` refused
//! meanwhile). Also: `after:ID`, a finished backfill left alone on
//! restart, a slot the backfill did not create refused, and a row Kafka
//! can never take (dead-lettered as in the stream).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::{
    assert_commit_order, commit_poisoned, event_id, http_get, insert_batch, outbox_ids,
    read_until_all, relay_args, relay_config, spawn_writer, start, topic_ids, RelayProcess,
};
use devstack::testing::{create_topic, kafka_bootstrap, wait_for, TestDb};
use relay::pipeline::BACKFILL_STATE_TABLE;

/// Inserts `n` rows in transactions of 5,000.
async fn insert_rows(c: &tokio_postgres::Client, n: i32) -> anyhow::Result<()> {
    for start in (0..n).step_by(5_000) {
        insert_batch(c, i64::from(start % 97), (n - start).min(5_000)).await?;
    }
    Ok(())
}

/// The backfill's progress on `/status`: (delivered, rows, finished,
/// found in Kafka from an earlier attempt).
async fn progress(p: &RelayProcess) -> Option<(u64, u64, bool, u64)> {
    let body = http_get(p.addr, "/status").await.ok()?;
    let status: serde_json::Value = serde_json::from_str(&body).ok()?;
    let b = status.get("backfill")?;
    Some((
        b["delivered"].as_u64()?,
        b["rows"].as_u64()?,
        b["finished"].as_bool()?,
        b["found_in_kafka"].as_u64()?,
    ))
}

/// Starts the relay binary and kills it (SIGKILL) once the backfill is
/// under way but not finished.
async fn kill_during_backfill(args: &[String]) -> anyhow::Result<()> {
    let p = RelayProcess::spawn_only(args)?;
    let (delivered, rows) = wait_for(
        "the backfill to be under way",
        Duration::from_secs(60),
        || async {
            Ok(match progress(&p).await {
                // Past what an earlier attempt left: this one produces.
                Some((d, r, false, found)) if d >= found + 500 => Some((d, r)),
                Some((_, _, true, _)) => anyhow::bail!("the backfill finished before the kill"),
                _ => None,
            })
        },
    )
    .await?;
    eprintln!("kill -9 with {delivered} of {rows} rows delivered");
    p.kill_9().await
}

#[tokio::test]
async fn a_backfill_killed_twice_delivers_every_row_once_then_streams() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let topic = create_topic(3).await?;
    let c = db.connect().await?;
    insert_rows(&c, 200_000).await?;
    // A writer commits before, during and after each slot's creation.
    let stop_writer = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(db.url.clone(), stop_writer.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;

    let args = relay_args(
        &db.url,
        &db.slot_name(),
        &topic,
        &kafka_bootstrap(),
        &["--backfill", "all"],
    );
    kill_during_backfill(&args).await?;
    kill_during_backfill(&args).await?;
    // A relay without --backfill does not take the slot meanwhile: it
    // would stream later events before the backfilled ones.
    let cfg = relay_config(&db.url, &db.slot_name(), &topic, &kafka_bootstrap(), &[]);
    let shared = relay::http::Shared::new(&cfg.slot, &cfg.publication);
    let refused = relay::pipeline::run_with(cfg, Default::default(), shared)
        .await
        .expect_err("an unfinished backfill")
        .to_string();
    assert!(
        refused.contains("has not finished") && refused.contains("start with --backfill"),
        "{refused}"
    );
    let mut last = RelayProcess::spawn_only(&args)?;
    last.wait_state("streaming").await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_writer.store(true, Ordering::Relaxed);
    let statements = writer.await??;
    assert!(
        statements > 50,
        "the writer committed only {statements} statements"
    );

    let ids = outbox_ids(&c).await?;
    let records =
        read_until_all(&kafka_bootstrap(), &topic, &ids, Duration::from_secs(120)).await?;
    let mut count: BTreeMap<i64, usize> = BTreeMap::new();
    for r in &records {
        *count.entry(event_id(r)).or_default() += 1;
    }
    let twice: Vec<_> = count.iter().filter(|(_, n)| **n > 1).take(10).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    assert_eq!(count.keys().copied().collect::<BTreeSet<_>>(), ids);
    assert_commit_order(&records);

    let (attempts, total, delivered, finished): (i32, i64, i64, bool) = {
        let row = c
            .query_one(
                &format!(
                    "SELECT attempts, rows_total, rows_delivered, finished_at IS NOT NULL \
                       FROM {BACKFILL_STATE_TABLE} WHERE slot = $1"
                ),
                &[&db.slot_name()],
            )
            .await?;
        (row.get(0), row.get(1), row.get(2), row.get(3))
    };
    assert_eq!(
        attempts, 3,
        "two interrupted attempts, then the one that finished"
    );
    assert!(finished);
    assert_eq!(total, delivered);
    assert!(total >= 200_000, "{total}");
    let (d, rows, done, _) = progress(&last).await.expect("backfill on /status");
    assert!(
        done && d == rows && rows == total as u64,
        "{d} {rows} {done}"
    );
    let metrics = http_get(last.addr, "/metrics").await?;
    assert!(
        metrics.contains(&format!("relay_backfill_rows {total}"))
            && metrics.contains(&format!("relay_backfill_rows_delivered {total}")),
        "{metrics}"
    );
    last.kill_9().await
}

#[tokio::test]
async fn a_backfill_after_an_id_delivers_only_later_rows_and_runs_once() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let topic = create_topic(2).await?;
    let c = db.connect().await?;
    insert_batch(&c, 1, 40).await?;
    let before: Vec<i64> = outbox_ids(&c).await?.into_iter().collect();
    let cut = before[24];

    let after = format!("after:{cut}");
    let cfg = || {
        relay_config(
            &db.url,
            &db.slot_name(),
            &topic,
            &kafka_bootstrap(),
            &["--backfill", &after],
        )
    };
    let relay = start(cfg()).await;
    insert_batch(&c, 50, 10).await?;
    let expected: BTreeSet<i64> = outbox_ids(&c)
        .await?
        .into_iter()
        .filter(|id| *id > cut)
        .collect();
    read_until_all(
        &kafka_bootstrap(),
        &topic,
        &expected,
        Duration::from_secs(30),
    )
    .await?;
    relay.stop().await?;

    // Again with the same option: the backfill is recorded as finished;
    // the relay streams from its slot and delivers nothing twice.
    let relay = start(cfg()).await;
    insert_batch(&c, 70, 5).await?;
    let expected: BTreeSet<i64> = outbox_ids(&c)
        .await?
        .into_iter()
        .filter(|id| *id > cut)
        .collect();
    let records = read_until_all(
        &kafka_bootstrap(),
        &topic,
        &expected,
        Duration::from_secs(30),
    )
    .await?;
    relay.stop().await?;
    let ids: Vec<i64> = records.iter().map(event_id).collect();
    assert_eq!(ids.len(), expected.len(), "each row once: {ids:?}");
    assert_eq!(ids.iter().copied().collect::<BTreeSet<_>>(), expected);
    assert_commit_order(&records);
    Ok(())
}

#[tokio::test]
async fn a_backfill_refuses_a_slot_it_did_not_create() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let topic = create_topic(1).await?;
    let c = db.connect().await?;
    c.execute(
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
        &[&db.slot_name()],
    )
    .await?;
    insert_batch(&c, 1, 3).await?;
    let cfg = relay_config(
        &db.url,
        &db.slot_name(),
        &topic,
        &kafka_bootstrap(),
        &["--backfill", "all"],
    );
    let shared = relay::http::Shared::new(&cfg.slot, &cfg.publication);
    let err = relay::pipeline::run_with(cfg, Default::default(), shared)
        .await
        .expect_err("a slot with no backfill");
    let text = err.to_string();
    assert!(
        text.contains("exists and no backfill was started with it") && text.contains("slot drop"),
        "{text}"
    );
    Ok(())
}

/// A row Kafka can never take (2 MB, over the producer's limit), written
/// before the slot with 100,000 rows after it: the backfill stops naming
/// it. Restarted with the event named in `--dead-letter-event-ids`, the
/// backfill produces the event's reference to the dead-letter topic
/// instead; killed (`kill -9`) in the middle and started again, it reads
/// the dead-letter topic back with the rest, so the reference is there
/// once, and every other row reaches the topic once, in order.
#[tokio::test]
async fn a_poison_row_stops_the_backfill_until_dead_lettered() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let topic = create_topic(1).await?;
    let c = db.connect().await?;
    let ((_, big, _), _) = commit_poisoned(&c).await?;
    insert_rows(&c, 100_000).await?;
    let args = |extra: &[&str]| {
        let mut args = vec!["--backfill", "all"];
        args.extend(extra);
        relay_args(&db.url, &db.slot_name(), &topic, &kafka_bootstrap(), &args)
    };

    let cfg = relay_config(
        &db.url,
        &db.slot_name(),
        &topic,
        &kafka_bootstrap(),
        &["--backfill", "all"],
    );
    let shared = relay::http::Shared::new(&cfg.slot, &cfg.publication);
    let stopped = tokio::time::timeout(
        Duration::from_secs(60),
        relay::pipeline::run_with(cfg, Default::default(), shared),
    )
    .await?;
    let chain = relay::pipeline::error_chain(&stopped.expect_err("a row Kafka cannot take"));
    for needle in [
        format!("event {big} ("),
        format!("--dead-letter-event-ids {big}"),
    ] {
        assert!(chain.contains(&needle), "no {needle:?} in: {chain}");
    }

    let big_id = big.to_string();
    let with_dlq = args(&["--dead-letter-event-ids", &big_id]);
    kill_during_backfill(&with_dlq).await?;
    let mut last = RelayProcess::spawn_only(&with_dlq)?;
    last.wait_state("streaming").await?;

    let ids: BTreeSet<i64> = outbox_ids(&c)
        .await?
        .into_iter()
        .filter(|id| *id != big)
        .collect();
    let records =
        read_until_all(&kafka_bootstrap(), &topic, &ids, Duration::from_secs(120)).await?;
    let got: Vec<i64> = records.iter().map(event_id).collect();
    assert_eq!(
        got,
        ids.iter().copied().collect::<Vec<_>>(),
        "each once, in order"
    );
    let dlq = format!("{topic}.relay-dlq");
    assert_eq!(topic_ids(&dlq, 1).await?, [big], "the reference, once");
    let (_, _, done, found) = progress(&last).await.expect("backfill on /status");
    assert!(
        done && found > 0,
        "finished, after an interrupted attempt: found {found}"
    );
    last.kill_9().await
}

/// Opted in (`--dead-letter-refused`): the refused row's event is
/// dead-lettered when the backfill resumes, without a stop, and every other
/// row reaches the topic once, in order.
#[tokio::test]
async fn opted_in_a_refused_backfill_row_is_dead_lettered_without_a_stop() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let topic = create_topic(1).await?;
    let c = db.connect().await?;
    let ((first, big, rest), _) = commit_poisoned(&c).await?;
    let relay = start(relay_config(
        &db.url,
        &db.slot_name(),
        &topic,
        &kafka_bootstrap(),
        &["--backfill", "all", "--dead-letter-refused"],
    ))
    .await;
    let all: Vec<i64> = std::iter::once(first).chain(rest).collect();
    assert_eq!(
        topic_ids(&topic, all.len()).await?,
        all,
        "each once, in order"
    );
    assert_eq!(topic_ids(&format!("{topic}.relay-dlq"), 1).await?, [big]);
    assert!(!relay.task.is_finished(), "the relay goes on");
    assert_eq!(relay.shared.metrics.dead_lettered.get(), 1);
    relay.stop().await
}
