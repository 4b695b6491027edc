//! The relay under failure: `kill -9` of the relay binary, a Postgres crash
//! and restart, and broker faults injected with librdkafka's mock cluster.
//! Each test checks what an operator would: every row of the outbox table is
//! in the topic, and the slot never confirmed past what Kafka acknowledged.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::{
    assert_commit_order, commit_poisoned, current_wal_lsn, event_id, http_get, insert_batch,
    insert_event, outbox_ids, read_until_all, relay_args, relay_config, slot_confirmed,
    spawn_writer, start, topic_ids, RelayProcess,
};
use devstack::cluster::PgCluster;
use devstack::testing::{create_topic, kafka_bootstrap, wait_for, TestDb};
use outbox_record::header;
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

#[tokio::test]
async fn kill_9_mid_stream_then_restart_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let topic = create_topic(3).await?;
    let args = relay_args(&db.url, &db.slot_name(), &topic, &kafka_bootstrap(), &[]);
    let relay = RelayProcess::spawn(&args).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(db.url.clone(), stop.clone());
    // Kill only once records are flowing, so the kill lands mid-stream.
    let reader = devstack::kafka::TopicReader::new(&kafka_bootstrap(), &topic, true)?;
    let flowing = reader
        .read_at_least(300, Duration::from_secs(30), Duration::ZERO)
        .await?;
    assert!(flowing.len() >= 300, "the relay produced before the kill");
    relay.kill_9().await?;

    // Events keep arriving while no relay runs; the new one may first find
    // the slot still held by the dead one's walsender and must retry.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let relay = RelayProcess::spawn(&args).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let statements = writer.await??;

    let client = db.connect().await?;
    let expected = outbox_ids(&client).await?;
    assert!(statements > 0 && expected.len() > 300);
    let records = read_until_all(
        &kafka_bootstrap(),
        &topic,
        &expected,
        Duration::from_secs(60),
    )
    .await?;
    let produced: BTreeSet<i64> = records.iter().map(event_id).collect();
    assert_eq!(produced, expected, "exactly the table's events, none lost");
    assert_eq!(records.len(), expected.len(), "none twice (exactly-once)");
    assert_commit_order(&records);
    relay.kill_9().await
}

