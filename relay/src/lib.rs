//! The outbox relay: streams outbox inserts from a Postgres logical
//! replication slot (`pgoutput`) to Kafka, in commit order, losing nothing.
//!
//! The pipeline reads as a chain of modules:
//!
//! ```text
//!  replication ──▶ pgoutput ──▶ event ──▶ sink ──▶ checkpoint
//!  (CopyBoth on a     (decode     (outbox    (rdkafka    (confirm LSN only after
//!   replication conn)  messages)   row → rec) producer)   Kafka acked all ≤ it)
//! ```

pub use outbox_record::lsn;
pub mod pgoutput;
pub mod replication;

pub mod checkpoint;
pub mod config;
pub mod dead_letter;
pub mod dedupe;
pub mod error;
pub mod event;
pub mod heartbeat;
pub mod http;
pub mod message;
pub mod metrics;
pub mod pipeline;
pub mod republish;
pub mod retention;
pub mod sink;
pub mod slot_admin;
pub mod topics;
pub mod verify;
