//! Broker smoke test: what the relay and notifier rely on from the broker,
//! checked on the real test broker so a later failure can't be blamed on it
//! unseen — idempotent produce, keyed records in stable partitions, headers
//! round-tripping, and a consumer group whose two members share partitions.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use devstack::kafka::TopicReader;
use devstack::testing::{create_topic, kafka_bootstrap, unique_name};
use outbox_record::header;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

fn idempotent_producer() -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .expect("producer config is valid")
}

#[tokio::test]
async fn idempotent_keyed_records_with_headers_round_trip() -> anyhow::Result<()> {
    let topic = create_topic(3).await?;
    let producer = idempotent_producer();
    let mut sent_partition: HashMap<String, i32> = HashMap::new();
    for i in 0..60u32 {
        let key = format!("user-{}", i % 6);
        let payload = format!("{{\"n\":{i}}}");
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: header::EVENT_ID,
                value: Some(i.to_string().as_bytes()),
            })
            .insert(Header {
                key: header::LSN,
                value: Some("0/16B374D8".as_bytes()),
            });
        let delivery = producer
            .send(
                FutureRecord::to(&topic)
                    .key(&key)
                    .payload(&payload)
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
        let partition = delivery.partition;
        // The same key always lands in the same partition.
        let first = *sent_partition.entry(key.clone()).or_insert(partition);
        assert_eq!(first, partition, "key {key} moved partitions");
    }

    let reader = TopicReader::new(&kafka_bootstrap(), &topic, true)?;
    let records = reader
        .read_at_least(60, Duration::from_secs(20), Duration::from_secs(1))
        .await?;
    assert_eq!(records.len(), 60, "every record exactly once");
    let mut per_key_last: HashMap<String, u32> = HashMap::new();
    for r in &records {
        let key = r.key.clone().expect("keyed");
        assert_eq!(
            sent_partition[&key], r.partition,
            "read from the partition it was written to"
        );
        assert_eq!(r.header(header::LSN), Some("0/16B374D8"));
        let n: u32 = r
            .header(header::EVENT_ID)
            .expect("event_id header")
            .parse()?;
        let value: serde_json::Value = serde_json::from_str(r.value.as_deref().unwrap_or(""))?;
        assert_eq!(value["n"], n);
        // Per key, records come back in the order they were produced.
        if let Some(prev) = per_key_last.insert(key, n) {
            assert!(prev < n, "order within a key broken: {prev} then {n}");
        }
    }
    assert!(
        sent_partition.values().collect::<HashSet<_>>().len() > 1,
        "six keys should spread over more than one of three partitions"
    );
    Ok(())
}

#[tokio::test]
async fn consumer_group_members_share_partitions() -> anyhow::Result<()> {
    let topic = create_topic(4).await?;
    let group = unique_name("group");
    let member = || -> anyhow::Result<StreamConsumer> {
        let c: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", kafka_bootstrap())
            .set("group.id", &group)
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .set("session.timeout.ms", "6000")
            .create()?;
        c.subscribe(&[&topic])?;
        Ok(c)
    };
    let a = member()?;
    let b = member()?;
    // Poll both until the group has settled with every partition assigned
    // to exactly one member and both members holding some.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
    loop {
        let _ = tokio::time::timeout(Duration::from_millis(200), a.recv()).await;
        let _ = tokio::time::timeout(Duration::from_millis(200), b.recv()).await;
        let pa: HashSet<i32> = a
            .assignment()?
            .elements()
            .iter()
            .map(|e| e.partition())
            .collect();
        let pb: HashSet<i32> = b
            .assignment()?
            .elements()
            .iter()
            .map(|e| e.partition())
            .collect();
        if !pa.is_empty() && !pb.is_empty() && pa.len() + pb.len() == 4 && pa.is_disjoint(&pb) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "group did not settle: a={pa:?} b={pb:?}"
        );
    }
    Ok(())
}
