//! The notifier's integration tests, one binary (`cargo nextest run -p
//! notifier --test notifier`), against the test stack's Postgres, Apache
//! Kafka and SMTP sink: `stack` the behaviours one by one, `burst` the
//! 20,000-event bursts and the 1,000-order bursts through order-api in
//! both outbox modes (rows, messages), `security` the SASL_SSL listener,
//! `trace` one order followed by its trace id through the three binaries.

mod common;

mod burst;
mod retention;
mod security;
mod stack;
mod trace;
