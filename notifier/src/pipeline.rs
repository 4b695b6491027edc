//! Pipeline: the consumer loop. Owns the Kafka consumer, gives each
//! partition of the topic its own librdkafka queue and worker, and each
//! worker stores a record's offset once the record was handled; serves
//! `/metrics` and `/healthz` alongside.
//!
//! ```text
//!                 ┌─ partition queue p0 ──▶ worker p0: handle ─▶ handle ─▶ … ─┐ store_offset(p, o+1)
//!  Kafka ─fetch─▶ ┼─ partition queue p1 ──▶ worker p1: handle ─▶ …           ├──────────────┐
//!  (group         └─ partition queue p2 ──▶ worker p2: …                    ─┘              ▼
//!   notifier)      main queue ──▶ loop: rebalances, errors              commit stored offsets: every
//!                                                                       --commit-interval, on revoke,
//!                                                                       on shutdown
//! ```
//!
//! Offsets: `enable.auto.offset.store=false`, so librdkafka commits only
//! what the workers stored. A worker handles its partition's records one at
//! a time, in offset order, and stores each offset only after the handler
//! returned — so per partition, the stored offset never passes an unhandled
//! record, and a record retried after a transient failure holds back every
//! later record of its partition. Partitions proceed independently (one
//! slow SMTP conversation does not serialize the others).
//!
//! Flow control: each partition's records arrive on that partition's own
//! librdkafka queue (`split_partition_queue`), and librdkafka stops
//! fetching a partition while its queue holds `queued.min.messages`
//! records, then fetches on from where it stopped. Nothing is paused,
//! resumed or re-fetched. The notifier used to pause a partition whose
//! worker fell 64 records behind and resume it later; a resume restarts
//! the fetch at the last record the application took, which can lie inside
//! a record batch, and a broker that answers such a fetch with the *next*
//! batch (Tansu 0.6.0 did) silently skips the rest of that batch: a quarter
//! of every burst went unhandled while the committed offsets moved past
//! it. With per-partition queues there is no fetch position but the one the
//! fetcher advanced itself, on any broker.
//!
//! Partitions: the queues are split off before the first assignment, for
//! every partition the topic has, and for partitions added later when a
//! metadata refresh (every [`PARTITION_REFRESH`]) finds them. A record that
//! still reaches the main queue (a partition assigned before the refresh
//! saw it) is not handled there: its partition gets a queue and is sought
//! back to that record, so it is fetched again into the new queue, in order.
//!
//! Rebalances: librdkafka runs the rebalance callback inside the main
//! queue's `recv`. On revocation the callback marks the partitions as no
//! longer owned (workers skip records of a partition they do not own; the
//! fetch of a revoked partition stops and what it had queued is dropped by
//! librdkafka), then commits the stored offsets synchronously, so the next
//! owner starts right after the last handled record. A record in flight at
//! that moment finishes; its offset is not committed, so the next owner
//! gets it again and the inbox turns it into a duplicate (its row lock
//! makes the next owner wait for the in-flight send to end). Likewise after
//! a crash, or after a worker stuck in retries past `max.poll.interval.ms`
//! made librdkafka leave the group: redelivered records become duplicates,
//! not second emails.
//!
//! Refused access — the broker rejects the credentials, or an ACL is
//! missing for the topic, the group or the dead-letter topic — is definite
//! (see `access`): the loop stops and the notifier exits with it.
//!
//! Event loop priorities (`select!` is biased): shutdown first, refused
//! access, then the main queue. Shutdown interrupts a handler only while it
//! waits between retries, never in the middle of a send; the workers are
//! joined, stored offsets committed, and the consumer leaves the group.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{ClientContext, Message, Offset};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::access::{AccessDenied, KafkaAccess};
use crate::config::Config;
use crate::dlq::{DeadLetterQueue, DlqError};
use crate::email::Composer;
use crate::handler::{error_chain, Backoff, Handler, Interrupted};
use crate::http::Shared;
use crate::inbox::{Inbox, InboxError};
use crate::mailer::{Mailer, MailerSetupError};

