//! What one arrival does: an HTTP request to order-api, or an INSERT into
//! the outbox.
//!
//! ```text
//!  http: arrival ─┬─ p = --status-change-ratio, an order ready ─▶ POST /orders/{id}/status {next status}
//!                 └─ otherwise ──────────────────────────────────▶ POST /orders {random order}
//!                    (each with a `traceparent` header)
//!        201/200 ─▶ the record key (order id, status) + the order back in the book
//!  sql:  arrival ──▶ INSERT INTO outbox ... [traceparent] RETURNING id  (× --rows-per-txn, one transaction)
//! ```
//!
//! Trace context: every request carries a new W3C trace
//! (`TraceParent::root()`, made by the caller). In http mode it is the
//! `traceparent` header, which order-api continues into the outbox row. In
//! sql mode it goes into the row's `traceparent` column — all rows of one
//! transaction share it — when the outbox table has that column (looked up
//! once, at connect); on an older schema without it, rows are inserted as
//! before, without trace context.
//!
//! The order book holds orders created in this run whose next transition
//! (CREATED→PAID→SHIPPED→DELIVERED) has not been requested. An order is
//! taken out when its next status is requested and put back only when that
//! request succeeded, so two requests never race on one order (no 409s of
//! loadgen's own making). An order whose request failed leaves the book: its
//! state is unknown.
//!
//! Errors are classified into a few kinds for the report: `http <status>`,
//! `connect`, `timeout`, `io` (connection lost mid-request), `body` (a 2xx
//! whose body is not the order JSON), `sql <SQLSTATE>`, `sql connection`.

use std::sync::Mutex;
use std::time::Duration;

use deadpool_postgres::Pool;
use rand::Rng;
use serde_json::{json, Value};

use outbox_record::trace::{TraceParent, TRACEPARENT};

use crate::matcher::{Key, OrderStatus};

/// A request that failed, by kind.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("http {0}")]
    Status(u16),
    #[error("connect")]
    Connect,
    #[error("timeout")]
    Timeout,
    #[error("io")]
    Io,
    #[error("body")]
    Body,
    #[error("sql {0}")]
    Sql(String),
    #[error("sql connection")]
    SqlConnection,
}

impl RequestError {
    /// The label in the report's errors-by-kind.
    pub fn kind(&self) -> String {
        self.to_string()
    }
}

/// What an arrival does, decided when it is due.
#[derive(Clone, Debug, PartialEq)]
pub enum Request {
    Create(Value),
    ChangeStatus { order_id: i64, to: OrderStatus },
    Insert { seq: u64 },
}

/// Orders of this run whose next status can be requested.
#[derive(Debug, Default)]
pub struct OrderBook {
    ready: Vec<(i64, OrderStatus)>,
}

impl OrderBook {
    /// Takes a random ready order and the status to move it to.
    pub fn take(&mut self, rng: &mut impl Rng) -> Option<(i64, OrderStatus)> {
        if self.ready.is_empty() {
            return None;
        }
        let i = rng.random_range(0..self.ready.len());
        let (id, status) = self.ready.swap_remove(i);
        // Orders at DELIVERED are never put back, so `next` exists.
        status.next().map(|next| (id, next))
    }

    /// `id` is now at `status`; ready for its next transition, if any.
    pub fn put(&mut self, id: i64, status: OrderStatus) {
        if status.next().is_some() {
            self.ready.push((id, status));
        }
    }

    pub fn len(&self) -> usize {
        self.ready.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ready.is_empty()
    }
}

/// order-api over HTTP.
///
/// The client is reqwest (already in the workspace, with rustls): it is
/// hyper-util's pooled keep-alive client underneath, and what it adds — a
/// few µs per request for its builder and error types — is noise next to
/// the milliseconds measured here, while it brings https, connect and
/// request timeouts and clear error classes (`is_connect`, `is_timeout`).
pub struct HttpTarget {
    client: reqwest::Client,
    base: reqwest::Url,
    status_change_ratio: f64,
    users: u64,
    book: Mutex<OrderBook>,
}

