//! What an SRE relies on: lag gauges that move with an outage, heartbeats
//! that advance an idle slot, `/healthz` turning unhealthy when the slot
//! retains too much WAL, the commit→ack histogram, `relay slot`, and
//! starts that log nothing an operator would have to learn to ignore.

use std::time::Duration;

use crate::common::{
    current_wal_lsn, free_port, http_get, insert_event, read_until_all, relay_args, relay_config,
    slot_confirmed, start,
};
use devstack::cluster::PgCluster;
use devstack::kafka::TopicReader;
use devstack::testing::{create_topic, kafka_bootstrap, unique_name, wait_for, Captured, TestDb};
use rdkafka::mocking::MockCluster;

/// The value of an unlabelled metric in Prometheus text.
fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

async fn scrape(relay: &crate::common::Running) -> anyhow::Result<String> {
    let addr = relay.shared.http_addr().expect("http listening");
    http_get(addr, "/metrics").await
}

#[tokio::test]
async fn lag_gauges_rise_while_the_broker_is_down_and_return() -> anyhow::Result<()> {
    // A private cluster: lag in bytes is cluster-wide WAL, which other tests
    // would move on the shared one.
    let cluster = PgCluster::start().await?;
    let url = cluster.url("outbox");
    let mock = MockCluster::new(1)?;
    let topic = unique_name("lag");
    mock.create_topic(&topic, 1, 1)?;
    let relay = start(relay_config(
        &url,
        "outbox_relay",
        &topic,
        &mock.bootstrap_servers(),
        &["--heartbeat-interval", "200ms"],
    ))
    .await;
    let c = devstack::testing::connect(&url).await?;

    mock.broker_down(1)?;
    for u in 0..200 {
        insert_event(&c, u, "DuringOutage").await?;
    }
    let peak = wait_for("lag to show", Duration::from_secs(30), || async {
        let m = scrape(&relay).await?;
        let bytes = metric(&m, "relay_lag_bytes").unwrap_or(0.0);
        let seconds = metric(&m, "relay_lag_seconds").unwrap_or(0.0);
        Ok((bytes > 20_000.0 && seconds > 1.0).then_some((bytes, seconds)))
    })
    .await?;

    mock.broker_up(1)?;
    let end = current_wal_lsn(&c).await?;
    wait_for(
        "the slot to confirm everything",
        Duration::from_secs(30),
        || async {
            Ok(slot_confirmed(&c, "outbox_relay")
                .await?
                .filter(|l| *l >= end))
        },
    )
    .await?;
    let after = wait_for("lag to return to ~0", Duration::from_secs(30), || async {
        let m = scrape(&relay).await?;
        let bytes = metric(&m, "relay_lag_bytes").unwrap_or(f64::MAX);
        let seconds = metric(&m, "relay_lag_seconds").unwrap_or(f64::MAX);
        Ok((bytes < 8192.0 && seconds == 0.0).then_some((bytes, seconds)))
    })
    .await?;
    assert!(after.0 < peak.0 / 2.0, "peak {peak:?}, after {after:?}");
    let m = scrape(&relay).await?;
    assert!(
        metric(&m, "relay_commit_to_ack_seconds_count").unwrap_or(0.0) >= 200.0,
        "every acknowledged record is observed"
    );
    assert!(
        m.contains("relay_commit_to_ack_seconds_bucket{le=\"0.0005\"}"),
        "buckets start at 0.5 ms"
    );
    relay.stop().await
}

#[tokio::test]
async fn heartbeats_advance_an_idle_slot_and_reach_no_topic() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let topic = create_topic(1).await?;
    let interval = Duration::from_millis(500);
    let relay = start(relay_config(
        &db.url,
        &db.slot_name(),
        &topic,
        &kafka_bootstrap(),
        &["--heartbeat-interval", "500ms", "--status-interval", "10s"],
    ))
    .await;
    let c = db.connect().await?;
    // WAL only outside the publication: pgoutput sends the relay nothing for it.
    for _ in 0..20 {
        c.execute(
            "INSERT INTO orders (user_id, email, items, total_cents, currency) \
             VALUES (1, 'a@b.c', '[]', 0, 'EUR')",
            &[],
        )
        .await?;
    }
    let written = current_wal_lsn(&c).await?;
    // Two intervals, plus the ticker's phase and the confirmation delay.
    wait_for(
        "the slot to pass the unrelated WAL",
        interval * 2 + Duration::from_millis(300),
        || async {
            Ok(slot_confirmed(&c, &db.slot_name())
                .await?
                .filter(|l| *l >= written))
        },
    )
    .await?;
    // Postgres 15 also sends keepalives while it skips transactions outside
    // the publication, so the slot may pass that WAL before the first
    // heartbeat comes back; the heartbeats must come all the same.
    wait_for(
        "a heartbeat to come back through the slot",
        interval * 4,
        || async {
            let m = scrape(&relay).await?;
            Ok((metric(&m, "relay_heartbeats_total").unwrap_or(0.0) >= 1.0).then_some(()))
        },
    )
    .await?;
    let reader = TopicReader::new(&kafka_bootstrap(), &topic, true)?;
    assert!(
        reader.next(Duration::from_secs(2)).await?.is_none(),
        "heartbeats are never produced"
    );
    relay.stop().await
}

