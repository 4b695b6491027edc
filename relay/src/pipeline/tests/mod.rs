//! The apply loop without Postgres or Kafka: hand-made pgoutput messages in
//! through a scripted [`WalSource`], records out into an in-memory [`Sink`]
//! that keeps what it "delivered" in order (`harness`). Each test runs the
//! loop until it confirms the last transaction (or fails), on tokio's
//! paused clock.

use super::*;
use crate::event::TopicRouting;
use outbox_record::header;

mod harness;
mod memory_sink;
mod messages;
use harness::*;
use memory_sink::*;

/// Every row to the one topic the sink starts with.
fn orders() -> TopicRouting {
    TopicRouting::Fixed("orders".into())
}

#[tokio::test(start_paused = true)]
async fn rows_go_out_in_commit_order_and_are_confirmed_after_their_acks() {
    let txns = txns(40, 3);
    let last = txns.last().unwrap().end_lsn();
    let (log, mut sink) = MemorySink::with_log();
    let run = run_loop(script(&txns, true), last, &mut sink, orders(), &[]).await;
    run.result.expect("the loop ends cleanly");
    let log = log.lock().unwrap();
    assert_eq!(ids(&log.visible), (1..=120).collect::<Vec<_>>());
    for (i, r) in log.visible.iter().enumerate() {
        let t = &txns[i / 3];
        assert_eq!(r.topic, "orders");
        assert_eq!(header(r, header::LSN), Lsn(t.commit_lsn).to_string());
        assert_eq!(header(r, header::SEQ), (i % 3).to_string());
        let key = r.key.as_deref().expect("user_id is the key");
        assert_eq!(r.partition, Some(dedupe::partition_for(key.as_bytes(), 3)));
    }
    assert_eq!(confirmed(&run.statuses), Lsn(last));
    assert!(
        run.statuses.windows(2).all(|w| w[0].1 <= w[1].1),
        "the confirmed position never goes back"
    );
    assert_eq!(run.shared.metrics.transactions.get(), 40);
}

#[tokio::test(start_paused = true)]
async fn backpressure_holds_records_without_losing_or_reordering_them() {
    let txns = txns(50, 20);
    let last = txns.last().unwrap().end_lsn();
    let (log, mut sink) = MemorySink::with_log();
    sink.capacity = 1;
    let run = run_loop(script(&txns, false), last, &mut sink, orders(), &[]).await;
    run.result.expect("the loop ends cleanly");
    assert_eq!(
        ids(&log.lock().unwrap().visible),
        (1..=1000).collect::<Vec<_>>()
    );
    assert_eq!(confirmed(&run.statuses), Lsn(last));
}

#[tokio::test(start_paused = true)]
async fn a_replay_skips_exactly_what_each_partition_already_holds() {
    let txns = txns(4, 3);
    let last = txns.last().unwrap().end_lsn();
    let (log, mut sink) = MemorySink::with_log();
    // One partition holding everything up to the second row of the second
    // transaction (a crash after those acks, before confirmation).
    sink.topics.insert(
        "orders".into(),
        MemoryTopic {
            partitions: 1,
            last: vec![Some((Lsn(txns[1].commit_lsn), 1))],
        },
    );
    let run = run_loop(script(&txns, false), last, &mut sink, orders(), &[]).await;
    run.result.expect("the loop ends cleanly");
    assert_eq!(
        ids(&log.lock().unwrap().visible),
        (6..=12).collect::<Vec<_>>()
    );
    assert_eq!(run.shared.metrics.duplicates_skipped.get(), 5);
    assert_eq!(confirmed(&run.statuses), Lsn(last));
}

