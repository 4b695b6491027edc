//! Inbox: the `notifier_inbox` table of events whose email was sent, so a
//! redelivered record sends nothing.
//!
//! The decision to send and the record of having sent are one row, inserted
//! in a transaction that stays open while the email goes out. The records
//! handled at once share such transactions: every claim waiting when an
//! inbox connection is free joins one batch, claimed with one statement and
//! committed with one more, so a burst costs three Postgres round trips per
//! batch instead of three per email:
//!
//! ```text
//!  handlers ─claim(entry)─▶ queue ─▶ batcher: the claims waiting, ≤ 1 per event id ─▶ a free connection
//!
//!  BEGIN
//!  INSERT INTO notifier_inbox SELECT unnest($1..$6) ORDER BY event_id ON CONFLICT DO NOTHING RETURNING event_id
//!     ├─ id not returned: already sent ─────────────────────▶ Duplicate (nothing to send)
//!     └─ id returned: claimed ─▶ its handler sends ─ok──▶ report sent  ─┐ every member
//!                                               └err─▶ report unsent ─┤ reported
//!  DELETE FROM notifier_inbox WHERE event_id IN (the unsent); COMMIT ◀─┘
//!     └─▶ each sent member's commit() returns: recorded (or the error: not recorded, retried)
//! ```
//!
//! # Exactly one email per event
//!
//! - **Nothing is recorded unsent.** A row is inserted before its email is
//!   sent, but only committed by the batch's COMMIT, which runs after every
//!   member has reported; the rows of members not sent (refused, failed,
//!   their task gone: a dropped claim reports "unsent") are deleted in the
//!   same transaction first. So a committed row means its email was taken
//!   by the mail server (or its file is durable in the spool). A crash, a
//!   lost connection or a failed statement before the COMMIT rolls back
//!   every row of the batch: nothing recorded, everything redelivered.
//! - **Nothing recorded is sent again.** A handler reports its record
//!   handled (and the worker stores its offset) only after its batch's
//!   COMMIT succeeded. A redelivered record finds the committed row and is
//!   a duplicate.
//! - **The window that duplicates** is the one it always was: an email sent,
//!   its batch not yet committed, and the process dies. Every member holds
//!   its handler until its batch commits, so the emails at risk are at most
//!   the handlers (`--handlers`), as before batching; they are
//!   resent with the same `Message-ID`.
//! - **Two live instances never both send.** While a batch is open its
//!   uncommitted rows lock their event ids: another instance's (or a later
//!   batch's) INSERT of the same id blocks until the batch commits (then it
//!   sees the row: duplicate) or deletes the row and commits (then it claims
//!   it and sends). Each INSERT takes its rows in event id order and a batch
//!   waits for nothing in Postgres once inserted, so batches cannot deadlock
//!   on each other (were the order not kept, Postgres would abort one batch:
//!   a transient error, retried).
//! - **One member per event id in a batch**: a second claim of an id already
//!   in the forming batch waits for the next one (it would find the row of
//!   the first, and count as sent before the first was).
//!
//! A batch commits when its slowest member is done, so a slow send holds
//! back the commit (and the next records of the keys) of the others in its
//! batch; the batches in flight are bounded by `--inbox-db-connections`,
//! each batch by the handlers.
//!
//! Only sent emails are recorded: a record that went to the dead-letter
//! topic is not, so an operator can fix it and replay it into the topic.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use pgconn::{ConnectError, ConnectParams};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_postgres::{Client, Statement};

