//! loadgen against the real pipeline, all in-process on a fresh test
//! database and topic: order-api (http mode) or direct outbox INSERTs (sql
//! mode) → Postgres → relay → the test broker → loadgen's consumer, and the
//! notifier for the commit → notifier stage.
//!
//! What a load tester checks: every successful request was matched to its
//! record (nothing unmatched, nothing duplicated), every stage counted each
//! of them once, the JSON and PNG outputs are there and well-formed, and the
//! slowest requests the report names by trace id are records on the topic
//! carrying that trace id in their `traceparent` header.

use std::collections::HashSet;
use std::time::Duration;

use crate::common::Pipeline;
use devstack::kafka::{Record, TopicReader};
use devstack::testing::kafka_bootstrap;
use loadgen::config::Mode;
use loadgen::matcher::{key_of, Key, OrderStatus};
use loadgen::report::Report;
use outbox_record::header;
use outbox_record::trace::{self, TraceParent};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// Every record of `topic`, read from the beginning until `at_least`
/// arrived and then 1 s passed with nothing new.
async fn read_topic(topic: &str, at_least: usize) -> anyhow::Result<Vec<Record>> {
    let reader = TopicReader::new(&kafka_bootstrap(), topic, true)?;
    reader
        .read_at_least(at_least, Duration::from_secs(30), Duration::from_secs(1))
        .await
}

/// The trace id of a record's `traceparent` header.
fn trace_id(record: &Record) -> Option<String> {
    let header = record.header(trace::TRACEPARENT)?;
    let tp = TraceParent::parse(header).unwrap_or_else(|e| panic!("{e}: {record:?}"));
    Some(tp.trace_id_hex())
}

/// Every record has a `traceparent` header, and each request a trace of its
/// own: `requests` distinct trace ids.
fn assert_one_trace_per_request(records: &[Record], requests: usize) {
    let traces: HashSet<String> = records
        .iter()
        .map(|r| trace_id(r).unwrap_or_else(|| panic!("no traceparent: {r:?}")))
        .collect();
    assert_eq!(traces.len(), requests);
}

/// The JSON's `slowest`: ranked by `stage`, the 10 slowest (or all) of its
/// requests, slowest first, the first being the stage's max; and each is
/// the request of a record on the topic — its event id, in http mode its
/// order and status — whose `traceparent` header carries the reported trace
/// id.
fn assert_slowest_on_topic(json: &Value, stage: &str, records: &[Record]) {
    let slowest = &json["slowest"];
    assert_eq!(slowest["stage"], stage, "{slowest}");
    let requests = slowest["requests"].as_array().expect("slowest requests");
    let count = json["stages"][stage]["count"].as_u64().expect("count");
    assert_eq!(requests.len() as u64, count.min(10), "{slowest}");
    let ms: Vec<f64> = requests.iter().map(|r| r["ms"].as_f64().unwrap()).collect();
    assert!(ms.windows(2).all(|w| w[0] >= w[1]), "{ms:?}");
    let max = json["stages"][stage]["max_ms"].as_f64().expect("max");
    assert!(
        (max - ms[0]).abs() <= max * 0.002 + 0.002,
        "{} vs max {max}",
        ms[0]
    );
    for r in requests {
        let id = r["trace_id"].as_str().expect("trace id").to_owned();
        assert_eq!(id.len(), 32, "{r}");
        let event = r["event_id"].as_i64().expect("event id").to_string();
        let record = records
            .iter()
            .find(|rec| rec.header(header::EVENT_ID) == Some(event.as_str()))
            .unwrap_or_else(|| panic!("no record for {r}"));
        if let Some(order) = r["order_id"].as_i64() {
            let status = OrderStatus::parse(r["status"].as_str().expect("status"));
            let value = record.value.as_deref().map(str::as_bytes);
            assert_eq!(
                key_of(Mode::Http, None, value),
                Ok(Key::Order(order, status.expect("a status"))),
                "{r}"
            );
        }
        assert_eq!(trace_id(record).as_deref(), Some(id.as_str()), "{r}");
    }
}

/// Every successful request matched, every stage counted it once.
fn assert_all_matched(report: &Report, events_per_request: u64) {
    let r = &report.requests;
    assert!(r.ok > 0, "no request succeeded: {r:?}");
    let k = report.kafka.as_ref().expect("kafka summary");
    assert_eq!(k.unmatched, 0, "{k:?}");
    assert_eq!(k.duplicates, 0, "{k:?}");
    assert_eq!(k.events_expected, r.ok * events_per_request, "{k:?}");
    assert_eq!(k.matched, k.events_expected, "{k:?}");
    assert_eq!(k.records_without_commit_ts, 0, "{k:?}");
    assert_eq!(report.stages["request"].count, r.ok);
    for stage in ["commit_to_kafka", "commit_to_consumed", "end_to_end"] {
        assert_eq!(
            report.stages[stage].count,
            r.ok * events_per_request,
            "{stage}"
        );
    }
    assert!(report.passed(), "{:?}", report.findings);
}

