//! Exactly-once on restart: skip what a partition already holds.
//!
//! After a crash (or any reconnect) Postgres replays the slot from its
//! confirmed position, so transactions that reached Kafka but were not yet
//! confirmed come again. This module finds, per partition, the position of
//! the last record the relay wrote there, and the pipeline skips every
//! replayed record at or below it.
//!
//! ```text
//!   partition 0:  … (0/50,0) (0/90,0) (0/90,1)      ◀ last = (0/90, 1)
//!   replay:       (0/90,0) skip · (0/90,1) skip · (0/A0,0) produce · …
//! ```
//!
//! **Why this is exact.** A record's position is `(lsn, seq)`: the commit
//! LSN of its transaction and its index in it (the `lsn` and `seq`
//! headers). The stream delivers transactions in commit-LSN order and rows
//! in statement order, so positions strictly increase along the stream, and
//! so along each partition's share of it. The relay chooses each record's
//! partition itself ([`partition_for`], Kafka's murmur2 partitioner, from the
//! key) so a replayed record goes to the partition it went to before. The
//! producer is idempotent with `enable.gapless.guarantee`: what a partition
//! holds is a *prefix* of the records the relay sent it, in order — a record
//! is never stored after a missing predecessor. So with `last` the position
//! of the partition's last record, every record of that partition at or
//! below `last` is already there (prefix), and every record above it is not
//! (order). Skipping exactly the records `≤ last` produces each record once.
//!
//! **Before reading `last`**, records a previous session still has in flight
//! are drained (acknowledged or failed): otherwise one could land after the
//! read and be produced again.
//!
//! **The last record is found by reading**, not computed from the high
//! watermark: `high - 1` is the offset of the last visible record only when
//! no transactional writer touched the partition. With
//! `--kafka-transactions` the last offsets hold transaction markers, and
//! aborted records (of this relay or of a producer it fenced) may precede
//! them; the reader is `read_committed`, so none of those is visible.
//! Reading starts one offset below the high watermark and goes on until the
//! end of the partition is reported after a record (or, failing that, the
//! partition stays quiet), and the newest record read is the last one. When
//! the end of a partition comes before any record, reading restarts further
//! back ([`step_back`]: 64, 4096, … offsets from the end, down to the low
//! watermark), so the last *committed* record is found; a partition with
//! none is empty for this purpose. `relay/tests/relay/transactions.rs` runs this
//! on Apache Kafka with 100 aborted records and a marker at the end of each
//! partition (librdkafka's mock cluster writes no markers and ignores the
//! isolation level).
//!
//! **Where the proof's assumptions break, the relay stops with a clear
//! error instead of guessing** ([`DedupeError`]):
//! - the last record of a partition has no `lsn`/`seq` headers (another
//!   writer shares the topic): its position is unknown, so nothing can be
//!   skipped safely — unless `--foreign-records skip` says the topic is
//!   being taken over from another writer (the JDBC source connector,
//!   Debezium): then records without a position are passed over and the
//!   newest record *with* one is the last. That is exact too: another
//!   writer's records, before or among the relay's, change nothing of
//!   the relay's own being a prefix, in order, of what it sent. The cost:
//!   a partition holding none of the relay's records is read back to its
//!   start on every session start, until the relay writes to it;
//! - the positions read in a partition go backwards (another relay, or a
//!   relay on another database, writes to it): the prefix argument fails.
//!
//! **With Kafka transactions the ends are checked against atomicity.** A
//! Kafka transaction holds whole Postgres transactions, so in a correct
//! view every row of one Postgres transaction is either at or below its
//! partition's `last` or above it. The pipeline checks this as it replays:
//! a Postgres transaction found partly written (some rows skipped, some
//! not) ends the session, and the next one reads the ends again. That view
//! appears while transaction markers are still being written (the commit
//! returns before the coordinator has written every partition's marker, and
//! a partition without it hides the transaction's records): producing on
//! it would write those records again; and a view showing records of a
//! transaction that was not committed would lose the rest. Only a view that three sessions in a row find the
//! same is taken as it is, per partition: a topic written before
//! `--kafka-transactions`, or whose partition count changed.
//!
//! What remains outside the guarantee, stated rather than detected: if the
//! topic's partition count changes between the crash and the restart, keys
//! move to other partitions and the replayed records of a moved key are
//! produced again (duplicates, never loss); and two relays on the same slot
//! at once are prevented by the slot itself (only one walsender may stream
//! it), not by this module.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use outbox_record::Meta;
/// A record's place in the stream: commit LSN of its transaction, index in it.
pub use outbox_record::Position;

