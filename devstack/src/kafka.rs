//! Kafka helpers for the stack and the tests, through rdkafka only (so they
//! work unchanged on a real cluster).
//!
//! Reading "to the end" of a partition here means fetching until nothing more
//! arrives for a quiet period — never trusting the high watermark (Tansu
//! 0.6.0, the project's first broker, reported it wrongly after
//! multi-record batches; on Apache Kafka the quiet period is all it costs).

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// Creates `topic` with `partitions` partitions (replication 1) unless it
/// exists already.
pub async fn create_topic(bootstrap: &str, topic: &str, partitions: i32) -> anyhow::Result<()> {
    create_topic_replicated(bootstrap, topic, partitions, 1).await
}

/// Creates `topic` with `partitions` partitions of `replication` replicas
/// each unless it exists already.
pub async fn create_topic_replicated(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    replication: i32,
) -> anyhow::Result<()> {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    let results = lifecycle::kafka::create_topics(
        &config,
        &[topic],
        partitions,
        replication,
        Duration::from_secs(10),
    )
    .await
    .with_context(|| format!("creating topic {topic}"))?;
    for (name, result) in results {
        if let Err(code) = result {
            bail!("creating topic {name}: {code}");
        }
    }
    Ok(())
}

/// The topics and consumer groups [`delete_by_prefix`] deleted.
#[derive(Debug, Default)]
pub struct Deleted {
    pub topics: Vec<String>,
    pub groups: Vec<String>,
}

/// Deletes every topic whose name starts with one of `topic_prefixes` and
/// every consumer group whose name starts with one of `group_prefixes`:
/// what benchmarks leave on the stack's broker (a fresh topic, its DLQ and
/// a fresh group per run), so that the next run measures a broker holding
/// what users run, not hundreds of spent partitions. An empty prefix is
/// refused: it would name everything. A group that still has members is
/// not deleted (the broker refuses it) and is reported as an error.
pub async fn delete_by_prefix(
    bootstrap: &str,
    topic_prefixes: &[String],
    group_prefixes: &[String],
) -> anyhow::Result<Deleted> {
    ensure!(
        topic_prefixes
            .iter()
            .chain(group_prefixes)
            .all(|p| !p.is_empty()),
        "an empty prefix would name every topic or group"
    );
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", bootstrap);
    let lister: BaseConsumer = config.create().context("creating a metadata client")?;
    let timeout = Duration::from_secs(10);
    let (topics, groups) = {
        let topic_prefixes = topic_prefixes.to_vec();
        let group_prefixes = group_prefixes.to_vec();
        tokio::task::spawn_blocking(move || -> anyhow::Result<(Vec<String>, Vec<String>)> {
            let named = |name: &str, prefixes: &[String]| {
                prefixes.iter().any(|p| name.starts_with(p.as_str()))
            };
            let md = lister
                .fetch_metadata(None, timeout)
                .context("fetching the broker's metadata")?;
            let topics = md
                .topics()
                .iter()
                .map(|t| t.name().to_owned())
                .filter(|t| named(t, &topic_prefixes))
                .collect();
            let groups = if group_prefixes.is_empty() {
                Vec::new()
            } else {
                lister
                    .fetch_group_list(None, timeout)
                    .context("listing the consumer groups")?
                    .groups()
                    .iter()
                    .map(|g| g.name().to_owned())
                    .filter(|g| named(g, &group_prefixes))
                    .collect()
            };
            Ok((topics, groups))
        })
        .await??
    };
    let admin: AdminClient<DefaultClientContext> =
        config.create().context("creating an admin client")?;
    let opts = AdminOptions::new()
        .operation_timeout(Some(timeout))
        .request_timeout(Some(timeout));
    let mut refused = Vec::new();
    let mut sort = |results: Vec<Result<String, (String, RDKafkaErrorCode)>>,
                    kind: &str,
                    gone: RDKafkaErrorCode| {
        let mut done = Vec::new();
        for result in results {
            match result {
                Ok(name) => done.push(name),
                // Deleted meanwhile by someone else: what was asked for.
                Err((_, code)) if code == gone => {}
                Err((name, code)) => refused.push(format!("{kind} {name}: {code}")),
            }
        }
        done
    };
    let mut deleted = Deleted::default();
    if !topics.is_empty() {
        let results = admin.delete_topics(&as_strs(&topics), &opts).await;
        let results = results.context("deleting topics")?;
        deleted.topics = sort(results, "topic", RDKafkaErrorCode::UnknownTopicOrPartition);
    }
    if !groups.is_empty() {
        let results = admin.delete_groups(&as_strs(&groups), &opts).await;
        let results = results.context("deleting consumer groups")?;
        deleted.groups = sort(results, "group", RDKafkaErrorCode::GroupIdNotFound);
    }
    ensure!(
        refused.is_empty(),
        "deleted {} topics and {} groups; refused: {}",
        deleted.topics.len(),
        deleted.groups.len(),
        refused.join(", ")
    );
    Ok(deleted)
}

