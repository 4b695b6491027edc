//! The notifier: consumes order events from the outbox topic (consumer group
//! `notifier`) and sends each customer one email per event, by SMTP or as
//! `.eml` files.
//!
//! The pipeline reads as a chain of modules:
//!
//! ```text
//!  pipeline ─▶ window ─▶ event ─▶ email ─▶ inbox claim ─▶ mailer ─▶ inbox commit ─▶ window: offset stored
//!  (consumer,  (per-key   (record   (subject, (notifier_inbox, (SMTP or  (the batch's   (the handled prefix;
//!   a worker    order,     → event)  bodies,   a batch decides: .eml)     COMMIT: sent)  committed on interval,
//!   per part.)  bound)               Msg-ID)   send or dup.)                             revoke, shutdown)
//!      └── malformed record / permanent rejection ──▶ dlq (<topic>.dlq) ──▶ handled
//! ```
//!
//! `handler` holds the per-record logic, its retry rule and the crash
//! windows; `window` which records of a partition may run at once and how
//! far its offsets may be stored; `pipeline` the consumer, the workers,
//! offsets and rebalances.

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
pub mod retention;
pub mod smtp;
pub mod window;

pub use pipeline::{run, run_with, NotifierError};
