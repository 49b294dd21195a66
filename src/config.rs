//! Configuration: the TOML file, `BOTFLOW_*` environment overrides, and validation.
//!
//! Loading is done in three passes so that `botflow check-config` can report every
//! problem at once instead of stopping at the first, as serde would:
//! 1. the file is read as a plain TOML table and the environment overrides are merged in;
//! 2. every key is checked against the table of defaults (`Config::default()` serialised),
//!    which names unknown keys and values of the wrong type;
//! 3. the checked table (less what pass 2 refused, whose defaults stand in) is
//!    deserialised and `validate()` checks values and ranges; the problems of every pass
//!    are reported together.
//!
//! Static facts live here; what operators tune while the daemon runs (rate limits per
//! chatbot) lives in PostgreSQL.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The whole configuration. Every field has a default, so an empty file is valid.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Embedded PostgreSQL, the operator token and the default socket live here.
    pub data_dir: PathBuf,
    /// How long a shutdown waits for in-flight events and executions before giving up.
    pub shutdown_timeout_seconds: u64,
    pub database: DatabaseConfig,
    pub ingest: IngestConfig,
    pub admin: AdminConfig,
    pub metrics: MetricsConfig,
    pub limits: LimitsConfig,
    pub executor: ExecutorConfig,
    pub journal: JournalConfig,
    pub retry: RetryConfig,
    pub lease: LeaseConfig,
    pub scheduler: SchedulerConfig,
    pub outbox: OutboxConfig,
    pub notify: NotifyConfig,
    pub egress: EgressConfig,
    pub retention: RetentionConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `postgres://…` or a libpq key/value string; empty starts PostgreSQL under `data_dir`.
    pub url: String,
    /// Connections in the shared pool (admin queries, supervisors loading workflows).
    pub pool_size: usize,
    /// Give up on a connection attempt after this long.
    pub connect_timeout_ms: u64,
    /// While the database is unreachable, an event waits this long for its commit
    /// before it is nacked `unavailable` (the sender retries; nothing is acked meanwhile).
    pub unavailable_after_ms: u64,
    /// PEM file of the CA(s) the server's certificate is checked against; empty: the
    /// public web roots. Setting it also turns `sslmode=prefer` (the default) into TLS
    /// whenever the server offers it.
    pub tls_ca_file: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    /// Path of the Unix socket; empty: no Unix socket.
    pub unix_socket: String,
    /// `host:port` of the TCP listener; empty: no TCP listener.
    pub tcp: String,
    /// Longest line a client may send, in bytes.
    pub max_frame_bytes: usize,
    /// Unacked events per connection before the daemon stops reading that socket.
    pub max_in_flight: usize,
    /// A connection that has not said `hello` within this time is closed.
    pub handshake_timeout_ms: u64,
    /// Longest first line (the hello), in bytes: a client that has not said who it is
    /// may not make the daemon buffer more.
    pub max_hello_bytes: usize,
    /// Open connections in total (both listeners); more are refused with an error line.
    pub max_connections: usize,
    /// Open TCP connections from one IP address.
    pub max_connections_per_peer: usize,
    /// Bytes all connections together may hold in lines not finished yet; a connection
    /// whose line would take more gets an `overloaded` error and is closed.
    pub buffer_budget_bytes: usize,
    /// Threads that run connections and chatbot supervisors; 0: one per CPU core.
    pub workers: usize,
    /// PEM certificate chain for TLS on the TCP listener; empty: plain TCP.
    pub tls_cert_file: String,
    /// PEM private key of that certificate (set both or neither).
    pub tls_key_file: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Admin HTTP API and HTTP ingest; empty: disabled.
    pub listen: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// `GET /metrics` for Prometheus; empty: disabled.
    pub listen: String,
    /// Chatbot ids that get series of their own (`chatbot` label); nobody else's id
    /// ever becomes a label, so the number of series stays bounded.
    pub watchlist: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Rate limiting on or off for every chatbot.
    pub enabled: bool,
    /// Events per second each chatbot may send (sustained).
    pub events_per_second: u32,
    /// Events a chatbot may send at once above its rate.
    pub burst: u32,
    /// Executions each chatbot may start per second.
    pub executions_per_second: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ExecutorConfig {
    /// Executions of one chatbot that run their steps at the same time.
    pub concurrency_per_chatbot: usize,
    /// Committed executions of one chatbot kept in memory waiting for an executor;
    /// the rest wait as `queued` rows in PostgreSQL and are claimed as room frees up.
    pub queue_capacity: usize,
    /// Longest one step may run (a webhook's own `timeout_ms` may be shorter).
    pub step_timeout_ms: u64,
    /// Longest one attempt of an execution may run, durable waits excluded (a
    /// workflow's `timeout_ms` overrides it).
    pub execution_timeout_ms: u64,
    /// A chatbot supervisor with no event for this long and nothing running is stopped.
    pub idle_supervisor_seconds: u64,
    /// Largest webhook request body, as rendered from its template (event data may
    /// repeat a large field); a larger one fails the step without a retry.
    pub max_request_body_bytes: usize,
    /// Longest webhook response kept in the execution history (as JSON text); a longer
    /// one is kept cut, with its length. Later steps of the same run see it whole.
    pub stored_response_bytes: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct JournalConfig {
    /// Independent writers, each with its own connection; an execution always uses
    /// the same one, so its rows are written in order, and the events one connection
    /// sends for a chatbot share one, so their acks keep their order.
    pub lanes: usize,
    /// Most execution records written in one transaction.
    pub max_batch: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    pub max_attempts: u32,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LeaseConfig {
    /// A node whose heartbeat is older than this (PostgreSQL's clock) is dead and its
    /// executions are taken over; it heartbeats every third of it.
    pub ttl_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerConfig {
    /// How often PostgreSQL is asked for due work this node did not schedule itself
    /// (after a restart, another node's death, a replay).
    pub scan_interval_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OutboxConfig {
    /// A command no client acks within this time fails its step (which is retried).
    pub ack_timeout_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NotifyConfig {
    /// Operator notifications (dead executions, critical failures) are POSTed here.
    pub webhook_url: String,
    /// One notification per workflow per window, carrying a count.
    pub window_seconds: u64,
    /// Failed executions of one workflow within a window that make it "failing".
    pub failing_threshold: u32,
    /// Notify when the database has been unreachable this long.
    pub database_unreachable_seconds: u64,
}

/// How long history is kept (a chatbot may have its own through the admin API); 0 keeps
/// it forever. A background pruner deletes what is older, in small batches.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// Finished executions, with their steps and commands.
    pub executions_days: i32,
    /// Dead letters (an execution is kept while its dead letter is).
    pub dead_letters_days: i32,
    /// Commands a client acked.
    pub acked_commands_days: i32,
    /// How often the pruner runs.
    pub interval_seconds: u64,
    /// Rows deleted by one statement: the longest any lock is held.
    pub batch_size: i64,
    /// Rows a pass deletes a second at most, so pruning leaves the disk and the cores
    /// to the traffic (0: no limit).
    pub max_rows_per_second: u64,
}

/// Where webhooks and notifications may connect (see `egress`): loopback, private,
/// link-local and the other internal ranges are refused unless listed in `allow`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EgressConfig {
    /// CIDRs (`10.1.2.0/24`), addresses, or `host:port` entries (that port only)
    /// allowed even though internal.
    pub allow: Vec<String>,
    /// CIDRs or addresses refused as well, public ones included; wins over `allow`.
    pub deny: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: String,
    /// A tracing filter, e.g. `info` or `botflow=debug,info`; `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("var"),
            shutdown_timeout_seconds: 30,
            database: DatabaseConfig::default(),
            ingest: IngestConfig::default(),
            admin: AdminConfig::default(),
            metrics: MetricsConfig::default(),
            limits: LimitsConfig::default(),
            executor: ExecutorConfig::default(),
            journal: JournalConfig::default(),
            retry: RetryConfig::default(),
            lease: LeaseConfig::default(),
            scheduler: SchedulerConfig::default(),
            outbox: OutboxConfig::default(),
            notify: NotifyConfig::default(),
            egress: EgressConfig::default(),
            retention: RetentionConfig::default(),
            log: LogConfig::default(),
        }
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: String::new(),
            pool_size: 16,
            connect_timeout_ms: 5_000,
            unavailable_after_ms: 5_000,
            tls_ca_file: String::new(),
        }
    }
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            unix_socket: "var/botflow.sock".into(),
            tcp: "127.0.0.1:7071".into(),
            max_frame_bytes: 1024 * 1024,
            max_in_flight: 1024,
            handshake_timeout_ms: 10_000,
            max_hello_bytes: 16 * 1024,
            max_connections: 10_000,
            max_connections_per_peer: 1_000,
            buffer_budget_bytes: 256 * 1024 * 1024,
            workers: 0,
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig { listen: "127.0.0.1:7070".into() }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { listen: "127.0.0.1:9464".into(), watchlist: Vec::new() }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig { enabled: true, events_per_second: 200, burst: 400, executions_per_second: 100 }
    }
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        ExecutorConfig {
            concurrency_per_chatbot: 8,
            queue_capacity: 10_000,
            step_timeout_ms: 60_000,
            execution_timeout_ms: 300_000,
            idle_supervisor_seconds: 300,
            max_request_body_bytes: 1024 * 1024,
            stored_response_bytes: 64 * 1024,
        }
    }
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig { lanes: 4, max_batch: 2_000 }
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig { max_attempts: 5, initial_backoff_ms: 500, max_backoff_ms: 60_000 }
    }
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig { ttl_ms: 10_000 }
    }
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig { scan_interval_ms: 1_000 }
    }
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig { ack_timeout_ms: 30_000 }
    }
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig {
            webhook_url: String::new(),
            window_seconds: 300,
            failing_threshold: 5,
            database_unreachable_seconds: 30,
        }
    }
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig { executions_days: 30, dead_letters_days: 90, acked_commands_days: 7, interval_seconds: 300, batch_size: 1000, max_rows_per_second: 5000 }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: "text".into(), level: "info".into() }
    }
}

