//! Every route and every error class of order-api, against the real
//! Postgres of the test stack (one fresh database per test).

use std::time::{Duration, Instant};

use crate::common::{new_order, Api};
use serde_json::{json, Value};

#[tokio::test]
async fn create_answers_201_with_location_and_commits_an_outbox_event() {
    let api = Api::start().await;
    let r = api.post_json("/orders", &new_order(42)).await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let order = r.json();
    let id = order["id"].as_i64().expect("id");
    assert_eq!(r.header("location"), Some(format!("/orders/{id}").as_str()));
    assert_eq!(order["user_id"], 42);
    assert_eq!(order["email"], "a@b.c");
    assert_eq!(order["status"], "CREATED");
    assert_eq!(order["currency"], "EUR");
    assert_eq!(order["total_cents"], 3998);
    assert_eq!(
        order["items"],
        json!([{"sku": "A-1", "quantity": 2, "unit_price_cents": 1999}])
    );
    assert!(order["created_at"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));
    assert_eq!(order["created_at"], order["updated_at"]);

    let got = api.get(&format!("/orders/{id}")).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.json(), order);

    let client = api.db.connect().await.expect("db");
    let rows = client
        .query(
            "SELECT aggregate_type, aggregate_id, user_id, event_type, payload FROM outbox",
            &[],
        )
        .await
        .expect("outbox");
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row.get::<_, String>(0), "order");
    assert_eq!(row.get::<_, String>(1), id.to_string());
    assert_eq!(row.get::<_, i64>(2), 42);
    assert_eq!(row.get::<_, String>(3), "OrderCreated");
    let payload: Value = row.get(4);
    assert_eq!(payload["order_id"], id);
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
        assert_eq!(payload[field], order[field], "payload {field}");
    }
    assert_eq!(api.metrics.orders_created.get(), 1);
    api.stop().await;
}

#[tokio::test]
async fn unknown_orders_are_404() {
    let api = Api::start().await;
    for path in [
        "/orders/999999",
        "/orders/0",
        "/orders/-1",
        "/orders/abc",
        "/orders/1.5",
        "/orders/99999999999999999999",
    ] {
        let p = api.get(path).await.problem(404);
        assert_eq!(p["type"], "urn:order-api:problem:not-found", "{path}");
    }
    let p = api.set_status(424242, "PAID").await.problem(404);
    assert!(p["detail"].as_str().unwrap_or("").contains("424242"), "{p}");
    api.get("/nowhere").await.problem(404);
    api.stop().await;
}

#[tokio::test]
async fn list_pages_with_keyset_pagination() {
    let api = Api::start().await;
    let mut mine = Vec::new();
    for i in 0..5 {
        mine.push(api.create_order(7).await["id"].as_i64().expect("id"));
        if i % 2 == 0 {
            api.create_order(8).await;
        }
    }
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let page = api
            .get(&format!("/orders?user_id=7&limit=2&after={after}"))
            .await;
        assert_eq!(page.status, 200, "{}", page.text);
        let page = page.json();
        let orders = page["orders"].as_array().expect("orders").clone();
        assert!(orders.len() <= 2);
        seen.extend(orders.iter().map(|o| {
            assert_eq!(o["user_id"], 7);
            o["id"].as_i64().expect("id")
        }));
        match page["next_after"].as_i64() {
            Some(next) => after = next,
            None => break,
        }
    }
    assert_eq!(seen, mine);

    // A full last page says there is no next one.
    let exact = api.get("/orders?user_id=8&limit=3").await.json();
    assert_eq!(exact["orders"].as_array().map(Vec::len), Some(3));
    assert_eq!(exact["next_after"], Value::Null);
    let all = api.get("/orders").await.json();
    assert_eq!(all["orders"].as_array().map(Vec::len), Some(8));
    assert_eq!(all["next_after"], Value::Null);
    let none = api.get("/orders?user_id=9").await.json();
    assert_eq!(none, json!({"orders": [], "next_after": null}));

    for (query, field) in [
        ("user_id=0", "user_id"),
        ("user_id=x", "user_id"),
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("after=-1", "after"),
        ("userid=7", "userid"),
        ("user_id=7&user_id=8", "user_id"),
    ] {
        let p = api.get(&format!("/orders?{query}")).await.problem(422);
        assert_eq!(p["field"], field, "{query}: {p}");
    }
    api.stop().await;
}

