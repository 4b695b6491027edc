//! Message framing for the replication connection.
//!
//! Backend messages are `tag: u8, length: i32 (including itself), body`.
//! `postgres_protocol::message::backend::Message::parse` decodes every
//! message we need except CopyBothResponse (`W`), which this codec frames
//! itself. Frontend messages are written by `postgres_protocol`'s
//! `frontend` functions and passed through as bytes.
//!
//! The decoder keeps partial messages in the `Framed` read buffer, which is
//! what makes `ReplicationStream::recv` cancel-safe.

use std::io;

use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::message::backend::Message;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Decoder, Encoder};

/// Tag of CopyBothResponse, unknown to `postgres_protocol`.
const COPY_BOTH_RESPONSE_TAG: u8 = b'W';

/// Largest message body accepted (Postgres limits a message to 1 GB; the
/// extra room covers the XLogData header around a maximal payload).
const MAX_MESSAGE_LEN: usize = (1 << 30) + 1024;

/// A decoded backend message.
pub(crate) enum Backend {
    Message(Message),
    /// The server entered CopyBoth mode (after START_REPLICATION).
    CopyBothResponse,
}

/// Decoder of backend messages, pass-through encoder of frontend bytes.
#[derive(Debug, Default)]
pub(crate) struct PgCodec;

impl Decoder for PgCodec {
    type Item = Backend;
    type Error = io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> io::Result<Option<Backend>> {
        let Some(header) = src.get(..5) else {
            return Ok(None);
        };
        let tag = header[0];
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if !(4..=MAX_MESSAGE_LEN).contains(&len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("invalid length {len} of backend message {:?}", tag as char),
            ));
        }
        if tag != COPY_BOTH_RESPONSE_TAG {
            return Ok(Message::parse(src)?.map(Backend::Message));
        }
        if src.len() < 1 + len {
            src.reserve(1 + len - src.len());
            return Ok(None);
        }
        let mut body = src.split_to(1 + len);
        body.advance(5);
        // Int8 overall format, Int16 column count, Int16 per column. The
        // formats do not matter to us (replication data is binary in CopyData).
        if body.len() < 3 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "CopyBothResponse too short",
            ));
        }
        Ok(Some(Backend::CopyBothResponse))
    }
}

impl Encoder<Bytes> for PgCodec {
    type Error = io::Error;

    fn encode(&mut self, item: Bytes, dst: &mut BytesMut) -> io::Result<()> {
        dst.extend_from_slice(&item);
        Ok(())
    }
}

/// The byte stream under the codec: TCP, Unix socket, or TLS over TCP.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub(crate) type BoxedIo = Box<dyn Io>;

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn decodes_copy_both_and_others_byte_by_byte() {
        let mut wire = frame(b'W', &[0, 0, 0]);
        wire.extend(frame(b'Z', b"I"));
        wire.extend(frame(b'd', b"wxyz"));
        let mut codec = PgCodec;
        let mut buf = BytesMut::new();
        let mut tags = Vec::new();
        for byte in wire {
            buf.extend_from_slice(&[byte]);
            while let Some(msg) = codec.decode(&mut buf).unwrap() {
                tags.push(match msg {
                    Backend::CopyBothResponse => 'W',
                    Backend::Message(Message::ReadyForQuery(_)) => 'Z',
                    Backend::Message(Message::CopyData(body)) => {
                        assert_eq!(body.data(), b"wxyz");
                        'd'
                    }
                    Backend::Message(_) => '?',
                });
            }
        }
        assert_eq!(tags, ['W', 'Z', 'd']);
        assert!(buf.is_empty());
    }

    #[test]
    fn rejects_bad_lengths_and_garbage_without_panicking() {
        let mut codec = PgCodec;
        for wire in [
            vec![b'W', 0, 0, 0, 3],
            vec![b'd', 0xFF, 0xFF, 0xFF, 0xFF],
            frame(b'W', &[0]),
        ] {
            assert!(codec.decode(&mut BytesMut::from(&wire[..])).is_err());
        }
        // Arbitrary bytes: errors or waits for more, never panics.
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..2000 {
            let mut wire = Vec::new();
            for _ in 0..(seed % 40) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                wire.push(seed as u8);
            }
            if wire.len() > 4 {
                wire[1] = 0;
                wire[2] = 0;
            }
            let mut buf = BytesMut::from(&wire[..]);
            while let Ok(Some(_)) = codec.decode(&mut buf) {}
        }
    }
}
