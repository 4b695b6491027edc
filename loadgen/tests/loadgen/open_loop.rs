//! Open-loop behaviour against a fake order-api: a stalled server cannot
//! hide its latency (no coordinated omission) and the report names the
//! stalled requests by the trace ids they sent, the concurrency cap delays
//! starts but not the clock, errors are counted and never stop a run, and
//! Ctrl-C still yields a report.
//!
//! Bounds are generous: these run on a busy 2-core machine. They assert
//! counts and orders of magnitude (a 1 s stall must show as ~1 s, not as
//! milliseconds), never tight timings.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::common::{loadgen_config, Behaviour, FakeApi};
use loadgen::config::Mode;
use outbox_record::trace::TraceParent;
use tokio_util::sync::CancellationToken;

const STALL: Behaviour = Behaviour::Stall {
    from: Duration::from_secs(1),
    len: Duration::from_secs(1),
};

#[tokio::test]
async fn a_stalled_server_cannot_hide_its_latency() -> anyhow::Result<()> {
    crate::common::init_tracing();
    let api = FakeApi::start(STALL).await;
    let mut cfg = loadgen_config(Mode::Http, &api.url, 100.0, Duration::from_secs(3));
    cfg.max_in_flight = 1000;
    let png = crate::common::out_dir().join("stall.png");
    cfg.png = Some(png.clone());
    let report = loadgen::run(cfg, CancellationToken::new()).await?;
    println!("{report}\nplot: {}", png.display());
    assert!(
        report.output_errors.is_empty(),
        "{:?}",
        report.output_errors
    );
    assert!(std::fs::read(&png)?.starts_with(b"\x89PNG"));

    // Nothing dropped: every scheduled request was sent, also during the
    // stall (open loop: arrivals do not wait for answers).
    let r = &report.requests;
    assert_eq!(r.scheduled, 300);
    assert_eq!((r.sent, r.ok, r.errors), (300, 300, 0), "{r:?}");
    assert_eq!(api.requests(), 300);
    assert!(
        api.stalled() >= 50,
        "only {} requests reached the server during the 1 s stall",
        api.stalled()
    );
    // A third of the requests met the stall: the tail shows it.
    let req = &report.stages["request"];
    assert_eq!(req.count, 300);
    assert!(
        req.p99_ms >= 700.0,
        "p99 {} ms hides a 1 s stall",
        req.p99_ms
    );
    assert!(req.p90_ms >= 300.0, "p90 {} ms", req.p90_ms);
    assert!(req.p50_ms < 300.0, "p50 {} ms", req.p50_ms);
    assert!(req.max_ms < 10_000.0, "max {} ms", req.max_ms);

    // Every request carried a trace of its own.
    let seen = api.traceparents();
    assert_eq!(seen.len(), 300);
    let mut traces = HashSet::new();
    let mut stalled = HashSet::new();
    for (header, in_stall) in &seen {
        let header = header.as_deref().expect("a traceparent header");
        let tp = TraceParent::parse(header).expect("a valid traceparent");
        assert!(tp.is_sampled(), "{header}");
        assert!(traces.insert(tp.trace_id_hex()), "trace id sent twice");
        if *in_stall {
            stalled.insert(tp.trace_id_hex());
        }
    }
    // Without Kafka the slowest are ranked by the request stage: they are
    // requests the server held in the stall, named by the trace ids the
    // server saw, slowest first, the first one the stage's max.
    let slowest = report.slowest.as_ref().expect("slowest requests");
    assert_eq!(slowest.stage, "request");
    assert_eq!(slowest.requests.len(), 10);
    for s in &slowest.requests {
        let id = s.trace_id.as_deref().expect("trace id");
        assert!(stalled.contains(id), "{s:?} was not held in the stall");
        assert!(s.ms >= 500.0, "{s:?}");
        assert_eq!(s.ms, s.request_ms);
        assert!(s.order_id.is_some(), "{s:?}");
    }
    assert!(slowest.requests.windows(2).all(|w| w[0].ms >= w[1].ms));
    let first = slowest.requests[0].ms;
    assert!(
        (req.max_ms - first).abs() <= req.max_ms * 0.002 + 0.002,
        "slowest {first} ms, max {} ms",
        req.max_ms
    );
    Ok(())
}

