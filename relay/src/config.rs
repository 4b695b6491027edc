//! Command-line and environment configuration (`relay --help`).

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
pub use lifecycle::parse_duration;

use crate::event::{self, EventConfig, TopicRouting, ValueFormat};
use crate::message::MessageConfig;
use crate::sink::KafkaConfig;

mod command;
pub use command::{parse_time, Command, SlotAction};

/// Streams outbox inserts from a Postgres logical replication slot (pgoutput)
/// to Kafka, in commit order, confirming WAL only after Kafka acknowledged it.
#[derive(Parser, Clone)]
#[command(name = "relay", version, about, long_about = None)]
pub struct Config {
    /// Postgres URL (postgres://user:pass@host:port/db?sslmode=require); the
    /// role needs REPLICATION.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    /// Logical replication slot to stream (created with pgoutput if missing).
    #[arg(
        long,
        env = "RELAY_SLOT",
        default_value = "outbox_relay",
        global = true
    )]
    pub slot: String,

    /// Publication to stream (created for the outbox table, inserts only, if missing).
    #[arg(long, env = "RELAY_PUBLICATION", default_value = "outbox_pub")]
    pub publication: String,

    /// The outbox table, optionally schema-qualified; '' for none (the
    /// table-less outbox: only events written as logical decoding messages
    /// are relayed, and a missing publication is created with no tables).
    #[arg(long, env = "RELAY_TABLE", default_value = "outbox")]
    pub table: String,

    /// Kafka bootstrap servers.
    #[arg(
        long,
        env = "KAFKA_BOOTSTRAP_SERVERS",
        default_value = "127.0.0.1:9092"
    )]
    pub kafka_bootstrap_servers: String,

    /// Extra librdkafka property, repeatable (e.g. security.protocol=SASL_SSL).
    #[arg(long = "kafka-property", value_name = "KEY=VALUE", value_parser = lifecycle::parse_property)]
    pub kafka_properties: Vec<(String, String)>,

    /// File of librdkafka properties, one `key=value` a line (`#` comments),
    /// applied before `--kafka-property`: keeps secrets such as
    /// sasl.password out of the process list.
    #[arg(long, env = "RELAY_KAFKA_PROPERTIES_FILE", value_name = "PATH", value_parser = lifecycle::parse_properties_file)]
    pub kafka_properties_file: Option<lifecycle::PropertiesFile>,

    /// Topic for every record; default: the topic prefix + the table name
    /// (with --value-format debezium-outbox: routed by aggregate_type).
    #[arg(long, env = "OUTBOX_TOPIC")]
    pub topic: Option<String>,

    /// Prefix of topic names, as the JDBC source connector's topic.prefix
    /// [default: microshop.order-; with --value-format debezium-outbox:
    /// outbox.event., Debezium's route.topic.replacement].
    #[arg(long, env = "RELAY_TOPIC_PREFIX")]
    pub topic_prefix: Option<String>,

    /// Route each record to prefix + the value of this column instead of
    /// one topic [with --value-format debezium-outbox and no --topic:
    /// aggregate_type, Debezium's route.by.field].
    #[arg(long, env = "RELAY_ROUTE_BY_COLUMN")]
    pub route_by_column: Option<String>,

    /// Column whose value (as text) is the record key [default: user_id;
    /// with --value-format debezium-outbox: aggregate_id, Debezium's
    /// table.field.event.key].
    #[arg(long, env = "RELAY_KEY_COLUMN")]
    pub key_column: Option<String>,

    /// Record value encoding: json (the row), connect-json (the JDBC
    /// connector's envelope), debezium-outbox (Debezium's Outbox Event
    /// Router with its defaults: value = the payload column as a JSON
    /// string, header id; README "Debezium-compatible records").
    #[arg(long, env = "RELAY_VALUE_FORMAT", value_enum, default_value_t = ValueFormat::Json)]
    pub value_format: ValueFormat,

    /// Partitions for topics the relay creates.
    #[arg(long, env = "RELAY_PARTITIONS", default_value_t = 3)]
    pub partitions: i32,

    /// Replication factor for topics the relay creates.
    #[arg(long, env = "RELAY_REPLICATION_FACTOR", default_value_t = 1)]
    pub replication_factor: i32,

    /// Bound on record bytes handed to Kafka and not yet acknowledged.
    #[arg(long, env = "RELAY_MAX_IN_FLIGHT_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_in_flight_bytes: usize,

    /// HTTP listen address for /metrics, /healthz and /status.
    #[arg(long, env = "RELAY_LISTEN", default_value = "0.0.0.0:9101")]
    pub listen: SocketAddr,

    /// Interval of standby status updates to Postgres when nothing changes.
    #[arg(long, env = "RELAY_STATUS_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub status_interval: Duration,

    /// Interval of lag sampling on an ordinary SQL connection.
    #[arg(long, env = "RELAY_LAG_SAMPLE_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub lag_sample_interval: Duration,

    /// Longest wait between reconnection attempts (exponential backoff with jitter).
    #[arg(long, env = "RELAY_MAX_BACKOFF", default_value = "30s", value_parser = parse_duration)]
    pub max_backoff: Duration,

    /// On shutdown, how long to wait for Kafka to acknowledge what is in flight.
    #[arg(long, env = "RELAY_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// exactly-once: on every (re)start, skip what each partition already
    /// holds (see `dedupe`); at-least-once: replay without checking.
    #[arg(long, env = "RELAY_DELIVERY", value_enum, default_value_t = Delivery::ExactlyOnce)]
    pub delivery: Delivery,

    /// What exactly-once does with a topic where another writer's records
    /// (no lsn/seq headers: the JDBC source connector's, Debezium's) are the
    /// newest of a partition. refuse: stop with an error (a topic shared by
    /// mistake); skip: pass over them to the relay's own last record, as
    /// when taking over a topic those wrote (see README "Migrating in").
    #[arg(long, env = "RELAY_FOREIGN_RECORDS", value_enum, default_value_t = ForeignRecords::Refuse)]
    pub foreign_records: ForeignRecords,

    /// Produce whole Postgres transactions inside Kafka transactions (the
    /// broker must support them, as Apache Kafka does): read_committed
    /// consumers never see part of one, and transactional.id
    /// `outbox-relay.<slot>` fences an older relay on the same slot.
    #[arg(long, env = "RELAY_KAFKA_TRANSACTIONS")]
    pub kafka_transactions: bool,

    /// With --kafka-transactions: commit the Kafka transaction once it holds
    /// this many records (at the next Postgres commit).
    #[arg(long, env = "RELAY_TRANSACTION_MAX_RECORDS", default_value_t = 10_000)]
    pub transaction_max_records: usize,

    /// With --kafka-transactions: commit the Kafka transaction at most this
    /// long after it began (at a Postgres transaction boundary).
    #[arg(long, env = "RELAY_TRANSACTION_MAX_DURATION", default_value = "100ms", value_parser = parse_duration)]
    pub transaction_max_duration: Duration,

    /// While another relay streams the slot, how often this one (a standby)
    /// tries to take it over.
    #[arg(long, env = "RELAY_STANDBY_POLL_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub standby_poll_interval: Duration,

    /// Zombie safety: with no message from Postgres for this long, stop
    /// producing and drop what is queued, before Postgres (after its
    /// wal_sender_timeout, 60s by default) lets another relay take the
    /// slot. Must exceed --heartbeat-interval; 0 disables.
    #[arg(long, env = "RELAY_LEASE", default_value = "30s", value_parser = parse_duration)]
    pub lease: Duration,

    /// Stall detection: with records waiting for Kafka and no
    /// acknowledgement for this long while Postgres still talks to the
    /// relay, `/healthz` turns unhealthy, `relay_stalls_total` counts it and
    /// the session restarts with a new producer (what was not acknowledged is
    /// replayed, nothing lost or, exactly-once, written twice); healthy again
    /// at the next acknowledgement. 0 disables.
    #[arg(long, env = "RELAY_STALL_TIMEOUT", default_value = "2m", value_parser = parse_duration)]
    pub stall_timeout: Duration,

    /// How often to write a heartbeat (a logical decoding message) so the
    /// slot advances while the outbox is idle; 0 disables.
    #[arg(long, env = "RELAY_HEARTBEAT_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,

    /// WAL the slot may retain before the relay logs at ERROR and reports
    /// unhealthy on /healthz (bytes, or with a KiB/MiB/GiB suffix; 0
    /// disables). The relay never drops its slot by itself.
    #[arg(long, env = "RELAY_MAX_RETAINED_WAL", default_value = "10GiB", value_parser = parse_bytes)]
    pub max_retained_wal: u64,

    /// Columns copied into record headers of the same name (their text;
    /// none for NULL or a column the table lacks), e.g. a W3C
    /// `traceparent` written by the service; comma-separated, '' for none.
    #[arg(long, env = "RELAY_HEADER_COLUMNS", value_delimiter = ',',
          default_value = "traceparent,tracestate", value_parser = parse_header_column)]
    pub header_columns: Vec<String>,

    /// Events (outbox ids) to produce as a reference in `<topic>.relay-dlq`
    /// instead of themselves: the way past a record Kafka refuses
    /// (comma-separated).
    #[arg(long, env = "RELAY_DEAD_LETTER_EVENT_IDS", value_delimiter = ',')]
    pub dead_letter_event_ids: Vec<String>,

    /// Dead-letter each event Kafka refuses permanently (too large,
    /// invalid) without asking, and go on; off: the relay stops, naming it.
    #[arg(long, env = "RELAY_DEAD_LETTER_REFUSED")]
    pub dead_letter_refused: bool,

    /// Delete outbox rows that were delivered (the slot confirmed their
    /// commit) and are older than this (by `created_at`), in small batches;
    /// 0 (the default) keeps every row. Rows not yet delivered are never
    /// deleted, however old.
    #[arg(long, env = "RELAY_RETENTION", default_value = "0s", value_parser = parse_duration)]
    pub retention: Duration,

    /// How often retention looks for rows to delete.
    #[arg(long, env = "RELAY_RETENTION_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub retention_interval: Duration,

    /// Rows deleted per statement (each its own short transaction).
    #[arg(long, env = "RELAY_RETENTION_BATCH", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub retention_batch: u32,

    /// The prefix of events written as logical decoding messages
    /// (`pg_logical_emit_message(true, PREFIX, content)`, the table-less
    /// outbox): each becomes the record an outbox row with the content's
    /// fields would. Messages with other prefixes are not events.
    #[arg(long, env = "RELAY_MESSAGE_PREFIX", default_value = crate::message::DEFAULT_PREFIX,
          value_parser = parse_message_prefix)]
    pub message_prefix: String,

    /// Deliver the outbox rows committed before the slot existed, then
    /// stream: `all`, or `after:ID` for the rows with a greater id (the JDBC
    /// source connector's last offset, say). Needs the slot not to exist:
    /// the relay creates it and reads the table in the slot's own snapshot,
    /// so each row comes once, from the snapshot or from the stream. A
    /// backfill interrupted (crash, kill) is resumed by the next start; a
    /// finished one is recorded (table outbox_relay_backfill) and the
    /// option then does nothing.
    #[arg(long, env = "RELAY_BACKFILL", value_name = "all|after:ID",
          value_parser = crate::pipeline::parse_backfill)]
    pub backfill: Option<crate::pipeline::BackfillFrom>,

    /// Produce non-transactional event messages (written even when their
    /// transaction rolls back), each as a transaction of its own; without
    /// it they are logged, counted and skipped.
    #[arg(long, env = "RELAY_ALLOW_NON_TRANSACTIONAL_MESSAGES")]
    pub allow_non_transactional_messages: bool,

    /// Create the slot when it is missing even though the topic already
    /// holds this pipeline's events (the slot was dropped or lost: what was
    /// committed in between is skipped). Without it the relay stops, naming
    /// the topic's last position.
    #[arg(long, env = "RELAY_ALLOW_NEW_SLOT")]
    pub allow_new_slot: bool,

    /// Log format.
    #[arg(long, env = "RELAY_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Async worker threads. The relay's loop is one task: on one thread it
    /// is never moved between threads, which on a catch-up of one-row
    /// transactions cost about a quarter of its CPU (BENCHMARKS.md).
    /// Blocking Kafka calls and librdkafka's own threads are apart from it.
    #[arg(long, env = "RELAY_WORKER_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub worker_threads: u16,

    #[command(subcommand)]
    pub command: Option<Command>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The database URL and Kafka properties may hold credentials.
        f.debug_struct("Config")
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .field("table", &self.table)
            .field("kafka_bootstrap_servers", &self.kafka_bootstrap_servers)
            .field("topic", &self.topic)
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Delivery {
    ExactlyOnce,
    AtLeastOnce,
}