/// One problem in the configuration, naming the key (`ingest.max_in_flight`).
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigProblem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

/// Every problem found while loading, in file order.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub source_name: String,
    pub problems: Vec<ConfigProblem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration in {} ({} problem", self.source_name, self.problems.len())?;
        if self.problems.len() != 1 {
            f.write_str("s")?;
        }
        f.write_str(")")?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

/// Where the configuration came from, for messages.
pub const DEFAULT_CONFIG_PATH: &str = "config/botflow.toml";

impl Config {
    /// Loads `path` (or the default path if it exists, or nothing) and the process
    /// environment. `explicit` says whether the user named the file: a named file that
    /// does not exist is an error, the default one is optional.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let (path, explicit) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        let name = path.display().to_string();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => String::new(),
            Err(e) => {
                return Err(ConfigError {
                    source_name: name,
                    problems: vec![ConfigProblem { key: String::new(), message: format!("cannot read the file: {e}") }],
                })
            }
        };
        Self::from_sources(&text, std::env::vars(), &name)
    }

    /// Builds a configuration from TOML text and `(name, value)` environment pairs.
    pub fn from_sources(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
        source_name: &str,
    ) -> Result<Config, ConfigError> {
        let fail = |problems| ConfigError { source_name: source_name.to_string(), problems };
        let mut table: toml::Table = match text.parse() {
            Ok(t) => t,
            Err(e) => {
                let message = e.message().to_string();
                let key = e
                    .span()
                    .map(|s| {
                        let line = text[..s.start].matches('\n').count() + 1;
                        format!("line {line}")
                    })
                    .unwrap_or_default();
                return Err(fail(vec![ConfigProblem { key, message: format!("not valid TOML: {message}") }]));
            }
        };
        let defaults = toml::Table::try_from(Config::default()).expect("defaults serialise");
        let mut problems = Vec::new();
        apply_env(&mut table, &defaults, env, &mut problems);
        // Keys that are unknown or of the wrong type are named and left out, so the
        // values of the rest are checked in the same run (their defaults stand in).
        check_table(&mut table, &defaults, "", &mut problems);
        let config: Config = match toml::Value::Table(table).try_into() {
            Ok(c) => c,
            Err(e) => {
                problems.push(ConfigProblem { key: String::new(), message: e.to_string() });
                return Err(fail(problems));
            }
        };
        if let Err(more) = config.validate() {
            problems.extend(more);
        }
        if !problems.is_empty() {
            return Err(fail(problems));
        }
        Ok(config)
    }

    /// Checks values that have the right type but a wrong value, all at once.
    pub fn validate(&self) -> Result<(), Vec<ConfigProblem>> {
        let mut p = Vec::new();
        let mut bad = |key: &str, message: String| p.push(ConfigProblem { key: key.into(), message });
        if self.data_dir.as_os_str().is_empty() {
            bad("data_dir", "must not be empty".into());
        }
        if self.database.pool_size == 0 || self.database.pool_size > 1000 {
            bad("database.pool_size", format!("must be within 1..1000, got {}", self.database.pool_size));
        }
        if let Some(Err(e)) = (!self.database.url.is_empty()).then(|| self.database.url.parse::<tokio_postgres::Config>()) {
            bad(
                "database.url",
                format!("is not a PostgreSQL connection string (postgres://user@host/db or key=value pairs): {e}"),
            );
        }
        if self.ingest.unix_socket.is_empty() && self.ingest.tcp.is_empty() {
            bad("ingest", "at least one of ingest.unix_socket and ingest.tcp must be set".into());
        }
        for (key, value) in [("ingest.tcp", &self.ingest.tcp), ("admin.listen", &self.admin.listen), ("metrics.listen", &self.metrics.listen)] {
            if !value.is_empty() && value.parse::<SocketAddr>().is_err() {
                bad(key, format!("{value:?} is not a host:port address such as 127.0.0.1:7071"));
            }
        }
        for (i, id) in self.metrics.watchlist.iter().enumerate() {
            if id.parse::<uuid::Uuid>().is_err() {
                bad(&format!("metrics.watchlist[{i}]"), format!("{id:?} is not a chatbot id (a UUID)"));
            }
        }
        if self.metrics.watchlist.len() > 1000 {
            bad("metrics.watchlist", "lists more than 1000 chatbots; series per chatbot are for a few".into());
        }
        if self.ingest.unix_socket.len() > 100 {
            bad("ingest.unix_socket", "a Unix socket path must be shorter than 100 bytes".into());
        }
        if !(256..=64 * 1024 * 1024).contains(&self.ingest.max_frame_bytes) {
            bad("ingest.max_frame_bytes", format!("must be within 256..67108864, got {}", self.ingest.max_frame_bytes));
        }
        if !(1..=1_000_000).contains(&self.ingest.max_in_flight) {
            bad("ingest.max_in_flight", format!("must be within 1..1000000, got {}", self.ingest.max_in_flight));
        }
        if self.ingest.handshake_timeout_ms == 0 {
            bad("ingest.handshake_timeout_ms", "must be positive".into());
        }
        // Checked against max_frame_bytes only when that is valid itself (one problem, not two).
        let frame = (256..=64 * 1024 * 1024).contains(&self.ingest.max_frame_bytes).then_some(self.ingest.max_frame_bytes);
        if !(1024..=frame.unwrap_or(64 * 1024 * 1024).max(1024)).contains(&self.ingest.max_hello_bytes) {
            bad(
                "ingest.max_hello_bytes",
                format!("must be within 1024..max_frame_bytes ({}), got {}", self.ingest.max_frame_bytes, self.ingest.max_hello_bytes),
            );
        }
        if !(1..=1_000_000).contains(&self.ingest.max_connections) {
            bad("ingest.max_connections", format!("must be within 1..1000000, got {}", self.ingest.max_connections));
        }
        if !(1..=self.ingest.max_connections.max(1)).contains(&self.ingest.max_connections_per_peer) {
            bad(
                "ingest.max_connections_per_peer",
                format!("must be within 1..max_connections ({}), got {}", self.ingest.max_connections, self.ingest.max_connections_per_peer),
            );
        }
        if frame.is_some_and(|frame| self.ingest.buffer_budget_bytes < frame) {
            bad(
                "ingest.buffer_budget_bytes",
                format!("must be at least max_frame_bytes ({}), got {}", self.ingest.max_frame_bytes, self.ingest.buffer_budget_bytes),
            );
        }
        if !(1024..=256 * 1024 * 1024).contains(&self.executor.max_request_body_bytes) {
            bad(
                "executor.max_request_body_bytes",
                format!("must be within 1024..268435456, got {}", self.executor.max_request_body_bytes),
            );
        }
        if !(256..=1024 * 1024).contains(&self.executor.stored_response_bytes) {
            bad(
                "executor.stored_response_bytes",
                format!("must be within 256..1048576, got {}", self.executor.stored_response_bytes),
            );
        }
        if self.ingest.workers > 256 {
            bad("ingest.workers", "must be at most 256 (0 means one per core)".into());
        }
        if !self.database.tls_ca_file.is_empty() {
            if let Err(e) = crate::tls::client_config(Some(Path::new(&self.database.tls_ca_file))) {
                bad("database.tls_ca_file", e.to_string());
            }
        }
        match (self.ingest.tls_cert_file.is_empty(), self.ingest.tls_key_file.is_empty()) {
            (true, true) => {}
            (false, true) => bad("ingest.tls_key_file", "must be set with ingest.tls_cert_file".into()),
            (true, false) => bad("ingest.tls_cert_file", "must be set with ingest.tls_key_file".into()),
            (false, false) if self.ingest.tcp.is_empty() => {
                bad("ingest.tls_cert_file", "TLS is for the TCP listener, and ingest.tcp is empty".into())
            }
            (false, false) => {
                let (cert, key) = (Path::new(&self.ingest.tls_cert_file), Path::new(&self.ingest.tls_key_file));
                match crate::tls::acceptor(cert, key) {
                    Ok(_) => {}
                    Err(e @ crate::tls::TlsError::Key { .. }) => bad("ingest.tls_key_file", e.to_string()),
                    Err(e) => bad("ingest.tls_cert_file", e.to_string()),
                }
            }
        }
        if self.limits.events_per_second == 0 {
            bad("limits.events_per_second", "must be positive".into());
        }
        if self.limits.burst == 0 {
            bad("limits.burst", "must be positive".into());
        }
        if self.limits.executions_per_second == 0 {
            bad("limits.executions_per_second", "must be positive".into());
        }
        if !(1..=10_000).contains(&self.executor.concurrency_per_chatbot) {
            bad("executor.concurrency_per_chatbot", format!("must be within 1..10000, got {}", self.executor.concurrency_per_chatbot));
        }
        if self.executor.queue_capacity == 0 {
            bad("executor.queue_capacity", "must be positive".into());
        }
        if !(1..=64).contains(&self.journal.lanes) {
            bad("journal.lanes", format!("must be within 1..64, got {}", self.journal.lanes));
        }
        if !(1..=50_000).contains(&self.journal.max_batch) {
            bad("journal.max_batch", format!("must be within 1..50000, got {}", self.journal.max_batch));
        }
        if !(1..=100).contains(&self.retry.max_attempts) {
            bad("retry.max_attempts", format!("must be within 1..100, got {}", self.retry.max_attempts));
        }
        if self.retry.initial_backoff_ms == 0 {
            bad("retry.initial_backoff_ms", "must be positive".into());
        }
        if self.retry.max_backoff_ms < self.retry.initial_backoff_ms {
            bad("retry.max_backoff_ms", "must not be below retry.initial_backoff_ms".into());
        }
        if !self.notify.webhook_url.is_empty()
            && !self.notify.webhook_url.starts_with("http://")
            && !self.notify.webhook_url.starts_with("https://")
        {
            bad("notify.webhook_url", "must be an http:// or https:// URL".into());
        }
        for (key, days) in [
            ("retention.executions_days", self.retention.executions_days),
            ("retention.dead_letters_days", self.retention.dead_letters_days),
            ("retention.acked_commands_days", self.retention.acked_commands_days),
        ] {
            if !(0..=36_500).contains(&days) {
                bad(key, format!("must be within 0..36500 days (0: keep forever), got {days}"));
            }
        }
        if self.retention.interval_seconds == 0 {
            bad("retention.interval_seconds", "must be positive".into());
        }
        if !(1..=100_000).contains(&self.retention.batch_size) {
            bad("retention.batch_size", format!("must be within 1..100000, got {}", self.retention.batch_size));
        }
        if let Err(problems) = self.egress_policy() {
            problems.into_iter().for_each(|(key, message)| bad(&key, message));
        }
        for (key, v) in [
            ("executor.step_timeout_ms", self.executor.step_timeout_ms),
            ("executor.execution_timeout_ms", self.executor.execution_timeout_ms),
            ("outbox.ack_timeout_ms", self.outbox.ack_timeout_ms),
            ("scheduler.scan_interval_ms", self.scheduler.scan_interval_ms),
            ("notify.database_unreachable_seconds", self.notify.database_unreachable_seconds),
        ] {
            if v == 0 {
                bad(key, "must be positive".into());
            }
        }
        if self.lease.ttl_ms < 300 {
            bad("lease.ttl_ms", format!("must be at least 300, got {}", self.lease.ttl_ms));
        }
        if self.notify.failing_threshold == 0 {
            bad("notify.failing_threshold", "must be positive".into());
        }
        if self.notify.window_seconds == 0 {
            bad("notify.window_seconds", "must be positive".into());
        }
        if self.log.format != "text" && self.log.format != "json" {
            bad("log.format", format!("must be \"text\" or \"json\", got {:?}", self.log.format));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            bad("log.level", format!("{:?} is not a log filter such as \"info\" or \"botflow=debug\"", self.log.level));
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(p)
        }
    }

    /// `egress.allow` and `egress.deny` read (the listeners are added once bound).
    pub fn egress_policy(&self) -> Result<crate::egress::Policy, Vec<(String, String)>> {
        crate::egress::Policy::new(&self.egress.allow, &self.egress.deny)
    }

    /// The CA file for TLS to a configured PostgreSQL, if set.
    pub fn database_ca_file(&self) -> Option<&Path> {
        (!self.database.tls_ca_file.is_empty()).then(|| Path::new(&self.database.tls_ca_file))
    }

    /// The certificate and key files of the TCP listener, when TLS is on.
    pub fn ingest_tls_files(&self) -> Option<(PathBuf, PathBuf)> {
        (!self.ingest.tls_cert_file.is_empty())
            .then(|| (PathBuf::from(&self.ingest.tls_cert_file), PathBuf::from(&self.ingest.tls_key_file)))
    }

    /// A path in the configuration, relative to the working directory as given.
    pub fn unix_socket_path(&self) -> Option<PathBuf> {
        (!self.ingest.unix_socket.is_empty()).then(|| PathBuf::from(&self.ingest.unix_socket))
    }

    pub fn operator_token_path(&self) -> PathBuf {
        self.data_dir.join("operator.token")
    }

    pub fn worker_threads(&self) -> usize {
        if self.ingest.workers > 0 {
            self.ingest.workers
        } else {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)
        }
    }

    /// The effective configuration as TOML with secrets hidden (for `check-config`):
    /// every URL or connection string in it, whatever its key, has its credentials
    /// masked.
    pub fn to_redacted_toml(&self) -> String {
        // Line by line, so the keys keep the order of the file's sections.
        let text = toml::to_string_pretty(self).unwrap_or_default();
        let mut out = String::with_capacity(text.len());
        for line in text.lines() {
            let redacted = line.split_once(" = ").and_then(|(key, _)| {
                let value = toml::from_str::<toml::Table>(line).ok()?.into_iter().next()?.1;
                let shown = redact_url(value.as_str()?);
                (shown != value.as_str()?).then(|| format!("{key} = {}", toml::Value::String(shown)))
            });
            out.push_str(redacted.as_deref().unwrap_or(line));
            out.push('\n');
        }
        out
    }
}

