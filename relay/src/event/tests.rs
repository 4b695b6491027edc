//! Tests of `event.rs`.

use super::*;
use crate::pgoutput::{RelationColumn, TupleValue};

fn outbox_relation() -> Relation {
    let col = |name: &str, type_oid: u32, flags: u8| RelationColumn {
        flags,
        name: name.to_owned(),
        type_oid,
        type_modifier: -1,
    };
    Relation {
        oid: 16400,
        namespace: "public".into(),
        name: "outbox".into(),
        replica_identity: b'd',
        columns: vec![
            col("id", type_oid::INT8, 1),
            col("aggregate_type", type_oid::TEXT, 0),
            col("aggregate_id", type_oid::TEXT, 0),
            col("user_id", type_oid::INT8, 0),
            col("event_type", type_oid::TEXT, 0),
            col("payload", type_oid::JSONB, 0),
            col("created_at", type_oid::TIMESTAMPTZ, 0),
        ],
    }
}

fn tuple(vals: &[Option<&str>]) -> TupleData {
    TupleData(
        vals.iter()
            .map(|v| v.map_or(TupleValue::Null, |s| TupleValue::Text(s.to_owned())))
            .collect(),
    )
}

fn cfg(routing: TopicRouting, value_format: ValueFormat) -> EventConfig {
    EventConfig {
        schema: "public".into(),
        table: "outbox".into(),
        key_column: "user_id".into(),
        routing,
        value_format,
        header_columns: Vec::new(),
        messages: crate::message::MessageConfig::default(),
    }
}

fn txn() -> TxnInfo {
    TxnInfo {
        commit_lsn: Lsn(0x1_0000_00A0),
        xid: 777,
        // 2000-01-01 + 1 s + 5 µs
        commit_ts: PgTimestamp(1_000_005),
    }
}

