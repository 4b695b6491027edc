//! Exactly-once across restarts: a relay that replays transactions already
//! in Kafka skips them, per partition, even when the partition's last batch
//! holds several records.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::common::{
    event_id, insert_batch, lsn_seq, outbox_ids, read_until_all, relay_config, start,
};
use devstack::testing::{create_topic, kafka_bootstrap, TestDb};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

/// Two slots at the same position: `ahead` will stream and confirm,
/// `behind` stays where both began and replays everything later.
async fn slots_behind_and_ahead(
    db: &TestDb,
    c: &tokio_postgres::Client,
) -> anyhow::Result<(String, String)> {
    let behind = db.slot_name();
    let ahead = format!("{behind}_ahead");
    c.execute(
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
        &[&behind],
    )
    .await?;
    c.execute(
        "SELECT pg_copy_logical_replication_slot($1, $2)",
        &[&behind, &ahead],
    )
    .await?;
    Ok((behind, ahead))
}

#[tokio::test]
async fn a_replay_of_what_kafka_holds_produces_nothing_twice() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    // One partition: its last batch is a multi-record transaction.
    let topic = create_topic(1).await?;
    let c = db.connect().await?;
    let (behind, ahead) = slots_behind_and_ahead(&db, &c).await?;
    insert_batch(&c, 10, 6).await?;
    insert_batch(&c, 20, 4).await?;

    let first = start(relay_config(
        &db.url,
        &ahead,
        &topic,
        &kafka_bootstrap(),
        &[],
    ))
    .await;
    let expected = outbox_ids(&c).await?;
    read_until_all(
        &kafka_bootstrap(),
        &topic,
        &expected,
        Duration::from_secs(30),
    )
    .await?;
    first.stop().await?;

    // The slot behind replays both transactions; new ones must still flow.
    let second = start(relay_config(
        &db.url,
        &behind,
        &topic,
        &kafka_bootstrap(),
        &[],
    ))
    .await;
    insert_batch(&c, 30, 3).await?;
    let expected = outbox_ids(&c).await?;
    let records = read_until_all(
        &kafka_bootstrap(),
        &topic,
        &expected,
        Duration::from_secs(30),
    )
    .await?;
    let ids: Vec<i64> = records.iter().map(event_id).collect();
    assert_eq!(ids.len(), 13, "no record twice: {ids:?}");
    assert_eq!(ids.iter().copied().collect::<BTreeSet<_>>(), expected);
    let positions: Vec<_> = records.iter().map(lsn_seq).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
    assert_eq!(
        second.shared.metrics.duplicates_skipped.get(),
        10,
        "the replayed records were skipped, not lost"
    );
    second.stop().await
}

#[tokio::test]
async fn at_least_once_mode_replays_without_checking() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let topic = create_topic(1).await?;
    let c = db.connect().await?;
    let (behind, ahead) = slots_behind_and_ahead(&db, &c).await?;
    insert_batch(&c, 10, 5).await?;
    let first = start(relay_config(
        &db.url,
        &ahead,
        &topic,
        &kafka_bootstrap(),
        &[],
    ))
    .await;
    let expected = outbox_ids(&c).await?;
    read_until_all(
        &kafka_bootstrap(),
        &topic,
        &expected,
        Duration::from_secs(30),
    )
    .await?;
    first.stop().await?;
    let extra = ["--delivery", "at-least-once"];
    let second = start(relay_config(
        &db.url,
        &behind,
        &topic,
        &kafka_bootstrap(),
        &extra,
    ))
    .await;
    let reader = devstack::kafka::TopicReader::new(&kafka_bootstrap(), &topic, true)?;
    let records = reader
        .read_at_least(10, Duration::from_secs(30), Duration::from_secs(1))
        .await?;
    assert_eq!(records.len(), 10, "each of the 5 records twice");
    second.stop().await
}

#[tokio::test]
async fn a_topic_shared_with_another_writer_is_refused_clearly() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let topic = create_topic(1).await?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .create()?;
    producer
        .send(
            FutureRecord::<str, str>::to(&topic).payload("{\"not\":\"the relay\"}"),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)?;
    let cfg = relay_config(&db.url, &db.slot_name(), &topic, &kafka_bootstrap(), &[]);
    let shared = relay::http::Shared::new(&cfg.slot, &cfg.publication);
    let stop = tokio_util::sync::CancellationToken::new();
    let result = tokio::time::timeout(
        Duration::from_secs(60),
        relay::pipeline::run_with(cfg, stop, shared),
    )
    .await?;
    let err = result.expect_err("a definite error");
    let chain = relay::pipeline::error_chain(&err);
    assert!(
        chain.contains("another writer") && chain.contains("--delivery at-least-once"),
        "{chain}"
    );
    Ok(())
}

