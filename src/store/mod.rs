//! PostgreSQL: the connection pool, migrations, the embedded server, the queries of
//! the bootstrap CLI, and the journal that writes execution records in batches.
//!
//! Everything that talks SQL lives under this module; actors call these functions and
//! never build SQL themselves.

pub mod accounts;
pub mod audit;
pub mod dead_letters;
pub mod deletion;
pub mod error;
pub mod executions;
pub mod journal;
pub mod keys;
pub mod leases;
pub mod limits;
pub mod listen;
pub mod migrate;
pub mod outbox;
pub mod retention;
pub mod secrets;
pub mod workflows;

pub use error::{StoreError, StoreResult};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use std::path::Path;
use std::time::Duration;
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::MakeTlsConnect;

/// The shared pool plus the configuration to open dedicated connections (journal
/// lanes, LISTEN) that must not be returned to a pool.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    pg_config: tokio_postgres::Config,
    tls: DbTls,
}

/// TLS to PostgreSQL (rustls), as `sslmode` in the connection string asks: `require`
/// always, `prefer` (the default) only when a CA file is configured, `disable` never.
/// The server's certificate is always checked, against the CA file or the public web
/// roots, and its name against the host connected to (libpq's `verify-full`).
type DbTls = tokio_postgres_rustls::MakeRustlsConnect;

fn db_tls(ca_file: Option<&Path>) -> StoreResult<DbTls> {
    let mut config = crate::tls::client_config(ca_file).map_err(|e| StoreError::Connect(e.to_string()))?;
    // What PostgreSQL 17 asks of a client that starts with TLS (sslnegotiation=direct).
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(DbTls::new(config))
}

impl Store {
    /// Builds the pool. No connection is opened until one is needed. `ca_file`: see
    /// `DbTls`.
    pub fn new(
        mut pg_config: tokio_postgres::Config,
        pool_size: usize,
        connect_timeout: Duration,
        ca_file: Option<&Path>,
    ) -> StoreResult<Store> {
        pg_config.connect_timeout(connect_timeout);
        if pg_config.get_application_name().is_none() {
            pg_config.application_name("botflow");
        }
        // With only `hostaddr`, the certificate is checked against the address (its IP
        // entry): tokio-postgres wants a host name for TLS.
        if pg_config.get_hosts().is_empty() {
            for addr in pg_config.get_hostaddrs().to_vec() {
                pg_config.host(addr.to_string());
            }
        }
        // Without a CA file, `prefer` stays plain text, as before TLS was supported: a
        // server with a self-signed certificate would otherwise stop being reachable.
        // PostgreSQL has no TLS on Unix sockets, where libpq ignores sslmode.
        let hosts = pg_config.get_hosts();
        let only_sockets = !hosts.is_empty() && hosts.iter().all(|h| !matches!(h, tokio_postgres::config::Host::Tcp(_)));
        if only_sockets || (ca_file.is_none() && pg_config.get_ssl_mode() == SslMode::Prefer) {
            pg_config.ssl_mode(SslMode::Disable);
        }
        let tls = db_tls(ca_file)?;
        let manager =
            Manager::from_config(pg_config.clone(), tls.clone(), ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(connect_timeout))
            .create_timeout(Some(connect_timeout))
            .recycle_timeout(Some(connect_timeout))
            .build()
            .map_err(|e| StoreError::Connect(e.to_string()))?;
        Ok(Store { pool, pg_config, tls })
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn pg_config(&self) -> &tokio_postgres::Config {
        &self.pg_config
    }

    /// Opens a connection of its own with this store's settings and TLS; the caller
    /// drives the returned connection. Bounded by the connect timeout as a whole:
    /// tokio-postgres bounds only the TCP connect, and a server that stalls the TLS
    /// handshake or the login would otherwise hold the caller for ever.
    pub async fn connect(
        &self,
    ) -> StoreResult<(
        tokio_postgres::Client,
        tokio_postgres::Connection<tokio_postgres::Socket, <DbTls as MakeTlsConnect<tokio_postgres::Socket>>::Stream>,
    )> {
        let timeout = self.pg_config.get_connect_timeout().copied().unwrap_or(Duration::from_secs(30));
        match tokio::time::timeout(timeout, self.pg_config.connect(self.tls.clone())).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(StoreError::Connect(error::chain(&e))),
            Err(_) => Err(StoreError::Connect(format!("no answer within {} ms", timeout.as_millis()))),
        }
    }

    /// A connection of its own (not pooled). The connection task runs on the calling
    /// thread's runtime, so open it where it will be used.
    pub async fn dedicated(&self) -> StoreResult<tokio_postgres::Client> {
        let (client, connection) = self.connect().await?;
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