#[tokio::test]
async fn postgres_crash_and_restart_mid_stream_loses_and_duplicates_nothing() -> anyhow::Result<()>
{
    let cluster = PgCluster::start().await?;
    let url = cluster.url("outbox");
    let topic = create_topic(3).await?;
    let relay = start(relay_config(
        &url,
        "outbox_relay",
        &topic,
        &kafka_bootstrap(),
        &[],
    ))
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(url.clone(), stop.clone());
    let reader = devstack::kafka::TopicReader::new(&kafka_bootstrap(), &topic, true)?;
    reader
        .read_at_least(200, Duration::from_secs(30), Duration::ZERO)
        .await?;

    cluster.crash()?;
    wait_for("the relay to notice", Duration::from_secs(10), || async {
        Ok((relay.shared.snapshot().state != relay::http::RelayState::Streaming).then_some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.start_again()?;
    wait_for(
        "the relay to reconnect",
        Duration::from_secs(30),
        || async {
            Ok((relay.shared.snapshot().state == relay::http::RelayState::Streaming).then_some(()))
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await??;

    let client = devstack::testing::connect(&url).await?;
    let expected = outbox_ids(&client).await?;
    let records = read_until_all(
        &kafka_bootstrap(),
        &topic,
        &expected,
        Duration::from_secs(60),
    )
    .await?;
    let produced: BTreeSet<i64> = records.iter().map(event_id).collect();
    assert_eq!(produced, expected, "exactly the table's events, none lost");
    assert_eq!(records.len(), expected.len(), "none twice (exactly-once)");
    assert_commit_order(&records);
    let end = current_wal_lsn(&client).await?;
    wait_for(
        "the slot to confirm the last commit",
        Duration::from_secs(30),
        || async {
            Ok(slot_confirmed(&client, "outbox_relay")
                .await?
                .filter(|l| *l >= end))
        },
    )
    .await?;
    relay.stop().await
}

/// A mock cluster with the topic already created, and a test database.
async fn mock_setup(
    partitions: i32,
) -> anyhow::Result<(
    MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    TestDb,
    String,
)> {
    let mock = MockCluster::new(1)?;
    let topic = devstack::testing::unique_name("mock");
    mock.create_topic(&topic, partitions, 1)?;
    let db = TestDb::create().await?;
    Ok((mock, db, topic))
}

#[tokio::test]
async fn produce_errors_are_retried_without_loss_or_duplicates() -> anyhow::Result<()> {
    let (mock, db, topic) = mock_setup(3).await?;
    let bootstrap = mock.bootstrap_servers();
    // One request in flight per connection: librdkafka 2.12's mock broker
    // checks idempotent sequence numbers only for transactional producers,
    // so with several requests in flight it appends a later request after an
    // injected failure of an earlier one (a real broker answers
    // OUT_OF_ORDER_SEQUENCE_NUMBER), and the producer then acknowledges
    // records the mock never stored (seen here: 2 of 100 missing, all
    // acknowledged). With one request in flight the mock's log is what a
    // real broker's would be.
    let relay = start(relay_config(
        &db.url,
        &db.slot_name(),
        &topic,
        &bootstrap,
        &[
            "--kafka-property",
            "max.in.flight.requests.per.connection=1",
        ],
    ))
    .await;
    // The next produce requests fail with retriable errors; the idempotent
    // producer retries them in order.
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS_AFTER_APPEND,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
        ],
    );
    let c = db.connect().await?;
    for i in 0..20 {
        insert_batch(&c, i * 10, 5).await?;
    }
    let end = current_wal_lsn(&c).await?;
    let expected = outbox_ids(&c).await?;
    let records = read_until_all(&bootstrap, &topic, &expected, Duration::from_secs(60))
        .await
        .map_err(|e| e.context(format!("relay status: {:?}", relay.shared.snapshot())))?;
    assert_eq!(records.len(), 100, "no duplicates from the retries");
    assert_commit_order(&records);
    wait_for("confirmation", Duration::from_secs(30), || async {
        Ok(slot_confirmed(&c, &db.slot_name())
            .await?
            .filter(|l| *l >= end))
    })
    .await?;
    relay.stop().await
}

#[tokio::test]
async fn broker_down_holds_confirmation_then_recovers() -> anyhow::Result<()> {
    let (mock, db, topic) = mock_setup(2).await?;
    let bootstrap = mock.bootstrap_servers();
    let relay = start(relay_config(
        &db.url,
        &db.slot_name(),
        &topic,
        &bootstrap,
        &[],
    ))
    .await;
    let c = db.connect().await?;
    for u in 0..10 {
        insert_event(&c, u, "Before").await?;
    }
    let before = current_wal_lsn(&c).await?;
    wait_for(
        "the first events confirmed",
        Duration::from_secs(30),
        || async {
            Ok(slot_confirmed(&c, &db.slot_name())
                .await?
                .filter(|l| *l >= before))
        },
    )
    .await?;

    mock.broker_down(1)?;
    let outage_start = current_wal_lsn(&c).await?;
    for u in 0..20 {
        insert_event(&c, u, "During").await?;
    }
    let end = current_wal_lsn(&c).await?;
    // The relay has read every outage commit; several status intervals and
    // keepalives pass while Kafka cannot acknowledge them.
    wait_for(
        "the relay to receive the outage's WAL",
        Duration::from_secs(30),
        || async { Ok((relay.shared.snapshot().received_lsn >= end).then_some(())) },
    )
    .await?;
    let waited = std::time::Instant::now();
    let checks = AtomicUsize::new(0);
    while waited.elapsed() < Duration::from_secs(3) {
        let confirmed = slot_confirmed(&c, &db.slot_name()).await?.expect("slot");
        assert!(
            confirmed <= outage_start,
            "confirmed {confirmed} past unacknowledged commits (outage began at {outage_start})"
        );
        assert!(relay.shared.snapshot().confirmed_lsn <= outage_start);
        checks.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(checks.load(Ordering::Relaxed) > 10);

    mock.broker_up(1)?;
    let expected = outbox_ids(&c).await?;
    let records = read_until_all(&bootstrap, &topic, &expected, Duration::from_secs(60)).await?;
    assert_eq!(records.len(), 30, "no duplicates after the outage");
    assert_commit_order(&records);
    wait_for(
        "confirmation after recovery",
        Duration::from_secs(30),
        || async {
            Ok(slot_confirmed(&c, &db.slot_name())
                .await?
                .filter(|l| *l >= end))
        },
    )
    .await?;
    relay.stop().await
}

/// `/healthz` once it reports a stall.
async fn wait_stalled(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    wait_for(
        "/healthz to report the stall",
        Duration::from_secs(30),
        || async {
            let body = http_get(addr, "/healthz").await?;
            Ok(body.contains("stalled").then_some(body))
        },
    )
    .await
}

#[tokio::test]
async fn a_stall_turns_healthz_unhealthy_restarts_the_session_and_clears() -> anyhow::Result<()> {
    let (mock, db, topic) = mock_setup(2).await?;
    let bootstrap = mock.bootstrap_servers();
    let relay = start(relay_config(
        &db.url,
        &db.slot_name(),
        &topic,
        &bootstrap,
        &["--stall-timeout", "2s"],
    ))
    .await;
    let addr = relay.shared.http_addr().expect("http listening");
    let c = db.connect().await?;
    for u in 0..5 {
        insert_event(&c, u, "Before").await?;
    }
    read_until_all(
        &bootstrap,
        &topic,
        &outbox_ids(&c).await?,
        Duration::from_secs(30),
    )
    .await?;
    assert_eq!(http_get(addr, "/healthz").await?, "ok\n");

    // Postgres keeps talking; Kafka acknowledges nothing.
    mock.broker_down(1)?;
    for u in 0..20 {
        insert_event(&c, u, "During").await?;
    }
    let health = wait_stalled(addr).await?;
    assert!(health.starts_with("unhealthy: stalled: "), "{health}");
    assert!(health.contains("--stall-timeout 2s"), "{health}");
    assert!(relay.shared.metrics.stalls.get() >= 1);
    let metrics = http_get(addr, "/metrics").await?;
    assert!(metrics.contains("relay_stalls_total "), "{metrics}");

    mock.broker_up(1)?;
    let expected = outbox_ids(&c).await?;
    let records = read_until_all(&bootstrap, &topic, &expected, Duration::from_secs(60)).await?;
    assert_eq!(
        records.len(),
        25,
        "each event once after the restarted session"
    );
    assert_commit_order(&records);
    wait_for(
        "/healthz healthy again",
        Duration::from_secs(30),
        || async { Ok((http_get(addr, "/healthz").await? == "ok\n").then_some(())) },
    )
    .await?;
    relay.stop().await
}

#[tokio::test]
async fn permanent_produce_error_stops_the_relay_without_confirming() -> anyhow::Result<()> {
    let (mock, db, topic) = mock_setup(1).await?;
    let bootstrap = mock.bootstrap_servers();
    let relay = start(relay_config(
        &db.url,
        &db.slot_name(),
        &topic,
        &bootstrap,
        &[],
    ))
    .await;
    let c = db.connect().await?;
    let before = current_wal_lsn(&c).await?;
    mock.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 50],
    );
    insert_event(&c, 1, "Denied").await?;
    let result = tokio::time::timeout(Duration::from_secs(30), relay.task).await??;
    let err = result.expect_err("the relay stops on a permanent produce error");
    assert!(
        relay::pipeline::error_chain(&err).contains("uthoriz"),
        "{}",
        relay::pipeline::error_chain(&err)
    );
    let confirmed = slot_confirmed(&c, &db.slot_name()).await?.expect("slot");
    assert!(
        confirmed <= before,
        "confirmed {confirmed} past the failed record"
    );
    Ok(())
}

/// The relay stops on the large event with a message naming its event id,
/// its size, the limits and the ways forward; the first event is in the
/// topic and none of the rest (nothing overtakes the refused record); the
/// slot is not confirmed past its commit. Then, restarted with the event named in
/// `--dead-letter-event-ids`, it produces a reference to the event into the
/// dead-letter topic and goes on: every other event once, in order.
/// `extra`: the relay's options.
async fn oversized_row_stops_the_relay_until_dead_lettered(extra: &[&str]) -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let topic = create_topic(1).await?;
    let bootstrap = kafka_bootstrap();
    let relay = start(relay_config(
        &db.url,
        &db.slot_name(),
        &topic,
        &bootstrap,
        extra,
    ))
    .await;
    let c = db.connect().await?;
    let ((first, big, rest), after_big) = commit_poisoned(&c).await?;

    let result = tokio::time::timeout(Duration::from_secs(60), relay.task).await??;
    let err = result.expect_err("the relay stops on a record Kafka cannot take");
    let chain = relay::pipeline::error_chain(&err);
    for needle in [
        format!("event {big} ("),
        "bytes, topic".to_owned(),
        // The broker's default, read from the topic's configuration.
        "of max.message.bytes 1048588)".to_owned(),
        "message.max.bytes (now".to_owned(),
        "every later event waits behind it".to_owned(),
        format!("--dead-letter-event-ids {big}"),
    ] {
        assert!(chain.contains(&needle), "no {needle:?} in: {chain}");
    }
    let size: usize = chain
        .split(&format!("event {big} ("))
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no size in: {chain}"));
    assert!(size > 2_000_000, "{size} bytes named in: {chain}");
    assert_eq!(topic_ids(&topic, 1).await?, [first]);
    let confirmed = slot_confirmed(&c, &db.slot_name()).await?.expect("slot");
    // Its commit record ends at `after_big` at the latest: confirming that
    // would skip it on restart.
    assert!(
        confirmed < after_big,
        "confirmed {confirmed}, past the refused record (committed before {after_big})"
    );

    // The operator's way forward: dead-letter exactly that event.
    let big_id = big.to_string();
    let mut with_dlq = extra.to_vec();
    with_dlq.extend(["--dead-letter-event-ids", &big_id]);
    let relay = start(relay_config(
        &db.url,
        &db.slot_name(),
        &topic,
        &bootstrap,
        &with_dlq,
    ))
    .await;
    let all: Vec<i64> = std::iter::once(first).chain(rest).collect();
    assert_eq!(
        topic_ids(&topic, all.len()).await?,
        all,
        "each once, in order"
    );
    let dlq = format!("{topic}.relay-dlq");
    let references = devstack::kafka::TopicReader::new(&bootstrap, &dlq, true)?
        .read_at_least(1, Duration::from_secs(60), Duration::from_secs(1))
        .await?;
    assert_eq!(references.len(), 1, "{references:?}");
    let reference: serde_json::Value =
        serde_json::from_str(references[0].value.as_deref().unwrap_or("null"))?;
    assert_eq!(reference["event_id"], big_id, "{reference}");
    assert_eq!(reference["original_topic"], topic.as_str(), "{reference}");
    assert!(
        reference["bytes"].as_u64().unwrap_or(0) > 2_000_000,
        "{reference}"
    );
    assert_eq!(
        references[0].header(header::EVENT_ID),
        Some(big_id.as_str())
    );
    assert!(references[0].header(header::dlq::REASON).is_some());
    assert_eq!(relay.shared.metrics.dead_lettered.get(), 1);
    relay.stop().await
}

/// Over the producer's own `message.max.bytes`: refused before sending.
#[tokio::test]
async fn a_row_over_the_producers_limit_stops_the_relay_until_dead_lettered() -> anyhow::Result<()>
{
    oversized_row_stops_the_relay_until_dead_lettered(&[]).await
}

/// Within the producer's limit, over the topic's `max.message.bytes`:
/// refused by the broker.
#[tokio::test]
async fn a_row_over_the_topics_limit_stops_the_relay_until_dead_lettered() -> anyhow::Result<()> {
    oversized_row_stops_the_relay_until_dead_lettered(&[
        "--kafka-property",
        "message.max.bytes=10000000",
    ])
    .await
}

/// Opted in (`--dead-letter-refused`): the refused event is dead-lettered
/// without a stop, and every other event flows, in order, once.
#[tokio::test]
async fn opted_in_a_refused_event_is_dead_lettered_without_a_stop() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let topic = create_topic(1).await?;
    let bootstrap = kafka_bootstrap();
    let relay = start(relay_config(
        &db.url,
        &db.slot_name(),
        &topic,
        &bootstrap,
        &["--dead-letter-refused"],
    ))
    .await;
    let c = db.connect().await?;
    let ((first, big, rest), _) = commit_poisoned(&c).await?;
    let all: Vec<i64> = std::iter::once(first).chain(rest).collect();
    assert_eq!(
        topic_ids(&topic, all.len()).await?,
        all,
        "each once, in order"
    );
    let references = topic_ids(&format!("{topic}.relay-dlq"), 1).await?;
    assert_eq!(references, [big]);
    assert!(!relay.task.is_finished(), "the relay goes on");
    assert_eq!(relay.shared.metrics.dead_lettered.get(), 1);
    relay.stop().await
}

