//! Handler: turns one record into its effect — one email, a skip, or a dead
//! letter — and retries transient failures until it succeeds or shutdown.
//!
//! ```text
//!  record ──decode──▶ Notify ──compose──▶ inbox claim ──dup──▶ (nothing)            ─┐
//!     │                  │                    └─claimed─▶ send ──ok──▶ inbox commit  ├─▶ handled:
//!     │                  │                                   ├─5xx──▶ dead letter    │   the caller
//!     │                  └─ bad address ──▶ dead letter      └─4xx/conn─▶ retry      │   stores the
//!     ├──▶ Skip (unknown event type, status without email) ──────────────────────────┤   offset
//!     └──▶ Malformed (JSON, missing fields) ──▶ dead letter ─────────────────────────┘
//! ```
//!
//! # Ordering
//!
//! [`Handler::handle`] returns only when the record is handled (or on
//! shutdown). A transient failure — SMTP 4xx, connection refused or lost,
//! timeout, inbox database or DLQ producer unavailable — is retried with
//! bounded exponential backoff (with jitter) on the *same* record. The
//! partition's worker (see `pipeline` and `window`) starts a record only
//! once every earlier record of its key was handled, and stores offsets only
//! up to the first record not handled: no later event of the key overtakes
//! the one being retried, and no offset at or past it is stored, while
//! records of other keys go on (up to the window's bound).
//!
//! Handlers come from a [`HandlerPool`] shared by every partition; the
//! pool's size (`--handlers`) bounds the records being handled at once. By
//! SMTP a handler takes one of the `--smtp-connections` for its send alone
//! and gives it back before waiting for its batch's commit, so there are
//! more handlers than connections (four to one by default) and the
//! connections do not idle through those waits. Their inbox claims go
//! through one batcher ([`Claims`]): the claims made at about the same time
//! share one transaction, inserted with one statement before the sends and
//! committed with one more after the last of them (see `inbox`).
//!
//! # Crash windows
//!
//! The inbox row is inserted in the transaction that decides whether to
//! send — its batch's — and committed after the mail server took the email
//! (and every other email of the batch was sent or given up). The handler
//! returns, and the offset is stored, only after that commit; the offset is
//! committed to Kafka later.
//!
//! 1. Crash after the email was sent, before its batch's commit: the row is
//!    rolled back, the offset was not stored, the record is redelivered and
//!    the email is sent **again** — at most one email per handler: a
//!    handler whose email went out holds on until its batch commits, so
//!    the emails sent and not recorded are at most the handlers. This is
//!    the one window that duplicates;
//!    no ordering of "send" and "record" closes it without risking a lost
//!    email instead. The resend carries the same `Message-ID`
//!    (`<order-event-{event_id}@notifier.outbox-relay>`), so the receiving
//!    side can drop it as a duplicate. (A commit that reached Postgres but
//!    whose reply was lost is retried too, and then finds the row: no resend.)
//! 2. Crash after the inbox commit, before the offset is committed to Kafka:
//!    the record is redelivered, the inbox claim finds the row and nothing is
//!    sent (counted as a duplicate).
//! 3. A rebalance (or a crash) while a send is in progress: the partition's
//!    next owner gets the record again, but the open claim locks the event
//!    id, so it waits for the outcome and either skips (committed) or sends
//!    (rolled back — the first instance crashed or failed; or its row
//!    deleted before the commit — the send failed).
//! 4. A send that fails (4xx, 5xx, connection): the handler releases its
//!    claim; the batch deletes that row before it commits, so the event
//!    counts as not sent — retried, or dead-lettered and replayable — while
//!    the batch's other rows are recorded.
//!
//! # Tracing
//!
//! Each record is handled in a `record` span that continues the W3C trace of
//! its `traceparent` header (copied by the relay from the outbox row): its
//! log lines carry the trace id, it is exported as a child of the request's
//! span when OTLP export is on, and the email's `Traceparent` header names it.
//!
//! Dead letters are not recorded in the inbox: a crash after the dead letter
//! was acknowledged and before the offset commit produces it a second time
//! (same `dlq_original_*` headers), so dead letters are at least once.

use std::sync::{Arc, Mutex};

use outbox_record::header;
use outbox_record::trace::{TraceParent, TRACEPARENT};
use rdkafka::message::{Headers, OwnedMessage};
use rdkafka::Message;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::dlq::{DeadLetterQueue, DlqError};
use crate::email::{message_id, Composer};
use crate::event::{self, Decoded, MalformedEvent};
use crate::http::Shared;
use crate::inbox::{Claim, Claims, InboxEntry, InboxError};
use crate::mailer::{MailError, MailSink, Mailer};
use crate::metrics::Outcome;

