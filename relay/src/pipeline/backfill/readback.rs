//! Reading back what an interrupted backfill already put in Kafka: which
//! topics, and the event ids of its records there, told by their positions
//! (see the backfill's module header, "Restart").

use std::collections::{BTreeSet, HashSet};

use tokio_postgres::Client;

use crate::dead_letter;
use crate::error::RelayError;
use crate::event::{EventConfig, TopicRouting};
use crate::lsn::Lsn;
use crate::replication::{quote_ident, ReplicationError};
use crate::republish::OutboxColumns;
use crate::sink::KafkaConfig;
use lifecycle::error_chain;

/// The event ids of records in `topics` at positions in `[from, below)`:
/// what earlier attempts of this backfill delivered.
pub(super) async fn delivered_before(
    kafka: &KafkaConfig,
    topics: Vec<String>,
    from: Lsn,
    below: Lsn,
) -> Result<HashSet<i64>, RelayError> {
    let client = kafka.client_config();
    tokio::task::spawn_blocking(move || {
        let mut ids = HashSet::new();
        for topic in &topics {
            crate::verify::each_record(client.clone(), topic, |s| {
                if let (Some((lsn, _)), Some(id)) = (s.position, s.event_id) {
                    if lsn >= from && lsn < below {
                        ids.insert(id);
                    }
                }
            })
            .map_err(|e| {
                RelayError::Backfill(format!("reading topic {topic} back: {}", error_chain(&e)))
            })?;
        }
        Ok(ids)
    })
    .await
    .unwrap_or_else(|e| {
        Err(RelayError::Backfill(format!(
            "reading the topics back: {e}"
        )))
    })
}

/// The topics the snapshot's rows go to, and their dead-letter topics
/// (a dead-lettered event's reference stands for the event).
pub(super) async fn topics_to_read_back(
    event_cfg: &EventConfig,
    snap: &Client,
    table: &OutboxColumns,
    after: i64,
) -> Result<Vec<String>, RelayError> {
    let mut topics: BTreeSet<String> = event_cfg.static_topics().into_iter().collect();
    if let TopicRouting::ByColumn { column, prefix, .. } = &event_cfg.routing {
        let values = snap
            .query(
                &format!(
                    "SELECT DISTINCT {}::text FROM {} WHERE id > $1",
                    quote_ident(column),
                    table.qualified
                ),
                &[&after],
            )
            .await
            .map_err(|e| ReplicationError::from_sql("reading the routed topics", e))?;
        for v in &values {
            if let Some(v) = v.get::<_, Option<String>>(0).filter(|v| !v.is_empty()) {
                topics.insert(format!("{prefix}{v}"));
            }
        }
    }
    let dead_letter: Vec<String> = topics.iter().map(|t| dead_letter::topic_of(t)).collect();
    topics.extend(dead_letter);
    Ok(topics.into_iter().collect())
}
