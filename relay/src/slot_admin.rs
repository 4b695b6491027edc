//! `relay slot status` and `relay slot drop`: what an operator needs to see
//! and, deliberately, to remove the relay's replication slot.
//!
//! The relay itself never drops its slot: dropping loses every change not
//! yet confirmed (the next relay starts a new slot at the current WAL
//! position). `drop` therefore asks for `--yes`, refuses while the slot is
//! active (a relay is streaming it), and says what was lost.

use serde::Serialize;
use tokio_postgres::Client;

use crate::lsn::Lsn;
use crate::replication::{ConnectParams, ReplicationError};

#[derive(Debug, thiserror::Error)]
pub enum SlotCommandError {
    #[error("connecting to Postgres")]
    Connect(#[source] ReplicationError),
    #[error("querying Postgres")]
    Query(#[source] tokio_postgres::Error),
    #[error("slot {0} does not exist")]
    Missing(String),
    #[error("slot {slot} is active (walsender pid {pid}): stop the relay streaming it first")]
    Active { slot: String, pid: i32 },
    #[error(
        "dropping slot {0} loses every change it has not confirmed; repeat with --yes to drop it"
    )]
    NotConfirmed(String),
}

/// One row of `pg_replication_slots`, with the sizes an operator wants.
#[derive(Debug, Clone, Serialize)]
pub struct SlotInfo {
    pub slot: String,
    pub plugin: Option<String>,
    pub database: Option<String>,
    pub active: bool,
    pub active_pid: Option<i32>,
    pub restart_lsn: Option<String>,
    pub confirmed_flush_lsn: Option<String>,
    pub current_wal_lsn: String,
    /// Current WAL position minus restart_lsn: WAL Postgres keeps for the slot.
    pub retained_wal_bytes: Option<u64>,
    /// Current WAL position minus confirmed_flush_lsn.
    pub lag_bytes: Option<u64>,
    /// `reserved`, `extended`, `unreserved` or `lost` (max_slot_wal_keep_size).
    pub wal_status: Option<String>,
    pub safe_wal_size: Option<i64>,
}

pub async fn status(params: &ConnectParams, slot: &str) -> Result<SlotInfo, SlotCommandError> {
    let client = crate::replication::sql_connect(params)
        .await
        .map_err(SlotCommandError::Connect)?;
    fetch(&client, slot)
        .await?
        .ok_or_else(|| SlotCommandError::Missing(slot.to_owned()))
}

/// Drops the slot if `yes`, it exists and it is not active.
pub async fn drop_slot(
    params: &ConnectParams,
    slot: &str,
    yes: bool,
) -> Result<SlotInfo, SlotCommandError> {
    let client = crate::replication::sql_connect(params)
        .await
        .map_err(SlotCommandError::Connect)?;
    let info = fetch(&client, slot)
        .await?
        .ok_or_else(|| SlotCommandError::Missing(slot.to_owned()))?;
    if let (true, Some(pid)) = (info.active, info.active_pid) {
        return Err(SlotCommandError::Active {
            slot: slot.to_owned(),
            pid,
        });
    }
    if !yes {
        return Err(SlotCommandError::NotConfirmed(slot.to_owned()));
    }
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .map_err(SlotCommandError::Query)?;
    tracing::warn!(%slot, confirmed = ?info.confirmed_flush_lsn, "replication slot dropped by operator");
    Ok(info)
}

async fn fetch(client: &Client, slot: &str) -> Result<Option<SlotInfo>, SlotCommandError> {
    let row = client
        .query_opt(
            "SELECT slot_name::text, plugin::text, database::text, active, active_pid, \
                    restart_lsn::text, confirmed_flush_lsn::text, pg_current_wal_lsn()::text, \
                    wal_status, safe_wal_size \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(SlotCommandError::Query)?;
    Ok(row.map(|r| {
        let restart_lsn: Option<String> = r.get(5);
        let confirmed_flush_lsn: Option<String> = r.get(6);
        let current_wal_lsn: String = r.get(7);
        let current: Option<Lsn> = current_wal_lsn.parse().ok();
        let since = |lsn: &Option<String>| {
            let lsn: Lsn = lsn.as_deref()?.parse().ok()?;
            Some(current?.bytes_since(lsn))
        };
        SlotInfo {
            slot: r.get(0),
            plugin: r.get(1),
            database: r.get(2),
            active: r.get(3),
            active_pid: r.get(4),
            retained_wal_bytes: since(&restart_lsn),
            lag_bytes: since(&confirmed_flush_lsn),
            restart_lsn,
            confirmed_flush_lsn,
            current_wal_lsn,
            wal_status: r.get(8),
            safe_wal_size: r.get(9),
        }
    }))
}

impl std::fmt::Display for SlotInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        let bytes = |v: Option<u64>| v.map_or_else(|| "-".into(), |b| format!("{b} bytes"));
        writeln!(f, "slot:                {}", self.slot)?;
        writeln!(f, "plugin:              {}", opt(&self.plugin))?;
        writeln!(f, "database:            {}", opt(&self.database))?;
        let pid = self
            .active_pid
            .map_or_else(String::new, |p| format!(" (pid {p})"));
        writeln!(f, "active:              {}{pid}", self.active)?;
        writeln!(f, "restart_lsn:         {}", opt(&self.restart_lsn))?;
        writeln!(f, "confirmed_flush_lsn: {}", opt(&self.confirmed_flush_lsn))?;
        writeln!(f, "current WAL:         {}", self.current_wal_lsn)?;
        writeln!(f, "retained WAL:        {}", bytes(self.retained_wal_bytes))?;
        writeln!(f, "lag:                 {}", bytes(self.lag_bytes))?;
        write!(f, "wal_status:          {}", opt(&self.wal_status))
    }
}
