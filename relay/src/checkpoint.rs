//! Checkpoint: which WAL position the relay may confirm to Postgres.
//!
//! **The rule**: the relay confirms (flushes) an LSN to Postgres only after
//! Kafka has acknowledged every record at or below it. Concretely it confirms
//! the end LSN of the newest commit whose records, and all records of every
//! earlier commit, are acknowledged — never beyond. Postgres then replays
//! everything after the confirmed position on the next start, so a crash of
//! the relay, the broker or Postgres can duplicate but never lose a record.
//!
//! ```text
//!   stream order ─▶   T1 (end 0/100)   T2 (end 0/180)   T3 (open)
//!   acked records:     3/3              1/2              0/1
//!   confirmable:       0/100 ◀── stops at the first transaction not fully acked
//! ```
//!
//! When no transaction is open or unacknowledged, a position the server
//! reports (keepalive or XLogData `wal_end`) is confirmable too: every commit
//! before it was already received, so confirming it lets Postgres recycle WAL
//! while the outbox is idle.
//!
//! Transactions are identified by a [`TxnId`], a counter the Kafka sink
//! carries as each record's delivery tag.

use std::collections::VecDeque;

use crate::lsn::Lsn;

/// The pipeline's sequence number for one transaction (not the Postgres xid,
/// which wraps and repeats across replays).
pub type TxnId = u64;

#[derive(Debug)]
struct Txn {
    /// `None` until its Commit message arrives.
    end_lsn: Option<Lsn>,
    /// Records handed to Kafka and not acknowledged yet.
    outstanding: u64,
    /// Commit time, microseconds since the Unix epoch (for lag seconds).
    commit_unix_micros: i64,
}

/// Tracks transactions from Begin to full acknowledgement, in stream order.
#[derive(Debug, Default)]
pub struct Checkpoint {
    /// Transactions not yet confirmable, oldest first; `front_id` is the id
    /// of `txns[0]`.
    txns: VecDeque<Txn>,
    front_id: TxnId,
    confirmed: Lsn,
}

impl Checkpoint {
    /// Starts from the position Postgres already holds for the slot.
    pub fn new(confirmed: Lsn) -> Self {
        Self::starting_at(confirmed, 0)
    }

    /// Like [`Checkpoint::new`], numbering transactions from `first_id`.
    /// A new session continues the previous session's numbering, so a late
    /// delivery report of the previous session (an id below `first_id`) is
    /// ignored rather than mistaken for one of this session.
    pub fn starting_at(confirmed: Lsn, first_id: TxnId) -> Self {
        Checkpoint {
            txns: VecDeque::new(),
            front_id: first_id,
            confirmed,
        }
    }

    /// The id the next [`Checkpoint::begin`] will return.
    pub fn next_id(&self) -> TxnId {
        self.front_id + self.txns.len() as u64
    }

    /// The newest confirmable position.
    pub fn confirmed(&self) -> Lsn {
        self.confirmed
    }

    /// True when no transaction is open or awaiting acknowledgement.
    pub fn is_idle(&self) -> bool {
        self.txns.is_empty()
    }

    /// Transactions begun and not yet confirmable.
    pub fn pending_transactions(&self) -> usize {
        self.txns.len()
    }

    /// Commit time (Unix µs) of the oldest transaction not fully acknowledged.
    pub fn oldest_pending_commit_micros(&self) -> Option<i64> {
        self.txns.front().map(|t| t.commit_unix_micros)
    }

    /// Commit time (Unix µs) of transaction `txn`, while it is pending.
    pub fn commit_micros(&self, txn: TxnId) -> Option<i64> {
        let idx = txn.checked_sub(self.front_id)?;
        self.txns
            .get(usize::try_from(idx).ok()?)
            .map(|t| t.commit_unix_micros)
    }

    /// A new transaction begins (Begin message).
    pub fn begin(&mut self, commit_unix_micros: i64) -> TxnId {
        self.txns.push_back(Txn {
            end_lsn: None,
            outstanding: 0,
            commit_unix_micros,
        });
        self.front_id + self.txns.len() as u64 - 1
    }

    /// One record of `txn` was handed to Kafka.
    pub fn record_sent(&mut self, txn: TxnId) {
        if let Some(t) = self.get_mut(txn) {
            t.outstanding += 1;
        }
    }

    /// The transaction's Commit arrived; returns the new confirmable
    /// position if it moved.
    pub fn commit(&mut self, txn: TxnId, end_lsn: Lsn) -> Option<Lsn> {
        if let Some(t) = self.get_mut(txn) {
            t.end_lsn = Some(end_lsn);
        }
        self.advance()
    }

