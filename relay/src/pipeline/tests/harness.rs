//! The harness of the apply loop's tests: a scripted Postgres side
//! ([`ScriptedWal`], hand-made pgoutput messages from [`Txn`]s), an
//! in-memory sink that keeps what it "delivered" in order ([`MemorySink`],
//! with backpressure, failures, transactions and slow topic preparation on
//! request, in `memory_sink.rs`), and [`run_loop`], one session's apply
//! loop over a script.

use std::sync::Arc;

use bytes::Bytes;
use clap::Parser;

use super::super::*;
use super::memory_sink::MemorySink;
use crate::event::{TopicRouting, ValueFormat};
use crate::pgoutput::wire::{Col, Msg};

const OUTBOX_OID: u32 = 16384;
const OTHER_OID: u32 = 16390;

// ---- the Postgres side ------------------------------------------------

/// Plays back WAL messages, then waits; records every status update, and
/// ends the session (cancels `shutdown`) once `stop_at` is confirmed.
pub(super) struct ScriptedWal {
    pub(super) script: VecDeque<ReplicationMessage>,
    pub(super) statuses: Vec<(tokio::time::Instant, Lsn)>,
    pub(super) stop_at: Lsn,
    pub(super) shutdown: CancellationToken,
}

impl WalSource for ScriptedWal {
    async fn recv(&mut self) -> Result<ReplicationMessage, ReplicationError> {
        match self.script.pop_front() {
            Some(msg) => Ok(msg),
            None => std::future::pending().await,
        }
    }

    async fn send_status(&mut self, confirmed: Lsn) -> Result<(), ReplicationError> {
        self.statuses.push((tokio::time::Instant::now(), confirmed));
        if confirmed >= self.stop_at {
            self.shutdown.cancel();
        }
        Ok(())
    }
}

pub(super) fn xlog(data: Vec<u8>, wal_end: u64) -> ReplicationMessage {
    ReplicationMessage::XLogData {
        wal_start: Lsn(wal_end),
        wal_end: Lsn(wal_end),
        server_time_micros: 0,
        data: Bytes::from(data),
    }
}

/// The outbox table as the relay sees it: id, user_id, event_type, topic,
/// payload.
pub(super) fn outbox_relation() -> Vec<u8> {
    let cols: [(&str, u32); 5] = [
        ("id", 20),
        ("user_id", 25),
        ("event_type", 25),
        ("topic", 25),
        ("payload", 3802),
    ];
    cols.iter()
        .fold(
            Msg::new(b'R')
                .u32(OUTBOX_OID)
                .cstr("public")
                .cstr("outbox")
                .u8(b'd')
                .u16(cols.len() as u16),
            |m, (name, oid)| m.u8(u8::from(*name == "id")).cstr(name).u32(*oid).i32(-1),
        )
        .build()
}

pub(super) fn other_relation() -> Vec<u8> {
    Msg::new(b'R')
        .u32(OTHER_OID)
        .cstr("public")
        .cstr("orders")
        .u8(b'd')
        .u16(1)
        .u8(1)
        .cstr("id")
        .u32(20)
        .i32(-1)
        .build()
}

/// One outbox row: (id, user, topic column).
pub(super) struct Row(
    pub(super) u64,
    pub(super) &'static str,
    pub(super) Option<&'static str>,
);

/// A committed Postgres transaction as the walsender sends it.
pub(super) struct Txn {
    pub(super) commit_lsn: u64,
    pub(super) rows: Vec<Row>,
}

impl Txn {
    pub(super) fn end_lsn(&self) -> u64 {
        self.commit_lsn + 0x28
    }

    pub(super) fn messages(&self, with_noise: bool) -> Vec<ReplicationMessage> {
        let mut out = vec![begin(self.commit_lsn)];
        for (i, Row(id, user, topic)) in self.rows.iter().enumerate() {
            out.push(insert(self.commit_lsn, *id, user, *topic));
            if with_noise && i == 0 {
                // A row of another table in the same transaction: ignored.
                out.push(xlog(
                    Msg::new(b'I')
                        .u32(OTHER_OID)
                        .u8(b'N')
                        .tuple(&[Col::Text("7")])
                        .build(),
                    self.commit_lsn,
                ));
            }
        }
        out.push(commit(self.commit_lsn, self.end_lsn()));
        out
    }
}

fn commit_ts(commit_lsn: u64) -> i64 {
    848_570_400_000_000 + commit_lsn as i64
}

/// The Begin of the transaction that commits at `commit_lsn`.
pub(super) fn begin(commit_lsn: u64) -> ReplicationMessage {
    xlog(
        Msg::new(b'B')
            .u64(commit_lsn)
            .i64(commit_ts(commit_lsn))
            .u32(1000 + commit_lsn as u32)
            .build(),
        commit_lsn,
    )
}

/// Its Commit, ending at `end_lsn`.
pub(super) fn commit(commit_lsn: u64, end_lsn: u64) -> ReplicationMessage {
    xlog(
        Msg::new(b'C')
            .u8(0)
            .u64(commit_lsn)
            .u64(end_lsn)
            .i64(commit_ts(commit_lsn))
            .build(),
        end_lsn,
    )
}