/// The order's status after a path of legal changes.
fn path_to(status: &str) -> &'static [&'static str] {
    match status {
        "CREATED" => &[],
        "PAID" => &["PAID"],
        "SHIPPED" => &["PAID", "SHIPPED"],
        "DELIVERED" => &["PAID", "SHIPPED", "DELIVERED"],
        "CANCELLED" => &["CANCELLED"],
        other => panic!("{other}"),
    }
}

#[tokio::test]
async fn every_legal_and_illegal_transition() {
    let api = Api::start().await;
    let all = ["CREATED", "PAID", "SHIPPED", "DELIVERED", "CANCELLED"];
    let legal = [
        ("CREATED", "PAID"),
        ("PAID", "SHIPPED"),
        ("SHIPPED", "DELIVERED"),
        ("CREATED", "CANCELLED"),
        ("PAID", "CANCELLED"),
    ];
    for from in all {
        for to in all {
            let order = api.create_order(1).await;
            let id = order["id"].as_i64().expect("id");
            for step in path_to(from) {
                assert_eq!(api.set_status(id, step).await.status, 200);
            }
            let events_before = api.count("outbox").await;
            let r = api.set_status(id, to).await;
            let now = api.get(&format!("/orders/{id}")).await.json();
            if legal.contains(&(from, to)) {
                assert_eq!(r.status, 200, "{from}→{to}: {}", r.text);
                let changed = r.json();
                assert_eq!(changed["status"], to);
                assert_eq!(changed, now);
                assert!(changed["updated_at"].as_str() > order["updated_at"].as_str());
                let outbox = api.outbox().await;
                let (event_type, payload) = outbox.last().expect("event");
                assert_eq!(event_type, "OrderStatusChanged");
                assert_eq!(payload["from"], from);
                assert_eq!(payload["to"], to);
                assert_eq!(payload["order_id"], id);
                assert_eq!(payload["status"], to);
                assert_eq!(payload["email"], "a@b.c");
                assert_eq!(api.count("outbox").await, events_before + 1);
            } else {
                let p = r.problem(409);
                assert_eq!(p["type"], "urn:order-api:problem:illegal-transition");
                assert_eq!(
                    p["detail"],
                    format!("order {id} is {from} and cannot become {to}")
                );
                assert_eq!(now["status"], from, "{from}→{to} changed the order");
                assert_eq!(api.count("outbox").await, events_before, "{from}→{to}");
            }
        }
    }
    api.stop().await;
}

