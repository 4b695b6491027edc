//! Records too large for their topic: measured before they are sent, as
//! the producer will send them, and named when refused.

use super::KafkaSink;
use crate::error::RefusedRecord;
use crate::event::OutboxRecord;

impl KafkaSink {
    /// `record` as a refusal names it.
    pub(super) fn refused(
        &self,
        record: &OutboxRecord,
        topic_limit: Option<usize>,
    ) -> RefusedRecord {
        RefusedRecord {
            event_id: record
                .header(outbox_record::header::EVENT_ID)
                .map(str::to_owned),
            bytes: record.size(),
            topic: record.topic.clone(),
            producer_limit: self.producer_limit,
            topic_limit: topic_limit.or_else(|| self.topic_limits.get(&record.topic).copied()),
        }
    }

    /// The topic's `max.message.bytes` if `record` is certainly over it:
    /// its key, value and headers alone exceed it (the broker measures the
    /// record batch, which holds all of them and more) — with zstd, its
    /// value compressed as the producer will. Refusing such a record here
    /// names it; the broker would refuse its batch, and with the gapless
    /// guarantee fail the producer when later batches were in flight (seen
    /// in the tests: the relay then replayed forever, naming nothing).
    /// A record larger than the producer's `batch.size` goes alone in its
    /// batch, so what is measured here is what the broker measures. Other
    /// codecs are not estimated: the broker decides.
    pub(super) fn over_topic_limit(&self, record: &OutboxRecord) -> Option<usize> {
        let limit = *self.topic_limits.get(&record.topic)?;
        let size = record.size() - record.topic.len();
        if size <= limit {
            return None;
        }
        let value = match self.codec.as_deref() {
            None => record.value.len(),
            Some("zstd") => {
                zstd::bulk::compress(&record.value, 0).map_or(record.value.len(), |c| c.len())
            }
            Some(_) => return None,
        };
        (size - record.value.len() + value > limit).then_some(limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::KafkaConfig;

    fn sink(properties: &[(&str, &str)]) -> KafkaSink {
        let cfg = KafkaConfig {
            bootstrap_servers: "127.0.0.1:1".into(),
            properties: properties
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            partitions: 1,
            replication: 1,
            max_in_flight_bytes: 1 << 20,
            transactional_id: None,
            skip_foreign_records: false,
        };
        let mut sink = KafkaSink::new(&cfg, true).expect("a producer (no connection yet)");
        sink.topic_limits.insert("t".into(), 1_048_588);
        sink
    }

    fn record(value: Vec<u8>) -> OutboxRecord {
        OutboxRecord {
            topic: "t".into(),
            partition: None,
            key: Some("42".into()),
            value,
            headers: vec![(outbox_record::header::EVENT_ID, "7".into())],
            column_headers: Box::new([]),
        }
    }

    #[test]
    fn records_over_the_topic_limit_are_measured_as_the_producer_will_send_them() {
        // 2 MB of JSON-like repetition: 2 MB raw, a few KB with zstd.
        let compressible = br#"{"sku":"A-1","quantity":2},"#.repeat(80_000);
        // 2 MB of noise: as large compressed.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let noise: Vec<u8> = (0..2_000_000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();

        let zstd = sink(&[]);
        assert_eq!(zstd.codec.as_deref(), Some("zstd"), "the default");
        assert_eq!(zstd.over_topic_limit(&record(compressible.clone())), None);
        assert_eq!(
            zstd.over_topic_limit(&record(noise.clone())),
            Some(1_048_588)
        );
        assert_eq!(zstd.over_topic_limit(&record(vec![b'x'; 1000])), None);

        let none = sink(&[("compression.type", "none")]);
        assert_eq!(none.codec, None);
        assert_eq!(
            none.over_topic_limit(&record(compressible)),
            Some(1_048_588)
        );
        assert_eq!(
            none.over_topic_limit(&record(noise.clone())),
            Some(1_048_588)
        );

        // Not estimated: the broker decides.
        let lz4 = sink(&[("compression.type", "lz4")]);
        assert_eq!(lz4.over_topic_limit(&record(noise)), None);
    }
}
