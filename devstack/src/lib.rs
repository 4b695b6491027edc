//! Tooling for the local stack that `scripts/up` and `scripts/test` run:
//!
//! - [`migrations`]: the SQL files in `migrations/`, embedded and applied in
//!   order by refinery, recorded in `refinery_schema_history` so a re-run
//!   applies nothing twice;
//! - [`kafka`]: topic creation through the Admin API (Tansu does not
//!   auto-create topics) and reading a topic to its real end;
//! - [`testing`]: per-test isolation — a fresh database cloned from a
//!   migrated template, a unique slot name and a unique topic;
//! - [`cluster`]: a private Postgres cluster for tests that crash or restart
//!   the server; [`tansu`]: a private broker to freeze; [`proxy`]: a TCP
//!   proxy to cut connections.
//!
//! This is a development and test-support crate, not part of the product's
//! runtime; its errors are `anyhow` for that reason.

pub mod bench;
pub mod cluster;
pub mod kafka;
pub mod migrations;
pub mod proxy;
pub mod tansu;
pub mod testing;
