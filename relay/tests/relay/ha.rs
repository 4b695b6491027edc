//! High availability: a standby relay on the same slot takes over within
//! seconds when the active one dies; and the lease makes a relay cut off from
//! Postgres stop producing before anyone could take its slot.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{
    assert_commit_order, event_id, http_get, insert_event, outbox_ids, read_until_all, relay_args,
    relay_config, spawn_writer, start, RelayProcess,
};
use devstack::proxy::Proxy;
use devstack::testing::{create_topic, kafka_bootstrap, url_for_database, wait_for, TestDb};

#[tokio::test]
async fn a_standby_takes_over_within_seconds_when_the_active_relay_dies() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let topic = create_topic(3).await?;
    let args = relay_args(
        &db.url,
        &db.slot_name(),
        &topic,
        &kafka_bootstrap(),
        &["--standby-poll-interval", "250ms"],
    );
    let active = RelayProcess::spawn(&args).await?;
    let mut standby = RelayProcess::spawn_only(&args)?;
    standby.wait_state("standby").await?;
    let status = |addr| async move {
        let body = http_get(addr, "/status").await?;
        anyhow::Ok(serde_json::from_str::<serde_json::Value>(&body)?)
    };
    assert_eq!(status(active.addr).await?["role"], "active");
    assert_eq!(status(standby.addr).await?["role"], "standby");
    // The role in /metrics; a standby has no lag of its own.
    let metric = |addr, line: &'static str| async move {
        let body = http_get(addr, "/metrics").await?;
        anyhow::Ok(body.lines().any(|l| l == line))
    };
    assert!(metric(active.addr, r#"relay_role{role="active"} 1"#).await?);
    assert!(metric(active.addr, r#"relay_role{role="standby"} 0"#).await?);
    assert!(metric(standby.addr, r#"relay_role{role="standby"} 1"#).await?);
    assert!(metric(standby.addr, r#"relay_role{role="active"} 0"#).await?);
    assert!(metric(standby.addr, "relay_connected 0").await?);
    // After at least one lag sample of the standby (--lag-sample-interval).
    wait_for(
        "the standby's lag sample",
        Duration::from_secs(10),
        || async {
            let body = http_get(standby.addr, "/status").await?;
            let s: serde_json::Value = serde_json::from_str(&body)?;
            Ok((s["retained_wal_bytes"].as_u64().unwrap_or(0) > 0).then_some(()))
        },
    )
    .await?;
    assert!(metric(standby.addr, "relay_lag_bytes 0").await?);

    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(db.url.clone(), stop.clone());
    let reader = devstack::kafka::TopicReader::new(&kafka_bootstrap(), &topic, true)?;
    reader
        .read_at_least(200, Duration::from_secs(30), Duration::ZERO)
        .await?;
    active.kill_9().await?;
    let died = Instant::now();
    standby.wait_state("streaming").await?;
    let took = died.elapsed();
    assert!(took < Duration::from_secs(10), "takeover took {took:?}");
    assert_eq!(status(standby.addr).await?["role"], "active");
    assert!(metric(standby.addr, r#"relay_role{role="active"} 1"#).await?);
    assert!(metric(standby.addr, r#"relay_role{role="standby"} 0"#).await?);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await??;

    let c = db.connect().await?;
    let expected = outbox_ids(&c).await?;
    let records = read_until_all(
        &kafka_bootstrap(),
        &topic,
        &expected,
        Duration::from_secs(60),
    )
    .await?;
    let produced: BTreeSet<i64> = records.iter().map(event_id).collect();
    assert_eq!(produced, expected, "nothing lost across the takeover");
    assert_eq!(records.len(), expected.len(), "nothing twice");
    assert_commit_order(&records);
    println!("takeover after kill -9: {took:?}");
    standby.kill_9().await
}

#[tokio::test]
async fn the_lease_stops_a_relay_cut_off_from_postgres() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let topic = create_topic(1).await?;
    let pg: std::net::SocketAddr = {
        let cfg: tokio_postgres::Config = db.url.parse()?;
        let port = cfg.get_ports().first().copied().unwrap_or(5432);
        format!("127.0.0.1:{port}").parse()?
    };
    let proxy = Proxy::start(pg).await?;
    let proxied = url_for_database(
        &db.url.replacen(
            &format!("127.0.0.1:{}", pg.port()),
            &proxy.addr.to_string(),
            1,
        ),
        &db.name,
    );
    let relay = start(relay_config(
        &proxied,
        &db.slot_name(),
        &topic,
        &kafka_bootstrap(),
        &["--lease", "2s", "--heartbeat-interval", "300ms"],
    ))
    .await;
    let c = db.connect().await?;
    insert_event(&c, 1, "BeforePartition").await?;

    proxy.freeze();
    let frozen_at = Instant::now();
    let error = wait_for("the lease to expire", Duration::from_secs(15), || async {
        Ok(relay
            .shared
            .snapshot()
            .last_error
            .filter(|e| e.contains("--lease")))
    })
    .await?;
    let after = frozen_at.elapsed();
    // The lease runs from the last message received, which can precede the
    // freeze by up to one heartbeat interval (300 ms).
    assert!(
        after >= Duration::from_millis(1700),
        "not before the lease ({after:?})"
    );
    assert!(error.contains("stopped producing"), "{error}");
    assert_eq!(relay.shared.metrics.connected.get(), 0);

    // Events written during the partition arrive once it heals.
    insert_event(&c, 2, "DuringPartition").await?;
    proxy.heal();
    let expected = outbox_ids(&c).await?;
    let records = read_until_all(
        &kafka_bootstrap(),
        &topic,
        &expected,
        Duration::from_secs(60),
    )
    .await?;
    assert_eq!(records.len(), 2, "each event once");
    relay.stop().await
}
