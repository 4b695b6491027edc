//! The apply loop tests' Kafka side: an in-memory sink that keeps what it
//! "delivered" in order, with backpressure, failures, transactions and
//! slow topic preparation on request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::FutureExt;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use super::super::*;

/// What the in-memory sink was told, in order.
#[derive(Default)]
pub(super) struct Log {
    /// Records visible to a reader (delivered; in a transaction: committed).
    pub(super) visible: Vec<OutboxRecord>,
    pub(super) commits: usize,
    pub(super) aborts: usize,
    pub(super) prepared: Vec<String>,
}

pub(super) struct MemoryTopic {
    pub(super) partitions: i32,
    pub(super) last: Vec<Option<dedupe::Position>>,
}

pub(super) struct MemorySink {
    pub(super) log: Arc<Mutex<Log>>,
    pub(super) topics: HashMap<String, MemoryTopic>,
    /// Partitions of a topic readied by `prepare_topic`, and how long that takes.
    pub(super) new_topic_partitions: i32,
    pub(super) prepare_takes: Duration,
    /// Accepted, not yet reported, in order.
    pub(super) queue: VecDeque<(OutboxRecord, TxnId)>,
    pub(super) capacity: usize,
    /// The n-th record accepted (0-based) fails instead of being delivered.
    pub(super) fail_at: Option<usize>,
    pub(super) accepted: usize,
    pub(super) transactional: bool,
    pub(super) open: Option<Vec<OutboxRecord>>,
    /// Takes records and never reports on them (a stalled Kafka).
    pub(super) silent: bool,
    /// Each report comes this long after the one before.
    pub(super) report_every: Duration,
}

impl MemorySink {
    /// A sink and the log it writes, shared so the test reads it after.
    pub(super) fn with_log() -> (Arc<Mutex<Log>>, MemorySink) {
        let log = Arc::new(Mutex::new(Log::default()));
        let sink = MemorySink::new(&log);
        (log, sink)
    }

    fn new(log: &Arc<Mutex<Log>>) -> MemorySink {
        MemorySink {
            log: log.clone(),
            topics: HashMap::from([(
                "orders".to_owned(),
                MemoryTopic {
                    partitions: 3,
                    last: vec![None; 3],
                },
            )]),
            new_topic_partitions: 2,
            prepare_takes: Duration::ZERO,
            queue: VecDeque::new(),
            capacity: usize::MAX,
            fail_at: None,
            accepted: 0,
            transactional: false,
            open: None,
            silent: false,
            report_every: Duration::ZERO,
        }
    }
}

impl Sink for MemorySink {
    type Topic = MemoryTopic;

    fn has_topic(&self, topic: &str) -> bool {
        self.topics.contains_key(topic)
    }

    fn prepare_topic(
        &self,
        topic: &str,
    ) -> futures_util::future::BoxFuture<'static, Result<MemoryTopic, RelayError>> {
        let (log, topic, takes, partitions) = (
            self.log.clone(),
            topic.to_owned(),
            self.prepare_takes,
            self.new_topic_partitions,
        );
        async move {
            tokio::time::sleep(takes).await;
            log.lock().unwrap().prepared.push(topic);
            Ok(MemoryTopic {
                partitions,
                last: vec![None; partitions as usize],
            })
        }
        .boxed()
    }

    fn add_topic(&mut self, topic: String, prepared: MemoryTopic) {
        self.topics.insert(topic, prepared);
    }

    fn place(&mut self, record: &mut OutboxRecord, at: dedupe::Position) -> Placement {
        let topic = &self.topics[&record.topic];
        let key = record.key.as_deref().unwrap_or("");
        let p = dedupe::partition_for(key.as_bytes(), topic.partitions);
        record.partition = Some(p);
        match topic.last[p as usize] {
            Some(last) if at <= last => Placement::Duplicate,
            _ => Placement::Produce,
        }
    }

    fn try_send(&mut self, record: OutboxRecord, txn: TxnId) -> Result<(), SendError> {
        if self.queue.len() >= self.capacity {
            return Err(SendError::Full(record));
        }
        self.queue.push_back((record, txn));
        Ok(())
    }

    async fn next_report(&mut self) -> Option<DeliveryReport> {
        if self.silent || self.queue.is_empty() {
            return std::future::pending().await;
        }
        // Cancel-safe: the record leaves the queue only after the wait.
        tokio::time::sleep(self.report_every).await;
        let Some((record, txn)) = self.queue.pop_front() else {
            return std::future::pending().await;
        };
        let n = self.accepted;
        self.accepted += 1;
        if self.fail_at == Some(n) {
            return Some(DeliveryReport::Failed(
                crate::sink::kafka::classify_delivery(
                    KafkaError::MessageProduction(RDKafkaErrorCode::RequestTimedOut),
                    || unreachable!("a timeout is retried, not reported as refused"),
                ),
            ));
        }
        let topic: Arc<str> = Arc::from(record.topic.as_str());
        match self.open.as_mut() {
            Some(open) => open.push(record),
            None => self.log.lock().unwrap().visible.push(record),
        }
        Some(DeliveryReport::Delivered { txn, topic })
    }

    fn in_flight(&self) -> usize {
        self.queue.len()
    }

    fn purge(&mut self) {
        self.queue.clear();
    }

    fn transactional(&self) -> bool {
        self.transactional
    }

    fn transaction_open(&self) -> bool {
        self.open.is_some()
    }

    fn begin_transaction(&mut self) -> Result<(), RelayError> {
        assert!(self.open.is_none(), "a transaction is already open");
        self.open = Some(Vec::new());
        Ok(())
    }

    async fn commit_transaction(&mut self) -> Result<(), RelayError> {
        assert!(self.queue.is_empty(), "committed with records in flight");
        let records = self.open.take().expect("no open transaction");
        let mut log = self.log.lock().unwrap();
        log.visible.extend(records);
        log.commits += 1;
        Ok(())
    }

    async fn abort_transaction(&mut self) -> Result<(), RelayError> {
        self.open = None;
        self.log.lock().unwrap().aborts += 1;
        Ok(())
    }
}
