//! Inbox retention (`--inbox-retention`) on the test stack: rows go once
//! older than the retention, and only when the retention covers the topic's
//! `retention.ms` plus its `segment.ms`; a shorter one is refused at start.

use std::time::Duration;

use crate::common::*;
use devstack::testing::{create_topic, kafka_bootstrap, unique_name, wait_for, TestDb};
use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;

/// Sets `topic`'s `retention.ms` and `segment.ms` (AlterConfigs replaces
/// a topic's settings: both in one request).
async fn set_topic_retention(topic: &str, ms: &str, segment_ms: &str) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .create()?;
    let alter = AlterConfig::new(ResourceSpecifier::Topic(topic))
        .set("retention.ms", ms)
        .set("segment.ms", segment_ms);
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    for result in admin.alter_configs([&alter], &opts).await? {
        result.map_err(|(_, code)| anyhow::anyhow!("altering {topic}: {code:?}"))?;
    }
    Ok(())
}

async fn inbox_rows(db: &TestDb) -> anyhow::Result<i64> {
    Ok(db
        .connect()
        .await?
        .query_one("SELECT count(*) FROM notifier_inbox", &[])
        .await?
        .get(0))
}

#[tokio::test]
async fn inbox_rows_older_than_the_retention_are_deleted() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let topic = create_topic(1).await?;
    // The topic keeps a record at most 2 s past its segment's newest one,
    // and rolls a segment after 1 s: 3 s in all, the inbox retention below.
    set_topic_retention(&topic, "2000", "1000").await?;
    let smtp = FakeSmtp::start("250 ok", 0).await?;
    let relay = Relay::new(&topic)?;
    for id in 1..=5 {
        let payload = order_payload(id, &format!("c{id}@retention.test"), "CREATED");
        relay.send_event(id, id, "OrderCreated", &payload).await?;
    }
    let mut cfg = config(
        &db.url,
        &topic,
        &unique_name("g"),
        &Dest::Smtp(smtp.url.clone()),
    );
    cfg.inbox_retention = Duration::from_secs(3);
    cfg.inbox_retention_interval = Duration::from_millis(200);
    let n = Running::start(cfg);
    wait_for("every email accepted", Duration::from_secs(60), || async {
        Ok((smtp.accepted() >= 5).then_some(()))
    })
    .await?;
    // Younger than the retention: kept.
    assert_eq!(inbox_rows(&db).await?, 5);
    assert_eq!(n.metric("notifier_inbox_rows_deleted_total").await?, 0.0);
    wait_for("the old rows deleted", Duration::from_secs(30), || async {
        Ok((inbox_rows(&db).await? == 0).then_some(()))
    })
    .await?;
    assert_eq!(n.metric("notifier_inbox_rows_deleted_total").await?, 5.0);
    assert_eq!(smtp.accepted(), 5, "nothing sent twice");
    n.stop().await
}

#[tokio::test]
async fn an_inbox_retention_shorter_than_the_topics_is_refused() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    // The broker's defaults: retention.ms and segment.ms 7 days each, so a
    // record can stay 14 days; 8 days covers retention.ms alone (what
    // earlier versions checked) and is refused.
    let topic = create_topic(1).await?;
    let mut cfg = config(
        &db.url,
        &topic,
        &unique_name("g"),
        &Dest::Dir(std::env::temp_dir()),
    );
    cfg.inbox_retention = Duration::from_secs(8 * 86_400);
    let err = tokio::time::timeout(
        Duration::from_secs(60),
        notifier::run_with(
            cfg,
            tokio_util::sync::CancellationToken::new(),
            notifier::http::Shared::new(),
        ),
    )
    .await?
    .expect_err("refused");
    let chain = notifier::handler::error_chain(&err);
    assert!(
        chain.contains(&format!(
            "is shorter than topic {topic} may keep a record: its retention.ms (604800000 ms) \
             plus its segment.ms (604800000 ms)"
        )) && chain.contains("at least 1209600000 ms"),
        "{chain}"
    );
    Ok(())
}
