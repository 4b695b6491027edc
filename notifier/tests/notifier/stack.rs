//! The notifier against the test stack: real broker (Apache Kafka), real Postgres
//! (a fresh migrated database per test), real SMTP server (aiosmtpd writing
//! a Maildir). Each test has its own topic, group and recipient domain.

use std::collections::HashMap;
use std::time::Duration;

use crate::common::*;
use devstack::kafka::TopicReader;
use devstack::testing::{create_topic, kafka_bootstrap, unique_name, wait_for, TestDb};
use outbox_record::header;
use serde_json::json;

const EMAIL_WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn every_order_event_becomes_its_email() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let topic = create_topic(1).await?;
    let domain = unique_domain();
    let email = format!("buyer@{domain}");
    let n = Running::start(config(
        &db.url,
        &topic,
        &unique_name("g"),
        &Dest::Smtp(sink_smtp_url()),
    ));
    let relay = Relay::new(&topic)?;
    relay
        .send_event(1, 42, "OrderCreated", &order_payload(7, &email, "CREATED"))
        .await?;
    // Forward compatible: an unknown type is counted and skipped.
    relay
        .send_event(2, 42, "OrderArchived", &json!({"order_id": 7}))
        .await?;
    let mut id = 2;
    for (from, to) in [
        ("CREATED", "PAID"),
        ("PAID", "SHIPPED"),
        ("SHIPPED", "DELIVERED"),
    ] {
        id += 1;
        relay
            .send_event(
                id,
                42,
                "OrderStatusChanged",
                &status_payload(7, &email, from, to),
            )
            .await?;
    }
    let cancelled = format!("other@{domain}");
    relay
        .send_event(
            6,
            43,
            "OrderStatusChanged",
            &status_payload(8, &cancelled, "CREATED", "CANCELLED"),
        )
        .await?;

    let mut reader = MailReader::maildir(&sink_maildir());
    let mails = wait_mails(&mut reader, &domain, 5, EMAIL_WAIT).await?;
    let by_event: HashMap<i64, &Mail> = mails
        .iter()
        .filter_map(|m| Some((m.event_id?, m)))
        .collect();
    let expect = [
        (1, "Order #7 received", email.as_str()),
        (3, "Order #7: payment received", email.as_str()),
        (4, "Order #7 has shipped", email.as_str()),
        (5, "Order #7 has been delivered", email.as_str()),
        (6, "Order #8 has been cancelled", cancelled.as_str()),
    ];
    for (event_id, subject, to) in expect {
        let m = by_event
            .get(&event_id)
            .unwrap_or_else(|| panic!("no email for event {event_id}: {mails:#?}"));
        assert_eq!(m.subject, subject);
        assert_eq!(m.to, to);
        assert_eq!(
            m.message_id,
            format!("<order-event-{event_id}@notifier.outbox-relay>")
        );
    }
    let received = by_event[&1].raw.as_str();
    assert!(
        received.contains("A-1") && received.contains("44.98 EUR"),
        "{received}"
    );
    assert!(received.contains("text/html"), "has an HTML alternative");

    // Every handled event is in the inbox; the skipped one is not.
    let client = db.connect().await?;
    let rows = client
        .query("SELECT event_id FROM notifier_inbox ORDER BY event_id", &[])
        .await?;
    let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(ids, vec![1, 3, 4, 5, 6]);

    wait_for("metrics", Duration::from_secs(10), || async {
        let m = n.metrics().await?;
        Ok((m.contains("notifier_emails_sent_total 5")
            && m.contains(r#"notifier_events_total{event_type="other",outcome="skipped"} 1"#)
            && m.contains(
                r#"notifier_events_total{event_type="OrderStatusChanged",outcome="sent"} 4"#,
            )
            && m.contains("notifier_end_to_end_seconds_count 6"))
        .then_some(()))
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    n.stop().await
}

/// The stack's sink offers PIPELINING, so the tests and benchmarks that
/// send through it exercise the notifier's pipelined sends against
/// aiosmtpd.
#[tokio::test]
async fn the_stack_sink_offers_pipelining() -> anyhow::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let url = sink_smtp_url();
    let stream = tokio::net::TcpStream::connect(url.trim_start_matches("smtp://")).await?;
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    lines.next_line().await?; // the greeting
    write.write_all(b"EHLO test\r\n").await?;
    let mut extensions = Vec::new();
    while let Some(line) = lines.next_line().await? {
        extensions.push(line[4..].to_owned());
        if line.as_bytes().get(3) == Some(&b' ') {
            break;
        }
    }
    assert!(
        extensions.iter().any(|e| e == "PIPELINING"),
        "{extensions:?}"
    );
    Ok(())
}

#[tokio::test]
async fn the_same_record_twice_sends_one_email() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let topic = create_topic(1).await?;
    let domain = unique_domain();
    let email = format!("twice@{domain}");
    let n = Running::start(config(
        &db.url,
        &topic,
        &unique_name("g"),
        &Dest::Smtp(sink_smtp_url()),
    ));
    let relay = Relay::new(&topic)?;
    let payload = order_payload(11, &email, "CREATED");
    relay.send_event(1, 42, "OrderCreated", &payload).await?;
    relay.send_event(1, 42, "OrderCreated", &payload).await?;
    // A later event, so "the duplicate was handled" is observable.
    relay
        .send_event(
            2,
            42,
            "OrderStatusChanged",
            &status_payload(11, &email, "CREATED", "PAID"),
        )
        .await?;

    let mut reader = MailReader::maildir(&sink_maildir());
    wait_mails(&mut reader, &domain, 2, EMAIL_WAIT).await?;
    wait_for(
        "the duplicate to be counted",
        Duration::from_secs(10),
        || async { Ok((n.metric("notifier_duplicates_total").await? >= 1.0).then_some(())) },
    )
    .await?;
    // Give a stray second email time to arrive before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mails = reader.to(&domain)?;
    let created: Vec<_> = mails.iter().filter(|m| m.event_id == Some(1)).collect();
    assert_eq!(created.len(), 1, "{mails:#?}");
    assert_eq!(mails.len(), 2, "{mails:#?}");
    assert_eq!(n.metric("notifier_emails_sent_total").await?, 2.0);
    n.stop().await
}

