//! `devstack`: the local stack's command-line tool (used by `scripts/up` and
//! `scripts/test`, and by people watching the topic without kcat).

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use lifecycle::parse_duration;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::ClientConfig;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "devstack",
    version,
    about = "Tooling for the local outbox-relay stack"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the migrations in `migrations/` that are not applied yet.
    Migrate {
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
    /// Print the broker's metadata (brokers and topics); fails if unreachable.
    Metadata {
        #[arg(
            long,
            env = "KAFKA_BOOTSTRAP_SERVERS",
            default_value = "127.0.0.1:9092"
        )]
        bootstrap_servers: String,
        /// How long to wait for the broker.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Create a topic through the Admin API (no-op if it exists).
    CreateTopic {
        #[arg(
            long,
            env = "KAFKA_BOOTSTRAP_SERVERS",
            default_value = "127.0.0.1:9092"
        )]
        bootstrap_servers: String,
        #[arg(long, env = "OUTBOX_TOPIC", default_value = "microshop.order-outbox")]
        topic: String,
        #[arg(long, default_value_t = 3)]
        partitions: i32,
    },
    /// Delete the topics and consumer groups whose names start with the
    /// prefixes given (what benchmark runs leave on the broker); prints
    /// the counts deleted.
    DeleteByPrefix {
        #[arg(
            long,
            env = "KAFKA_BOOTSTRAP_SERVERS",
            default_value = "127.0.0.1:9092"
        )]
        bootstrap_servers: String,
        /// A topic name prefix (repeatable).
        #[arg(long = "topic-prefix")]
        topic_prefixes: Vec<String>,
        /// A consumer group name prefix (repeatable).
        #[arg(long = "group-prefix")]
        group_prefixes: Vec<String>,
    },
    /// Print a topic's records as JSON lines: partition, offset, key, headers, value.
    Watch {
        #[arg(
            long,
            env = "KAFKA_BOOTSTRAP_SERVERS",
            default_value = "127.0.0.1:9092"
        )]
        bootstrap_servers: String,
        #[arg(long, env = "OUTBOX_TOPIC", default_value = "microshop.order-outbox")]
        topic: String,
        /// Start at the beginning of each partition (default: only new records).
        #[arg(long)]
        from_beginning: bool,
        /// Keep waiting for new records; without it, stop once nothing new
        /// arrives for `--idle`.
        #[arg(long)]
        follow: bool,
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        idle: Duration,
    },
    /// Produce each line of standard input as one record (value = the line,
    /// no key) and wait until Kafka acknowledged every one (acks=all);
    /// prints how many.
    Produce {
        #[arg(
            long,
            env = "KAFKA_BOOTSTRAP_SERVERS",
            default_value = "127.0.0.1:9092"
        )]
        bootstrap_servers: String,
        #[arg(long, env = "OUTBOX_TOPIC", default_value = "microshop.order-outbox")]
        topic: String,
    },
    /// Run librdkafka's mock cluster (an in-memory Kafka-protocol broker)
    /// until Ctrl-C/SIGTERM, with one topic; prints `bootstrap HOST:PORT`.
    /// Benchmarks use it to measure the relay without the stack's broker.
    MockCluster {
        #[arg(long, default_value_t = 1)]
        brokers: i32,
        #[arg(long, env = "OUTBOX_TOPIC", default_value = "microshop.order-outbox")]
        topic: String,
        #[arg(long, default_value_t = 12)]
        partitions: i32,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Migrate { database_url } => {
            let applied = devstack::migrations::apply(&database_url).await?;
            if applied.is_empty() {
                println!("migrations: up to date");
            }
            for m in applied {
                println!("migrations: applied V{}__{}", m.version, m.name);
            }
        }
        Command::Metadata {
            bootstrap_servers,
            timeout,
        } => {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &bootstrap_servers)
                .create()
                .context("creating Kafka client")?;
            let md = tokio::task::spawn_blocking(move || consumer.fetch_metadata(None, timeout))
                .await?
                .with_context(|| format!("fetching metadata from {bootstrap_servers}"))?;
            for b in md.brokers() {
                println!("broker {} {}:{}", b.id(), b.host(), b.port());
            }
            for t in md.topics() {
                println!("topic {} partitions={}", t.name(), t.partitions().len());
            }
        }
        Command::CreateTopic {
            bootstrap_servers,
            topic,
            partitions,
        } => {
            devstack::kafka::create_topic(&bootstrap_servers, &topic, partitions).await?;
            println!("topic {topic} ready");
        }
        Command::DeleteByPrefix {
            bootstrap_servers,
            topic_prefixes,
            group_prefixes,
        } => {
            let deleted = devstack::kafka::delete_by_prefix(
                &bootstrap_servers,
                &topic_prefixes,
                &group_prefixes,
            )
            .await?;
            println!(
                "deleted {} topics, {} consumer groups",
                deleted.topics.len(),
                deleted.groups.len()
            );
        }
        Command::Watch {
            bootstrap_servers,
            topic,
            from_beginning,
            follow,
            idle,
        } => {
            let reader =
                devstack::kafka::TopicReader::new(&bootstrap_servers, &topic, from_beginning)?;
            let wait = if follow {
                Duration::from_secs(3600)
            } else {
                idle
            };
            loop {
                match reader.next(wait).await? {
                    Some(record) => println!("{}", record.to_json()),
                    None if follow => continue,
                    None => break,
                }
            }
        }
        Command::Produce {
            bootstrap_servers,
            topic,
        } => {
            use rdkafka::producer::{FutureProducer, FutureRecord};
            use std::io::BufRead;
            let producer: FutureProducer = ClientConfig::new()
                .set("bootstrap.servers", &bootstrap_servers)
                .set("enable.idempotence", "true")
                .set("acks", "all")
                .create()
                .context("creating Kafka producer")?;
            let mut acks = Vec::new();
            for line in std::io::stdin().lock().lines() {
                let line = line.context("reading standard input")?;
                let record = FutureRecord::<(), str>::to(&topic).payload(&line);
                let ack = producer
                    .send_result(record)
                    .map_err(|(e, _)| e)
                    .with_context(|| format!("producing to {topic}"))?;
                acks.push(ack);
            }
            let count = acks.len();
            for ack in acks {
                ack.await
                    .context("producer dropped")?
                    .map_err(|(e, _)| e)
                    .with_context(|| format!("producing to {topic}"))?;
            }
            println!("produced {count} records to {topic}");
        }
        Command::MockCluster {
            brokers,
            topic,
            partitions,
        } => {
            let mock = MockCluster::new(brokers).context("starting the mock cluster")?;
            mock.create_topic(&topic, partitions, brokers.min(3))
                .context("creating the topic")?;
            println!("bootstrap {}", mock.bootstrap_servers());
            let stop = CancellationToken::new();
            tokio::spawn(lifecycle::on_signal(stop.clone()));
            stop.cancelled().await;
        }
    }
    Ok(())
}
