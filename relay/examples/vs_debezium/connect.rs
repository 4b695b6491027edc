//! Kafka Connect standalone with Debezium's Postgres connector and its
//! Outbox Event Router, run as a child process: its settings
//! ([`DEBEZIUM_SETTINGS`], printed with every run), its start, its
//! connector's state and its topic's record count.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use devstack::bench::ScratchDb;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

use crate::Args;

/// Debezium's connector and worker settings beyond the essentials: as its
/// documentation advises for low latency and high throughput (batches and
/// queue larger than the defaults 2048/8192, a short poll interval instead
/// of 500 ms, the producer's linger at 1 ms, offsets flushed every second).
pub const DEBEZIUM_SETTINGS: &[(&str, &str)] = &[
    ("poll.interval.ms", "5"),
    ("max.batch.size", "8192"),
    ("max.queue.size", "65536"),
    ("producer.override.linger.ms", "1"),
    ("producer.override.batch.size", "262144"),
    ("offset.flush.interval.ms", "1000"),
    // What its docs advise when other tables take most of the writes, so
    // that its slot's confirmed position keeps moving: a heartbeat every
    // 10 s that also writes a row of a captured table (see `setup`).
    ("heartbeat.interval.ms", "10000"),
    ("heartbeat.action.query", HEARTBEAT_QUERY),
    ("heap (-Xmx)", "1G"),
];

/// A directory for one run's Connect files (worker and connector
/// properties, offsets, log).
pub fn tempdir(name: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("vs-debezium-{name}"));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The topic Debezium's heartbeats go to (`topic.prefix` is `vsdbz`).
pub const HEARTBEAT_TOPIC: &str = "__debezium-heartbeat.vsdbz";
/// Where the changes of its heartbeat table go (not through the router).
pub const HEARTBEAT_TABLE_TOPIC: &str = "vsdbz.public.debezium_heartbeat";
const HEARTBEAT_QUERY: &str = "INSERT INTO debezium_heartbeat (id, ts) VALUES (1, now()) \
     ON CONFLICT (id) DO UPDATE SET ts = excluded.ts";

/// What Debezium needs in a database besides its slot: its heartbeat
/// table and its publication (the outbox and that table), and its topics
/// beside the outbox's (the stack's broker does not create topics on use).
pub async fn setup(client: &tokio_postgres::Client, bootstrap: &str) -> anyhow::Result<()> {
    client
        .batch_execute(
            "CREATE TABLE debezium_heartbeat (id int PRIMARY KEY, ts timestamptz NOT NULL); \
             CREATE PUBLICATION debezium_pub FOR TABLE outbox, debezium_heartbeat",
        )
        .await?;
    for topic in [HEARTBEAT_TOPIC, HEARTBEAT_TABLE_TOPIC] {
        devstack::kafka::create_topic(bootstrap, topic, 1).await?;
    }
    Ok(())
}

/// How Connect runs the connector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `ConnectStandalone`, offsets in a file: at-least-once, as Kafka
    /// Connect runs a source by default.
    Standalone,
    /// `ConnectDistributed` with `exactly.once.source.support=enabled`
    /// (KIP-618): records and offsets in one Kafka transaction per poll,
    /// the connector configured with `exactly.once.support=required`.
    ExactlyOnce,
}

/// Kafka Connect with the Debezium connector, as a child process.
pub struct Connect {
    pub child: tokio::process::Child,
    pub pid: u32,
    pub started: Instant,
    rest: u16,
    /// Distributed mode: the connector's configuration, PUT over REST once
    /// the worker answers (it is then kept in the config topic).
    pending_config: Option<String>,
}

impl Connect {
    pub fn spawn(
        args: &Args,
        db: &ScratchDb,
        slot: &str,
        dir: &Path,
        mode: Mode,
    ) -> anyhow::Result<Connect> {
        Connect::spawn_with(args, db, dir, mode, connector_config(db, slot)?)
    }