/// Errors that stop the notifier (definite: retrying cannot help).
#[derive(Debug, thiserror::Error)]
pub enum NotifierError {
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("mail destination")]
    Mailer(#[from] MailerSetupError),
    #[error("invalid sender address {address:?}")]
    MailFrom {
        address: String,
        #[source]
        source: lettre::address::AddressError,
    },
    #[error("Kafka consumer")]
    Kafka(#[source] KafkaError),
    /// Kafka refused the notifier's credentials or an operation (no ACL).
    #[error(transparent)]
    KafkaAccess(AccessDenied),
    #[error("dead-letter producer")]
    Dlq(#[from] DlqError),
    #[error("inbox")]
    Inbox(#[source] InboxError),
    #[error("partition {partition} of the topic has no queue to split off")]
    PartitionQueue { partition: i32 },
}

/// Runs the notifier until `shutdown` is cancelled (Ok) or a definite error.
pub async fn run(cfg: Config, shutdown: CancellationToken) -> Result<(), NotifierError> {
    run_with(cfg, shutdown, Shared::new()).await
}

/// [`run`] with caller-provided shared state (tests read metrics and the
/// HTTP address from it).
pub async fn run_with(
    cfg: Config,
    shutdown: CancellationToken,
    shared: Arc<Shared>,
) -> Result<(), NotifierError> {
    let http_stop = shutdown.child_token();
    let (http_addr, http) = lifecycle::http::serve(
        cfg.listen,
        crate::http::router(shared.clone()),
        http_stop.clone(),
    )
    .await
    .map_err(|source| NotifierError::Listen {
        addr: cfg.listen,
        source,
    })?;
    shared.set_http_addr(Some(http_addr));

    let result = consume(&cfg, &shared, &shutdown).await;
    if let Err(e) = &result {
        tracing::error!(error = %error_chain(e), "notifier stopped");
        shared.set_failed();
    }
    http_stop.cancel();
    let _ = http.await;
    result
}

/// How often the topic's partition count is looked up again, so that
/// partitions added to the topic get their own queue before they are
/// assigned.
const PARTITION_REFRESH: Duration = Duration::from_secs(10);

/// Records librdkafka keeps fetched ahead per partition, unless
/// `--kafka-property queued.min.messages=…` says otherwise: enough to keep
/// a worker busy between fetches, small enough that a stuck partition holds
/// little memory.
const PREFETCH_RECORDS: &str = "1000";

/// The partitions this instance owns (updated by the rebalance callback).
#[derive(Default)]
struct Assignment {
    owned: Mutex<HashSet<i32>>,
}

impl Assignment {
    fn assign(&self, partition: i32) {
        self.lock().insert(partition);
    }

    fn revoke(&self, partition: i32) {
        self.lock().remove(&partition);
    }

    fn owns(&self, partition: i32) -> bool {
        self.lock().contains(&partition)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<i32>> {
        // A panic while holding this lock cannot leave the set half-updated.
        self.owned.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Logs client errors (reports refused access), tracks the assignment and
/// commits stored offsets when partitions are revoked.
struct NotifierContext {
    assignment: Arc<Assignment>,
    access: KafkaAccess,
    /// What the consumer does, for messages: topic and group.
    subject: String,
}

impl ClientContext for NotifierContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        self.access.check_log(level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if !self
            .access
            .check(&error, format!("{}: {reason}", self.subject))
        {
            tracing::warn!(error = %error, reason, "kafka client error");
        }
    }
}

impl ConsumerContext for NotifierContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                // Workers stop taking records of these partitions; then the
                // offsets of everything handled so far are committed before
                // the partitions go, so their next owner starts after them.
                for e in tpl.elements() {
                    self.assignment.revoke(e.partition());
                }
                match consumer.commit_consumer_state(CommitMode::Sync) {
                    Ok(()) => tracing::info!(
                        partitions = tpl.count(),
                        "partitions revoked; committed handled offsets"
                    ),
                    Err(e) if is_no_offset(&e) => {
                        tracing::info!(partitions = tpl.count(), "partitions revoked")
                    }
                    Err(e) => tracing::warn!(
                        error = %e,
                        "partitions revoked; committing handled offsets failed (the next owner redelivers, the inbox dedupes)"
                    ),
                }
            }
            Rebalance::Assign(tpl) => {
                let mut parts = Vec::new();
                for e in tpl.elements() {
                    self.assignment.assign(e.partition());
                    parts.push(format!("{}[{}]", e.topic(), e.partition()));
                }
                tracing::info!(partitions = %parts.join(","), "partitions assigned");
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }
}

fn is_no_offset(e: &KafkaError) -> bool {
    e.rdkafka_error_code() == Some(RDKafkaErrorCode::NoOffset)
}

type NotifierConsumer = StreamConsumer<NotifierContext>;

/// Client settings shared by the consumer, the DLQ producer and the admin client.
fn base_client_config(cfg: &Config) -> ClientConfig {
    lifecycle::kafka::client_config(
        &cfg.kafka_bootstrap_servers,
        [("client.id", "notifier".to_owned())],
        &cfg.kafka_properties(),
    )
}

fn consumer_config(cfg: &Config) -> ClientConfig {
    let settings = [
        ("client.id", "notifier".to_owned()),
        ("group.id", cfg.group.clone()),
        ("enable.auto.commit", "true".to_owned()),
        (
            "auto.commit.interval.ms",
            cfg.commit_interval.as_millis().max(1).to_string(),
        ),
        ("enable.auto.offset.store", "false".to_owned()),
        ("auto.offset.reset", "earliest".to_owned()),
        ("enable.partition.eof", "false".to_owned()),
        ("queued.min.messages", PREFETCH_RECORDS.to_owned()),
        // A full partition queue is checked again this soon (default 1 s).
        ("fetch.queue.backoff.ms", "20".to_owned()),
        (
            "fetch.wait.max.ms",
            cfg.fetch_max_wait.as_millis().clamp(0, 300_000).to_string(),
        ),
    ];
    lifecycle::kafka::client_config(
        &cfg.kafka_bootstrap_servers,
        settings,
        &cfg.kafka_properties(),
    )
}

/// What every worker's handler is made of.
struct Parts {
    composer: Composer,
    mailer: Mailer,
    dlq: DeadLetterQueue,
    /// A checked, unconnected inbox to clone the settings from.
    inbox: Inbox,
    shared: Arc<Shared>,
    backoff: Backoff,
}

impl Parts {
    fn handler(&self) -> Handler {
        Handler {
            composer: self.composer.clone(),
            mailer: self.mailer.clone(),
            inbox: self.inbox.unconnected(),
            dlq: self.dlq.clone(),
            shared: self.shared.clone(),
            backoff: self.backoff,
        }
    }
}

type PartitionQueue = StreamPartitionQueue<NotifierContext>;

/// The workers, one per partition of the topic, each reading its
/// partition's queue.
struct Workers {
    topic: String,
    consumer: Arc<NotifierConsumer>,
    parts: Parts,
    assignment: Arc<Assignment>,
    stop: CancellationToken,
    running: HashMap<i32, JoinHandle<()>>,
}

impl Workers {
    /// Splits off the queue of `partition` and starts its worker, unless it
    /// has one. Returns whether a worker was started.
    fn ensure(&mut self, partition: i32) -> Result<bool, NotifierError> {
        if self.running.contains_key(&partition) {
            return Ok(false);
        }
        let queue = self
            .consumer
            .split_partition_queue(&self.topic, partition)
            .ok_or(NotifierError::PartitionQueue { partition })?;
        let task = tokio::spawn(work(
            partition,
            queue,
            self.parts.handler(),
            self.consumer.clone(),
            self.assignment.clone(),
            self.stop.clone(),
        ));
        self.running.insert(partition, task);
        Ok(true)
    }

    /// Starts workers for partitions `0..count` that have none.
    fn ensure_all(&mut self, count: i32) -> Result<(), NotifierError> {
        for partition in 0..count {
            self.ensure(partition)?;
        }
        Ok(())
    }

    /// Stops every worker and waits for it (a handler mid-send finishes).
    async fn join(self) {
        self.stop.cancel();
        for (partition, task) in self.running {
            if let Err(e) = task.await {
                tracing::error!(partition, error = %e, "partition worker failed");
            }
        }
    }
}

/// The number of partitions of `topic`, from the cluster's metadata; `None`
/// while the topic does not exist (yet) or the cluster cannot be reached,
/// and when the notifier may not describe it (reported to `access`).
async fn partition_count(
    consumer: &Arc<NotifierConsumer>,
    topic: &str,
    access: &KafkaAccess,
) -> Option<i32> {
    let consumer = consumer.clone();
    let topic = topic.to_owned();
    let access = access.clone();
    let looked_up = tokio::task::spawn_blocking(move || {
        let metadata = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
        let t = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .ok_or_else(|| "topic not in metadata".to_owned())?;
        if let Some(e) = t.error() {
            let code = RDKafkaErrorCode::from(e);
            if let Some(denied) = AccessDenied::new(code, format!("describing topic {topic}")) {
                access.deny(denied);
            }
            return Err(format!("{code:?}"));
        }
        Ok(t.partitions().len() as i32)
    })
    .await;
    match looked_up {
        Ok(Ok(n)) if n > 0 => Some(n),
        Ok(Ok(_)) => None,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "looking up the topic's partitions");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "looking up the topic's partitions");
            None
        }
    }
}