/// The JSON file has the figures of the table, the stages with their
/// distributions and a time series.
fn check_json(path: &std::path::Path, report: &Report) -> Value {
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("json file")).expect("json");
    assert_eq!(json["requests"]["ok"], report.requests.ok);
    assert_eq!(json["kafka"]["unmatched"], 0);
    for stage in [
        "request",
        "commit_to_kafka",
        "commit_to_consumed",
        "end_to_end",
    ] {
        let s = &json["stages"][stage];
        for field in ["count", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms"] {
            assert!(s[field].is_number(), "{stage}.{field}: {s}");
        }
        let dist = s["distribution"].as_array().expect("distribution");
        assert!(dist.len() >= 3, "{stage}: {dist:?}");
        assert_eq!(dist.last().expect("max")["percentile"], 100.0);
    }
    let series = json["time_series"].as_array().expect("time series");
    assert!(series.len() >= 2, "{series:?}");
    let sent: u64 = series.iter().map(|b| b["sent"].as_u64().unwrap_or(0)).sum();
    assert_eq!(sent, report.requests.sent + report.requests.warmup.sent);
    assert!(series
        .iter()
        .any(|b| b["stages"]["commit_to_consumed"]["p99_ms"].is_number()));
    json
}

fn check_png(path: &std::path::Path) {
    let bytes = std::fs::read(path).expect("png file");
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "not a PNG: {:?}",
        &bytes[..bytes.len().min(8)]
    );
    assert!(bytes.len() > 10_000, "suspiciously small plot");
}

#[tokio::test]
async fn http_mode_matches_every_order_event() -> anyhow::Result<()> {
    let p = Pipeline::start(false).await?;
    let out = crate::common::out_dir();
    let mut cfg = p.loadgen(Mode::Http, 50.0, Duration::from_secs(3));
    cfg.status_change_ratio = 0.5;
    cfg.warmup = Duration::from_secs(1);
    cfg.json = Some(out.join("report.json"));
    cfg.png = Some(out.join("report.png"));
    let report = loadgen::run(cfg.clone(), CancellationToken::new()).await?;
    println!("{report}");

    assert_eq!(report.requests.errors, 0, "{:?}", report.requests);
    assert_eq!(report.requests.sent, 150);
    assert_eq!(report.requests.warmup.sent, 50);
    // Warm-up requests are matched too but stay out of the histograms.
    let k = report.kafka.as_ref().expect("kafka");
    assert_eq!(k.matched, k.events_expected);
    assert_eq!(
        k.events_expected,
        report.requests.ok + report.requests.warmup.ok
    );
    assert_all_matched_measured(&report);
    // Status changes happened, and each is an event of its own.
    let db = p.db.connect().await?;
    let changes: i64 = db
        .query_one(
            "SELECT count(*) FROM outbox WHERE event_type = 'OrderStatusChanged'",
            &[],
        )
        .await?
        .get(0);
    assert!(changes > 10, "only {changes} status changes");
    let events: i64 = db
        .query_one("SELECT count(*) FROM outbox", &[])
        .await?
        .get(0);
    assert_eq!(events as u64, k.events_expected);

    let json = check_json(&out.join("report.json"), &report);
    assert_eq!(json["mode"], "http");
    assert_eq!(json["time_series"][0]["phase"], "warmup");
    // order-api continued each request's trace into its outbox row, the
    // relay put it on the record: the slowest requests are found by it.
    let records = read_topic(&p.topic, k.events_expected as usize).await?;
    assert_eq!(records.len() as u64, k.events_expected);
    assert_one_trace_per_request(&records, k.events_expected as usize);
    assert_slowest_on_topic(&json, "end_to_end", &records);
    check_png(&out.join("report.png"));
    assert!(
        report.output_errors.is_empty(),
        "{:?}",
        report.output_errors
    );
    println!("plot: {}", out.join("report.png").display());
    p.stop().await
}

/// [`assert_all_matched`] for a run with a warm-up: the stage histograms
/// hold the measured requests only.
fn assert_all_matched_measured(report: &Report) {
    let r = &report.requests;
    let k = report.kafka.as_ref().expect("kafka");
    assert_eq!(k.unmatched, 0, "{k:?}");
    assert_eq!(k.duplicates, 0, "{k:?}");
    assert_eq!(report.stages["request"].count, r.ok);
    for stage in ["commit_to_kafka", "commit_to_consumed", "end_to_end"] {
        assert_eq!(report.stages[stage].count, r.ok, "{stage}");
    }
    assert!(report.passed(), "{:?}", report.findings);
}

