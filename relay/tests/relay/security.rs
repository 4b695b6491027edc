//! The relay binary against the test broker's SASL_SSL listener (SCRAM-SHA-512
//! over TLS, ACLs enforced; see `devstack::testing::KafkaSasl`), logged in
//! as the relay's Kafka user with `--kafka-property` settings or a
//! `--kafka-properties-file` (no password in the process list), as a user
//! would run it: it works, it stops with a clear error and a non-zero exit
//! when Kafka refuses its password or an operation, or presents a
//! certificate its CA did not sign, it then confirms
//! nothing, and no secret reaches its logs, `/status` or `/metrics`.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::common::*;
use devstack::testing::{
    assert_no_secret, assert_no_secret_in_command_line, create_topic, kafka_bootstrap, Captured,
    KafkaSasl, TestDb,
};
use relay::lsn::Lsn;

/// How long a refused relay may take to give up.
const EXIT_WAIT: Duration = Duration::from_secs(60);

/// The relay binary with `args` (from [`relay_args`]) on a free HTTP port,
/// logging at debug level, so that every log line is checked for secrets.
fn spawn_relay(args: &[String]) -> anyhow::Result<(Captured, std::net::SocketAddr)> {
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let mut args = args[1..].to_vec();
    let listen = args.iter().position(|a| a == "--listen").expect("--listen") + 1;
    args[listen] = addr.to_string();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_relay"));
    cmd.args(&args).env("RUST_LOG", "debug");
    Ok((Captured::spawn(cmd)?, addr))
}

/// Waits until the relay's `/status` says it streams.
async fn wait_streaming(relay: &mut Captured, addr: std::net::SocketAddr) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = relay.child.try_wait()? {
            anyhow::bail!("relay exited with {status}:\n{}", relay.stderr());
        }
        let body = http_get(addr, "/status").await.unwrap_or_default();
        if body.contains(r#""state":"streaming""#) {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "relay not streaming after 60 s; /status {body}; log:\n{}",
            relay.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn relay_properties(sasl: &KafkaSasl) -> Vec<String> {
    sasl.properties(&sasl.relay_user, &sasl.relay_password)
}

fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

async fn insert_events(c: &tokio_postgres::Client, n: i64) -> anyhow::Result<BTreeSet<i64>> {
    let mut ids = BTreeSet::new();
    for user in 1..=n {
        ids.insert(insert_event(c, user, "OrderCreated").await?);
    }
    Ok(ids)
}

/// A test whose relay Kafka refuses: the slot exists before the outbox
/// rows are inserted, so the relay would receive them.
struct Refused {
    db: TestDb,
    client: tokio_postgres::Client,
    /// WAL position before the rows: the slot may not be confirmed past it.
    before: Lsn,
}

impl Refused {
    async fn prepare(slot: &str) -> anyhow::Result<Refused> {
        let db = TestDb::create().await?;
        let client = db.connect().await?;
        client
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&slot],
            )
            .await?;
        let before = current_wal_lsn(&client).await?;
        insert_events(&client, 3).await?;
        Ok(Refused { db, client, before })
    }

    /// Runs the relay until it exits by itself; checks it failed, nothing
    /// was confirmed and no secret was logged. Returns its log.
    async fn run(&self, args: &[String], extra_secret: Option<&str>) -> anyhow::Result<String> {
        let (mut relay, _) = spawn_relay(args)?;
        let (status, log) = relay.wait_exit(EXIT_WAIT).await?;
        assert!(!status.success(), "the relay exited with {status}:\n{log}");
        let slot = &args[args.iter().position(|a| a == "--slot").expect("--slot") + 1];
        let confirmed = slot_confirmed(&self.client, slot).await?.expect("slot");
        assert!(
            confirmed <= self.before,
            "slot confirmed {confirmed}, past the rows inserted after {}",
            self.before
        );
        let mut secrets = KafkaSasl::from_env().secrets();
        secrets.extend(extra_secret.map(str::to_owned));
        assert_no_secret("the relay's log", &log, &secrets);
        let _ = self
            .client
            .execute("SELECT pg_drop_replication_slot($1)", &[slot])
            .await;
        for line in log.lines().filter(|l| l.starts_with("relay: ")) {
            println!("exit message: {line}");
        }
        Ok(log)
    }
}