/// Query parameters (by a part of their name) whose values are secrets.
const SECRET_PARAMS: [&str; 7] = ["token", "key", "secret", "pass", "sig", "auth", "credential"];

/// Hides credentials in a URL (`scheme://user:secret@host/…?token=secret`: the password,
/// or a user name that stands alone, and secret-looking query values) or in a
/// key=value connection string (`password=secret`). Other text is returned as it is.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        if !url.contains("password=") {
            return url.to_string();
        }
        return url
            .split_whitespace()
            .map(|kv| if kv.starts_with("password=") { "password=***".to_string() } else { kv.to_string() })
            .collect::<Vec<_>>()
            .join(" ");
    };
    let (scheme, rest) = (&url[..scheme_end], &url[scheme_end + 3..]);
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            // A lone user name is often a token (`https://<token>@host`).
            None => format!("***@{host}"),
        },
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let (query, fragment) = match query.split_once('#') {
                Some((q, f)) => (q, Some(f)),
                None => (query, None),
            };
            let query = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if SECRET_PARAMS.iter().any(|s| k.to_ascii_lowercase().contains(s)) => format!("{k}=***"),
                    _ => kv.to_string(),
                })
                .collect::<Vec<_>>()
                .join("&");
            match fragment {
                Some(f) => format!("{path}?{query}#{f}"),
                None => format!("{path}?{query}"),
            }
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
}