    /// [`Connect::spawn`] with a connector configuration of the caller's.
    pub fn spawn_with(
        args: &Args,
        db: &ScratchDb,
        dir: &Path,
        mode: Mode,
        mut connector: Vec<(String, String)>,
    ) -> anyhow::Result<Connect> {
        let rest = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut worker = format!(
            "bootstrap.servers={bootstrap}\n\
             key.converter=org.apache.kafka.connect.storage.StringConverter\n\
             value.converter=org.apache.kafka.connect.json.JsonConverter\n\
             value.converter.schemas.enable=false\n\
             offset.flush.interval.ms={flush}\n\
             listeners=http://127.0.0.1:{rest}\n\
             connector.client.config.override.policy=All\n",
            bootstrap = args.stack.kafka_bootstrap_servers,
            flush = setting("offset.flush.interval.ms"),
        );
        let (class, pending_config) = match mode {
            Mode::Standalone => {
                worker.push_str(&format!(
                    "offset.storage.file.filename={}\n",
                    dir.join("offsets").display()
                ));
                ("org.apache.kafka.connect.cli.ConnectStandalone", None)
            }
            Mode::ExactlyOnce => {
                // Its own group and internal topics per database, so runs
                // never share state.
                let group = format!("{}-eos", db.name);
                worker.push_str(&format!(
                    "group.id={group}\n\
                     config.storage.topic={group}-configs\n\
                     offset.storage.topic={group}-offsets\n\
                     status.storage.topic={group}-status\n\
                     config.storage.replication.factor=1\n\
                     offset.storage.replication.factor=1\n\
                     status.storage.replication.factor=1\n\
                     exactly.once.source.support=enabled\n"
                ));
                connector.push(("exactly.once.support".into(), "required".into()));
                connector.push(("transaction.boundary".into(), "poll".into()));
                let config: serde_json::Map<String, serde_json::Value> = connector
                    .iter()
                    .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                    .collect();
                (
                    "org.apache.kafka.connect.cli.ConnectDistributed",
                    Some(serde_json::Value::Object(config).to_string()),
                )
            }
        };
        let worker_file = dir.join("worker.properties");
        std::fs::write(&worker_file, worker)?;
        let mut command = tokio::process::Command::new("java");
        command
            .arg(format!("-Xmx{}", setting("heap (-Xmx)")))
            .arg("-cp")
            .arg(format!("{}/*", args.connect_libs.display()))
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                args.log4j.display()
            ))
            .arg(class)
            .arg(&worker_file);
        if mode == Mode::Standalone {
            let connector_file = dir.join("connector.properties");
            let text: String = connector
                .iter()
                .map(|(k, v)| format!("{k}={v}\n"))
                .collect();
            std::fs::write(&connector_file, text)?;
            command.arg(&connector_file);
        }
        // Appended: a restarted Connect (the crash run) keeps one log.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("connect.log"))?;
        let started = Instant::now();
        let child = command
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("starting Kafka Connect (java)")?;
        let pid = child.id().context("connect pid")?;
        Ok(Connect {
            child,
            pid,
            started,
            rest,
            pending_config,
        })
    }

    /// Waits until the connector's task runs (in distributed mode, first
    /// gives the worker the connector's configuration).
    pub async fn wait_running(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let addr = format!("127.0.0.1:{}", self.rest).parse()?;
        let deadline = Instant::now() + timeout;
        let mut last_reply = String::new();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("Kafka Connect exited: {status}");
            }
            if let Some(config) = &self.pending_config {
                // PUT creates or updates: a restarted worker may already
                // have it from its config topic. Until the worker has
                // joined its group it answers 404 or 409: asked again.
                if let Ok(reply) =
                    http_put_json(addr, "/connectors/outbox-debezium/config", config).await
                {
                    if reply.split(' ').nth(1).is_some_and(|s| s.starts_with('2')) {
                        self.pending_config = None;
                    } else {
                        last_reply = reply;
                    }
                }
            } else if let Ok(body) =
                devstack::bench::http_get(addr, "/connectors/outbox-debezium/status").await
            {
                if body.matches("\"RUNNING\"").count() >= 2 {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("the Debezium connector did not run within {timeout:?} (Connect's last answer: {last_reply})");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn kill(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

fn setting(key: &str) -> &'static str {
    DEBEZIUM_SETTINGS
        .iter()
        .find(|(n, _)| *n == key)
        .map(|(_, v)| *v)
        .expect("listed")
}

/// The connector's configuration: the essentials (pgoutput, its slot and
/// publication, the Outbox Event Router as the relay's record shape needs
/// it) and the tuning of [`DEBEZIUM_SETTINGS`].
///
/// The relay's own heartbeats are logical decoding messages in the same
/// database; Debezium would stream them to `vsdbz.message` (a topic nobody
/// created, which blocks its producer), so they are excluded by prefix.
fn connector_config(db: &ScratchDb, slot: &str) -> anyhow::Result<Vec<(String, String)>> {
    let mut config = essentials(db, slot)?;
    config.extend(
        [
            ("transforms.outbox.table.field.event.id", "id".to_owned()),
            (
                "transforms.outbox.table.field.event.key",
                "user_id".to_owned(),
            ),
            (
                "transforms.outbox.table.field.event.payload",
                "payload".to_owned(),
            ),
            (
                "transforms.outbox.route.by.field",
                "aggregate_type".to_owned(),
            ),
            (
                "transforms.outbox.route.topic.replacement",
                format!("{}.${{routedByValue}}", db.name),
            ),
            (
                "transforms.outbox.table.fields.additional.placement",
                "event_type:header:event_type,created_at:header:created_at".to_owned(),
            ),
            (
                "transforms.outbox.table.expand.json.payload",
                "true".to_owned(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v)),
    );
    for key in [
        "poll.interval.ms",
        "max.batch.size",
        "max.queue.size",
        "producer.override.linger.ms",
        "producer.override.batch.size",
        "heartbeat.interval.ms",
        "heartbeat.action.query",
    ] {
        config.push((key.to_owned(), setting(key).to_owned()));
    }
    Ok(config)
}

/// The Outbox Event Router with its defaults except the names of this
/// outbox table's columns (`scripts/bench debezium-compat`): Debezium's
/// `aggregateid` is `aggregate_id`, `aggregatetype` is `aggregate_type`,
/// `type` is `event_type`; `id` and `payload` are its defaults already.
/// Everything else — `route.topic.replacement`
/// (`outbox.event.${routedByValue}`), no additional fields, no JSON
/// expansion, the worker's converters — is as it comes.
pub fn router_defaults_config(db: &ScratchDb, slot: &str) -> anyhow::Result<Vec<(String, String)>> {
    let mut config = essentials(db, slot)?;
    for (k, v) in ROUTER_COLUMN_NAMES {
        config.push((format!("transforms.outbox.{k}"), (*v).to_owned()));
    }
    config.push((
        "poll.interval.ms".into(),
        setting("poll.interval.ms").into(),
    ));
    Ok(config)
}

/// The router settings `debezium-compat` changes: column names only.
pub const ROUTER_COLUMN_NAMES: &[(&str, &str)] = &[
    ("table.field.event.key", "aggregate_id"),
    ("route.by.field", "aggregate_type"),
    ("table.field.event.type", "event_type"),
];

/// The connector without router settings beyond its type: pgoutput, its
/// slot and publication, the outbox only through the router.
fn essentials(db: &ScratchDb, slot: &str) -> anyhow::Result<Vec<(String, String)>> {
    let pg = pgconn::ConnectParams::from_url(&db.url).context("database URL")?;
    let config: Vec<(String, String)> = [
        ("name", "outbox-debezium".to_owned()),
        (
            "connector.class",
            "io.debezium.connector.postgresql.PostgresConnector".to_owned(),
        ),
        ("tasks.max", "1".to_owned()),
        ("plugin.name", "pgoutput".to_owned()),
        ("database.hostname", pg.host.clone()),
        ("database.port", pg.port.to_string()),
        ("database.user", pg.user.clone()),
        ("database.password", pg.password.clone().unwrap_or_default()),
        ("database.dbname", db.name.clone()),
        ("topic.prefix", "vsdbz".to_owned()),
        ("slot.name", slot.to_owned()),
        ("publication.name", "debezium_pub".to_owned()),
        ("publication.autocreate.mode", "disabled".to_owned()),
        (
            "table.include.list",
            "public.outbox,public.debezium_heartbeat".to_owned(),
        ),
        ("snapshot.mode", "no_data".to_owned()),
        (
            "message.prefix.exclude.list",
            "outbox-relay.heartbeat".to_owned(),
        ),
        ("transforms", "outbox".to_owned()),
        (
            "transforms.outbox.type",
            "io.debezium.transforms.outbox.EventRouter".to_owned(),
        ),
        ("transforms.outbox.predicate", "isOutbox".to_owned()),
        ("predicates", "isOutbox".to_owned()),
        (
            "predicates.isOutbox.type",
            "org.apache.kafka.connect.transforms.predicates.TopicNameMatches".to_owned(),
        ),
        (
            "predicates.isOutbox.pattern",
            "vsdbz.public.outbox".to_owned(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    Ok(config)
}

/// A minimal HTTP/1.1 PUT of a JSON body; the whole reply (status line
/// first).
async fn http_put_json(addr: SocketAddr, path: &str, body: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!(
            "PUT {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).await?;
    Ok(reply)
}

/// The sum of a topic's high watermarks: its record count when no
/// transactional producer wrote to it.
pub struct Watermarks {
    consumer: BaseConsumer,
    topic: String,
    partitions: i32,
}

impl Watermarks {
    pub fn new(bootstrap: &str, topic: &str) -> anyhow::Result<Watermarks> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .create()?;
        let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let partitions = md.topics()[0].partitions().len() as i32;
        Ok(Watermarks {
            consumer,
            topic: topic.to_owned(),
            partitions,
        })
    }

    pub fn total(&self) -> anyhow::Result<u64> {
        let mut sum = 0;
        for p in 0..self.partitions {
            let (_, high) =
                self.consumer
                    .fetch_watermarks(&self.topic, p, Duration::from_secs(5))?;
            sum += high.max(0) as u64;
        }
        Ok(sum)
    }
}