/// What identifies a handled event in the inbox.
#[derive(Clone, Debug)]
pub struct InboxEntry {
    pub event_id: i64,
    pub event_type: String,
    pub message_id: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// Errors talking to the inbox database.
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    #[error("invalid database URL")]
    Config(#[source] ConnectError),
    #[error("connecting to the inbox database")]
    Connect(#[source] ConnectError),
    #[error("inbox query failed")]
    Query(#[source] tokio_postgres::Error),
    #[error("table notifier_inbox is missing: apply migrations/V4__notifier_inbox.sql")]
    MissingTable,
    /// The batch this claim belonged to failed (each member gets the cause).
    #[error("inbox batch failed")]
    Batch(#[source] Arc<InboxError>),
    /// The batcher stopped before answering (shutting down).
    #[error("the inbox batcher is gone")]
    Stopped,
}

impl InboxError {
    /// A missing table or a bad URL is definite; connection and query
    /// errors are worth retrying.
    pub fn is_transient(&self) -> bool {
        match self {
            InboxError::MissingTable | InboxError::Config(_) => false,
            InboxError::Batch(e) => e.is_transient(),
            _ => true,
        }
    }
}

struct Connected {
    client: Client,
    claim: Statement,
}

/// A lazily (re)connecting handle on the inbox table.
///
/// Connections are made with `pgconn`, like every binary's:
/// TLS per the URL's `sslmode` with libpq's meaning (`prefer`, `require`,
/// `verify-ca`, `verify-full`, `sslrootcert`), application name `notifier`.
pub struct Inbox {
    params: ConnectParams,
    conn: Option<Connected>,
}

impl Inbox {
    /// Parses the URL; no connection is made until first use.
    pub fn new(url: &str) -> Result<Inbox, InboxError> {
        let params = ConnectParams::from_url(url)
            .map_err(InboxError::Config)?
            .or_application_name("notifier");
        Ok(Inbox { params, conn: None })
    }

    async fn connection(&mut self) -> Result<&mut Connected, InboxError> {
        let conn = match self.conn.take() {
            Some(c) if !c.client.is_closed() => c,
            _ => connect(&self.params).await?,
        };
        Ok(self.conn.insert(conn))
    }

    /// Another handle with the same settings, not yet connected.
    pub fn unconnected(&self) -> Inbox {
        Inbox {
            params: self.params.clone(),
            conn: None,
        }
    }

    /// Connects and checks that the table exists.
    pub async fn check(&mut self) -> Result<(), InboxError> {
        self.connection().await.map(|_| ())
    }

    /// Opens a transaction and inserts a row for each of `entries` (event
    /// ids distinct) whose event has none; returns the ids inserted
    /// (claimed: locked until [`Inbox::finish_claims`]). On an error the
    /// connection is dropped, which rolls the transaction back.
    async fn begin_claims(&mut self, entries: &[&InboxEntry]) -> Result<HashSet<i64>, InboxError> {
        let result = async {
            let conn = self.connection().await?;
            conn.client
                .batch_execute("BEGIN")
                .await
                .map_err(InboxError::Query)?;
            let rows = conn
                .client
                .query(
                    &conn.claim,
                    &[
                        &entries.iter().map(|e| e.event_id).collect::<Vec<_>>(),
                        &entries
                            .iter()
                            .map(|e| e.event_type.as_str())
                            .collect::<Vec<_>>(),
                        &entries
                            .iter()
                            .map(|e| e.message_id.as_str())
                            .collect::<Vec<_>>(),
                        &entries.iter().map(|e| e.topic.as_str()).collect::<Vec<_>>(),
                        &entries.iter().map(|e| e.partition).collect::<Vec<_>>(),
                        &entries.iter().map(|e| e.offset).collect::<Vec<_>>(),
                    ],
                )
                .await
                .map_err(InboxError::Query)?;
            Ok(rows.iter().map(|r| r.get::<_, i64>(0)).collect())
        }
        .await;
        if result.is_err() {
            self.conn = None;
        }
        result
    }

    /// Deletes the rows of `unsent` (claimed by this transaction) and
    /// commits: the other claimed rows are recorded. On an error the
    /// connection is dropped, which rolls the transaction back.
    async fn finish_claims(&mut self, unsent: &[i64]) -> Result<(), InboxError> {
        let sql = finish_sql(unsent);
        let result = match self.conn.as_mut() {
            Some(conn) => conn
                .client
                .batch_execute(&sql)
                .await
                .map_err(InboxError::Query),
            None => Err(InboxError::Stopped),
        };
        if result.is_err() {
            self.conn = None;
        }
        result
    }
}

/// The statement ending a batch: delete the unsent members' rows (ids are
/// integers, formatted, not user text), then commit. Sent as one simple
/// query: if the DELETE fails, the COMMIT is not run.
fn finish_sql(unsent: &[i64]) -> String {
    if unsent.is_empty() {
        return "COMMIT".to_owned();
    }
    let ids: Vec<String> = unsent.iter().map(i64::to_string).collect();
    format!(
        "DELETE FROM notifier_inbox WHERE event_id IN ({}); COMMIT",
        ids.join(",")
    )
}

impl Inbox {
    /// Deletes up to `batch` rows handled more than `age` ago, taken from
    /// the lowest event ids (the primary key's order, so no scan of the
    /// table: ids grow with time, and a row handled late waits for the next
    /// rounds). Returns the rows deleted.
    pub async fn delete_handled_before(
        &mut self,
        age: std::time::Duration,
        batch: i64,
    ) -> Result<u64, InboxError> {
        let conn = self.connection().await?;
        conn.client
            .execute(
                "DELETE FROM notifier_inbox WHERE event_id IN ( \
                     SELECT event_id FROM ( \
                         SELECT event_id, handled_at FROM notifier_inbox \
                          ORDER BY event_id LIMIT $2) oldest \
                      WHERE handled_at < now() - make_interval(secs => $1))",
                &[&age.as_secs_f64(), &batch],
            )
            .await
            .map_err(InboxError::Query)
    }
}

fn classify(e: tokio_postgres::Error) -> InboxError {
    if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) {
        InboxError::MissingTable
    } else {
        InboxError::Query(e)
    }
}

async fn connect(params: &ConnectParams) -> Result<Connected, InboxError> {
    let client = pgconn::connect(params).await.map_err(InboxError::Connect)?;
    let claim = client
        .prepare(
            "INSERT INTO notifier_inbox \
             (event_id, event_type, message_id, topic, kafka_partition, kafka_offset) \
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], \
                                  $5::integer[], $6::bigint[]) \
             ORDER BY 1 \
             ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
        )
        .await
        .map_err(classify)?;
    Ok(Connected { client, claim })
}

/// Claims in one statement at most (the handlers bound them anyway).
const MAX_BATCH: usize = 1024;

/// The handlers' way to claim events: a handle on the batcher task, which
/// groups the claims waiting into batches (see the module header).
#[derive(Clone)]
pub struct Claims {
    requests: mpsc::UnboundedSender<Request>,
}

/// One claim waiting for its batch.
struct Request {
    entry: InboxEntry,
    reply: oneshot::Sender<Result<Claim, InboxError>>,
}

/// The result of [`Claims::claim`].
#[derive(Debug)]
pub enum Claim {
    /// The event's email was already sent.
    Duplicate,
    /// This caller owns the event until it commits or releases the claim.
    Claimed(InboxClaim),
}

/// A claimed event id: its row is inserted, uncommitted, in an open batch,
/// which commits once every member has reported. Dropping it reports the
/// email as not sent.
#[derive(Debug)]
pub struct InboxClaim {
    report: oneshot::Sender<bool>,
    committed: oneshot::Receiver<Result<(), Arc<InboxError>>>,
}

impl InboxClaim {
    /// The email was sent: records the event as handled, returning once
    /// its batch committed (an error: not recorded).
    pub async fn commit(self) -> Result<(), InboxError> {
        // The batch waits for this report; if it is gone, so is the answer.
        let _ = self.report.send(true);
        match self.committed.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(InboxError::Batch(e)),
            Err(_) => Err(InboxError::Stopped),
        }
    }

    /// Gives the claim up; the event counts as not handled (its row is
    /// deleted before the batch commits).
    pub fn release(self) {
        let _ = self.report.send(false);
    }
}

impl Claims {
    /// Starts the batcher on `connections` (at least 1) inbox connections
    /// made like `inbox`'s; it stops when every handle is dropped and its
    /// batches are done.
    pub fn start(inbox: &Inbox, connections: usize) -> Claims {
        let (requests, queue) = mpsc::unbounded_channel();
        let idle: Vec<Inbox> = (0..connections.max(1))
            .map(|_| inbox.unconnected())
            .collect();
        tokio::spawn(batcher(queue, idle));
        Claims { requests }
    }

    /// Claims `entry.event_id`, or reports that it was handled already.
    /// Waits while another transaction holds an uncommitted claim on it.
    pub async fn claim(&self, entry: InboxEntry) -> Result<Claim, InboxError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request { entry, reply })
            .map_err(|_| InboxError::Stopped)?;
        answer.await.map_err(|_| InboxError::Stopped)?
    }
}