/// A relay on a fresh slot and database, writing `topic` through the SASL_SSL
/// listener with `options`, that Kafka refuses: see [`Refused::run`].
async fn refused_relay(
    topic: &str,
    options: &[String],
    extra_secret: Option<&str>,
) -> anyhow::Result<String> {
    let slot = devstack::testing::unique_name("slot");
    let refused = Refused::prepare(&slot).await?;
    let bootstrap = KafkaSasl::from_env().bootstrap;
    let args = relay_args(&refused.db.url, &slot, topic, &bootstrap, &as_strs(options));
    refused.run(&args, extra_secret).await
}

#[tokio::test]
async fn the_relay_produces_through_sasl_ssl_and_restarts_exactly_once() -> anyhow::Result<()> {
    let sasl = KafkaSasl::from_env();
    let db = TestDb::create().await?;
    let topic = sasl.granted_name("topic");
    devstack::kafka::create_topic(&kafka_bootstrap(), &topic, 2).await?;
    let props = relay_properties(&sasl);
    let args = relay_args(
        &db.url,
        &db.slot_name(),
        &topic,
        &sasl.bootstrap,
        &as_strs(&props),
    );
    let secrets = sasl.secrets();
    let c = db.connect().await?;

    let (mut relay, addr) = spawn_relay(&args)?;
    wait_streaming(&mut relay, addr).await?;
    let mut ids = insert_events(&c, 5).await?;
    let records = read_until_all(&kafka_bootstrap(), &topic, &ids, Duration::from_secs(30)).await?;
    assert_eq!(records.len(), 5, "each event once");
    let status = http_get(addr, "/status").await?;
    let metrics = http_get(addr, "/metrics").await?;
    assert!(
        metrics.contains(&format!("relay_events_total{{topic=\"{topic}\"}} 5")),
        "{metrics}"
    );
    assert_no_secret("/status", &status, &secrets);
    assert_no_secret("/metrics", &metrics, &secrets);
    let (exit, log) = relay.terminate(Duration::from_secs(30)).await?;
    assert!(exit.success(), "relay exited with {exit}:\n{log}");
    assert_no_secret("the relay's log", &log, &secrets);

    // The restart reads each partition's last record back (READ on the
    // topic) and skips what is there: every event exactly once.
    ids.extend(insert_events(&c, 5).await?);
    let (mut relay, addr) = spawn_relay(&args)?;
    wait_streaming(&mut relay, addr).await?;
    let records = read_until_all(&kafka_bootstrap(), &topic, &ids, Duration::from_secs(30)).await?;
    let got: Vec<i64> = records.iter().map(event_id).collect();
    assert_eq!(got.len(), 10, "every event exactly once: {got:?}");
    let status = http_get(addr, "/status").await?;
    assert_no_secret("/status", &status, &secrets);
    let (exit, log) = relay.terminate(Duration::from_secs(30)).await?;
    assert!(exit.success(), "relay exited with {exit}:\n{log}");
    assert!(
        log.contains("read each partition's last position"),
        "the restart read the partitions' ends:\n{log}"
    );
    assert_no_secret("the relay's log", &log, &secrets);
    c.execute("SELECT pg_drop_replication_slot($1)", &[&db.slot_name()])
        .await?;
    Ok(())
}