pub use lifecycle::Backoff;

/// A failure worth retrying on the same record.
#[derive(Debug, thiserror::Error)]
pub enum TransientError {
    #[error("inbox")]
    Inbox(#[from] InboxError),
    #[error("mail")]
    Mail(#[from] MailError),
    #[error("dead-letter queue")]
    Dlq(#[from] DlqError),
}

/// Shutdown was requested before the record was handled; its offset must
/// not be stored.
#[derive(Debug)]
pub struct Interrupted;

/// Everything needed to handle records, one at a time (the inbox claims of
/// all handlers go through one batcher, see `inbox`).
pub struct Handler {
    pub composer: Composer,
    pub mailer: Mailer,
    pub inbox: Claims,
    pub dlq: DeadLetterQueue,
    pub shared: Arc<Shared>,
    pub backoff: Backoff,
}

pub use lifecycle::error_chain;

fn first_header<'m>(msg: &'m OwnedMessage, name: &str) -> Option<&'m [u8]> {
    let headers = msg.headers()?;
    header::find(headers.iter().map(|h| (h.key, h.value)), name)
}

impl Handler {
    /// Handles `msg`, retrying transient failures until it is handled or
    /// `shutdown` is cancelled, in a span continuing the record's trace.
    pub async fn handle(
        &mut self,
        msg: &OwnedMessage,
        shutdown: &CancellationToken,
    ) -> Result<Outcome, Interrupted> {
        let incoming = first_header(msg, TRACEPARENT)
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| TraceParent::parse(v).ok());
        let span = tracing::info_span!(
            "record",
            topic = msg.topic(),
            partition = msg.partition(),
            offset = msg.offset(),
            trace_id = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        let trace = lifecycle::telemetry::continue_trace(&span, incoming.as_ref());
        let outcome = self
            .handle_traced(msg, shutdown, &trace)
            .instrument(span.clone())
            .await;
        if let Ok(outcome) = outcome {
            span.record("outcome", tracing::field::debug(outcome));
        }
        outcome
    }

