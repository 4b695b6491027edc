//! The CopyBoth phase: XLogData and keepalives in, standby status out.
//!
//! ```text
//!  CopyData 'w' | walStart i64 | walEnd i64 | sendTime i64 | pgoutput bytes
//!  CopyData 'k' | walEnd i64   | sendTime i64 | replyRequested u8
//!  CopyData 'r' | written i64  | flushed i64  | applied i64 | clock i64 | reply u8   (ours)
//! ```
//!
//! Times are microseconds since 2000-01-01 00:00:00 UTC (the Postgres epoch).

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio_util::codec::Framed;
use tracing::debug;

use super::codec::{Backend, BoxedIo, PgCodec};
use super::conn::log_notice;
use super::error::{ReplicationError, ServerError};
use crate::lsn::Lsn;

/// Seconds from the Unix epoch to the Postgres epoch (2000-01-01 UTC).
const PG_EPOCH_UNIX_SECS: u64 = 946_684_800;

/// How long `finish` waits for the server to end the stream.
const FINISH_TIMEOUT: Duration = Duration::from_secs(5);

/// One message of the replication stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// WAL data: one pgoutput message in `data`.
    XLogData {
        /// Start of the WAL this message came from (0/0 for some messages).
        wal_start: Lsn,
        /// Current end of WAL on the server.
        wal_end: Lsn,
        /// Server clock when sent, microseconds since 2000-01-01 UTC.
        server_time_micros: i64,
        data: Bytes,
    },
    /// Primary keepalive. When `reply_requested`, answer soon with
    /// [`ReplicationStream::send_status`] or the server will time out.
    Keepalive {
        wal_end: Lsn,
        server_time_micros: i64,
        reply_requested: bool,
    },
}

impl ReplicationMessage {
    /// Parses the payload of a CopyData message. Never panics: anything
    /// malformed is a [`ReplicationError::Protocol`].
    pub fn parse(payload: Bytes) -> Result<ReplicationMessage, ReplicationError> {
        let too_short = |kind: &str| {
            ReplicationError::Protocol(format!(
                "{kind} message too short ({} bytes)",
                payload.len()
            ))
        };
        let i64_at = |at: usize| -> Option<i64> {
            let bytes = payload.get(at..at + 8)?;
            Some(i64::from_be_bytes(bytes.try_into().ok()?))
        };
        let lsn_at = |at: usize| i64_at(at).map(|v| Lsn(v as u64));
        match payload.first() {
            Some(b'w') => {
                let (Some(wal_start), Some(wal_end), Some(server_time_micros)) =
                    (lsn_at(1), lsn_at(9), i64_at(17))
                else {
                    return Err(too_short("XLogData"));
                };
                Ok(ReplicationMessage::XLogData {
                    wal_start,
                    wal_end,
                    server_time_micros,
                    data: payload.slice(25..),
                })
            }
            Some(b'k') => {
                let (Some(wal_end), Some(server_time_micros), Some(&reply)) =
                    (lsn_at(1), i64_at(9), payload.get(17))
                else {
                    return Err(too_short("keepalive"));
                };
                if payload.len() != 18 {
                    return Err(ReplicationError::Protocol(format!(
                        "keepalive message of {} bytes, expected 18",
                        payload.len()
                    )));
                }
                Ok(ReplicationMessage::Keepalive {
                    wal_end,
                    server_time_micros,
                    reply_requested: reply != 0,
                })
            }
            Some(&tag) => Err(ReplicationError::Protocol(format!(
                "unknown replication message tag {tag:#04x}"
            ))),
            None => Err(ReplicationError::Protocol("empty CopyData message".into())),
        }
    }
}

/// The streaming half of a replication connection (after START_REPLICATION).
pub struct ReplicationStream {
    framed: Framed<BoxedIo, PgCodec>,
    slot: String,
}

impl fmt::Debug for ReplicationStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicationStream")
            .field("slot", &self.slot)
            .finish_non_exhaustive()
    }
}

impl ReplicationStream {
    pub(crate) fn new(framed: Framed<BoxedIo, PgCodec>, slot: String) -> Self {
        ReplicationStream { framed, slot }
    }

    /// Next XLogData or keepalive.
    ///
    /// Cancel-safe: partial messages stay in the read buffer inside
    /// `self`, so dropping this future (a losing `select!` branch, a
    /// timeout) loses nothing; the next call continues where it stopped.
    ///
    /// Errors: the server's ErrorResponse ([`ReplicationError::Server`]),
    /// the server ending the stream ([`ReplicationError::StreamEnded`]),
    /// EOF ([`ReplicationError::ConnectionLost`]), I/O and protocol errors.
    /// The stream is unusable after an error.
    pub async fn recv(&mut self) -> Result<ReplicationMessage, ReplicationError> {
        loop {
            // `next()` on `Framed` is the only await point: cancel-safe.
            let msg = match self.framed.next().await {
                Some(Ok(msg)) => msg,
                Some(Err(err)) => return Err(ReplicationError::from_io(err)),
                None => return Err(ReplicationError::ConnectionLost),
            };
            match msg {
                Backend::Message(Message::CopyData(body)) => {
                    return ReplicationMessage::parse(body.into_bytes())
                }
                Backend::Message(Message::CopyDone) => return Err(ReplicationError::StreamEnded),
                Backend::Message(Message::ErrorResponse(body)) => {
                    return Err(match ServerError::from_fields(body.fields()) {
                        Ok(error) => ReplicationError::Server {
                            context: "replication stream",
                            error: Box::new(error),
                        },
                        Err(err) => ReplicationError::from_io(err),
                    });
                }
                Backend::Message(Message::NoticeResponse(body)) => log_notice(body.fields()),
                Backend::Message(Message::ParameterStatus(_)) => {}
                _ => {
                    return Err(ReplicationError::Protocol(
                        "unexpected message in the replication stream".into(),
                    ))
                }
            }
        }
    }

