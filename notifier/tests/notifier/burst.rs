//! Bursts, end to end on the test stack: order events written to Postgres
//! → the relay binary → a 12-partition topic on Apache Kafka, in
//! multi-record batches → the notifier binary (a child process, so it can
//! be killed) → an SMTP server that records every email it accepts.
//!
//! Two sources of events ([`Source`]):
//! - 20,000 `OrderCreated` rows committed in one Postgres transaction: 5,000
//!   orders of 997 customers, each order four events in a row (created,
//!   paid, shipped, delivered), so a partition's window of records in flight
//!   often holds several events of one customer or order;
//! - 1,000 orders of 250 customers created over HTTP by the order-api
//!   binary, half of them then paid (1,500 events), with `--outbox-mode
//!   table` (outbox rows) or `--outbox-mode message` (the table-less outbox
//!   of issue #18: each event a `pg_logical_emit_message`, no row). The
//!   events written are read back where they are: the `outbox` table, or
//!   the WAL through a `test_decoding` slot of the test's own.
//!
//! Counted at the far end: one `notifier_inbox` row per event written (its
//! id and type), one email per event (by its `X-Outbox-Event-Id`), every
//! record of the topic read back; and order: each customer's (the record
//! key's) and each order's emails reached the server in event order (a
//! resend after a kill -9 aside: the first arrival of each event counts).
//! And while the burst runs, a sampler reads the group's committed
//! offsets every 200 ms and then the inbox: every record below a committed
//! offset must already have its inbox row (the committed offset never
//! passes an unhandled record). Rows are never deleted, so a row missing
//! after the offset was read was missing when it was committed.
//!
//! The inbox is written in batches (one transaction for the claims made at
//! about the same time, see `notifier/src/inbox.rs`): the SQL bursts check
//! that its rows came in transactions of several rows (rows of one
//! transaction share `handled_at`; one row each fails), and every burst
//! that each customer's rows were committed in event order. The SQL burst
//! also runs into a spool directory (`--mail-dir`), killed twice: one file
//! per event, named after it, nothing half-written left.
//!
//! The notifier once lost about a quarter of every burst: it paused a
//! partition whose worker lagged 64 records and resumed it later, and the
//! resumed fetch skipped records while the committed offsets moved past
//! them (see `notifier/src/pipeline.rs`). These tests fail on that build:
//! inbox rows and emails are missing and the sampler finds committed
//! offsets past unhandled records.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{free_port, unique_domain, FakeSmtp};
use anyhow::Context;
use devstack::bench::RelayProcess;
use devstack::kafka::TopicReader;
use devstack::testing::{
    create_topic, kafka_bootstrap, unique_name, wait_for, workspace_binary, Captured, TestDb,
};
use futures_util::{StreamExt, TryStreamExt};
use outbox_record::header;
use serde_json::{json, Value};

/// The events of [`Source::Sql`].
const EVENTS: i64 = 20_000;
/// [`Source::OrderApi`]: customers, each creating this many orders and
/// paying every other one.
const CUSTOMERS: i64 = 250;
const ORDERS_PER_CUSTOMER: i64 = 4;
const ORDERS: i64 = CUSTOMERS * ORDERS_PER_CUSTOMER;
/// HTTP clients at once (customers served concurrently), and order-api's
/// `--pool-size`: no request waits for a connection.
const CLIENTS: usize = 24;
const PARTITIONS: i32 = 12;
/// The notifier's `--smtp-connections` (its default).
const SMTP_CONNECTIONS: usize = 32;
/// By SMTP, the records in flight at once: the handlers' default, four per
/// connection — the bound on the emails a kill -9 can leave sent and not
/// recorded. (Into a spool `--handlers`' default is 128 too: the spool runs
/// test the defaults.)
const IN_FLIGHT: usize = notifier::config::SMTP_HANDLERS_PER_CONNECTION * SMTP_CONNECTIONS;

/// Where a burst's events come from.
#[derive(Clone, Copy, Debug)]
enum Source {
    /// [`EVENTS`] outbox rows committed in one transaction ([`commit_burst`]).
    Sql,
    /// [`ORDERS`] orders created over HTTP by the order-api binary with this
    /// outbox mode, half of them then paid ([`order_burst`]).
    OrderApi(OutboxMode),
}

/// order-api's `--outbox-mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OutboxMode {
    /// An `outbox` row per event.
    Table,
    /// A transactional logical decoding message per event, no row.
    Message,
}

impl OutboxMode {
    fn flag(self) -> &'static str {
        match self {
            OutboxMode::Table => "table",
            OutboxMode::Message => "message",
        }
    }
}

impl Source {
    /// How many events the source writes.
    fn events(self) -> i64 {
        match self {
            Source::Sql => EVENTS,
            Source::OrderApi(_) => ORDERS + ORDERS / 2,
        }
    }
}

