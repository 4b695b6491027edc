//! Command-line and environment configuration (`order-api --help`).
//!
//! Every option is a flag with an environment variable and a default. The
//! database URL may hold a password: it is hidden from `--help` and `Debug`.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

use crate::store::Outbox;

/// The order service: creates orders and changes their status, writing each
/// change and its outbox event in one Postgres transaction.
#[derive(Parser, Clone)]
#[command(name = "order-api", version, about, long_about = None)]
pub struct Config {
    /// HTTP listen address.
    #[arg(long, env = "ORDER_API_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Postgres URL (postgres://user:pass@host:port/db).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,

    /// Most connections the pool opens to Postgres.
    #[arg(long, env = "ORDER_API_POOL_SIZE", default_value_t = 16)]
    pub pool_size: usize,

    /// Longest wait for a free pooled connection, and for a new one to be
    /// opened; past it the request is answered 503 with Retry-After.
    #[arg(long, env = "ORDER_API_POOL_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub pool_timeout: Duration,

    /// Longest time a request may take; past it the answer is 503 and the
    /// transaction is rolled back.
    #[arg(long, env = "ORDER_API_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// Largest request body accepted, in bytes; larger bodies are answered 413.
    #[arg(long, env = "ORDER_API_BODY_LIMIT", default_value_t = 64 * 1024)]
    pub body_limit: usize,

    /// How long an Idempotency-Key is remembered (e.g. 24h, 90m, 30s).
    #[arg(long, env = "ORDER_API_IDEMPOTENCY_TTL", default_value = "24h", value_parser = parse_duration)]
    pub idempotency_ttl: Duration,

    /// On shutdown, how long in-flight requests may take to finish.
    #[arg(long, env = "ORDER_API_SHUTDOWN_TIMEOUT", default_value = "15s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// Log format.
    #[arg(long, env = "ORDER_API_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// How each order change writes its outbox event, in the change's
    /// transaction. table: a row in the `outbox` table. message: no row but
    /// a transactional logical decoding message (pg_logical_emit_message)
    /// with prefix --outbox-message-prefix, whose content is a JSON object
    /// with the fields of an outbox row, `id` drawn from the table's
    /// sequence; needs wal_level=logical (checked at start) and a relay
    /// that reads messages.
    #[arg(
        long,
        env = "ORDER_API_OUTBOX_MODE",
        value_enum,
        default_value = "table"
    )]
    pub outbox_mode: OutboxMode,

    /// With --outbox-mode message: the prefix of the logical decoding
    /// messages, by which the relay tells outbox events from other messages
    /// in the WAL. Must not be empty.
    #[arg(long, env = "ORDER_API_OUTBOX_MESSAGE_PREFIX", default_value = "outbox", value_parser = parse_prefix)]
    pub outbox_message_prefix: String,
}

/// `--outbox-mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutboxMode {
    /// A row in the `outbox` table (the relay streams its inserts).
    Table,
    /// A transactional logical decoding message; the `outbox` table gets no row.
    Message,
}

fn parse_prefix(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("the message prefix must not be empty: \
                    the relay finds outbox events by it"
            .to_owned());
    }
    Ok(s.to_owned())
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The database URL may hold a password.
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("pool_size", &self.pool_size)
            .field("pool_timeout", &self.pool_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("body_limit", &self.body_limit)
            .field("idempotency_ttl", &self.idempotency_ttl)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("outbox_mode", &self.outbox_mode)
            .field("outbox_message_prefix", &self.outbox_message_prefix)
            .finish_non_exhaustive()
    }
}

pub use lifecycle::LogFormat;

impl Config {
    /// The defaults, for `database_url` (what tests and benchmarks start from).
    pub fn for_database(database_url: &str) -> Config {
        let mut cfg = Config::parse_from(["order-api", "--database-url", database_url]);
        // Whatever the environment says, the URL given here wins.
        cfg.database_url = database_url.to_owned();
        cfg
    }

    /// Where the store writes outbox events, from `--outbox-mode` and
    /// `--outbox-message-prefix`.
    pub fn outbox(&self) -> Outbox {
        match self.outbox_mode {
            OutboxMode::Table => Outbox::Table,
            OutboxMode::Message => Outbox::Message {
                prefix: self.outbox_message_prefix.clone(),
            },
        }
    }
}

pub use lifecycle::parse_duration;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let cfg = Config::try_parse_from(["order-api", "--database-url", "postgres://x@h/db"])
            .expect("parses");
        assert_eq!(cfg.listen, "127.0.0.1:8080".parse().expect("addr"));
        assert_eq!(cfg.idempotency_ttl, Duration::from_secs(86400));
        assert_eq!(cfg.body_limit, 65536);
        assert_eq!(cfg.outbox_mode, OutboxMode::Table);
        assert_eq!(cfg.outbox(), Outbox::Table);
    }

    #[test]
    fn message_mode_carries_its_prefix() {
        let cfg = Config::try_parse_from([
            "order-api",
            "--database-url",
            "postgres://x@h/db",
            "--outbox-mode",
            "message",
        ])
        .expect("parses");
        assert_eq!(
            cfg.outbox(),
            Outbox::Message {
                prefix: "outbox".into()
            }
        );
    }

    #[test]
    fn debug_hides_the_password() {
        let cfg =
            Config::try_parse_from(["order-api", "--database-url", "postgres://u:hunter2@h/db"])
                .expect("parses");
        assert!(!format!("{cfg:?}").contains("hunter2"));
    }
}