    /// Kafka acknowledged one record of `txn`; returns the new confirmable
    /// position if it moved.
    pub fn acked(&mut self, txn: TxnId) -> Option<Lsn> {
        if let Some(t) = self.get_mut(txn) {
            t.outstanding = t.outstanding.saturating_sub(1);
        }
        self.advance()
    }

    /// The server reported `wal_end` with nothing of ours in between:
    /// confirmable if nothing is pending. Returns the new position if moved.
    pub fn idle_position(&mut self, wal_end: Lsn) -> Option<Lsn> {
        if self.txns.is_empty() && wal_end > self.confirmed {
            self.confirmed = wal_end;
            return Some(wal_end);
        }
        None
    }

    fn get_mut(&mut self, txn: TxnId) -> Option<&mut Txn> {
        let idx = txn.checked_sub(self.front_id)?;
        self.txns.get_mut(usize::try_from(idx).ok()?)
    }

    fn advance(&mut self) -> Option<Lsn> {
        let before = self.confirmed;
        while let Some(front) = self.txns.front() {
            match front.end_lsn {
                Some(end) if front.outstanding == 0 => {
                    self.confirmed = self.confirmed.max(end);
                    self.txns.pop_front();
                    self.front_id += 1;
                }
                _ => break,
            }
        }
        (self.confirmed > before).then_some(self.confirmed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirms_only_fully_acked_prefix() {
        let mut cp = Checkpoint::new(Lsn(10));
        let t1 = cp.begin(0);
        cp.record_sent(t1);
        cp.record_sent(t1);
        assert_eq!(cp.commit(t1, Lsn(100)), None, "records still in flight");
        let t2 = cp.begin(0);
        cp.record_sent(t2);
        assert_eq!(cp.commit(t2, Lsn(200)), None);
        // t2's record acked first: t1 still blocks.
        assert_eq!(cp.acked(t2), None);
        assert_eq!(cp.acked(t1), None);
        assert_eq!(cp.confirmed(), Lsn(10));
        // t1 complete: both become confirmable at once.
        assert_eq!(cp.acked(t1), Some(Lsn(200)));
        assert!(cp.is_idle());
    }

    #[test]
    fn open_transaction_blocks_even_when_acked() {
        let mut cp = Checkpoint::new(Lsn::ZERO);
        let t = cp.begin(0);
        cp.record_sent(t);
        assert_eq!(cp.acked(t), None, "no commit yet");
        assert_eq!(cp.idle_position(Lsn(500)), None, "pending transaction");
        assert_eq!(cp.commit(t, Lsn(300)), Some(Lsn(300)));
        assert_eq!(cp.idle_position(Lsn(500)), Some(Lsn(500)));
        assert_eq!(cp.idle_position(Lsn(400)), None, "never moves backwards");
    }

    #[test]
    fn empty_transaction_confirms_on_commit() {
        let mut cp = Checkpoint::new(Lsn::ZERO);
        let t = cp.begin(0);
        assert_eq!(cp.commit(t, Lsn(42)), Some(Lsn(42)));
    }

    #[test]
    fn oldest_pending_commit_time() {
        let mut cp = Checkpoint::new(Lsn::ZERO);
        assert_eq!(cp.oldest_pending_commit_micros(), None);
        let a = cp.begin(5);
        cp.record_sent(a);
        cp.commit(a, Lsn(1));
        let b = cp.begin(7);
        assert_eq!(cp.oldest_pending_commit_micros(), Some(5));
        cp.acked(a);
        assert_eq!(cp.oldest_pending_commit_micros(), Some(7));
        cp.commit(b, Lsn(2));
        assert_eq!(cp.oldest_pending_commit_micros(), None);
    }

    #[test]
    fn stale_reports_of_an_earlier_session_are_ignored() {
        let mut old = Checkpoint::new(Lsn::ZERO);
        let t = old.begin(0);
        old.record_sent(t);
        let mut cp = Checkpoint::starting_at(Lsn(5), old.next_id());
        let fresh = cp.begin(0);
        assert_ne!(fresh, t);
        cp.record_sent(fresh);
        cp.commit(fresh, Lsn(9));
        assert_eq!(cp.acked(t), None, "the old session's ack must not count");
        assert_eq!(cp.acked(fresh), Some(Lsn(9)));
    }

    #[test]
    fn unknown_ids_are_ignored() {
        let mut cp = Checkpoint::new(Lsn::ZERO);
        assert_eq!(cp.acked(99), None);
        assert_eq!(cp.commit(3, Lsn(9)), None);
    }
}
