//! The record contract: what a Kafka record of the outbox topic carries,
//! written by the relay and read by the notifier, loadgen, the benchmarks and
//! the tests (SPEC.md, "Kafka record format").
//!
//! ```text
//!  key      the outbox row's key column (user_id) as text
//!  value    the outbox row as JSON; `payload` embedded    → event::{OrderCreated, OrderStatusChanged}
//!  headers  event_id event_type lsn xid commit_ts seq      → header::{names, relay_headers, Meta}
//!           traceparent tracestate (from the outbox row)     → trace::TraceParent
//!  DLQ      the original headers + dlq_reason …            → header::dlq
//! ```
//!
//! Only data and parsing live here, no I/O and no Kafka client: callers hand
//! in header pairs as `(name, value)` from whatever client they use.

pub mod event;
pub mod header;
pub mod lsn;
pub mod trace;

pub use header::{Meta, Position};
pub use lsn::Lsn;
