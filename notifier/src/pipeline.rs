//! Pipeline: the consumer loop. Owns the Kafka consumer, hands each record
//! to its partition's worker, and each worker stores a record's offset once
//! the record was handled; serves `/metrics` and `/healthz` alongside.
//!
//! ```text
//!                      ┌─▶ worker p0: handle ─▶ handle ─▶ … ─┐ store_offset(p, o+1)
//!  Kafka ──recv──▶ loop ┼─▶ worker p1: handle ─▶ …           ├───────────────┐
//!  (group notifier)     └─▶ worker p2: …                    ─┘               ▼
//!        ▲                                              commit stored offsets: every
//!        └───────────────────────────────────────────── --commit-interval, on revoke,
//!                                                       on shutdown
//! ```
//!
//! Offsets: `enable.auto.offset.store=false`, so librdkafka commits only
//! what the workers stored. A worker handles its partition's records one at
//! a time, in offset order, and stores each offset only after the handler
//! returned — so per partition, the stored offset never passes an unhandled
//! record, and a record retried after a transient failure holds back every
//! later record of its partition. Partitions proceed independently (one
//! slow SMTP conversation does not serialize the others); queues are bounded,
//! so a stuck partition eventually stops the loop taking records.
//!
//! Rebalances: librdkafka runs the rebalance callback inside `recv`. On
//! revocation the callback first retires the revoked partitions' current
//! assignment (their workers drop records still queued for it: the next
//! owner reads them again from the committed offset), then commits the
//! stored offsets synchronously, so the next owner starts right after the
//! last handled record. A record in flight at that moment finishes; its
//! offset is not committed, so the next owner gets it again and the inbox
//! turns it into a duplicate (its row lock makes the next owner wait for
//! the in-flight send to end). Likewise after a crash, or after a worker
//! stuck in retries past `max.poll.interval.ms` made librdkafka leave the
//! group: redelivered records become duplicates, not second emails.
//!
//! Event loop priorities (`select!` is biased): shutdown first, then the
//! next record. Shutdown interrupts a handler only while it waits between
//! retries, never in the middle of a send; the workers are joined, stored
//! offsets committed, and the consumer leaves the group.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedMessage;
use rdkafka::{ClientContext, Message, TopicPartitionList};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

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
    #[error("dead-letter producer")]
    Dlq(#[from] DlqError),
    #[error("inbox")]
    Inbox(#[source] InboxError),
    #[error("the worker of partition {partition} ended unexpectedly")]
    Worker { partition: i32 },
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
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| NotifierError::Listen {
            addr: cfg.listen,
            source,
        })?;
    shared.set_http_addr(listener.local_addr().ok());
    let http_stop = shutdown.child_token();
    let http = tokio::spawn({
        let app = crate::http::router(shared.clone());
        let stop = http_stop.clone();
        async move {
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
            {
                tracing::error!(error = %e, "http server failed");
            }
        }
    });

    let result = consume(&cfg, &shared, &shutdown).await;
    if let Err(e) = &result {
        tracing::error!(error = %error_chain(e), "notifier stopped");
        shared.set_failed();
    }
    http_stop.cancel();
    let _ = http.await;
    result
}

/// A partition with this many records queued for its worker is paused
/// (librdkafka stops fetching it) ...
const QUEUE_HIGH: usize = 64;
/// ... and resumed once its worker is down to this many.
const QUEUE_LOW: usize = 16;

/// The partitions this instance owns, each with the generation of its
/// current assignment; records of a retired generation are not handled.
#[derive(Default)]
struct Assignment {
    generations: Mutex<HashMap<i32, u64>>,
    next: AtomicU64,
}

impl Assignment {
    fn assign(&self, partition: i32) {
        let generation = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(partition, generation);
    }

    fn revoke(&self, partition: i32) {
        self.lock().remove(&partition);
    }