#[tokio::test]
async fn a_malformed_record_goes_to_the_dlq_and_the_next_is_emailed() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let topic = create_topic(1).await?;
    let domain = unique_domain();
    let email = format!("after@{domain}");
    let n = Running::start(config(
        &db.url,
        &topic,
        &unique_name("g"),
        &Dest::Smtp(sink_smtp_url()),
    ));
    let relay = Relay::new(&topic)?;
    let (p1, o1) = relay
        .send_raw(
            "42",
            b"{this is not json",
            &[
                (header::EVENT_ID, "1"),
                (header::EVENT_TYPE, "OrderCreated"),
            ],
        )
        .await?;
    let mut no_email = order_payload(12, "x@y.test", "CREATED");
    no_email.as_object_mut().unwrap().remove("email");
    let (_, o2) = relay.send_event(2, 42, "OrderCreated", &no_email).await?;
    relay
        .send_event(3, 42, "OrderCreated", &order_payload(13, &email, "CREATED"))
        .await?;

    let mut reader = MailReader::maildir(&sink_maildir());
    let mails = wait_mails(&mut reader, &domain, 1, EMAIL_WAIT).await?;
    assert_eq!(mails[0].event_id, Some(3));
    assert_eq!(mails[0].subject, "Order #13 received");

    let dlq = TopicReader::new(&kafka_bootstrap(), &format!("{topic}.dlq"), true)?;
    let dead = dlq
        .read_at_least(2, Duration::from_secs(20), Duration::from_millis(500))
        .await?;
    assert_eq!(dead.len(), 2, "{dead:#?}");
    let first = &dead[0];
    assert_eq!(first.value.as_deref(), Some("{this is not json"));
    assert_eq!(first.key.as_deref(), Some("42"));
    assert!(
        first
            .header(header::dlq::REASON)
            .unwrap_or("")
            .contains("not JSON"),
        "{first:?}"
    );
    assert_eq!(
        first.header(header::dlq::ERROR_CLASS),
        Some("malformed_record")
    );
    assert_eq!(
        first.header(header::dlq::ORIGINAL_TOPIC),
        Some(topic.as_str())
    );
    assert_eq!(
        first.header(header::dlq::ORIGINAL_PARTITION),
        Some(p1.to_string().as_str())
    );
    assert_eq!(
        first.header(header::dlq::ORIGINAL_OFFSET),
        Some(o1.to_string().as_str())
    );
    assert_eq!(
        first.header(header::EVENT_ID),
        Some("1"),
        "original headers kept"
    );
    let second = &dead[1];
    assert!(
        second
            .header(header::dlq::REASON)
            .unwrap_or("")
            .contains("email"),
        "{second:?}"
    );
    assert_eq!(
        second.header(header::dlq::ORIGINAL_OFFSET),
        Some(o2.to_string().as_str())
    );

    wait_for("dlq metric", Duration::from_secs(10), || async {
        Ok((n.metric("notifier_dlq_total").await? == 2.0).then_some(()))
    })
    .await?;
    n.stop().await
}

