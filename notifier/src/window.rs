//! Window: one partition's records between its queue and its stored
//! offset — which record may start now, which waits behind an earlier record
//! of the same key, and how far the partition is handled without a gap.
//!
//! ```text
//!  queue ─▶ take(offset, key) ─▶ nothing of its key unhandled? ─yes─▶ start now
//!                                                             └─no──▶ wait behind it (FIFO per key)
//!  handled(offset, key) ─▶ the next waiting record of that key ─▶ start now
//!                      └─▶ offsets taken: 7✓ 8✓ 9· 10✓ 11·  ─▶ store 8 (the prefix ends before 9)
//! ```
//!
//! Guarantees, for records taken in increasing offset order:
//! - **Per key, in offset order, one at a time:** a record starts only once
//!   every earlier record of its key was handled. The key is the Kafka
//!   record key (the relay writes the outbox row's `user_id`); records
//!   without a key share one key, so they go one at a time too.
//! - **No gap behind the stored offset:** [`Handled::store`] is the last
//!   offset of the contiguous prefix of handled records; a record still
//!   unhandled (in flight, retrying, waiting) holds it back however many
//!   later records were handled.
//! - **Bounded:** it holds at most `capacity` records (started or waiting,
//!   and handled ones not yet in the prefix); the caller takes no record
//!   while [`Window::has_room`] is false.
//!
//! The window knows nothing of Kafka or tasks; `pipeline` starts what it
//! returns and reports what was handled.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};

/// What orders records: the Kafka record key (`None`: no key).
pub type Key = Option<Vec<u8>>;

/// One partition's taken, not yet stored records (see the module header).
pub struct Window<R> {
    capacity: usize,
    /// Every offset taken and not yet in the stored prefix, ascending, with
    /// whether its record was handled.
    offsets: VecDeque<(i64, bool)>,
    /// Keys with an unhandled started record, and the records of that key
    /// waiting behind it, in offset order.
    keys: HashMap<Key, VecDeque<R>>,
}

/// What [`Window::handled`] found.
#[derive(Debug, PartialEq, Eq)]
pub struct Handled<R> {
    /// The next record of the same key, to start now.
    pub next: Option<R>,
    /// The last offset of the handled prefix, when it grew: store it.
    pub store: Option<i64>,
}

impl<R> Window<R> {
    /// A window holding up to `capacity` (at least 1) records.
    pub fn new(capacity: usize) -> Window<R> {
        Window {
            capacity: capacity.max(1),
            offsets: VecDeque::new(),
            keys: HashMap::new(),
        }
    }

    /// Whether another record may be taken.
    pub fn has_room(&self) -> bool {
        self.offsets.len() < self.capacity
    }

    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    /// Whether `offset` comes after every offset taken: false when the
    /// partition's fetch started again from an earlier offset (a rebalance
    /// gave the partition back, or it was sought), and the window must be
    /// dropped for a new one.
    pub fn follows(&self, offset: i64) -> bool {
        self.offsets.back().is_none_or(|(last, _)| offset > *last)
    }

    /// Takes the record at `offset` (above every offset taken). Returns it
    /// when it may start now; otherwise it waits behind an unhandled record
    /// of its key and is returned by [`Window::handled`] of that record.
    pub fn take(&mut self, offset: i64, key: Key, record: R) -> Option<R> {
        debug_assert!(self.follows(offset), "offsets are taken in order");
        self.offsets.push_back((offset, false));
        match self.keys.entry(key) {
            Entry::Occupied(mut waiting) => {
                waiting.get_mut().push_back(record);
                None
            }
            Entry::Vacant(free) => {
                free.insert(VecDeque::new());
                Some(record)
            }
        }
    }