#[tokio::test]
async fn invalid_fields_are_422_naming_the_field() {
    let api = Api::start().await;
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"email": "a@b.c", "currency": "EUR", "items": [{"sku": "A", "quantity": 1, "unit_price_cents": 1}]}),
            "user_id",
        ),
        (
            json!({"user_id": -5, "email": "a@b.c", "currency": "EUR", "items": [{"sku": "A", "quantity": 1, "unit_price_cents": 1}]}),
            "user_id",
        ),
        (
            json!({"user_id": "42", "email": "a@b.c", "currency": "EUR", "items": [{"sku": "A", "quantity": 1, "unit_price_cents": 1}]}),
            "user_id",
        ),
        (
            json!({"user_id": 1.5, "email": "a@b.c", "currency": "EUR", "items": [{"sku": "A", "quantity": 1, "unit_price_cents": 1}]}),
            "user_id",
        ),
        (
            json!({"user_id": 1, "email": "not-an-email", "currency": "EUR", "items": [{"sku": "A", "quantity": 1, "unit_price_cents": 1}]}),
            "email",
        ),
        (
            json!({"user_id": 1, "email": "a@b", "currency": "EUR", "items": [{"sku": "A", "quantity": 1, "unit_price_cents": 1}]}),
            "email",
        ),
        (
            json!({"user_id": 1, "email": format!("{}@b.c", "x".repeat(300)), "currency": "EUR", "items": [{"sku": "A", "quantity": 1, "unit_price_cents": 1}]}),
            "email",
        ),
        (
            json!({"user_id": 1, "email": "a@b.c", "currency": "EURO", "items": [{"sku": "A", "quantity": 1, "unit_price_cents": 1}]}),
            "currency",
        ),
        (
            json!({"user_id": 1, "email": "a@b.c", "currency": "eur", "items": [{"sku": "A", "quantity": 1, "unit_price_cents": 1}]}),
            "currency",
        ),
        (
            json!({"user_id": 1, "email": "a@b.c", "currency": "EUR", "items": []}),
            "items",
        ),
        (
            json!({"user_id": 1, "email": "a@b.c", "currency": "EUR", "items": {}}),
            "items",
        ),
        (
            json!({"user_id": 1, "email": "a@b.c", "currency": "EUR", "items": vec![json!({"sku": "A", "quantity": 1, "unit_price_cents": 1}); 101]}),
            "items",
        ),
        (
            json!({"user_id": 1, "email": "a@b.c", "currency": "EUR", "items": [{"sku": "", "quantity": 1, "unit_price_cents": 1}]}),
            "items[0].sku",
        ),
        (
            json!({"user_id": 1, "email": "a@b.c", "currency": "EUR", "items": [{"sku": "A\u{0}", "quantity": 1, "unit_price_cents": 1}]}),
            "items[0].sku",
        ),
        (
            json!({"user_id": 1, "email": "a@b.c", "currency": "EUR", "items": [{"sku": "A", "quantity": 0, "unit_price_cents": 1}]}),
            "items[0].quantity",
        ),
        (
            json!({"user_id": 1, "email": "a@b.c", "currency": "EUR", "items": [{"sku": "A", "quantity": 1, "unit_price_cents": 1}, {"sku": "B", "quantity": 10001, "unit_price_cents": 1}]}),
            "items[1].quantity",
        ),
        (
            json!({"user_id": 1, "email": "a@b.c", "currency": "EUR", "items": [{"sku": "A", "quantity": 1, "unit_price_cents": -1}]}),
            "items[0].unit_price_cents",
        ),
        (
            json!({"user_id": 1, "email": "a@b.c", "currency": "EUR", "items": [{"sku": "A", "quantity": 1}]}),
            "items[0].unit_price_cents",
        ),
        (
            json!({"user_id": 1, "email": "a@b.c", "currency": "EUR", "items": [{"sku": "A", "quantity": 10000, "unit_price_cents": i64::MAX}]}),
            "items",
        ),
        (
            json!({"user_id": 1, "email": "a@b.c", "currency": "EUR", "items": [
            {"sku": "A", "quantity": 2, "unit_price_cents": i64::MAX / 4},
            {"sku": "B", "quantity": 2, "unit_price_cents": i64::MAX / 4},
            {"sku": "C", "quantity": 1, "unit_price_cents": i64::MAX / 4}]}),
            "items",
        ),
        (json!([1, 2, 3]), ""),
        (json!("order"), ""),
    ];
    for (body, field) in cases {
        let r = api.post_json("/orders", &body).await;
        let p = r.problem(422);
        assert_eq!(p["field"], field, "{body}: {p}");
        assert_eq!(p["type"], "urn:order-api:problem:invalid-field");
        assert!(p["errors"].as_array().is_some_and(|e| !e.is_empty()));
    }
    // Every failing field is listed.
    let p = api.post_json("/orders", &json!({})).await.problem(422);
    let fields: Vec<&str> = p["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .filter_map(|e| e["field"].as_str())
        .collect();
    assert_eq!(fields, ["user_id", "email", "currency", "items"]);

    for (body, field) in [
        (json!({}), "status"),
        (json!({"status": "paid"}), "status"),
        (json!({"status": 1}), "status"),
        (json!(["PAID"]), ""),
    ] {
        let id = api.create_order(1).await["id"].as_i64().expect("id");
        let p = api
            .post_json(&format!("/orders/{id}/status"), &body)
            .await
            .problem(422);
        assert_eq!(p["field"], field, "{body}");
    }
    assert_eq!(api.count("orders").await, 4);
    assert_eq!(api.count("outbox").await, 4);
    api.stop().await;
}

