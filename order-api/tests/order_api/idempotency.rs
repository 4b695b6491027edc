//! `Idempotency-Key` on `POST /orders`: a retry with the same key and
//! request gets the first response and writes nothing; the same key with a
//! different request is 422; keys expire.

use std::time::Duration;

use crate::common::{new_order, Api, Reply};
use serde_json::Value;

async fn post_with_key(api: &Api, key: &str, body: &str) -> Reply {
    Reply::read(
        api.http
            .post(api.url("/orders"))
            .header("content-type", "application/json")
            .header("Idempotency-Key", key)
            .body(body.to_owned())
            .send()
            .await
            .expect("request"),
    )
    .await
}

#[tokio::test]
async fn a_retry_returns_the_first_response_and_writes_nothing() {
    let api = Api::start().await;
    let body = new_order(42).to_string();
    let first = post_with_key(&api, "k-1", &body).await;
    assert_eq!(first.status, 201, "{}", first.text);
    let id = first.json()["id"].as_i64().expect("id");

    // Same request, other formatting and key order: the same request.
    let reordered = r#"{ "items": [{"unit_price_cents": 1999, "quantity": 2, "sku": "A-1"}],
                         "currency": "EUR", "email": "a@b.c", "user_id": 42 }"#;
    for retry_body in [body.as_str(), reordered] {
        let again = post_with_key(&api, "k-1", retry_body).await;
        assert_eq!(again.status, 201);
        assert_eq!(again.text, first.text);
        assert_eq!(again.header("location"), first.header("location"));
        assert_eq!(again.header("content-type"), Some("application/json"));
    }
    // Still the first response after the order moved on.
    assert_eq!(api.set_status(id, "PAID").await.status, 200);
    let later = post_with_key(&api, "k-1", &body).await;
    assert_eq!(later.text, first.text);
    assert_eq!(later.json()["status"], "CREATED");

    assert_eq!(api.count("orders").await, 1);
    assert_eq!(api.count("outbox").await, 2);
    assert_eq!(api.metrics.orders_created.get(), 1);

    // Another key is another order.
    let other = post_with_key(&api, "k-2", &body).await;
    assert_eq!(other.status, 201);
    assert_ne!(other.json()["id"], Value::from(id));
    api.stop().await;
}

#[tokio::test]
async fn the_same_key_with_another_request_is_422() {
    let api = Api::start().await;
    let first = post_with_key(&api, "k", &new_order(1).to_string()).await;
    assert_eq!(first.status, 201);
    let p = post_with_key(&api, "k", &new_order(2).to_string())
        .await
        .problem(422);
    assert_eq!(p["type"], "urn:order-api:problem:idempotency-key-reused");
    assert_eq!(api.count("orders").await, 1);
    assert_eq!(api.count("outbox").await, 1);
    api.stop().await;
}

#[tokio::test]
async fn invalid_keys_are_422_and_failed_requests_do_not_use_up_a_key() {
    let api = Api::start().await;
    let body = new_order(1).to_string();
    for key in ["", &"k".repeat(256), "has space"] {
        let p = post_with_key(&api, key, &body).await.problem(422);
        assert_eq!(p["field"], "Idempotency-Key", "{key:?}");
    }
    // An invalid body with a key stores nothing under it.
    let mut invalid = new_order(1);
    invalid["currency"] = "euro".into();
    post_with_key(&api, "k", &invalid.to_string())
        .await
        .problem(422);
    assert_eq!(api.count("idempotency_keys").await, 0);

    // A failed transaction rolls the key back with the order.
    let client = api.db.connect().await.expect("db");
    client
        .batch_execute("ALTER TABLE outbox ADD CONSTRAINT t CHECK (event_type = 'x') NOT VALID")
        .await
        .expect("constraint");
    post_with_key(&api, "k", &body).await.problem(500);
    assert_eq!(api.count("idempotency_keys").await, 0);
    client
        .batch_execute("ALTER TABLE outbox DROP CONSTRAINT t")
        .await
        .expect("drop");
    assert_eq!(post_with_key(&api, "k", &body).await.status, 201);
    assert_eq!(api.count("orders").await, 1);
    api.stop().await;
}

#[tokio::test]
async fn keys_expire() {
    let api = Api::start_with(|c| c.idempotency_ttl = Duration::from_secs(1)).await;
    let first = post_with_key(&api, "k", &new_order(1).to_string()).await;
    assert_eq!(first.status, 201);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Expired: the key is free again, even for another request.
    let second = post_with_key(&api, "k", &new_order(2).to_string()).await;
    assert_eq!(second.status, 201, "{}", second.text);
    assert_ne!(second.json()["id"], first.json()["id"]);
    assert_eq!(api.count("orders").await, 2);
    // And expired keys are deleted in the background.
    let client = api.db.connect().await.expect("db");
    devstack::testing::wait_for(
        "expired keys to be deleted",
        Duration::from_secs(10),
        || {
            let client = &client;
            async move {
                let n: i64 = client
                    .query_one("SELECT count(*) FROM idempotency_keys", &[])
                    .await?
                    .get(0);
                Ok((n == 0).then_some(()))
            }
        },
    )
    .await
    .expect("keys deleted");
    api.stop().await;
}