/// Merges `BOTFLOW_<SECTION>__<KEY>` and `BOTFLOW_<KEY>` into the table. A variable
/// with `__` must name a known key; top-level names that are not keys (the CLI's own
/// `BOTFLOW_TOKEN`, say) are left alone.
fn apply_env(
    table: &mut toml::Table,
    defaults: &toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
    problems: &mut Vec<ConfigProblem>,
) {
    let mut vars: Vec<(String, String)> = env.into_iter().filter(|(k, _)| k.starts_with("BOTFLOW_")).collect();
    vars.sort();
    for (name, raw) in vars {
        let rest = name["BOTFLOW_".len()..].to_ascii_lowercase();
        let (section, key) = match rest.split_once("__") {
            Some((s, k)) => (Some(s.to_string()), k.to_string()),
            None => (None, rest.clone()),
        };
        let default = match &section {
            Some(s) => defaults.get(s).and_then(|t| t.as_table()).and_then(|t| t.get(&key)),
            None => defaults.get(&key).filter(|v| !v.is_table()),
        };
        let Some(default) = default else {
            if section.is_some() {
                problems.push(ConfigProblem { key: name.clone(), message: "names no configuration key".into() });
            }
            continue;
        };
        let value = match coerce_env_value(&raw, default) {
            Ok(v) => v,
            Err(message) => {
                problems.push(ConfigProblem { key: name.clone(), message });
                continue;
            }
        };
        let target = match &section {
            Some(s) => {
                let entry = table.entry(s.clone()).or_insert_with(|| toml::Value::Table(Default::default()));
                match entry.as_table_mut() {
                    Some(t) => t,
                    None => continue, // the file has a non-table here; check_table reports it
                }
            }
            None => &mut *table,
        };
        target.insert(key, value);
    }
}