impl HttpTarget {
    pub fn new(
        base: reqwest::Url,
        status_change_ratio: f64,
        users: u64,
        max_in_flight: usize,
        timeout: Duration,
    ) -> Result<HttpTarget, reqwest::Error> {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(max_in_flight)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .connect_timeout(timeout)
            .timeout(timeout)
            .user_agent(concat!("loadgen/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(HttpTarget {
            client,
            base,
            status_change_ratio,
            users,
            book: Mutex::new(OrderBook::default()),
        })
    }

    fn book(&self) -> std::sync::MutexGuard<'_, OrderBook> {
        // The book is a plain Vec: a panic elsewhere cannot leave it
        // inconsistent, so a poisoned lock is still usable.
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Orders ready for a status change right now.
    pub fn ready_orders(&self) -> usize {
        self.book().len()
    }

    /// Decides what the next arrival does.
    pub fn next_request(&self, rng: &mut impl Rng) -> Request {
        if rng.random_bool(self.status_change_ratio) {
            if let Some((order_id, to)) = self.book().take(rng) {
                return Request::ChangeStatus { order_id, to };
            }
        }
        Request::Create(random_order(rng, self.users))
    }

    /// Sends `req` (with `trace` as its `traceparent` header); on success,
    /// the key of the record it committed.
    pub async fn send(
        &self,
        req: &Request,
        trace: Option<&TraceParent>,
    ) -> Result<Key, RequestError> {
        let (url, body) = match req {
            Request::Create(body) => (self.url("orders"), body.clone()),
            Request::ChangeStatus { order_id, to } => (
                self.url(&format!("orders/{order_id}/status")),
                json!({ "status": to.as_str() }),
            ),
            Request::Insert { .. } => return Err(RequestError::Body),
        };
        let mut post = self.client.post(url).json(&body);
        if let Some(trace) = trace {
            post = post.header(TRACEPARENT, trace.to_string());
        }
        let resp = post.send().await.map_err(classify)?;
        let status = resp.status();
        // The whole body is read before the response counts as done.
        let bytes = resp.bytes().await.map_err(classify)?;
        if !status.is_success() {
            return Err(RequestError::Status(status.as_u16()));
        }
        let order: Value = serde_json::from_slice(&bytes).map_err(|_| RequestError::Body)?;
        let id = order["id"].as_i64().ok_or(RequestError::Body)?;
        let key = match req {
            Request::ChangeStatus { order_id, to } if *order_id == id => Key::Order(id, *to),
            Request::Create(_) => Key::Order(id, OrderStatus::Created),
            _ => return Err(RequestError::Body),
        };
        if let Key::Order(id, status) = key {
            self.book().put(id, status);
        }
        Ok(key)
    }

    fn url(&self, path: &str) -> reqwest::Url {
        // `path` is a relative path of plain ASCII: joining cannot fail.
        let mut base = self.base.clone();
        if !base.path().ends_with('/') {
            let p = format!("{}/", base.path());
            base.set_path(&p);
        }
        base.join(path).unwrap_or(base)
    }
}

fn classify(e: reqwest::Error) -> RequestError {
    if e.is_timeout() {
        RequestError::Timeout
    } else if e.is_connect() {
        RequestError::Connect
    } else if let Some(status) = e.status() {
        RequestError::Status(status.as_u16())
    } else {
        RequestError::Io
    }
}

/// A valid `POST /orders` body (SPEC): a random user, 1–3 items.
pub fn random_order(rng: &mut impl Rng, users: u64) -> Value {
    let user_id = rng.random_range(1..=users);
    let items: Vec<Value> = (0..rng.random_range(1..=3))
        .map(|_| {
            json!({
                "sku": format!("LG-{}", rng.random_range(1..=500)),
                "quantity": rng.random_range(1..=5),
                "unit_price_cents": rng.random_range(100..=20_000),
            })
        })
        .collect();
    json!({
        "user_id": user_id,
        "email": format!("user{user_id}@loadgen.example"),
        "currency": "EUR",
        "items": items,
    })
}

