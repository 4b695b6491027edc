//! Kafka Connect standalone with Debezium's Postgres connector and its
//! Outbox Event Router, run as a child process: its settings
//! ([`DEBEZIUM_SETTINGS`], printed with every run), its start, its
//! connector's state and its topic's record count.

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

/// Kafka Connect standalone with the Debezium connector, as a child process.
pub struct Connect {
    pub child: tokio::process::Child,
    pub pid: u32,
    pub started: Instant,
    rest: u16,
}

impl Connect {
    pub fn spawn(args: &Args, db: &ScratchDb, slot: &str, dir: &Path) -> anyhow::Result<Connect> {
        let pg = pgconn::ConnectParams::from_url(&db.url).context("database URL")?;
        let rest = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let setting = |k: &str| {
            DEBEZIUM_SETTINGS
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| *v)
                .expect("listed")
        };
        let worker = format!(
            "bootstrap.servers={bootstrap}\n\
             key.converter=org.apache.kafka.connect.storage.StringConverter\n\
             value.converter=org.apache.kafka.connect.json.JsonConverter\n\
             value.converter.schemas.enable=false\n\
             offset.storage.file.filename={offsets}\n\
             offset.flush.interval.ms={flush}\n\
             listeners=http://127.0.0.1:{rest}\n\
             connector.client.config.override.policy=All\n",
            bootstrap = args.stack.kafka_bootstrap_servers,
            offsets = dir.join("offsets").display(),
            flush = setting("offset.flush.interval.ms"),
        );
        // The relay's own heartbeats are logical decoding messages in the
        // same database; Debezium would stream them to `vsdbz.message`
        // (a topic nobody created, which blocks its producer), so they are
        // excluded by prefix.
        let mut connector = format!(
            "name=outbox-debezium\n\
             connector.class=io.debezium.connector.postgresql.PostgresConnector\n\
             tasks.max=1\n\
             plugin.name=pgoutput\n\
             database.hostname={host}\n\
             database.port={port}\n\
             database.user={user}\n\
             database.password={password}\n\
             database.dbname={dbname}\n\
             topic.prefix=vsdbz\n\
             slot.name={slot}\n\
             publication.name=debezium_pub\n\
             publication.autocreate.mode=disabled\n\
             table.include.list=public.outbox,public.debezium_heartbeat\n\
             snapshot.mode=no_data\n\
             message.prefix.exclude.list=outbox-relay.heartbeat\n\
             transforms=outbox\n\
             transforms.outbox.type=io.debezium.transforms.outbox.EventRouter\n\
             transforms.outbox.predicate=isOutbox\n\
             predicates=isOutbox\n\
             predicates.isOutbox.type=org.apache.kafka.connect.transforms.predicates.TopicNameMatches\n\
             predicates.isOutbox.pattern=vsdbz.public.outbox\n\
             transforms.outbox.table.field.event.id=id\n\
             transforms.outbox.table.field.event.key=user_id\n\
             transforms.outbox.table.field.event.payload=payload\n\
             transforms.outbox.route.by.field=aggregate_type\n\
             transforms.outbox.route.topic.replacement={dbname}.${{routedByValue}}\n\
             transforms.outbox.table.fields.additional.placement=event_type:header:event_type,created_at:header:created_at\n\
             transforms.outbox.table.expand.json.payload=true\n",
            host = pg.host,
            port = pg.port,
            user = pg.user,
            password = pg.password.unwrap_or_default(),
            dbname = db.name,
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
            connector.push_str(&format!("{key}={}\n", setting(key)));
        }
        let (worker_file, connector_file) = (
            dir.join("worker.properties"),
            dir.join("connector.properties"),
        );
        std::fs::write(&worker_file, worker)?;
        std::fs::write(&connector_file, connector)?;
        // Appended: a restarted Connect (the crash run) keeps one log.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("connect.log"))?;
        let started = Instant::now();
        let child = tokio::process::Command::new("java")
            .arg(format!("-Xmx{}", setting("heap (-Xmx)")))
            .arg("-cp")
            .arg(format!("{}/*", args.connect_libs.display()))
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                args.log4j.display()
            ))
            .arg("org.apache.kafka.connect.cli.ConnectStandalone")
            .arg(&worker_file)
            .arg(&connector_file)
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
        })
    }

    /// Waits until the connector's task runs.
    pub async fn wait_running(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let addr = format!("127.0.0.1:{}", self.rest).parse()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("Kafka Connect exited: {status}");
            }
            if let Ok(body) =
                devstack::bench::http_get(addr, "/connectors/outbox-debezium/status").await
            {
                if body.matches("\"RUNNING\"").count() >= 2 {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("the Debezium connector did not run within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn kill(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
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
