//! Command-line and environment configuration (`loadgen --help`).
//!
//! Every option is a flag with an environment variable and a default. The
//! database URL may hold a password: it is hidden from `--help` and `Debug`.
//! [`Config::validate`] turns a parsed command line into a [`Plan`] or a
//! clear [`ConfigError`] before anything is started: a bad rate, URL or
//! combination of options fails at once, not after a long run.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
pub use lifecycle::parse_duration;

use crate::schedule::Profile;

/// Where the font for `--png` is looked for when `--font` is not given
/// (Debian package `fonts-dejavu-core`).
pub const DEFAULT_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Open-loop load for the outbox pipeline: requests at a fixed arrival rate
/// (each measured from its intended start, so a stalled server cannot hide
/// its latency), every resulting Kafka record matched to its request, and
/// latency percentiles per stage from HDR histograms.
#[derive(Parser, Clone)]
#[command(
    name = "loadgen",
    version,
    about,
    long_about = None,
    after_help = "Stages: request (intended start → HTTP response / INSERT returned), \
commit_to_kafka (commit_ts header → broker LogAppendTime, else arrival), commit_to_consumed \
(commit_ts → arrival in loadgen), end_to_end (intended start → arrival), commit_to_notifier \
(commit_ts → notifier_inbox.handled_at, with --notifier-inbox).\n\
Exit status: 0 ok; 1 bad configuration, setup failure or an output file not written; \
2 a request succeeded but its record never reached the topic (or, with --notifier-inbox, \
was never handled) within --drain-timeout."
)]
pub struct Config {
    /// What each arrival does: `http` (POST /orders and status changes
    /// through order-api) or `sql` (INSERT one outbox row directly, to
    /// measure the relay alone).
    #[arg(long, env = "LOADGEN_MODE", value_enum, default_value_t = Mode::Http)]
    pub mode: Mode,

    /// Arrival rate in requests per second (after the ramp).
    #[arg(long, env = "LOADGEN_RATE", default_value_t = 100.0)]
    pub rate: f64,

    /// How long to hold --rate after the ramp (e.g. 30s, 5m).
    #[arg(long, env = "LOADGEN_DURATION", default_value = "30s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Unmeasured time before the ramp: its requests are sent, matched and
    /// counted, but left out of the latency histograms.
    #[arg(long, env = "LOADGEN_WARMUP", default_value = "0s", value_parser = parse_duration)]
    pub warmup: Duration,

    /// Arrival rate during --warmup [default: the rate the next phase
    /// starts at: --ramp-from with a --ramp, else --rate].
    #[arg(long, env = "LOADGEN_WARMUP_RATE")]
    pub warmup_rate: Option<f64>,

    /// Linear ramp from --ramp-from to --rate before the steady phase;
    /// measured (0s: no ramp).
    #[arg(long, env = "LOADGEN_RAMP", default_value = "0s", value_parser = parse_duration)]
    pub ramp: Duration,

    /// Arrival rate at the start of the ramp.
    #[arg(long, env = "LOADGEN_RAMP_FROM", default_value_t = 0.0)]
    pub ramp_from: f64,

    /// Most requests in flight at once. A request due while the cap is
    /// reached waits for a slot, its latency still counted from its
    /// intended start (reported as a late start).
    #[arg(long, env = "LOADGEN_MAX_IN_FLIGHT", default_value_t = 1000)]
    pub max_in_flight: usize,

    /// A request not answered within this time counts as a timeout error.
    #[arg(long, env = "LOADGEN_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// Base URL of order-api (http mode).
    #[arg(long, env = "ORDER_API_URL", default_value = "http://127.0.0.1:8080")]
    pub order_api_url: String,

    /// Share of arrivals (0..1) that change the status of an order created
    /// earlier in this run to its next status
    /// (CREATED→PAID→SHIPPED→DELIVERED); an arrival with no such order
    /// creates one instead.
    #[arg(long, env = "LOADGEN_STATUS_CHANGE_RATIO", default_value_t = 0.5)]
    pub status_change_ratio: f64,

    /// New orders get a user id drawn from 1..=N (the Kafka key, so this
    /// spreads records over partitions).
    #[arg(long, env = "LOADGEN_USERS", default_value_t = 1000)]
    pub users: u64,

