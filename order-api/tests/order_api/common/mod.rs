//! Test support: an order-api served in-process on 127.0.0.1:0 against a
//! fresh, migrated database of the test stack.

use std::net::SocketAddr;
use std::sync::Arc;

use devstack::testing::TestDb;
use order_api::config::Config;
use order_api::metrics::Metrics;
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub struct Api {
    pub db: TestDb,
    pub addr: SocketAddr,
    pub base: String,
    pub http: reqwest::Client,
    pub metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    server: JoinHandle<Result<(), order_api::Error>>,
}

/// The defaults, listening on an ephemeral port, for `database_url`.
pub fn config(database_url: &str) -> Config {
    let mut cfg = Config::for_database(database_url);
    cfg.listen = "127.0.0.1:0".parse().expect("address");
    // Tests run in parallel on unoptimised builds, where opening a
    // connection (SCRAM) is slow: the 2s default would turn load into 503s.
    cfg.pool_timeout = std::time::Duration::from_secs(10);
    cfg
}

impl Api {
    pub async fn start() -> Api {
        Api::start_with(|_| {}).await
    }

    /// Starts on a fresh database, with `tweak` applied to the config.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Api {
        let db = TestDb::create().await.expect("test database");
        let mut cfg = config(&db.url);
        tweak(&mut cfg);
        let server = order_api::bind(cfg).await.expect("bind");
        let addr = server.local_addr();
        let metrics = server.metrics();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(server.serve(shutdown.clone()));
        Api {
            db,
            addr,
            base: format!("http://{addr}"),
            http: reqwest::Client::new(),
            metrics,
            shutdown,
            server,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Stops the server and waits until it has.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.server
            .await
            .expect("server task")
            .expect("server result");
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Reply {
        let resp = self
            .http
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .expect("request");
        Reply::read(resp).await
    }

    pub async fn get(&self, path: &str) -> Reply {
        let resp = self.http.get(self.url(path)).send().await.expect("request");
        Reply::read(resp).await
    }

    /// Creates the example order for `user_id` and returns its JSON.
    pub async fn create_order(&self, user_id: i64) -> Value {
        let r = self.post_json("/orders", &new_order(user_id)).await;
        assert_eq!(r.status, 201, "{}", r.text);
        r.json()
    }

    pub async fn set_status(&self, id: i64, status: &str) -> Reply {
        self.post_json(
            &format!("/orders/{id}/status"),
            &json!({ "status": status }),
        )
        .await
    }

    /// `(event_type, payload)` of every outbox row, oldest first.
    pub async fn outbox(&self) -> Vec<(String, Value)> {
        let client = self.db.connect().await.expect("db");
        client
            .query("SELECT event_type, payload FROM outbox ORDER BY id", &[])
            .await
            .expect("outbox query")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }

    pub async fn count(&self, table: &str) -> i64 {
        let client = self.db.connect().await.expect("db");
        client
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .expect("count")
            .get(0)
    }
}

/// A response read in full.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
}

impl Reply {
    pub async fn read(resp: reqwest::Response) -> Reply {
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.expect("body");
        Reply {
            status,
            headers,
            text,
        }
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts a problem+json answer with `status`, and returns it.
    pub fn problem(&self, status: u16) -> Value {
        assert_eq!(self.status, status, "{}", self.text);
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "{}",
            self.text
        );
        let p = self.json();
        assert_eq!(p["status"], status, "{p}");
        for k in ["type", "title", "detail"] {
            assert!(p[k].is_string(), "problem without {k}: {p}");
        }
        p
    }
}

/// The SPEC's example order body for `user_id`.
pub fn new_order(user_id: i64) -> Value {
    json!({
        "user_id": user_id,
        "email": "a@b.c",
        "currency": "EUR",
        "items": [{"sku": "A-1", "quantity": 2, "unit_price_cents": 1999}]
    })
}