/// Outbox rows straight into Postgres.
pub struct SqlTarget {
    pool: Pool,
    rows_per_txn: usize,
    users: u64,
    /// The outbox table has a `traceparent` column: [`INSERT_TRACED`].
    traced: bool,
}

/// The statement of sql mode: one outbox row, autocommitted (or inside
/// the transaction of --rows-per-txn).
pub const INSERT: &str = "INSERT INTO outbox (aggregate_type, aggregate_id, user_id, event_type, payload) \
     VALUES ('loadgen', $1::bigint::text, $2, 'LoadgenEvent', jsonb_build_object('seq', $1::bigint)) \
     RETURNING id";

/// [`INSERT`] with the request's `traceparent` in the column of that name.
pub const INSERT_TRACED: &str = "INSERT INTO outbox (aggregate_type, aggregate_id, user_id, event_type, payload, traceparent) \
     VALUES ('loadgen', $1::bigint::text, $2, 'LoadgenEvent', jsonb_build_object('seq', $1::bigint), $3) \
     RETURNING id";

/// Whether the `outbox` the INSERT resolves to (by the search path) has a
/// `traceparent` column.
const HAS_TRACEPARENT: &str = "SELECT EXISTS (SELECT 1 FROM pg_attribute \
     WHERE attrelid = to_regclass('outbox') AND attname = 'traceparent' \
     AND attnum > 0 AND NOT attisdropped)";

#[derive(Debug, thiserror::Error)]
pub enum SqlSetupError {
    #[error("invalid --database-url: {0}")]
    Url(String),
    #[error("cannot build the connection pool: {0}")]
    Pool(String),
    #[error("cannot open the database connections")]
    Connect(#[source] deadpool_postgres::PoolError),
    #[error("cannot prepare the INSERT (is the outbox table there?)")]
    Prepare(#[source] tokio_postgres::Error),
    #[error("cannot read the columns of the outbox table")]
    Columns(#[source] tokio_postgres::Error),
}

impl SqlTarget {
    /// Opens `connections` connections (all of them, now, so that opening
    /// one never shows up as request latency), looks up whether the outbox
    /// has a `traceparent` column and prepares the INSERT.
    pub async fn connect(
        database_url: &str,
        connections: usize,
        rows_per_txn: usize,
        users: u64,
    ) -> Result<SqlTarget, SqlSetupError> {
        // TLS as the URL's sslmode says, like every binary (pgconn).
        let params = pgconn::ConnectParams::from_url(database_url)
            .map_err(|e| SqlSetupError::Url(e.to_string()))?
            .or_application_name("loadgen")
            .or_connect_timeout(Duration::from_secs(10));
        let pool = pgconn::pool(
            &params,
            pgconn::PoolSettings {
                max_size: connections,
                timeout: params.connect_timeout,
            },
        )
        .map_err(|e| SqlSetupError::Pool(e.to_string()))?;
        let mut held = Vec::with_capacity(connections);
        let mut traced = false;
        for i in 0..connections {
            let client = pool.get().await.map_err(SqlSetupError::Connect)?;
            if i == 0 {
                traced = client
                    .query_one(HAS_TRACEPARENT, &[])
                    .await
                    .map_err(SqlSetupError::Columns)?
                    .get(0);
                if !traced {
                    tracing::info!(
                        "the outbox table has no traceparent column: rows are inserted without trace context"
                    );
                }
            }
            client
                .prepare_cached(if traced { INSERT_TRACED } else { INSERT })
                .await
                .map_err(SqlSetupError::Prepare)?;
            held.push(client);
        }
        drop(held);
        Ok(SqlTarget {
            pool,
            rows_per_txn,
            users,
            traced,
        })
    }

    /// Whether the rows carry the request's `traceparent`.
    pub fn traced(&self) -> bool {
        self.traced
    }

    /// Inserts the rows of one arrival (with `trace` in their
    /// `traceparent` column, when the table has it); their outbox ids.
    pub async fn send(
        &self,
        seq: u64,
        trace: Option<&TraceParent>,
    ) -> Result<Vec<Key>, RequestError> {
        let user_id = i64::try_from(rand::rng().random_range(1..=self.users)).unwrap_or(1);
        let mut client = self.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => sql_error(&e),
            deadpool_postgres::PoolError::Timeout(_) => RequestError::Timeout,
            _ => RequestError::SqlConnection,
        })?;
        let stmt = client
            .prepare_cached(if self.traced { INSERT_TRACED } else { INSERT })
            .await
            .map_err(|e| sql_error(&e))?;
        let base = i64::try_from(seq).unwrap_or(i64::MAX);
        let traceparent = trace.map(TraceParent::to_string);
        let with_trace: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
            [&base, &user_id, &traceparent];
        let params = if self.traced {
            &with_trace[..]
        } else {
            &with_trace[..2]
        };
        if self.rows_per_txn == 1 {
            let row = client
                .query_one(&stmt, params)
                .await
                .map_err(|e| sql_error(&e))?;
            return Ok(vec![Key::Event(row.get(0))]);
        }
        let txn = client.transaction().await.map_err(|e| sql_error(&e))?;
        let mut keys = Vec::with_capacity(self.rows_per_txn);
        for _ in 0..self.rows_per_txn {
            let row = txn
                .query_one(&stmt, params)
                .await
                .map_err(|e| sql_error(&e))?;
            keys.push(Key::Event(row.get(0)));
        }
        txn.commit().await.map_err(|e| sql_error(&e))?;
        Ok(keys)
    }
}

fn sql_error(e: &tokio_postgres::Error) -> RequestError {
    match e.code() {
        Some(code) => RequestError::Sql(code.code().to_owned()),
        None => RequestError::SqlConnection,
    }
}

/// The target of a run.
pub enum Target {
    Http(HttpTarget),
    Sql(SqlTarget),
}

impl Target {
    /// Decides what the next arrival (number `seq`) does.
    pub fn next_request(&self, seq: u64, rng: &mut impl Rng) -> Request {
        match self {
            Target::Http(h) => h.next_request(rng),
            Target::Sql(_) => Request::Insert { seq },
        }
    }