/// An outbox row of the transaction committing at `commit_lsn`.
pub(super) fn insert(
    commit_lsn: u64,
    id: u64,
    user: &str,
    topic: Option<&str>,
) -> ReplicationMessage {
    let id = id.to_string();
    let payload = format!("{{\"n\":{id}}}");
    let topic = topic.map_or(Col::Null, Col::Text);
    xlog(
        Msg::new(b'I')
            .u32(OUTBOX_OID)
            .u8(b'N')
            .tuple(&[
                Col::Text(&id),
                Col::Text(user),
                Col::Text("OrderCreated"),
                topic,
                Col::Text(&payload),
            ])
            .build(),
        commit_lsn,
    )
}

/// A logical decoding message with prefix `outbox` written at `lsn`.
pub(super) fn event_message(transactional: bool, lsn: u64, content: &str) -> ReplicationMessage {
    xlog(
        Msg::new(b'M')
            .u8(u8::from(transactional))
            .u64(lsn)
            .cstr("outbox")
            .len_bytes(content.as_bytes())
            .build(),
        lsn,
    )
}

/// `n` transactions of `rows` rows each, ids from 1, users cycling a..e.
pub(super) fn txns(n: u64, rows: u64) -> Vec<Txn> {
    const USERS: [&str; 5] = ["a", "b", "c", "d", "e"];
    (0..n)
        .map(|t| Txn {
            commit_lsn: 0x1000 * (t + 1),
            rows: (0..rows)
                .map(|r| {
                    let id = t * rows + r + 1;
                    Row(id, USERS[(id % 5) as usize], None)
                })
                .collect(),
        })
        .collect()
}

// ---- the loop ---------------------------------------------------------

pub(super) struct Run {
    pub(super) result: Result<(), RelayError>,
    pub(super) statuses: Vec<(tokio::time::Instant, Lsn)>,
    pub(super) shared: Arc<Shared>,
}

pub(super) fn event_config(routing: TopicRouting) -> EventConfig {
    EventConfig {
        schema: "public".into(),
        table: "outbox".into(),
        key_column: "user_id".into(),
        routing,
        value_format: ValueFormat::Json,
        header_columns: Vec::new(),
        messages: crate::message::MessageConfig::default(),
    }
}

/// Runs one session's apply loop over `messages` until it confirms
/// `stop_at` or fails.
pub(super) async fn run_loop(
    messages: Vec<ReplicationMessage>,
    stop_at: u64,
    sink: &mut MemorySink,
    routing: TopicRouting,
    extra_args: &[&str],
) -> Run {
    let mut args = vec![
        "relay",
        "--database-url",
        "postgres://unused@localhost/db",
        "--lease",
        "0s",
        "--status-interval",
        "1s",
    ];
    args.extend_from_slice(extra_args);
    let cfg = Config::try_parse_from(args).expect("test arguments parse");
    let mut event_cfg = event_config(routing);
    event_cfg.messages = cfg.event_config().messages;
    let kafka_cfg = cfg.kafka_config();
    let shared = Shared::new(&cfg.slot, &cfg.publication);
    let shutdown = CancellationToken::new();
    let mut next_txn: TxnId = 0;
    let mut session = Session {
        cfg: &cfg,
        event_cfg: &event_cfg,
        kafka_cfg: &kafka_cfg,
        shared: &shared,
        shutdown: &shutdown,
        next_txn: &mut next_txn,
        accept_partial: None,
        dead_letters: &crate::dead_letter::DeadLetters::default(),
    };
    let mut wal = ScriptedWal {
        script: messages.into(),
        statuses: Vec::new(),
        stop_at: Lsn(stop_at),
        shutdown: shutdown.clone(),
    };
    let mut st = StreamState {
        cp: Checkpoint::starting_at(Lsn::ZERO, 0),
        relations: RelationCache::new(),
        open: None,
        held: VecDeque::new(),
        last_sent: Lsn::ZERO,
        confirm_armed: false,
        last_contact: Instant::now(),
        last_ack: tokio::time::Instant::now(),
        kbatch: None,
        received: Lsn::ZERO,
    };
    let result = tokio::time::timeout(
        Duration::from_secs(3600),
        session.stream_loop(&mut wal, sink, &mut st),
    )
    .await
    .expect("the loop neither confirmed the last transaction nor failed");
    Run {
        result,
        statuses: wal.statuses,
        shared: shared.clone(),
    }
}

pub(super) fn script(txns: &[Txn], noise: bool) -> Vec<ReplicationMessage> {
    let mut out = vec![xlog(other_relation(), 0), xlog(outbox_relation(), 0)];
    for t in txns {
        out.extend(t.messages(noise));
    }
    out
}

pub(super) fn ids(records: &[OutboxRecord]) -> Vec<u64> {
    records
        .iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_slice(&r.value).unwrap();
            v["id"].as_u64().expect("id")
        })
        .collect()
}

pub(super) fn header<'a>(r: &'a OutboxRecord, name: &str) -> &'a str {
    r.header(name).unwrap_or_else(|| panic!("no {name} header"))
}

pub(super) fn confirmed(statuses: &[(tokio::time::Instant, Lsn)]) -> Lsn {
    statuses.iter().map(|(_, l)| *l).max().unwrap_or(Lsn::ZERO)
}
