//! Inbox retention: deletes `notifier_inbox` rows handled longer ago than
//! `--inbox-retention`, in small batches, so the table does not grow
//! forever. Off unless the operator sets it.
//!
//! An inbox row is what turns a redelivered record into a duplicate
//! instead of a second email. A record can come again as long as the topic
//! holds it (a crash before the offset commit, a group whose offsets were
//! reset to replay), so a row may only go once its record is gone from the
//! topic: the retention must be at least the topic's `retention.ms`.
//!
//! ```text
//!  start:      topic retention.ms > --inbox-retention (or infinite) ─▶ refuse to start
//!  every tick: retention.ms read again; still covered? ─no─▶ delete nothing, ERROR
//!              └─yes─▶ DELETE the oldest event ids handled before now - retention (batches)
//! ```
//!
//! The topic's setting is read again before every round, so raising the
//! topic's retention later stops deletion (logged) instead of breaking the
//! guarantee; a round whose setting cannot be read deletes nothing.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use tokio_util::sync::CancellationToken;

use crate::http::Shared;
use crate::inbox::Inbox;

/// Rows per DELETE statement (each its own short transaction).
const BATCH: i64 = 1000;

/// Batches per round at most, so one round never runs for long.
const MAX_BATCHES_PER_ROUND: usize = 100;

/// Why the inbox retention cannot be used with the topic.
#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    #[error(
        "--inbox-retention {retention:?} is shorter than topic {topic}'s retention.ms ({topic_ms} ms): \
         a record still in the topic could be delivered again (a crash before the offset commit, \
         offsets reset to replay) after its inbox row was deleted, and be emailed twice; set \
         --inbox-retention to at least {topic_ms} ms, or lower the topic's retention.ms"
    )]
    ShorterThanTopic {
        retention: Duration,
        topic: String,
        topic_ms: i64,
    },
    #[error(
        "--inbox-retention {retention:?} is set, but topic {topic} keeps its records forever \
         (retention.ms -1): any record could be delivered again after its inbox row was deleted; \
         leave --inbox-retention unset, or give the topic a retention.ms"
    )]
    TopicKeepsForever { retention: Duration, topic: String },
    #[error("cannot read topic {topic}'s retention.ms ({reason})")]
    Unreadable { topic: String, reason: String },
}

impl RetentionError {
    /// Only an unreadable setting may change (broker back, ACL granted).
    pub fn is_transient(&self) -> bool {
        matches!(self, RetentionError::Unreadable { .. })
    }
}

/// Whether `retention` covers a topic retention of `topic_ms` (-1: forever).
pub fn covers(retention: Duration, topic: &str, topic_ms: i64) -> Result<(), RetentionError> {
    if topic_ms < 0 {
        return Err(RetentionError::TopicKeepsForever {
            retention,
            topic: topic.to_owned(),
        });
    }
    if retention.as_millis() < topic_ms as u128 {
        return Err(RetentionError::ShorterThanTopic {
            retention,
            topic: topic.to_owned(),
            topic_ms,
        });
    }
    Ok(())
}

/// Reads the topic's `retention.ms` and checks that `retention` covers it.
pub async fn check(
    config: &ClientConfig,
    topic: &str,
    retention: Duration,
) -> Result<(), RetentionError> {
    let unreadable = |reason: String| RetentionError::Unreadable {
        topic: topic.to_owned(),
        reason,
    };
    let value = lifecycle::kafka::topic_config(config, topic, "retention.ms")
        .await
        .map_err(unreadable)?
        .ok_or_else(|| unreadable("not in the topic's configuration".to_owned()))?;
    let topic_ms = value
        .parse()
        .map_err(|_| unreadable(format!("not a number: {value:?}")))?;
    covers(retention, topic, topic_ms)
}

/// Deletes old inbox rows every `interval` until `stop`, while `retention`
/// covers the topic's retention.
pub async fn run(
    mut inbox: Inbox,
    config: ClientConfig,
    topic: String,
    retention: Duration,
    interval: Duration,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    tracing::info!(retention = ?retention, interval = ?interval,
        "inbox retention on: notifier_inbox rows handled longer ago than the retention are deleted");
    let mut ticker = tokio::time::interval(interval.max(Duration::from_millis(10)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if let Err(e) = check(&config, &topic, retention).await {
            if e.is_transient() {
                tracing::warn!(error = %e, "inbox retention: nothing deleted this round");
            } else {
                tracing::error!(error = %e, "inbox retention: nothing deleted");
            }
            continue;
        }
        for _ in 0..MAX_BATCHES_PER_ROUND {
            if stop.is_cancelled() {
                return;
            }
            match inbox.delete_handled_before(retention, BATCH).await {
                Ok(n) => {
                    shared.metrics.inbox_rows_deleted.inc_by(n);
                    if (n as i64) < BATCH {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %crate::handler::error_chain(&e), "inbox retention: delete failed; trying again next round");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_retention_must_cover_the_topics() {
        let day = Duration::from_secs(86_400);
        assert!(covers(day * 7, "t", 604_800_000).is_ok());
        assert!(covers(day * 8, "t", 604_800_000).is_ok());
        let short = covers(day, "t", 604_800_000).unwrap_err();
        assert!(!short.is_transient());
        assert!(
            short.to_string().contains("at least 604800000 ms"),
            "{short}"
        );
        let forever = covers(day * 365, "t", -1).unwrap_err();
        assert!(forever.to_string().contains("retention.ms -1"), "{forever}");
    }
}
