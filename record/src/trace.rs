//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>): the
//! `traceparent` and `tracestate` values that follow one order from the HTTP
//! request through its outbox row, its Kafka record's headers and the
//! notifier's email.
//!
//! ```text
//!  traceparent  00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01
//!               │  │                                │                └ flags (01: sampled)
//!               │  └ trace id: 16 bytes, the whole journey   └ parent id: 8 bytes, the caller's span
//!               └ version
//! ```
//!
//! Parsing is the specification's: lowercase hex, ids not all zeros,
//! version `ff` invalid; a later version is read by its first four fields.
//! A value that does not parse is not continued: the receiver starts a
//! trace of its own, as the specification asks.

use std::fmt;

/// The name of the header (HTTP, Kafka, email) and outbox column carrying
/// the trace context.
pub const TRACEPARENT: &str = "traceparent";
/// Vendor-specific trace data travelling beside `traceparent`.
pub const TRACESTATE: &str = "tracestate";
/// Longest `tracestate` passed on; the specification's limit for
/// propagating one is 512 characters.
pub const MAX_TRACESTATE: usize = 512;

/// One parsed `traceparent`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    /// The span of the caller: the parent of whoever continues this trace.
    pub parent_id: [u8; 8],
    pub flags: u8,
}

/// Why a `traceparent` was not accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid traceparent {value:?}: {why}")]
pub struct InvalidTraceParent {
    pub value: String,
    pub why: &'static str,
}

impl TraceParent {
    /// The `sampled` flag: the caller may have recorded its span.
    pub const SAMPLED: u8 = 0x01;

    /// Parses a `traceparent` header value.
    pub fn parse(value: &str) -> Result<TraceParent, InvalidTraceParent> {
        let invalid = |why| InvalidTraceParent {
            value: value.chars().take(80).collect(),
            why,
        };
        let v = value.trim_matches([' ', '\t']);
        let bytes = v.as_bytes();
        if bytes.len() < 55 {
            return Err(invalid("shorter than version-traceid-parentid-flags"));
        }
        let version = hex::<1>(&v[0..2]).ok_or_else(|| invalid("version is not 2 hex digits"))?[0];
        if version == 0xff {
            return Err(invalid("version ff is invalid"));
        }
        // Version 00 is exactly 55 characters; a later one may append
        // fields after a dash.
        if (version == 0 && bytes.len() != 55) || (bytes.len() > 55 && bytes[55] != b'-') {
            return Err(invalid("wrong length for its version"));
        }
        if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return Err(invalid("fields are not separated by '-'"));
        }
        let trace_id =
            hex::<16>(&v[3..35]).ok_or_else(|| invalid("trace id is not 32 hex digits"))?;
        let parent_id =
            hex::<8>(&v[36..52]).ok_or_else(|| invalid("parent id is not 16 hex digits"))?;
        let flags = hex::<1>(&v[53..55]).ok_or_else(|| invalid("flags are not 2 hex digits"))?[0];
        if trace_id == [0; 16] {
            return Err(invalid("trace id is all zeros"));
        }
        if parent_id == [0; 8] {
            return Err(invalid("parent id is all zeros"));
        }
        Ok(TraceParent {
            trace_id,
            parent_id,
            // Only the sampled flag is defined for version 00.
            flags: if version == 0 {
                flags
            } else {
                flags & Self::SAMPLED
            },
        })
    }

    /// A new trace: random ids, sampled.
    pub fn root() -> TraceParent {
        TraceParent {
            trace_id: nonzero(),
            parent_id: nonzero(),
            flags: Self::SAMPLED,
        }
    }

    /// The same trace with a new span of ours as the parent of what comes
    /// next: what a service passes on after receiving `self`.
    pub fn child(&self) -> TraceParent {
        TraceParent {
            parent_id: nonzero(),
            ..*self
        }
    }

    pub fn is_sampled(&self) -> bool {
        self.flags & Self::SAMPLED != 0
    }

    /// The trace id as 32 lowercase hex digits: what logs, emails and
    /// tracing back ends show.
    pub fn trace_id_hex(&self) -> String {
        to_hex(&self.trace_id)
    }

    pub fn parent_id_hex(&self) -> String {
        to_hex(&self.parent_id)
    }
}

/// Formats as version 00, the only version this side writes.
impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            to_hex(&self.trace_id),
            to_hex(&self.parent_id),
            self.flags
        )
    }
}

/// A `tracestate` worth passing on: at most [`MAX_TRACESTATE`] characters
/// of printable ASCII. Anything else is dropped (the specification lets a
/// receiver discard a `tracestate` it cannot pass on whole).
pub fn accept_tracestate(value: &str) -> Option<&str> {
    let v = value.trim_matches([' ', '\t']);
    (!v.is_empty() && v.len() <= MAX_TRACESTATE && v.bytes().all(|b| (0x20..0x7f).contains(&b)))
        .then_some(v)
}

fn hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let digit = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    };
    let bytes = s.as_bytes();
    if bytes.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

fn to_hex(bytes: &[u8]) -> String {
    use fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn nonzero<const N: usize>() -> [u8; N] {
    loop {
        let id: [u8; N] = rand::random();
        if id != [0; N] {
            return id;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_specifications_example_round_trips() {
        let tp = TraceParent::parse(EXAMPLE).unwrap();
        assert_eq!(tp.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tp.parent_id_hex(), "00f067aa0ba902b7");
        assert!(tp.is_sampled());
        assert_eq!(tp.to_string(), EXAMPLE);
    }

    #[test]
    fn invalid_values_are_refused_with_a_reason() {
        for (value, why) in [
            ("", "shorter"),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
                "shorter",
            ),
            (
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "version ff",
            ),
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                "trace id",
            ),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                "all zeros",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                "all zeros",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
                "length",
            ),
            (
                "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "separated",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bz-01",
                "parent id",
            ),
        ] {
            let err = TraceParent::parse(value).unwrap_err();
            assert!(err.why.contains(why), "{value:?}: {err}");
        }
    }

    #[test]
    fn a_later_version_is_read_by_its_first_fields() {
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03-extra";
        let tp = TraceParent::parse(later).unwrap();
        assert_eq!(tp.flags, TraceParent::SAMPLED);
        assert!(tp
            .to_string()
            .starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
    }

    #[test]
    fn a_child_keeps_the_trace_and_flags_with_a_new_parent() {
        let tp = TraceParent::parse(EXAMPLE).unwrap();
        let child = tp.child();
        assert_eq!(child.trace_id, tp.trace_id);
        assert_eq!(child.flags, tp.flags);
        assert_ne!(child.parent_id, tp.parent_id);
        assert_eq!(TraceParent::parse(&child.to_string()).unwrap(), child);
    }

    #[test]
    fn roots_are_new_sampled_traces() {
        let (a, b) = (TraceParent::root(), TraceParent::root());
        assert_ne!(a.trace_id, b.trace_id);
        assert!(a.is_sampled());
        assert_eq!(TraceParent::parse(&a.to_string()).unwrap(), a);
    }

    #[test]
    fn tracestate_is_passed_on_only_when_printable_and_short() {
        assert_eq!(
            accept_tracestate(" congo=t61rcWkgMzE "),
            Some("congo=t61rcWkgMzE")
        );
        assert_eq!(accept_tracestate(""), None);
        assert_eq!(accept_tracestate("a=\u{7f}"), None);
        assert_eq!(accept_tracestate(&"a".repeat(513)), None);
    }
}