#[tokio::test(start_paused = true)]
async fn a_failed_delivery_ends_the_session_without_confirming_past_it() {
    let txns = txns(5, 3);
    let (_log, mut sink) = MemorySink::with_log();
    sink.fail_at = Some(7); // the second row of the third transaction
    let run = run_loop(
        script(&txns, false),
        txns.last().unwrap().end_lsn(),
        &mut sink,
        orders(),
        &[],
    )
    .await;
    let err = run.result.expect_err("the failure ends the session");
    assert!(
        matches!(err, RelayError::Delivery(_)) && err.is_transient(),
        "{err:?}"
    );
    assert!(
        confirmed(&run.statuses) <= Lsn(txns[1].end_lsn()),
        "{}",
        confirmed(&run.statuses)
    );
    assert_eq!(run.shared.metrics.produce_errors.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_new_topic_is_readied_while_status_updates_keep_flowing() {
    let mut txns = txns(3, 2);
    // The second transaction's rows go to a topic seen for the first time.
    txns[1].rows[0].2 = Some("refunds");
    txns[1].rows[1].2 = Some("refunds");
    let last = txns.last().unwrap().end_lsn();
    let (log, mut sink) = MemorySink::with_log();
    sink.prepare_takes = Duration::from_secs(15);
    let routing = TopicRouting::ByColumn {
        column: "topic".into(),
        prefix: "shop.".into(),
        fallback: "orders".into(),
    };
    let started = tokio::time::Instant::now();
    let run = run_loop(script(&txns, false), last, &mut sink, routing, &[]).await;
    run.result.expect("the loop ends cleanly");
    let log = log.lock().unwrap();
    assert_eq!(log.prepared, vec!["shop.refunds".to_owned()]);
    let topics: Vec<&str> = log.visible.iter().map(|r| r.topic.as_str()).collect();
    assert_eq!(
        topics,
        [
            "orders",
            "orders",
            "shop.refunds",
            "shop.refunds",
            "orders",
            "orders"
        ]
    );
    assert_eq!(ids(&log.visible), (1..=6).collect::<Vec<_>>());
    assert!(log.visible[2].partition.is_some_and(|p| p < 2));
    // The walsender heard from the relay every --status-interval while the
    // topic was being readied (it would time the relay out otherwise).
    let during = run
        .statuses
        .iter()
        .filter(|(at, _)| *at > started && *at < started + Duration::from_secs(15))
        .count();
    assert!(during >= 13, "{during} status updates in 15 s");
}

#[tokio::test(start_paused = true)]
async fn kafka_transactions_hold_whole_postgres_transactions() {
    let txns = txns(6, 3);
    let last = txns.last().unwrap().end_lsn();
    let (log, mut sink) = MemorySink::with_log();
    sink.transactional = true;
    let run = run_loop(
        script(&txns, false),
        last,
        &mut sink,
        orders(),
        &["--transaction-max-records", "4"],
    )
    .await;
    run.result.expect("the loop ends cleanly");
    let log = log.lock().unwrap();
    assert_eq!(ids(&log.visible), (1..=18).collect::<Vec<_>>());
    // 4 records reached at the end of each second Postgres transaction.
    assert_eq!(log.commits, 3);
    assert_eq!(confirmed(&run.statuses), Lsn(last));
    // Confirmation follows Kafka commits, not acks: the end of a Postgres
    // transaction committed to Kafka together with the next one is never
    // confirmed on its own.
    for t in [&txns[0], &txns[2], &txns[4]] {
        assert!(
            !run.statuses.iter().any(|(_, lsn)| *lsn == Lsn(t.end_lsn())),
            "confirmed {} before its Kafka transaction committed",
            Lsn(t.end_lsn())
        );
    }
}

#[tokio::test(start_paused = true)]
async fn with_kafka_transactions_a_partly_written_transaction_is_read_again() {
    let txns = txns(2, 3);
    let (log, mut sink) = MemorySink::with_log();
    sink.transactional = true;
    sink.topics.insert(
        "orders".into(),
        MemoryTopic {
            partitions: 1,
            last: vec![Some((Lsn(txns[0].commit_lsn), 0))],
        },
    );
    let run = run_loop(
        script(&txns, false),
        txns[1].end_lsn(),
        &mut sink,
        orders(),
        &[],
    )
    .await;
    let err = run.result.expect_err("a partial view ends the session");
    assert!(
        matches!(err, RelayError::PartialTransaction { commit_lsn } if commit_lsn == Lsn(txns[0].commit_lsn)),
        "{err:?}"
    );
    assert!(err.is_transient());
    assert!(log.lock().unwrap().visible.is_empty());
}

#[tokio::test(start_paused = true)]
async fn records_unacknowledged_for_the_stall_timeout_restart_the_session() {
    let txns = txns(5, 2);
    let last = txns.last().unwrap().end_lsn();
    let (log, mut sink) = MemorySink::with_log();
    sink.silent = true;
    let started = tokio::time::Instant::now();
    let run = run_loop(
        script(&txns, false),
        last,
        &mut sink,
        orders(),
        &["--stall-timeout", "5s"],
    )
    .await;
    let err = run.result.expect_err("a stall ends the session");
    assert!(
        matches!(err, RelayError::Stalled { in_flight: 10, .. }) && err.is_transient(),
        "{err:?}"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(5) && waited <= Duration::from_secs(7),
        "{waited:?}"
    );
    assert!(log.lock().unwrap().visible.is_empty());
    assert_eq!(confirmed(&run.statuses), Lsn::ZERO, "nothing confirmed");
    assert!(sink.queue.is_empty(), "the producer's queue was purged");
    assert_eq!(run.shared.metrics.stalls.get(), 1);
    let stall = run
        .shared
        .snapshot()
        .stall
        .expect("/healthz reports the stall");
    assert!(stall.contains("10 records"), "{stall}");
    // The next acknowledgement (of a later session) clears it.
    run.shared.clear_stall();
    assert_eq!(run.shared.snapshot().stall, None);
}

#[tokio::test(start_paused = true)]
async fn slow_acknowledgements_are_no_stall() {
    // An acknowledgement every 700 ms: the session lasts 140 s, over a
    // timeout of 1 s, yet acknowledgements keep coming.
    let txns = txns(200, 1);
    let last = txns.last().unwrap().end_lsn();
    let (log, mut sink) = MemorySink::with_log();
    sink.report_every = Duration::from_millis(700);
    let started = tokio::time::Instant::now();
    let run = run_loop(
        script(&txns, false),
        last,
        &mut sink,
        orders(),
        &["--stall-timeout", "1s"],
    )
    .await;
    run.result.expect("no stall");
    assert!(started.elapsed() >= Duration::from_secs(140));
    assert_eq!(log.lock().unwrap().visible.len(), 200);
    assert_eq!(run.shared.metrics.stalls.get(), 0);
}
