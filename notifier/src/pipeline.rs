//! Pipeline: the consumer loop. Owns the Kafka consumer, gives each
//! partition of the topic its own librdkafka queue and worker, and each
//! worker handles several records of its partition at once — one at a time
//! per key — and stores offsets up to the first record not yet handled;
//! serves `/metrics` and `/healthz` alongside.
//!
//! ```text
//!                 ┌─ queue p0 ─▶ worker p0: window ─▶ handler tasks (≤ --max-in-flight-per-partition)
//!  Kafka ─fetch─▶ ┼─ queue p1 ─▶ worker p1: window ─▶ …        │ each takes a handler from the
//!  (group         └─ queue p2 ─▶ worker p2: …                  │ pool (--handlers); claims
//!   notifier)      main queue ─▶ loop: rebalances, errors      │ batched (--inbox-db-connections)
//!                                                              ▼
//!                                      handled ─▶ window: prefix grew? ─▶ store_offset(p, last of prefix)
//!                                                                         ─▶ commit: every --commit-interval,
//!                                                                            on revoke, on shutdown
//! ```
//!
//! Concurrency and order: a worker takes records from its partition's queue
//! while fewer than `--max-in-flight-per-partition` handler tasks run and
//! its window (see `window`) has room. A record starts at once unless an
//! earlier record with the same Kafka key is still unhandled; then it waits
//! behind it, and starts when that one was handled. The key is the record
//! key, which the relay fills with the outbox row's `user_id` and
//! partitions by, so all of a customer's events are in one partition, in
//! event order: every event of one customer — so every event of each of
//! their orders — is emailed in event order, one at a time, while other
//! customers' emails go out beside them. (Ordering by `order_id` from the
//! payload would also do for one order's emails, but needs the payload
//! decoded before deciding and gives nothing for records that fail to
//! decode; the key orders a superset, and a customer rarely has many events
//! within one window.) Each task handles
//! its record with a handler of the shared [`HandlerPool`] — its inbox
//! claim batched with the other handlers' in one transaction per batch
//! (`inbox`) — so the pool bounds the emails in flight across partitions,
//! and a slow mail server or database is backpressure: tasks wait for
//! handlers, the worker stops taking records, librdkafka stops fetching.
//!
//! Offsets: `enable.auto.offset.store=false`, so librdkafka commits only
//! what the workers stored. A worker stores an offset only when every
//! record of its partition up to it was handled (the window's contiguous
//! prefix), so the stored offset never passes an unhandled record: a record
//! retried after a transient failure holds back the stored offset and the
//! later records of its key, not the records of other keys (until the
//! window, `PENDING_PER_IN_FLIGHT` × the in-flight bound, is full). After a
//! crash the records past the committed offset are delivered again; those
//! already handled are duplicates for the inbox. Partitions proceed
//! independently.
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
//! owner starts right after the handled prefix. Records in flight at that
//! moment finish; their offsets are not stored, and a worker that finds its
//! partition revoked (or assigned anew: each assignment has its own epoch)
//! drops its window — the records waiting in it start no more. The next
//! owner gets them all again; the in-flight ones become duplicates for the
//! inbox, whose row lock makes the next owner wait for an in-flight send to
//! end — so a key's next record cannot overtake it there either. The same
//! holds when the fetch starts again from an earlier offset for any other
//! reason: a record at or below the window's last offset drops the window.
//! Likewise after a crash, or after a worker stuck in retries past
//! `max.poll.interval.ms` made librdkafka leave the group: redelivered
//! records become duplicates, not second emails.
//!
//! Refused access — the broker rejects the credentials, or an ACL is
//! missing for the topic, the group or the dead-letter topic — is definite
//! (see `access`): the loop stops and the notifier exits with it.
//!
//! Event loop priorities (`select!` is biased): shutdown first, refused
//! access, then the main queue; in a worker: shutdown, handled records,
//! then new records. Shutdown interrupts a handler only while it waits
//! between retries or for a pooled handler, never in the middle of a send;
//! a worker takes and starts nothing more, waits for its tasks and stores
//! the prefix they complete; the workers are joined, stored offsets
//! committed, and the consumer leaves the group.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedMessage;
use rdkafka::{ClientContext, Message, Offset};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::access::{AccessDenied, KafkaAccess};
use crate::config::Config;
use crate::dlq::{DeadLetterQueue, DlqError};
use crate::email::Composer;
use crate::handler::{error_chain, Backoff, Handler, HandlerPool, Interrupted};
use crate::http::Shared;
use crate::inbox::{Claims, Inbox, InboxError};
use crate::mailer::{read_certificates, Mailer, MailerSetupError};
use crate::metrics::Outcome;
use crate::smtp::PoolOptions;
use crate::window::{Key, Window};

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
    /// `--inbox-retention` shorter than the topic keeps its records.
    #[error(transparent)]
    InboxRetention(crate::retention::RetentionError),
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

/// The partitions this instance owns (updated by the rebalance callback),
/// each with the epoch of its assignment: a partition revoked and assigned
/// again has a new one, and its fetch starts again from the committed
/// offset.
#[derive(Default)]
struct Assignment {
    owned: Mutex<Owned>,
}

