//! `--outbox-mode` (issue #18): in `message` mode each event is a
//! transactional logical decoding message (prefix `outbox`, content the
//! outbox row's fields as JSON) and the `outbox` table gets no row; `table`
//! mode writes rows and no message. What a relay would read is checked in
//! the WAL itself, through a `test_decoding` slot created before the
//! requests.

use std::process::Command;

use chrono::{DateTime, FixedOffset};
use clap::Parser;
use devstack::cluster::PgCluster;
use order_api::config::Config;
use order_api::store::StoreError;
use outbox_record::trace::TraceParent;
use serde_json::{json, Value};
use tokio_postgres::Client;

use crate::common::{new_order, Api, Reply};

const INCOMING: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACESTATE: &str = "congo=t61rcWkgMzE";

fn message_mode(cfg: &mut Config) {
    cfg.outbox_mode = order_api::config::OutboxMode::Message;
}

async fn post(api: &Api, path: &str, body: &Value, headers: &[(&str, &str)]) -> Reply {
    let mut req = api.http.post(api.url(path)).json(body);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    Reply::read(req.send().await.expect("request")).await
}

/// A temporary `test_decoding` slot on the test's database: it decodes
/// every change committed after its creation, as a relay's slot would.
/// Temporary, so it goes with its connection even if the test fails.
struct Wal {
    client: Client,
    slot: String,
}

impl Wal {
    async fn watch(api: &Api) -> Wal {
        let client = api.db.connect().await.expect("db");
        let slot = api.db.slot_name();
        client
            .query_one(
                "SELECT pg_create_logical_replication_slot($1, 'test_decoding', true)",
                &[&slot],
            )
            .await
            .expect("creating the slot");
        Wal { client, slot }
    }

    /// Every change decoded since the slot was created, as `test_decoding`
    /// prints it; then drops the slot (it holds WAL back).
    async fn read_and_drop(self) -> Vec<String> {
        let changes = self
            .client
            .query(
                "SELECT data FROM pg_logical_slot_get_changes($1, NULL, NULL)",
                &[&self.slot],
            )
            .await
            .expect("reading the slot")
            .iter()
            .map(|r| r.get(0))
            .collect();
        self.client
            .execute("SELECT pg_drop_replication_slot($1)", &[&self.slot])
            .await
            .expect("dropping the slot");
        changes
    }
}

/// A logical decoding message as `test_decoding` prints it:
/// `message: transactional: 1 prefix: outbox, sz: 42 content:{...}`.
#[derive(Debug)]
struct Message {
    transactional: bool,
    prefix: String,
    content: String,
}

fn messages(changes: &[String]) -> Vec<Message> {
    changes
        .iter()
        .filter_map(|line| {
            let rest = line.strip_prefix("message: transactional: ")?;
            let (transactional, rest) = rest.split_once(" prefix: ")?;
            let (prefix, rest) = rest.split_once(", sz: ")?;
            let (size, content) = rest.split_once(" content:")?;
            assert_eq!(size.parse::<usize>().ok(), Some(content.len()), "{line}");
            Some(Message {
                transactional: transactional == "1",
                prefix: prefix.to_owned(),
                content: content.to_owned(),
            })
        })
        .collect()
}

/// The contents of the `outbox` messages, which must all be transactional.
fn outbox_events(changes: &[String]) -> Vec<Value> {
    messages(changes)
        .into_iter()
        .filter(|m| m.prefix == "outbox")
        .map(|m| {
            assert!(m.transactional, "{m:?}");
            serde_json::from_str(&m.content).unwrap_or_else(|e| panic!("{e}: {}", m.content))
        })
        .collect()
}

fn table_inserts(changes: &[String]) -> usize {
    changes
        .iter()
        .filter(|c| c.starts_with("table public.outbox: INSERT:"))
        .count()
}

/// The payload table mode writes for `order` (as the API returned it).
fn payload_of(order: &Value, change: Option<(&str, &str)>) -> Value {
    let mut p = json!({ "order_id": order["id"] });
    for field in [
        "user_id",
        "email",
        "status",
        "items",
        "total_cents",
        "currency",
        "created_at",
        "updated_at",
    ] {
        p[field] = order[field].clone();
    }
    if let Some((from, to)) = change {
        p["from"] = json!(from);
        p["to"] = json!(to);
    }
    p
}

