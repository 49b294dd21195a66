//! Which PostgreSQL a command talks to: `database.url` when set, otherwise the
//! embedded server under `data_dir`. `serve` owns the embedded server (starts it and
//! stops it on exit); the other commands use it if it is already running (a daemon is
//! up) and start it only for their own duration otherwise.

use crate::config::Config;
use crate::postgres::{EmbeddedOptions, EmbeddedPostgres};
use crate::store::{migrate, Store};
use anyhow::Context;
use std::time::Duration;

pub use crate::postgres::EMBEDDED_DB;

/// An open database, keeping the embedded server alive while it is held.
pub struct Database {
    pub pg: tokio_postgres::Config,
    pub embedded: Option<EmbeddedPostgres>,
}

impl Database {
    /// For `serve`: the configured server, or the embedded one, started and owned.
    pub fn open_owned(config: &Config) -> anyhow::Result<Database> {
        if !config.database.url.is_empty() {
            return Ok(Database { pg: parse_url(config)?, embedded: None });
        }
        let pg = EmbeddedPostgres::start(&config.data_dir, &EmbeddedOptions::default())
            .context("cannot start the embedded PostgreSQL")?;
        ensure_db(&pg)?;
        Ok(Database { pg: pg.config(EMBEDDED_DB), embedded: Some(pg) })
    }

    /// For one-shot commands: a running embedded server is shared, not restarted.
    pub fn open_shared(config: &Config) -> anyhow::Result<Database> {
        if !config.database.url.is_empty() {
            return Ok(Database { pg: parse_url(config)?, embedded: None });
        }
        if let Some(pg) = EmbeddedPostgres::running(&config.data_dir) {
            return Ok(Database { pg, embedded: None });
        }
        Database::open_owned(config)
    }

    /// A pool for a one-shot command, with the schema migrated.
    pub async fn store(&self, config: &Config) -> anyhow::Result<Store> {
        let store = Store::new(self.pg.clone(), 2, Duration::from_millis(config.database.connect_timeout_ms), config.database_ca_file())?;
        store.wait_until_reachable(Duration::from_secs(10)).await.context("the database is not reachable")?;
        migrate::migrate(&store).await.context("cannot migrate the database")?;
        Ok(store)
    }
}

fn parse_url(config: &Config) -> anyhow::Result<tokio_postgres::Config> {
    config
        .database
        .url
        .parse()
        .with_context(|| format!("database.url {:?} is not a PostgreSQL URL", crate::config::redact_url(&config.database.url)))
}

fn ensure_db(pg: &EmbeddedPostgres) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(pg.ensure_database(EMBEDDED_DB)).context("cannot create the botflow database")?;
    Ok(())
}
