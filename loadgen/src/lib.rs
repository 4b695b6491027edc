//! loadgen: open-loop load for the outbox pipeline, with every Kafka record
//! matched back to the request that caused it.
//!
//! ```text
//!  schedule ──▶ ticker thread (sleep until each intended instant; wait for a slot under --max-in-flight)
//!                 └─▶ spawn: target (http: order-api │ sql: INSERT outbox) ──▶ stats: request stage
//!                                      │ commit                                   ▲
//!                                      ▼                                          │
//!                 Postgres ──▶ relay ──▶ topic ──▶ matcher (consumer) ────────────┤ commit_to_kafka,
//!                                                     │                           │ commit_to_consumed,
//!                                                     └─▶ notifier_inbox query ───┘ end_to_end, commit_to_notifier
//!  after the schedule: wait for in-flight requests, drain missing records (--drain-timeout),
//!  then report (table, --json, --png), naming the slowest requests by trace id
//! ```
//!
//! Latency is measured from each request's *intended* start (see
//! [`schedule`]): a request that had to wait — for a slot under the cap, or
//! behind a stalled server — carries that wait in its latency, so stalls are
//! not hidden (no coordinated omission). Errors and timeouts are counted by
//! kind and never stop the run; Ctrl-C stops the schedule, drains, and
//! still reports.
//!
//! Every request carries a new W3C trace (`traceparent`: the HTTP header,
//! or in sql mode the outbox row's column when the table has one), which
//! reaches the request's records as their `traceparent` header; the report
//! names the slowest requests by their trace ids (see [`slowest`]).
//!
//! Modules: [`config`] (clap), [`schedule`] (arrival times), [`target`]
//! (what a request does), [`matcher`] (the consumer and record ↔ request
//! matching), [`stats`] (histograms, counters, time series), [`slowest`]
//! (the slowest requests and their trace ids), [`report`] (table, JSON),
//! [`plot`] (PNG).

pub mod config;
pub mod matcher;
pub mod plot;
pub mod report;
pub mod schedule;
pub mod slowest;
pub mod stats;
pub mod target;

use std::io::IsTerminal;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use outbox_record::trace::TraceParent;
use rand::SeedableRng;
use rdkafka::consumer::StreamConsumer;
use rdkafka::Message;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError, Mode, Plan};
use crate::matcher::{Arrival, Key, Matched, Matcher, Sent};
use crate::report::{NotifierSummary, Report, RunInfo, ScheduleSummary};
use crate::slowest::{Ranking, Slow};
use crate::stats::{micros, micros_between, Stage, Stats};
use crate::target::{HttpTarget, Request, SqlTarget, Target};

