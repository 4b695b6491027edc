//! Inbox retention: deletes `notifier_inbox` rows handled longer ago than
//! `--inbox-retention`, in small batches, so the table does not grow
//! forever. Off unless the operator sets it.
//!
//! An inbox row is what turns a redelivered record into a duplicate
//! instead of a second email. A record can come again as long as the topic
//! holds it (a crash before the offset commit, a group whose offsets were
//! reset to replay), so a row may only go once its record is gone from the
//! topic. Kafka deletes by segment, and a segment only once its *newest*
//! record is older than `retention.ms`; a segment is rolled when its first
//! record is `segment.ms` old, so it spans at most that. A record can
//! therefore stay up to `retention.ms + segment.ms` (7 + 7 days by
//! default), and the retention must be at least that sum (earlier versions
//! asked for `retention.ms` alone). The broker looks for expired segments
//! every `log.retention.check.interval.ms` (5 min by default), a broker
//! setting the notifier cannot read: leave that much more.
//!
//! ```text
//!  start:      topic retention.ms + segment.ms > --inbox-retention (or infinite) ─▶ refuse to start
//!  every tick: both read again; still covered? ─no─▶ delete nothing, ERROR
//!              └─yes─▶ DELETE the oldest event ids handled before now - retention (batches)
//! ```
//!
//! The topic's settings are read again before every round, so raising the
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
        "--inbox-retention {retention:?} is shorter than topic {topic} may keep a record: its \
         retention.ms ({topic_ms} ms) plus its segment.ms ({segment_ms} ms), as Kafka deletes a \
         segment only once its newest record is older than retention.ms; a record still in the \
         topic could be delivered again (a crash before the offset commit, offsets reset to \
         replay) after its inbox row was deleted, and be emailed twice; set --inbox-retention to \
         at least {kept_ms} ms (plus the broker's log.retention.check.interval.ms, 5 min by \
         default), or lower the topic's retention.ms or segment.ms"
    )]
    ShorterThanTopic {
        retention: Duration,
        topic: String,
        topic_ms: i64,
        segment_ms: i64,
        /// Their sum: the longest a record can stay.
        kept_ms: i64,
    },
    #[error(
        "--inbox-retention {retention:?} is set, but topic {topic} keeps its records forever \
         (retention.ms -1): any record could be delivered again after its inbox row was deleted; \
         leave --inbox-retention unset, or give the topic a retention.ms"
    )]
    TopicKeepsForever { retention: Duration, topic: String },
    #[error("cannot read topic {topic}'s {key} ({reason})")]
    Unreadable {
        topic: String,
        key: &'static str,
        reason: String,
    },
}

impl RetentionError {
    /// Only an unreadable setting may change (broker back, ACL granted).
    pub fn is_transient(&self) -> bool {
        matches!(self, RetentionError::Unreadable { .. })
    }
}

/// Whether `retention` covers the longest a record can stay in a topic of
/// `retention.ms` `topic_ms` (-1: forever) and `segment.ms` `segment_ms`.
pub fn covers(
    retention: Duration,
    topic: &str,
    topic_ms: i64,
    segment_ms: i64,
) -> Result<(), RetentionError> {
    if topic_ms < 0 {
        return Err(RetentionError::TopicKeepsForever {
            retention,
            topic: topic.to_owned(),
        });
    }
    let kept_ms = topic_ms.saturating_add(segment_ms.max(0));
    if retention.as_millis() < kept_ms as u128 {
        return Err(RetentionError::ShorterThanTopic {
            retention,
            topic: topic.to_owned(),
            topic_ms,
            segment_ms,
            kept_ms,
        });
    }
    Ok(())
}

/// Reads the topic's `retention.ms` and `segment.ms` (one request) and
/// checks that `retention` covers them.
pub async fn check(
    config: &ClientConfig,
    topic: &str,
    retention: Duration,
) -> Result<(), RetentionError> {
    let unreadable = |key: &'static str, reason: String| RetentionError::Unreadable {
        topic: topic.to_owned(),
        key,
        reason,
    };
    const KEYS: [&str; 2] = ["retention.ms", "segment.ms"];
    let values = lifecycle::kafka::topic_configs(config, topic, &KEYS)
        .await
        .map_err(|reason| unreadable("retention.ms and segment.ms", reason))?;
    let mut millis = [0i64; 2];
    for ((key, value), ms) in KEYS.into_iter().zip(values).zip(&mut millis) {
        let value =
            value.ok_or_else(|| unreadable(key, "not in the topic's configuration".to_owned()))?;
        *ms = value
            .parse()
            .map_err(|_| unreadable(key, format!("not a number: {value:?}")))?;
    }
    covers(retention, topic, millis[0], millis[1])
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
    fn the_retention_must_cover_the_topics_retention_and_one_segment() {
        let day = Duration::from_secs(86_400);
        let week_ms = 604_800_000;
        // Kafka's defaults: retention.ms and segment.ms 7 days each.
        assert!(covers(day * 14, "t", week_ms, week_ms).is_ok());
        assert!(covers(day * 15, "t", week_ms, week_ms).is_ok());
        // The topic's retention alone is not enough: a record can stay a
        // segment longer.
        let short = covers(day * 8, "t", week_ms, week_ms).unwrap_err();
        assert!(!short.is_transient());
        let message = short.to_string();
        assert!(message.contains("at least 1209600000 ms"), "{message}");
        assert!(message.contains("segment.ms (604800000 ms)"), "{message}");
        // Short segments need little more than the retention.
        assert!(covers(Duration::from_secs(3), "t", 2_000, 1_000).is_ok());
        assert!(covers(Duration::from_millis(2_999), "t", 2_000, 1_000).is_err());
        let forever = covers(day * 365, "t", -1, week_ms).unwrap_err();
        assert!(forever.to_string().contains("retention.ms -1"), "{forever}");
        // Settings near i64::MAX do not overflow into acceptance.
        assert!(covers(day * 365, "t", i64::MAX, week_ms).is_err());
    }
}