async fn consume(
    cfg: &Config,
    shared: &Arc<Shared>,
    shutdown: &CancellationToken,
) -> Result<(), NotifierError> {
    let mailer = Mailer::from_config(
        cfg.smtp_url.as_deref(),
        cfg.mail_dir.as_deref(),
        cfg.smtp_timeout,
    )?;
    if cfg.smtp_url.is_some() && cfg.mail_dir.is_some() {
        tracing::info!("both an SMTP URL and a mail directory are set; sending by SMTP");
    }
    let composer = Composer::new(&cfg.mail_from).map_err(|source| NotifierError::MailFrom {
        address: cfg.mail_from.clone(),
        source,
    })?;
    let backoff = Backoff {
        initial: cfg.initial_backoff,
        max: cfg.max_backoff.max(cfg.initial_backoff),
    };

    // Fail fast on a missing table; wait out an unreachable database.
    let mut inbox = Inbox::new(&cfg.database_url).map_err(NotifierError::Inbox)?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        match inbox.check().await {
            Ok(()) => break,
            Err(e) if !e.is_transient() => return Err(NotifierError::Inbox(e)),
            Err(e) => {
                let wait = backoff.jittered(attempt);
                tracing::warn!(error = %error_chain(&e), retry_in_ms = wait.as_millis() as u64, "inbox database unavailable");
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }

    // Every Kafka client reports refused credentials or permissions here;
    // the notifier then stops (retrying cannot help).
    let access = KafkaAccess::default();
    let base = base_client_config(cfg);
    let dlq = DeadLetterQueue::new(&base, &cfg.dlq_topic(), &access)?;
    tokio::select! {
        biased;
        denied = access.denied() => return Err(NotifierError::KafkaAccess(denied)),
        () = dlq.ensure_topic(&base) => {}
    }

    let assignment = Arc::new(Assignment::default());
    let consumer: Arc<NotifierConsumer> = Arc::new(
        consumer_config(cfg)
            .create_with_context(NotifierContext {
                assignment: assignment.clone(),
                access: access.clone(),
                subject: format!("consuming topic {} in group {}", cfg.topic, cfg.group),
            })
            .map_err(NotifierError::Kafka)?,
    );
    tracing::info!(
        topic = %cfg.topic,
        group = %cfg.group,
        dlq_topic = %dlq.topic(),
        mailer = %mailer.describe(),
        "notifier starting"
    );
    let parts = Parts {
        composer,
        mailer,
        dlq,
        inbox: inbox.unconnected(),
        shared: shared.clone(),
        backoff,
    };
    // Stops the workers on shutdown and on any other way out of the loop.
    let stop = shutdown.child_token();
    let mut workers = Workers {
        topic: cfg.topic.clone(),
        consumer: consumer.clone(),
        parts,
        assignment,
        stop: stop.clone(),
        running: HashMap::new(),
    };

    // Every partition gets its queue before the group assigns any.
    let mut attempt = 0;
    let mut partitions = loop {
        if let Some(n) = partition_count(&consumer, &cfg.topic, &access).await {
            break n;
        }
        attempt += 1;
        if attempt == 1 || attempt % 30 == 0 {
            tracing::warn!(topic = %cfg.topic, "topic not found (or the cluster not reachable); waiting for it");
        }
        tokio::select! {
            biased;
            _ = stop.cancelled() => {
                workers.join().await;
                return Ok(());
            }
            denied = access.denied() => {
                workers.join().await;
                return Err(NotifierError::KafkaAccess(denied));
            }
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    };
    workers.ensure_all(partitions)?;
    consumer
        .subscribe(&[&cfg.topic])
        .map_err(NotifierError::Kafka)?;
    tracing::info!(topic = %cfg.topic, partitions, "notifier consuming");

    let mut refresh = tokio::time::interval(PARTITION_REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    refresh.reset();
    let result = loop {
        let received = tokio::select! {
            biased;
            _ = stop.cancelled() => break Ok(()),
            // Credentials or permissions refused (to the consumer, or to the
            // dead-letter producer): stop, whatever the workers hold.
            denied = access.denied() => break Err(NotifierError::KafkaAccess(denied)),
            _ = refresh.tick() => {
                if let Some(n) = partition_count(&consumer, &cfg.topic, &access).await {
                    if n > partitions {
                        tracing::info!(from = partitions, to = n, "the topic has more partitions; starting their workers");
                        partitions = n;
                        if let Err(e) = workers.ensure_all(n) {
                            break Err(e);
                        }
                    }
                }
                continue;
            }
            r = consumer.recv() => r,
        };
        match received {
            // Only a partition without its own queue yet delivers here: give
            // it one and fetch this record again into it, so it is handled
            // in order with the ones after it.
            Ok(m) => {
                let (partition, offset) = (m.partition(), m.offset());
                let topic = m.topic().to_owned();
                drop(m);
                tracing::info!(partition, offset, "record of a partition without a worker; starting one and fetching again from this record");
                if let Err(e) = workers.ensure(partition) {
                    break Err(e);
                }
                partitions = partitions.max(partition + 1);
                if let Err(e) =
                    consumer.seek(&topic, partition, Offset::Offset(offset), Duration::ZERO)
                {
                    tracing::warn!(partition, offset, error = %e, "seeking back failed; leaving the partition to a restart of the consumer");
                    break Err(NotifierError::Kafka(e));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "kafka consumer error");
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => break Ok(()),
                    denied = access.denied() => break Err(NotifierError::KafkaAccess(denied)),
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
    };

    workers.join().await;
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => tracing::info!("committed handled offsets"),
        Err(e) if is_no_offset(&e) => {}
        Err(e) => tracing::warn!(error = %e, "committing handled offsets on shutdown failed"),
    }
    // Closing leaves the group (running the revoke callback once more);
    // it blocks while librdkafka says goodbye, so not on a runtime thread.
    let _ = tokio::task::spawn_blocking(move || drop(consumer)).await;
    tracing::info!("notifier stopped");
    result
}

/// One partition's worker: handles the records of its partition queue in
/// order, storing each offset once handled; skips records of a partition
/// this instance no longer owns.
async fn work(
    partition: i32,
    queue: PartitionQueue,
    mut handler: Handler,
    consumer: Arc<NotifierConsumer>,
    assignment: Arc<Assignment>,
    stop: CancellationToken,
) {
    loop {
        let received = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            r = queue.recv() => r,
        };
        let msg = match received {
            Ok(m) => m.detach(),
            Err(e) => {
                tracing::warn!(partition, error = %e, "kafka consumer error");
                continue;
            }
        };
        if !assignment.owns(partition) {
            tracing::debug!(
                partition,
                offset = msg.offset(),
                "partition revoked since this record was fetched; left to its next owner"
            );
            continue;
        }
        tracing::trace!(partition, offset = msg.offset(), "record received");
        match handler.handle(&msg, &stop).await {
            Ok(_) => {
                // Stores offset + 1: the next record to read.
                if let Err(e) = consumer.store_offset(msg.topic(), msg.partition(), msg.offset()) {
                    // Expected for a record in flight during a rebalance.
                    tracing::info!(
                        error = %e,
                        partition,
                        offset = msg.offset(),
                        "offset not stored (partition no longer assigned); its next owner gets the record again and the inbox skips it"
                    );
                }
            }
            Err(Interrupted) => break,
        }
    }
}
