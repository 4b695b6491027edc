//! Concurrent writes: status changes of one order serialise on its row
//! lock; retries of one Idempotency-Key make one order.

use crate::common::{new_order, Api, Reply};
use futures_util::future::join_all;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_pays_give_one_200_and_one_event() {
    let api = Api::start().await;
    let id = api.create_order(1).await["id"].as_i64().expect("id");
    let url = api.url(&format!("/orders/{id}/status"));
    let replies = join_all((0..50).map(|_| {
        let http = api.http.clone();
        let url = url.clone();
        async move {
            Reply::read(
                http.post(url)
                    .json(&json!({"status": "PAID"}))
                    .send()
                    .await
                    .expect("request"),
            )
            .await
        }
    }))
    .await;
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let conflicts = replies.iter().filter(|r| r.status == 409).count();
    assert_eq!(
        (ok, conflicts),
        (1, 49),
        "{:?}",
        replies.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    for r in replies.iter().filter(|r| r.status == 409) {
        r.problem(409);
    }
    let events: Vec<_> = api
        .outbox()
        .await
        .into_iter()
        .filter(|(t, _)| t == "OrderStatusChanged")
        .collect();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].1["from"], "CREATED");
    assert_eq!(events[0].1["to"], "PAID");
    assert_eq!(
        api.get(&format!("/orders/{id}")).await.json()["status"],
        "PAID"
    );
    api.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_retries_of_one_key_make_one_order() {
    let api = Api::start().await;
    let url = api.url("/orders");
    let replies = join_all((0..20).map(|_| {
        let http = api.http.clone();
        let url = url.clone();
        async move {
            Reply::read(
                http.post(url)
                    .header("Idempotency-Key", "concurrent-retry-1")
                    .json(&new_order(77))
                    .send()
                    .await
                    .expect("request"),
            )
            .await
        }
    }))
    .await;
    let first = &replies[0];
    assert_eq!(first.status, 201, "{}", first.text);
    for r in &replies {
        assert_eq!(r.status, first.status);
        assert_eq!(r.text, first.text);
        assert_eq!(r.header("location"), first.header("location"));
    }
    assert_eq!(api.count("orders").await, 1);
    assert_eq!(api.count("outbox").await, 1);
    assert_eq!(api.count("idempotency_keys").await, 1);
    assert_eq!(api.metrics.orders_created.get(), 1);
    api.stop().await;
}