fn as_strs(names: &[String]) -> Vec<&str> {
    names.iter().map(String::as_str).collect()
}

/// The number of partitions of `topic`, from the broker's metadata (a
/// benchmark's fresh topics get as many as the stack's outbox topic).
pub async fn partition_count(bootstrap: &str, topic: &str) -> anyhow::Result<i32> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .context("creating a metadata client")?;
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let md = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .with_context(|| format!("fetching the metadata of {topic}"))?;
        let t = md
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .with_context(|| format!("{topic} is not in the broker's metadata"))?;
        if let Some(err) = t.error() {
            bail!("topic {topic}: {err:?} (is the stack up? scripts/up)");
        }
        ensure!(
            !t.partitions().is_empty(),
            "topic {topic} has no partitions"
        );
        Ok(i32::try_from(t.partitions().len())?)
    })
    .await?
}

/// A record as read back from a topic, with text key, headers and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub key: Option<String>,
    pub headers: Vec<(String, String)>,
    pub value: Option<String>,
}

impl Record {
    /// The first header named `name`, as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The record as one JSON object (what `devstack watch` prints).
    pub fn to_json(&self) -> serde_json::Value {
        let headers: serde_json::Map<String, serde_json::Value> = self
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        let value = self.value.as_deref().map(|v| {
            serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.to_owned()))
        });
        serde_json::json!({
            "partition": self.partition,
            "offset": self.offset,
            "timestamp_ms": self.timestamp_ms,
            "key": self.key,
            "headers": headers,
            "value": value,
        })
    }
}

/// Reads every partition of one topic from a chosen start, without a
/// consumer group commit.
pub struct TopicReader {
    consumer: StreamConsumer,
    pub partitions: i32,
}

impl TopicReader {
    /// Assigns all partitions of `topic`, from the beginning or the end.
    pub fn new(bootstrap: &str, topic: &str, from_beginning: bool) -> anyhow::Result<TopicReader> {
        Self::with_isolation(bootstrap, topic, from_beginning, false)
    }

    /// Like [`TopicReader::new`]; `read_committed` hides records of open or
    /// aborted Kafka transactions.
    pub fn with_isolation(
        bootstrap: &str,
        topic: &str,
        from_beginning: bool,
        read_committed: bool,
    ) -> anyhow::Result<TopicReader> {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set(
                "isolation.level",
                if read_committed {
                    "read_committed"
                } else {
                    "read_uncommitted"
                },
            )
            .set(
                "group.id",
                format!("devstack-reader-{}", std::process::id()),
            )
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set(
                "auto.offset.reset",
                if from_beginning { "earliest" } else { "latest" },
            )
            .create()
            .context("creating Kafka consumer")?;
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .with_context(|| format!("fetching metadata of topic {topic}"))?;
        let partitions = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .map(|t| t.partitions().len() as i32)
            .unwrap_or(0);
        if partitions == 0 {
            bail!("topic {topic} does not exist or has no partitions");
        }
        let mut assignment = TopicPartitionList::new();
        let start = if from_beginning {
            Offset::Beginning
        } else {
            Offset::End
        };
        for p in 0..partitions {
            assignment
                .add_partition_offset(topic, p, start)
                .context("building partition assignment")?;
        }
        consumer
            .assign(&assignment)
            .context("assigning partitions")?;
        Ok(TopicReader {
            consumer,
            partitions,
        })
    }

    /// The next record, or `None` when nothing arrives within `wait`.
    pub async fn next(&self, wait: Duration) -> anyhow::Result<Option<Record>> {
        match tokio::time::timeout(wait, self.consumer.recv()).await {
            Err(_) => Ok(None),
            Ok(Err(e)) => Err(e).context("reading from Kafka"),
            Ok(Ok(msg)) => {
                let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
                let headers = msg
                    .headers()
                    .map(|hs| {
                        hs.iter()
                            .map(|h| (h.key.to_owned(), h.value.map(text).unwrap_or_default()))
                            .collect()
                    })
                    .unwrap_or_default();
                Ok(Some(Record {
                    partition: msg.partition(),
                    offset: msg.offset(),
                    timestamp_ms: msg.timestamp().to_millis(),
                    key: msg.key().map(text),
                    headers,
                    value: msg.payload().map(text),
                }))
            }
        }
    }

    /// Reads until at least `count` records arrived (or `timeout` passed),
    /// then keeps reading until `quiet` passes with nothing new, so extra
    /// records (duplicates) are seen too.
    pub async fn read_at_least(
        &self,
        count: usize,
        timeout: Duration,
        quiet: Duration,
    ) -> anyhow::Result<Vec<Record>> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            if let Some(r) = self.next(left.min(Duration::from_millis(500))).await? {
                out.push(r);
            }
        }
        while let Some(r) = self.next(quiet).await? {
            out.push(r);
        }
        Ok(out)
    }
}
