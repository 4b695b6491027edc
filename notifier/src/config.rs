//! Command-line and environment configuration (`notifier --help`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
pub use lifecycle::parse_duration;

/// Consumes order events from the outbox topic (consumer group `notifier`)
/// and sends one email per event, by SMTP or as `.eml` files.
#[derive(Parser, Clone)]
#[command(name = "notifier", version, about, long_about = None)]
pub struct Config {
    /// Postgres URL of the database holding the `notifier_inbox` table
    /// (handled event ids).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    /// Kafka bootstrap servers.
    #[arg(
        long,
        env = "KAFKA_BOOTSTRAP_SERVERS",
        default_value = "127.0.0.1:9092"
    )]
    pub kafka_bootstrap_servers: String,

    /// Extra librdkafka property for the consumer and the DLQ producer,
    /// repeatable (e.g. security.protocol=SASL_SSL).
    #[arg(long = "kafka-property", value_name = "KEY=VALUE", value_parser = lifecycle::parse_property)]
    pub kafka_properties: Vec<(String, String)>,

    /// File of librdkafka properties, one `key=value` a line (`#` comments),
    /// applied before `--kafka-property`: keeps secrets such as
    /// sasl.password out of the process list.
    #[arg(long, env = "NOTIFIER_KAFKA_PROPERTIES_FILE", value_name = "PATH", value_parser = lifecycle::parse_properties_file)]
    pub kafka_properties_file: Option<lifecycle::PropertiesFile>,

    /// The outbox topic to consume.
    #[arg(long, env = "OUTBOX_TOPIC", default_value = "microshop.order-outbox")]
    pub topic: String,

    /// Consumer group; instances in the same group share the partitions.
    #[arg(long, env = "NOTIFIER_GROUP", default_value = "notifier")]
    pub group: String,

    /// Dead-letter topic for records that can never be handled; default:
    /// the outbox topic + `.dlq`.
    #[arg(long, env = "NOTIFIER_DLQ_TOPIC")]
    pub dlq_topic: Option<String>,

    /// SMTP server: smtp://host:port (plain), smtp://host:port?tls=required
    /// (STARTTLS), smtp://host?tls=opportunistic, smtps://host:port (TLS);
    /// credentials as smtp://user:password@host. Without it, emails are
    /// written as .eml files into --mail-dir.
    #[arg(long, env = "SMTP_URL", hide_env_values = true)]
    pub smtp_url: Option<String>,

    /// Directory for .eml files, used when no --smtp-url is given.
    #[arg(long, env = "MAIL_DIR")]
    pub mail_dir: Option<PathBuf>,

    /// Sender address of the emails.
    #[arg(
        long,
        env = "NOTIFIER_MAIL_FROM",
        default_value = "Microshop <orders@microshop.example>"
    )]
    pub mail_from: String,

    /// Timeout of one SMTP conversation (connect, send, quit).
    #[arg(long, env = "NOTIFIER_SMTP_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub smtp_timeout: Duration,

    /// Pipeline each email's MAIL, RCPT and DATA commands (RFC 2920) when
    /// the server offers PIPELINING: two round trips an email instead of
    /// four. `false` sends one command at a time, for a server that offers
    /// pipelining and mishandles it.
    #[arg(long, env = "NOTIFIER_SMTP_PIPELINING", default_value_t = true, action = clap::ArgAction::Set)]
    pub smtp_pipelining: bool,

    /// PEM file of CA certificates to trust for the SMTP server's TLS
    /// (STARTTLS, smtps://) besides the web's roots: a mail relay with a
    /// private CA.
    #[arg(long, env = "NOTIFIER_SMTP_CA_FILE", value_name = "PATH")]
    pub smtp_ca_file: Option<PathBuf>,

    /// HTTP listen address for /metrics and /healthz.
    #[arg(long, env = "NOTIFIER_LISTEN", default_value = "127.0.0.1:9102")]
    pub listen: SocketAddr,

    /// First wait before retrying a transient failure (doubles per attempt).
    #[arg(long, env = "NOTIFIER_INITIAL_BACKOFF", default_value = "200ms", value_parser = parse_duration)]
    pub initial_backoff: Duration,

    /// Longest wait between retries of a transient failure.
    #[arg(long, env = "NOTIFIER_MAX_BACKOFF", default_value = "30s", value_parser = parse_duration)]
    pub max_backoff: Duration,

    /// How often stored offsets (of handled events) are committed to Kafka;
    /// they are also committed on partition revocation and on shutdown.
    #[arg(long, env = "NOTIFIER_COMMIT_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub commit_interval: Duration,

    /// Longest time the broker may hold a fetch while no record is there
    /// (librdkafka's `fetch.wait.max.ms`). Kafka answers as soon as a record
    /// arrives, so this only bounds idle polling there (at 10 ms the idle
    /// notifier cost the stack's broker 10 % of a core); a broker that
    /// answers only when the wait ends adds it to every email's latency.
    #[arg(long, env = "NOTIFIER_FETCH_MAX_WAIT", default_value = "500ms", value_parser = parse_duration)]
    pub fetch_max_wait: Duration,

    /// Records of one partition handled at once. Records with the same
    /// Kafka key (the customer's user id) still go one at a time, in order;
    /// 1 handles a partition strictly one record after the other.
    #[arg(long, env = "NOTIFIER_MAX_IN_FLIGHT", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_in_flight_per_partition: u16,

    /// SMTP connections: at most this many open (and kept for reuse), one
    /// per send in progress. Size it to what the mail server allows one
    /// client.
    /// Formerly --inbox-connections / NOTIFIER_INBOX_CONNECTIONS, both
    /// still accepted.
    #[arg(long, visible_alias = "inbox-connections", env = SMTP_CONNECTIONS_ENV, default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..))]
    pub smtp_connections: u16,

    /// Records handled at once across all partitions [default: by SMTP,
    /// 4 × --smtp-connections (a handler holds a connection only while it
    /// sends, then waits for its inbox batch to commit); into --mail-dir,
    /// 128 (a handler mostly waits for its file's fsync, and the file
    /// system commits many at once)]. Also the bound on the emails a
    /// kill -9 can leave sent and not recorded (sent again on restart).
    #[arg(long, env = "NOTIFIER_HANDLERS", value_parser = clap::value_parser!(u16).range(1..))]
    pub handlers: Option<u16>,

    /// Inbox database connections (opened on first use), each carrying one
    /// batch of claims at a time: the claims of the records being handled
    /// are grouped into one transaction per free connection.
    #[arg(long, env = "NOTIFIER_INBOX_DB_CONNECTIONS", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    pub inbox_db_connections: u16,

    /// Delete notifier_inbox rows handled longer ago than this, in small
    /// batches; 0 (the default) keeps every row. Must be at least the
    /// topic's retention.ms plus its segment.ms, the longest a record can
    /// stay in the topic (Kafka deletes a segment once its newest record
    /// passes retention.ms), since a record still in the topic can be
    /// delivered again and its row is what makes it a duplicate: checked
    /// at start and before every round.
    #[arg(long, env = "NOTIFIER_INBOX_RETENTION", default_value = "0s", value_parser = parse_duration)]
    pub inbox_retention: Duration,

    /// How often inbox retention deletes.
    #[arg(long, env = "NOTIFIER_INBOX_RETENTION_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub inbox_retention_interval: Duration,

    /// Async worker threads [default: one per core]. librdkafka's and
    /// the spool's blocking file writes have threads of their own.
    #[arg(long, env = "NOTIFIER_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    pub worker_threads: Option<u16>,

    /// Log format.
    #[arg(long, env = "NOTIFIER_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The database URL, the SMTP URL and Kafka properties may hold
        // credentials.
        f.debug_struct("Config")
            .field("kafka_bootstrap_servers", &self.kafka_bootstrap_servers)
            .field("topic", &self.topic)
            .field("group", &self.group)
            .field("dlq_topic", &self.dlq_topic())
            .field("smtp", &self.smtp_url.is_some())
            .field("mail_dir", &self.mail_dir)
            .field("listen", &self.listen)
            .field(
                "max_in_flight_per_partition",
                &self.max_in_flight_per_partition,
            )
            .field("smtp_connections", &self.smtp_connections)
            .field("smtp_pipelining", &self.smtp_pipelining)
            .field("smtp_ca_file", &self.smtp_ca_file)
            .field("inbox_db_connections", &self.inbox_db_connections)
            .field("worker_threads", &self.worker_threads)
            .finish_non_exhaustive()
    }
}