    /// Whether requests carry their `traceparent` somewhere it is kept
    /// (always in http mode; in sql mode when the outbox has the column).
    pub fn traced(&self) -> bool {
        match self {
            Target::Http(_) => true,
            Target::Sql(s) => s.traced(),
        }
    }

    /// Sends one request carrying `trace`; the keys of the records it
    /// committed.
    pub async fn send(
        &self,
        req: &Request,
        trace: Option<&TraceParent>,
    ) -> Result<Vec<Key>, RequestError> {
        match (self, req) {
            (Target::Sql(s), Request::Insert { seq }) => s.send(*seq, trace).await,
            (Target::Http(h), req) => h.send(req, trace).await.map(|k| vec![k]),
            (Target::Sql(_), _) => Err(RequestError::Body),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn the_book_walks_the_happy_path_once() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut book = OrderBook::default();
        book.put(7, OrderStatus::Created);
        assert_eq!(book.take(&mut rng), Some((7, OrderStatus::Paid)));
        // In flight: not offered again.
        assert_eq!(book.take(&mut rng), None);
        book.put(7, OrderStatus::Paid);
        assert_eq!(book.take(&mut rng), Some((7, OrderStatus::Shipped)));
        book.put(7, OrderStatus::Shipped);
        assert_eq!(book.take(&mut rng), Some((7, OrderStatus::Delivered)));
        book.put(7, OrderStatus::Delivered);
        assert!(book.is_empty());
    }

    #[test]
    fn random_orders_are_valid_per_the_spec() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        for _ in 0..100 {
            let o = random_order(&mut rng, 10);
            let uid = o["user_id"].as_u64().unwrap();
            assert!((1..=10).contains(&uid));
            assert_eq!(o["currency"], "EUR");
            let items = o["items"].as_array().unwrap();
            assert!((1..=3).contains(&items.len()));
            assert!(o["email"].as_str().unwrap().contains('@'));
        }
    }
}
