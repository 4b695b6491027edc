//! Slot and publication setup, run on every (re)connect before streaming.
//!
//! Reads go through an ordinary SQL connection (`tokio_postgres::Client`);
//! the slot is created through the replication connection, which returns
//! its consistent point. Nothing here ever drops a slot or a publication:
//! a slot or publication that does not fit is reported, never replaced.

use tokio_postgres::error::SqlState;
use tokio_postgres::Client;
use tracing::{info, warn};

use super::conn::ReplicationConnection;
use super::error::ReplicationError;
use super::names::{quote_ident, validate_publication_name, validate_slot_name};
use crate::lsn::Lsn;

/// The output plugin the relay decodes.
pub const PLUGIN: &str = "pgoutput";

/// A row of `pg_replication_slots`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotInfo {
    pub slot_name: String,
    /// Output plugin; `None` for a physical slot.
    pub plugin: Option<String>,
    /// `logical` or `physical`.
    pub slot_type: String,
    /// Database of a logical slot.
    pub database: Option<String>,
    /// Whether a process is streaming it now.
    pub active: bool,
    pub active_pid: Option<i32>,
    /// Last position the consumer confirmed (logical slots).
    pub confirmed_flush_lsn: Option<Lsn>,
    /// Oldest WAL the slot retains.
    pub restart_lsn: Option<Lsn>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
}

/// What [`prepare_slot`] found or did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PreparedSlot {
    /// The slot existed (possibly just created by a concurrent relay).
    Existing(SlotInfo),
    /// The slot was created; streaming may start at `consistent_point`.
    Created { consistent_point: Lsn },
}

/// Creates `publication` `FOR TABLE table WITH (publish = 'insert')` if it
/// does not exist. `table` may be schema-qualified and is resolved as SQL
/// resolves it (search_path, quoting). An existing publication is left as
/// it is, with a warning if it does not publish inserts of `table`.
/// Without a table (events only as logical decoding messages, which need
/// no publication entry) a missing publication is created with no tables.
/// Insufficient privilege (42501) is a definite error.
pub async fn ensure_publication(
    client: &Client,
    publication: &str,
    table: Option<&str>,
) -> Result<(), ReplicationError> {
    validate_publication_name(publication)?;
    let Some(table) = table else {
        return ensure_empty_publication(client, publication).await;
    };
    let resolved = client
        .query_opt(
            "SELECT n.nspname::text, c.relname::text
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.oid = to_regclass($1)",
            &[&table],
        )
        .await
        .map_err(|e| ReplicationError::from_sql("resolving the outbox table", e))?
        .ok_or_else(|| ReplicationError::TableMissing(table.to_owned()))?;
    let (schema, relname): (String, String) = (resolved.get(0), resolved.get(1));

    let existing = client
        .query_opt(
            "SELECT p.pubinsert,
                    EXISTS (SELECT 1 FROM pg_publication_tables t
                             WHERE t.pubname = p.pubname AND t.schemaname = $2 AND t.tablename = $3)
               FROM pg_publication p WHERE p.pubname = $1",
            &[&publication, &schema, &relname],
        )
        .await
        .map_err(|e| ReplicationError::from_sql("reading the publication", e))?;
    if let Some(row) = existing {
        let (publishes_inserts, includes_table): (bool, bool) = (row.get(0), row.get(1));
        if !includes_table {
            warn!(publication, table = %format!("{schema}.{relname}"), "publication exists but does not include the outbox table; its rows will not be streamed");
        } else if !publishes_inserts {
            warn!(
                publication,
                "publication exists but does not publish inserts; outbox rows will not be streamed"
            );
        }
        return Ok(());
    }

    let sql = format!(
        "CREATE PUBLICATION {} FOR TABLE {}.{} WITH (publish = 'insert')",
        quote_ident(publication),
        quote_ident(&schema),
        quote_ident(&relname)
    );
    create_publication(client, &sql, publication, &format!("{schema}.{relname}")).await
}

/// Without an outbox table: the publication as it is, or a new one
/// publishing no table (pgoutput needs one to exist).
async fn ensure_empty_publication(
    client: &Client,
    publication: &str,
) -> Result<(), ReplicationError> {
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(|e| ReplicationError::from_sql("reading the publication", e))?
        .is_some();
    if exists {
        return Ok(());
    }
    let sql = format!("CREATE PUBLICATION {}", quote_ident(publication));
    create_publication(client, &sql, publication, "no table").await
}

