//! Topic preparation, before any record is produced: each topic the relay
//! writes to is looked up in the cluster's metadata and created through the
//! Admin API when missing (a Kafka user that may write but not create topics
//! works when they exist). And a topic's `max.message.bytes`, to name it
//! when a record is refused as too large.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use lifecycle::kafka::Created;

use crate::sink::{AccessDenied, AccessWatch, KafkaConfig, SinkError};

/// Creates each topic in `topics` that does not exist yet, through the
/// Admin API. Topics are looked up in the cluster's metadata first, so a
/// relay whose Kafka user may write but not create topics works when they
/// already exist. Refused credentials, and a topic the Kafka user may not
/// even describe, are [`SinkError::Denied`].
pub async fn ensure_topics(cfg: &KafkaConfig, topics: &[String]) -> Result<(), SinkError> {
    let lookup: BaseConsumer<AccessWatch> = cfg
        .client_config()
        .create_with_context(AccessWatch::default())
        .map_err(SinkError::Config)?;
    let lookup = Arc::new(lookup);
    let mut missing = Vec::new();
    for topic in topics.iter().collect::<HashSet<_>>() {
        let client = lookup.clone();
        let name = topic.clone();
        // fetch_metadata blocks the calling thread.
        let exists = tokio::task::spawn_blocking(move || topic_exists(&client, &name))
            .await
            .map_err(|_| SinkError::Kafka(KafkaError::Canceled))??;
        if !exists {
            missing.push(topic.as_str());
        }
    }
    // Closing a client takes a while and nothing waits on it.
    std::thread::spawn(move || drop(lookup));
    if missing.is_empty() {
        return Ok(());
    }
    let results = lifecycle::kafka::create_topics(
        &cfg.client_config(),
        &missing,
        cfg.partitions,
        cfg.replication,
        Duration::from_secs(30),
    )
    .await
    .map_err(SinkError::Kafka)?;
    for (topic, result) in results {
        match result {
            Ok(Created::New) => {
                tracing::info!(%topic, partitions = cfg.partitions, "created topic")
            }
            Ok(Created::Existed) => {}
            Err(code) => {
                return Err(
                    match AccessDenied::new(code, format!("creating topic {topic}")) {
                        Some(denied) => SinkError::Denied(denied),
                        None => SinkError::CreateTopic { topic, code },
                    },
                )
            }
        }
    }
    Ok(())
}

/// The topic's `max.message.bytes` (the broker's `message.max.bytes` unless
/// the topic overrides it), asked for up to 10 s through the Admin API;
/// `None` if it cannot be read (e.g. no DescribeConfigs ACL).
pub async fn max_message_bytes(cfg: &KafkaConfig, topic: &str) -> Option<usize> {
    match lifecycle::kafka::topic_config(&cfg.client_config(), topic, "max.message.bytes").await {
        Ok(value) => value?.parse().ok(),
        Err(reason) => {
            tracing::debug!(%topic, error = %reason, "cannot read the topic's max.message.bytes");
            None
        }
    }
}

/// Whether `topic` exists (with partitions), from the cluster's metadata,
/// asked for up to 10 s.
fn topic_exists(client: &BaseConsumer<AccessWatch>, topic: &str) -> Result<bool, SinkError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client.fetch_metadata(Some(topic), Duration::from_millis(500)) {
            Ok(md) => {
                let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
                    return Ok(false);
                };
                return match t.error().map(RDKafkaErrorCode::from) {
                    None => Ok(!t.partitions().is_empty()),
                    Some(code) => {
                        match AccessDenied::new(code, format!("describing topic {topic}")) {
                            Some(denied) => Err(SinkError::Denied(denied)),
                            None => Ok(false),
                        }
                    }
                };
            }
            Err(e) => {
                // No broker answered in time: serve the client's error
                // events, where a refused authentication shows.
                for _ in 0..64 {
                    if client.poll(Duration::ZERO).is_none() {
                        break;
                    }
                }
                if let Some(denied) = client.context().denied() {
                    return Err(SinkError::Denied(denied));
                }
                if Instant::now() >= deadline {
                    return Err(SinkError::Kafka(e));
                }
            }
        }
    }
}
