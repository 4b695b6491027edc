//! Following one order by its trace id, the README's walk-through as a
//! test: the order-api, relay and notifier binaries on the test stack, a
//! request with a known W3C `traceparent`, and the same trace id found in
//! the Kafka record's header, in the spans both services export to an
//! OTLP receiver (with their parent links), in the notifier's log line and
//! in the email.

use std::time::Duration;

use anyhow::Context;
use devstack::bench::RelayProcess;
use devstack::kafka::TopicReader;
use devstack::otlp::{OtlpReceiver, ReceivedSpan};
use devstack::testing::{
    create_topic, kafka_bootstrap, unique_name, wait_for, workspace_binary, Captured, TestDb,
};
use outbox_record::trace::{self, TraceParent};
use serde_json::json;

use crate::common::{
    free_port, sink_maildir, sink_smtp_url, unique_domain, wait_mails, MailReader,
};

const WAIT: Duration = Duration::from_secs(60);

/// `cmd` exporting its spans to `otlp` quickly (100 ms batches).
fn exporting(mut cmd: tokio::process::Command, otlp: &OtlpReceiver) -> tokio::process::Command {
    cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp.endpoint)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env_remove("OTEL_SERVICE_NAME")
        .env_remove("OTEL_EXPORTER_OTLP_PROTOCOL")
        .env("RUST_LOG", "info");
    cmd
}

/// The one span of `service` named `name` in `spans`.
fn span_of<'a>(spans: &'a [ReceivedSpan], service: &str, name: &str) -> Option<&'a ReceivedSpan> {
    spans
        .iter()
        .find(|s| s.service == service && s.name == name)
}

#[tokio::test]
async fn one_order_is_followed_by_its_trace_id_from_request_to_email() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let topic = create_topic(1).await?;
    let otlp = OtlpReceiver::start().await?;

    let port = free_port()?;
    let api_url = format!("http://127.0.0.1:{port}");
    let mut api = tokio::process::Command::new(workspace_binary("order-api")?);
    api.args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--database-url", &db.url]);
    let mut api = Captured::spawn(exporting(api, &otlp))?;

    let mut relay = RelayProcess::spawn(
        &workspace_binary("relay")?,
        &db.url,
        &db.slot_name(),
        &topic,
        &kafka_bootstrap(),
        &["--status-interval", "200ms"],
    )?;
    relay.wait_connected(WAIT).await?;

    sink_maildir();
    let mut notifier = tokio::process::Command::new(env!("CARGO_BIN_EXE_notifier"));
    notifier
        .args(["--database-url", &db.url])
        .args(["--kafka-bootstrap-servers", &kafka_bootstrap()])
        .args(["--topic", &topic, "--group", &unique_name("g")])
        .args(["--smtp-url", &sink_smtp_url(), "--listen", "127.0.0.1:0"]);
    let mut notifier = Captured::spawn(exporting(notifier, &otlp))?;

    let http = reqwest::Client::new();
    wait_for("order-api to answer", WAIT, || async {
        let ok = http.get(format!("{api_url}/healthz")).send().await;
        Ok(ok.is_ok_and(|r| r.status().is_success()).then_some(()))
    })
    .await
    .with_context(|| api.stderr())?;

    // The caller's trace: a known traceparent, as curl would send it.
    let incoming = TraceParent::root();
    let trace_id = incoming.trace_id_hex();
    let domain = unique_domain();
    let created = http
        .post(format!("{api_url}/orders"))
        .header("traceparent", incoming.to_string())
        .json(&json!({
            "user_id": 42, "email": format!("buyer@{domain}"), "currency": "EUR",
            "items": [{"sku": "A-1", "quantity": 2, "unit_price_cents": 1999}],
        }))
        .send()
        .await?;
    assert_eq!(created.status(), 201);

    // 1. The Kafka record's header: same trace, order-api's span as parent.
    let records = TopicReader::new(&kafka_bootstrap(), &topic, true)?
        .read_at_least(1, WAIT, Duration::from_millis(500))
        .await?;
    let header = records[0]
        .header(trace::TRACEPARENT)
        .context("the record has no traceparent header")?;
    let from_api = TraceParent::parse(header)?;
    assert_eq!(from_api.trace_id_hex(), trace_id);
    assert_ne!(from_api.parent_id, incoming.parent_id);

    // 2. The email names the trace, with the notifier's span as parent.
    let mut mails = MailReader::maildir(&sink_maildir());
    let mail = wait_mails(&mut mails, &domain, 1, WAIT).await?.remove(0);
    let in_mail = TraceParent::parse(
        mail.traceparent
            .as_deref()
            .with_context(|| format!("no Traceparent header in\n{}", mail.raw))?,
    )?;
    assert_eq!(in_mail.trace_id_hex(), trace_id);

    // 3. The exported spans: the request's span is the record's parent, the
    // notifier's span its child and the email's parent.
    let spans = wait_for("both services' spans of the trace", WAIT, || async {
        let spans = otlp.trace(&trace_id);
        let complete = span_of(&spans, "order-api", "request").is_some()
            && span_of(&spans, "notifier", "record").is_some();
        Ok(complete.then_some(spans))
    })
    .await
    .with_context(|| format!("received: {:#?}", otlp.spans()))?;
    let request = span_of(&spans, "order-api", "request").unwrap();
    let record = span_of(&spans, "notifier", "record").unwrap();
    assert_eq!(
        request.parent_span_id,
        incoming.parent_id_hex(),
        "{request:?}"
    );
    assert_eq!(request.span_id, from_api.parent_id_hex(), "{request:?}");
    assert_eq!(record.parent_span_id, request.span_id, "{record:?}");
    assert_eq!(record.span_id, in_mail.parent_id_hex(), "{record:?}");
    assert_eq!(record.attribute("outcome"), Some("sent"), "{record:?}");

    // 4. The notifier's log line of the email carries the trace id.
    let log = notifier.stderr();
    assert!(
        log.lines()
            .any(|l| l.contains("email sent") && l.contains(&trace_id)),
        "no 'email sent' line with trace id {trace_id} in:\n{log}"
    );

    let (status, log) = notifier.terminate(WAIT).await?;
    assert!(status.success(), "notifier: {status}\n{log}");
    let (status, log) = api.terminate(WAIT).await?;
    assert!(status.success(), "order-api: {status}\n{log}");
    relay.kill().await?;
    Ok(())
}