    /// Postgres URL: required by --mode sql and --notifier-inbox [default:
    /// none].
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Connections used for INSERTs in sql mode (opened before the load).
    #[arg(long, env = "LOADGEN_SQL_CONNECTIONS", default_value_t = 8)]
    pub sql_connections: usize,

    /// Outbox rows per transaction in sql mode (one arrival = one
    /// transaction).
    #[arg(long, env = "LOADGEN_ROWS_PER_TXN", default_value_t = 1)]
    pub rows_per_txn: usize,

    /// Kafka bootstrap servers.
    #[arg(
        long,
        env = "KAFKA_BOOTSTRAP_SERVERS",
        default_value = "127.0.0.1:9092"
    )]
    pub kafka_bootstrap_servers: String,

    /// Extra librdkafka property for the consumer, repeatable (e.g.
    /// security.protocol=SASL_SSL); comma-separated in the environment
    /// [default: none].
    #[arg(
        long = "kafka-property",
        env = "LOADGEN_KAFKA_PROPERTIES",
        value_name = "KEY=VALUE",
        value_delimiter = ',',
        hide_env_values = true,
        value_parser = lifecycle::parse_property
    )]
    pub kafka_properties: Vec<(String, String)>,

    /// File of librdkafka properties, one `key=value` a line (`#` comments),
    /// applied before `--kafka-property` (keeps secrets out of the process list)
    /// [default: none].
    #[arg(long, env = "LOADGEN_KAFKA_PROPERTIES_FILE", value_name = "PATH", value_parser = lifecycle::parse_properties_file)]
    pub kafka_properties_file: Option<lifecycle::PropertiesFile>,

    /// The outbox topic to read the records from.
    #[arg(long, env = "OUTBOX_TOPIC", default_value = "microshop.order-outbox")]
    pub topic: String,

    /// The header that carries the outbox id (sql mode's record key).
    /// Debezium's Outbox Event Router writes it as `id`.
    #[arg(long, env = "LOADGEN_EVENT_ID_HEADER", default_value = outbox_record::header::EVENT_ID)]
    pub event_id_header: String,

    /// The header that carries the commit time (RFC 3339), where
    /// commit_to_kafka and commit_to_consumed start. A Debezium outbox can
    /// place its `created_at` column there (the transaction's start, which
    /// precedes its commit).
    #[arg(long, env = "LOADGEN_COMMIT_TIME_HEADER", default_value = outbox_record::header::COMMIT_TS)]
    pub commit_time_header: String,

    /// Measure the requests only: no Kafka consumer, no pipeline stages
    /// [default: off].
    #[arg(long, env = "LOADGEN_NO_KAFKA")]
    pub no_kafka: bool,

    /// After the last response, how long to wait for records still missing
    /// (and, with --notifier-inbox, for the notifier to handle them).
    #[arg(long, env = "LOADGEN_DRAIN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Also measure commit → notifier: read `notifier_inbox.handled_at` of
    /// the run's events (http mode; needs --database-url) [default: off].
    #[arg(long, env = "LOADGEN_NOTIFIER_INBOX")]
    pub notifier_inbox: bool,

    /// Width of the time-series buckets in the JSON and the plot (widened
    /// automatically so a run has at most 1200 buckets).
    #[arg(long, env = "LOADGEN_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub interval: Duration,

    /// Write the full report (time series, percentile distributions) as
    /// JSON to this file [default: none].
    #[arg(long, env = "LOADGEN_JSON")]
    pub json: Option<PathBuf>,

    /// How many of the slowest measured requests the report names, with
    /// their trace ids (every request carries a W3C `traceparent`), ranked
    /// by the most downstream stage measured: commit_to_notifier, else
    /// end_to_end, else request. The table shows the first 3, --json all
    /// (0: none).
    #[arg(long, env = "LOADGEN_SLOWEST", value_name = "N", default_value_t = 10)]
    pub slowest: usize,

    /// Write a PNG plot (latency over time, percentile distribution) to
    /// this file [default: none].
    #[arg(long, env = "LOADGEN_PNG")]
    pub png: Option<PathBuf>,

    /// TrueType font for the PNG's text.
    #[arg(long, env = "LOADGEN_FONT", default_value = DEFAULT_FONT)]
    pub font: PathBuf,

    /// No live progress line (it is also hidden when stderr is not a
    /// terminal; then a progress log line is written every 5 s instead)
    /// [default: off].
    #[arg(long, env = "LOADGEN_QUIET")]
    pub quiet: bool,

    /// Log format (logs go to stderr; the report to stdout).
    #[arg(long, env = "LOADGEN_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The database URL and Kafka properties may hold credentials.
        f.debug_struct("Config")
            .field("mode", &self.mode)
            .field("rate", &self.rate)
            .field("duration", &self.duration)
            .field("warmup", &self.warmup)
            .field("ramp", &self.ramp)
            .field("max_in_flight", &self.max_in_flight)
            .field("order_api_url", &self.order_api_url)
            .field("kafka_bootstrap_servers", &self.kafka_bootstrap_servers)
            .field("topic", &self.topic)
            .field("event_id_header", &self.event_id_header)
            .field("commit_time_header", &self.commit_time_header)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Http,
    Sql,
}

