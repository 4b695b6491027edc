//! Tooling for the local stack that `scripts/up` and `scripts/test` run:
//!
//! - [`migrations`]: the SQL files in `migrations/`, embedded and applied in
//!   order by refinery, recorded in `refinery_schema_history` so a re-run
//!   applies nothing twice;
//! - [`kafka`]: topic creation through the Admin API (the brokers run with
//!   `auto.create.topics.enable=false`) and reading a topic to its real end;
//! - [`testing`]: per-test isolation — a fresh database cloned from a
//!   migrated template, a unique slot name and a unique topic;
//! - [`cluster`]: a private Postgres cluster for tests that crash or restart
//!   the server; [`kafka_cluster`]: a private Apache Kafka cluster (1 or 3
//!   KRaft nodes) whose brokers a test freezes, kills and restarts;
//!   [`proxy`]: a TCP proxy to cut connections; [`otlp`]: an OTLP/HTTP
//!   receiver that keeps the spans the binaries export.
//!
//! This is a development and test-support crate, not part of the product's
//! runtime; its errors are `anyhow` for that reason.

pub mod bench;
pub mod cluster;
pub mod kafka;
pub mod kafka_cluster;
pub mod migrations;
pub mod otlp;
pub mod proxy;
pub mod testing;