/// A slot Postgres invalidated (`max_slot_wal_keep_size`, WAL removed while
/// the relay was away) stops the relay with a message naming the slot, its
/// last confirmed position and the way forward; it is not replaced.
#[tokio::test]
async fn an_invalidated_slot_stops_the_relay_naming_it() -> anyhow::Result<()> {
    let cluster = PgCluster::start().await?;
    let url = cluster.url("outbox");
    let topic = create_topic(1).await?;
    let cfg = || relay_config(&url, "outbox_relay", &topic, &kafka_bootstrap(), &[]);
    let relay = start(cfg()).await;
    let c = devstack::testing::connect(&url).await?;
    let first = insert_event(&c, 1, "OrderCreated").await?;
    assert_eq!(topic_ids(&topic, 1).await?, [first]);
    relay.stop().await?;

    // While the relay is away: an event, then more WAL than the slot may keep.
    insert_event(&c, 2, "OrderCreated").await?;
    c.batch_execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
        .await?;
    c.query("SELECT pg_reload_conf()", &[]).await?;
    c.batch_execute("CREATE TABLE filler (x text)").await?;
    wait_for(
        "Postgres to invalidate the slot",
        Duration::from_secs(60),
        || async {
            c.batch_execute(
                "INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 3000)",
            )
            .await?;
            c.query("SELECT pg_switch_wal()", &[]).await?;
            c.batch_execute("CHECKPOINT").await?;
            let status: Option<String> = c
                .query_one(
                    "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'outbox_relay'",
                    &[],
                )
                .await?
                .get(0);
            Ok((status.as_deref() == Some("lost")).then_some(()))
        },
    )
    .await?;
    let confirmed = slot_confirmed(&c, "outbox_relay")
        .await?
        .expect("the slot is kept");

    let shared = relay::http::Shared::new("outbox_relay", "outbox_pub");
    let run = relay::pipeline::run_with(cfg(), tokio_util::sync::CancellationToken::new(), shared);
    let err = tokio::time::timeout(Duration::from_secs(60), run)
        .await?
        .expect_err("the relay stops on a lost slot");
    let chain = relay::pipeline::error_chain(&err);
    for needle in [
        "\"outbox_relay\" was invalidated by Postgres".to_owned(),
        format!("confirmed position {confirmed}"),
        "relay slot drop --slot outbox_relay --yes".to_owned(),
    ] {
        assert!(chain.contains(&needle), "no {needle:?} in: {chain}");
    }
    // Not replaced: the invalidated slot is still there, and nothing new
    // reached the topic.
    let still: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'outbox_relay' \
             AND wal_status = 'lost'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(still, 1);
    assert_eq!(topic_ids(&topic, 1).await?, [first]);

    // The way forward the message names loses nothing: drop the slot, a new
    // one (relay started with --allow-new-slot, stopped), republish what
    // the topic lacks, start again.
    c.query("SELECT pg_drop_replication_slot('outbox_relay')", &[])
        .await?;
    let relay = start(relay_config(
        &url,
        "outbox_relay",
        &topic,
        &kafka_bootstrap(),
        &["--allow-new-slot"],
    ))
    .await;
    relay.stop().await?;
    let check = |republish| relay::verify::Range {
        from_id: None,
        to_id: None,
        since: None,
        until: None,
        time_column: "created_at".into(),
        wait: Duration::from_secs(5),
        republish,
    };
    let report = relay::verify::verify(&cfg(), &check(true)).await?;
    assert_eq!(report.missing.ids, [first + 1], "the event of the lost WAL");
    assert_eq!(report.republished.map(|r| r.produced), Some(1));
    let relay = start(cfg()).await;
    let third = insert_event(&c, 3, "OrderCreated").await?;
    assert_eq!(topic_ids(&topic, 3).await?, [first, first + 1, third]);
    relay.stop().await?;
    let report = relay::verify::verify(&cfg(), &check(false)).await?;
    assert!(report.ok, "{report}");
    Ok(())
}

