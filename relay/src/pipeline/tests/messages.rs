//! Events written as logical decoding messages through the apply loop:
//! mixed with rows in statement order, refused when non-transactional
//! unless allowed, and dead-lettered when malformed, never confirmed
//! before Kafka has them.

use super::*;

fn content(id: u64, user: &str) -> String {
    format!(
        r#"{{"id":{id},"aggregate_type":"order","aggregate_id":"{id}","user_id":"{user}","event_type":"OrderPaid","payload":{{"n":{id}}}}}"#
    )
}

fn start() -> Vec<ReplicationMessage> {
    vec![xlog(outbox_relation(), 0)]
}

#[tokio::test(start_paused = true)]
async fn rows_and_messages_of_a_transaction_go_out_in_statement_order() {
    let mut script = start();
    // 30 transactions, each: row, message, row, message.
    for t in 0..30u64 {
        let c = 0x1000 * (t + 1);
        let id = t * 4;
        script.push(begin(c));
        script.push(insert(c, id + 1, "a", None));
        script.push(event_message(true, c - 0x200, &content(id + 2, "b")));
        script.push(insert(c, id + 3, "c", None));
        script.push(event_message(true, c - 0x100, &content(id + 4, "a")));
        script.push(commit(c, c + 0x28));
    }
    let last = 0x1000 * 30 + 0x28;
    let (log, mut sink) = MemorySink::with_log();
    sink.capacity = 3;
    let run = run_loop(script, last, &mut sink, orders(), &[]).await;
    run.result.expect("the loop ends cleanly");
    let log = log.lock().unwrap();
    assert_eq!(ids(&log.visible), (1..=120).collect::<Vec<_>>());
    for (i, r) in log.visible.iter().enumerate() {
        assert_eq!(header(r, header::SEQ), (i % 4).to_string());
        assert_eq!(
            header(r, header::LSN),
            Lsn(0x1000 * (i as u64 / 4 + 1)).to_string()
        );
        assert_eq!(header(r, header::EVENT_ID), (i + 1).to_string());
    }
    assert_eq!(confirmed(&run.statuses), Lsn(last));
    assert_eq!(run.shared.metrics.transactions.get(), 30);
}

#[tokio::test(start_paused = true)]
async fn a_non_transactional_message_is_refused_and_counted_unless_allowed() {
    let messages = || {
        let mut script = start();
        script.extend(txns(1, 2).iter().flat_map(|t| t.messages(false)));
        script.push(event_message(false, 0x1800, &content(50, "b")));
        let t = Txn {
            commit_lsn: 0x2000,
            rows: vec![Row(3, "c", None)],
        };
        script.extend(t.messages(false));
        (script, t.end_lsn())
    };

    let (script, last) = messages();
    let (log, mut sink) = MemorySink::with_log();
    let run = run_loop(script, last, &mut sink, orders(), &[]).await;
    run.result.expect("a refusal does not stop the relay");
    assert_eq!(ids(&log.lock().unwrap().visible), [1, 2, 3]);
    assert_eq!(confirmed(&run.statuses), Lsn(last));
    let refused = run.shared.metrics.encode();
    assert!(
        refused.contains("relay_messages_refused_total{reason=\"non_transactional\"} 1"),
        "{refused}"
    );

    // Allowed: a transaction of its own at the message's position.
    let (script, last) = messages();
    let (log, mut sink) = MemorySink::with_log();
    let run = run_loop(
        script,
        last,
        &mut sink,
        orders(),
        &["--allow-non-transactional-messages"],
    )
    .await;
    run.result.expect("the loop ends cleanly");
    let log = log.lock().unwrap();
    assert_eq!(ids(&log.visible), [1, 2, 50, 3]);
    let m = &log.visible[2];
    assert_eq!(header(m, header::LSN), Lsn(0x1800).to_string());
    assert_eq!(header(m, header::SEQ), "0");
    assert_eq!(run.shared.metrics.transactions.get(), 3);
    assert_eq!(confirmed(&run.statuses), Lsn(last));
}

#[tokio::test(start_paused = true)]
async fn a_malformed_message_goes_to_the_dead_letter_topic_and_the_stream_goes_on() {
    let broken = r#"{"user_id":"b","event_type":"OrderPaid"}"#;
    let script = || {
        let mut script = start();
        script.extend(txns(1, 1).iter().flat_map(|t| t.messages(false)));
        script.push(begin(0x2000));
        script.push(event_message(true, 0x1f00, broken));
        script.push(insert(0x2000, 2, "c", None));
        script.push(commit(0x2000, 0x2028));
        script
    };

    let (log, mut sink) = MemorySink::with_log();
    let run = run_loop(script(), 0x2028, &mut sink, orders(), &[]).await;
    run.result
        .expect("a malformed message does not stop the relay");
    {
        let log = log.lock().unwrap();
        assert_eq!(log.prepared, ["orders.relay-dlq"]);
        let topics: Vec<&str> = log.visible.iter().map(|r| r.topic.as_str()).collect();
        assert_eq!(topics, ["orders", "orders.relay-dlq", "orders"]);
        let dl = &log.visible[1];
        assert_eq!(dl.value, broken.as_bytes(), "the message as it was written");
        assert!(header(dl, header::dlq::REASON).contains("aggregate_type"));
        assert_eq!(header(dl, header::SEQ), "0");
        assert_eq!(header(dl, header::EVENT_ID), 0x1f00.to_string());
        assert_eq!(header(&log.visible[2], header::SEQ), "1");
    }
    assert_eq!(confirmed(&run.statuses), Lsn(0x2028));
    assert_eq!(run.shared.metrics.dead_lettered.get(), 1);
    assert!(run
        .shared
        .metrics
        .encode()
        .contains("relay_messages_refused_total{reason=\"malformed\"} 1"));

    // The dead letter itself not delivered: nothing past the transaction
    // before it is confirmed.
    let (log, mut sink) = MemorySink::with_log();
    sink.fail_at = Some(1);
    let run = run_loop(script(), 0x2028, &mut sink, orders(), &[]).await;
    run.result
        .expect_err("the failed delivery ends the session");
    assert_eq!(ids(&log.lock().unwrap().visible), [1]);
    assert!(confirmed(&run.statuses) <= Lsn(0x1028));
}
