//! What the relay's integration tests share: a relay started in-process on a
//! test database, outbox inserts, and reading the records' headers back.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use devstack::kafka::{Record, TopicReader};
use devstack::testing::{kafka_bootstrap, wait_for};
use outbox_record::header;
use relay::config::Config;
use relay::http::{RelayState, Shared};
use relay::lsn::Lsn;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A relay running in-process.
pub struct Running {
    pub stop: CancellationToken,
    pub task: JoinHandle<Result<(), relay::pipeline::RelayError>>,
    pub shared: Arc<Shared>,
}

impl Running {
    /// Graceful stop (flush, confirm); fails if the relay failed.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.task.await??;
        Ok(())
    }
}

/// Test settings: short status and backoff intervals, HTTP on a free port;
/// options in `extra` are added or replace these.
pub fn relay_config(
    database_url: &str,
    slot: &str,
    topic: &str,
    bootstrap: &str,
    extra: &[&str],
) -> Config {
    Config::try_parse_from(relay_args(database_url, slot, topic, bootstrap, extra))
        .expect("valid test config")
}

/// The command line of [`relay_config`], for running the binary.
pub fn relay_args(
    database_url: &str,
    slot: &str,
    topic: &str,
    bootstrap: &str,
    extra: &[&str],
) -> Vec<String> {
    let base = [
        ("--database-url", database_url),
        ("--slot", slot),
        ("--topic", topic),
        ("--kafka-bootstrap-servers", bootstrap),
        ("--listen", "127.0.0.1:0"),
        ("--status-interval", "200ms"),
        ("--lag-sample-interval", "200ms"),
        ("--max-backoff", "1s"),
    ];
    let mut args = vec!["relay".to_owned()];
    // An option in `extra` replaces the default here.
    for (flag, value) in base {
        if !extra.contains(&flag) {
            args.extend([flag.to_owned(), value.to_owned()]);
        }
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Starts the relay in-process and waits until it streams (its slot exists,
/// so every later commit will reach it).
pub async fn start(cfg: Config) -> Running {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("relay=debug")
        .try_init();
    let stop = CancellationToken::new();
    let shared = Shared::new(&cfg.slot, &cfg.publication);
    let task = tokio::spawn(relay::pipeline::run_with(cfg, stop.clone(), shared.clone()));
    wait_for("the relay to stream", Duration::from_secs(30), || async {
        let s = shared.snapshot();
        assert!(
            s.state != RelayState::Failed,
            "relay failed: {:?}",
            s.last_error
        );
        Ok((s.state == RelayState::Streaming).then_some(()))
    })
    .await
    .expect("relay streams");
    Running { stop, task, shared }
}

/// Inserts one outbox row in its own transaction; returns its id.
pub async fn insert_event(
    client: &tokio_postgres::Client,
    user_id: i64,
    event_type: &str,
) -> anyhow::Result<i64> {
    let row = client
        .query_one(
            "INSERT INTO outbox (aggregate_type, aggregate_id, user_id, event_type, payload) \
             VALUES ('order', $1::bigint::text, $1, $2, jsonb_build_object('user', $1)) RETURNING id",
            &[&user_id, &event_type],
        )
        .await?;
    Ok(row.get(0))
}

/// Inserts `n` outbox rows in one transaction (user ids spread over `users`
/// keys starting at `first_user`).
pub async fn insert_batch(
    client: &tokio_postgres::Client,
    first_user: i64,
    n: i32,
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO outbox (aggregate_type, aggregate_id, user_id, event_type, payload) \
             SELECT 'order', g::text, ($1::bigint + g % 7), 'E', '{}'::jsonb \
             FROM generate_series(1, $2::int) g",
            &[&first_user, &n],
        )
        .await
}

/// A small event, a 2 MB incompressible one (over Kafka's default limits)
/// and 20 small ones, each in its own transaction (so that records behind
/// the large one are in flight when it is refused); the ids of the first,
/// the large one and the rest, and the WAL position right after the large
/// one's commit.
pub async fn commit_poisoned(
    c: &tokio_postgres::Client,
) -> anyhow::Result<((i64, i64, Vec<i64>), Lsn)> {
    let first = insert_event(c, 1, "OrderCreated").await?;
    let big: i64 = c
        .query_one(
            "INSERT INTO outbox (aggregate_type, aggregate_id, user_id, event_type, payload) \
             SELECT 'order', '2', 2, 'OrderCreated', jsonb_build_object('blob', \
                 (SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 65000))) \
             RETURNING id",
            &[],
        )
        .await?
        .get(0);
    let after_big = current_wal_lsn(c).await?;
    let mut rest = Vec::new();
    for user in 3..23 {
        rest.push(insert_event(c, user, "OrderCreated").await?);
    }
    Ok(((first, big, rest), after_big))
}

/// The event ids in `topic`, each with its count, once `want` are there.
pub async fn topic_ids(topic: &str, want: usize) -> anyhow::Result<Vec<i64>> {
    let records = devstack::kafka::TopicReader::new(&kafka_bootstrap(), topic, true)?
        .read_at_least(want, Duration::from_secs(60), Duration::from_secs(1))
        .await?;
    Ok(records
        .iter()
        .filter_map(|r| r.header(header::EVENT_ID)?.parse().ok())
        .collect())
}

/// The `lsn` and `seq` headers: a record's position in commit order.
pub fn lsn_seq(r: &Record) -> (Lsn, u64) {
    let lsn = r
        .header(header::LSN)
        .expect("lsn header")
        .parse()
        .expect("lsn parses");
    let seq = r
        .header(header::SEQ)
        .expect("seq header")
        .parse()
        .expect("seq parses");
    (lsn, seq)
}

pub fn event_id(r: &Record) -> i64 {
    r.header(header::EVENT_ID)
        .expect("event_id header")
        .parse()
        .expect("numeric id")
}

/// The slot's `confirmed_flush_lsn`, if the slot exists.
pub async fn slot_confirmed(
    client: &tokio_postgres::Client,
    slot: &str,
) -> anyhow::Result<Option<Lsn>> {
    let row = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row
        .and_then(|r| r.get::<_, Option<String>>(0))
        .and_then(|s| s.parse().ok()))
}

pub async fn current_wal_lsn(client: &tokio_postgres::Client) -> anyhow::Result<Lsn> {
    let text: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    Ok(text.parse()?)
}

/// Every id in the outbox table.
pub async fn outbox_ids(client: &tokio_postgres::Client) -> anyhow::Result<BTreeSet<i64>> {
    Ok(client
        .query("SELECT id FROM outbox", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Reads the topic from the beginning until every id in `expected` has
/// appeared; returns all records read (duplicates included). Fails naming
/// the missing ids when they do not all arrive within `timeout`.
pub async fn read_until_all(
    bootstrap: &str,
    topic: &str,
    expected: &BTreeSet<i64>,
    timeout: Duration,
) -> anyhow::Result<Vec<Record>> {
    read_until_all_isolated(bootstrap, topic, expected, timeout, false).await
}

/// [`read_until_all`]; `read_committed` skips records of open and aborted
/// Kafka transactions (`--kafka-transactions`).
pub async fn read_until_all_isolated(
    bootstrap: &str,
    topic: &str,
    expected: &BTreeSet<i64>,
    timeout: Duration,
    read_committed: bool,
) -> anyhow::Result<Vec<Record>> {
    let reader = TopicReader::with_isolation(bootstrap, topic, true, read_committed)?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut records = Vec::new();
    let mut seen = BTreeSet::new();
    while !expected.is_subset(&seen) {
        if tokio::time::Instant::now() >= deadline {
            let missing: Vec<_> = expected.difference(&seen).take(20).collect();
            anyhow::bail!(
                "{} of {} events never reached {topic}, e.g. {missing:?}",
                expected.difference(&seen).count(),
                expected.len()
            );
        }
        if let Some(r) = reader.next(Duration::from_millis(500)).await? {
            seen.insert(event_id(&r));
            records.push(r);
        }
    }
    // Whatever else is already there (duplicates) within a short quiet time.
    while let Some(r) = reader.next(Duration::from_secs(1)).await? {
        records.push(r);
    }
    Ok(records)
}

/// `GET path` on the relay's HTTP server; the body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await?;
    Ok(buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default())
}

/// Writes transactions of 1..=10 rows until `stop` is set, reconnecting when
/// the server goes away. Returns how many statements committed.
pub fn spawn_writer(url: String, stop: Arc<AtomicBool>) -> JoinHandle<anyhow::Result<usize>> {
    tokio::spawn(async move {
        let mut committed = 0usize;
        let mut n = 0i32;
        'connect: while !stop.load(Ordering::Relaxed) {
            let Ok(client) = devstack::testing::connect(&url).await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            while !stop.load(Ordering::Relaxed) {
                n = n % 10 + 1;
                match insert_batch(&client, i64::from(n) * 10, n).await {
                    Ok(_) => committed += 1,
                    // The server went away mid-statement: whether that one
                    // committed is unknown; the table says, later.
                    Err(_) => continue 'connect,
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        Ok(committed)
    })
}

/// Per partition, positions strictly increase: commit order, statement
/// order, and (exactly-once) no replayed stretch.
pub fn assert_commit_order(records: &[Record]) {
    let mut last: std::collections::HashMap<i32, (Lsn, u64)> = Default::default();
    for r in records {
        let pos = lsn_seq(r);
        if let Some(prev) = last.insert(r.partition, pos) {
            assert!(
                prev < pos,
                "partition {} out of order: {prev:?} then {pos:?}",
                r.partition
            );
        }
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The relay binary as a child process, killable with SIGKILL.
pub struct RelayProcess {
    pub child: tokio::process::Child,
    pub addr: std::net::SocketAddr,
}

impl RelayProcess {
    /// Starts the binary and waits until it streams.
    pub async fn spawn(args: &[String]) -> anyhow::Result<RelayProcess> {
        let mut p = Self::spawn_only(args)?;
        p.wait_state("streaming").await?;
        Ok(p)
    }

    /// Starts the binary without waiting.
    pub fn spawn_only(args: &[String]) -> anyhow::Result<RelayProcess> {
        let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
        let mut args = args[1..].to_vec();
        let listen = args.iter().position(|a| a == "--listen").expect("--listen") + 1;
        args[listen] = addr.to_string();
        // RELAY_TEST_LOG overrides the level (e.g. `relay=info,relay::pipeline=debug`).
        let log = std::env::var("RELAY_TEST_LOG").unwrap_or_else(|_| "relay=info".into());
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_relay"))
            .args(&args)
            .env("RUST_LOG", log)
            .env("NO_COLOR", "1")
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        // Each line prefixed with the process id, so the logs of relays
        // running side by side can be told apart.
        if let (Some(stderr), Some(pid)) = (child.stderr.take(), child.id()) {
            tokio::spawn(async move {
                use tokio::io::AsyncBufReadExt;
                let mut lines = tokio::io::BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    eprintln!("[relay {pid}] {line}");
                }
            });
        }
        Ok(RelayProcess { child, addr })
    }

    /// Waits until `/status` reports `state`.
    pub async fn wait_state(&mut self, state: &str) -> anyhow::Result<()> {
        let addr = self.addr;
        let child = &mut self.child;
        let needle = format!("\"state\":\"{state}\"");
        wait_for(
            &format!("the relay process to be {state}"),
            Duration::from_secs(30),
            || {
                let exited = child.try_wait().ok().flatten();
                let needle = needle.clone();
                async move {
                    anyhow::ensure!(exited.is_none(), "relay exited: {exited:?}");
                    let body = http_get(addr, "/status").await.unwrap_or_default();
                    Ok(body.contains(needle.as_str()).then_some(()))
                }
            },
        )
        .await
    }

    /// SIGKILL: no flush, no final confirmation.
    pub async fn kill_9(mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }
}

impl RelayProcess {
    /// SIGTERM, the graceful stop (flush, confirm), as an operator stops
    /// it; the exit status.
    pub async fn terminate(mut self) -> anyhow::Result<std::process::ExitStatus> {
        let pid = self
            .child
            .id()
            .ok_or_else(|| anyhow::anyhow!("the relay already exited"))?;
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        anyhow::ensure!(sent.success(), "kill -TERM {pid}: {sent}");
        Ok(tokio::time::timeout(Duration::from_secs(60), self.child.wait()).await??)
    }
}

/// Runs the relay binary with a [`relay_args`] command line (`relay`
/// first) followed by `command` (e.g. `verify --json`), and parses what it
/// prints as JSON; the exit status with it.
pub async fn relay_json(
    args: &[String],
    command: &[&str],
) -> anyhow::Result<(i32, serde_json::Value)> {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_relay"))
        .args(&args[1..])
        .args(command)
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .output()
        .await?;
    let code = out.status.code().unwrap_or(-1);
    let json = serde_json::from_slice(&out.stdout).map_err(|e| {
        anyhow::anyhow!(
            "relay {command:?} printed no JSON ({e}), exit {code}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    Ok((code, json))
}