/// Takes the items of `waiting` in order into a batch of at most `max`,
/// with one item per id; the others stay waiting, in order.
fn form_batch<T>(waiting: &mut VecDeque<T>, max: usize, id: impl Fn(&T) -> i64) -> Vec<T> {
    let mut ids = HashSet::new();
    let mut batch = Vec::new();
    let mut later = VecDeque::new();
    while let Some(item) = waiting.pop_front() {
        if batch.len() < max && ids.insert(id(&item)) {
            batch.push(item);
        } else {
            later.push_back(item);
        }
    }
    *waiting = later;
    batch
}

/// Forms batches of the claims waiting whenever a connection is free.
async fn batcher(mut queue: mpsc::UnboundedReceiver<Request>, idle: Vec<Inbox>) {
    let slots = Arc::new(Semaphore::new(idle.len()));
    let idle = Arc::new(Mutex::new(idle));
    let mut waiting: VecDeque<Request> = VecDeque::new();
    loop {
        if waiting.is_empty() {
            match queue.recv().await {
                Some(r) => waiting.push_back(r),
                None => break,
            }
        }
        // The semaphore is never closed.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        // Everything that queued up meanwhile joins this batch.
        while let Ok(r) = queue.try_recv() {
            waiting.push_back(r);
        }
        waiting.retain(|r| !r.reply.is_closed());
        let batch = form_batch(&mut waiting, MAX_BATCH, |r| r.entry.event_id);
        if batch.is_empty() {
            continue;
        }
        let idle = idle.clone();
        tokio::spawn(async move {
            // A slot is only held with a connection taken, so one is idle.
            let taken = idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let mut inbox = taken.expect("an inbox slot without an idle connection");
            run_batch(&mut inbox, batch).await;
            idle.lock().unwrap_or_else(|p| p.into_inner()).push(inbox);
            drop(slot);
        });
    }
}