    /// The started record at `offset`, of `key`, was handled.
    pub fn handled(&mut self, offset: i64, key: &Key) -> Handled<R> {
        if let Ok(i) = self.offsets.binary_search_by_key(&offset, |(o, _)| *o) {
            self.offsets[i].1 = true;
        }
        let next = match self.keys.get_mut(key) {
            Some(waiting) => {
                let next = waiting.pop_front();
                if next.is_none() {
                    self.keys.remove(key);
                }
                next
            }
            None => None,
        };
        let mut store = None;
        while let Some(&(o, true)) = self.offsets.front() {
            store = Some(o);
            self.offsets.pop_front();
        }
        Handled { next, store }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> Key {
        Some(k.as_bytes().to_vec())
    }

    #[test]
    fn records_of_other_keys_start_at_once_and_a_key_waits_for_its_earlier_record() {
        let mut w = Window::new(10);
        assert_eq!(w.take(0, key("a"), "a0"), Some("a0"));
        assert_eq!(w.take(1, key("b"), "b1"), Some("b1"));
        assert_eq!(w.take(2, key("a"), "a2"), None);
        assert_eq!(w.take(3, key("a"), "a3"), None);
        assert_eq!(w.take(4, None, "n4"), Some("n4"));
        assert_eq!(w.take(5, None, "n5"), None);

        // b1 first: nothing of b waits, and offset 0 is still in flight.
        assert_eq!(
            w.handled(1, &key("b")),
            Handled {
                next: None,
                store: None
            }
        );
        // a0: a2 starts, and the prefix covers 0 and 1.
        assert_eq!(
            w.handled(0, &key("a")),
            Handled {
                next: Some("a2"),
                store: Some(1)
            }
        );
        assert_eq!(
            w.handled(4, &None),
            Handled {
                next: Some("n5"),
                store: None
            }
        );
        assert_eq!(
            w.handled(2, &key("a")),
            Handled {
                next: Some("a3"),
                store: Some(2)
            }
        );
        assert_eq!(
            w.handled(5, &None),
            Handled {
                next: None,
                store: None
            }
        );
        assert_eq!(
            w.handled(3, &key("a")),
            Handled {
                next: None,
                store: Some(5)
            }
        );
        assert!(w.is_empty());
        // The key is free again.
        assert_eq!(w.take(6, key("a"), "a6"), Some("a6"));
    }

    #[test]
    fn an_unhandled_record_holds_the_stored_offset_however_much_follows() {
        let mut w = Window::new(100);
        assert_eq!(w.take(10, key("stuck"), 10), Some(10));
        for o in 11..50 {
            assert_eq!(w.take(o, key(&o.to_string()), o), Some(o));
        }
        for o in 11..50 {
            assert_eq!(w.handled(o, &key(&o.to_string())).store, None);
        }
        assert_eq!(w.handled(10, &key("stuck")).store, Some(49));
    }

    #[test]
    fn capacity_counts_handled_records_behind_a_gap() {
        let mut w = Window::new(3);
        w.take(0, key("a"), ());
        w.take(1, key("b"), ());
        w.handled(1, &key("b"));
        w.take(2, key("c"), ());
        assert!(!w.has_room());
        assert_eq!(w.handled(0, &key("a")).store, Some(1));
        assert!(w.has_room());
    }

    #[test]
    fn offsets_with_gaps_and_a_restarted_fetch() {
        let mut w = Window::new(10);
        assert!(w.follows(0));
        w.take(3, key("a"), ());
        w.take(7, key("b"), ());
        assert!(w.follows(8));
        assert!(!w.follows(7));
        assert!(!w.follows(2));
        assert_eq!(w.handled(3, &key("a")).store, Some(3));
        assert_eq!(w.handled(7, &key("b")).store, Some(7));
    }

    #[test]
    fn with_capacity_one_records_go_one_at_a_time_in_offset_order() {
        let mut w = Window::new(1);
        for o in 0..5 {
            assert!(w.has_room());
            assert_eq!(w.take(o, key("k"), o), Some(o));
            assert!(!w.has_room());
            assert_eq!(w.handled(o, &key("k")).store, Some(o));
        }
    }
}