    fn current(&self, partition: i32) -> Option<u64> {
        self.lock().get(&partition).copied()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i32, u64>> {
        // A panic while holding this lock cannot leave the map half-updated.
        self.generations.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Logs client errors, tracks the assignment and commits stored offsets
/// when partitions are revoked.
struct NotifierContext {
    assignment: Arc<Assignment>,
}

impl ClientContext for NotifierContext {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(error = %error, reason, "kafka client error");
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
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.kafka_bootstrap_servers)
        .set("client.id", "notifier");
    for (k, v) in &cfg.kafka_properties {
        c.set(k, v);
    }
    c
}

fn consumer_config(cfg: &Config) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.kafka_bootstrap_servers)
        .set("client.id", "notifier")
        .set("group.id", &cfg.group)
        .set("enable.auto.commit", "true")
        .set(
            "auto.commit.interval.ms",
            cfg.commit_interval.as_millis().max(1).to_string(),
        )
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set(
            "fetch.wait.max.ms",
            cfg.fetch_max_wait.as_millis().clamp(0, 300_000).to_string(),
        );
    // Extra properties last, so an operator can override the above.
    for (k, v) in &cfg.kafka_properties {
        c.set(k, v);
    }
    c
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

/// A record for a worker, tagged with the assignment it was read under.
struct Work {
    msg: OwnedMessage,
    generation: u64,
}

struct Worker {
    tx: mpsc::UnboundedSender<Work>,
    queue: Arc<QueueState>,
    task: JoinHandle<()>,
}

/// Flow control of one partition's queue: the loop never waits for a
/// worker (records of one partition arrive in long runs; waiting on a full
/// queue would serialize the partitions); it pauses the partition instead,
/// and the worker resumes it.
struct QueueState {
    topic: String,
    partition: i32,
    queued: AtomicUsize,
    paused: AtomicBool,
}

impl QueueState {
    fn tpl(&self) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.topic, self.partition);
        tpl
    }

    /// A record was queued (called by the loop).
    fn pushed(&self, consumer: &NotifierConsumer) {
        let queued = self.queued.fetch_add(1, Ordering::AcqRel) + 1;
        if queued >= QUEUE_HIGH && !self.paused.swap(true, Ordering::AcqRel) {
            tracing::debug!(partition = self.partition, queued, "pausing partition");
            if let Err(e) = consumer.pause(&self.tpl()) {
                tracing::debug!(partition = self.partition, error = %e, "pausing partition failed");
            }
        }
    }

    /// A record was taken (called by the worker). While paused, the queue
    /// holds more than `QUEUE_LOW` records, so the worker gets here again
    /// before it runs dry.
    fn taken(&self, consumer: &NotifierConsumer) {
        let queued = self.queued.fetch_sub(1, Ordering::AcqRel) - 1;
        if queued <= QUEUE_LOW && self.paused.swap(false, Ordering::AcqRel) {
            tracing::debug!(partition = self.partition, queued, "resuming partition");
            if let Err(e) = consumer.resume(&self.tpl()) {
                tracing::debug!(partition = self.partition, error = %e, "resuming partition failed");
            }
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

    let base = base_client_config(cfg);
    let dlq = DeadLetterQueue::new(&base, &cfg.dlq_topic())?;
    dlq.ensure_topic(&base).await;

    let assignment = Arc::new(Assignment::default());
    let consumer: Arc<NotifierConsumer> = Arc::new(
        consumer_config(cfg)
            .create_with_context(NotifierContext {
                assignment: assignment.clone(),
            })
            .map_err(NotifierError::Kafka)?,
    );
    consumer
        .subscribe(&[&cfg.topic])
        .map_err(NotifierError::Kafka)?;
    tracing::info!(
        topic = %cfg.topic,
        group = %cfg.group,
        dlq_topic = %dlq.topic(),
        mailer = %mailer.describe(),
        "notifier consuming"
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
    let mut workers: HashMap<i32, Worker> = HashMap::new();
    let result = loop {
        let received = tokio::select! {
            biased;
            _ = stop.cancelled() => break Ok(()),
            r = consumer.recv() => r,
        };
        let msg = match received {
            Ok(m) => {
                tracing::trace!(
                    partition = m.partition(),
                    offset = m.offset(),
                    "record received"
                );
                m.detach()
            }
            Err(e) => {
                tracing::warn!(error = %e, "kafka consumer error");
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => break Ok(()),
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                continue;
            }
        };
        let partition = msg.partition();
        let Some(generation) = assignment.current(partition) else {
            tracing::debug!(partition, "record of a partition not assigned; dropped");
            continue;
        };
        let worker = workers.entry(partition).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let queue = Arc::new(QueueState {
                topic: msg.topic().to_owned(),
                partition,
                queued: AtomicUsize::new(0),
                paused: AtomicBool::new(false),
            });
            let task = tokio::spawn(work(
                rx,
                queue.clone(),
                parts.handler(),
                consumer.clone(),
                assignment.clone(),
                stop.clone(),
            ));
            Worker { tx, queue, task }
        });
        // Counted before it is sent: the worker may take it (and count it
        // out) before send returns.
        worker.queue.pushed(&consumer);
        if worker.tx.send(Work { msg, generation }).is_err() {
            break Err(NotifierError::Worker { partition });
        }
    };

    stop.cancel();
    for (partition, worker) in workers {
        drop(worker.tx);
        if let Err(e) = worker.task.await {
            tracing::error!(partition, error = %e, "partition worker failed");
        }
    }
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

/// One partition's worker: handles its records in order, storing each
/// offset once handled; drops records of a retired assignment.
async fn work(
    mut rx: mpsc::UnboundedReceiver<Work>,
    queue: Arc<QueueState>,
    mut handler: Handler,
    consumer: Arc<NotifierConsumer>,
    assignment: Arc<Assignment>,
    stop: CancellationToken,
) {
    loop {
        let work = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            w = rx.recv() => match w {
                Some(w) => w,
                None => break,
            },
        };
        queue.taken(&consumer);
        let partition = queue.partition;
        if assignment.current(partition) != Some(work.generation) {
            tracing::debug!(
                partition,
                offset = work.msg.offset(),
                "partition revoked since this record was read; left to its next owner"
            );
            continue;
        }
        let msg = work.msg;
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