#[tokio::test]
async fn malformed_json_wrong_type_and_oversized_bodies() {
    let api = Api::start_with(|c| c.body_limit = 4096).await;
    let id = api.create_order(1).await["id"].as_i64().expect("id");
    for path in ["/orders".to_owned(), format!("/orders/{id}/status")] {
        for body in [
            "",
            "{",
            "{\"user_id\": 1,}",
            "nul",
            "{} x",
            "\u{feff}{}",
            "[1, 2",
        ] {
            let resp = api
                .http
                .post(api.url(&path))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .expect("request");
            let p = crate::common::Reply::read(resp).await.problem(400);
            assert_eq!(
                p["type"], "urn:order-api:problem:malformed-json",
                "{body:?}"
            );
        }
        let deep = format!("{}{}", "[".repeat(10_00), "]".repeat(10_00));
        let resp = api
            .http
            .post(api.url(&path))
            .header("content-type", "application/json")
            .body(deep)
            .send()
            .await
            .expect("request");
        crate::common::Reply::read(resp).await.problem(400);

        for ct in [
            Some("text/plain"),
            Some("application/x-www-form-urlencoded"),
            None,
        ] {
            let mut req = api.http.post(api.url(&path)).body(new_order(1).to_string());
            if let Some(ct) = ct {
                req = req.header("content-type", ct);
            }
            let r = crate::common::Reply::read(req.send().await.expect("request")).await;
            r.problem(415);
        }
        let big = json!({"user_id": 1, "email": "a@b.c", "currency": "EUR",
                         "items": [{"sku": "x".repeat(10_000), "quantity": 1, "unit_price_cents": 1}]});
        let p = api.post_json(&path, &big).await.problem(413);
        assert!(p["detail"].as_str().unwrap_or("").contains("4096"), "{p}");
    }
    // Charset parameters and +json types are JSON too.
    let resp = api
        .http
        .post(api.url("/orders"))
        .header("content-type", "application/json; charset=utf-8")
        .body(new_order(1).to_string())
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 201);
    assert_eq!(api.count("orders").await, 2);
    api.stop().await;
}

#[tokio::test]
async fn unsupported_methods_are_405() {
    let api = Api::start().await;
    let resp = api
        .http
        .delete(api.url("/orders/1"))
        .send()
        .await
        .expect("request");
    crate::common::Reply::read(resp).await.problem(405);
    let resp = api
        .http
        .put(api.url("/orders"))
        .send()
        .await
        .expect("request");
    crate::common::Reply::read(resp).await.problem(405);
    api.stop().await;
}

#[tokio::test]
async fn a_failing_outbox_insert_rolls_the_order_back() {
    let api = Api::start().await;
    let order = api.create_order(3).await;
    let id = order["id"].as_i64().expect("id");
    let client = api.db.connect().await.expect("db");

    // Creation: the outbox refuses OrderCreated, so no order may remain.
    client
        .batch_execute(
            "ALTER TABLE outbox ADD CONSTRAINT test_no_created CHECK (event_type <> 'OrderCreated') NOT VALID",
        )
        .await
        .expect("constraint");
    let r = api.post_json("/orders", &new_order(3)).await;
    let p = r.problem(500);
    assert_eq!(p["type"], "urn:order-api:problem:internal");
    assert!(
        !r.text.contains("test_no_created"),
        "database detail leaked: {}",
        r.text
    );
    assert_eq!(api.count("orders").await, 1);
    assert_eq!(api.count("outbox").await, 1);

    // Status change: the outbox refuses OrderStatusChanged, so the status stays.
    client
        .batch_execute(
            "ALTER TABLE outbox DROP CONSTRAINT test_no_created; \
             ALTER TABLE outbox ADD CONSTRAINT test_no_changed CHECK (event_type <> 'OrderStatusChanged') NOT VALID",
        )
        .await
        .expect("constraint");
    api.set_status(id, "PAID").await.problem(500);
    let now = api.get(&format!("/orders/{id}")).await.json();
    assert_eq!(now, order, "the order changed without its event");

    // With the outbox healthy again, both work.
    client
        .batch_execute("ALTER TABLE outbox DROP CONSTRAINT test_no_changed")
        .await
        .expect("drop");
    assert_eq!(api.set_status(id, "PAID").await.status, 200);
    api.create_order(3).await;
    assert_eq!(api.count("orders").await, 2);
    assert_eq!(api.count("outbox").await, 3);
    api.stop().await;
}

