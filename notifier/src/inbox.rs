//! Inbox: the `notifier_inbox` table of events whose email was sent, so a
//! redelivered record sends nothing.
//!
//! The decision to send and the record of having sent are one row, inserted
//! in one transaction that stays open while the email goes out:
//!
//! ```text
//!  BEGIN
//!  INSERT INTO notifier_inbox .. ON CONFLICT (event_id) DO NOTHING
//!     ├─ 0 rows: already sent ──────────────▶ COMMIT, skip (duplicate)
//!     └─ 1 row: claimed ──▶ send email ──ok─▶ COMMIT          (recorded)
//!                                      └err─▶ ROLLBACK        (not recorded; retry or DLQ)
//! ```
//!
//! While the transaction is open its uncommitted row locks the event id: a
//! second instance given the same record during a rebalance blocks on its
//! INSERT until the first commits (then sees the row and skips) or rolls back
//! (then claims it and sends). So two live instances never both send.
//!
//! Only sent emails are recorded: a record that went to the dead-letter
//! topic is not, so an operator can fix it and replay it into the topic.

use pgconn::{ConnectError, ConnectParams};
use tokio_postgres::{Client, Statement, Transaction};

/// What identifies a handled event in the inbox.
#[derive(Clone, Debug)]
pub struct InboxEntry<'a> {
    pub event_id: i64,
    pub event_type: &'a str,
    pub message_id: &'a str,
    pub topic: &'a str,
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
}

impl InboxError {
    /// A missing table or a bad URL is definite; connection and query
    /// errors are worth retrying.
    pub fn is_transient(&self) -> bool {
        !matches!(self, InboxError::MissingTable | InboxError::Config(_))
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

/// The result of [`Inbox::claim`].
pub enum Claim<'a> {
    /// The event's email was already sent.
    Duplicate,
    /// This caller owns the event until it commits or releases the claim.
    Claimed(InboxClaim<'a>),
}

/// An open claim on one event id (an open transaction holding its row).
pub struct InboxClaim<'a> {
    tx: Transaction<'a>,
}

impl InboxClaim<'_> {
    /// Records the event as handled.
    pub async fn commit(self) -> Result<(), InboxError> {
        self.tx.commit().await.map_err(InboxError::Query)
    }

    /// Gives the claim up; the event counts as not handled.
    pub async fn release(self) -> Result<(), InboxError> {
        self.tx.rollback().await.map_err(InboxError::Query)
    }
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

    /// Claims `entry.event_id`, or reports that it was handled already.
    /// Blocks while another transaction holds an uncommitted claim on it.
    pub async fn claim(&mut self, entry: &InboxEntry<'_>) -> Result<Claim<'_>, InboxError> {
        let conn = self.connection().await?;
        let tx = conn.client.transaction().await.map_err(InboxError::Query)?;
        let inserted = tx
            .execute(
                &conn.claim,
                &[
                    &entry.event_id,
                    &entry.event_type,
                    &entry.message_id,
                    &entry.topic,
                    &entry.partition,
                    &entry.offset,
                ],
            )
            .await
            .map_err(InboxError::Query)?;
        if inserted == 0 {
            tx.commit().await.map_err(InboxError::Query)?;
            Ok(Claim::Duplicate)
        } else {
            Ok(Claim::Claimed(InboxClaim { tx }))
        }
    }
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
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (event_id) DO NOTHING",
        )
        .await
        .map_err(classify)?;
    Ok(Connected { client, claim })
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
    }
}