/// Reads `topic` from the start until every id of `expected` came; returns
/// the relay's records (another writer's are passed over).
async fn relay_records(
    topic: &str,
    expected: &BTreeSet<i64>,
) -> anyhow::Result<Vec<devstack::kafka::Record>> {
    let reader = devstack::kafka::TopicReader::new(&kafka_bootstrap(), topic, true)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (mut records, mut seen) = (Vec::new(), BTreeSet::new());
    loop {
        let done = expected.is_subset(&seen);
        anyhow::ensure!(
            done || tokio::time::Instant::now() < deadline,
            "missing: {:?}",
            expected.difference(&seen).collect::<Vec<_>>()
        );
        // Once all came, whatever else is there within a quiet second.
        let wait = Duration::from_millis(if done { 1000 } else { 500 });
        match reader.next(wait).await? {
            Some(r) if r.header(outbox_record::header::LSN).is_some() => {
                seen.insert(event_id(&r));
                records.push(r);
            }
            Some(_) => {}
            None if done => return Ok(records),
            None => {}
        }
    }
}

/// Produces `n` records without the relay's headers (the JDBC source
/// connector's, Debezium's) to each of `partitions` partitions of `topic`.
async fn foreign_records(topic: &str, partitions: i32, n: usize) -> anyhow::Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .create()?;
    for p in 0..partitions {
        for i in 0..n {
            producer
                .send(
                    FutureRecord::<str, str>::to(topic)
                        .partition(p)
                        .payload(&format!("{{\"id\":{i},\"not\":\"the relay\"}}")),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(e, _)| e)?;
        }
    }
    Ok(())
}

#[tokio::test]
async fn foreign_records_skip_takes_over_a_topic_another_writer_wrote() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let topic = create_topic(3).await?;
    let c = db.connect().await?;
    // The other writer's history: every partition ends in its records.
    foreign_records(&topic, 3, 5).await?;
    let (behind, ahead) = slots_behind_and_ahead(&db, &c).await?;
    // Keys 10..=11 only: one partition of three may get no relay record.
    insert_batch(&c, 10, 12).await?;
    let skip = ["--foreign-records", "skip"];
    let first = start(relay_config(
        &db.url,
        &ahead,
        &topic,
        &kafka_bootstrap(),
        &skip,
    ))
    .await;
    let expected = outbox_ids(&c).await?;
    relay_records(&topic, &expected).await?;
    first.stop().await?;
    // The other writer again, after the relay's records: the tails are
    // foreign once more.
    foreign_records(&topic, 3, 5).await?;

    // The slot behind replays all 12: each is found behind the foreign
    // tail and skipped; new rows go once.
    let second = start(relay_config(
        &db.url,
        &behind,
        &topic,
        &kafka_bootstrap(),
        &skip,
    ))
    .await;
    insert_batch(&c, 40, 4).await?;
    let expected = outbox_ids(&c).await?;
    let records = relay_records(&topic, &expected).await?;
    let ids: Vec<i64> = records.iter().map(event_id).collect();
    assert_eq!(ids.len(), 16, "no record twice: {ids:?}");
    assert_eq!(ids.iter().copied().collect::<BTreeSet<_>>(), expected);
    assert_eq!(second.shared.metrics.duplicates_skipped.get(), 12);
    second.stop().await?;

    // Without the option a topic ending in another writer's records is
    // refused, naming the way out.
    foreign_records(&topic, 3, 1).await?;
    let cfg = relay_config(&db.url, &behind, &topic, &kafka_bootstrap(), &[]);
    let shared = relay::http::Shared::new(&cfg.slot, &cfg.publication);
    let result = tokio::time::timeout(
        Duration::from_secs(60),
        relay::pipeline::run_with(cfg, tokio_util::sync::CancellationToken::new(), shared),
    )
    .await?;
    let chain = relay::pipeline::error_chain(&result.expect_err("refused"));
    assert!(chain.contains("--foreign-records skip"), "{chain}");
    Ok(())
}