    /// Sends a standby status update: WAL up to `flushed` may be released
    /// by the server and becomes the slot's `confirmed_flush_lsn`. Postgres
    /// only looks at `flushed` for logical slots; pass the same or later
    /// positions for `written`/`applied`. One small write and flush, cheap
    /// enough after every confirmation.
    ///
    /// Not cancel-safe: a cancelled call may leave a partial message buffered.
    pub async fn send_status(
        &mut self,
        written: Lsn,
        flushed: Lsn,
        applied: Lsn,
        reply_requested: bool,
    ) -> Result<(), ReplicationError> {
        let mut payload = BytesMut::with_capacity(34);
        payload.put_u8(b'r');
        payload.put_u64(written.0);
        payload.put_u64(flushed.0);
        payload.put_u64(applied.0);
        payload.put_i64(now_pg_micros());
        payload.put_u8(u8::from(reply_requested));
        let mut buf = BytesMut::with_capacity(40);
        frontend::CopyData::new(payload.freeze())
            .map_err(ReplicationError::Io)?
            .write(&mut buf);
        self.framed
            .send(buf.freeze())
            .await
            .map_err(ReplicationError::from_io)
    }

    /// Ends streaming, best effort: CopyDone, wait (bounded) for the server
    /// to end its side, which releases the slot, then Terminate. Pending
    /// WAL messages are discarded; they will be streamed again from the
    /// slot's confirmed position next time.
    pub async fn finish(mut self) -> Result<(), ReplicationError> {
        let mut buf = BytesMut::new();
        frontend::copy_done(&mut buf);
        self.framed
            .send(buf.split().freeze())
            .await
            .map_err(ReplicationError::from_io)?;
        let drained = tokio::time::timeout(FINISH_TIMEOUT, async {
            loop {
                match self.framed.next().await {
                    Some(Ok(Backend::Message(Message::ReadyForQuery(_)))) | None => return Ok(()),
                    Some(Ok(_)) => {}
                    Some(Err(err)) => return Err(ReplicationError::from_io(err)),
                }
            }
        })
        .await;
        frontend::terminate(&mut buf);
        let terminated = self.framed.send(buf.freeze()).await;
        let _ = self.framed.close().await;
        debug!(slot = %self.slot, "replication stream finished");
        match drained {
            Ok(result) => result?,
            Err(_elapsed) => {
                return Err(ReplicationError::Protocol(format!(
                    "server did not end the stream within {FINISH_TIMEOUT:?}"
                )))
            }
        }
        terminated.map_err(ReplicationError::from_io)
    }
}

/// Now as microseconds since 2000-01-01 UTC.
fn now_pg_micros() -> i64 {
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let micros = unix.as_micros() as i64;
    micros - (PG_EPOCH_UNIX_SECS as i64) * 1_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_xlogdata_and_keepalive() {
        let mut w = vec![b'w'];
        w.extend(0x16_0000_0010u64.to_be_bytes());
        w.extend(0x16_0000_0020u64.to_be_bytes());
        w.extend(42i64.to_be_bytes());
        w.extend(b"B...");
        assert_eq!(
            ReplicationMessage::parse(Bytes::from(w)).unwrap(),
            ReplicationMessage::XLogData {
                wal_start: Lsn(0x16_0000_0010),
                wal_end: Lsn(0x16_0000_0020),
                server_time_micros: 42,
                data: Bytes::from_static(b"B..."),
            }
        );
        let mut k = vec![b'k'];
        k.extend(7u64.to_be_bytes());
        k.extend((-1i64).to_be_bytes());
        k.push(1);
        assert_eq!(
            ReplicationMessage::parse(Bytes::from(k)).unwrap(),
            ReplicationMessage::Keepalive {
                wal_end: Lsn(7),
                server_time_micros: -1,
                reply_requested: true,
            }
        );
    }

    #[test]
    fn rejects_truncated_and_unknown_messages() {
        let mut w = vec![b'w'];
        w.extend([0u8; 24]);
        for len in 0..w.len() {
            assert!(ReplicationMessage::parse(Bytes::copy_from_slice(&w[..len])).is_err());
        }
        let mut k = vec![b'k'];
        k.extend([0u8; 17]);
        for len in 0..k.len() {
            assert!(ReplicationMessage::parse(Bytes::copy_from_slice(&k[..len])).is_err());
        }
        k.push(0);
        assert!(ReplicationMessage::parse(Bytes::from(k)).is_err());
        assert!(ReplicationMessage::parse(Bytes::from_static(b"x123")).is_err());
    }

    #[test]
    fn clock_is_after_2020() {
        // 2020-01-01 is 631152000 s after the Postgres epoch.
        assert!(now_pg_micros() > 631_152_000 * 1_000_000);
    }
}