/// The relay binary (built beside this test), streaming the test
/// database's outbox (rows and messages, its defaults) into `topic`;
/// killed when dropped.
async fn start_relay(db: &TestDb, topic: &str) -> anyhow::Result<RelayProcess> {
    let bin = workspace_binary("relay")?;
    let slot = db.slot_name();
    let mut relay = RelayProcess::spawn(
        &bin,
        &db.url,
        &slot,
        topic,
        &kafka_bootstrap(),
        &["--status-interval", "200ms"],
    )?;
    relay.wait_connected(Duration::from_secs(60)).await?;
    Ok(relay)
}

/// 20,000 order events, committed at once: event g belongs to order
/// (g - 1) / 4 + 1 of customer order % 997 + 1, and is its creation, then
/// its payment, shipping and delivery.
async fn commit_burst(db: &TestDb, domain: &str) -> anyhow::Result<()> {
    let client = db.connect().await?;
    let n = client
        .execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, user_id, event_type, payload)
             SELECT 'order', o::text, o % 997 + 1,
                    CASE WHEN step = 0 THEN 'OrderCreated' ELSE 'OrderStatusChanged' END,
                    jsonb_build_object(
                        'order_id', o, 'user_id', o % 997 + 1,
                        'email', 'c' || o || '@' || $1::text,
                        'status', (ARRAY['CREATED', 'PAID', 'SHIPPED', 'DELIVERED'])[step + 1],
                        'from', (ARRAY[NULL, 'CREATED', 'PAID', 'SHIPPED'])[step + 1],
                        'to', (ARRAY[NULL, 'PAID', 'SHIPPED', 'DELIVERED'])[step + 1],
                        'items', jsonb_build_array(jsonb_build_object(
                            'sku', 'A-1', 'quantity', 2, 'unit_price_cents', 1999)),
                        'total_cents', 3998, 'currency', 'EUR',
                        'created_at', '2026-01-01T00:00:00.000000Z',
                        'updated_at', '2026-01-01T00:00:00.000000Z')
             FROM generate_series(1, $2::bigint) AS g,
                  LATERAL (SELECT (g - 1) / 4 + 1 AS o, (g - 1) % 4 AS step) AS e
             ORDER BY g",
            &[&domain, &EVENTS],
        )
        .await?;
    anyhow::ensure!(n == EVENTS as u64, "inserted {n} rows");
    Ok(())
}

/// The order-api binary on the test database, writing its events as `mode`
/// says.
struct OrderApi {
    process: Captured,
    url: String,
}

impl OrderApi {
    async fn start(db: &TestDb, mode: OutboxMode) -> anyhow::Result<OrderApi> {
        let port = free_port()?;
        let mut cmd = tokio::process::Command::new(workspace_binary("order-api")?);
        cmd.args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--database-url", &db.url])
            .args(["--outbox-mode", mode.flag()])
            .args(["--pool-size", &CLIENTS.to_string()])
            // Opening the pool's connections at once (TLS, SCRAM) can take
            // a debug build more than the default 2 s on a busy machine;
            // this test is about the events, not load shedding.
            .args(["--pool-timeout", "30s", "--request-timeout", "30s"])
            .env("RUST_LOG", "warn");
        let process = Captured::spawn(cmd)?;
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        wait_for("order-api to be ready", Duration::from_secs(60), || async {
            let ready = http.get(format!("{url}/readyz")).send().await;
            Ok(ready.is_ok_and(|r| r.status().is_success()).then_some(()))
        })
        .await
        .with_context(|| process.stderr())?;
        Ok(OrderApi { process, url })
    }
}

/// `POST` `body` to `url`; the JSON answer if its status is `expect`.
async fn post(
    http: &reqwest::Client,
    url: &str,
    body: &Value,
    expect: u16,
) -> anyhow::Result<Value> {
    let resp = http.post(url).json(body).send().await?;
    let status = resp.status().as_u16();
    let text = resp.text().await?;
    anyhow::ensure!(status == expect, "POST {url}: {status} {text}");
    Ok(serde_json::from_str(&text)?)
}