#[tokio::test]
async fn healthz_is_unhealthy_while_the_slot_retains_too_much_wal() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let topic = create_topic(1).await?;
    let relay = start(relay_config(
        &db.url,
        &db.slot_name(),
        &topic,
        &kafka_bootstrap(),
        &["--max-retained-wal", "1"],
    ))
    .await;
    let addr = relay.shared.http_addr().expect("http listening");
    let body = wait_for(
        "healthz to report the slot",
        Duration::from_secs(10),
        || async {
            let body = http_get(addr, "/healthz").await?;
            Ok(body.starts_with("unhealthy").then_some(body))
        },
    )
    .await?;
    assert!(body.contains("--max-retained-wal 1"), "{body}");
    let status: serde_json::Value = serde_json::from_str(&http_get(addr, "/status").await?)?;
    assert!(status["health_problem"]
        .as_str()
        .unwrap()
        .contains("retains"));
    // Unhealthy, not stopped: the slot is still there and still streamed.
    assert_eq!(status["state"], "streaming");
    relay.stop().await
}

async fn relay_cmd(args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_relay"))
        .args(args)
        .output()
        .await?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[tokio::test]
async fn slot_status_and_drop_commands() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let topic = create_topic(1).await?;
    let slot = db.slot_name();
    let relay = start(relay_config(
        &db.url,
        &slot,
        &topic,
        &kafka_bootstrap(),
        &[],
    ))
    .await;
    let url = db.url.as_str();
    // `relay --database-url URL slot <action> --slot NAME` (or DATABASE_URL).
    let cmd = |action: &[&'static str]| {
        let mut v = vec!["--database-url", url, "slot"];
        v.extend_from_slice(action);
        v.extend_from_slice(&["--slot", slot.as_str()]);
        v
    };

    let (ok, out, err) = relay_cmd(&cmd(&["status", "--json"])).await?;
    assert!(ok, "{err}");
    let info: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(info["slot"], slot);
    assert_eq!(info["plugin"], "pgoutput");
    assert_eq!(info["active"], true);
    assert!(info["retained_wal_bytes"].is_u64());

    let (ok, out, _) = relay_cmd(&cmd(&["status"])).await?;
    assert!(ok && out.contains("confirmed_flush_lsn:"), "{out}");

    // Active: refused even with --yes.
    let (ok, _, err) = relay_cmd(&cmd(&["drop", "--yes"])).await?;
    assert!(!ok && err.contains("is active"), "{err}");
    relay.stop().await?;

    // Without --yes: refused, the slot stays.
    let slot_exists = || async {
        let c = db.connect().await?;
        anyhow::Ok(
            c.query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await?
            .is_some(),
        )
    };
    // The walsender may take a moment to release the slot after the relay stops.
    wait_for(
        "the slot to be inactive",
        Duration::from_secs(10),
        || async {
            let (ok, out, _) = relay_cmd(&cmd(&["status", "--json"])).await?;
            let info: serde_json::Value = serde_json::from_str(&out)?;
            Ok((ok && info["active"] == false).then_some(()))
        },
    )
    .await?;
    let (ok, _, err) = relay_cmd(&cmd(&["drop"])).await?;
    assert!(!ok && err.contains("--yes"), "{err}");
    assert!(slot_exists().await?);

    let (ok, out, err) = relay_cmd(&cmd(&["drop", "--yes"])).await?;
    assert!(ok, "{err}");
    assert!(out.contains("dropped slot"), "{out}");
    assert!(!slot_exists().await?);

    let (ok, _, err) = relay_cmd(&cmd(&["status"])).await?;
    assert!(!ok && err.contains("does not exist"), "{err}");
    Ok(())
}

/// Starts of the relay binary on a topic that holds the earlier ones'
/// records (so each reads the partitions' ends, where librdkafka reports
/// end-of-partition as an error), each streaming ten events and stopped by
/// SIGTERM: nothing is logged at WARN or ERROR, and every event is in the
/// topic once. The first start's log is not judged: right after the test
/// stack starts, the broker may still be loading its coordinator state,
/// and librdkafka rightly warns while it retries.
#[tokio::test]
async fn clean_starts_log_no_warning_or_error() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let client = db.connect().await?;
    let topic = create_topic(3).await?;
    let bootstrap = kafka_bootstrap();
    let mut args = relay_args(&db.url, &db.slot_name(), &topic, &bootstrap, &[]);
    let listen = args.iter().position(|a| a == "--listen").expect("--listen") + 1;
    let mut ids = std::collections::BTreeSet::new();
    let mut logs = String::new();
    for round in 0..3 {
        let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        args[listen] = addr.to_string();
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_relay"));
        cmd.args(&args[1..])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        let mut relay = Captured::spawn(cmd)?;
        wait_for("the relay to stream", Duration::from_secs(60), || async {
            let body = http_get(addr, "/status").await.unwrap_or_default();
            Ok(body.contains(r#""state":"streaming""#).then_some(()))
        })
        .await?;
        for user in 0..10 {
            ids.insert(insert_event(&client, round * 100 + user, "OrderCreated").await?);
        }
        let records = read_until_all(&bootstrap, &topic, &ids, Duration::from_secs(60)).await?;
        assert_eq!(records.len(), ids.len(), "each event once");
        let (status, log) = relay.terminate(Duration::from_secs(30)).await?;
        assert!(status.success(), "{status}: {log}");
        if round > 0 {
            logs.push_str(&log);
        }
    }
    let noisy: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    assert!(noisy.is_empty(), "logged at WARN or ERROR: {noisy:#?}");
    assert!(
        logs.contains("read each partition's last position"),
        "{logs}"
    );
    Ok(())
}