    async fn handle_traced(
        &mut self,
        msg: &OwnedMessage,
        shutdown: &CancellationToken,
        trace: &TraceParent,
    ) -> Result<Outcome, Interrupted> {
        let decoded = event::decode(msg.payload(), |name| first_header(msg, name));
        let event_type = match &decoded {
            Ok(Decoded::Notify(ev)) => Some(ev.event_type.clone()),
            Ok(Decoded::Skip { event_type, .. }) => Some(event_type.clone()),
            Err(_) => first_header(msg, header::EVENT_TYPE)
                .and_then(|v| std::str::from_utf8(v).ok())
                .map(str::to_owned),
        };
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match self.attempt(msg, &decoded, trace).await {
                Ok(outcome) => {
                    self.shared.metrics.record(event_type.as_deref(), outcome);
                    if outcome != Outcome::duplicate {
                        if let Some(ts) = event::commit_ts(first_header(msg, header::COMMIT_TS)) {
                            let age = chrono::Utc::now() - ts;
                            self.shared
                                .metrics
                                .end_to_end_seconds
                                .observe(age.to_std().map_or(0.0, |d| d.as_secs_f64()));
                        }
                    }
                    return Ok(outcome);
                }
                Err(e) => {
                    let wait = self.backoff.jittered(attempt);
                    tracing::warn!(
                        topic = msg.topic(),
                        partition = msg.partition(),
                        offset = msg.offset(),
                        attempt,
                        retry_in_ms = wait.as_millis() as u64,
                        error = %error_chain(&e),
                        "transient failure; holding the later records of its key and the partition's stored offset, retrying"
                    );
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => return Err(Interrupted),
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
    }

    /// One attempt at handling `msg`.
    async fn attempt(
        &mut self,
        msg: &OwnedMessage,
        decoded: &Result<Decoded, MalformedEvent>,
        trace: &TraceParent,
    ) -> Result<Outcome, TransientError> {
        let event = match decoded {
            Err(malformed) => {
                dead_letter(&self.dlq, msg, malformed.class(), &error_chain(malformed)).await?;
                return Ok(Outcome::dlq);
            }
            Ok(Decoded::Skip { event_type, reason }) => {
                tracing::debug!(
                    topic = msg.topic(),
                    partition = msg.partition(),
                    offset = msg.offset(),
                    event_type = %event_type,
                    reason = %reason,
                    "skipping record"
                );
                return Ok(Outcome::skipped);
            }
            Ok(Decoded::Notify(event)) => event,
        };
        let message = match self.composer.compose(event, Some(trace)) {
            Ok(m) => m,
            Err(e) => {
                dead_letter(&self.dlq, msg, "invalid_payload", &error_chain(&e)).await?;
                return Ok(Outcome::dlq);
            }
        };
        let message_id = message_id(event.event_id);
        let entry = InboxEntry {
            event_id: event.event_id,
            event_type: event.event_type.clone(),
            message_id,
            topic: msg.topic().to_owned(),
            partition: msg.partition(),
            offset: msg.offset(),
        };
        let key = format!("order-event-{}", event.event_id);
        let claim = match self.inbox.claim(entry).await? {
            Claim::Duplicate => {
                tracing::debug!(event_id = event.event_id, "already sent; skipping");
                return Ok(Outcome::duplicate);
            }
            Claim::Claimed(claim) => claim,
        };
        let started = std::time::Instant::now();
        match self.mailer.send(&key, &message).await {
            Ok(()) => {
                let send_ms = started.elapsed().as_secs_f64() * 1e3;
                claim.commit().await?;
                tracing::info!(
                    event_id = event.event_id,
                    event_type = %event.event_type,
                    order_id = event.order.order_id,
                    send_ms,
                    "email sent"
                );
                Ok(Outcome::sent)
            }
            Err(e) if e.is_permanent() => {
                // Not recorded as sent: release the claim, so a fixed record
                // replayed from the DLQ is sent.
                let reason = error_chain(&e);
                claim.release();
                tracing::warn!(event_id = event.event_id, error = %reason, "email rejected permanently");
                dead_letter(&self.dlq, msg, "smtp_rejected", &reason).await?;
                Ok(Outcome::dlq)
            }
            Err(e) => {
                claim.release();
                Err(e.into())
            }
        }
    }
}

/// A fixed set of handlers shared by the partition workers: a record in
/// flight holds one (until its inbox batch committed), so the pool's size
/// bounds the records handled at once and the emails sent but not yet
/// recorded. Waiting for a handler is the backpressure of a slow mail
/// server or database.
pub struct HandlerPool {
    idle: Mutex<Vec<Handler>>,
    available: Arc<Semaphore>,
}

/// A handler taken from a [`HandlerPool`]; goes back when dropped.
pub struct PooledHandler {
    handler: Option<Handler>,
    pool: Arc<HandlerPool>,
    _permit: OwnedSemaphorePermit,
}

impl HandlerPool {
    pub fn new(handlers: Vec<Handler>) -> Arc<HandlerPool> {
        Arc::new(HandlerPool {
            available: Arc::new(Semaphore::new(handlers.len())),
            idle: Mutex::new(handlers),
        })
    }

    /// Waits for a free handler.
    pub async fn get(self: &Arc<Self>) -> PooledHandler {
        let permit = self
            .available
            .clone()
            .acquire_owned()
            .await
            // The semaphore is never closed.
            .expect("handler pool semaphore closed");
        let handler = self.lock().pop();
        PooledHandler {
            // A permit is only held with a handler taken, so one is idle.
            handler: Some(handler.expect("a permit without an idle handler")),
            pool: self.clone(),
            _permit: permit,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Handler>> {
        // A push or pop cannot leave the vector half-updated.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl std::ops::Deref for PooledHandler {
    type Target = Handler;
    fn deref(&self) -> &Handler {
        // Some until dropped.
        self.handler.as_ref().expect("pooled handler")
    }
}

impl std::ops::DerefMut for PooledHandler {
    fn deref_mut(&mut self) -> &mut Handler {
        self.handler.as_mut().expect("pooled handler")
    }
}

impl Drop for PooledHandler {
    fn drop(&mut self) {
        // Back before the permit is released (fields drop after this).
        if let Some(h) = self.handler.take() {
            self.pool.lock().push(h);
        }
    }
}

/// Produces `msg` to the dead-letter topic and logs it.
async fn dead_letter(
    dlq: &DeadLetterQueue,
    msg: &OwnedMessage,
    class: &str,
    reason: &str,
) -> Result<(), DlqError> {
    dlq.send(msg, class, reason).await?;
    tracing::warn!(
        topic = msg.topic(),
        partition = msg.partition(),
        offset = msg.offset(),
        dlq_topic = dlq.topic(),
        class,
        reason,
        "record sent to the dead-letter topic"
    );
    Ok(())
}
