//! The notifier: consumes order events from the outbox topic (consumer group
//! `notifier`) and sends each customer one email per event, by SMTP or as
//! `.eml` files.
//!
//! The pipeline reads as a chain of modules:
//!
//! ```text
//!  pipeline ──▶ event ──▶ email ──▶ inbox claim ──▶ mailer ──▶ inbox commit ──▶ offset stored
//!  (consumer,   (record    (subject,  (notifier_inbox,  (SMTP or   (recorded as     (committed on
//!   a worker     → event)   bodies,    decides: send     .eml)      sent)            interval,
//!   per part.)              Message-ID) or duplicate)                                revoke, shutdown)
//!      └── malformed record / permanent rejection ──▶ dlq (<topic>.dlq) ──▶ offset stored
//! ```
//!
//! `handler` holds the per-record logic, its retry rule and the crash
//! windows; `pipeline` the consumer, offsets and rebalances.

pub mod access;
pub mod config;
pub mod dlq;
pub mod email;
pub mod event;
pub mod handler;
pub mod http;
pub mod inbox;
pub mod mailer;
pub mod metrics;
pub mod pipeline;

pub use pipeline::{run, run_with, NotifierError};
