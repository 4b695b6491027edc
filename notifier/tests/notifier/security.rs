//! The notifier binary against the test broker's SASL_SSL listener
//! (SCRAM-SHA-512 over TLS, ACLs enforced; see
//! `devstack::testing::KafkaSasl`), logged in as the notifier's Kafka user
//! from a `--kafka-properties-file` (no password in the process list): it emails and dead-letters through it;
//! a refused password, a broker certificate its CA did not sign, or a
//! topic, group or dead-letter topic it has no ACL for, stops it with a clear error and a non-zero exit; and no secret
//! reaches its logs or `/metrics`.

use std::time::Duration;

use crate::common::*;
use devstack::kafka::TopicReader;
use devstack::testing::{
    assert_no_secret, create_topic, kafka_bootstrap, unique_name, wait_for, Captured, KafkaSasl,
    TestDb,
};
use outbox_record::header;

/// How long a refused notifier may take to give up.
const EXIT_WAIT: Duration = Duration::from_secs(60);

/// The notifier binary, logged in as `user` with `password` (from a
/// `--kafka-properties-file`, so not in the process list), emailing to
/// the test stack's SMTP sink, logging at debug level (every line is
/// checked for secrets). Returns it and its HTTP address.
fn spawn_notifier(
    sasl: &KafkaSasl,
    password: &str,
    db: &TestDb,
    topic: &str,
    group: &str,
    extra: &[&str],
) -> anyhow::Result<(Captured, String)> {
    let addr = format!("127.0.0.1:{}", free_port()?);
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_notifier"));
    cmd.args(["--database-url", &db.url])
        .args(["--kafka-bootstrap-servers", &sasl.bootstrap])
        .args(["--topic", topic, "--group", group])
        .args(["--smtp-url", &sink_smtp_url()])
        .args(["--listen", &addr, "--commit-interval", "200ms"])
        .args(["--initial-backoff", "100ms", "--max-backoff", "1s"])
        .args(sasl.properties_file(&sasl.notifier_user, password)?)
        .args(extra)
        .env("RUST_LOG", "debug");
    Ok((Captured::spawn(cmd)?, addr))
}

/// Waits for the refused notifier to exit by itself: non-zero, with
/// `expected` in its exit message and no secret in its log.
async fn expect_refused(
    mut notifier: Captured,
    expected: &[&str],
    extra_secret: Option<&str>,
) -> anyhow::Result<()> {
    let (status, log) = notifier.wait_exit(EXIT_WAIT).await?;
    assert!(
        !status.success(),
        "the notifier exited with {status}:\n{log}"
    );
    let exit = log
        .lines()
        .find(|l| l.starts_with("notifier: "))
        .unwrap_or_else(|| panic!("no exit message:\n{log}"));
    println!("exit message: {exit}");
    for needle in expected {
        assert!(
            exit.contains(needle),
            "{needle:?} not in the exit message:\n{log}"
        );
    }
    let mut secrets = KafkaSasl::from_env().secrets();
    secrets.extend(extra_secret.map(str::to_owned));
    assert_no_secret("the notifier's log", &log, &secrets);
    Ok(())
}