fn timestamp(v: &Value) -> DateTime<FixedOffset> {
    let s = v.as_str().unwrap_or_else(|| panic!("not a timestamp: {v}"));
    DateTime::parse_from_rfc3339(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

#[tokio::test]
async fn message_mode_emits_each_event_as_a_transactional_message_and_writes_no_row() {
    let api = Api::start_with(message_mode).await;
    let wal = Wal::watch(&api).await;
    let incoming = TraceParent::parse(INCOMING).expect("traceparent");

    let created = post(
        &api,
        "/orders",
        &new_order(42),
        &[("traceparent", INCOMING), ("tracestate", TRACESTATE)],
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.text);
    let order = created.json();
    let id = order["id"].as_i64().expect("id");
    let paid = post(
        &api,
        &format!("/orders/{id}/status"),
        &json!({"status": "PAID"}),
        &[("traceparent", INCOMING)],
    )
    .await;
    assert_eq!(paid.status, 200, "{}", paid.text);
    let changed = paid.json();

    let changes = wal.read_and_drop().await;
    let events = outbox_events(&changes);
    assert_eq!(messages(&changes).len(), 2, "{changes:#?}");
    assert_eq!(events.len(), 2, "{changes:#?}");
    assert_eq!(table_inserts(&changes), 0, "{changes:#?}");
    assert_eq!(api.count("outbox").await, 0);

    let expected = [
        (
            "OrderCreated",
            payload_of(&order, None),
            &created,
            Some(TRACESTATE),
        ),
        (
            "OrderStatusChanged",
            payload_of(&changed, Some(("CREATED", "PAID"))),
            &paid,
            None,
        ),
    ];
    for (event, (event_type, payload, reply, tracestate)) in events.iter().zip(&expected) {
        let mut keys: Vec<&str> = event
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "aggregate_id",
                "aggregate_type",
                "created_at",
                "event_type",
                "id",
                "payload",
                "traceparent",
                "tracestate",
                "user_id"
            ],
            "{event}"
        );
        assert_eq!(event["aggregate_type"], "order", "{event}");
        assert_eq!(event["aggregate_id"], id.to_string(), "{event}");
        assert_eq!(event["user_id"], 42, "{event}");
        assert_eq!(event["event_type"], *event_type, "{event}");
        assert_eq!(&event["payload"], payload, "{event}");
        let traceparent = event["traceparent"].as_str().expect("a traceparent");
        let written = TraceParent::parse(traceparent).expect("a valid traceparent");
        assert_eq!(written.trace_id, incoming.trace_id, "{event}");
        assert_eq!(reply.header("traceresponse"), Some(traceparent));
        assert_eq!(event["tracestate"].as_str(), *tracestate, "{event}");
    }
    // created_at is the transaction's now(): the order's own for the creation.
    assert_eq!(
        timestamp(&events[0]["created_at"]),
        timestamp(&order["created_at"])
    );
    let changed_at = timestamp(&events[1]["created_at"]);
    assert!(changed_at >= timestamp(&order["created_at"]));
    assert!(changed_at <= timestamp(&changed["updated_at"]));

    // Ids come from the outbox table's sequence: distinct, in order, and a
    // row written next continues the same sequence.
    let ids: Vec<i64> = events
        .iter()
        .map(|e| e["id"].as_i64().expect("an integer id"))
        .collect();
    assert_eq!(ids[1], ids[0] + 1, "{ids:?}");
    let client = api.db.connect().await.expect("db");
    let next: i64 = client
        .query_one(
            "INSERT INTO outbox (aggregate_type, aggregate_id, user_id, event_type, payload) \
             VALUES ('order', '0', 1, 'Probe', '{}') RETURNING id",
            &[],
        )
        .await
        .expect("insert")
        .get(0);
    assert_eq!(next, ids[1] + 1);
    api.stop().await;
}

#[tokio::test]
async fn table_mode_writes_rows_and_emits_no_message() {
    let api = Api::start().await;
    let wal = Wal::watch(&api).await;
    let order = api.create_order(42).await;
    let id = order["id"].as_i64().expect("id");
    let paid = api.set_status(id, "PAID").await;
    assert_eq!(paid.status, 200, "{}", paid.text);

    let changes = wal.read_and_drop().await;
    assert!(messages(&changes).is_empty(), "{changes:#?}");
    assert_eq!(table_inserts(&changes), 2, "{changes:#?}");
    let rows = api.outbox().await;
    assert_eq!(
        rows,
        [
            ("OrderCreated".to_owned(), payload_of(&order, None)),
            (
                "OrderStatusChanged".to_owned(),
                payload_of(&paid.json(), Some(("CREATED", "PAID")))
            ),
        ]
    );
    api.stop().await;
}