pub use lifecycle::LogFormat;

/// The default `--handlers` into a mail directory: measured on a 20k-event
/// backlog into a journaled ext4 (BENCHMARKS.md), 32 handlers wrote about
/// 3,900 files/s, 64 about 4,900, 128 about 5,400.
pub const SPOOL_HANDLERS: usize = 128;

/// Handlers per SMTP connection by default. A handler holds its
/// connection for the send (four round trips to the server) and then waits
/// for its inbox batch to commit (two more to Postgres, after the batch's
/// slowest send); with one handler per connection the connections idled
/// through those waits: 2,203 emails/s on 32 connections where a plain
/// client made 4,131 (BENCHMARKS.md, 2026-12-05).
pub const SMTP_HANDLERS_PER_CONNECTION: usize = 4;

/// The environment variable of `--smtp-connections`.
pub const SMTP_CONNECTIONS_ENV: &str = "NOTIFIER_SMTP_CONNECTIONS";

/// Its name before the option was renamed (it never sized the inbox's
/// database connections; those are `--inbox-db-connections`).
pub const LEGACY_SMTP_CONNECTIONS_ENV: &str = "NOTIFIER_INBOX_CONNECTIONS";

/// The value to give [`SMTP_CONNECTIONS_ENV`] from the legacy variable:
/// only when the new one is not set.
pub fn legacy_smtp_connections(
    var: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> Option<std::ffi::OsString> {
    match var(SMTP_CONNECTIONS_ENV) {
        Some(_) => None,
        None => var(LEGACY_SMTP_CONNECTIONS_ENV),
    }
}

impl Config {
    /// The command line and environment, with the legacy name of
    /// `--smtp-connections`'s variable still read.
    pub fn from_command_line() -> Config {
        if let Some(v) = legacy_smtp_connections(|k| std::env::var_os(k)) {
            // Before any thread starts: main calls this first.
            std::env::set_var(SMTP_CONNECTIONS_ENV, v);
        }
        Config::parse()
    }

    /// Kafka client properties: `--kafka-properties-file`'s, then
    /// `--kafka-property`'s.
    pub fn kafka_properties(&self) -> Vec<(String, String)> {
        lifecycle::kafka_properties(self.kafka_properties_file.as_ref(), &self.kafka_properties)
    }

    /// Records handled at once: `--handlers`, else by SMTP
    /// [`SMTP_HANDLERS_PER_CONNECTION`] × `--smtp-connections`, into a mail
    /// directory [`SPOOL_HANDLERS`].
    pub fn handlers(&self) -> usize {
        match (self.handlers, &self.smtp_url) {
            (Some(n), _) => usize::from(n),
            (None, Some(_)) => SMTP_HANDLERS_PER_CONNECTION * usize::from(self.smtp_connections),
            (None, None) => SPOOL_HANDLERS,
        }
    }

    /// The dead-letter topic: `--dlq-topic`, or `<topic>.dlq`.
    pub fn dlq_topic(&self) -> String {
        self.dlq_topic
            .clone()
            .unwrap_or_else(|| format!("{}.dlq", self.topic))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_spec() {
        let cfg =
            Config::try_parse_from(["notifier", "--database-url", "postgres://x@h/db"]).unwrap();
        assert_eq!(cfg.topic, "microshop.order-outbox");
        assert_eq!(cfg.group, "notifier");
        assert_eq!(cfg.dlq_topic(), "microshop.order-outbox.dlq");
        assert_eq!(cfg.listen.port(), 9102);
        assert!(cfg.smtp_url.is_none());
        assert_eq!(cfg.max_in_flight_per_partition, 16);
        assert_eq!(cfg.smtp_connections, 32);
        assert_eq!(cfg.inbox_db_connections, 4);
        assert_eq!(cfg.handlers(), SPOOL_HANDLERS, "into a mail directory");
        let parse = |extra: &[&str]| {
            let base = ["notifier", "--database-url", "postgres://x@h/db"];
            Config::try_parse_from(base.iter().chain(extra)).unwrap()
        };
        assert_eq!(parse(&["--smtp-url", "smtp://h:25"]).handlers(), 128);
        let smtp = parse(&["--smtp-url", "smtp://h:25", "--smtp-connections", "8"]);
        assert_eq!(smtp.handlers(), 32, "by SMTP: four to a connection");
        let old_name = parse(&["--smtp-url", "smtp://h:25", "--inbox-connections", "9"]);
        assert_eq!(old_name.smtp_connections, 9, "the former name still works");
        assert_eq!(parse(&["--handlers", "7"]).handlers(), 7);
        assert_eq!(cfg.worker_threads, None, "one per core");
        assert_eq!(parse(&["--worker-threads", "1"]).worker_threads, Some(1));
        assert!(Config::try_parse_from([
            "notifier",
            "--database-url",
            "x",
            "--worker-threads",
            "0"
        ])
        .is_err());
        assert!(
            Config::try_parse_from(["notifier", "--database-url", "x", "--handlers", "0"]).is_err()
        );
        assert!(Config::try_parse_from([
            "notifier",
            "--database-url",
            "postgres://x@h/db",
            "--max-in-flight-per-partition",
            "0"
        ])
        .is_err());
    }

    #[test]
    fn the_former_environment_name_counts_only_without_the_new_one() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| std::ffi::OsString::from(v))
            }
        };
        assert_eq!(
            legacy_smtp_connections(env(&[(LEGACY_SMTP_CONNECTIONS_ENV, "64")])),
            Some("64".into())
        );
        assert_eq!(
            legacy_smtp_connections(env(&[
                (LEGACY_SMTP_CONNECTIONS_ENV, "64"),
                (SMTP_CONNECTIONS_ENV, "8")
            ])),
            None
        );
        assert_eq!(legacy_smtp_connections(env(&[])), None);
    }

    #[test]
    fn debug_hides_credentials() {
        let cfg = Config::try_parse_from([
            "notifier",
            "--database-url",
            "postgres://u:secretpw@h/db",
            "--smtp-url",
            "smtps://mailer:hunter2@smtp.example:465",
            "--kafka-property",
            "sasl.password=swordfish",
        ])
        .unwrap();
        let shown = format!("{cfg:?}");
        for secret in ["secretpw", "hunter2", "swordfish"] {
            assert!(!shown.contains(secret), "{shown}");
        }
    }

    #[test]
    fn bad_properties_are_refused() {
        assert!(lifecycle::parse_property("novalue").is_err());
    }
}
