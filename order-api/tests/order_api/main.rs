//! order-api's integration tests, one binary (`cargo nextest run -p
//! order-api --test order_api`), each against a fresh database of the test
//! stack's Postgres.

mod common;

mod api;
mod binary;
mod bodies_never_5xx;
mod concurrency;
mod idempotency;
mod outbox_mode;
mod readme_walkthrough;
mod trace;
