//! The W3C trace context: a request's `traceparent` is continued into the
//! outbox row it writes (same trace id, order-api's span as the parent),
//! named back in `traceresponse`; a request without one, or with a
//! malformed one, starts a trace of its own.

use outbox_record::trace::TraceParent;
use serde_json::{json, Value};

use crate::common::{new_order, Api, Reply};

const INCOMING: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

async fn post(api: &Api, path: &str, body: &Value, headers: &[(&str, &str)]) -> Reply {
    let mut req = api.http.post(api.url(path)).json(body);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    Reply::read(req.send().await.expect("request")).await
}

/// `(event_type, traceparent, tracestate)` of every outbox row, oldest first.
async fn traces(api: &Api) -> Vec<(String, Option<String>, Option<String>)> {
    let client = api.db.connect().await.expect("db");
    client
        .query(
            "SELECT event_type, traceparent, tracestate FROM outbox ORDER BY id",
            &[],
        )
        .await
        .expect("outbox query")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[tokio::test]
async fn a_callers_trace_is_continued_into_every_outbox_row() {
    let api = Api::start().await;
    let incoming = TraceParent::parse(INCOMING).unwrap();
    let created = post(
        &api,
        "/orders",
        &new_order(42),
        &[
            ("traceparent", INCOMING),
            ("tracestate", "congo=t61rcWkgMzE"),
        ],
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.text);
    let id = created.json()["id"].as_i64().unwrap();
    let paid = post(
        &api,
        &format!("/orders/{id}/status"),
        &json!({"status": "PAID"}),
        &[("traceparent", INCOMING)],
    )
    .await;
    assert_eq!(paid.status, 200, "{}", paid.text);

    let rows = traces(&api).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    for ((event_type, traceparent, _), reply) in rows.iter().zip([&created, &paid]) {
        let written = TraceParent::parse(traceparent.as_deref().expect("a traceparent"))
            .unwrap_or_else(|e| panic!("{event_type}: {e}"));
        assert_eq!(written.trace_id, incoming.trace_id, "{event_type}");
        assert_eq!(written.flags, incoming.flags, "{event_type}");
        // order-api's own span is the parent of what comes next.
        assert_ne!(written.parent_id, incoming.parent_id, "{event_type}");
        assert_eq!(
            reply.header("traceresponse"),
            traceparent.as_deref(),
            "{event_type}"
        );
    }
    assert_eq!(rows[0].2.as_deref(), Some("congo=t61rcWkgMzE"));
    assert_eq!(
        rows[1].2, None,
        "no tracestate was sent with the status change"
    );
    api.stop().await;
}

#[tokio::test]
async fn without_a_valid_traceparent_a_new_trace_starts() {
    let api = Api::start().await;
    let incoming = TraceParent::parse(INCOMING).unwrap();
    let plain = post(&api, "/orders", &new_order(1), &[]).await;
    // Uppercase hex is not a traceparent: not continued, and its tracestate
    // (which belongs to that trace) is dropped with it.
    let malformed = post(
        &api,
        "/orders",
        &new_order(2),
        &[
            ("traceparent", &INCOMING.to_uppercase()),
            ("tracestate", "congo=t61rcWkgMzE"),
        ],
    )
    .await;
    assert_eq!(plain.status, 201, "{}", plain.text);
    assert_eq!(malformed.status, 201, "{}", malformed.text);

    let rows = traces(&api).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    let mut trace_ids = Vec::new();
    for ((_, traceparent, tracestate), reply) in rows.iter().zip([&plain, &malformed]) {
        let written = TraceParent::parse(traceparent.as_deref().expect("a traceparent")).unwrap();
        assert_ne!(written.trace_id, incoming.trace_id);
        assert!(written.is_sampled());
        assert_eq!(tracestate, &None);
        assert_eq!(reply.header("traceresponse"), traceparent.as_deref());
        trace_ids.push(written.trace_id);
    }
    assert_ne!(trace_ids[0], trace_ids[1], "each request is its own trace");

    // Every answer names its trace, errors included.
    let rejected = post(
        &api,
        "/orders",
        &json!({"user_id": 0}),
        &[("traceparent", INCOMING)],
    )
    .await;
    assert_eq!(rejected.status, 422);
    let named =
        TraceParent::parse(rejected.header("traceresponse").expect("traceresponse")).unwrap();
    assert_eq!(named.trace_id, incoming.trace_id);
    api.stop().await;
}