use crate::sink::KafkaConfig;

#[derive(Debug, thiserror::Error)]
pub enum DedupeError {
    #[error("reading the end of topic {topic}")]
    Kafka {
        topic: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("topic {0} does not exist or has no partitions")]
    NoPartitions(String),
    #[error(
        "the last record of {topic}/{partition} (offset {offset}) has no lsn/seq headers: another writer \
         shares the topic, so exactly-once cannot tell what was already written; give the relay its own \
         topic, run with --foreign-records skip when taking the topic over from that writer (stopped), \
         or with --delivery at-least-once"
    )]
    ForeignRecord {
        topic: String,
        partition: i32,
        offset: i64,
    },
    #[error(
        "positions in {topic}/{partition} go backwards at offset {offset} ({at:?} after {before:?}): \
         another relay writes to this topic; give each relay its own topic, or run with --delivery at-least-once"
    )]
    OutOfOrder {
        topic: String,
        partition: i32,
        offset: i64,
        before: Position,
        at: Position,
    },
    #[error("could not read the last record of {topic}/{partition} within {waited:?}")]
    Unreadable {
        topic: String,
        partition: i32,
        waited: Duration,
    },
}

impl DedupeError {
    /// Broker trouble is retried; the rest needs an operator.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            DedupeError::Kafka { .. } | DedupeError::Unreadable { .. }
        )
    }
}

/// Kafka's default partitioner (Java client; librdkafka's `murmur2_random`
/// for non-empty keys): `(murmur2(key) & 0x7fffffff) % partitions`.
pub fn partition_for(key: &[u8], partitions: i32) -> i32 {
    let partitions = partitions.max(1) as u32;
    ((murmur2(key) & 0x7fff_ffff) % partitions) as i32
}

/// MurmurHash2, 32-bit, with Kafka's seed.
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// What the relay knows of one topic: its partition count and, in
/// exactly-once mode, the last position written to each partition.
#[derive(Debug, Clone)]
pub struct TopicState {
    pub partitions: i32,
    /// `last[p]`: the position of partition `p`'s last record, if any.
    pub last: Vec<Option<Position>>,
}

impl TopicState {
    /// True when partition `partition` already holds the record at `pos`.
    pub fn holds(&self, partition: i32, pos: Position) -> bool {
        usize::try_from(partition)
            .ok()
            .and_then(|p| self.last.get(p).copied().flatten())
            .is_some_and(|last| pos <= last)
    }
}

/// Reads `topic`'s partition count and, if `read_last`, each partition's
/// last position. Blocking Kafka calls run on the blocking pool.
pub async fn load(
    cfg: &KafkaConfig,
    topic: &str,
    read_last: bool,
) -> Result<TopicState, DedupeError> {
    let client_cfg = cfg.client_config();
    let topic = topic.to_owned();
    let skip_foreign = cfg.skip_foreign_records;
    tokio::task::spawn_blocking(move || load_blocking(client_cfg, &topic, read_last, skip_foreign))
        .await
        .unwrap_or_else(|join| {
            tracing::error!(error = %join, "dedupe reader task failed");
            Err(DedupeError::Kafka {
                topic: String::new(),
                source: rdkafka::error::KafkaError::Canceled,
            })
        })
}

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for the first record of a non-empty partition.
const FIRST_RECORD_TIMEOUT: Duration = Duration::from_secs(15);
/// Once records flow, a partition is read to its end when its end is
/// reported after its newest record, or (should that report not come, as
/// after a seek back to an end already reported) when nothing more arrives
/// for this long.
const QUIET: Duration = Duration::from_millis(500);