pub use lifecycle::LogFormat;

/// A configuration that cannot work, found before the run starts.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--{name} must be a finite number > 0, got {value}")]
    NotPositive { name: &'static str, value: f64 },
    #[error("--{name} must be a finite number ≥ 0, got {value}")]
    Negative { name: &'static str, value: f64 },
    #[error("--{name} must be at least 1")]
    Zero { name: &'static str },
    #[error("--status-change-ratio must be between 0 and 1, got {0}")]
    Ratio(f64),
    #[error("the run is empty: --warmup, --ramp and --duration are all 0")]
    EmptyRun,
    #[error("--warmup sends nothing at rate 0: set --warmup-rate or --ramp-from")]
    EmptyWarmup,
    #[error("--order-api-url {url:?} is not an http(s) URL: {reason}")]
    Url { url: String, reason: String },
    #[error("{what} needs --database-url (or DATABASE_URL)")]
    NoDatabase { what: &'static str },
    #[error("--notifier-inbox needs --mode http: the notifier only handles order events")]
    NotifierNeedsHttp,
    #[error("--notifier-inbox needs the Kafka consumer (drop --no-kafka)")]
    NotifierNeedsKafka,
    #[error("the directory of {path} does not exist")]
    OutputDir { path: PathBuf },
}

/// A validated configuration: the arrival profile and the checked URL.
#[derive(Clone, Debug)]
pub struct Plan {
    pub profile: Profile,
    pub order_api_url: reqwest::Url,
    pub interval: Duration,
}

impl Config {
    /// Checks every option against the others; the first problem found.
    pub fn validate(&self) -> Result<Plan, ConfigError> {
        positive("rate", self.rate)?;
        non_negative("ramp-from", self.ramp_from)?;
        if let Some(w) = self.warmup_rate {
            non_negative("warmup-rate", w)?;
        }
        if !(0.0..=1.0).contains(&self.status_change_ratio) {
            return Err(ConfigError::Ratio(self.status_change_ratio));
        }
        for (name, v) in [
            ("max-in-flight", self.max_in_flight),
            ("sql-connections", self.sql_connections),
            ("rows-per-txn", self.rows_per_txn),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero { name });
            }
        }
        if self.users == 0 {
            return Err(ConfigError::Zero { name: "users" });
        }
        if self.interval.is_zero() {
            return Err(ConfigError::Zero { name: "interval" });
        }
        if self.request_timeout.is_zero() {
            return Err(ConfigError::Zero {
                name: "request-timeout",
            });
        }
        let next_rate = if self.ramp.is_zero() {
            self.rate
        } else {
            self.ramp_from
        };
        let profile = Profile {
            warmup: self.warmup,
            warmup_rate: self.warmup_rate.unwrap_or(next_rate),
            ramp: self.ramp,
            ramp_from: self.ramp_from,
            rate: self.rate,
            duration: self.duration,
        };
        if profile.total().is_zero() {
            return Err(ConfigError::EmptyRun);
        }
        if !self.warmup.is_zero() && profile.warmup_rate <= 0.0 {
            return Err(ConfigError::EmptyWarmup);
        }
        let order_api_url = parse_url(&self.order_api_url)?;
        if self.mode == Mode::Sql && self.database_url.is_none() {
            return Err(ConfigError::NoDatabase { what: "--mode sql" });
        }
        if self.notifier_inbox {
            if self.mode != Mode::Http {
                return Err(ConfigError::NotifierNeedsHttp);
            }
            if self.no_kafka {
                return Err(ConfigError::NotifierNeedsKafka);
            }
            if self.database_url.is_none() {
                return Err(ConfigError::NoDatabase {
                    what: "--notifier-inbox",
                });
            }
        }
        for path in [&self.json, &self.png].into_iter().flatten() {
            let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
            if dir.is_some_and(|d| !d.is_dir()) {
                return Err(ConfigError::OutputDir { path: path.clone() });
            }
        }
        // At most MAX_INTERVALS time-series buckets (each holds a small
        // histogram per stage), whatever the run's length.
        let min_interval = profile.total().div_f64(MAX_INTERVALS as f64);
        let interval = self.interval.max(min_interval);
        Ok(Plan {
            profile,
            order_api_url,
            interval,
        })
    }

    /// The defaults for `mode`, whatever the environment says (what tests
    /// start from).
    pub fn defaults(mode: Mode) -> Config {
        let mut cfg = Config::parse_from(["loadgen"]);
        cfg.mode = mode;
        cfg
    }
}

/// Most time-series buckets a run keeps.
pub const MAX_INTERVALS: u32 = 1200;

fn positive(name: &'static str, value: f64) -> Result<(), ConfigError> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(ConfigError::NotPositive { name, value })
    }
}