/// Why a run could not start (or a task of it died).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration")]
    Config(#[source] ConfigError),
    #[error("cannot set up the HTTP client")]
    HttpClient(#[source] reqwest::Error),
    #[error("cannot set up sql mode")]
    Sql(#[source] target::SqlSetupError),
    #[error("cannot set up the Kafka consumer")]
    Kafka(#[source] matcher::ConsumerError),
    #[error("cannot connect to the database for --notifier-inbox")]
    Notifier(#[source] pgconn::ConnectError),
    #[error("a loadgen task failed")]
    Task(#[source] tokio::task::JoinError),
}

pub use lifecycle::error_chain;

/// What the request tasks, the consumer and the progress line share.
struct State {
    /// The start of the schedule.
    t0: Instant,
    stats: Stats,
    matcher: Matcher,
    /// The slowest requests per stage, with their trace ids.
    slowest: Ranking,
    /// Per matched record, for the notifier stage (kept only with
    /// --notifier-inbox).
    events: Vec<Awaited>,
    keep_events: bool,
    last_prune: Instant,
}

/// A matched record whose notifier_inbox row is looked for.
#[derive(Clone, Copy, Debug)]
struct Awaited {
    event_id: i64,
    commit_us: i64,
    bucket: usize,
    measured: bool,
    slow: Slow,
}

type Shared = Arc<Mutex<State>>;

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    // Every update under this lock is a few counter and histogram
    // increments that leave the state consistent even if a holder panicked.
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

impl State {
    /// `sent`, about the record `key`, as the slowest requests name it.
    fn slow(&self, sent: &Sent, key: Key, event_id: Option<i64>) -> Slow {
        Slow {
            request: sent.seq,
            trace: sent.trace,
            key,
            event_id,
            intended: sent.intended.saturating_duration_since(self.t0),
            request_us: sent.request_us,
        }
    }

    /// A request and its record met: record the pipeline stages.
    fn on_match(&mut self, m: Matched) {
        let slow = self.slow(&m.sent, m.key, m.arrived.event_id);
        let c = &mut self.stats.counters;
        c.matched += 1;
        let Sent {
            intended,
            bucket,
            measured,
            ..
        } = m.sent;
        let a = m.arrived;
        match a.commit_us {
            Some(commit) => {
                let kafka_end = match a.log_append_ms {
                    Some(ms) => {
                        c.kafka_ts_log_append += 1;
                        ms.saturating_mul(1000)
                    }
                    None => {
                        c.kafka_ts_arrival += 1;
                        a.wall_us
                    }
                };
                self.stats.record(
                    Stage::CommitToKafka,
                    micros_between(commit, kafka_end),
                    bucket,
                    measured,
                    None,
                );
                self.stats.record(
                    Stage::CommitToConsumed,
                    micros_between(commit, a.wall_us),
                    bucket,
                    measured,
                    Some(a.at),
                );
                if let (true, Some(event_id)) = (self.keep_events, a.event_id) {
                    self.events.push(Awaited {
                        event_id,
                        commit_us: commit,
                        bucket,
                        measured,
                        slow,
                    });
                }
            }
            None => c.no_commit_ts += 1,
        }
        let end_to_end = micros(a.at.saturating_duration_since(intended));
        self.stats
            .record(Stage::EndToEnd, end_to_end, bucket, measured, None);
        if measured {
            self.slowest.offer(Stage::EndToEnd, end_to_end, slow);
        }
    }
}

/// Runs the load described by `config` until the schedule ends or
/// `shutdown` is cancelled, then drains and reports. Output files
/// (--json, --png) are written here; a failure to write one is in
/// [`Report::output_errors`], not an `Err`.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<Report, Error> {
    let plan = config.validate().map_err(Error::Config)?;
    if config.png.is_some() && !plot::font_readable(&config.font) {
        tracing::warn!(
            font = %config.font.display(),
            "no font for the PNG: install fonts-dejavu-core or pass --font; the plot will fail"
        );
    }
    let target = Arc::new(connect_target(&config, &plan).await?);
    let consumer = if config.no_kafka {
        None
    } else {
        let (bootstrap, topic, props) = (
            config.kafka_bootstrap_servers.clone(),
            config.topic.clone(),
            lifecycle::kafka_properties(
                config.kafka_properties_file.as_ref(),
                &config.kafka_properties,
            ),
        );
        let consumer =
            tokio::task::spawn_blocking(move || matcher::assign_at_end(&bootstrap, &topic, &props))
                .await
                .map_err(Error::Task)?
                .map_err(Error::Kafka)?;
        Some(consumer)
    };
    let inbox_db = match (&config.notifier_inbox, &config.database_url) {
        (true, Some(url)) => Some(connect_db(url).await.map_err(Error::Notifier)?),
        _ => None,
    };

    // The first arrival a moment ahead, so that starting the tasks below
    // does not make it late.
    let lead = Duration::from_millis(20);
    let t0 = Instant::now() + lead;
    let started_at =
        (chrono::Utc::now() + lead).to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let shared: Shared = Arc::new(Mutex::new(State {
        t0,
        stats: Stats::new(t0, plan.interval),
        matcher: Matcher::default(),
        slowest: Ranking::new(config.slowest),
        events: Vec::new(),
        keep_events: config.notifier_inbox,
        last_prune: t0,
    }));
    let stop_consumer = CancellationToken::new();
    let consumer_task = consumer.map(|c| {
        let names = matcher::HeaderNames {
            event_id: config.event_id_header.clone(),
            commit_time: config.commit_time_header.clone(),
        };
        tokio::spawn(consume(
            c,
            (config.mode, names),
            shared.clone(),
            stop_consumer.clone(),
        ))
    });
    let slots = Arc::new(Semaphore::new(config.max_in_flight));
    let progress = Progress::start(&config, &plan, t0, shared.clone(), slots.clone());
    tracing::info!(
        mode = ?config.mode,
        rate = config.rate,
        requests = plan.profile.count(),
        seconds = plan.profile.total().as_secs_f64(),
        "load started"
    );

    // When Ctrl-C came (requests due before it but never started are
    // reported as not sent).
    let stop_at = Arc::new(std::sync::OnceLock::new());
    let stop_watch = {
        let (stop_at, shutdown) = (stop_at.clone(), shutdown.clone());
        tokio::spawn(async move {
            shutdown.cancelled().await;
            let _ = stop_at.set(Instant::now());
        })
    };
    // The ticker runs on a thread of its own (see `tick`).
    let ticker = Ticker {
        profile: plan.profile.clone(),
        t0,
        target: target.clone(),
        shared: shared.clone(),
        slots: slots.clone(),
        shutdown: shutdown.clone(),
        request_timeout: config.request_timeout,
        kafka: !config.no_kafka,
        runtime: tokio::runtime::Handle::current(),
    };
    let Ticked {
        mut tasks,
        stopped_early,
        started,
        last_measured_start,
    } = tokio::task::spawn_blocking(move || ticker.tick())
        .await
        .map_err(Error::Task)??;
    stop_watch.abort();
    let sending_end = stop_at.get().copied().unwrap_or_else(Instant::now);
    let not_sent = if stopped_early {
        plan.profile
            .count_until(sending_end.saturating_duration_since(t0))
            .saturating_sub(started)
    } else {
        0
    };
    if stopped_early {
        tracing::info!("stopped: waiting for requests in flight, then draining");
    }
    progress.phase("waiting for in-flight requests");
    while let Some(done) = tasks.join_next().await {
        done.map_err(Error::Task)?;
    }

    // Drain: records still on their way.
    let mut unmatched = None;
    if let Some(task) = consumer_task {
        progress.phase("draining records");
        let deadline = Instant::now() + config.drain_timeout;
        while lock(&shared).matcher.missing() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop_consumer.cancel();
        task.await.map_err(Error::Task)?;
        let st = lock(&shared);
        let missing = st.matcher.missing() as u64;
        let sample: Vec<String> = st
            .matcher
            .missing_sample(5)
            .into_iter()
            .map(|k| match k {
                Key::Event(id) => format!("event {id}"),
                Key::Order(id, s) => format!("order {id} {}", s.as_str()),
            })
            .collect();
        if missing > 0 {
            tracing::warn!(missing, sample = ?sample, "records never arrived");
        }
        unmatched = Some((missing, sample));
    }
    let notifier = match inbox_db {
        Some(db) => {
            progress.phase("waiting for the notifier");
            Some(notifier_stage(&db, &shared, config.drain_timeout).await)
        }
        None => None,
    };
    progress.finish();

    let p = &plan.profile;
    let measured_start = t0 + p.warmup;
    let measured_end = if stopped_early {
        sending_end
    } else {
        last_measured_start.map_or(sending_end, |l| l.max(sending_end))
    };
    let info = RunInfo {
        mode: config.mode,
        started_at,
        elapsed: t0.elapsed(),
        stopped_early,
        profile: p.clone(),
        summary: schedule_summary(&config, &plan),
        measured_sending: measured_end.saturating_duration_since(measured_start),
        not_sent,
        kafka: unmatched,
        notifier,
        slowest: lock(&shared).slowest.summary(),
    };
    let mut report = {
        let st = lock(&shared);
        Report::build(&st.stats, info)
    };
    write_outputs(&config, &mut report);
    Ok(report)
}

/// The open-loop driver: starts each request at its intended instant.
struct Ticker {
    profile: schedule::Profile,
    t0: Instant,
    target: Arc<Target>,
    shared: Shared,
    slots: Arc<Semaphore>,
    shutdown: CancellationToken,
    request_timeout: Duration,
    kafka: bool,
    runtime: tokio::runtime::Handle,
}

/// What the ticker leaves behind.
struct Ticked {
    tasks: JoinSet<()>,
    stopped_early: bool,
    started: u64,
    last_measured_start: Option<Instant>,
}

/// Longest uninterrupted sleep of the ticker: how soon it notices Ctrl-C.
const TICKER_POLL: Duration = Duration::from_millis(20);

impl Ticker {
    /// Runs the schedule on the calling (blocking) thread. It sleeps with
    /// the OS timer (`std::thread::sleep`, precise to about 0.1 ms) rather
    /// than tokio's, whose 1 ms wheel rounds every deadline up: with it
    /// most requests started 1–3 ms after their intended instant. It never
    /// sleeps past a due time; a request due while --max-in-flight requests
    /// are out waits for a slot (its clock running), and the requests due
    /// behind it start as soon as slots free up, in order, without sleeping.
    fn tick(self) -> Result<Ticked, Error> {
        let mut rng = rand::rngs::StdRng::from_rng(&mut rand::rng());
        let mut tasks = JoinSet::new();
        let mut stopped_early = false;
        let mut started = 0u64;
        let mut last_measured_start = None;
        for arrival in self.profile.arrivals() {
            let intended = self.t0 + arrival.offset;
            if !self.sleep_until(intended) {
                stopped_early = true;
                break;
            }
            let permit = match self.slots.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    let wait = async {
                        tokio::select! {
                            biased;
                            _ = self.shutdown.cancelled() => None,
                            // The semaphore is never closed.
                            p = self.slots.clone().acquire_owned() => p.ok(),
                        }
                    };
                    match self.runtime.block_on(wait) {
                        Some(p) => p,
                        None => {
                            stopped_early = true;
                            break;
                        }
                    }
                }
            };
            let now = Instant::now();
            let measured = arrival.phase.measured();
            let request = self.target.next_request(arrival.index, &mut rng);
            let trace = self.target.traced().then(TraceParent::root);
            let sent = {
                let mut st = lock(&self.shared);
                let bucket = st.stats.bucket_of(arrival.offset);
                st.stats.started(
                    bucket,
                    measured,
                    now.saturating_duration_since(intended),
                    now,
                );
                Sent {
                    seq: arrival.index,
                    intended,
                    bucket,
                    measured,
                    trace,
                    request_us: 0,
                }
            };
            started += 1;
            if measured {
                last_measured_start = Some(now);
            }
            tasks.spawn_on(
                send_one(
                    self.target.clone(),
                    request,
                    sent,
                    self.shared.clone(),
                    self.request_timeout,
                    self.kafka,
                    permit,
                ),
                &self.runtime,
            );
            while let Some(done) = tasks.try_join_next() {
                done.map_err(Error::Task)?;
            }
        }
        // The schedule's last interval runs to its end.
        if !stopped_early && !self.sleep_until(self.t0 + self.profile.total()) {
            stopped_early = true;
        }
        Ok(Ticked {
            tasks,
            stopped_early,
            started,
            last_measured_start,
        })
    }

    /// Sleeps until `deadline`; false if shutdown came first.
    fn sleep_until(&self, deadline: Instant) -> bool {
        loop {
            if self.shutdown.is_cancelled() {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return true;
            }
            std::thread::sleep((deadline - now).min(TICKER_POLL));
        }
    }
}

/// Writes --png and --json; failures go into `report.output_errors`.
fn write_outputs(config: &Config, report: &mut Report) {
    if let Some(path) = &config.png {
        if let Err(e) = plot::render(report, path, &config.font) {
            let msg = error_chain(&e);
            tracing::error!(error = %msg, "PNG not written");
            report.output_errors.push(msg);
        }
    }
    if let Some(path) = &config.json {
        if let Err(e) = std::fs::write(path, report.to_json()) {
            let msg = format!("cannot write {}: {e}", path.display());
            tracing::error!(error = %msg, "JSON not written");
            report.output_errors.push(msg);
        }
    }
}

async fn connect_target(config: &Config, plan: &Plan) -> Result<Target, Error> {
    match config.mode {
        Mode::Http => HttpTarget::new(
            plan.order_api_url.clone(),
            config.status_change_ratio,
            config.users,
            config.max_in_flight,
            config.request_timeout,
        )
        .map(Target::Http)
        .map_err(Error::HttpClient),
        Mode::Sql => {
            // validate() checked that sql mode has a URL.
            let url = config.database_url.as_deref().unwrap_or_default();
            SqlTarget::connect(
                url,
                config.sql_connections,
                config.rows_per_txn,
                config.users,
            )
            .await
            .map(Target::Sql)
            .map_err(Error::Sql)
        }
    }
}

async fn connect_db(url: &str) -> Result<tokio_postgres::Client, pgconn::ConnectError> {
    let params = pgconn::ConnectParams::from_url(url)?.or_application_name("loadgen");
    pgconn::connect(&params).await
}

/// One request: send, time it from its intended start, register the
/// records it will produce.
async fn send_one(
    target: Arc<Target>,
    request: Request,
    sent: Sent,
    shared: Shared,
    timeout: Duration,
    kafka: bool,
    _slot: tokio::sync::OwnedSemaphorePermit,
) {
    let result = tokio::time::timeout(timeout, target.send(&request, sent.trace.as_ref())).await;
    let done = Instant::now();
    let latency = micros(done.saturating_duration_since(sent.intended));
    let sent = Sent {
        request_us: latency,
        ..sent
    };
    let mut st = lock(&shared);
    match result {
        Ok(Ok(keys)) => {
            st.stats
                .succeeded(sent.bucket, sent.measured, latency, done);
            if let (true, Some(key)) = (sent.measured, keys.first()) {
                let slow = st.slow(&sent, *key, None);
                st.slowest.offer(Stage::Request, latency, slow);
            }
            st.stats.counters.events_expected += keys.len() as u64;
            if kafka {
                for key in keys {
                    if let Some(m) = st.matcher.expect(key, sent) {
                        st.on_match(m);
                    }
                }
            }
        }
        Ok(Err(e)) => st.stats.failed(sent.bucket, sent.measured, e.kind()),
        Err(_) => st
            .stats
            .failed(sent.bucket, sent.measured, "timeout".to_owned()),
    }
}

/// The consumer loop: every record is decoded and offered to the matcher.
async fn consume(
    consumer: StreamConsumer,
    (mode, names): (Mode, matcher::HeaderNames),
    shared: Shared,
    stop: CancellationToken,
) {
    let mut last_error: Option<Instant> = None;
    loop {
        let msg = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            m = consumer.recv() => m,
        };
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                // Transient broker errors: librdkafka reconnects by itself.
                if last_error.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                    tracing::warn!(error = %e, "kafka consumer error");
                    last_error = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let arrived = matcher::arrived_of(&msg, &names);
        let key = matcher::key_of(mode, arrived.event_id, msg.payload());
        let mut st = lock(&shared);
        st.stats.counters.records_read += 1;
        if let Ok(key) = key {
            match st.matcher.arrived(key, arrived) {
                Arrival::Matched(m) => st.on_match(m),
                Arrival::Duplicate => st.stats.counters.duplicates += 1,
                Arrival::Unknown => {}
            }
        }
        if arrived.at.duration_since(st.last_prune) > Duration::from_secs(10) {
            st.last_prune = arrived.at;
            if let Some(cutoff) = arrived.at.checked_sub(matcher::EARLY_TTL) {
                st.matcher.prune(cutoff);
            }
        }
    }
}

/// commit → notifier: waits (up to `timeout`) for every matched event to
/// have its `notifier_inbox` row, and records `handled_at − commit_ts`.
/// `handled_at` is `now()` of the notifier's transaction: when it *began*
/// handling the record, before the email went out.
async fn notifier_stage(
    db: &tokio_postgres::Client,
    shared: &Shared,
    timeout: Duration,
) -> NotifierSummary {
    let mut waiting: std::collections::HashMap<i64, Awaited> = lock(shared)
        .events
        .iter()
        .map(|e| (e.event_id, *e))
        .collect();
    let expected = waiting.len() as u64;
    let deadline = Instant::now() + timeout;
    loop {
        let ids: Vec<i64> = waiting.keys().copied().collect();
        match db
            .query(
                "SELECT event_id, handled_at FROM notifier_inbox WHERE event_id = ANY($1)",
                &[&ids],
            )
            .await
        {
            Ok(rows) => {
                let mut st = lock(shared);
                for row in rows {
                    let id: i64 = row.get(0);
                    let handled: chrono::DateTime<chrono::Utc> = row.get(1);
                    if let Some(e) = waiting.remove(&id) {
                        let us = micros_between(e.commit_us, handled.timestamp_micros());
                        st.stats
                            .record(Stage::CommitToNotifier, us, e.bucket, e.measured, None);
                        if e.measured {
                            st.slowest.offer(Stage::CommitToNotifier, us, e.slow);
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %error_chain(&e), "cannot read notifier_inbox"),
        }
        if waiting.is_empty() || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let missing = waiting.len() as u64;
    NotifierSummary {
        expected,
        handled: expected - missing,
        missing,
        note: report::NOTIFIER_NOTE,
    }
}

fn schedule_summary(config: &Config, plan: &Plan) -> ScheduleSummary {
    let p = &plan.profile;
    let target = match config.mode {
        Mode::Http => {
            let mut url = plan.order_api_url.clone();
            // Credentials in the URL stay out of the report.
            let _ = url.set_password(None);
            url.to_string()
        }
        Mode::Sql => redact(config.database_url.as_deref().unwrap_or_default()),
    };
    ScheduleSummary {
        target,
        topic: (!config.no_kafka).then(|| config.topic.clone()),
        rate: p.rate,
        warmup_s: p.warmup.as_secs_f64(),
        warmup_rate: p.warmup_rate,
        ramp_s: p.ramp.as_secs_f64(),
        ramp_from: p.ramp_from,
        duration_s: p.duration.as_secs_f64(),
        max_in_flight: config.max_in_flight,
        request_timeout_s: config.request_timeout.as_secs_f64(),
        interval_s: plan.interval.as_secs_f64(),
        status_change_ratio: (config.mode == Mode::Http).then_some(config.status_change_ratio),
        rows_per_txn: (config.mode == Mode::Sql).then_some(config.rows_per_txn),
    }
}

/// A database URL without its password: `postgres://user@host:port/db`.
fn redact(url: &str) -> String {
    match url.parse::<tokio_postgres::Config>() {
        Ok(cfg) => {
            let host = match cfg.get_hosts().first() {
                Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
                #[cfg(unix)]
                Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
                None => String::new(),
            };
            let port = cfg.get_ports().first().copied().unwrap_or(5432);
            format!(
                "postgres://{}@{host}:{port}/{}",
                cfg.get_user().unwrap_or(""),
                cfg.get_dbname().unwrap_or("")
            )
        }
        Err(_) => "postgres://<unparseable url>".to_owned(),
    }
}

/// The live progress line (stderr, when it is a terminal), or a log line
/// every 5 s otherwise.
struct Progress {
    bar: ProgressBar,
    task: Option<tokio::task::JoinHandle<()>>,
    phase: Arc<Mutex<Option<&'static str>>>,
}

impl Progress {
    fn start(
        config: &Config,
        plan: &Plan,
        t0: Instant,
        shared: Shared,
        slots: Arc<Semaphore>,
    ) -> Progress {
        let total = plan.profile.total();
        let tty = std::io::stderr().is_terminal();
        let bar = if config.quiet || !tty {
            ProgressBar::hidden()
        } else {
            let bar = ProgressBar::with_draw_target(
                Some(total.as_millis() as u64),
                ProgressDrawTarget::stderr_with_hz(4),
            );
            if let Ok(style) = ProgressStyle::with_template("{bar:20.cyan/blue} {msg}") {
                bar.set_style(style.progress_chars("=> "));
            }
            bar
        };
        let phase: Arc<Mutex<Option<&'static str>>> = Arc::new(Mutex::new(None));
        let log_lines = !config.quiet && !tty;
        let max = config.max_in_flight;
        let kafka = !config.no_kafka;
        let task = (!config.quiet).then(|| {
            let (bar, phase) = (bar.clone(), phase.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(250));
                let mut last_log = Instant::now();
                loop {
                    tick.tick().await;
                    let now = Instant::now();
                    let elapsed = now.saturating_duration_since(t0);
                    let (live, c) = {
                        let mut st = lock(&shared);
                        (st.stats.live(now), st.stats.counters.clone())
                    };
                    let in_flight = max.saturating_sub(slots.available_permits());
                    let p99 = |v: Option<u64>| {
                        v.map_or("-".to_owned(), |us| format!("{:.2}ms", us as f64 / 1000.0))
                    };
                    let current = *phase.lock().unwrap_or_else(|p| p.into_inner());
                    let mut msg = format!(
                        "{:.1}s/{:.1}s{} | {}/s | ok {} err {} | in-flight {} | p99 request {}",
                        elapsed.as_secs_f64(),
                        total.as_secs_f64(),
                        current.map(|p| format!(" ({p})")).unwrap_or_default(),
                        live.rate_last_second,
                        c.ok + c.warmup_ok,
                        c.errors + c.warmup_errors,
                        in_flight,
                        p99(live.request_p99),
                    );
                    if kafka {
                        msg.push_str(&format!(
                            " consumed {} | matched {}",
                            p99(live.consumed_p99),
                            c.matched
                        ));
                    }
                    bar.set_position(elapsed.min(total).as_millis() as u64);
                    bar.set_message(msg.clone());
                    if log_lines && now.duration_since(last_log) >= Duration::from_secs(5) {
                        last_log = now;
                        tracing::info!("{msg}");
                    }
                }
            })
        });
        Progress { bar, task, phase }
    }

    fn phase(&self, what: &'static str) {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner()) = Some(what);
    }

    fn finish(self) {
        if let Some(t) = self.task {
            t.abort();
        }
        self.bar.finish_and_clear();
    }
}