#[tokio::test]
async fn without_smtp_emails_are_written_to_the_mail_dir() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let topic = create_topic(1).await?;
    let dir = std::env::temp_dir().join(unique_name("notifier_spool"));
    let n = Running::start(config(
        &db.url,
        &topic,
        &unique_name("g"),
        &Dest::Dir(dir.clone()),
    ));
    let relay = Relay::new(&topic)?;
    relay
        .send_event(
            5,
            42,
            "OrderCreated",
            &order_payload(21, "spool@example.test", "CREATED"),
        )
        .await?;
    let mut reader = MailReader::spool(&dir);
    let mails = wait_mails(&mut reader, "spool@example.test", 1, EMAIL_WAIT).await?;
    assert_eq!(mails[0].file, dir.join("order-event-5.eml"));
    assert_eq!(mails[0].subject, "Order #21 received");
    n.stop().await?;
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[tokio::test]
async fn serial_smtp_down_holds_the_position_until_it_returns() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let topic = create_topic(1).await?;
    let group = unique_name("g");
    let mut smtp = OwnSmtp::start().await?;
    let n = Running::start(config(&db.url, &topic, &group, &Dest::Smtp(smtp.url())));
    let relay = Relay::new(&topic)?;
    let mut reader = MailReader::maildir(&smtp.maildir);

    let (p, o1) = relay
        .send_event(
            1,
            42,
            "OrderCreated",
            &order_payload(31, "down@example.test", "CREATED"),
        )
        .await?;
    wait_mails(&mut reader, "down@example.test", 1, EMAIL_WAIT).await?;
    wait_for(
        "offset of the first event committed",
        Duration::from_secs(15),
        || {
            let (group, topic) = (group.clone(), topic.clone());
            async move { Ok((committed_offset(&group, &topic, p)? == Some(o1 + 1)).then_some(())) }
        },
    )
    .await?;

    smtp.kill()?;
    let (_, o2) = relay
        .send_event(
            2,
            42,
            "OrderStatusChanged",
            &status_payload(31, "down@example.test", "CREATED", "PAID"),
        )
        .await?;
    // While the server is down the notifier retries and commits nothing past
    // the first event.
    let down_until = std::time::Instant::now() + Duration::from_secs(4);
    while std::time::Instant::now() < down_until {
        assert_eq!(committed_offset(&group, &topic, p)?, Some(o1 + 1));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(n.metric("notifier_emails_sent_total").await?, 1.0);

    smtp.restart().await?;
    let mails = wait_mails(&mut reader, "down@example.test", 2, EMAIL_WAIT).await?;
    assert_eq!(mails[1].subject, "Order #31: payment received");
    wait_for(
        "offset of the second event committed",
        Duration::from_secs(15),
        || {
            let (group, topic) = (group.clone(), topic.clone());
            async move { Ok((committed_offset(&group, &topic, p)? == Some(o2 + 1)).then_some(())) }
        },
    )
    .await?;
    n.stop().await
}

