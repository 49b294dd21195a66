//! PostgreSQL: the connection pool, migrations, the embedded server, the queries of
//! the bootstrap CLI, and the journal that writes execution records in batches.
//!
//! Everything that talks SQL lives under this module; actors call these functions and
//! never build SQL themselves.

pub mod accounts;
pub mod dead_letters;
pub mod embedded;
pub mod error;
pub mod executions;
pub mod journal;
pub mod leases;
pub mod limits;
pub mod listen;
pub mod migrate;
pub mod workflows;

pub use error::{StoreError, StoreResult};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use std::time::Duration;

/// The shared pool plus the configuration to open dedicated connections (journal
/// lanes, LISTEN) that must not be returned to a pool.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    pg_config: tokio_postgres::Config,
}

impl Store {
    /// Builds the pool. No connection is opened until one is needed.
    pub fn new(mut pg_config: tokio_postgres::Config, pool_size: usize, connect_timeout: Duration) -> StoreResult<Store> {
        pg_config.connect_timeout(connect_timeout);
        if pg_config.get_application_name().is_none() {
            pg_config.application_name("botflow");
        }
        let manager = Manager::from_config(
            pg_config.clone(),
            tokio_postgres::NoTls,
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(connect_timeout))
            .create_timeout(Some(connect_timeout))
            .recycle_timeout(Some(connect_timeout))
            .build()
            .map_err(|e| StoreError::Connect(e.to_string()))?;
        Ok(Store { pool, pg_config })
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn pg_config(&self) -> &tokio_postgres::Config {
        &self.pg_config
    }

    /// A connection of its own (not pooled). The connection task runs on the calling
    /// thread's runtime, so open it where it will be used.
    pub async fn dedicated(&self) -> StoreResult<tokio_postgres::Client> {
        let (client, connection) = self
            .pg_config
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|e| StoreError::Connect(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "dedicated database connection closed");
            }
        });
        Ok(client)
    }

    /// Waits until the database answers, up to `deadline` (the embedded server or a
    /// database started by the same service manager may still be booting).
    pub async fn wait_until_reachable(&self, deadline: Duration) -> StoreResult<()> {
        let start = std::time::Instant::now();
        loop {
            match self.pool.get().await {
                Ok(c) => {
                    c.simple_query("SELECT 1").await?;
                    return Ok(());
                }
                Err(e) if start.elapsed() < deadline => {
                    tracing::debug!(error = %e, "database not reachable yet");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}
