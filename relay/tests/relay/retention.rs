//! Retention (`--retention`): delivered outbox rows older than the
//! retention are deleted; a row not yet delivered never is, however old —
//! shown with Kafka down (librdkafka's mock cluster) while the relay keeps
//! running and reading the WAL; and a table without `created_at` is refused.

use std::time::{Duration, Instant};

use crate::common::{insert_event, outbox_ids, read_until_all, relay_config, start, Running};
use devstack::testing::{wait_for, TestDb};
use rdkafka::mocking::MockCluster;

/// Rows left in the outbox table.
async fn rows(c: &tokio_postgres::Client) -> anyhow::Result<i64> {
    Ok(c.query_one("SELECT count(*) FROM outbox", &[])
        .await?
        .get(0))
}

/// Runs `check` every 100 ms for `duration`: what it asserts holds
/// throughout, round after round of retention.
async fn throughout<F, Fut>(duration: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let began = Instant::now();
    while began.elapsed() < duration {
        check().await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// A mock cluster with a topic of `partitions`, a test database and a
/// relay between them with a retention of 1 s, looked at every 200 ms.
struct Setup {
    mock: MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    topic: String,
    bootstrap: String,
    db: TestDb,
    relay: Running,
}

async fn setup(partitions: i32) -> anyhow::Result<Setup> {
    let mock = MockCluster::new(1)?;
    let topic = devstack::testing::unique_name("retention");
    mock.create_topic(&topic, partitions, 1)?;
    let bootstrap = mock.bootstrap_servers();
    let db = TestDb::create().await?;
    let relay = start(relay_config(
        &db.url,
        &db.slot_name(),
        &topic,
        &bootstrap,
        &["--retention", "1s", "--retention-interval", "200ms"],
    ))
    .await;
    Ok(Setup {
        mock,
        topic,
        bootstrap,
        db,
        relay,
    })
}

#[tokio::test]
async fn delivered_rows_are_deleted_and_undelivered_ones_never() -> anyhow::Result<()> {
    let Setup {
        mock,
        topic,
        bootstrap,
        db,
        relay,
    } = setup(2).await?;
    let metrics = &relay.shared.metrics;
    assert_eq!(metrics.retention_seconds.get(), 1.0);
    let c = db.connect().await?;

    // Delivered, then deleted once older than a second.
    for u in 0..10 {
        insert_event(&c, u, "Before").await?;
    }
    let delivered = outbox_ids(&c).await?;
    let records = read_until_all(&bootstrap, &topic, &delivered, Duration::from_secs(30)).await?;
    assert_eq!(records.len(), 10);
    wait_for(
        "the delivered rows deleted",
        Duration::from_secs(30),
        || async { Ok((rows(&c).await? == 0).then_some(())) },
    )
    .await?;
    assert_eq!(metrics.outbox_rows_deleted.get(), 10);

    // Kafka down: new rows are read from the WAL but not delivered, so
    // they stay, however much older than the retention they get.
    mock.broker_down(1)?;
    let mut during = Vec::new();
    for u in 0..20 {
        during.push(insert_event(&c, u, "During").await?);
    }
    throughout(Duration::from_secs(4), || async {
        assert_eq!(rows(&c).await?, 20, "an undelivered row was deleted");
        Ok(())
    })
    .await?;
    assert_eq!(metrics.outbox_rows_deleted.get(), 10);
    // The oldest row's age shows them waiting past the retention.
    assert!(
        metrics.outbox_oldest_row_age_seconds.get() > 2.0,
        "oldest row age {}",
        metrics.outbox_oldest_row_age_seconds.get()
    );

    // Kafka back: delivered, then deleted.
    mock.broker_up(1)?;
    let ids: std::collections::BTreeSet<i64> = during.iter().copied().collect();
    let records = read_until_all(&bootstrap, &topic, &ids, Duration::from_secs(60)).await?;
    // The topic's every record: the ten before and the twenty after.
    assert_eq!(records.len(), 30, "each once");
    wait_for(
        "the rows delivered after the outage deleted",
        Duration::from_secs(30),
        || async { Ok((rows(&c).await? == 0).then_some(())) },
    )
    .await?;
    assert_eq!(metrics.outbox_rows_deleted.get(), 30);
    relay.stop().await
}

/// Rows commit out of id order: a row whose transaction stays open holds
/// back the deletion of every row committed after it began (its id is
/// lower, its commit later: the case that makes id-based polling skip
/// rows), and once it commits it waits for its own delivery.
#[tokio::test]
async fn a_transaction_left_open_holds_deletion_until_it_is_delivered() -> anyhow::Result<()> {
    let Setup {
        mock,
        topic,
        bootstrap,
        db,
        relay,
    } = setup(1).await?;
    let c = db.connect().await?;
    let mut slow = db.connect().await?;
    let tx = slow.transaction().await?;
    let late: i64 = tx
        .query_one(
            "INSERT INTO outbox (aggregate_type, aggregate_id, user_id, event_type, payload) \
             VALUES ('order', '1', 1, 'Late', '{}'::jsonb) RETURNING id",
            &[],
        )
        .await?
        .get(0);
    let mut others = std::collections::BTreeSet::new();
    for u in 2..12 {
        others.insert(insert_event(&c, u, "OnTime").await?);
    }
    read_until_all(&bootstrap, &topic, &others, Duration::from_secs(30)).await?;
    // Delivered and older than the retention, yet kept behind the open
    // transaction.
    throughout(Duration::from_secs(3), || async {
        assert_eq!(rows(&c).await?, 10, "deleted behind an open transaction");
        Ok(())
    })
    .await?;
    // Kafka down, then it commits: older than the retention, not delivered.
    mock.broker_down(1)?;
    tx.commit().await?;
    throughout(Duration::from_secs(3), || async {
        let ids: Vec<i64> = c
            .query("SELECT id FROM outbox WHERE id = $1", &[&late])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(ids, [late], "the late row was deleted before delivery");
        Ok(())
    })
    .await?;
    mock.broker_up(1)?;
    let all: std::collections::BTreeSet<i64> = others.iter().copied().chain([late]).collect();
    let records = read_until_all(&bootstrap, &topic, &all, Duration::from_secs(60)).await?;
    assert_eq!(records.len(), 11, "each once");
    wait_for("every row deleted", Duration::from_secs(30), || async {
        Ok((rows(&c).await? == 0).then_some(()))
    })
    .await?;
    assert_eq!(relay.shared.metrics.outbox_rows_deleted.get(), 11);
    relay.stop().await
}

#[tokio::test]
async fn retention_on_a_table_without_created_at_is_refused() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let c = db.connect().await?;
    c.execute("ALTER TABLE outbox DROP COLUMN created_at", &[])
        .await?;
    let cfg = relay_config(
        &db.url,
        &db.slot_name(),
        "unused",
        "127.0.0.1:9",
        &["--retention", "1h"],
    );
    let shared = relay::http::Shared::new(&cfg.slot, &cfg.publication);
    let run = relay::pipeline::run_with(cfg, tokio_util::sync::CancellationToken::new(), shared);
    let err = tokio::time::timeout(Duration::from_secs(60), run)
        .await?
        .expect_err("refused");
    let chain = relay::pipeline::error_chain(&err);
    assert!(
        chain.contains("--retention needs a created_at timestamp column"),
        "{chain}"
    );
    Ok(())
}
