//! The order store: every read and write of `orders`, `outbox` and
//! `idempotency_keys`, over a deadpool-postgres pool with prepared
//! (per-connection cached) statements.
//!
//! Guarantees:
//! - every write is one transaction holding the `orders` change *and* its
//!   outbox event: both commit or neither does. The event is an `outbox`
//!   row, or with [`Outbox::Message`] a transactional logical decoding
//!   message (which a rolled-back transaction never emits);
//! - a status change locks the order row (`SELECT .. FOR UPDATE`) before it
//!   checks the transition, so concurrent changes of one order serialise and
//!   at most one of two conflicting changes (and its event) happens;
//! - an Idempotency-Key is claimed in the creating transaction itself, so
//!   concurrent retries queue on the key's primary key and one order is made.
//!
//! ```text
//!  create:  BEGIN → claim key? → INSERT orders → event → store response? → COMMIT
//!  status:  BEGIN → SELECT status FOR UPDATE → check → UPDATE orders → event → COMMIT
//!
//!  event:   table    INSERT INTO outbox                   (INSERT_EVENT)
//!           message  SELECT pg_logical_emit_message(..)   (EMIT_EVENT)
//! ```
//!
//! Failures are classified: the database unreachable, a pool timeout or a
//! transient server condition is [`StoreError::Unavailable`] (the caller may
//! retry); anything else is [`StoreError::Database`].

use std::time::Duration;

use deadpool_postgres::Pool;
use futures_util::future::{join, join3};
use pgconn::{ConnectParams, PoolSettings};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{Json, ToSql};
use tokio_postgres::Row;

use crate::order::{
    Item, NewOrder, Order, Status, AGGREGATE_TYPE, ORDER_CREATED, ORDER_STATUS_CHANGED,
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached now (or the pool is exhausted); retry.
    #[error("database unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The database refused a statement for another reason.
    #[error("database error")]
    Database(#[source] tokio_postgres::Error),
    /// The database URL cannot be used.
    #[error("invalid database url: {0}")]
    Config(String),
    /// `--outbox-mode message` on a server whose `wal_level` is not
    /// `logical`: the messages would be written where no slot can decode them.
    #[error(
        "--outbox-mode message needs wal_level = logical, but the server has \
         wal_level = {0}: no logical replication slot could read the events"
    )]
    WalLevel(String),
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        if is_transient(&e) {
            StoreError::Unavailable(Box::new(e))
        } else {
            StoreError::Database(e)
        }
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        use deadpool_postgres::PoolError;
        match e {
            PoolError::Backend(e) => StoreError::from(e),
            other => StoreError::Unavailable(Box::new(other)),
        }
    }
}

/// Connection loss, server shutdown, too many connections, serialisation
/// failures and cancelled statements: conditions a retry can get past.
fn is_transient(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        None => e.is_closed() || e.as_db_error().is_none(),
        Some(code) => {
            let c = code.code();
            c.starts_with("08")
                || c.starts_with("53")
                || c.starts_with("57P")
                || *code == SqlState::T_R_SERIALIZATION_FAILURE
                || *code == SqlState::T_R_DEADLOCK_DETECTED
                || *code == SqlState::LOCK_NOT_AVAILABLE
                || *code == SqlState::QUERY_CANCELED
        }
    }
}

/// Pool settings.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    pub max_size: usize,
    /// Bound on waiting for a free connection and on opening a new one.
    pub timeout: Duration,
}

/// Builds the pool. No connection is opened until the first request, so the
/// service starts (and `/readyz` says why it is not ready) with the
/// database down.
pub fn pool(database_url: &str, cfg: &PoolConfig) -> Result<Pool, StoreError> {
    // TLS as the URL's sslmode says (verify-full included), like every binary.
    let params = ConnectParams::from_url(database_url)
        .map_err(|e| StoreError::Config(e.to_string()))?
        .or_application_name("order-api")
        .or_connect_timeout(cfg.timeout);
    pgconn::pool(
        &params,
        PoolSettings {
            max_size: cfg.max_size,
            timeout: cfg.timeout,
        },
    )
    .map_err(|e| StoreError::Config(e.to_string()))
}