/// A slot dropped while the topic holds its events (an operator's `relay
/// slot drop`, a restored or replaced Postgres): the relay does not quietly
/// make a new one, which would start at the current position and skip what
/// was committed meanwhile. It stops naming the slot, the topic and its
/// last position, creates nothing, and with `--allow-new-slot` goes on from
/// the new slot's position.
#[tokio::test]
async fn a_missing_slot_over_a_topic_with_events_is_not_replaced_unasked() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let topic = create_topic(1).await?;
    let bootstrap = kafka_bootstrap();
    let slot = db.slot_name();
    let cfg = |extra: &[&str]| relay_config(&db.url, &slot, &topic, &bootstrap, extra);
    let c = db.connect().await?;

    let relay = start(cfg(&[])).await;
    let first = insert_event(&c, 1, "OrderCreated").await?;
    assert_eq!(topic_ids(&topic, 1).await?, [first]);
    relay.stop().await?;
    wait_for("the slot dropped", Duration::from_secs(10), || async {
        // Refused while the stopped relay's walsender still holds it.
        Ok(c.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
            .ok()
            .map(|_| ()))
    })
    .await?;
    // Committed while there is no slot: no new slot can stream it.
    let skipped = insert_event(&c, 2, "OrderCreated").await?;

    let shared = relay::http::Shared::new(&slot, "outbox_pub");
    let run =
        relay::pipeline::run_with(cfg(&[]), tokio_util::sync::CancellationToken::new(), shared);
    let err = tokio::time::timeout(Duration::from_secs(60), run)
        .await?
        .expect_err("the relay stops instead of creating the slot");
    let chain = relay::pipeline::error_chain(&err);
    for needle in [
        format!("replication slot {slot:?} does not exist"),
        format!("topic {topic} already holds events"),
        "--allow-new-slot".to_owned(),
    ] {
        assert!(chain.contains(&needle), "no {needle:?} in: {chain}");
    }
    assert_eq!(slot_confirmed(&c, &slot).await?, None, "no slot created");

    // The operator's choice: a new slot, from now on.
    let relay = start(cfg(&["--allow-new-slot"])).await;
    let third = insert_event(&c, 3, "OrderCreated").await?;
    assert_eq!(
        topic_ids(&topic, 2).await?,
        [first, third],
        "the event committed without a slot ({skipped}) is skipped, as the message said"
    );
    relay.stop().await
}