/// The burst over HTTP: [`CUSTOMERS`] customers, [`CLIENTS`] at a time,
/// each sending its requests one after the other as one client would —
/// create an order, create the next, pay the first, and so on — so that
/// each customer's events are committed in event id order. Returns every
/// order created and whether it was paid; counts the requests answered in
/// `answered`.
async fn order_burst(
    url: String,
    domain: String,
    answered: Arc<AtomicUsize>,
) -> anyhow::Result<Vec<(i64, bool)>> {
    let began = Instant::now();
    let http = reqwest::Client::new();
    let (http, url, domain, answered) = (&http, url.as_str(), domain.as_str(), &answered);
    let create = move |user: i64| async move {
        let order = post(
            http,
            &format!("{url}/orders"),
            &json!({
                "user_id": user, "email": format!("c{user}@{domain}"), "currency": "EUR",
                "items": [{"sku": "A-1", "quantity": 2, "unit_price_cents": 1999}],
            }),
            201,
        )
        .await?;
        answered.fetch_add(1, Ordering::SeqCst);
        order["id"].as_i64().context("the created order has no id")
    };
    let pay = move |order: i64| async move {
        post(
            http,
            &format!("{url}/orders/{order}/status"),
            &json!({"status": "PAID"}),
            200,
        )
        .await?;
        answered.fetch_add(1, Ordering::SeqCst);
        anyhow::Ok(())
    };
    let per_customer: Vec<Vec<(i64, bool)>> = futures_util::stream::iter(1..=CUSTOMERS)
        .map(|user| async move {
            let mut orders = Vec::new();
            for _ in 0..ORDERS_PER_CUSTOMER / 2 {
                let paid = create(user).await?;
                let unpaid = create(user).await?;
                pay(paid).await?;
                orders.extend([(paid, true), (unpaid, false)]);
            }
            anyhow::Ok(orders)
        })
        .buffer_unordered(CLIENTS)
        .try_collect()
        .await?;
    println!(
        "{} requests answered in {:.1} s",
        answered.load(Ordering::SeqCst),
        began.elapsed().as_secs_f64()
    );
    Ok(per_customer.into_iter().flatten().collect())
}

/// A temporary `test_decoding` slot on the test's database, created before
/// the events are written: it decodes every change committed after, as the
/// relay's slot does — here, to read the events written as messages.
/// Temporary, so it goes with its connection whatever the test's outcome.
struct Wal {
    client: tokio_postgres::Client,
    slot: String,
}

impl Wal {
    async fn watch(db: &TestDb) -> anyhow::Result<Wal> {
        let client = db.connect().await?;
        let slot = format!("{}_check", db.slot_name());
        client
            .query_one(
                "SELECT pg_create_logical_replication_slot($1, 'test_decoding', true)",
                &[&slot],
            )
            .await
            .context("creating the test_decoding slot")?;
        Ok(Wal { client, slot })
    }

    /// The contents of the `outbox` messages committed since [`Wal::watch`],
    /// in commit order, as `test_decoding` prints them
    /// (`message: transactional: 1 prefix: outbox, sz: 42 content:{...}`);
    /// fails on a non-transactional one.
    async fn outbox_messages(&self) -> anyhow::Result<Vec<Value>> {
        let rows = self
            .client
            .query(
                "SELECT data FROM pg_logical_slot_get_changes($1, NULL, NULL)",
                &[&self.slot],
            )
            .await?;
        let mut contents = Vec::new();
        for row in &rows {
            let line: &str = row.get(0);
            let Some(rest) = line.strip_prefix("message: transactional: ") else {
                continue;
            };
            let parsed = rest.split_once(" prefix: ").and_then(|(tx, rest)| {
                let (prefix, rest) = rest.split_once(", sz: ")?;
                let (_, content) = rest.split_once(" content:")?;
                Some((tx, prefix, content))
            });
            let (transactional, prefix, content) =
                parsed.with_context(|| format!("unexpected test_decoding line: {line}"))?;
            if prefix != "outbox" {
                continue;
            }
            anyhow::ensure!(transactional == "1", "non-transactional event: {line}");
            contents.push(serde_json::from_str(content).with_context(|| line.to_owned())?);
        }
        Ok(contents)
    }
}

/// One event as written: an `outbox` row or an `outbox` message.
#[derive(Debug)]
struct Written {
    id: i64,
    user_id: i64,
    order_id: i64,
    event_type: String,
}

/// The events in the `outbox` table, by id.
async fn outbox_rows(client: &tokio_postgres::Client) -> anyhow::Result<Vec<Written>> {
    let rows = client
        .query(
            "SELECT id, user_id, (payload->>'order_id')::bigint, event_type FROM outbox ORDER BY id",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Written {
            id: r.get(0),
            user_id: r.get(1),
            order_id: r.get(2),
            event_type: r.get(3),
        })
        .collect())
}

/// The event of one `outbox` message's content (order-api's fields).
fn written_message(content: &Value) -> anyhow::Result<Written> {
    let int = |v: &Value| {
        v.as_i64()
            .with_context(|| format!("not an integer in {content}"))
    };
    Ok(Written {
        id: int(&content["id"])?,
        user_id: int(&content["user_id"])?,
        order_id: int(&content["payload"]["order_id"])?,
        event_type: content["event_type"]
            .as_str()
            .with_context(|| format!("no event_type in {content}"))?
            .to_owned(),
    })
}