/// `--foreign-records`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ForeignRecords {
    Refuse,
    Skip,
}

pub use lifecycle::LogFormat;

impl Config {
    /// False with `--table ''` (events only as messages).
    pub fn has_table(&self) -> bool {
        !self.table.trim().is_empty()
    }

    /// `(schema, table)` of the outbox table.
    pub fn table_parts(&self) -> (String, String) {
        match self.table.split_once('.') {
            Some((s, t)) => (s.to_owned(), t.to_owned()),
            None => ("public".to_owned(), self.table.clone()),
        }
    }

    pub fn event_config(&self) -> EventConfig {
        let (schema, table) = self.table_parts();
        // Without a table, the topic a table called outbox would have.
        let named = if self.has_table() {
            table.as_str()
        } else {
            crate::message::DEFAULT_PREFIX
        };
        let debezium = self.value_format == ValueFormat::DebeziumOutbox;
        let prefix = self.topic_prefix.clone().unwrap_or_else(|| {
            if debezium {
                event::debezium::TOPIC_PREFIX
            } else {
                "microshop.order-"
            }
            .to_owned()
        });
        let default_topic = self
            .topic
            .clone()
            .unwrap_or_else(|| format!("{prefix}{named}"));
        // Debezium's router routes by default; an explicit --topic alone
        // still means one topic.
        let route_by = self.route_by_column.clone().or_else(|| {
            (debezium && self.topic.is_none()).then(|| event::debezium::ROUTE_COLUMN.to_owned())
        });
        let routing = match route_by {
            Some(column) => TopicRouting::ByColumn {
                column,
                prefix,
                fallback: default_topic,
            },
            None => TopicRouting::Fixed(default_topic),
        };
        let key_column = self.key_column.clone().unwrap_or_else(|| {
            if debezium {
                event::debezium::KEY_COLUMN
            } else {
                "user_id"
            }
            .to_owned()
        });
        EventConfig {
            schema,
            table,
            key_column,
            routing,
            value_format: self.value_format,
            header_columns: self
                .header_columns
                .iter()
                .filter(|c| !c.is_empty())
                .cloned()
                .collect(),
            messages: MessageConfig {
                prefix: self.message_prefix.clone(),
                allow_non_transactional: self.allow_non_transactional_messages,
            },
        }
    }

