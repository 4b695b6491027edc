//! The project's schema migrations (`migrations/V<n>__<name>.sql`), embedded
//! at build time and applied with refinery over tokio-postgres.
//!
//! Why refinery: it is maintained, speaks tokio-postgres natively, runs each
//! migration in its own transaction, records applied versions with a checksum
//! in `refinery_schema_history`, and refuses to run when a landed file was
//! edited — matching the rule that migrations are never edited once landed.

use anyhow::Context;

refinery::embed_migrations!("../migrations");

/// One migration that this call applied.
#[derive(Debug, Clone)]
pub struct Applied {
    pub version: i32,
    pub name: String,
}

/// Applies every migration not yet recorded in `database_url`, in order.
/// Returns the ones applied by this call (empty when already up to date).
pub async fn apply(database_url: &str) -> anyhow::Result<Vec<Applied>> {
    let params = pgconn::ConnectParams::from_url(database_url)
        .context("the database URL")?
        .or_application_name("devstack");
    let mut client = pgconn::connect(&params)
        .await
        .context("connecting to Postgres to apply migrations")?;
    let report = migrations::runner()
        .run_async(&mut client)
        .await
        .context("applying migrations")?;
    Ok(report
        .applied_migrations()
        .iter()
        .map(|m| Applied {
            version: m.version(),
            name: m.name().to_owned(),
        })
        .collect())
}