#[tokio::test]
async fn database_down_is_503_with_retry_after_not_a_hang() {
    // Nothing listens on port 1.
    let api = Api::start_with(|c| {
        c.database_url = "postgres://nobody:pw@127.0.0.1:1/nothing".into();
        c.pool_timeout = Duration::from_secs(2);
    })
    .await;
    let started = Instant::now();
    let r = api.post_json("/orders", &new_order(1)).await;
    let p = r.problem(503);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(p["type"], "urn:order-api:problem:database-unavailable");
    for path in ["/orders/1", "/orders?user_id=1", "/readyz"] {
        let r = api.get(path).await;
        r.problem(503);
        assert_eq!(r.header("retry-after"), Some("1"), "{path}");
    }
    api.set_status(1, "PAID").await.problem(503);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let health = api.get("/healthz").await;
    assert_eq!(health.status, 200);
    api.stop().await;
}

#[tokio::test]
async fn a_postgres_that_requires_verified_tls_is_served() {
    let api = Api::start_with(|c| {
        c.database_url = devstack::testing::verify_full_url(&c.database_url);
    })
    .await;
    let created = api.post_json("/orders", &new_order(7)).await;
    assert_eq!(created.status, 201, "{}", created.text);
    let admin = devstack::testing::connect(&devstack::testing::admin_url())
        .await
        .expect("admin");
    let row = admin
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE s.ssl) FROM pg_stat_activity a \
             JOIN pg_stat_ssl s USING (pid) WHERE a.datname = $1 AND a.application_name = 'order-api'",
            &[&api.db.name],
        )
        .await
        .expect("pg_stat_ssl");
    let (connections, encrypted): (i64, i64) = (row.get(0), row.get(1));
    assert!(connections >= 1, "no order-api connection");
    assert_eq!(encrypted, connections, "every connection encrypted");
    api.stop().await;

    // Postgres's certificate checked against a CA that did not sign it:
    // nothing is written, and the service says it is not ready.
    let other_ca = devstack::testing::another_ca().expect("CA");
    let api = Api::start_with(|c| {
        c.database_url = format!(
            "{}?sslmode=verify-full&sslrootcert={other_ca}",
            c.database_url
        );
        c.pool_timeout = Duration::from_secs(2);
    })
    .await;
    api.post_json("/orders", &new_order(8)).await.problem(503);
    api.get("/readyz").await.problem(503);
    assert_eq!(api.count("orders").await, 0);
    api.stop().await;
}