#[derive(Default)]
struct Owned {
    epochs: HashMap<i32, u64>,
    assignments: u64,
}

impl Assignment {
    fn assign(&self, partition: i32) {
        let mut owned = self.lock();
        owned.assignments += 1;
        let epoch = owned.assignments;
        owned.epochs.insert(partition, epoch);
    }

    fn revoke(&self, partition: i32) {
        self.lock().epochs.remove(&partition);
    }

    /// The epoch of `partition`'s assignment, if this instance owns it.
    fn epoch(&self, partition: i32) -> Option<u64> {
        self.lock().epochs.get(&partition).copied()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Owned> {
        // A panic while holding this lock cannot leave the map half-updated.
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

/// Records a partition's window holds (in flight, waiting behind their
/// key, handled behind an unhandled one) per record it may have in flight:
/// how far records of other keys may go on past one being retried.
const PENDING_PER_IN_FLIGHT: usize = 8;

/// A partition's empty window for `max_in_flight` records in flight.
fn new_window(max_in_flight: usize) -> Window<OwnedMessage> {
    Window::new(max_in_flight * PENDING_PER_IN_FLIGHT)
}

/// What every worker's handler is made of.
struct Parts {
    composer: Composer,
    mailer: Mailer,
    dlq: DeadLetterQueue,
    /// The inbox batcher every handler claims through.
    claims: Claims,
    shared: Arc<Shared>,
    backoff: Backoff,
}

impl Parts {
    fn handler(&self) -> Handler {
        Handler {
            composer: self.composer.clone(),
            mailer: self.mailer.clone(),
            inbox: self.claims.clone(),
            dlq: self.dlq.clone(),
            shared: self.shared.clone(),
            backoff: self.backoff,
        }
    }

    /// `size` handlers.
    fn pool(&self, size: usize) -> Arc<HandlerPool> {
        HandlerPool::new((0..size.max(1)).map(|_| self.handler()).collect())
    }
}

type PartitionQueue = StreamPartitionQueue<NotifierContext>;

/// The workers, one per partition of the topic, each reading its
/// partition's queue.
struct Workers {
    topic: String,
    consumer: Arc<NotifierConsumer>,
    handlers: Arc<HandlerPool>,
    max_in_flight: usize,
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
        let worker = Worker {
            topic: self.topic.clone(),
            partition,
            consumer: self.consumer.clone(),
            assignment: self.assignment.clone(),
            handlers: self.handlers.clone(),
            stop: self.stop.clone(),
            max_in_flight: self.max_in_flight,
            window: new_window(self.max_in_flight),
            generation: 0,
            epoch: None,
            tasks: JoinSet::new(),
        };
        let task = tokio::spawn(work(worker, queue));
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
    let extra_roots = match &cfg.smtp_ca_file {
        Some(path) => vec![read_certificates(path)?],
        None => Vec::new(),
    };
    let smtp = PoolOptions {
        timeout: cfg.smtp_timeout,
        max_idle: usize::from(cfg.smtp_connections),
        pipelining: cfg.smtp_pipelining,
        extra_roots,
    };
    let mailer = Mailer::from_config(cfg.smtp_url.as_deref(), cfg.mail_dir.as_deref(), smtp)?;
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
    if !cfg.inbox_retention.is_zero() {
        match crate::retention::check(&base, &cfg.topic, cfg.inbox_retention).await {
            Ok(()) => {}
            // Read again before every round: deletes wait until it is known.
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, "inbox retention waits until the topic's retention.ms and segment.ms can be read")
            }
            Err(e) => return Err(NotifierError::InboxRetention(e)),
        }
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
        max_in_flight_per_partition = cfg.max_in_flight_per_partition,
        smtp_connections = cfg.smtp_connections,
        handlers = cfg.handlers(),
        inbox_db_connections = cfg.inbox_db_connections,
        "notifier starting"
    );
    let parts = Parts {
        composer,
        mailer,
        dlq,
        claims: Claims::start(&inbox, usize::from(cfg.inbox_db_connections)),
        shared: shared.clone(),
        backoff,
    };
    // Stops the workers on shutdown and on any other way out of the loop.
    let stop = shutdown.child_token();
    if !cfg.inbox_retention.is_zero() {
        tokio::spawn(crate::retention::run(
            inbox.unconnected(),
            base.clone(),
            cfg.topic.clone(),
            cfg.inbox_retention,
            cfg.inbox_retention_interval,
            shared.clone(),
            stop.clone(),
        ));
    }
    let mut workers = Workers {
        topic: cfg.topic.clone(),
        consumer: consumer.clone(),
        handlers: parts.pool(cfg.handlers()),
        max_in_flight: usize::from(cfg.max_in_flight_per_partition),
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

/// One partition's worker: takes the records of its partition queue into
/// its window, runs a task per record the window lets start, stores the
/// handled prefix; skips records of a partition this instance no longer
/// owns.
struct Worker {
    topic: String,
    partition: i32,
    consumer: Arc<NotifierConsumer>,
    assignment: Arc<Assignment>,
    handlers: Arc<HandlerPool>,
    stop: CancellationToken,
    max_in_flight: usize,
    window: Window<OwnedMessage>,
    /// Counts the windows dropped: a task started for an earlier window
    /// reports to none.
    generation: u64,
    /// The assignment epoch the window's records were taken under.
    epoch: Option<u64>,
    /// Handler tasks, of this window and of dropped ones.
    tasks: JoinSet<Done>,
}

/// A handler task's report.
struct Done {
    generation: u64,
    offset: i64,
    key: Key,
    result: Result<Outcome, Interrupted>,
}

/// What a worker's loop woke up for.
enum Wake {
    Stop,
    Done(Result<Done, tokio::task::JoinError>),
    Received(Result<OwnedMessage, KafkaError>),
}

async fn work(mut w: Worker, queue: PartitionQueue) {
    let mut stopping = false;
    loop {
        if stopping && w.tasks.is_empty() {
            break;
        }
        let take = !stopping && w.tasks.len() < w.max_in_flight && w.window.has_room();
        let wake = tokio::select! {
            biased;
            _ = w.stop.cancelled(), if !stopping => Wake::Stop,
            Some(done) = w.tasks.join_next(), if !w.tasks.is_empty() => Wake::Done(done),
            r = queue.recv(), if take => Wake::Received(r.map(|m| m.detach())),
            // Not reached: with no task running the window holds nothing
            // (every waiting record waits for a running one), so it has room.
            else => break,
        };
        match wake {
            Wake::Stop => stopping = true,
            Wake::Done(Ok(done)) => w.finished(done, stopping),
            Wake::Done(Err(e)) => {
                // Its record can never count as handled: stop here, its
                // offset and all after it stay unstored (a restart
                // redelivers them).
                tracing::error!(partition = w.partition, error = %e, "handler task failed; the partition's worker stops");
                w.tasks.abort_all();
                break;
            }
            Wake::Received(Ok(msg)) => w.received(msg),
            Wake::Received(Err(e)) => {
                tracing::warn!(partition = w.partition, error = %e, "kafka consumer error")
            }
        }
    }
}

impl Worker {
    fn received(&mut self, msg: OwnedMessage) {
        let offset = msg.offset();
        let Some(epoch) = self.assignment.epoch(self.partition) else {
            self.drop_window(None);
            tracing::debug!(
                partition = self.partition,
                offset,
                "partition revoked since this record was fetched; left to its next owner"
            );
            return;
        };
        if self.epoch != Some(epoch) || !self.window.follows(offset) {
            self.drop_window(Some(epoch));
        }
        tracing::trace!(partition = self.partition, offset, "record received");
        let key = msg.key().map(<[u8]>::to_vec);
        if let Some(msg) = self.window.take(offset, key.clone(), msg) {
            self.start(msg, key);
        }
    }

    fn finished(&mut self, done: Done, stopping: bool) {
        if done.generation != self.generation {
            return; // Its window was dropped: redelivered, or not ours.
        }
        if done.result.is_err() {
            return; // Interrupted by shutdown: not handled, stays unstored.
        }
        let epoch = self.assignment.epoch(self.partition);
        if epoch != self.epoch {
            // Revoked (or assigned anew) meanwhile: its next owner (or the
            // new fetch) gets this partition's records again from the
            // committed offset, and the inbox knows the handled ones.
            self.drop_window(epoch);
            return;
        }
        let handled = self.window.handled(done.offset, &done.key);
        if let Some(last) = handled.store {
            // Stores last + 1: the next record to read.
            if let Err(e) = self
                .consumer
                .store_offset(&self.topic, self.partition, last)
            {
                // Expected for records in flight during a rebalance.
                tracing::info!(
                    error = %e,
                    partition = self.partition,
                    offset = last,
                    "offset not stored (partition no longer assigned); its next owner gets the record again and the inbox skips it"
                );
            }
        }
        if let Some(next) = handled.next {
            if !stopping {
                self.start(next, done.key);
            }
        }
    }

    /// Forgets the window's records (taken under an earlier assignment, or
    /// before the fetch started again): they are fetched again or belong to
    /// the next owner. Its running tasks finish unheard.
    fn drop_window(&mut self, epoch: Option<u64>) {
        if !self.window.is_empty() {
            tracing::info!(
                partition = self.partition,
                "partition revoked, assigned anew or fetched again from an earlier offset; dropping the records not yet handled (they are delivered again)"
            );
            self.window = new_window(self.max_in_flight);
            self.generation += 1;
        }
        self.epoch = epoch;
    }

    /// Runs a task handling `msg` with a pooled handler.
    fn start(&mut self, msg: OwnedMessage, key: Key) {
        let (handlers, stop, generation) =
            (self.handlers.clone(), self.stop.clone(), self.generation);
        self.tasks.spawn(async move {
            let result = async {
                let mut handler = tokio::select! {
                    biased;
                    _ = stop.cancelled() => return Err(Interrupted),
                    h = handlers.get() => h,
                };
                handler.handle(&msg, &stop).await
            }
            .await;
            Done {
                generation,
                offset: msg.offset(),
                key,
                result,
            }
        });
    }
}