fn load_blocking(
    mut client_cfg: rdkafka::ClientConfig,
    topic: &str,
    read_last: bool,
    skip_foreign: bool,
) -> Result<TopicState, DedupeError> {
    let kafka = kafka_error(topic);
    let consumer: BaseConsumer<EndsContext> = client_cfg
        .set("group.id", "outbox-relay-dedupe")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // End-of-partition events tell a tail with nothing visible (see
        // `step_back`) from one that is slow to answer.
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed")
        // The tails are short: an empty fetch at the end should come back
        // at once, not after the broker's default 500 ms wait for data.
        .set("fetch.wait.max.ms", "10")
        .create_with_context(EndsContext)
        .map_err(kafka)?;
    let result = read_ends(&consumer, topic, read_last, skip_foreign);
    // Closing a consumer takes a while (up to ~100 ms seen here) and
    // nothing waits on it: the session goes on meanwhile.
    std::thread::spawn(move || drop(consumer));
    result
}

/// Wraps a client error with the topic being read.
fn kafka_error(topic: &str) -> impl Fn(rdkafka::error::KafkaError) -> DedupeError + Copy + '_ {
    move |source| DedupeError::Kafka {
        topic: topic.to_owned(),
        source,
    }
}

/// The reader's client context: librdkafka also reports each end of a
/// partition as a client error, which the default context logs at ERROR;
/// here they are expected, so only other errors are logged.
struct EndsContext;

impl rdkafka::ClientContext for EndsContext {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        let eof = rdkafka::error::KafkaError::Global(RDKafkaErrorCode::PartitionEOF);
        if error != eof {
            tracing::error!(%error, reason, "kafka client error (dedupe reader)");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for EndsContext {}

/// [`load_blocking`]'s work, on its consumer. With `skip_foreign`, records
/// without a position are passed over as if invisible: reading goes back
/// until a record of the relay's, or the partition's start.
fn read_ends(
    consumer: &BaseConsumer<EndsContext>,
    topic: &str,
    read_last: bool,
    skip_foreign: bool,
) -> Result<TopicState, DedupeError> {
    let kafka = kafka_error(topic);
    let partitions = partition_count(consumer, topic).map_err(kafka)?;
    if partitions == 0 {
        return Err(DedupeError::NoPartitions(topic.to_owned()));
    }
    let mut last: Vec<Option<Position>> = vec![None; partitions as usize];
    if !read_last {
        return Ok(TopicState { partitions, last });
    }

    // Start one offset below each partition's end; it may hold a
    // transaction marker or an aborted record (see the module docs).
    let mut tails: Vec<Option<Tail>> = vec![None; partitions as usize];
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, METADATA_TIMEOUT)
            .map_err(kafka)?;
        tracing::debug!(%topic, partition = p, low, high, "reported watermarks");
        if high > low {
            let start = (high - 1).max(low);
            assignment
                .add_partition_offset(topic, p, Offset::Offset(start))
                .map_err(kafka)?;
            tails[p as usize] = Some(Tail {
                low,
                high,
                start,
                newest: None,
                at_end: false,
                empty: false,
                foreign: 0,
            });
        }
    }
    if assignment.count() == 0 {
        return Ok(TopicState { partitions, last });
    }
    consumer.assign(&assignment).map_err(kafka)?;