#[tokio::test]
async fn in_message_mode_a_failed_request_emits_nothing() {
    let api = Api::start_with(message_mode).await;
    // Orders of user 666 fail at COMMIT, after their event was emitted.
    let client = api.db.connect().await.expect("db");
    client
        .batch_execute(
            "CREATE FUNCTION refuse_666() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN IF NEW.user_id = 666 THEN RAISE EXCEPTION 'refused at commit'; END IF; \
             RETURN NULL; END $$; \
             CREATE CONSTRAINT TRIGGER refuse_666 AFTER INSERT ON orders \
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_666();",
        )
        .await
        .expect("trigger");
    let order = api.create_order(42).await;
    let id = order["id"].as_i64().expect("id");
    let wal = Wal::watch(&api).await;

    api.set_status(id, "DELIVERED").await.problem(409);
    api.set_status(id + 1000, "PAID").await.problem(404);
    api.post_json("/orders", &new_order(666)).await.problem(500);
    // What does succeed afterwards is seen: the slot works.
    let paid = api.set_status(id, "PAID").await;
    assert_eq!(paid.status, 200, "{}", paid.text);

    let changes = wal.read_and_drop().await;
    let events = outbox_events(&changes);
    assert_eq!(messages(&changes).len(), 1, "{changes:#?}");
    assert_eq!(events[0]["event_type"], "OrderStatusChanged");
    assert_eq!(events[0]["payload"]["from"], "CREATED");
    assert_eq!(events[0]["payload"]["to"], "PAID");
    assert_eq!(api.count("orders").await, 1);
    api.stop().await;
}

#[tokio::test]
async fn in_message_mode_an_idempotent_retry_emits_one_message() {
    let api = Api::start_with(message_mode).await;
    let wal = Wal::watch(&api).await;
    let body = new_order(42);
    let key = [("Idempotency-Key", "retry-1")];
    let first = post(&api, "/orders", &body, &key).await;
    assert_eq!(first.status, 201, "{}", first.text);
    let again = post(&api, "/orders", &body, &key).await;
    assert_eq!(again.status, 201, "{}", again.text);
    assert_eq!(again.text, first.text);

    let changes = wal.read_and_drop().await;
    let events = outbox_events(&changes);
    assert_eq!(messages(&changes).len(), 1, "{changes:#?}");
    assert_eq!(events[0]["event_type"], "OrderCreated");
    assert_eq!(events[0]["aggregate_id"], first.json()["id"].to_string());
    assert_eq!(api.count("orders").await, 1);
    api.stop().await;
}

#[test]
fn an_unknown_mode_or_an_empty_prefix_is_refused() {
    let parse = |extra: &[&str]| {
        let mut args = vec!["order-api", "--database-url", "postgres://x@h/db"];
        args.extend_from_slice(extra);
        Config::try_parse_from(args)
    };
    let bogus = parse(&["--outbox-mode", "bogus"])
        .expect_err("bogus mode")
        .to_string();
    assert!(bogus.contains("--outbox-mode"), "{bogus}");
    assert!(
        bogus.contains("[possible values: table, message]"),
        "{bogus}"
    );
    let empty = parse(&["--outbox-mode", "message", "--outbox-message-prefix", ""])
        .expect_err("empty prefix")
        .to_string();
    assert!(
        empty.contains("the message prefix must not be empty"),
        "{empty}"
    );
    let custom = parse(&[
        "--outbox-mode",
        "message",
        "--outbox-message-prefix",
        "shop",
    ])
    .expect("parses");
    assert_eq!(
        custom.outbox(),
        order_api::store::Outbox::Message {
            prefix: "shop".into()
        }
    );

    // The same from the environment, as a startup error of the binary.
    let out = Command::new(env!("CARGO_BIN_EXE_order-api"))
        .env("DATABASE_URL", "postgres://x@127.0.0.1:1/db")
        .env("ORDER_API_OUTBOX_MODE", "bogus")
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("[possible values: table, message]"),
        "{stderr}"
    );
}

#[tokio::test]
async fn message_mode_refuses_a_server_without_wal_level_logical() {
    let cluster = PgCluster::start().await.expect("cluster");
    let admin = devstack::testing::connect(&cluster.url("postgres"))
        .await
        .expect("connect");
    admin
        .batch_execute("ALTER SYSTEM SET wal_level = replica")
        .await
        .expect("alter system");
    drop(admin);
    cluster.restart_fast().expect("restart");

    let mut cfg = crate::common::config(&cluster.url("outbox"));
    message_mode(&mut cfg);
    let err = match order_api::bind(cfg).await {
        Ok(_) => panic!("message mode started on wal_level = replica"),
        Err(e) => e,
    };
    assert!(
        matches!(&err, order_api::Error::Outbox(StoreError::WalLevel(level)) if level == "replica"),
        "{err:?}"
    );
    let chain = order_api::error_chain(&err);
    assert!(chain.contains("wal_level = logical"), "{chain}");

    // Table mode does not care.
    let server = order_api::bind(crate::common::config(&cluster.url("outbox")))
        .await
        .expect("table mode starts");
    drop(server);
}
