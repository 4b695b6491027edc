//! Tests of `message.rs`.

use super::*;
use crate::event::ValueFormat;
use crate::lsn::Lsn;
use crate::pgoutput::{PgTimestamp, TupleData, TupleValue};

fn cfg(routing: TopicRouting, value_format: ValueFormat) -> EventConfig {
    EventConfig {
        schema: "public".into(),
        table: "outbox".into(),
        key_column: "user_id".into(),
        routing,
        value_format,
        header_columns: vec!["traceparent".into(), "tracestate".into()],
        messages: MessageConfig::default(),
    }
}

fn fixed() -> EventConfig {
    cfg(
        TopicRouting::Fixed("microshop.order-outbox".into()),
        ValueFormat::Json,
    )
}

fn txn() -> TxnInfo {
    TxnInfo {
        commit_lsn: Lsn(0x16B_3748),
        xid: 771,
        // 2026-11-21T10:00:00.5Z
        commit_ts: PgTimestamp(1_795_255_200_500_000 - 946_684_800_000_000),
    }
}

fn message(content: &str) -> LogicalDecodingMessage {
    LogicalDecodingMessage {
        transactional: true,
        lsn: Lsn(0x16B_3700),
        prefix: "outbox".into(),
        content: content.as_bytes().to_vec().into(),
    }
}

/// What order-api's message mode writes (`json_build_object`'s spacing).
const ORDER_API: &str = r#"{"id" : 17, "aggregate_type" : "order", "aggregate_id" : "5", "user_id" : 42, "event_type" : "OrderCreated", "payload" : {"order_id": 5, "total_cents": 3998}, "created_at" : "2026-11-21T11:00:00.25+01:00", "traceparent" : "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "tracestate" : null}"#;

