//! What loadgen's integration tests share: a loadgen configuration for a
//! short run, a scriptable fake order-api (answers, stalls, errors), and the
//! real pipeline started in-process on a fresh test database and topic —
//! order-api, relay and notifier as libraries.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use clap::Parser;
use devstack::testing::{create_topic, kafka_bootstrap, unique_name, wait_for, TestDb};
use loadgen::config::{Config, Mode};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "loadgen=info,relay=warn,notifier=warn".into()),
        )
        .try_init();
}

/// A short, quiet loadgen run against `url` (no Kafka unless the test
/// turns it on).
pub fn loadgen_config(mode: Mode, url: &str, rate: f64, duration: Duration) -> Config {
    let mut cfg = Config::defaults(mode);
    cfg.order_api_url = url.to_owned();
    cfg.rate = rate;
    cfg.duration = duration;
    cfg.warmup = Duration::ZERO;
    cfg.ramp = Duration::ZERO;
    cfg.quiet = true;
    cfg.no_kafka = true;
    cfg.database_url = None;
    cfg.json = None;
    cfg.png = None;
    cfg.request_timeout = Duration::from_secs(20);
    cfg
}

/// A directory for a test's output files, under the build directory
/// (`target/tmp`), so runs leave nothing in /tmp.
pub fn out_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique_name("loadgen"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// How the fake order-api answers.
#[derive(Clone, Copy, Debug)]
pub enum Behaviour {
    /// 201/200 with an order, at once, except that requests arriving in
    /// `[first request + from, + from + len)` are held until the window
    /// ends (the whole server freezes, like a GC pause).
    Stall { from: Duration, len: Duration },
    /// Every request answered with this status and a problem body.
    Fail(u16),
}

struct Fake {
    behaviour: Behaviour,
    first: OnceLock<Instant>,
    next_id: AtomicI64,
    requests: AtomicI64,
    /// Requests that arrived during the stall window.
    stalled: AtomicI64,
    /// The `traceparent` header of every request (`None`: it had none),
    /// and whether the request arrived during the stall.
    traceparents: Mutex<Vec<(Option<String>, bool)>>,
}

/// A fake order-api on 127.0.0.1:<ephemeral>.
pub struct FakeApi {
    pub url: String,
    state: Arc<Fake>,
    task: JoinHandle<()>,
}

impl FakeApi {
    pub async fn start(behaviour: Behaviour) -> FakeApi {
        let state = Arc::new(Fake {
            behaviour,
            first: OnceLock::new(),
            next_id: AtomicI64::new(1),
            requests: AtomicI64::new(0),
            stalled: AtomicI64::new(0),
            traceparents: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .route("/orders", post(create))
            .route("/orders/{id}/status", post(change))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeApi {
            url: format!("http://{addr}"),
            state,
            task,
        }
    }

    /// Requests the server received.
    pub fn requests(&self) -> i64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Requests that arrived while the server was stalled.
    pub fn stalled(&self) -> i64 {
        self.state.stalled.load(Ordering::SeqCst)
    }

    /// The `traceparent` header of each request received, and whether it
    /// arrived during the stall.
    pub fn traceparents(&self) -> Vec<(Option<String>, bool)> {
        self.state
            .traceparents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn behave(state: &Fake, headers: &HeaderMap) -> Option<StatusCode> {
    state.requests.fetch_add(1, Ordering::SeqCst);
    let now = Instant::now();
    let first = *state.first.get_or_init(|| now);
    let traceparent = headers
        .get("traceparent")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let stall = match state.behaviour {
        Behaviour::Stall { from, len } => {
            let (start, end) = (first + from, first + from + len);
            (now >= start && now < end).then_some(end)
        }
        Behaviour::Fail(_) => None,
    };
    state
        .traceparents
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((traceparent, stall.is_some()));
    match state.behaviour {
        Behaviour::Stall { .. } => {
            if let Some(end) = stall {
                state.stalled.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep_until(end.into()).await;
            }
            None
        }
        Behaviour::Fail(code) => Some(StatusCode::from_u16(code).expect("status code")),
    }
}

fn problem(code: StatusCode) -> (StatusCode, Json<Value>) {
    (
        code,
        Json(
            json!({"type": "about:blank", "title": "fake failure", "status": code.as_u16(), "detail": "test"}),
        ),
    )
}

fn order(id: i64, status: &str) -> Value {
    json!({
        "id": id, "user_id": 1, "email": "a@b.c", "status": status, "currency": "EUR",
        "items": [{"sku": "A-1", "quantity": 1, "unit_price_cents": 100}], "total_cents": 100,
        "created_at": "2026-01-01T00:00:00.000000Z", "updated_at": "2026-01-01T00:00:00.000000Z"
    })
}

async fn create(State(state): State<Arc<Fake>>, headers: HeaderMap) -> (StatusCode, Json<Value>) {
    if let Some(code) = behave(&state, &headers).await {
        return problem(code);
    }
    let id = state.next_id.fetch_add(1, Ordering::SeqCst);
    (StatusCode::CREATED, Json(order(id, "CREATED")))
}

async fn change(
    State(state): State<Arc<Fake>>,
    Path(id): Path<i64>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    if let Some(code) = behave(&state, &headers).await {
        return problem(code);
    }
    let status = body["status"].as_str().unwrap_or("PAID").to_owned();
    (StatusCode::OK, Json(order(id, &status)))
}

/// The real pipeline on a fresh database and topic: order-api and relay
/// in-process (and, on request, the notifier).
pub struct Pipeline {
    pub db: TestDb,
    pub topic: String,
    pub api_url: String,
    pub mail_dir: PathBuf,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
    relay: RelayChild,
    slot: String,
}

/// The relay binary, as users run it, streaming the pipeline's slot.
struct RelayChild {
    child: tokio::process::Child,
}

impl RelayChild {
    /// Starts `relay` (built by `cargo build`, as `scripts/test` does) and
    /// waits until `/status` says it streams.
    async fn spawn(database_url: &str, slot: &str, topic: &str) -> anyhow::Result<RelayChild> {
        let addr: SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let mut child = tokio::process::Command::new(devstack::testing::workspace_binary("relay")?)
            .args([
                "--database-url",
                database_url,
                "--slot",
                slot,
                "--topic",
                topic,
            ])
            .args(["--kafka-bootstrap-servers", &kafka_bootstrap()])
            .args(["--listen", &addr.to_string(), "--status-interval", "200ms"])
            .args(["--max-backoff", "1s"])
            .env("RUST_LOG", "relay=warn")
            .kill_on_drop(true)
            .spawn()?;
        let needle = "\"state\":\"streaming\"";
        let child_ref = &mut child;
        wait_for("the relay to stream", Duration::from_secs(60), || {
            let exited = child_ref.try_wait().ok().flatten();
            async move {
                anyhow::ensure!(exited.is_none(), "relay exited: {exited:?}");
                let status = devstack::bench::http_get(addr, "/status")
                    .await
                    .unwrap_or_default();
                Ok(status.contains(needle).then_some(()))
            }
        })
        .await?;
        Ok(RelayChild { child })
    }

    /// Fails if the relay exited on its own; else stops it (SIGTERM: it
    /// confirms what Kafka acknowledged) and checks it exited cleanly.
    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            anyhow::bail!("the relay exited during the test: {status}");
        }
        let pid = self.child.id().context("relay pid")?;
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        anyhow::ensure!(sent.success(), "kill -TERM {pid}: {sent}");
        let status = tokio::time::timeout(Duration::from_secs(60), self.child.wait()).await??;
        anyhow::ensure!(status.success(), "the relay stopped with {status}");
        Ok(())
    }
}

impl Pipeline {
    pub async fn start(with_notifier: bool) -> anyhow::Result<Pipeline> {
        Pipeline::start_with(with_notifier, "").await
    }

    /// [`Pipeline::start`], with `schema` (SQL, e.g. an `ALTER TABLE
    /// outbox`) run on the fresh database before anything starts.
    pub async fn start_with(with_notifier: bool, schema: &str) -> anyhow::Result<Pipeline> {
        init_tracing();
        let db = TestDb::create().await?;
        if !schema.is_empty() {
            db.connect().await?.batch_execute(schema).await?;
        }
        let topic = create_topic(3).await?;
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();

        let mut api_cfg = order_api::config::Config::for_database(&db.url);
        api_cfg.listen = "127.0.0.1:0".parse()?;
        // Unoptimised builds on a busy machine open connections slowly.
        api_cfg.pool_timeout = Duration::from_secs(10);
        let api = order_api::bind(api_cfg).await?;
        let api_addr: SocketAddr = api.local_addr();
        let s = stop.clone();
        tasks.push(tokio::spawn(async move { Ok(api.serve(s).await?) }));

        let slot = db.slot_name();
        let relay = RelayChild::spawn(&db.url, &slot, &topic).await?;
        let mail_dir = out_dir().join("mail");
        std::fs::create_dir_all(&mail_dir)?;
        if with_notifier {
            let group = unique_name("notifier");
            let cfg = notifier::config::Config::try_parse_from([
                "notifier",
                "--database-url",
                &db.url,
                "--kafka-bootstrap-servers",
                &kafka_bootstrap(),
                "--topic",
                &topic,
                "--group",
                &group,
                "--listen",
                "127.0.0.1:0",
                "--mail-dir",
                &mail_dir.display().to_string(),
                "--commit-interval",
                "200ms",
                "--kafka-property",
                "session.timeout.ms=6000",
            ])?;
            let s = stop.clone();
            tasks.push(tokio::spawn(async move {
                notifier::run_with(cfg, s, notifier::http::Shared::new())
                    .await
                    .map_err(|e| anyhow::anyhow!("notifier: {e}"))
            }));
        }
        Ok(Pipeline {
            db,
            topic,
            api_url: format!("http://{api_addr}"),
            mail_dir,
            stop,
            tasks,
            relay,
            slot,
        })
    }

    /// loadgen settings for this pipeline, Kafka matching on.
    pub fn loadgen(&self, mode: Mode, rate: f64, duration: Duration) -> Config {
        let mut cfg = loadgen_config(mode, &self.api_url, rate, duration);
        cfg.no_kafka = false;
        cfg.kafka_bootstrap_servers = kafka_bootstrap();
        cfg.topic = self.topic.clone();
        cfg.database_url = Some(self.db.url.clone());
        cfg.drain_timeout = Duration::from_secs(30);
        cfg
    }

    /// Stops everything (each part must have run without error) and drops
    /// the replication slot, so the test cluster does not keep WAL for it.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        for t in self.tasks {
            tokio::time::timeout(Duration::from_secs(60), t).await???;
        }
        self.relay.stop().await?;
        let admin = devstack::testing::connect(&devstack::testing::admin_url()).await?;
        let admin = &admin;
        let slot = &self.slot;
        // The walsender ends shortly after the relay: wait until the slot
        // is free, then drop it.
        wait_for(
            "the slot to be dropped",
            Duration::from_secs(30),
            || async move {
                let row = admin
                    .query_opt(
                        "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                        &[slot],
                    )
                    .await?;
                match row.map(|r| r.get::<_, bool>(0)) {
                    None => Ok(Some(())),
                    Some(true) => Ok(None),
                    Some(false) => {
                        admin
                            .execute("SELECT pg_drop_replication_slot($1)", &[slot])
                            .await?;
                        Ok(Some(()))
                    }
                }
            },
        )
        .await
    }
}