/// Two instances and two rebalances (one joins mid-stream, then the
/// first leaves) over `events` records: every event must be emailed
/// exactly once. The records come in phases, so each instance has records
/// to handle however fast the other is: a first part before A starts, more
/// until B has sent an email, the rest after A has left (B takes over A's
/// partitions from A's committed offsets).
async fn rebalance_scenario(bootstrap: &str, relay: &Relay, events: i64) -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let group = unique_name("g");
    let domain = unique_domain();
    let send = |ids: std::ops::RangeInclusive<i64>| {
        let domain = domain.clone();
        futures_util::future::try_join_all(ids.map(move |i| {
            let email = format!("c{i}@{domain}");
            async move {
                relay
                    .send_event(
                        i,
                        i % 37 + 1,
                        "OrderCreated",
                        &order_payload(i, &email, "CREATED"),
                    )
                    .await
            }
        }))
    };
    let first = events * 2 / 5;
    send(1..=first).await?;

    let cfg = || {
        config_on(
            bootstrap,
            &db.url,
            &relay.topic,
            &group,
            &Dest::Smtp(sink_smtp_url()),
        )
    };
    let mut reader = MailReader::maildir(&sink_maildir());
    let a = Running::start(cfg());
    wait_mails(
        &mut reader,
        &domain,
        (first / 2) as usize,
        Duration::from_secs(60),
    )
    .await?;
    // A second instance joins: the group rebalances while A is mid-stream,
    // and records keep coming until B has handled one.
    let b = Running::start(cfg());
    let mut sent = first;
    let until = events * 4 / 5;
    while sent < until && b.metric("notifier_emails_sent_total").await? == 0.0 {
        let next = (sent + 10).min(until);
        send(sent + 1..=next).await?;
        sent = next;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for(
        "both instances to handle events",
        Duration::from_secs(60),
        || async { Ok((b.metric("notifier_emails_sent_total").await? > 0.0).then_some(())) },
    )
    .await?;
    // The first leaves: B takes over its partitions from A's committed
    // offsets, and the rest of the records come.
    let sent_by_a = a.metric("notifier_emails_sent_total").await?;
    a.stop().await?;
    send(sent + 1..=events).await?;
    wait_mails(
        &mut reader,
        &domain,
        events as usize,
        Duration::from_secs(90),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let mails = reader.to(&domain)?;
    let mut per_event: HashMap<i64, usize> = HashMap::new();
    for m in &mails {
        *per_event.entry(m.event_id.unwrap_or(-1)).or_default() += 1;
    }
    let not_once: Vec<_> = per_event.iter().filter(|(_, &n)| n != 1).collect();
    assert!(
        not_once.is_empty(),
        "events not emailed exactly once: {not_once:?}"
    );
    assert_eq!(per_event.len(), events as usize);
    assert!((1..=events).all(|i| per_event.contains_key(&i)));
    let sent_by_b = b.metric("notifier_emails_sent_total").await?;
    assert!(
        sent_by_a > 0.0 && sent_by_b > 0.0,
        "a {sent_by_a}, b {sent_by_b}"
    );
    let client = db.connect().await?;
    let rows: i64 = client
        .query_one("SELECT count(*) FROM notifier_inbox", &[])
        .await?
        .get(0);
    assert_eq!(rows, events);
    b.stop().await
}

#[tokio::test]
async fn two_instances_and_rebalances_email_each_of_1000_events_once() -> anyhow::Result<()> {
    let topic = create_topic(4).await?;
    rebalance_scenario(&kafka_bootstrap(), &Relay::new(&topic)?, 1000).await
}

#[tokio::test]
async fn a_permanent_smtp_rejection_goes_to_the_dlq() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let topic = create_topic(1).await?;
    let smtp = FakeSmtp::start("550 5.1.1 no such mailbox", usize::MAX).await?;
    let n = Running::start(config(
        &db.url,
        &topic,
        &unique_name("g"),
        &Dest::Smtp(smtp.url.clone()),
    ));
    let relay = Relay::new(&topic)?;
    let (_, o1) = relay
        .send_event(
            1,
            42,
            "OrderCreated",
            &order_payload(41, "gone@example.test", "CREATED"),
        )
        .await?;
    let (_, o2) = relay
        .send_event(
            2,
            42,
            "OrderStatusChanged",
            &status_payload(41, "gone@example.test", "CREATED", "PAID"),
        )
        .await?;
    // The notifier creates the DLQ topic as it starts, which may still be
    // under way.
    let dlq = wait_for("the DLQ topic", Duration::from_secs(30), || async {
        Ok(TopicReader::new(&kafka_bootstrap(), &format!("{topic}.dlq"), true).ok())
    })
    .await?;
    let dead = dlq
        .read_at_least(2, Duration::from_secs(20), Duration::from_millis(500))
        .await?;
    assert_eq!(dead.len(), 2, "{dead:#?}");
    for (record, offset) in dead.iter().zip([o1, o2]) {
        assert_eq!(
            record.header(header::dlq::ERROR_CLASS),
            Some("smtp_rejected")
        );
        assert!(
            record
                .header(header::dlq::REASON)
                .unwrap_or("")
                .contains("550"),
            "{record:?}"
        );
        assert_eq!(
            record.header(header::dlq::ORIGINAL_OFFSET),
            Some(offset.to_string().as_str())
        );
    }
    // Not recorded as sent: a fixed record replayed later is emailed.
    let client = db.connect().await?;
    let rows: i64 = client
        .query_one("SELECT count(*) FROM notifier_inbox", &[])
        .await?
        .get(0);
    assert_eq!(rows, 0);
    assert_eq!(n.metric("notifier_emails_sent_total").await?, 0.0);
    assert_eq!(smtp.accepted(), 0);
    n.stop().await
}