/// Every customer's and every order's emails, by first arrival at the
/// server, in event (outbox id) order; returns the violations. `owner`:
/// each event's customer and order.
fn out_of_order(owner: &HashMap<i64, (i64, i64)>, arrivals: &[i64]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    let mut last_of_user: HashMap<i64, i64> = HashMap::new();
    let mut last_of_order: HashMap<i64, i64> = HashMap::new();
    let mut violations = Vec::new();
    for id in arrivals {
        if !seen.insert(*id) {
            continue; // a resend after a kill -9
        }
        let Some(&(user, order)) = owner.get(id) else {
            violations.push(format!("event {id} was emailed but never written"));
            continue;
        };
        for (what, whose, last) in [
            ("customer", user, &mut last_of_user),
            ("order", order, &mut last_of_order),
        ] {
            if let Some(before) = last.insert(whose, *id) {
                if before > *id {
                    violations.push(format!(
                        "{what} {whose}: event {id} arrived after event {before}"
                    ));
                }
            }
        }
    }
    violations
}

/// Up to five of `ids`, for a message.
fn some(ids: &[i64]) -> &[i64] {
    &ids[..ids.len().min(5)]
}

/// The notifier binary as a child process.
struct Notifier {
    child: tokio::process::Child,
    log: PathBuf,
}

impl Notifier {
    fn spawn(db: &TestDb, topic: &str, group: &str, to: &To, n: usize) -> anyhow::Result<Self> {
        let log = std::env::temp_dir().join(format!("{group}-{n}.log"));
        let out = std::fs::File::create(&log)?;
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_notifier"))
            .args(["--database-url", &db.url])
            .args(["--kafka-bootstrap-servers", &kafka_bootstrap()])
            .args(["--topic", topic, "--group", group])
            .args(to.args())
            .args(["--listen", "127.0.0.1:0", "--commit-interval", "200ms"])
            .args(["--kafka-property", "session.timeout.ms=6000"])
            .args(["--kafka-property", "heartbeat.interval.ms=500"])
            .args(["--max-in-flight-per-partition", "16"])
            .args(["--smtp-connections", &SMTP_CONNECTIONS.to_string()])
            .env("RUST_LOG", "notifier=info")
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .context("starting the notifier binary")?;
        Ok(Notifier { child, log })
    }

    async fn kill_9(mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }

    /// SIGTERM and wait: the notifier finishes in-flight sends, commits and
    /// leaves the group.
    async fn terminate(mut self) -> anyhow::Result<()> {
        let pid = self.child.id().context("notifier already exited")?;
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        let status = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .context("notifier did not stop within 60 s of SIGTERM")??;
        anyhow::ensure!(
            status.success(),
            "notifier exited with {status}: {}",
            self.tail()
        );
        Ok(())
    }

    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

async fn inbox_count(client: &tokio_postgres::Client) -> anyhow::Result<i64> {
    Ok(client
        .query_one("SELECT count(*) FROM notifier_inbox", &[])
        .await?
        .get(0))
}

fn committed_offsets(group: &str, topic: &str) -> anyhow::Result<BTreeMap<i32, i64>> {
    crate::common::committed_offsets(group, topic, 0..PARTITIONS)
}

/// What the sampler found: how many samples it took, and every committed
/// offset that had passed a record without an inbox row.
#[derive(Default)]
struct Sampled {
    samples: usize,
    highest_committed: i64,
    violations: Vec<String>,
}

/// Every 200 ms: the committed offsets, then the inbox. The relay writes
/// without transactions, so a partition's offsets are 0, 1, 2, … (checked
/// at the end), and "every record below offset C handled" means the inbox
/// holds C rows of that partition with offsets below C.
fn sample_offsets(
    db_url: String,
    group: String,
    topic: String,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<anyhow::Result<Sampled>> {
    tokio::spawn(async move {
        let client = devstack::testing::connect(&db_url).await?;
        let mut out = Sampled::default();
        while !stop.load(Ordering::SeqCst) {
            let (g, t) = (group.clone(), topic.clone());
            let committed =
                tokio::task::spawn_blocking(move || committed_offsets(&g, &t)).await??;
            let rows = client
                .query(
                    "SELECT kafka_partition, kafka_offset FROM notifier_inbox WHERE topic = $1",
                    &[&topic],
                )
                .await?;
            let mut below: HashMap<i32, i64> = HashMap::new();
            for row in &rows {
                let (p, o): (i32, i64) = (row.get(0), row.get(1));
                if committed.get(&p).is_some_and(|c| o < *c) {
                    *below.entry(p).or_insert(0) += 1;
                }
            }
            for (p, c) in &committed {
                let handled = below.get(p).copied().unwrap_or(0);
                if handled != *c {
                    out.violations.push(format!(
                        "partition {p}: committed offset {c}, but only {handled} records below it handled"
                    ));
                }
            }
            out.highest_committed = out
                .highest_committed
                .max(committed.values().copied().max().unwrap_or(0));
            out.samples += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(out)
    })
}

/// What happens to the notifier while the burst is handled.
enum Disruption {
    None,
    /// kill -9 once this many events are handled, then a new process.
    Kill9At(i64),
    /// SIGTERM once this many events are handled, then a new process.
    TerminateAt(i64),
}

struct Outcome {
    emails: HashMap<i64, usize>,
    restarts: usize,
    /// Inbox rows per Postgres transaction, on average.
    rows_per_transaction: f64,
}

/// Where the notifier sends, as the test asks.
#[derive(Clone, Copy, Debug)]
enum Sink {
    Smtp,
    Spool,
}

/// The destination of one burst.
enum To {
    /// An SMTP server recording every email it accepts, in arrival order.
    Smtp(FakeSmtp),
    /// A spool directory (`--mail-dir`).
    Spool(SpoolDir),
}

impl To {
    fn args(&self) -> Vec<String> {
        match self {
            To::Smtp(smtp) => vec!["--smtp-url".into(), smtp.url.clone()],
            To::Spool(dir) => vec!["--mail-dir".into(), dir.0.display().to_string()],
        }
    }
}

/// A spool directory of the test's own, removed when dropped.
struct SpoolDir(PathBuf);

impl SpoolDir {
    fn create(name: &str) -> anyhow::Result<SpoolDir> {
        let dir = std::env::temp_dir().join(name);
        std::fs::create_dir_all(&dir)?;
        Ok(SpoolDir(dir))
    }

    /// The `.eml` files per event (by their `X-Outbox-Event-Id`); fails on
    /// any other file (a temporary file left behind, a name not the
    /// event's).
    fn emails_per_event(&self) -> anyhow::Result<HashMap<i64, usize>> {
        let mut per = HashMap::new();
        for entry in std::fs::read_dir(&self.0)? {
            let path = entry?.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            let text = std::fs::read_to_string(&path)?;
            let id: i64 = text
                .lines()
                .find_map(|l| l.strip_prefix("X-Outbox-Event-Id: "))
                .with_context(|| format!("{name}: no X-Outbox-Event-Id"))?
                .trim()
                .parse()?;
            anyhow::ensure!(
                name == format!("order-event-{id}.eml"),
                "spool file {name} holds event {id}"
            );
            *per.entry(id).or_insert(0) += 1;
        }
        Ok(per)
    }
}

impl Drop for SpoolDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes the burst from `source`, runs the notifier (disrupted as asked)
/// until every event has its inbox row, and checks the events written,
/// inbox, topic, committed offsets, the sampler, the emails and their
/// order. Returns the emails for the caller's own checks.
async fn burst(source: Source, disruptions: &[Disruption], to: Sink) -> anyhow::Result<Outcome> {
    let events = source.events();
    let db = TestDb::create().await?;
    let topic = create_topic(PARTITIONS).await?;
    let group = unique_name("burst");
    let domain = unique_domain();
    let to = match to {
        Sink::Smtp => To::Smtp(FakeSmtp::start("250 ok", 0).await?),
        Sink::Spool => To::Spool(SpoolDir::create(&group)?),
    };
    let mut relay = start_relay(&db, &topic).await?;
    let (mut api, wal) = match source {
        Source::Sql => (None, None),
        Source::OrderApi(mode) => {
            let wal = Wal::watch(&db).await?;
            (Some(OrderApi::start(&db, mode).await?), Some(wal))
        }
    };

    let client = db.connect().await?;
    let stop_sampler = Arc::new(AtomicBool::new(false));
    let sampler = sample_offsets(
        db.url.clone(),
        group.clone(),
        topic.clone(),
        stop_sampler.clone(),
    );
    let mut spawned = 0;
    let mut notifier = Notifier::spawn(&db, &topic, &group, &to, spawned)?;
    let started = Instant::now();
    // The SQL burst is committed at once; the HTTP requests run in the
    // background (one request, one event), the disruptions waiting on the
    // notifier's progress only.
    let answered = Arc::new(AtomicUsize::new(0));
    let requests = match &api {
        None => {
            commit_burst(&db, &domain).await?;
            None
        }
        Some(api) => Some(tokio::spawn(order_burst(
            api.url.clone(),
            domain.clone(),
            answered.clone(),
        ))),
    };

    let mut restarts = 0;
    for d in disruptions {
        let (at, kill) = match d {
            Disruption::None => continue,
            Disruption::Kill9At(n) => (*n, true),
            Disruption::TerminateAt(n) => (*n, false),
        };
        wait_for(
            "events handled before the restart",
            Duration::from_secs(300),
            || async { Ok((inbox_count(&client).await? >= at).then_some(())) },
        )
        .await
        .with_context(|| notifier.tail())?;
        if kill {
            notifier.kill_9().await?;
        } else {
            notifier.terminate().await?;
        }
        let restarted = Instant::now();
        let handled = inbox_count(&client).await?;
        let answered_then = answered.load(Ordering::SeqCst);
        spawned += 1;
        restarts += 1;
        notifier = Notifier::spawn(&db, &topic, &group, &to, spawned)?;
        // Time to the first event handled by the new process.
        wait_for(
            "the restarted notifier to handle events",
            Duration::from_secs(120),
            || async { Ok((inbox_count(&client).await? > handled).then_some(())) },
        )
        .await
        .with_context(|| notifier.tail())?;
        println!(
            "{} at {handled} handled events{}; the new process handled its first event {:.1} s after the restart",
            if kill { "kill -9" } else { "SIGTERM" },
            if requests.is_some() {
                format!(" ({answered_then} of {events} requests answered)")
            } else {
                String::new()
            },
            restarted.elapsed().as_secs_f64()
        );
    }

    // Every order the requests created, and whether it was paid.
    let orders = match requests {
        None => None,
        Some(task) => {
            let orders = task.await?.with_context(|| {
                let api = api.as_ref().map(|a| a.process.stderr());
                format!("order-api log:\n{}", api.unwrap_or_default())
            })?;
            Some(orders)
        }
    };
    wait_for(
        "every event's inbox row",
        Duration::from_secs(600),
        || async { Ok((inbox_count(&client).await? >= events).then_some(())) },
    )
    .await
    .with_context(|| format!("notifier log:\n{}", notifier.tail()))?;
    println!(
        "{events} events handled {:.1} s after the burst began",
        started.elapsed().as_secs_f64()
    );
    notifier.terminate().await?;
    stop_sampler.store(true, Ordering::SeqCst);
    let sampled = sampler.await??;
    relay.check_running()?;
    relay.kill().await?;
    if let Some(api) = &mut api {
        let (status, log) = api.process.terminate(Duration::from_secs(30)).await?;
        anyhow::ensure!(status.success(), "order-api exited with {status}: {log}");
    }

    // The events written: outbox rows, or in message mode messages in the
    // WAL and not a single row.
    let rows = outbox_rows(&client).await?;
    let messages = match &wal {
        Some(wal) => wal.outbox_messages().await?,
        None => Vec::new(),
    };
    match source {
        Source::OrderApi(OutboxMode::Message) => {
            assert_eq!(rows.len(), 0, "message mode wrote outbox rows");
        }
        Source::OrderApi(OutboxMode::Table) | Source::Sql => {
            assert_eq!(messages.len(), 0, "table mode wrote outbox messages");
        }
    }
    let mut written = rows;
    for content in &messages {
        written.push(written_message(content)?);
    }
    written.sort_by_key(|w| w.id);
    assert_eq!(written.len() as i64, events, "events written");
    let written_ids: Vec<i64> = written.iter().map(|w| w.id).collect();
    let distinct: BTreeSet<i64> = written_ids.iter().copied().collect();
    assert_eq!(distinct.len(), written.len(), "event ids written twice");
    if let Some(orders) = &orders {
        // One OrderCreated per order created, one OrderStatusChanged per
        // order paid, and nothing else.
        let mut expected: Vec<(i64, &str)> = Vec::new();
        for (order, paid) in orders {
            expected.push((*order, "OrderCreated"));
            if *paid {
                expected.push((*order, "OrderStatusChanged"));
            }
        }
        let mut got: Vec<(i64, &str)> = written
            .iter()
            .map(|w| (w.order_id, w.event_type.as_str()))
            .collect();
        expected.sort_unstable();
        got.sort_unstable();
        assert_eq!(expected.len() as i64, events, "requests answered");
        let first_difference = expected.iter().zip(&got).find(|(e, g)| e != g);
        assert!(
            got == expected,
            "the events written are not the orders' changes: first difference \
             (expected, written) {first_difference:?}"
        );
    }

    // The inbox: one row per event written, with its id and type, nothing
    // else.
    let inbox: BTreeMap<i64, String> = client
        .query("SELECT event_id, event_type FROM notifier_inbox", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let missing: Vec<i64> = written_ids
        .iter()
        .copied()
        .filter(|id| !inbox.contains_key(id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} events without an inbox row, e.g. {:?}",
        missing.len(),
        some(&missing)
    );
    let foreign: Vec<i64> = inbox
        .keys()
        .copied()
        .filter(|id| !distinct.contains(id))
        .collect();
    assert!(
        foreign.is_empty(),
        "{} inbox rows of events never written, e.g. {:?}",
        foreign.len(),
        some(&foreign)
    );
    let mistyped: Vec<i64> = written
        .iter()
        .filter(|w| inbox.get(&w.id) != Some(&w.event_type))
        .map(|w| w.id)
        .collect();
    assert!(
        mistyped.is_empty(),
        "inbox rows with another event type, e.g. {:?}",
        some(&mistyped)
    );
    assert_eq!(inbox_count(&client).await?, events);

    // The topic: every event once, offsets 0, 1, 2, … in each partition
    // (what the sampler's check relies on), spread over the partitions.
    let reader = TopicReader::new(&kafka_bootstrap(), &topic, true)?;
    let mut per_partition: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    let mut ids = Vec::new();
    while let Some(r) = reader.next(Duration::from_secs(2)).await? {
        per_partition.entry(r.partition).or_default().push(r.offset);
        ids.push(r.header(header::EVENT_ID).unwrap_or("").parse::<i64>()?);
    }
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len() as i64, events, "distinct events in the topic");
    assert!(
        ids == written_ids,
        "the topic's event ids are not those written"
    );
    assert_eq!(per_partition.len() as i32, PARTITIONS);
    for (p, offsets) in &per_partition {
        let expected: Vec<i64> = (0..offsets.len() as i64).collect();
        assert_eq!(offsets, &expected, "offsets of partition {p}");
    }

    // Committed offsets: at the end of every partition.
    let (g, t) = (group.clone(), topic.clone());
    let committed = tokio::task::spawn_blocking(move || committed_offsets(&g, &t)).await??;
    for (p, offsets) in &per_partition {
        assert_eq!(
            committed.get(p).copied(),
            Some(offsets.len() as i64),
            "committed offset of partition {p}"
        );
    }

    // The sampler ran during the burst and never saw an offset committed
    // past an unhandled record.
    assert!(
        sampled.samples >= 5 && sampled.highest_committed > 0,
        "the sampler took {} samples (highest committed offset {})",
        sampled.samples,
        sampled.highest_committed
    );
    assert!(
        sampled.violations.is_empty(),
        "{} committed offsets past unhandled records, e.g. {:?}",
        sampled.violations.len(),
        &sampled.violations[..sampled.violations.len().min(5)]
    );

    // The inbox's order: a key's next record is claimed only after its
    // previous one's batch committed, so each customer's rows, by their
    // transaction's start (`handled_at`), are in event order.
    let recorded = client
        .query(
            "SELECT event_id, (extract(epoch FROM handled_at) * 1000000)::bigint \
               FROM notifier_inbox ORDER BY 2, 1",
            &[],
        )
        .await?;
    let user_of: HashMap<i64, i64> = written.iter().map(|w| (w.id, w.user_id)).collect();
    let mut last_of_user: HashMap<i64, (i64, i64)> = HashMap::new();
    let mut inbox_violations = Vec::new();
    for row in &recorded {
        let (id, at): (i64, i64) = (row.get(0), row.get(1));
        let user = *user_of
            .get(&id)
            .context("inbox row of an event never written")?;
        if let Some((before, before_at)) = last_of_user.insert(user, (id, at)) {
            if before > id || before_at == at {
                inbox_violations.push(format!(
                    "customer {user}: event {id} recorded at {at} after event {before} at {before_at}"
                ));
            }
        }
    }
    assert!(
        inbox_violations.is_empty(),
        "{} inbox rows out of event order, e.g. {:?}",
        inbox_violations.len(),
        &inbox_violations[..inbox_violations.len().min(5)]
    );
    // Rows per inbox transaction (a transaction's rows share `handled_at`).
    let transactions: i64 = client
        .query_one("SELECT count(DISTINCT handled_at) FROM notifier_inbox", &[])
        .await?
        .get(0);
    let rows_per_transaction = events as f64 / transactions as f64;
    println!(
        "{events} inbox rows in {transactions} transactions: {rows_per_transaction:.1} rows each"
    );

    let (emails, arrivals) = match &to {
        To::Smtp(smtp) => (smtp.emails_per_event(), smtp.arrivals()),
        To::Spool(dir) => (dir.emails_per_event()?, Vec::new()),
    };
    let missing_emails: Vec<i64> = written_ids
        .iter()
        .copied()
        .filter(|id| !emails.contains_key(id))
        .collect();
    assert_eq!(
        missing_emails.len(),
        0,
        "events without an email, e.g. {:?}",
        some(&missing_emails)
    );
    let foreign_emails: Vec<i64> = emails
        .keys()
        .copied()
        .filter(|id| !distinct.contains(id))
        .collect();
    assert_eq!(
        foreign_emails.len(),
        0,
        "emails of events never written, e.g. {:?}",
        some(&foreign_emails)
    );

    // Order: each customer's and each order's emails in event order.
    let owner: HashMap<i64, (i64, i64)> = written
        .iter()
        .map(|w| (w.id, (w.user_id, w.order_id)))
        .collect();
    let violations = out_of_order(&owner, &arrivals);
    assert!(
        violations.is_empty(),
        "{} emails out of event order, e.g. {:?}",
        violations.len(),
        &violations[..violations.len().min(5)]
    );
    Ok(Outcome {
        emails,
        restarts,
        rows_per_transaction,
    })
}

fn twice(emails: &HashMap<i64, usize>) -> Vec<i64> {
    let mut ids: Vec<i64> = emails
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| *id)
        .collect();
    ids.sort_unstable();
    ids
}

/// A backlog is recorded in multi-row inbox transactions (one per batch),
/// not one per email.
fn assert_batched(out: &Outcome) {
    assert!(
        out.rows_per_transaction >= 2.0,
        "{:.2} inbox rows per transaction: the claims were not batched",
        out.rows_per_transaction
    );
}

#[tokio::test]
async fn a_burst_of_20000_events_gets_20000_emails() -> anyhow::Result<()> {
    let out = burst(Source::Sql, &[Disruption::None], Sink::Smtp).await?;
    assert_batched(&out);
    assert_eq!(out.emails.len() as i64, EVENTS);
    assert_eq!(
        twice(&out.emails),
        Vec::<i64>::new(),
        "events emailed twice"
    );
    Ok(())
}

/// SIGTERM mid-burst: the notifier finishes its sends, commits and leaves
/// the group, so the next process sends nothing twice.
#[tokio::test]
async fn a_burst_with_the_notifier_restarted_mid_way_gets_each_email_once() -> anyhow::Result<()> {
    let out = burst(
        Source::Sql,
        &[Disruption::TerminateAt(EVENTS / 3)],
        Sink::Smtp,
    )
    .await?;
    assert_eq!(out.restarts, 1);
    assert_eq!(
        twice(&out.emails),
        Vec::<i64>::new(),
        "events emailed twice"
    );
    Ok(())
}

/// kill -9 mid-burst, twice: nothing is lost, every event has exactly one
/// inbox row, and each customer's and order's emails arrived in event
/// order. An email whose send completed just before the kill, with its
/// inbox row not yet committed, is sent again by the next process — at most
/// one per handler, which is all that can be in flight.
#[tokio::test]
async fn a_burst_with_the_notifier_killed_mid_way_loses_nothing() -> anyhow::Result<()> {
    let out = burst(
        Source::Sql,
        &[
            Disruption::Kill9At(EVENTS / 4),
            Disruption::Kill9At(EVENTS * 3 / 5),
        ],
        Sink::Smtp,
    )
    .await?;
    assert_eq!(out.restarts, 2);
    assert_batched(&out);
    let again = twice(&out.emails);
    println!("emailed twice after kill -9: {again:?}");
    assert!(
        again.len() <= 2 * IN_FLIGHT,
        "{} events emailed twice, more than were in flight: {again:?}",
        again.len()
    );
    Ok(())
}

/// 1,000 orders created over HTTP and 500 of them paid, through the
/// order-api binary with `--outbox-mode mode`, the relay, Apache Kafka and
/// the notifier, killed (-9) once a third of the events are handled if
/// `kill`: every `OrderCreated` and `OrderStatusChanged` has exactly one
/// inbox row (its id the one written) and at least one email, each order's
/// and customer's emails in event order. Without the kill every event is
/// emailed exactly once; with it, a send completed just before the kill is
/// repeated — at most one per handler.
async fn orders_over_http(mode: OutboxMode, kill: bool) -> anyhow::Result<()> {
    let source = Source::OrderApi(mode);
    let disruption = if kill {
        Disruption::Kill9At(source.events() / 3)
    } else {
        Disruption::None
    };
    let out = burst(source, &[disruption], Sink::Smtp).await?;
    assert_eq!(out.restarts, usize::from(kill));
    assert_eq!(out.emails.len() as i64, source.events());
    let again = twice(&out.emails);
    if kill {
        println!("emailed twice after kill -9: {again:?}");
        assert!(
            again.len() <= IN_FLIGHT,
            "{} events emailed twice, more than were in flight: {again:?}",
            again.len()
        );
    } else {
        assert_eq!(again, Vec::<i64>::new(), "events emailed twice");
    }
    Ok(())
}

#[tokio::test]
async fn orders_over_http_with_outbox_rows_are_each_emailed_through_a_kill_9() -> anyhow::Result<()>
{
    orders_over_http(OutboxMode::Table, true).await
}

/// The table-less outbox (issue #18): no outbox row, and the notifier, its
/// inbox included, unchanged.
#[tokio::test]
async fn orders_over_http_with_outbox_messages_are_each_emailed_through_a_kill_9(
) -> anyhow::Result<()> {
    orders_over_http(OutboxMode::Message, true).await
}

#[tokio::test]
async fn orders_over_http_with_outbox_messages_are_each_emailed_once() -> anyhow::Result<()> {
    orders_over_http(OutboxMode::Message, false).await
}

/// The batched inbox into the spool, killed (-9) twice mid-burst: the
/// 20,000 events were recorded in multi-row transactions, each has exactly
/// one inbox row and exactly one `.eml` file (named after it, none left
/// half-written), and each customer's rows were committed in event order.
/// (A file written again after a kill replaces itself: the spool is
/// idempotent per event.)
#[tokio::test]
async fn a_burst_into_the_spool_killed_mid_way_gets_one_file_per_event() -> anyhow::Result<()> {
    let out = burst(
        Source::Sql,
        &[
            Disruption::Kill9At(EVENTS / 4),
            Disruption::Kill9At(EVENTS * 3 / 5),
        ],
        Sink::Spool,
    )
    .await?;
    assert_eq!(out.restarts, 2);
    assert_batched(&out);
    assert_eq!(out.emails.len() as i64, EVENTS);
    assert_eq!(
        twice(&out.emails),
        Vec::<i64>::new(),
        "events with two files"
    );
    Ok(())
}