const INSERT_EVENT: &str = "INSERT INTO outbox \
     (aggregate_type, aggregate_id, user_id, event_type, payload, traceparent, tracestate) \
     VALUES ($1, $2, $3, $4, $5, $6, $7)";

/// The event as a logical decoding message (issue #18): parameters `$1`-`$7`
/// as in [`INSERT_EVENT`], `$8` the prefix. The content is a JSON object with
/// an outbox row's fields; `id` is drawn from the `outbox` table's identity
/// sequence, so event ids are one sequence whichever way events are written.
/// Transactional: decoded at the transaction's commit, never if it rolls back.
const EMIT_EVENT: &str = "SELECT pg_logical_emit_message(true, $8::text, json_build_object( \
         'id', nextval(pg_get_serial_sequence('outbox', 'id')), \
         'aggregate_type', $1::text, 'aggregate_id', $2::text, 'user_id', $3::bigint, \
         'event_type', $4::text, 'payload', $5::jsonb, 'created_at', now(), \
         'traceparent', $6::text, 'tracestate', $7::text)::text)";

/// Where a transaction writes its outbox event (`--outbox-mode`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outbox {
    /// A row in the `outbox` table.
    Table,
    /// A transactional logical decoding message with this prefix; the
    /// `outbox` table gets no row. Needs `wal_level = logical`.
    Message { prefix: String },
}

impl Outbox {
    /// The statement that writes one event.
    fn statement(&self) -> &'static str {
        match self {
            Outbox::Table => INSERT_EVENT,
            Outbox::Message { .. } => EMIT_EVENT,
        }
    }

    /// The statement's parameters: the event's seven, and the prefix for a
    /// message.
    fn params<'a>(&'a self, event: [&'a (dyn ToSql + Sync); 7]) -> Vec<&'a (dyn ToSql + Sync)> {
        let mut params = event.to_vec();
        if let Outbox::Message { prefix } = self {
            params.push(prefix);
        }
        params
    }
}

/// The W3C trace context written into an outbox row (migration V5): the
/// request's trace with order-api's span as the parent, and the caller's
/// `tracestate` if it sent one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventTrace {
    pub traceparent: String,
    pub tracestate: Option<String>,
}

const ORDER_COLUMNS: &str =
    "id, user_id, email, status, items, total_cents, currency, created_at, updated_at";

