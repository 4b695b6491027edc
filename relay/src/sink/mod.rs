//! The sink contract: what the apply loop (`pipeline::apply`) may expect of
//! wherever records go. [`kafka::KafkaSink`] is the product's sink; the
//! apply loop's unit tests drive it with an in-memory one.
//!
//! ```text
//!  apply loop ─place(record, position)─▶ partition chosen · Produce | Duplicate
//!             ─try_send(record, txn)───▶ queue ──▶ Kafka
//!      ▲                                            │
//!      └──────── next_report(): Delivered{txn} / Failed(error) ◀─┘
//! ```

use std::future::Future;
use std::sync::Arc;

use futures_util::future::BoxFuture;

use crate::checkpoint::TxnId;
use crate::error::RelayError;
use crate::event::OutboxRecord;
use outbox_record::Position;

mod client;
pub mod kafka;

pub use client::{AccessWatch, KafkaConfig, SinkError};
pub use kafka::KafkaSink;
pub use lifecycle::kafka::{forward_log, AccessDenied};

/// What became of one accepted record.
#[derive(Debug)]
pub enum DeliveryReport {
    /// The destination durably acknowledged the record of transaction `txn`.
    Delivered { txn: TxnId, topic: Arc<str> },
    /// A record was not delivered, or the sink can deliver nothing more.
    /// Classified: transient errors end the session (replay from the
    /// confirmed position), definite ones stop the relay.
    Failed(RelayError),
}

/// Why a record was not accepted.
#[derive(Debug)]
pub enum SendError {
    /// Backpressure: the queue is full; retry after the next report.
    Full(OutboxRecord),
    /// The sink refused the record (classified, as in `Failed`).
    Refused(RelayError),
}

/// Where [`Sink::place`] put a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Not in its partition yet: send it.
    Produce,
    /// Its partition already holds it (an exactly-once replay): skip it.
    Duplicate,
}

/// A destination for outbox records.
///
/// Contract, which the apply loop relies on for "nothing lost, nothing
/// duplicated, commit order":
/// - **Topics.** A record is placed only in a topic the sink has
///   (`has_topic`); the loop readies others with `prepare_topic`, whose
///   future borrows nothing of the sink, so the loop keeps answering
///   Postgres while it runs, and hands the result to `add_topic`.
/// - **Placement.** `place` sets the record's partition from its key (the
///   same key always goes to the same partition of a topic) and says
///   whether that partition already holds the record's position, as read
///   when the topic was prepared (exactly-once); it sends nothing.
/// - **Order and acknowledgement.** Records accepted by `try_send` are
///   written in acceptance order within each partition, and each is
///   reported exactly once by `next_report`; `Delivered` means durably
///   acknowledged (in a Kafka transaction: written, visible at its commit).
/// - **Failure.** After a `Failed` report or a `Refused` send, later records
///   may or may not be delivered: the caller confirms nothing past the
///   failed record and replays from its confirmed position, which can
///   duplicate but never lose or reorder a partition's prefix.
/// - **Backpressure.** `SendError::Full` is not an error: keep the record
///   and retry once a report has freed room.
/// - **Transactions** (when the sink is transactional): records sent
///   between `begin_transaction` and a successful `commit_transaction` are
///   visible together or not at all; the commit returns once they are all
///   delivered. A failed commit has aborted what it could.
pub trait Sink {
    /// What `prepare_topic` learns about a topic.
    type Topic: Send + 'static;

    /// True when records can be placed in `topic`.
    fn has_topic(&self, topic: &str) -> bool;
    /// Readies `topic` (creates it if need be, reads its partitions and,
    /// exactly-once, their last positions).
    fn prepare_topic(&self, topic: &str) -> BoxFuture<'static, Result<Self::Topic, RelayError>>;
    /// Takes what `prepare_topic` found.
    fn add_topic(&mut self, topic: String, prepared: Self::Topic);
    /// Chooses `record`'s partition; `Duplicate` when it already holds `at`.
    fn place(&mut self, record: &mut OutboxRecord, at: Position) -> Placement;
    /// Enqueues `record` for transaction `txn` without waiting.
    fn try_send(&mut self, record: OutboxRecord, txn: TxnId) -> Result<(), SendError>;
    /// The next report; cancel-safe.
    fn next_report(&mut self) -> impl Future<Output = Option<DeliveryReport>> + Send;
    /// Records accepted and not yet reported.
    fn in_flight(&self) -> usize;
    /// Drops every record not sent yet: this relay must stop writing.
    fn purge(&mut self);

    /// True when records go in transactions (`--kafka-transactions`).
    fn transactional(&self) -> bool;
    /// True while a transaction is open.
    fn transaction_open(&self) -> bool;
    fn begin_transaction(&mut self) -> Result<(), RelayError>;
    fn commit_transaction(&mut self) -> impl Future<Output = Result<(), RelayError>> + Send;
    fn abort_transaction(&mut self) -> impl Future<Output = Result<(), RelayError>> + Send;
}