#[tokio::test]
async fn a_transient_smtp_reply_is_retried_until_accepted() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let topic = create_topic(1).await?;
    let smtp = FakeSmtp::start("451 4.3.0 try again later", 3).await?;
    let n = Running::start(config(
        &db.url,
        &topic,
        &unique_name("g"),
        &Dest::Smtp(smtp.url.clone()),
    ));
    let relay = Relay::new(&topic)?;
    relay
        .send_event(
            1,
            42,
            "OrderCreated",
            &order_payload(61, "later@example.test", "CREATED"),
        )
        .await?;
    relay
        .send_event(
            2,
            42,
            "OrderStatusChanged",
            &status_payload(61, "later@example.test", "CREATED", "PAID"),
        )
        .await?;
    wait_for("both emails accepted", Duration::from_secs(20), || async {
        Ok((smtp.accepted() == 2).then_some(()))
    })
    .await?;
    wait_for("metrics", Duration::from_secs(5), || async {
        Ok((n.metric("notifier_emails_sent_total").await? == 2.0).then_some(()))
    })
    .await?;
    assert_eq!(n.metric("notifier_dlq_total").await?, 0.0);
    let client = db.connect().await?;
    let ids: Vec<i64> = client
        .query(
            "SELECT event_id FROM notifier_inbox ORDER BY handled_at",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, vec![1, 2], "in order, the first held until accepted");
    n.stop().await
}

#[tokio::test]
async fn graceful_shutdown_commits_the_handled_offsets() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let topic = create_topic(1).await?;
    let group = unique_name("g");
    let dir = std::env::temp_dir().join(unique_name("notifier_spool"));
    let mut cfg = config(&db.url, &topic, &group, &Dest::Dir(dir.clone()));
    // No periodic commit during the test: only shutdown can commit.
    cfg.commit_interval = Duration::from_secs(600);
    let n = Running::start(cfg);
    let relay = Relay::new(&topic)?;
    let mut last = (0, 0);
    for i in 1..=3 {
        last = relay
            .send_event(
                i,
                42,
                "OrderCreated",
                &order_payload(50 + i, "bye@example.test", "CREATED"),
            )
            .await?;
    }
    let mut reader = MailReader::spool(&dir);
    wait_mails(&mut reader, "bye@example.test", 3, EMAIL_WAIT).await?;
    wait_for("offsets stored", Duration::from_secs(5), || async {
        Ok((n.metric("notifier_emails_sent_total").await? == 3.0).then_some(()))
    })
    .await?;
    assert_eq!(
        committed_offset(&group, &topic, last.0)?,
        None,
        "nothing committed yet"
    );
    n.stop().await?;
    assert_eq!(committed_offset(&group, &topic, last.0)?, Some(last.1 + 1));
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// The events of [`a_slow_server`]: 24 on one partition, every third one
/// (3, 6, …, 24) of customer 7, the others each of its own customer.
const SLOW_EVENTS: i64 = 24;
fn slow_event_user(id: i64) -> i64 {
    if id % 3 == 0 {
        7
    } else {
        100 + id
    }
}

