//! Reading back what an interrupted backfill already put in Kafka: the
//! event ids of its records, told by their positions (see the backfill's
//! module header, "Restart").

use std::collections::HashSet;

use crate::error::RelayError;
use crate::lsn::Lsn;
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