/// One batch: claim, answer, wait for every member's report, delete the
/// unsent rows and commit, answer the sent members.
async fn run_batch(inbox: &mut Inbox, batch: Vec<Request>) {
    let entries: Vec<&InboxEntry> = batch.iter().map(|r| &r.entry).collect();
    let claimed = match inbox.begin_claims(&entries).await {
        Ok(claimed) => claimed,
        Err(e) => {
            let e = Arc::new(e);
            for r in batch {
                let _ = r.reply.send(Err(InboxError::Batch(e.clone())));
            }
            return;
        }
    };
    let mut members = Vec::new();
    for r in batch {
        let id = r.entry.event_id;
        if !claimed.contains(&id) {
            let _ = r.reply.send(Ok(Claim::Duplicate));
            continue;
        }
        let (report, reported) = oneshot::channel();
        let (done, committed) = oneshot::channel();
        // A claimer gone by now drops the claim: reported as unsent.
        let _ = r
            .reply
            .send(Ok(Claim::Claimed(InboxClaim { report, committed })));
        members.push((id, reported, done));
    }
    let mut unsent = Vec::new();
    let mut sent = Vec::new();
    for (id, reported, done) in members {
        match reported.await {
            Ok(true) => sent.push(done),
            Ok(false) | Err(_) => unsent.push(id),
        }
    }
    let result = inbox.finish_claims(&unsent).await.map_err(Arc::new);
    if let Err(e) = &result {
        tracing::warn!(error = %crate::handler::error_chain(e.as_ref()), members = sent.len() + unsent.len(), "inbox batch failed; its records are retried");
    }
    for done in sent {
        let _ = done.send(result.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_settings() {
        let inbox = Inbox::new("postgres://u:pw@db.example:5433/shop?sslmode=require").unwrap();
        assert_eq!(inbox.params.application_name, "notifier");
        assert_eq!(inbox.params.port, 5433);
        let named = Inbox::new("postgres://u@h/db?application_name=n2").unwrap();
        assert_eq!(named.params.application_name, "n2");
        let err = Inbox::new("postgres://u@h/db?sslmode=sometimes")
            .err()
            .expect("bad sslmode refused");
        assert!(!err.is_transient());
        assert!(!InboxError::Batch(Arc::new(InboxError::MissingTable)).is_transient());
        assert!(InboxError::Stopped.is_transient());
    }

    #[test]
    fn a_batch_takes_each_event_id_once_in_order_and_up_to_its_size() {
        let mut waiting: VecDeque<(i64, &str)> =
            [(5, "a"), (3, "b"), (5, "c"), (7, "d"), (3, "e"), (9, "f")]
                .into_iter()
                .collect();
        let batch = form_batch(&mut waiting, 10, |x| x.0);
        assert_eq!(batch, vec![(5, "a"), (3, "b"), (7, "d"), (9, "f")]);
        // The second claims of 5 and 3 wait for the next batch, in order.
        assert_eq!(Vec::from(waiting.clone()), vec![(5, "c"), (3, "e")]);
        assert_eq!(
            form_batch(&mut waiting, 10, |x| x.0),
            vec![(5, "c"), (3, "e")]
        );
        assert!(waiting.is_empty());

        let mut waiting: VecDeque<i64> = (0..5).collect();
        assert_eq!(form_batch(&mut waiting, 2, |x| *x), vec![0, 1]);
        assert_eq!(form_batch(&mut waiting, 2, |x| *x), vec![2, 3]);
        assert_eq!(form_batch(&mut waiting, 2, |x| *x), vec![4]);
        assert!(form_batch(&mut waiting, 2, |x| *x).is_empty());
    }

    #[test]
    fn a_batch_deletes_its_unsent_rows_before_it_commits() {
        assert_eq!(finish_sql(&[]), "COMMIT");
        assert_eq!(
            finish_sql(&[4, -1, 9_223_372_036_854_775_807]),
            "DELETE FROM notifier_inbox WHERE event_id IN (4,-1,9223372036854775807); COMMIT"
        );
    }

    /// Without a database: every claim of a batch whose connection cannot
    /// be made gets the (transient) error, none a claim.
    #[tokio::test]
    async fn claims_of_a_batch_that_cannot_connect_fail_transiently() {
        let inbox = Inbox::new("postgres://u@127.0.0.1:1/db?connect_timeout=1").unwrap();
        let claims = Claims::start(&inbox, 2);
        let entry = |id| InboxEntry {
            event_id: id,
            event_type: "OrderCreated".into(),
            message_id: format!("<{id}@x>"),
            topic: "t".into(),
            partition: 0,
            offset: id,
        };
        let (a, b) = tokio::join!(claims.claim(entry(1)), claims.claim(entry(2)));
        for r in [a, b] {
            let e = r.expect_err("no database");
            assert!(e.is_transient(), "{e:?}");
        }
    }
}