#[tokio::test]
async fn killed_connections_are_503_or_retried_never_500() {
    let api = Api::start().await;
    let id = api.create_order(1).await["id"].as_i64().expect("id");
    let admin = devstack::testing::connect(&devstack::testing::admin_url())
        .await
        .expect("admin");
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND application_name = 'order-api'",
            &[&api.db.name],
        )
        .await
        .expect("terminate");
    for _ in 0..20 {
        let r = api.get(&format!("/orders/{id}")).await;
        assert!(
            r.status == 200 || r.status == 503,
            "{} {}",
            r.status,
            r.text
        );
    }
    // Broken connections are replaced: the service recovers.
    let r = api.get(&format!("/orders/{id}")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    api.stop().await;
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let api = Api::start().await;
    let r = api.get("/healthz").await;
    assert_eq!((r.status, r.text.as_str()), (200, "ok\n"));
    let r = api.get("/readyz").await;
    assert_eq!((r.status, r.text.as_str()), (200, "ready\n"));
    let id = api.create_order(5).await["id"].as_i64().expect("id");
    api.get(&format!("/orders/{id}")).await;
    api.get("/orders/999999").await;
    api.get("/no/such/path").await;
    let m = api.get("/metrics").await;
    assert_eq!(m.status, 200);
    assert!(m
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/plain")));
    let text = m.text;
    for line in [
        "http_requests_total{method=\"POST\",route=\"/orders\",status=\"201\"} 1",
        "http_requests_total{method=\"GET\",route=\"/orders/{id}\",status=\"200\"} 1",
        "http_requests_total{method=\"GET\",route=\"/orders/{id}\",status=\"404\"} 1",
        "http_requests_total{method=\"GET\",route=\"unmatched\",status=\"404\"} 1",
        "orders_created_total 1",
        "# TYPE http_request_duration_seconds histogram",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    assert!(
        text.contains(
            "http_request_duration_seconds_count{method=\"GET\",route=\"/orders/{id}\"} 2"
        ),
        "{text}"
    );
    assert!(
        !text.contains(&format!("/orders/{id}\"")),
        "raw path as a label:\n{text}"
    );
    assert!(!text.contains("/no/such/path"), "{text}");
    api.stop().await;
}

#[tokio::test]
async fn openapi_documents_every_route_and_only_those() {
    let api = Api::start().await;
    let r = api.get("/openapi.json").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let doc = r.json();
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
    let paths = doc["paths"].as_object().expect("paths");
    let routes = order_api::http::route_table();
    for (path, method, _) in &routes {
        let method = method.as_str().to_ascii_lowercase();
        assert!(
            paths.get(*path).and_then(|p| p.get(&method)).is_some(),
            "{method} {path} is routed but not in openapi.json"
        );
    }
    for (path, ops) in paths {
        for method in ops.as_object().expect("operations").keys() {
            assert!(
                routes
                    .iter()
                    .any(|(p, m, _)| p == path && m.as_str().eq_ignore_ascii_case(method)),
                "{method} {path} is documented but not routed"
            );
        }
    }
    api.stop().await;
}

/// Waits until a session of `db` waits on a lock.
async fn wait_for_lock_waiter(db: &devstack::testing::TestDb) {
    let client = db.connect().await.expect("db");
    devstack::testing::wait_for(
        "a request waiting on the row lock",
        Duration::from_secs(10),
        || {
            let client = &client;
            async move {
                let n: i64 = client
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                        &[],
                    )
                    .await?
                    .get(0);
                Ok((n > 0).then_some(()))
            }
        },
    )
    .await
    .expect("lock waiter");
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish() {
    let api = Api::start().await;
    let id = api.create_order(1).await["id"].as_i64().expect("id");
    let mut locker = api.db.connect().await.expect("db");
    let tx = locker.transaction().await.expect("tx");
    tx.execute("SELECT 1 FROM orders WHERE id = $1 FOR UPDATE", &[&id])
        .await
        .expect("lock");
    let in_flight = {
        let http = api.http.clone();
        let url = api.url(&format!("/orders/{id}/status"));
        tokio::spawn(async move {
            crate::common::Reply::read(
                http.post(url)
                    .json(&json!({"status": "PAID"}))
                    .send()
                    .await
                    .expect("request"),
            )
            .await
        })
    };
    wait_for_lock_waiter(&api.db).await;
    api.shutdown_token().cancel();
    // New connections are refused once the server stopped accepting.
    devstack::testing::wait_for("the listener to close", Duration::from_secs(5), || {
        let addr = api.addr;
        async move {
            Ok(tokio::net::TcpStream::connect(addr)
                .await
                .is_err()
                .then_some(()))
        }
    })
    .await
    .expect("listener closed");
    tx.commit().await.expect("release");
    let r = in_flight.await.expect("task");
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["status"], "PAID");
    api.stop().await;
}

#[tokio::test]
async fn a_request_over_the_timeout_is_503_and_rolled_back() {
    let api = Api::start_with(|c| c.request_timeout = Duration::from_secs(2)).await;
    let id = api.create_order(1).await["id"].as_i64().expect("id");
    let mut locker = api.db.connect().await.expect("db");
    let tx = locker.transaction().await.expect("tx");
    tx.execute("SELECT 1 FROM orders WHERE id = $1 FOR UPDATE", &[&id])
        .await
        .expect("lock");
    let started = Instant::now();
    let r = api.set_status(id, "PAID").await;
    let p = r.problem(503);
    assert_eq!(p["type"], "urn:order-api:problem:timeout");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(started.elapsed() < Duration::from_secs(6));
    tx.commit().await.expect("release");
    // The abandoned change did not happen, and the order can still change.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        api.get(&format!("/orders/{id}")).await.json()["status"],
        "CREATED"
    );
    assert_eq!(api.count("outbox").await, 1);
    assert_eq!(api.set_status(id, "PAID").await.status, 200);
    assert_eq!(api.count("outbox").await, 2);
    api.stop().await;
}
