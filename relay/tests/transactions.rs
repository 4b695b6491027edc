//! `--kafka-transactions` on librdkafka's mock cluster (Tansu 0.6.0 has no
//! EndTxn): records are produced inside a Kafka transaction and the slot is
//! confirmed only after its commit, not after the records' acks.
//!
//! An error at the Kafka commit is handled as librdkafka documents: an
//! abortable one aborts the transaction, a fatal one (fenced) replaces the
//! producer; both replay from the confirmed position.
//!
//! What the mock cannot show (librdkafka 2.12): its Fetch ignores the
//! isolation level (LastStableOffset = end offset), so read_committed
//! consumers see open transactions there; and a second InitProducerId with
//! the same transactional.id does not fence the first. Both need a real
//! Kafka cluster; see the README.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{
    current_wal_lsn, event_id, insert_batch, outbox_ids, relay_config, slot_confirmed, start,
};
use devstack::kafka::TopicReader;
use devstack::testing::{unique_name, wait_for, TestDb};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

async fn read_all(bootstrap: &str, topic: &str, committed: bool) -> anyhow::Result<Vec<i64>> {
    let reader = TopicReader::with_isolation(bootstrap, topic, true, committed)?;
    let mut ids = Vec::new();
    while let Some(r) = reader.next(Duration::from_millis(700)).await? {
        ids.push(event_id(&r));
    }
    Ok(ids)
}

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
