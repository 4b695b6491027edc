//! Tests of `config.rs`.

use super::*;

#[test]
fn defaults_match_spec() {
    let cfg = Config::try_parse_from(["relay", "--database-url", "postgres://x@h/db"]).unwrap();
    assert_eq!(cfg.slot, "outbox_relay");
    assert_eq!(cfg.publication, "outbox_pub");
    assert_eq!(cfg.listen.port(), 9101);
    assert_eq!(
        cfg.event_config().routing,
        TopicRouting::Fixed("microshop.order-outbox".into())
    );
    assert_eq!(cfg.event_config().key_column, "user_id");
}

#[test]
fn debezium_outbox_defaults_to_debeziums_routing_and_key() {
    let parse = |extra: &[&str]| {
        let mut args = vec!["relay", "--database-url", "postgres://x@h/db"];
        args.extend_from_slice(&["--value-format", "debezium-outbox"]);
        args.extend_from_slice(extra);
        Config::try_parse_from(args).unwrap().event_config()
    };
    let c = parse(&[]);
    assert_eq!(
        c.routing,
        TopicRouting::ByColumn {
            column: "aggregate_type".into(),
            prefix: "outbox.event.".into(),
            fallback: "outbox.event.outbox".into(),
        }
    );
    assert_eq!(c.key_column, "aggregate_id");
    assert_eq!(c.value_format, ValueFormat::DebeziumOutbox);
    // Explicit settings win.
    let c = parse(&["--topic", "events", "--key-column", "user_id"]);
    assert_eq!(c.routing, TopicRouting::Fixed("events".into()));
    assert_eq!(c.key_column, "user_id");
    let c = parse(&["--route-by-column", "event_type", "--topic-prefix", "x."]);
    assert!(
        matches!(c.routing, TopicRouting::ByColumn { ref column, ref prefix, .. }
        if column == "event_type" && prefix == "x.")
    );
}

#[test]
fn header_columns_default_to_the_trace_context() {
    let parse = |extra: &[&str]| {
        let mut args = vec!["relay", "--database-url", "postgres://x@h/db"];
        args.extend_from_slice(extra);
        Config::try_parse_from(args)
    };
    let cols = |extra: &[&str]| parse(extra).unwrap().event_config().header_columns;
    assert_eq!(cols(&[]), ["traceparent", "tracestate"]);
    assert_eq!(
        cols(&["--header-columns", "trace_id,tenant"]),
        ["trace_id", "tenant"]
    );
    assert!(cols(&["--header-columns", ""]).is_empty());
    let err = parse(&["--header-columns", "traceparent,lsn"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("one of the relay's own headers"), "{err}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let err = Config::try_parse_from([
        "relay",
        "--database-url",
        "x",
        "--kafka-property",
        "novalue",
    ])
    .err()
    .unwrap();
    assert!(err.to_string().contains("KEY=VALUE"), "{err}");
    let err =
        Config::try_parse_from(["relay", "--database-url", "x", "--max-backoff", "5 parsecs"])
            .err()
            .unwrap();
    assert!(err.to_string().contains("invalid duration"), "{err}");
}

#[test]
fn debug_hides_credentials() {
    let cfg = Config::try_parse_from([
        "relay",
        "--database-url",
        "postgres://u:secretpw@h/db",
        "--kafka-property",
        "sasl.password=hunter2",
    ])
    .unwrap();
    let shown = format!("{cfg:?}");
    assert!(
        !shown.contains("secretpw") && !shown.contains("hunter2"),
        "{shown}"
    );
}
