//! `--kafka-transactions` on librdkafka's mock cluster (Tansu 0.6.0 has no
//! EndTxn): records are produced inside a Kafka transaction and the slot is
//! confirmed only after its commit, not after the records' acks.
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