    pub fn kafka_config(&self) -> KafkaConfig {
        KafkaConfig {
            bootstrap_servers: self.kafka_bootstrap_servers.clone(),
            properties: lifecycle::kafka_properties(
                self.kafka_properties_file.as_ref(),
                &self.kafka_properties,
            ),
            partitions: self.partitions,
            replication: self.replication_factor,
            max_in_flight_bytes: self.max_in_flight_bytes,
            transactional_id: self
                .kafka_transactions
                .then(|| format!("outbox-relay.{}", self.slot)),
            skip_foreign_records: self.foreign_records == ForeignRecords::Skip,
        }
    }
}

/// A `--header-columns` entry: a column name that is not one of the
/// relay's own headers (a record would carry two of that name, and
/// consumers read the first).
pub fn parse_header_column(s: &str) -> Result<String, String> {
    let name = s.trim();
    if outbox_record::header::RELAY_NAMES.contains(&name) || name == outbox_record::header::LATE {
        return Err(format!(
            "{name:?} is one of the relay's own headers; choose another column"
        ));
    }
    Ok(name.to_owned())
}

/// A message prefix: not empty, and not the relay's heartbeat prefix.
pub fn parse_message_prefix(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("the message prefix must not be empty".into());
    }
    if s == crate::heartbeat::PREFIX {
        return Err(format!(
            "{s:?} is the prefix of the relay's heartbeats; choose another"
        ));
    }
    Ok(s.to_owned())
}

/// Parses `1048576`, `512KiB`, `64MiB`, `10GiB` (also KB/MB/GB as powers
/// of 1024, as Postgres' own settings read them).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected e.g. 1048576, 64MiB, 10GiB"))?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "KB" | "kB" => 1 << 10,
        "MiB" | "MB" => 1 << 20,
        "GiB" | "GB" => 1 << 30,
        "TiB" | "TB" => 1 << 40,
        _ => {
            return Err(format!(
                "invalid size {s:?}: unit must be KiB, MiB, GiB or TiB"
            ))
        }
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("invalid size {s:?}: too large"))
}

#[cfg(test)]
mod tests;
