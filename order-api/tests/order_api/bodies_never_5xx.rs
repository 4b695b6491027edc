//! Property: no body, however malformed, makes POST /orders or
//! POST /orders/{id}/status answer 5xx; every error is problem+json.

use crate::common::{Api, Reply};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use serde_json::{Map, Number, Value};

const FIELDS: &[&str] = &[
    "user_id",
    "email",
    "currency",
    "items",
    "sku",
    "quantity",
    "unit_price_cents",
    "status",
];

fn arb_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop_oneof![
            Just(0i64),
            Just(1),
            Just(-1),
            Just(10_000),
            Just(10_001),
            Just(i64::MAX),
            Just(i64::MIN)
        ]
        .prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| Number::from_f64(f).map(Value::Number)),
    ]
}

fn arb_string() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,40}",
        "[A-Z]{3}",
        "[a-z]{1,5}@[a-z]{1,5}\\.[a-z]{2}",
        Just("PAID".to_owned()),
        Just("CANCELLED".to_owned()),
        Just("\u{0}".to_owned()),
        Just("x".repeat(300)),
    ]
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        arb_number(),
        arb_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![
                        prop::sample::select(FIELDS).prop_map(str::to_owned),
                        ".{0,8}"
                    ],
                    inner
                ),
                0..8
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A valid order with some fields replaced by arbitrary JSON or removed.
fn arb_near_order() -> impl Strategy<Value = Value> {
    let field = || prop::option::weighted(0.1, arb_json());
    (
        field(),
        field(),
        field(),
        field(),
        field(),
        field(),
        field(),
        any::<u8>(),
    )
        .prop_map(
            |(user_id, email, currency, items, sku, quantity, price, keep)| {
                let mut item = Map::new();
                item.insert("sku".into(), Value::from("A-1"));
                item.insert("quantity".into(), Value::from(2));
                item.insert("unit_price_cents".into(), Value::from(1999));
                for (k, v) in [
                    ("sku", sku),
                    ("quantity", quantity),
                    ("unit_price_cents", price),
                ] {
                    if let Some(v) = v {
                        item.insert(k.into(), v);
                    }
                }
                let mut order = Map::new();
                order.insert("user_id".into(), Value::from(42));
                order.insert("email".into(), Value::from("a@b.c"));
                order.insert("currency".into(), Value::from("EUR"));
                order.insert("items".into(), Value::Array(vec![Value::Object(item)]));
                for (k, v) in [
                    ("user_id", user_id),
                    ("email", email),
                    ("currency", currency),
                    ("items", items),
                ] {
                    if let Some(v) = v {
                        order.insert(k.into(), v);
                    }
                }
                if keep % 5 == 0 {
                    order.remove(FIELDS[usize::from(keep / 5) % 4]);
                }
                Value::Object(order)
            },
        )
}

/// Arbitrary request bodies: JSON values, near-valid orders, raw bytes.
fn arb_body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        arb_json().prop_map(|v| v.to_string().into_bytes()),
        arb_near_order().prop_map(|v| v.to_string().into_bytes()),
        prop::collection::vec(any::<u8>(), 0..512),
        // Status changes, valid or not.
        prop_oneof![
            prop::sample::select(&["CREATED", "PAID", "SHIPPED", "DELIVERED", "CANCELLED"][..])
                .prop_map(Value::from),
            arb_json(),
        ]
        .prop_map(|status| serde_json::json!({ "status": status })
            .to_string()
            .into_bytes()),
        // Valid JSON cut short or with a stray byte.
        (arb_near_order(), any::<prop::sample::Index>(), any::<u8>()).prop_map(|(v, i, b)| {
            let mut bytes = v.to_string().into_bytes();
            let at = i.index(bytes.len() + 1);
            bytes.insert(at.min(bytes.len()), b);
            bytes
        }),
    ]
}

fn check(reply: &Reply, body: &[u8]) -> Result<(), TestCaseError> {
    prop_assert!(
        reply.status < 500,
        "{} for body {:?}: {}",
        reply.status,
        String::from_utf8_lossy(body),
        reply.text
    );
    if reply.status >= 400 {
        prop_assert_eq!(
            reply.header("content-type"),
            Some("application/problem+json")
        );
        prop_assert!(serde_json::from_str::<Value>(&reply.text).is_ok());
    }
    Ok(())
}

fn run_property(path_of: impl Fn(&Api) -> String) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let api = rt.block_on(Api::start());
    let path = path_of(&api);
    let path = if path.is_empty() {
        let id = rt.block_on(api.create_order(1))["id"].as_i64().expect("id");
        format!("/orders/{id}/status")
    } else {
        path
    };
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 1000,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let statuses = std::sync::Mutex::new(std::collections::BTreeMap::<u16, u32>::new());
    let result = runner.run(&arb_body(), |body| {
        let reply = rt.block_on(async {
            Reply::read(
                api.http
                    .post(api.url(&path))
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                    .expect("request"),
            )
            .await
        });
        *statuses
            .lock()
            .expect("not poisoned")
            .entry(reply.status)
            .or_default() += 1;
        check(&reply, &body)
    });
    rt.block_on(api.stop());
    if let Err(e) = result {
        panic!("{e}");
    }
    // The generators reach every answer class, successes included.
    let statuses = statuses.into_inner().expect("not poisoned");
    eprintln!("statuses: {statuses:?}");
    for class in [400, 422] {
        assert!(statuses.contains_key(&class), "no {class} in {statuses:?}");
    }
    assert!(
        statuses.contains_key(&201) || statuses.contains_key(&200),
        "no success in {statuses:?}"
    );
}

#[test]
fn arbitrary_bodies_to_create_never_5xx() {
    run_property(|_| "/orders".to_owned());
}

#[test]
fn arbitrary_bodies_to_status_change_never_5xx() {
    run_property(|_| String::new());
}
