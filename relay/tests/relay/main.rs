//! The relay's integration tests, one binary (`cargo nextest run -p relay
//! --test relay`): each module is one area, `common` what they share.
//! Most run against the test stack (`scripts/test --stack-only`, then
//! `source .run/test/env`); `chaos` and parts of `faults` and `transactions`
//! start private Postgres and Kafka clusters.

mod common;

mod backfill;
mod chaos;
mod debezium;
mod exactly_once;
mod faults;
mod ha;
mod messages;
mod migration;
mod observability;
mod pipeline;
mod replication;
mod retention;
mod security;
mod transactions;
mod verify;
