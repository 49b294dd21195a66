//! Schema migrations: the plain SQL files of `migrations/`, embedded in the binary and
//! applied by refinery under a PostgreSQL advisory lock, so two daemons starting
//! against one database at the same moment apply each migration exactly once.

use super::{Store, StoreError, StoreResult};

refinery::embed_migrations!("migrations");

/// Arbitrary but fixed: the advisory lock every botflow instance takes to migrate.
const MIGRATION_LOCK_KEY: i64 = 0x626f_7466_6c6f_7701; // "botflow" + 1

/// What `migrate` did: the versions applied now, and the latest version known.
#[derive(Debug)]
pub struct MigrationReport {
    pub applied: Vec<String>,
    pub latest: i32,
}

/// The newest schema version this binary knows.
pub fn latest_version() -> i32 {
    migrations::runner().get_migrations().iter().map(|m| m.version() as i32).max().unwrap_or(0)
}

pub async fn migrate(store: &Store) -> StoreResult<MigrationReport> {
    migrate_to(store, None).await
}

/// Migrates up to `version` (all the way with `None`). Upgrade tests stop part-way to
/// put rows in an older schema.
pub async fn migrate_to(store: &Store, version: Option<i32>) -> StoreResult<MigrationReport> {
    let mut client = store.dedicated().await?;
    // A session lock on this connection; it is released when the connection closes
    // even if this process dies half-way.
    client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY]).await?;
    let mut runner = migrations::runner();
    if let Some(v) = version {
        runner = runner.set_target(refinery::Target::Version(v as u32));
    }
    let result = runner
        .set_migration_table_name("botflow_schema_history")
        .run_async(&mut client)
        .await;
    let unlock = client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY]).await;
    let report = result.map_err(|e| StoreError::Migrate(e.to_string()))?;
    unlock?;
    Ok(MigrationReport {
        applied: report.applied_migrations().iter().map(|m| m.to_string()).collect(),
        latest: latest_version(),
    })
}

/// The version the database is at (0 before the first migration).
pub async fn current_version(store: &Store) -> StoreResult<i32> {
    let client = store.pool().get().await?;
    let exists: bool = client
        .query_one("SELECT to_regclass('botflow_schema_history') IS NOT NULL", &[])
        .await?
        .get(0);
    if !exists {
        return Ok(0);
    }
    let v: Option<i32> = client.query_one("SELECT max(version) FROM botflow_schema_history", &[]).await?.get(0);
    Ok(v.unwrap_or(0))
}