#[tokio::test]
async fn under_the_cap_a_late_start_still_counts_from_its_intended_time() -> anyhow::Result<()> {
    crate::common::init_tracing();
    let api = FakeApi::start(STALL).await;
    let mut cfg = loadgen_config(Mode::Http, &api.url, 100.0, Duration::from_secs(3));
    cfg.max_in_flight = 2;
    let report = loadgen::run(cfg, CancellationToken::new()).await?;
    println!("{report}");

    let r = &report.requests;
    assert_eq!((r.sent, r.ok, r.errors), (300, 300, 0), "{r:?}");
    // Only the two requests holding the slots reached the stalled server;
    // the ~100 due meanwhile waited for a slot and started late.
    assert!(
        api.stalled() <= 2,
        "{} requests in the stall",
        api.stalled()
    );
    assert!(r.late_starts >= 50, "{} late starts", r.late_starts);
    assert!(
        r.max_start_delay_ms >= 500.0,
        "max start delay {} ms",
        r.max_start_delay_ms
    );
    // Measured from the intended time, the queued requests carry the wait;
    // measured from their actual start they would look fast.
    let req = &report.stages["request"];
    assert_eq!(req.count, 300);
    assert!(
        req.p99_ms >= 700.0,
        "p99 {} ms hides a 1 s stall",
        req.p99_ms
    );
    assert!(req.p90_ms >= 300.0, "p90 {} ms", req.p90_ms);
    Ok(())
}

#[tokio::test]
async fn error_answers_are_counted_by_status() -> anyhow::Result<()> {
    crate::common::init_tracing();
    let api = FakeApi::start(Behaviour::Fail(500)).await;
    let cfg = loadgen_config(Mode::Http, &api.url, 50.0, Duration::from_secs(1));
    let report = loadgen::run(cfg, CancellationToken::new()).await?;
    println!("{report}");
    let r = &report.requests;
    assert_eq!((r.sent, r.ok, r.errors), (50, 0, 50), "{r:?}");
    assert_eq!(r.errors_by_kind.get("http 500"), Some(&50));
    assert!(!report.stages.contains_key("request"));
    Ok(())
}

#[tokio::test]
async fn a_refused_connection_is_an_error_not_a_crash() -> anyhow::Result<()> {
    crate::common::init_tracing();
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let cfg = loadgen_config(Mode::Http, &url, 20.0, Duration::from_secs(1));
    let report = loadgen::run(cfg, CancellationToken::new()).await?;
    println!("{report}");
    let r = &report.requests;
    assert_eq!((r.sent, r.ok, r.errors), (20, 0, 20), "{r:?}");
    assert_eq!(r.errors_by_kind.get("connect"), Some(&20), "{r:?}");
    Ok(())
}

#[tokio::test]
async fn shutdown_stops_the_schedule_and_still_reports() -> anyhow::Result<()> {
    crate::common::init_tracing();
    let api = FakeApi::start(Behaviour::Stall {
        from: Duration::from_secs(3600),
        len: Duration::ZERO,
    })
    .await;
    let cfg = loadgen_config(Mode::Http, &api.url, 50.0, Duration::from_secs(60));
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.cancel();
    });
    let began = Instant::now();
    let report = loadgen::run(cfg, shutdown).await?;
    println!("{report}");
    assert!(began.elapsed() < Duration::from_secs(30));
    assert!(report.stopped_early);
    let r = &report.requests;
    assert!((20..=200).contains(&r.sent), "{r:?}");
    assert_eq!(r.ok, r.sent);
    assert_eq!(r.scheduled, 3000);
    Ok(())
}