#[test]
fn a_message_makes_the_record_its_row_would() {
    let cfg = fixed();
    let from_message = build_record(&cfg, &message(ORDER_API), &txn(), 2).unwrap();

    // The same event as an outbox row.
    let rel = Relation {
        oid: 16400,
        namespace: "public".into(),
        name: "outbox".into(),
        replica_identity: b'd',
        columns: [
            ("id", type_oid::INT8),
            ("aggregate_type", type_oid::TEXT),
            ("aggregate_id", type_oid::TEXT),
            ("user_id", type_oid::INT8),
            ("event_type", type_oid::TEXT),
            ("payload", type_oid::JSONB),
            ("created_at", type_oid::TIMESTAMPTZ),
            ("traceparent", type_oid::TEXT),
            ("tracestate", type_oid::TEXT),
        ]
        .into_iter()
        .map(|(name, type_oid)| RelationColumn {
            flags: u8::from(name == "id"),
            name: name.into(),
            type_oid,
            type_modifier: -1,
        })
        .collect(),
    };
    let text = |s: &str| TupleValue::Text(s.into());
    let tuple = TupleData(vec![
        text("17"),
        text("order"),
        text("5"),
        text("42"),
        text("OrderCreated"),
        text(r#"{"order_id": 5, "total_cents": 3998}"#),
        text("2026-11-21 10:00:00.25+00"),
        text("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        TupleValue::Null,
    ]);
    let from_row = crate::event::build_record(&cfg, &rel, &tuple, &txn(), 2).unwrap();
    assert_eq!(from_message, from_row);
    assert_eq!(
        String::from_utf8(from_message.value).unwrap(),
        r#"{"id":17,"aggregate_type":"order","aggregate_id":"5","user_id":42,"event_type":"OrderCreated","payload":{"order_id":5,"total_cents":3998},"created_at":"2026-11-21T10:00:00.250000Z","traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01","tracestate":null}"#
    );

    // connect-json alike, types from the JSON values.
    let cj = cfg_connect();
    assert_eq!(
        build_record(&cj, &message(ORDER_API), &txn(), 2)
            .unwrap()
            .value,
        crate::event::build_record(&cj, &rel, &tuple, &txn(), 2)
            .unwrap()
            .value
    );
}

fn cfg_connect() -> EventConfig {
    cfg(
        TopicRouting::Fixed("microshop.order-outbox".into()),
        ValueFormat::ConnectJson,
    )
}

#[test]
fn without_an_id_the_event_id_is_the_lsn_and_created_at_the_commit_time() {
    let m = message(
        r#"{"aggregate_type":"order","aggregate_id":"5","user_id":42,"event_type":"OrderPaid","payload":{}}"#,
    );
    let r = build_record(&fixed(), &m, &txn(), 0).unwrap();
    let v: Value = serde_json::from_slice(&r.value).unwrap();
    assert_eq!(v["id"], 0x16B_3700u64);
    assert_eq!(v["created_at"], "2026-11-21T10:00:00.500000Z");
    let id = r.header(header::EVENT_ID).unwrap();
    assert_eq!(id, (0x16B_3700u64).to_string());
    assert_eq!(r.key.as_deref(), Some("42"));
    assert!(r.column_headers.is_empty());
}

#[test]
fn messages_route_by_column_like_rows() {
    let routed = cfg(
        TopicRouting::ByColumn {
            column: "aggregate_type".into(),
            prefix: "shop.".into(),
            fallback: "shop.other".into(),
        },
        ValueFormat::Json,
    );
    let r = build_record(&routed, &message(ORDER_API), &txn(), 0).unwrap();
    assert_eq!(r.topic, "shop.order");
}

#[test]
fn malformed_content_is_named() {
    let cases = [
        ("not json", "not a JSON object"),
        ("[1,2]", "not a JSON object"),
        (r#"{"aggregate_type":"order"}"#, "no \"aggregate_id\""),
        (
            r#"{"aggregate_type":"order","aggregate_id":"5","user_id":null,"event_type":"X","payload":{}}"#,
            "\"user_id\" is null",
        ),
        (
            r#"{"id":-3,"aggregate_type":"order","aggregate_id":"5","user_id":1,"event_type":"X","payload":{}}"#,
            "not a positive integer",
        ),
        (
            r#"{"id":"7","aggregate_type":"order","aggregate_id":"5","user_id":1,"event_type":"X","payload":{}}"#,
            "not a positive integer",
        ),
        (
            r#"{"aggregate_type":"order","aggregate_id":"5","user_id":1,"event_type":"X","payload":{},"created_at":"yesterday"}"#,
            "not an RFC 3339 timestamp",
        ),
    ];
    for (content, why) in cases {
        let err = build_record(&fixed(), &message(content), &txn(), 0).unwrap_err();
        assert!(err.0.contains(why), "{content}: {err}");
    }
    let mut bad = message("x");
    bad.content = vec![0xff, 0xfe].into();
    assert!(build_record(&fixed(), &bad, &txn(), 0)
        .unwrap_err()
        .0
        .contains("UTF-8"));
}

#[test]
fn a_malformed_message_is_dead_lettered_as_it_is() {
    let content = r#"{"user_id":42,"event_type":"OrderCreated"}"#;
    let m = message(content);
    let why = build_record(&fixed(), &m, &txn(), 3).unwrap_err();
    let r = dead_letter(&fixed(), &m, &txn(), 3, &why);
    assert_eq!(r.topic, "microshop.order-outbox.relay-dlq");
    assert_eq!(r.value, content.as_bytes());
    assert_eq!(r.key.as_deref(), Some("42"));
    let h = |name: &str| r.header(name);
    assert_eq!(h(header::SEQ), Some("3"));
    assert_eq!(h(header::LSN), Some("0/16B3748"));
    assert_eq!(h(header::EVENT_TYPE), Some("OrderCreated"));
    assert!(h(header::dlq::REASON).unwrap().contains("aggregate_type"));
    assert_eq!(h(PREFIX_HEADER), Some("outbox"));
}

#[test]
fn timestamps_in_either_postgres_spelling() {
    let raw = |s: &str| RawValue::from_string(format!("\"{s}\"")).unwrap();
    for s in [
        "2026-11-21T10:00:00.25Z",
        "2026-11-21T11:00:00.25+01:00",
        "2026-11-21 11:00:00.25+01",
        "2026-11-21 10:00:00.25+00",
    ] {
        assert_eq!(
            timestamp(&raw(s)).as_deref(),
            Some("2026-11-21T10:00:00.250000Z"),
            "{s}"
        );
    }
    assert_eq!(timestamp(&raw("2026-11-21")), None);
    assert_eq!(
        timestamp(&RawValue::from_string("12".into()).unwrap()),
        None
    );
}