/// Runs [`SLOW_EVENTS`] events already in a one-partition topic through a
/// notifier with `max_in_flight` against a mail server taking 250 ms per
/// email; checks that each is emailed once, customer 7's in event order
/// and one at a time, and that the committed offset ends past them all.
/// Returns the server, for the caller's checks of concurrency.
async fn a_slow_server(max_in_flight: u16) -> anyhow::Result<FakeSmtp> {
    a_slow_server_with(max_in_flight, None).await
}

/// [`a_slow_server`] with `--smtp-connections` set.
async fn a_slow_server_with(
    max_in_flight: u16,
    smtp_connections: Option<u16>,
) -> anyhow::Result<FakeSmtp> {
    let db = TestDb::create().await?;
    let topic = create_topic(1).await?;
    let group = unique_name("g");
    let smtp = FakeSmtp::slow(Duration::from_millis(250)).await?;
    let relay = Relay::new(&topic)?;
    let mut last = (0, 0);
    for id in 1..=SLOW_EVENTS {
        let user = slow_event_user(id);
        let payload = order_payload(id, &format!("u{user}@slow.test"), "CREATED");
        last = relay.send_event(id, user, "OrderCreated", &payload).await?;
    }
    anyhow::ensure!(last.0 == 0, "one partition");
    let mut cfg = config(&db.url, &topic, &group, &Dest::Smtp(smtp.url.clone()));
    cfg.max_in_flight_per_partition = max_in_flight;
    if let Some(c) = smtp_connections {
        cfg.smtp_connections = c;
    }
    let n = Running::start(cfg);
    wait_for("every email accepted", Duration::from_secs(60), || async {
        Ok((smtp.accepted() >= SLOW_EVENTS as usize).then_some(()))
    })
    .await?;
    wait_for("every event handled", Duration::from_secs(10), || async {
        Ok((n.metric("notifier_emails_sent_total").await? == SLOW_EVENTS as f64).then_some(()))
    })
    .await?;
    n.stop().await?;

    let arrivals = smtp.arrivals();
    let mut sorted = arrivals.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (1..=SLOW_EVENTS).collect::<Vec<_>>(), "each once");
    let of_7: Vec<i64> = arrivals
        .iter()
        .copied()
        .filter(|id| slow_event_user(*id) == 7)
        .collect();
    assert_eq!(
        of_7,
        (1..=SLOW_EVENTS)
            .filter(|id| id % 3 == 0)
            .collect::<Vec<_>>(),
        "customer 7's emails in event order (all arrivals: {arrivals:?})"
    );
    let mut spans: Vec<_> = smtp
        .spans
        .lock()
        .unwrap()
        .iter()
        .filter(|(id, _, _)| slow_event_user(*id) == 7)
        .copied()
        .collect();
    spans.sort_by_key(|(_, began, _)| *began);
    for pair in spans.windows(2) {
        assert!(
            pair[1].1 >= pair[0].2,
            "customer 7's event {} began before {} was accepted",
            pair[1].0,
            pair[0].0
        );
    }
    assert_eq!(
        committed_offset(&group, &topic, 0)?,
        Some(last.1 + 1),
        "committed past every record"
    );
    Ok(smtp)
}

