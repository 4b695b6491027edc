//! Tests of `dedupe.rs`.

use super::*;
use crate::lsn::Lsn;

#[test]
fn murmur2_matches_kafkas_reference_values() {
    // The Java client's test vectors (as signed 32-bit ints).
    let cases: [(&[u8], i32); 6] = [
        (b"21", -973_932_308),
        (b"foobar", -790_332_482),
        (b"a-little-bit-long-string", -985_981_536),
        (b"a-little-bit-longer-string", -1_486_304_829),
        (
            b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
            -58_897_971,
        ),
        (b"abc", 479_470_107),
    ];
    for (key, expected) in cases {
        assert_eq!(
            murmur2(key) as i32,
            expected,
            "{}",
            String::from_utf8_lossy(key)
        );
    }
}

#[test]
fn partition_is_stable_and_in_range() {
    for n in 1..20 {
        for key in [&b"42"[..], b"", b"user-7", b"\xff\xfe"] {
            let p = partition_for(key, n);
            assert!((0..n).contains(&p));
            assert_eq!(p, partition_for(key, n));
        }
    }
    assert_eq!(partition_for(b"x", 0), 0, "no partitions is treated as one");
}

#[test]
fn step_back_widens_geometrically_down_to_low() {
    let mut start = 999;
    let mut starts = Vec::new();
    while start > 10 {
        start = step_back(10, 1000, start);
        starts.push(start);
    }
    assert_eq!(starts, vec![936, 10]);
    assert_eq!(step_back(0, 1_000_000, 999_999), 1_000_000 - 64);
    assert_eq!(step_back(0, 1_000_000, 1_000_000 - 64), 1_000_000 - 4096);
    assert_eq!(step_back(5, 6, 5), 5, "never below low");
}

#[test]
fn holds_compares_per_partition() {
    let state = TopicState {
        partitions: 2,
        last: vec![Some((Lsn(100), 2)), None],
    };
    assert!(state.holds(0, (Lsn(100), 2)));
    assert!(state.holds(0, (Lsn(90), 7)));
    assert!(!state.holds(0, (Lsn(100), 3)));
    assert!(!state.holds(0, (Lsn(101), 0)));
    assert!(
        !state.holds(1, (Lsn(1), 0)),
        "empty partition holds nothing"
    );
    assert!(
        !state.holds(5, (Lsn(1), 0)),
        "unknown partition holds nothing"
    );
}