fn non_negative(name: &'static str, value: f64) -> Result<(), ConfigError> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(ConfigError::Negative { name, value })
    }
}

fn parse_url(s: &str) -> Result<reqwest::Url, ConfigError> {
    let bad = |reason: String| ConfigError::Url {
        url: s.to_owned(),
        reason,
    };
    let url = reqwest::Url::parse(s).map_err(|e| bad(e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad(format!(
            "scheme {:?} is not http or https",
            url.scheme()
        )));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("no host".into()));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Config {
        let mut all = vec!["loadgen"];
        all.extend_from_slice(args);
        Config::try_parse_from(all).expect("parses")
    }

    #[test]
    fn defaults_validate() {
        let plan = parse(&[]).validate().expect("valid");
        assert_eq!(plan.profile.rate, 100.0);
        assert_eq!(plan.profile.total(), Duration::from_secs(30));
        assert_eq!(plan.order_api_url.as_str(), "http://127.0.0.1:8080/");
    }

    #[test]
    fn bad_values_are_refused_with_the_option_named() {
        let cases: &[(&[&str], &str)] = &[
            (&["--rate", "0"], "--rate"),
            (&["--rate=-5"], "--rate"),
            (&["--rate", "NaN"], "--rate"),
            (&["--order-api-url", "not a url"], "--order-api-url"),
            (&["--order-api-url", "ftp://x/"], "scheme"),
            (&["--status-change-ratio", "1.5"], "--status-change-ratio"),
            (&["--max-in-flight", "0"], "--max-in-flight"),
            (&["--mode", "sql"], "--database-url"),
            (&["--notifier-inbox"], "--database-url"),
            (&["--duration", "0s"], "empty"),
            (&["--warmup", "5s", "--ramp", "5s"], "--warmup-rate"),
            (&["--json", "/nonexistent-dir/x.json"], "nonexistent-dir"),
        ];
        for (args, needle) in cases {
            let err = parse(args).validate().expect_err("invalid").to_string();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }

    #[test]
    fn warmup_rate_follows_the_next_phase() {
        let p = parse(&["--warmup", "2s", "--rate", "40"])
            .validate()
            .unwrap();
        assert_eq!(p.profile.warmup_rate, 40.0);
        let p = parse(&["--warmup", "2s", "--ramp", "2s", "--ramp-from", "5"])
            .validate()
            .unwrap();
        assert_eq!(p.profile.warmup_rate, 5.0);
    }

    #[test]
    fn long_runs_get_wider_buckets() {
        let p = parse(&["--duration", "60m"]).validate().unwrap();
        assert_eq!(p.interval, Duration::from_secs(3));
    }

    #[test]
    fn debug_hides_the_password() {
        let cfg = parse(&["--database-url", "postgres://u:hunter2@h/db"]);
        assert!(!format!("{cfg:?}").contains("hunter2"));
    }
}