/// One partition: emails of different customers are in flight at once,
/// one customer's still go one at a time in event order. (One record at a
/// time, as the notifier handled a partition before, the server never sees
/// two at once.)
#[tokio::test]
async fn one_partition_sends_other_customers_emails_at_once_and_each_customers_in_order(
) -> anyhow::Result<()> {
    let smtp = a_slow_server(16).await?;
    println!("16 in flight: up to {} emails at once", smtp.peak());
    assert!(
        smtp.peak() >= 8,
        "at most {} emails of one partition in progress at once",
        smtp.peak()
    );
    Ok(())
}

/// `--smtp-connections` bounds the emails the server has in progress at
/// once, whatever the handlers (four to a connection by default): 16 in
/// flight on 3 connections, never more than 3 at the server, and each
/// customer's emails still in order (checked by `a_slow_server_with`).
#[tokio::test]
async fn the_smtp_connections_bound_the_emails_at_the_server_at_once() -> anyhow::Result<()> {
    let smtp = a_slow_server_with(16, Some(3)).await?;
    println!("3 connections: up to {} emails at once", smtp.peak());
    assert_eq!(smtp.peak(), 3, "the connections, all used and no more");
    Ok(())
}

#[tokio::test]
async fn with_one_in_flight_a_partition_goes_one_record_at_a_time() -> anyhow::Result<()> {
    let smtp = a_slow_server(1).await?;
    assert_eq!(smtp.peak(), 1);
    assert_eq!(smtp.arrivals(), (1..=SLOW_EVENTS).collect::<Vec<_>>());
    Ok(())
}

/// A record retried after transient refusals holds back the later records
/// of its key and the committed offset, not the records of other keys.
#[tokio::test]
async fn a_retried_record_holds_its_key_and_the_offset_not_other_keys() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let topic = create_topic(1).await?;
    let group = unique_name("g");
    // Six refusals: at least 1.75 s of backoff (100 ms doubling up to 1 s,
    // jittered down to half).
    let smtp = FakeSmtp::with(FakeBehaviour {
        failure: "451 4.3.0 try again later",
        failing_rcpts: 6,
        failing_to: Some("stuck@"),
        delay: Duration::ZERO,
    })
    .await?;
    let relay = Relay::new(&topic)?;
    let stuck = "stuck@retry.test";
    let (_, first) = relay
        .send_event(1, 1, "OrderCreated", &order_payload(1, stuck, "CREATED"))
        .await?;
    relay
        .send_event(
            2,
            1,
            "OrderStatusChanged",
            &status_payload(1, stuck, "CREATED", "PAID"),
        )
        .await?;
    let mut last = (0, 0);
    for id in 3..=10 {
        let payload = order_payload(id, &format!("other{id}@retry.test"), "CREATED");
        last = relay
            .send_event(id, 100 + id, "OrderCreated", &payload)
            .await?;
    }
    let n = Running::start(config(
        &db.url,
        &topic,
        &group,
        &Dest::Smtp(smtp.url.clone()),
    ));

    // While event 1 is refused: the others go out, the committed offset
    // stays at or below it.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        // The offset first: past event 1 only once event 1 was accepted.
        let committed = committed_offset(&group, &topic, 0)?;
        let arrived = smtp.arrivals();
        if !arrived.contains(&1) {
            assert!(
                committed.is_none_or(|c| c <= first),
                "committed offset {committed:?} passed event 1 (offset {first}) before it was sent"
            );
        }
        if arrived.len() == 10 {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "emails accepted: {arrived:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let arrived = smtp.arrivals();
    let position = |id| arrived.iter().position(|a| *a == id).unwrap();
    assert!(
        (3..=10).all(|id| position(id) < position(1)),
        "the other customers' emails went out while event 1 was retried: {arrived:?}"
    );
    assert!(position(1) < position(2), "its key in order: {arrived:?}");
    wait_for(
        "the offset committed past every record",
        Duration::from_secs(15),
        || {
            let (group, topic) = (group.clone(), topic.clone());
            async move {
                Ok((committed_offset(&group, &topic, 0)? == Some(last.1 + 1)).then_some(()))
            }
        },
    )
    .await?;
    n.stop().await
}