#[tokio::test]
async fn the_notifier_emails_and_dead_letters_through_sasl_ssl() -> anyhow::Result<()> {
    let sasl = KafkaSasl::from_env();
    let db = TestDb::create().await?;
    let topic = sasl.granted_name("topic");
    devstack::kafka::create_topic(&kafka_bootstrap(), &topic, 2).await?;
    let domain = unique_domain();
    let email = format!("buyer@{domain}");
    let relay = Relay::new(&topic)?;
    relay
        .send_event(1, 42, "OrderCreated", &order_payload(7, &email, "CREATED"))
        .await?;
    relay
        .send_raw(
            "42",
            b"{this is not json",
            &[
                (header::EVENT_ID, "2"),
                (header::EVENT_TYPE, "OrderCreated"),
            ],
        )
        .await?;

    let (mut notifier, addr) = spawn_notifier(
        &sasl,
        &sasl.notifier_password,
        &db,
        &topic,
        &sasl.granted_name("g"),
        &[],
    )?;
    let mut reader = MailReader::maildir(&sink_maildir());
    let mails = wait_mails(&mut reader, &domain, 1, Duration::from_secs(60))
        .await
        .map_err(|e| anyhow::anyhow!("{e}; notifier log:\n{}", notifier.stderr()))?;
    assert_eq!(mails[0].event_id, Some(1));
    devstack::testing::assert_no_secret_in_command_line(
        notifier.child.id().expect("running"),
        &sasl.kafka_secrets(),
    )?;
    let inbox: Vec<i64> = db
        .connect()
        .await?
        .query("SELECT event_id FROM notifier_inbox", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(inbox, vec![1]);
    // The dead-letter topic was created and written as the notifier's user.
    let dead = TopicReader::new(&kafka_bootstrap(), &format!("{topic}.dlq"), true)?
        .read_at_least(1, Duration::from_secs(30), Duration::from_millis(500))
        .await?;
    assert_eq!(dead.len(), 1, "{dead:#?}");
    assert_eq!(dead[0].header(header::EVENT_ID), Some("2"));

    let metrics =
        wait_for("metrics", Duration::from_secs(10), || async {
            let body = reqwest::get(format!("http://{addr}/metrics"))
                .await?
                .text()
                .await?;
            Ok((body.contains("notifier_emails_sent_total 1")
                && body.contains("notifier_dlq_total 1"))
            .then_some(body))
        })
        .await?;
    let secrets = sasl.secrets();
    assert_no_secret("/metrics", &metrics, &secrets);
    let (status, log) = notifier.terminate(Duration::from_secs(60)).await?;
    assert!(status.success(), "notifier exited with {status}:\n{log}");
    assert_no_secret("the notifier's log", &log, &secrets);
    Ok(())
}

#[tokio::test]
async fn a_wrong_password_stops_the_notifier_naming_the_failed_authentication() -> anyhow::Result<()>
{
    let sasl = KafkaSasl::from_env();
    let db = TestDb::create().await?;
    let topic = sasl.granted_name("topic");
    devstack::kafka::create_topic(&kafka_bootstrap(), &topic, 1).await?;
    let wrong = format!("{}-wrong", sasl.notifier_password);
    let (notifier, _) = spawn_notifier(&sasl, &wrong, &db, &topic, &sasl.granted_name("g"), &[])?;
    expect_refused(
        notifier,
        &[
            "notifier: Kafka authentication failed",
            "invalid credentials",
        ],
        Some(&wrong),
    )
    .await
}

#[tokio::test]
async fn a_broker_certificate_from_another_ca_stops_the_notifier_naming_tls() -> anyhow::Result<()>
{
    let sasl = KafkaSasl::from_env();
    let db = TestDb::create().await?;
    let topic = sasl.granted_name("topic");
    devstack::kafka::create_topic(&kafka_bootstrap(), &topic, 1).await?;
    // The file's login, and a --kafka-property (which wins over the file)
    // naming a CA that did not sign the broker's certificate.
    let ca = format!("ssl.ca.location={}", devstack::testing::another_ca()?);
    let (notifier, _) = spawn_notifier(
        &sasl,
        &sasl.notifier_password,
        &db,
        &topic,
        &sasl.granted_name("g"),
        &["--kafka-property", &ca],
    )?;
    expect_refused(
        notifier,
        &[
            "notifier: Kafka authentication failed",
            "certificate verify failed",
            "check ssl.ca.location",
        ],
        None,
    )
    .await
}

#[tokio::test]
async fn a_topic_without_acl_stops_the_notifier_naming_the_failed_authorization(
) -> anyhow::Result<()> {
    let sasl = KafkaSasl::from_env();
    let db = TestDb::create().await?;
    // Outside the ACL prefix: the notifier's user may not read it.
    let topic = create_topic(1).await?;
    let (notifier, _) = spawn_notifier(
        &sasl,
        &sasl.notifier_password,
        &db,
        &topic,
        &sasl.granted_name("g"),
        &[],
    )?;
    expect_refused(
        notifier,
        &[
            "notifier: Kafka authorization failed",
            &topic,
            "Topic authorization failed",
        ],
        None,
    )
    .await
}

#[tokio::test]
async fn a_group_without_acl_stops_the_notifier_naming_the_failed_authorization(
) -> anyhow::Result<()> {
    let sasl = KafkaSasl::from_env();
    let db = TestDb::create().await?;
    let topic = sasl.granted_name("topic");
    devstack::kafka::create_topic(&kafka_bootstrap(), &topic, 1).await?;
    // A group outside the ACL prefix.
    let group = unique_name("g");
    let (notifier, _) = spawn_notifier(&sasl, &sasl.notifier_password, &db, &topic, &group, &[])?;
    expect_refused(
        notifier,
        &[
            "notifier: Kafka authorization failed",
            &group,
            "Group authorization failed",
        ],
        None,
    )
    .await
}

#[tokio::test]
async fn a_dead_letter_topic_without_acl_stops_the_notifier_naming_the_failed_authorization(
) -> anyhow::Result<()> {
    let sasl = KafkaSasl::from_env();
    let db = TestDb::create().await?;
    let topic = sasl.granted_name("topic");
    devstack::kafka::create_topic(&kafka_bootstrap(), &topic, 1).await?;
    // A dead-letter topic outside the ACL prefix, and a record for it.
    let dlq = unique_name("dlq");
    Relay::new(&topic)?
        .send_raw(
            "42",
            b"{this is not json",
            &[
                (header::EVENT_ID, "1"),
                (header::EVENT_TYPE, "OrderCreated"),
            ],
        )
        .await?;
    let (notifier, _) = spawn_notifier(
        &sasl,
        &sasl.notifier_password,
        &db,
        &topic,
        &sasl.granted_name("g"),
        &["--dlq-topic", &dlq],
    )?;
    expect_refused(
        notifier,
        &["notifier: Kafka authorization failed", &dlq],
        None,
    )
    .await
}