#[tokio::test]
async fn sql_mode_matches_every_outbox_row_by_event_id() -> anyhow::Result<()> {
    let p = Pipeline::start(false).await?;
    let out = crate::common::out_dir();
    let mut cfg = p.loadgen(Mode::Sql, 100.0, Duration::from_secs(2));
    cfg.sql_connections = 4;
    cfg.json = Some(out.join("sql.json"));
    let report = loadgen::run(cfg.clone(), CancellationToken::new()).await?;
    println!("{report}");
    assert_eq!(
        (
            report.requests.sent,
            report.requests.ok,
            report.requests.errors
        ),
        (200, 200, 0)
    );
    assert_all_matched(&report, 1);
    let json = check_json(&out.join("sql.json"), &report);
    let db = p.db.connect().await?;
    let rows: i64 = db
        .query_one(
            "SELECT count(*) FROM outbox WHERE event_type = 'LoadgenEvent'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(rows, 200);
    // Each row has a trace of its own, which the relay put on its record;
    // the slowest requests are named by it.
    let records = read_topic(&p.topic, 200).await?;
    assert_eq!(records.len(), 200);
    assert_one_trace_per_request(&records, 200);
    assert_slowest_on_topic(&json, "end_to_end", &records);

    // Several rows per transaction: one request, several records, each
    // matched by its own event id.
    cfg.rows_per_txn = 3;
    cfg.rate = 30.0;
    cfg.duration = Duration::from_secs(1);
    cfg.json = None;
    let report = loadgen::run(cfg, CancellationToken::new()).await?;
    println!("{report}");
    assert_eq!(report.requests.ok, 30);
    assert_all_matched(&report, 3);
    // One trace per transaction: its three records carry it, and the
    // request is named once, however many of its records were slow.
    let records = read_topic(&p.topic, 290).await?;
    assert_eq!(records.len(), 290);
    let slowest = report.slowest.as_ref().expect("slowest");
    assert_eq!(slowest.requests.len(), 10);
    let mut named = HashSet::new();
    for s in &slowest.requests {
        let id = s.trace_id.clone().expect("trace id");
        assert!(named.insert(id.clone()), "{id} named twice");
        let carrying: Vec<_> = records
            .iter()
            .filter(|r| trace_id(r).as_deref() == Some(id.as_str()))
            .collect();
        assert_eq!(carrying.len(), 3, "{s:?}");
        let event = s.event_id.expect("event id").to_string();
        assert!(carrying
            .iter()
            .any(|r| r.header(header::EVENT_ID) == Some(event.as_str())));
    }
    p.stop().await
}

/// An outbox without the trace context columns (a schema before V5) still
/// takes sql mode's rows: no traceparent on them, none in the report.
#[tokio::test]
async fn sql_mode_works_on_an_outbox_without_a_traceparent_column() -> anyhow::Result<()> {
    let p = Pipeline::start_with(
        false,
        "ALTER TABLE outbox DROP COLUMN IF EXISTS traceparent, DROP COLUMN IF EXISTS tracestate",
    )
    .await?;
    let cfg = p.loadgen(Mode::Sql, 50.0, Duration::from_secs(1));
    let report = loadgen::run(cfg, CancellationToken::new()).await?;
    println!("{report}");
    assert_eq!(report.requests.ok, 50);
    assert_all_matched(&report, 1);
    let records = read_topic(&p.topic, 50).await?;
    assert_eq!(records.len(), 50);
    assert!(records
        .iter()
        .all(|r| r.header(trace::TRACEPARENT).is_none()));
    let slowest = report.slowest.as_ref().expect("slowest");
    assert_eq!(slowest.stage, "end_to_end");
    assert_eq!(slowest.requests.len(), 10);
    assert!(slowest
        .requests
        .iter()
        .all(|s| s.trace_id.is_none() && s.event_id.is_some()));
    p.stop().await
}

#[tokio::test]
async fn notifier_stage_reads_notifier_inbox() -> anyhow::Result<()> {
    let p = Pipeline::start(true).await?;
    let mut cfg = p.loadgen(Mode::Http, 20.0, Duration::from_secs(2));
    cfg.status_change_ratio = 0.3;
    cfg.notifier_inbox = true;
    let report = loadgen::run(cfg, CancellationToken::new()).await?;
    println!("{report}");
    assert_all_matched(&report, 1);
    let n = report.notifier.as_ref().expect("notifier summary");
    assert_eq!(n.expected, report.requests.ok);
    assert_eq!(n.missing, 0, "{n:?}");
    let stage = &report.stages["commit_to_notifier"];
    assert_eq!(stage.count, report.requests.ok);
    // The slowest are ranked by the most downstream stage.
    let slowest = report.slowest.as_ref().expect("slowest");
    assert_eq!(slowest.stage, "commit_to_notifier");
    assert_eq!(slowest.requests.len(), 10);
    assert!((stage.max_ms - slowest.requests[0].ms).abs() <= stage.max_ms * 0.002 + 0.002);
    // The notifier handled each event after its commit and, on this
    // machine, within seconds.
    assert!(stage.max_ms < 60_000.0, "{stage:?}");
    // The emails exist (what the notifier's user sees).
    let mails = std::fs::read_dir(&p.mail_dir)?
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "eml"))
        })
        .count() as u64;
    assert_eq!(mails, report.requests.ok);
    p.stop().await
}