fn row() -> TupleData {
    tuple(&[
        Some("17"),
        Some("order"),
        Some("5"),
        Some("42"),
        Some("OrderCreated"),
        Some(r#"{"order_id": 5, "items": [1, 2]}"#),
        Some("2026-11-21 10:00:00.5+01"),
    ])
}

#[test]
fn builds_spec_record() {
    let rec = build_record(
        &cfg(
            TopicRouting::Fixed("microshop.order-outbox".into()),
            ValueFormat::Json,
        ),
        &outbox_relation(),
        &row(),
        &txn(),
        3,
    )
    .unwrap();
    assert_eq!(rec.topic, "microshop.order-outbox");
    assert_eq!(rec.key.as_deref(), Some("42"));
    let value = String::from_utf8(rec.value.clone()).unwrap();
    assert!(
        value.starts_with(r#"{"id":17,"aggregate_type":"order""#),
        "{value}"
    );
    let v: Value = serde_json::from_str(&value).unwrap();
    assert_eq!(
        v["payload"]["items"],
        json!([1, 2]),
        "jsonb embedded, not a string"
    );
    assert_eq!(v["created_at"], json!("2026-11-21T09:00:00.500000Z"));
    let h = |k: &str| rec.header(k);
    assert_eq!(h(header::EVENT_ID), Some("17"));
    assert_eq!(h(header::EVENT_TYPE), Some("OrderCreated"));
    assert_eq!(h(header::LSN), Some("1/A0"));
    assert_eq!(h(header::XID), Some("777"));
    assert_eq!(h(header::COMMIT_TS), Some("2000-01-01T00:00:01.000005Z"));
    assert_eq!(h(header::SEQ), Some("3"));
}

#[test]
fn header_columns_copy_present_values_only() {
    let mut config = cfg(TopicRouting::Fixed("t".into()), ValueFormat::Json);
    // `event_type` present, `traceparent` not a column of this table.
    config.header_columns = vec!["event_type".into(), "traceparent".into()];
    let rec = build_record(&config, &outbox_relation(), &row(), &txn(), 0).unwrap();
    assert_eq!(
        rec.column_headers.to_vec(),
        [("event_type".to_owned(), "OrderCreated".to_owned())]
    );
    // A NULL adds no header.
    let mut null_type = row();
    null_type.0[4] = TupleValue::Null;
    let rec = build_record(&config, &outbox_relation(), &null_type, &txn(), 0).unwrap();
    assert!(rec.column_headers.is_empty());
    assert!(rec.size() > 0);
}

#[test]
fn routes_by_column_with_fallback() {
    let routing = TopicRouting::ByColumn {
        column: "aggregate_type".into(),
        prefix: "microshop.".into(),
        fallback: "microshop.order-outbox".into(),
    };
    let c = cfg(routing, ValueFormat::Json);
    let rec = build_record(&c, &outbox_relation(), &row(), &txn(), 0).unwrap();
    assert_eq!(rec.topic, "microshop.order");
    let mut t = row();
    t.0[1] = TupleValue::Null;
    let rec = build_record(&c, &outbox_relation(), &t, &txn(), 0).unwrap();
    assert_eq!(rec.topic, "microshop.order-outbox");
}

#[test]
fn null_key_gives_no_key() {
    let mut t = row();
    t.0[3] = TupleValue::Null;
    let rec = build_record(
        &cfg(TopicRouting::Fixed("t".into()), ValueFormat::Json),
        &outbox_relation(),
        &t,
        &txn(),
        0,
    )
    .unwrap();
    assert_eq!(rec.key, None);
}

#[test]
fn connect_json_envelope() {
    let rec = build_record(
        &cfg(TopicRouting::Fixed("t".into()), ValueFormat::ConnectJson),
        &outbox_relation(),
        &row(),
        &txn(),
        0,
    )
    .unwrap();
    let v: Value = serde_json::from_slice(&rec.value).unwrap();
    assert_eq!(v["schema"]["type"], "struct");
    assert_eq!(v["schema"]["name"], "outbox");
    let fields = v["schema"]["fields"].as_array().unwrap();
    assert_eq!(
        fields[0],
        json!({"type": "int64", "optional": false, "field": "id"})
    );
    assert_eq!(fields[5]["type"], "string");
    assert_eq!(fields[6]["name"], "org.apache.kafka.connect.data.Timestamp");
    assert_eq!(v["payload"]["id"], 17);
    assert_eq!(
        v["payload"]["payload"],
        json!(r#"{"order_id":5,"items":[1,2]}"#)
    );
    assert_eq!(v["payload"]["created_at"], json!(1_795_251_600_500_i64));
}

fn debezium_cfg() -> EventConfig {
    let mut c = cfg(
        TopicRouting::ByColumn {
            column: debezium::ROUTE_COLUMN.into(),
            prefix: debezium::TOPIC_PREFIX.into(),
            fallback: "outbox.event.outbox".into(),
        },
        ValueFormat::DebeziumOutbox,
    );
    c.key_column = debezium::KEY_COLUMN.into();
    c.header_columns = vec!["traceparent".into()];
    c
}

#[test]
fn debezium_outbox_record() {
    let rec = build_record(&debezium_cfg(), &outbox_relation(), &row(), &txn(), 3).unwrap();
    assert_eq!(rec.topic, "outbox.event.order");
    assert_eq!(rec.key.as_deref(), Some("5"), "aggregate_id");
    // The payload as Postgres printed it, as one JSON string.
    assert_eq!(
        String::from_utf8(rec.value.clone()).unwrap(),
        r#""{\"order_id\": 5, \"items\": [1, 2]}""#
    );
    let names: Vec<_> = rec.all_headers().map(|(k, _)| k).collect();
    assert_eq!(
        names,
        [[debezium::ID_HEADER].as_slice(), &header::RELAY_NAMES].concat()
    );
    assert_eq!(rec.headers[0], (debezium::ID_HEADER, "17".to_owned()));
    assert_eq!(rec.partition_key(), "5");
}

#[test]
fn debezium_outbox_null_payload_and_key() {
    let mut t = row();
    t.0[2] = TupleValue::Null;
    t.0[5] = TupleValue::Null;
    let rec = build_record(&debezium_cfg(), &outbox_relation(), &t, &txn(), 0).unwrap();
    assert_eq!(rec.key, None);
    assert_eq!(rec.value, b"null");
    // Placed by its event id, as every keyless record.
    assert_eq!(rec.partition_key(), "17");
    // A NULL routing value goes to the fallback topic.
    t.0[1] = TupleValue::Null;
    let rec = build_record(&debezium_cfg(), &outbox_relation(), &t, &txn(), 0).unwrap();
    assert_eq!(rec.topic, "outbox.event.outbox");
}

#[test]
fn debezium_value_escapes_as_jackson_does() {
    let v = |s: &str| String::from_utf8(debezium_value(Some(s))).unwrap();
    assert_eq!(v(""), r#""""#);
    assert_eq!(v(r#"{"a": "x\"y"}"#), r#""{\"a\": \"x\\\"y\"}""#);
    assert_eq!(v("a\nb\tc\r\u{8}\u{c}"), r#""a\nb\tc\r\b\f""#);
    assert_eq!(v("\u{1}\u{1f}"), r#""\u0001\u001F""#);
    // `/`, DEL and non-ASCII as they are, except beyond U+FFFF:
    // what Kafka 4.3's JsonConverter printed for the same string.
    assert_eq!(v("/\u{7f}é€"), "\"/\u{7f}é€\"");
    assert_eq!(v("😀x"), r#""\uD83D\uDE00x""#);
    assert_eq!(debezium_value(None), b"null");
    // What a JSON parser reads back is the text.
    let text = "{\"k\": \"\\u001f\u{1}😀\"}\n";
    let back: String = serde_json::from_slice(&debezium_value(Some(text))).unwrap();
    assert_eq!(back, text);
}

#[test]
fn debezium_outbox_needs_payload_and_id_columns() {
    let mut rel = outbox_relation();
    rel.columns.retain(|c| c.name != "payload");
    let err = check_relation(&debezium_cfg(), &rel).unwrap_err();
    assert!(err.to_string().contains("payload"), "{err}");
    let c = cfg(TopicRouting::Fixed("t".into()), ValueFormat::Json);
    check_relation(&c, &rel).unwrap();
}

#[test]
fn relation_check_names_missing_column() {
    let mut c = cfg(TopicRouting::Fixed("t".into()), ValueFormat::Json);
    c.key_column = "tenant".into();
    let err = check_relation(&c, &outbox_relation()).unwrap_err();
    assert!(err.to_string().contains("tenant"), "{err}");
    assert!(c.is_outbox(&outbox_relation()));
}