    let mut progress_at = std::time::Instant::now();
    let mut last_message_at: Option<std::time::Instant> = None;
    loop {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(msg)) => {
                last_message_at = Some(std::time::Instant::now());
                progress_at = std::time::Instant::now();
                let Some(tail) = tails
                    .get_mut(msg.partition() as usize)
                    .and_then(Option::as_mut)
                else {
                    continue;
                };
                let pos = position_of(&msg);
                if pos.is_none() && skip_foreign {
                    tail.foreign += 1;
                    continue;
                }
                let before = tail.newest.and_then(|(_, p)| p);
                if let (Some(at), Some(before)) = (pos, before) {
                    if at <= before {
                        return Err(DedupeError::OutOfOrder {
                            topic: topic.to_owned(),
                            partition: msg.partition(),
                            offset: msg.offset(),
                            before,
                            at,
                        });
                    }
                }
                tail.newest = Some((msg.offset(), pos));
                tail.at_end = false;
            }
            // The end after a record: that partition is read. The end
            // before any record: everything from `start` on is invisible to
            // a read_committed reader (transaction markers, aborted
            // records), so look further back.
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                // No `continue` here: the check below must see this end.
                if let Some(tail) = tails.get_mut(p as usize).and_then(Option::as_mut) {
                    if tail.newest.is_some() {
                        tail.at_end = true;
                    } else if !tail.empty {
                        progress_at = std::time::Instant::now();
                        if tail.start <= tail.low {
                            tail.empty = true;
                        } else {
                            tail.start = step_back(tail.low, tail.high, tail.start);
                            tracing::debug!(%topic, partition = p, offset = tail.start, "nothing visible at the end; reading from further back");
                            consumer
                                .seek(topic, p, Offset::Offset(tail.start), METADATA_TIMEOUT)
                                .map_err(kafka)?;
                        }
                    }
                }
            }
            Some(Err(e)) => return Err(kafka(e)),
            None => {}
        }
        let resolved = tails
            .iter()
            .flatten()
            .all(|t| t.newest.is_some() || t.empty);
        let at_end = tails.iter().flatten().all(|t| t.at_end || t.empty);
        let quiet = last_message_at.is_none_or(|t| t.elapsed() >= QUIET);
        if at_end || (resolved && quiet) || progress_at.elapsed() >= FIRST_RECORD_TIMEOUT {
            break;
        }
    }
    for (p, tail) in tails.iter().enumerate() {
        let Some(tail) = tail else { continue };
        let p = p as i32;
        match tail.newest {
            None if tail.empty => {}
            None => {
                return Err(DedupeError::Unreadable {
                    topic: topic.to_owned(),
                    partition: p,
                    waited: FIRST_RECORD_TIMEOUT,
                })
            }
            Some((offset, None)) => {
                return Err(DedupeError::ForeignRecord {
                    topic: topic.to_owned(),
                    partition: p,
                    offset,
                })
            }
            Some((offset, Some(pos))) => {
                if tail.foreign > 0 {
                    tracing::info!(%topic, partition = p, offset, passed_over = tail.foreign,
                        "another writer's records (no lsn/seq) passed over to the relay's last (--foreign-records skip)");
                }
                tracing::debug!(%topic, partition = p, offset, lsn = %pos.0, seq = pos.1, "last record");
                last[p as usize] = Some(pos);
            }
        }
    }
    Ok(TopicState { partitions, last })
}

/// How many partitions `topic` has (0 when the broker does not know it).
pub(crate) fn partition_count<C: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
) -> rdkafka::error::KafkaResult<i32> {
    let md = consumer.fetch_metadata(Some(topic), METADATA_TIMEOUT)?;
    Ok(md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map_or(0, |t| t.partitions().len()) as i32)
}

/// Reading state of one non-empty partition.
#[derive(Debug, Clone, Copy)]
struct Tail {
    low: i64,
    high: i64,
    /// Where reading (re)started.
    start: i64,
    /// Offset and position of the newest record read.
    newest: Option<(i64, Option<Position>)>,
    /// The end of the partition came after `newest`: nothing newer.
    at_end: bool,
    /// Read from `low` to the end without a visible record.
    empty: bool,
    /// Another writer's records passed over (`--foreign-records skip`).
    foreign: u64,
}

/// The next, earlier start when nothing was visible from `start` to the
/// end: 64 times as far from the end, at most back to `low`
/// (`high - 1`, `high - 64`, `high - 4096`, …).
fn step_back(low: i64, high: i64, start: i64) -> i64 {
    let distance = (high - start).max(1);
    high.saturating_sub(distance.saturating_mul(64)).max(low)
}

/// The `(lsn, seq)` headers of a record the relay wrote.
fn position_of<M: Message>(msg: &M) -> Option<Position> {
    let headers = msg.headers()?;
    Meta::read(headers.iter().map(|h| (h.key, h.value))).position()
}

#[cfg(test)]
mod tests;
