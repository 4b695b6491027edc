//! Admitting a record to the sink, in stream order: its partition and
//! whether that partition already holds it (`Sink::place`), the Kafka
//! transaction it joins with `--kafka-transactions`, its place in the
//! checkpoint, then the sink itself, which may push back (`held`).

use super::*;
use crate::message;

/// An outbox row made a record, waiting for its topic to be ready.
pub(super) struct PendingInsert {
    pub(super) record: OutboxRecord,
    pub(super) txn: TxnId,
    pub(super) at: dedupe::Position,
    /// A dead-lettered event's reference (see `dead_letter`).
    pub(super) diverted: bool,
    /// A malformed event message, dead-lettered for this reason (see
    /// `message`).
    pub(super) malformed: Option<String>,
    /// A non-transactional event message is a transaction of its own,
    /// committed at this position once its record is queued.
    pub(super) then_commit: Option<Lsn>,
}

impl Session<'_> {
    /// Admits a record now, or hands it back when its topic must be
    /// readied first.
    pub(super) fn stage<S: Sink>(
        &self,
        pending: PendingInsert,
        sink: &mut S,
        st: &mut StreamState,
    ) -> Result<Option<PendingInsert>, RelayError> {
        if !sink.has_topic(&pending.record.topic) {
            return Ok(Some(pending));
        }
        self.admit(pending, sink, st)?;
        Ok(None)
    }

    /// Places a record (its partition, and whether that partition already
    /// holds it) and queues it for the sink, in a Kafka transaction when
    /// the sink is transactional.
    pub(super) fn admit<S: Sink>(
        &self,
        pending: PendingInsert,
        sink: &mut S,
        st: &mut StreamState,
    ) -> Result<(), RelayError> {
        let (txn, then_commit) = (pending.txn, pending.then_commit);
        self.admit_record(pending, sink, st)?;
        if let Some(end) = then_commit {
            self.shared.metrics.transactions.inc();
            st.cp.commit(txn, end);
        }
        Ok(())
    }

    fn admit_record<S: Sink>(
        &self,
        pending: PendingInsert,
        sink: &mut S,
        st: &mut StreamState,
    ) -> Result<(), RelayError> {
        let PendingInsert {
            mut record,
            txn,
            at,
            diverted,
            malformed,
            then_commit: _,
        } = pending;
        let duplicate = sink.place(&mut record, at) == Placement::Duplicate;
        if let Some(open) = st.open.as_mut() {
            if duplicate {
                open.skipped += 1;
            } else {
                open.produced += 1;
            }
            // A Kafka transaction holds whole Postgres transactions and
            // commits atomically: the partitions' ends cannot show part of
            // one. If they seem to, they were read before every partition
            // had its transaction marker (acting on it would duplicate), or
            // a reader erred (it could lose the rest).
            if sink.transactional()
                && open.skipped > 0
                && open.produced > 0
                && self.accept_partial != Some(open.info.commit_lsn)
            {
                return Err(RelayError::PartialTransaction {
                    commit_lsn: open.info.commit_lsn,
                });
            }
        }
        if duplicate {
            self.shared.metrics.duplicates_skipped.inc();
            return Ok(());
        }
        if let Some(reason) = malformed {
            self.shared.metrics.dead_lettered.inc();
            self.shared
                .metrics
                .message_refused(message::REFUSED_MALFORMED);
            tracing::warn!(topic = %record.topic, lsn = %at.0, seq = at.1, %reason,
                "producing a malformed event message to the dead-letter topic");
        } else if diverted {
            self.shared.metrics.dead_lettered.inc();
            tracing::warn!(topic = %record.topic, lsn = %at.0, seq = at.1,
                "producing a dead-lettered event's reference instead of the event");
        }
        if sink.transactional() {
            if st.kbatch.is_none() {
                sink.begin_transaction()?;
                st.kbatch = Some(KafkaBatch {
                    started: Instant::now(),
                    records: 0,
                    txns: Vec::new(),
                    first: at,
                    last: at,
                });
            }
            if let Some(b) = st.kbatch.as_mut() {
                b.add(txn, at);
            }
        }
        st.cp.record_sent(txn);
        st.held.push_back((record, txn));
        self.send_held(sink, st)
    }

    /// Hands held records to the sink in order until it pushes back.
    pub(super) fn send_held<S: Sink>(
        &self,
        sink: &mut S,
        st: &mut StreamState,
    ) -> Result<(), RelayError> {
        while let Some((record, txn)) = st.held.pop_front() {
            match sink.try_send(record, txn) {
                Ok(()) => {}
                Err(SendError::Full(record)) => {
                    st.held.push_front((record, txn));
                    break;
                }
                Err(SendError::Refused(e)) => return Err(e),
            }
        }
        Ok(())
    }
}