/// Environment values are text; read them as the type the key has.
fn coerce_env_value(raw: &str, default: &toml::Value) -> Result<toml::Value, String> {
    match default {
        toml::Value::String(_) => Ok(toml::Value::String(raw.to_string())),
        toml::Value::Integer(_) => raw
            .trim()
            .parse::<i64>()
            .map(toml::Value::Integer)
            .map_err(|_| format!("expected an integer, got {raw:?}")),
        toml::Value::Float(_) => raw
            .trim()
            .parse::<f64>()
            .map(toml::Value::Float)
            .map_err(|_| format!("expected a number, got {raw:?}")),
        toml::Value::Boolean(_) => match raw.trim() {
            "true" | "1" | "yes" => Ok(toml::Value::Boolean(true)),
            "false" | "0" | "no" => Ok(toml::Value::Boolean(false)),
            _ => Err(format!("expected true or false, got {raw:?}")),
        },
        _ => format!("v = {raw}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .ok_or_else(|| format!("expected a TOML value, got {raw:?}")),
    }
}

fn type_name(v: &toml::Value) -> &'static str {
    match v {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a number",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a date-time",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    }
}

/// Names every key that the defaults do not have and every value of the wrong type.
/// Names every unknown key and every value of the wrong type, and removes them from
/// `table` (the defaults take their place, so the other values can still be checked).
fn check_table(table: &mut toml::Table, defaults: &toml::Table, prefix: &str, problems: &mut Vec<ConfigProblem>) {
    let mut refused = Vec::new();
    for (key, value) in table.iter_mut() {
        let full = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
        let Some(default) = defaults.get(key) else {
            let known: Vec<&str> = defaults.keys().map(String::as_str).collect();
            problems.push(ConfigProblem { key: full, message: format!("unknown key (known here: {})", known.join(", ")) });
            refused.push(key.clone());
            continue;
        };
        match (default, value) {
            (toml::Value::Table(d), toml::Value::Table(t)) => check_table(t, d, &full, problems),
            (toml::Value::Integer(_), toml::Value::Integer(i)) if *i < 0 => {
                problems.push(ConfigProblem { key: full, message: format!("must not be negative, got {i}") });
                refused.push(key.clone());
            }
            (toml::Value::Float(_), toml::Value::Integer(_)) => {}
            (d, v) if std::mem::discriminant(d) == std::mem::discriminant(&*v) => {}
            (d, v) => {
                problems.push(ConfigProblem {
                    key: full,
                    message: format!("expected {}, found {}", type_name(d), type_name(v)),
                });
                refused.push(key.clone());
            }
        }
    }
    for key in refused {
        table.remove(&key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_sources(text, env.iter().map(|(k, v)| (k.to_string(), v.to_string())), "test.toml")
    }

    #[test]
    fn empty_file_gives_the_documented_defaults() {
        let c = load("", &[]).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.ingest.max_frame_bytes, 1_048_576);
        assert_eq!(c.ingest.max_in_flight, 1024);
        assert_eq!(c.database.pool_size, 16);
    }

    #[test]
    fn shipped_config_file_is_valid_and_documents_every_key() {
        let text = include_str!("../config/botflow.toml");
        let c = load(text, &[]).unwrap();
        assert_eq!(c, Config::default(), "config/botflow.toml must show the defaults");
        let defaults = toml::Table::try_from(Config::default()).unwrap();
        let file: toml::Table = text.parse().unwrap();
        for (section, value) in &defaults {
            match value {
                toml::Value::Table(keys) => {
                    for key in keys.keys() {
                        assert!(
                            file.get(section).and_then(|s| s.get(key)).is_some(),
                            "config/botflow.toml does not document {section}.{key}"
                        );
                    }
                }
                _ => assert!(file.contains_key(section), "config/botflow.toml does not document {section}"),
            }
        }
    }

    #[test]
    fn every_bad_key_is_reported_at_once() {
        let err = load(
            "data_dirr = \"x\"\n[ingest]\nmax_in_flight = \"many\"\nmax_frame_bytes = 10\n[database]\npool_size = 0\n[bogus]\na = 1\n",
            &[],
        )
        .unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        // Unknown keys, wrong types and values out of range, in one run.
        assert_eq!(keys, vec!["bogus", "data_dirr", "ingest.max_in_flight", "database.pool_size", "ingest.max_frame_bytes"], "{err}");
        assert!(err.to_string().contains("5 problems"), "{err}");
        let err = load("[ingest]\nmax_frame_bytes = 10\n[database]\npool_size = 0\n[log]\nformat = \"xml\"\n", &[]).unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, vec!["database.pool_size", "ingest.max_frame_bytes", "log.format"], "{err}");
        assert!(err.to_string().contains("3 problems"));
    }

    #[test]
    fn tls_files_are_checked_in_pairs_and_read() {
        let problems = |toml: &str| -> Vec<String> {
            match load(toml, &[]) {
                Ok(_) => Vec::new(),
                Err(e) => e.problems.iter().map(|p| format!("{}: {}", p.key, p.message)).collect(),
            }
        };
        let p = problems("[ingest]\ntls_cert_file = \"cert.pem\"\n");
        assert_eq!(p, vec!["ingest.tls_key_file: must be set with ingest.tls_cert_file"]);
        let p = problems("[ingest]\ntcp = \"\"\ntls_cert_file = \"c.pem\"\ntls_key_file = \"k.pem\"\n");
        assert!(p.len() == 1 && p[0].starts_with("ingest.tls_cert_file: TLS is for the TCP listener"), "{p:?}");
        let p = problems("[ingest]\ntls_cert_file = \"/nonexistent/c.pem\"\ntls_key_file = \"/nonexistent/k.pem\"\n");
        assert!(p.len() == 1 && p[0].starts_with("ingest.tls_cert_file:") && p[0].contains("/nonexistent/c.pem"), "{p:?}");
        let p = problems("[database]\ntls_ca_file = \"/nonexistent/ca.pem\"\n");
        assert!(p.len() == 1 && p[0].starts_with("database.tls_ca_file:") && p[0].contains("/nonexistent/ca.pem"), "{p:?}");
    }

    #[test]
    fn environment_overrides_sections_and_top_level_keys() {
        let c = load(
            "[database]\nurl = \"postgres://a@b/c\"\n",
            &[
                ("BOTFLOW_DATABASE__URL", "postgres://u:pw@h/db"),
                ("BOTFLOW_INGEST__MAX_IN_FLIGHT", "7"),
                ("BOTFLOW_DATA_DIR", "/srv/botflow"),
                ("BOTFLOW_TOKEN", "not a config key, ignored"),
            ],
        )
        .unwrap();
        assert_eq!(c.database.url, "postgres://u:pw@h/db");
        assert_eq!(c.ingest.max_in_flight, 7);
        assert_eq!(c.data_dir, PathBuf::from("/srv/botflow"));
        assert!(c.to_redacted_toml().contains("postgres://u:***@h/db"));
        assert!(!c.to_redacted_toml().contains("pw"));
    }

    #[test]
    fn bad_environment_values_are_named() {
        let err = load("", &[("BOTFLOW_INGEST__MAX_IN_FLIGHT", "lots"), ("BOTFLOW_INGEST__NOPE", "1")]).unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, vec!["BOTFLOW_INGEST__MAX_IN_FLIGHT", "BOTFLOW_INGEST__NOPE"], "{err}");
    }

    #[test]
    fn toml_syntax_errors_name_the_line() {
        let err = load("[ingest]\nmax_in_flight = = 3\n", &[]).unwrap_err();
        assert_eq!(err.problems.len(), 1);
        assert_eq!(err.problems[0].key, "line 2", "{err}");
    }

    #[test]
    fn redacts_key_value_passwords() {
        assert_eq!(redact_url("host=/tmp user=a password=secret"), "host=/tmp user=a password=***");
    }

    #[test]
    fn every_url_check_config_prints_has_its_credentials_masked() {
        assert_eq!(
            redact_url("https://hooks:s3cret@example.com/alert?channel=ops&token=abc&API_KEY=k#top"),
            "https://hooks:***@example.com/alert?channel=ops&token=***&API_KEY=***#top"
        );
        assert_eq!(redact_url("https://ghp_abc123@example.com/x"), "https://***@example.com/x");
        assert_eq!(redact_url("http://example.com/a@b?x=1"), "http://example.com/a@b?x=1", "an @ in the path is not userinfo");
        assert_eq!(redact_url("var/botflow.sock"), "var/botflow.sock");
        let c = load(
            "[notify]\nwebhook_url = \"https://ops:hunter2@alerts.example.com/hook?token=t0ken\"\n[database]\nurl = \"postgres://u:pw@h/db\"\n",
            &[],
        )
        .unwrap();
        let shown = c.to_redacted_toml();
        for secret in ["hunter2", "t0ken", ":pw@"] {
            assert!(!shown.contains(secret), "{secret} shown in:\n{shown}");
        }
        assert!(shown.contains("https://ops:***@alerts.example.com/hook?token=***"), "{shown}");
    }
}