fn order_from_row(row: &Row) -> Result<Order, StoreError> {
    let status: String = row.try_get("status")?;
    Ok(Order {
        id: row.try_get("id")?,
        user_id: row.try_get("user_id")?,
        email: row.try_get("email")?,
        // The column's CHECK constraint admits only the five names.
        status: Status::parse(&status).unwrap_or(Status::Created),
        // Stored from validated `Item`s; anything else is a database error.
        items: row.try_get::<_, Json<Vec<Item>>>("items")?.0,
        total_cents: row.try_get("total_cents")?,
        currency: row.try_get("currency")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// A response stored under an Idempotency-Key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    pub body: String,
    pub location: Option<String>,
}

/// What a create request came to.
#[derive(Debug)]
pub enum Created {
    /// A new order (and its `OrderCreated` event) was committed.
    New(Order),
    /// The key was used before with the same request: its first response.
    Replayed(StoredResponse),
    /// The key was used before with a different request.
    KeyMismatch,
    /// The key's first request has not finished (only seen if it never
    /// stored a response, which the creating transaction always does).
    KeyInProgress,
}

/// An Idempotency-Key and the fingerprint of the request it came with.
#[derive(Clone, Debug)]
pub struct IdempotencyKey {
    pub key: String,
    pub request_hash: Vec<u8>,
}

impl IdempotencyKey {
    /// Fingerprints the validated request (not its bytes), so a retry that
    /// differs only in whitespace or key order counts as the same request.
    pub fn new(key: &str, route: &str, order: &NewOrder) -> IdempotencyKey {
        let mut h = Sha256::new();
        h.update(route.as_bytes());
        h.update(b"\n");
        // Serialising a struct of strings and integers cannot fail.
        h.update(serde_json::to_vec(order).unwrap_or_default());
        IdempotencyKey {
            key: key.to_owned(),
            request_hash: h.finalize().to_vec(),
        }
    }
}

/// What a status change came to.
#[derive(Debug)]
pub enum StatusChange {
    Changed(Order),
    NotFound,
    Illegal { from: Status },
}

/// Renders the response stored for a created order (the same bytes the
/// first request answered with).
pub type RenderCreated = fn(&Order) -> StoredResponse;

/// A pooled connection that goes back to the pool only when released. If
/// the request is dropped (its timeout) or fails mid-transaction, the
/// connection is closed instead: Postgres rolls the open transaction back
/// and no later request can inherit it.
struct Conn(Option<deadpool_postgres::Object>);

impl Conn {
    fn client(&self) -> &deadpool_postgres::Client {
        // Only `release` and `drop` take the object out, and both consume
        // the guard.
        self.0.as_ref().expect("connection present until released")
    }

    fn release(mut self) {
        // Dropping the Object returns it to the pool.
        self.0.take();
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(obj) = self.0.take() {
            drop(deadpool_postgres::Object::take(obj));
        }
    }
}

#[derive(Clone)]
pub struct Store {
    pool: Pool,
    idempotency_ttl: Duration,
    outbox: Outbox,
}

impl Store {
    pub fn new(pool: Pool, idempotency_ttl: Duration, outbox: Outbox) -> Store {
        Store {
            pool,
            idempotency_ttl,
            outbox,
        }
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// `SELECT 1` on a pooled connection; with [`Outbox::Message`],
    /// [`Store::check_wal_level`] instead (as cheap, and the service is not
    /// ready on a server that cannot decode its events).
    pub async fn ping(&self) -> Result<(), StoreError> {
        if let Outbox::Message { .. } = self.outbox {
            return self.check_wal_level().await;
        }
        let client = self.pool.get().await?;
        client.simple_query("SELECT 1").await?;
        Ok(())
    }

    /// With [`Outbox::Message`], that the server's `wal_level` is `logical`
    /// ([`StoreError::WalLevel`] if not: at any lower level Postgres writes
    /// the messages but no logical slot can exist to decode them). Nothing
    /// to check with [`Outbox::Table`].
    pub async fn check_wal_level(&self) -> Result<(), StoreError> {
        if self.outbox == Outbox::Table {
            return Ok(());
        }
        let client = self.pool.get().await?;
        let level = client
            .simple_query("SHOW wal_level")
            .await?
            .into_iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
                _ => None,
            })
            .unwrap_or_default();
        if level == "logical" {
            Ok(())
        } else {
            Err(StoreError::WalLevel(level))
        }
    }

    pub async fn get(&self, id: i64) -> Result<Option<Order>, StoreError> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(&format!("SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1"))
            .await?;
        match client.query_opt(&stmt, &[&id]).await? {
            Some(row) => Ok(Some(order_from_row(&row)?)),
            None => Ok(None),
        }
    }

    /// Orders with `id > after`, oldest first (keyset pagination), optionally
    /// only those of `user_id`.
    pub async fn list(
        &self,
        user_id: Option<i64>,
        after: i64,
        limit: i64,
    ) -> Result<Vec<Order>, StoreError> {
        let client = self.pool.get().await?;
        let rows = match user_id {
            Some(user_id) => {
                let stmt = client
                    .prepare_cached(&format!(
                        "SELECT {ORDER_COLUMNS} FROM orders WHERE user_id = $1 AND id > $2 \
                         ORDER BY id LIMIT $3"
                    ))
                    .await?;
                client.query(&stmt, &[&user_id, &after, &limit]).await?
            }
            None => {
                let stmt = client
                    .prepare_cached(&format!(
                        "SELECT {ORDER_COLUMNS} FROM orders WHERE id > $1 ORDER BY id LIMIT $2"
                    ))
                    .await?;
                client.query(&stmt, &[&after, &limit]).await?
            }
        };
        rows.iter().map(order_from_row).collect()
    }

    /// Creates an order and its `OrderCreated` outbox event in one transaction;
    /// with a key, claims it in that transaction and stores `render(order)`
    /// as the response to replay.
    ///
    /// The statements are pipelined (sent without waiting for the previous
    /// answer where none is needed): `BEGIN` with the first statement, and
    /// the outbox event with `COMMIT`. An event statement that fails aborts
    /// the transaction, so the pipelined `COMMIT` rolls it back.
    pub async fn create(
        &self,
        order: &NewOrder,
        key: Option<&IdempotencyKey>,
        render: RenderCreated,
        trace: &EventTrace,
    ) -> Result<Created, StoreError> {
        let conn = Conn(Some(self.pool.get().await?));
        let created = self
            .create_on(conn.client(), order, key, render, trace)
            .await?;
        conn.release();
        Ok(created)
    }

    async fn create_on(
        &self,
        client: &deadpool_postgres::Client,
        order: &NewOrder,
        key: Option<&IdempotencyKey>,
        render: RenderCreated,
        trace: &EventTrace,
    ) -> Result<Created, StoreError> {
        let insert = client
            .prepare_cached(&format!(
                "INSERT INTO orders (user_id, email, status, items, total_cents, currency) \
                 VALUES ($1, $2, 'CREATED', $3, $4, $5) RETURNING {ORDER_COLUMNS}"
            ))
            .await?;
        let outbox = client.prepare_cached(self.outbox.statement()).await?;
        let items = serde_json::to_value(&order.items).unwrap_or(Value::Null);
        let insert_params: [&(dyn ToSql + Sync); 5] = [
            &order.user_id,
            &order.email,
            &items,
            &order.total_cents,
            &order.currency,
        ];

        let row = match key {
            None => {
                let (begin, row) = join(
                    client.batch_execute("BEGIN"),
                    client.query_one(&insert, &insert_params),
                )
                .await;
                begin?;
                row?
            }
            Some(key) => {
                if let Some(done) = self.claim(client, key).await? {
                    return Ok(done);
                }
                client.query_one(&insert, &insert_params).await?
            }
        };
        let created = order_from_row(&row)?;
        let payload = created.event_payload(None);
        let aggregate_id = created.id.to_string();
        let event_params = self.outbox.params([
            &AGGREGATE_TYPE,
            &aggregate_id,
            &created.user_id,
            &ORDER_CREATED,
            &payload,
            &trace.traceparent,
            &trace.tracestate,
        ]);
        match key {
            None => {
                let (event, commit) = join(
                    client.execute(&outbox, &event_params),
                    client.batch_execute("COMMIT"),
                )
                .await;
                event?;
                commit?;
            }
            Some(key) => {
                let response = render(&created);
                let store = client
                    .prepare_cached(
                        "UPDATE idempotency_keys SET status_code = $2, response_body = $3, \
                         location = $4 WHERE key = $1",
                    )
                    .await?;
                let status = i16::try_from(response.status).unwrap_or(i16::MAX);
                let (event, stored, commit) = join3(
                    client.execute(&outbox, &event_params),
                    client.execute(
                        &store,
                        &[&key.key, &status, &response.body, &response.location],
                    ),
                    client.batch_execute("COMMIT"),
                )
                .await;
                event?;
                stored?;
                commit?;
            }
        }
        Ok(Created::New(created))
    }

    /// Opens the transaction and claims `key` in it. `None`: claimed, go on
    /// creating. `Some`: the key was already used (the transaction is
    /// rolled back), this is the answer.
    async fn claim(
        &self,
        client: &deadpool_postgres::Client,
        key: &IdempotencyKey,
    ) -> Result<Option<Created>, StoreError> {
        let claim = client
            .prepare_cached(
                "INSERT INTO idempotency_keys (key, request_hash, expires_at) \
                 VALUES ($1, $2, now() + make_interval(secs => $3)) \
                 ON CONFLICT (key) DO UPDATE SET request_hash = EXCLUDED.request_hash, \
                     status_code = NULL, response_body = NULL, location = NULL, \
                     created_at = now(), expires_at = EXCLUDED.expires_at \
                 WHERE idempotency_keys.expires_at <= now() \
                 RETURNING key",
            )
            .await?;
        let read = client
            .prepare_cached(
                "SELECT request_hash, status_code, response_body, location \
                 FROM idempotency_keys WHERE key = $1",
            )
            .await?;
        let ttl = self.idempotency_ttl.as_secs_f64();
        // A key deleted by expiry between the claim and the read is claimed
        // again; two rounds are always enough, three is a safe bound.
        for _ in 0..3 {
            // A concurrent first request holding the key makes the claim
            // wait until it commits (then the key is taken) or rolls back
            // (then it is ours).
            let (begin, claimed) = join(
                client.batch_execute("BEGIN"),
                client.query_opt(&claim, &[&key.key, &key.request_hash, &ttl]),
            )
            .await;
            begin?;
            if claimed?.is_some() {
                return Ok(None);
            }
            let (row, rollback) = join(
                client.query_opt(&read, &[&key.key]),
                client.batch_execute("ROLLBACK"),
            )
            .await;
            rollback?;
            let Some(row) = row? else {
                continue;
            };
            let hash: Vec<u8> = row.try_get("request_hash")?;
            if hash != key.request_hash {
                return Ok(Some(Created::KeyMismatch));
            }
            let status: Option<i16> = row.try_get("status_code")?;
            let body: Option<String> = row.try_get("response_body")?;
            return Ok(Some(match (status, body) {
                (Some(status), Some(body)) => Created::Replayed(StoredResponse {
                    status: u16::try_from(status).unwrap_or(500),
                    body,
                    location: row.try_get("location")?,
                }),
                _ => Created::KeyInProgress,
            }));
        }
        Err(StoreError::Unavailable(
            "an idempotency key kept disappearing while being read".into(),
        ))
    }

    /// Moves an order to `to` if its current status allows it, writing the
    /// `OrderStatusChanged` outbox event in the same transaction.
    pub async fn change_status(
        &self,
        id: i64,
        to: Status,
        trace: &EventTrace,
    ) -> Result<StatusChange, StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let lock = tx
            .prepare_cached("SELECT status FROM orders WHERE id = $1 FOR UPDATE")
            .await?;
        let Some(row) = tx.query_opt(&lock, &[&id]).await? else {
            tx.rollback().await?;
            return Ok(StatusChange::NotFound);
        };
        let from: String = row.try_get(0)?;
        let from = Status::parse(&from).unwrap_or(Status::Created);
        if !from.can_become(to) {
            tx.rollback().await?;
            return Ok(StatusChange::Illegal { from });
        }
        // clock_timestamp(), not now(): the row lock may have been waited
        // for, and updated_at must not go back in time.
        let update = tx
            .prepare_cached(&format!(
                "UPDATE orders SET status = $2, \
                     updated_at = greatest(clock_timestamp(), updated_at) \
                 WHERE id = $1 RETURNING {ORDER_COLUMNS}"
            ))
            .await?;
        let row = tx.query_one(&update, &[&id, &to.as_str()]).await?;
        let order = order_from_row(&row)?;
        write_event(
            &tx,
            &self.outbox,
            &order,
            ORDER_STATUS_CHANGED,
            Some((from, to)),
            trace,
        )
        .await?;
        tx.commit().await?;
        Ok(StatusChange::Changed(order))
    }

    /// Deletes expired idempotency keys; returns how many.
    pub async fn delete_expired_keys(&self) -> Result<u64, StoreError> {
        let client = self.pool.get().await?;
        let stmt = client
            .prepare_cached(
                "DELETE FROM idempotency_keys WHERE key IN \
                 (SELECT key FROM idempotency_keys WHERE expires_at <= now() LIMIT 10000)",
            )
            .await?;
        Ok(client.execute(&stmt, &[]).await?)
    }
}

/// Writes `order`'s event in `tx`, as `outbox` says.
async fn write_event(
    tx: &deadpool_postgres::Transaction<'_>,
    outbox: &Outbox,
    order: &Order,
    event_type: &str,
    change: Option<(Status, Status)>,
    trace: &EventTrace,
) -> Result<(), StoreError> {
    let stmt = tx.prepare_cached(outbox.statement()).await?;
    let payload = order.event_payload(change);
    let aggregate_id = order.id.to_string();
    let params = outbox.params([
        &AGGREGATE_TYPE,
        &aggregate_id,
        &order.user_id,
        &event_type,
        &payload,
        &trace.traceparent,
        &trace.tracestate,
    ]);
    tx.execute(&stmt, &params).await?;
    Ok(())
}