#[tokio::test]
async fn a_backfill_that_kafka_stops_acknowledging_stalls_then_finishes_once() -> anyhow::Result<()>
{
    let (mock, db, topic) = mock_setup(2).await?;
    let bootstrap = mock.bootstrap_servers();
    let c = db.connect().await?;
    for first in (0..150_000).step_by(10_000) {
        insert_batch(&c, first, 10_000).await?;
    }
    let cfg = relay_config(
        &db.url,
        &db.slot_name(),
        &topic,
        &bootstrap,
        &["--backfill", "all", "--stall-timeout", "2s"],
    );
    let shared = relay::http::Shared::new(&cfg.slot, &cfg.publication);
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(relay::pipeline::run_with(cfg, stop.clone(), shared.clone()));
    wait_for(
        "the backfill to be under way",
        Duration::from_secs(60),
        || async {
            let b = shared.snapshot().backfill;
            anyhow::ensure!(!b.as_ref().is_some_and(|b| b.finished), "finished too soon");
            Ok(b.filter(|b| b.delivered >= 1_000).map(|_| ()))
        },
    )
    .await?;
    mock.broker_down(1)?;
    let addr = shared.http_addr().expect("http listening");
    let health = wait_stalled(addr).await?;
    assert!(health.contains("--stall-timeout 2s"), "{health}");
    assert!(shared.metrics.stalls.get() >= 1);

    mock.broker_up(1)?;
    let expected = outbox_ids(&c).await?;
    let records = read_until_all(&bootstrap, &topic, &expected, Duration::from_secs(120)).await?;
    assert_eq!(records.len(), expected.len(), "each row once");
    assert_commit_order(&records);
    wait_for("the relay to stream", Duration::from_secs(60), || async {
        Ok((shared.snapshot().state == relay::http::RelayState::Streaming).then_some(()))
    })
    .await?;
    assert!(shared
        .snapshot()
        .backfill
        .is_some_and(|b| b.finished && b.attempt >= 2));
    stop.cancel();
    task.await??;
    Ok(())
}