async fn create_publication(
    client: &Client,
    sql: &str,
    publication: &str,
    table: &str,
) -> Result<(), ReplicationError> {
    match client.batch_execute(sql).await {
        Ok(()) => {
            info!(publication, table, "created publication");
            Ok(())
        }
        // Created concurrently (another relay instance): fine.
        Err(e) if e.code() == Some(&SqlState::DUPLICATE_OBJECT) => Ok(()),
        Err(e) => Err(ReplicationError::from_sql("creating the publication", e)),
    }
}

/// The slot's row of `pg_replication_slots`, if the slot exists.
pub async fn slot_state(client: &Client, slot: &str) -> Result<Option<SlotInfo>, ReplicationError> {
    let row = client
        .query_opt(
            "SELECT plugin::text, slot_type, database::text, active, active_pid,
                    confirmed_flush_lsn::text, restart_lsn::text, wal_status
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| ReplicationError::from_sql("reading the replication slot", e))?;
    let Some(row) = row else {
        return Ok(None);
    };
    let lsn = |text: Option<String>| -> Result<Option<Lsn>, ReplicationError> {
        text.map(|t| {
            t.parse().map_err(|_| {
                ReplicationError::Protocol(format!("invalid LSN {t:?} in pg_replication_slots"))
            })
        })
        .transpose()
    };
    Ok(Some(SlotInfo {
        slot_name: slot.to_owned(),
        plugin: row.get(0),
        slot_type: row.get(1),
        database: row.get(2),
        active: row.get(3),
        active_pid: row.get(4),
        confirmed_flush_lsn: lsn(row.get(5))?,
        restart_lsn: lsn(row.get(6))?,
        wal_status: row.get(7),
    }))
}

/// Makes sure `slot` is a pgoutput slot of the replication connection's
/// database, creating it through `conn` when missing. A slot with another
/// plugin or of another database is a definite error; nothing is dropped.
/// `client` must be connected to the same database as `conn`.
pub async fn prepare_slot(
    client: &Client,
    conn: &mut ReplicationConnection,
    slot: &str,
) -> Result<PreparedSlot, ReplicationError> {
    validate_slot_name(slot)?;
    let database: String = client
        .query_one("SELECT current_database()::text", &[])
        .await
        .map_err(|e| ReplicationError::from_sql("reading the current database", e))?
        .get(0);
    if database != conn.dbname() {
        return Err(ReplicationError::DatabaseMismatch {
            sql: database,
            replication: conn.dbname().to_owned(),
        });
    }
    if let Some(info) = slot_state(client, slot).await? {
        check_slot(&info, &database)?;
        return Ok(PreparedSlot::Existing(info));
    }
    match conn.create_slot(slot).await {
        Ok(consistent_point) => {
            info!(slot, %consistent_point, "created replication slot");
            Ok(PreparedSlot::Created { consistent_point })
        }
        // Created concurrently: check what the other process made.
        Err(err) if err.sqlstate() == Some(SqlState::DUPLICATE_OBJECT.code()) => {
            let info = slot_state(client, slot).await?.ok_or(err)?;
            check_slot(&info, &database)?;
            Ok(PreparedSlot::Existing(info))
        }
        Err(err) => Err(err),
    }
}

fn check_slot(info: &SlotInfo, database: &str) -> Result<(), ReplicationError> {
    if info.wal_status.as_deref() == Some("lost") {
        return Err(ReplicationError::SlotLost {
            slot: info.slot_name.clone(),
            confirmed: info
                .confirmed_flush_lsn
                .map_or_else(|| "(none)".to_owned(), |l| l.to_string()),
        });
    }
    if info.plugin.as_deref() != Some(PLUGIN) {
        return Err(ReplicationError::SlotWrongPlugin {
            slot: info.slot_name.clone(),
            plugin: match &info.plugin {
                Some(plugin) => format!("{plugin:?}"),
                None => format!("none ({} slot)", info.slot_type),
            },
        });
    }
    if info.database.as_deref() != Some(database) {
        return Err(ReplicationError::SlotOtherDatabase {
            slot: info.slot_name.clone(),
            database: info.database.clone().unwrap_or_default(),
            expected: database.to_owned(),
        });
    }
    Ok(())
}