#[tokio::test]
async fn kafka_transactions_work_through_sasl_ssl() -> anyhow::Result<()> {
    let sasl = KafkaSasl::from_env();
    let db = TestDb::create().await?;
    let topic = sasl.granted_name("topic");
    devstack::kafka::create_topic(&kafka_bootstrap(), &topic, 1).await?;
    // transactional.id outbox-relay.<slot>: granted by the prefix ACL.
    let slot = sasl.granted_name("slot");
    // The login from a properties file: the password is not in `ps`.
    let mut extra = sasl.properties_file(&sasl.relay_user, &sasl.relay_password)?;
    extra.push("--kafka-transactions".into());
    let args = relay_args(&db.url, &slot, &topic, &sasl.bootstrap, &as_strs(&extra));
    let (mut relay, addr) = spawn_relay(&args)?;
    wait_streaming(&mut relay, addr).await?;
    assert_no_secret_in_command_line(relay.child.id().expect("running"), &sasl.kafka_secrets())?;
    let c = db.connect().await?;
    let ids = insert_events(&c, 5).await?;
    let records = read_until_all_isolated(
        &kafka_bootstrap(),
        &topic,
        &ids,
        Duration::from_secs(30),
        true,
    )
    .await?;
    assert_eq!(records.len(), 5, "each event once, committed");
    let (exit, log) = relay.terminate(Duration::from_secs(30)).await?;
    assert!(exit.success(), "relay exited with {exit}:\n{log}");
    assert_no_secret("the relay's log", &log, &sasl.secrets());
    c.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_wrong_password_stops_the_relay_naming_the_failed_authentication() -> anyhow::Result<()> {
    let sasl = KafkaSasl::from_env();
    let topic = sasl.granted_name("topic");
    devstack::kafka::create_topic(&kafka_bootstrap(), &topic, 1).await?;
    let wrong = format!("{}-wrong", sasl.relay_password);
    let props = sasl.properties(&sasl.relay_user, &wrong);
    let log = refused_relay(&topic, &props, Some(&wrong)).await?;
    assert!(
        log.contains("relay: kafka: Kafka authentication failed"),
        "the exit message names the cause:\n{log}"
    );
    Ok(())
}

#[tokio::test]
async fn a_topic_without_acl_stops_the_relay_naming_the_failed_authorization() -> anyhow::Result<()>
{
    let sasl = KafkaSasl::from_env();
    // Outside the ACL prefix: the relay's user may not touch it.
    let topic = create_topic(1).await?;
    let props = relay_properties(&sasl);
    let log = refused_relay(&topic, &props, None).await?;
    assert!(
        log.contains(&format!(
            "relay: kafka: Kafka authorization failed: describing topic {topic} "
        )) && log.contains("Topic authorization failed"),
        "the exit message names the cause:\n{log}"
    );
    Ok(())
}

#[tokio::test]
async fn a_transactional_id_without_acl_stops_the_relay_naming_the_failed_authorization(
) -> anyhow::Result<()> {
    let sasl = KafkaSasl::from_env();
    let topic = sasl.granted_name("topic");
    devstack::kafka::create_topic(&kafka_bootstrap(), &topic, 1).await?;
    // transactional.id outbox-relay.<slot> outside the granted prefix.
    let mut extra = relay_properties(&sasl);
    extra.push("--kafka-transactions".into());
    let log = refused_relay(&topic, &extra, None).await?;
    assert!(
        log.contains("relay: Kafka authorization failed")
            && log.contains("Transactional Id authorization failed"),
        "the exit message names the cause:\n{log}"
    );
    Ok(())
}

#[tokio::test]
async fn a_broker_certificate_from_another_ca_stops_the_relay_naming_tls() -> anyhow::Result<()> {
    let sasl = KafkaSasl::from_env();
    let topic = sasl.granted_name("topic");
    devstack::kafka::create_topic(&kafka_bootstrap(), &topic, 1).await?;
    // The right user and password; ssl.ca.location a CA that did not sign
    // the broker's certificate.
    let other = devstack::testing::another_ca()?;
    let props: Vec<String> = relay_properties(&sasl)
        .into_iter()
        .map(|p| {
            if p.starts_with("ssl.ca.location=") {
                format!("ssl.ca.location={other}")
            } else {
                p
            }
        })
        .collect();
    assert!(props.iter().any(|p| p.ends_with(&other)), "{props:?}");
    let log = refused_relay(&topic, &props, None).await?;
    assert!(
        log.contains("relay: kafka: Kafka authentication failed")
            && log.contains("certificate verify failed")
            && log.contains("check ssl.ca.location"),
        "the exit message names the untrusted certificate:\n{log}"
    );
    Ok(())
}
