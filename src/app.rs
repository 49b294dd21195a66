//! Wiring the daemon together and taking it apart again.
//!
//! `App::start` runs inside an actix `System`, in four steps: `open_database` (migrating
//! it first), `Bound::bind` (every socket, before anything runs), `Actors::start` (the
//! worker arbiters for connections and chatbot supervisors, the journal arbiter, the
//! Router, the Outbox, the heartbeat and the scheduler) with `forward_changes` (the
//! change listener), and last the admin API, the metrics endpoint and the ingest
//! listeners. `RunningApp::shutdown` undoes it in the
//! order that loses nothing: stop accepting and reading, answer what is in flight, let
//! running executions finish (up to the deadline), flush the journal.

use crate::chatbot::supervisor::SupervisorDeps;
use crate::config::Config;
use crate::egress::Egress;
use crate::ingest::budget::ConnectionBudget;
use crate::ingest::connection::IngestDeps;
use crate::ingest::listener::{self, Workers};
use crate::ingest::sessions::Sessions;
use crate::outbox::{Outbox, RedeliverPending, RemoteAck, RemoteCommand};
use crate::notify::Notifier;
use crate::router::{BusySupervisors, Router, Wake, WorkflowsChanged};
use crate::scheduler::Scheduler;
use crate::store::journal::Journal;
use crate::store::leases::{self, LeaseHealth};
use crate::store::accounts::Scope;
use crate::store::listen::Change;
use crate::store::{accounts, listen, migrate, Store};
use crate::telemetry::metrics as m;
use actix::prelude::*;
use anyhow::Context as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// A started daemon.
pub struct RunningApp {
    pub store: Store,
    pub tcp_addr: Option<SocketAddr>,
    pub unix_path: Option<PathBuf>,
    pub metrics_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    /// Set when this start created the first operator key.
    pub operator_key: Option<String>,
    shutdown: CancellationToken,
    /// Stops the heartbeat and the scheduler, after the drain.
    heartbeat_stop: CancellationToken,
    node: uuid::Uuid,
    router: Addr<Router>,
    journal: Journal,
    connections: Arc<std::sync::atomic::AtomicUsize>,
    arbiters: Vec<Arbiter>,
    metrics_server: Option<actix_web::dev::ServerHandle>,
    admin_server: Option<actix_web::dev::ServerHandle>,
    shutdown_timeout: Duration,
}

pub struct App;

/// The sockets, bound before anything runs so a taken port fails the start cleanly.
struct Bound {
    tcp: Option<(std::net::TcpListener, Option<tokio_rustls::TlsAcceptor>)>,
    unix: Option<(std::os::unix::net::UnixListener, PathBuf)>,
    admin: Option<std::net::TcpListener>,
    metrics: Option<std::net::TcpListener>,
}

/// The actors and tasks of the data path, running.
struct Actors {
    arbiters: Vec<Arbiter>,
    workers: Workers,
    journal: Journal,
    outbox: Addr<Outbox>,
    router: Addr<Router>,
    /// Stops the heartbeat and the scheduler, after the drain.
    heartbeat_stop: CancellationToken,
    /// The admin API checks saved workflows against its policy.
    egress: Egress,
    /// Starts a pruning pass now (a chatbot was deleted).
    prune_now: Arc<tokio::sync::Notify>,
}

impl App {
    /// Starts the daemon against `pg` (a server URL's config, or the embedded server's):
    /// the database first, then the sockets, the actors, and last what serves them.
    pub async fn start(config: &Config, pg: tokio_postgres::Config) -> anyhow::Result<RunningApp> {
        // Without a metrics endpoint nothing is recorded at all.
        let prometheus = (!config.metrics.listen.is_empty()).then(m::install);
        m::hot();
        let (store, node, operator_key) = open_database(config, pg).await?;
        let bound = Bound::bind(config)?;
        let shutdown = CancellationToken::new();
        let actors = Actors::start(config, &store, node, bound.addrs())?;
        let sessions = Sessions::new();
        forward_changes(&store, &actors, &sessions, &shutdown);

        // Open socket connections and HTTP ingest requests: the shutdown drain waits for both.
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let admin_addr = bound.admin.as_ref().and_then(|l| l.local_addr().ok());
        let admin_server = match bound.admin {
            Some(l) => Some(crate::admin::start(
                l,
                crate::admin::AdminState {
                    store: store.clone(),
                    router: actors.router.clone(),
                    limit_defaults: crate::chatbot::limits::Defaults::from_config(config),
                    shutdown: shutdown.clone(),
                    connections: connections.clone(),
                    max_frame_bytes: config.ingest.max_frame_bytes,
                    egress: actors.egress.clone(),
                    retention_defaults: (&config.retention).into(),
                },
                2,
            )?),
            None => None,
        };
        let metrics_addr = bound.metrics.as_ref().and_then(|l| l.local_addr().ok());
        let metrics_server = match (bound.metrics, prometheus) {
            (Some(l), Some(p)) => Some(start_metrics_server(l, p)?),
            _ => None,
        };

        let ingest = Arc::new(IngestDeps {
            store: store.clone(),
            router: actors.router.clone(),
            outbox: actors.outbox.clone(),
            max_frame_bytes: config.ingest.max_frame_bytes,
            max_hello_bytes: config.ingest.max_hello_bytes,
            max_in_flight: config.ingest.max_in_flight,
            handshake_timeout: Duration::from_millis(config.ingest.handshake_timeout_ms),
            budget: ConnectionBudget::new(
                config.ingest.max_connections,
                config.ingest.max_connections_per_peer,
                config.ingest.buffer_budget_bytes,
            ),
            connections: connections.clone(),
            sessions,
        });
        let tcp_addr = bound.tcp.as_ref().and_then(|(l, _)| l.local_addr().ok());
        let unix_path = bound.unix.as_ref().map(|(_, p)| p.clone());
        let listeners = bound
            .tcp
            .map(|(l, tls)| listener::Listener::Tcp(l, tls))
            .into_iter()
            .chain(bound.unix.map(|(l, p)| listener::Listener::Unix(l, p)));
        for l in listeners {
            actix_rt::spawn(listener::serve(l, actors.workers.clone(), ingest.clone(), shutdown.clone()));
        }
        tracing::info!(
            tcp = tcp_addr.map(|a| a.to_string()).unwrap_or_default(),
            unix = unix_path.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
            metrics = metrics_addr.map(|a| a.to_string()).unwrap_or_default(),
            admin = admin_addr.map(|a| a.to_string()).unwrap_or_default(),
            workers = config.worker_threads(),
            "botflow is ready"
        );
        Ok(RunningApp {
            store,
            tcp_addr,
            unix_path,
            metrics_addr,
            admin_addr,
            operator_key,
            shutdown,
            heartbeat_stop: actors.heartbeat_stop,
            node,
            router: actors.router,
            journal: actors.journal,
            connections,
            arbiters: actors.arbiters,
            metrics_server,
            admin_server,
            shutdown_timeout: Duration::from_secs(config.shutdown_timeout_seconds),
        })
    }
}

/// Connects, migrates, registers this node (freeing what a previous run of it held)
/// and, on an empty database, writes the first operator key.
async fn open_database(config: &Config, pg: tokio_postgres::Config) -> anyhow::Result<(Store, uuid::Uuid, Option<String>)> {
    let store = Store::new(pg, config.database.pool_size, Duration::from_millis(config.database.connect_timeout_ms), config.database_ca_file())?;
    store.wait_until_reachable(Duration::from_secs(30)).await.context("the database is not reachable")?;
    let report = migrate::migrate(&store).await.context("cannot migrate the database")?;
    for applied in &report.applied {
        tracing::info!(migration = %applied, "applied migration");
    }
    let node = leases::node_id(&config.data_dir)
        .with_context(|| format!("cannot read or write {}", config.data_dir.join("node.id").display()))?;
    let freed = leases::register(&store, node).await?;
    if freed > 0 {
        tracing::info!(executions = freed, "freed the executions a previous run of this node held; they resume");
    }
    let operator_key = accounts::bootstrap_operator_key(&store).await?;
    if let Some(key) = &operator_key {
        let path = config.operator_token_path();
        write_secret(&path, key).with_context(|| format!("cannot write {}", path.display()))?;
        tracing::info!(path = %path.display(), "first start on an empty database: wrote an operator key");
    }
    Ok((store, node, operator_key))
}

impl Bound {
    /// The addresses of the TCP sockets: webhooks may not call them.
    fn addrs(&self) -> Vec<SocketAddr> {
        let tcp = self.tcp.as_ref().map(|(l, _)| l);
        tcp.into_iter().chain(&self.admin).chain(&self.metrics).filter_map(|l| l.local_addr().ok()).collect()
    }

    fn bind(config: &Config) -> anyhow::Result<Bound> {
        let tcp = if config.ingest.tcp.is_empty() {
            None
        } else {
            let tls = match config.ingest_tls_files() {
                Some((cert, key)) => Some(crate::tls::acceptor(&cert, &key)?),
                None => None,
            };
            Some((listener::bind_tcp(&config.ingest.tcp)?, tls))
        };
        let unix = match config.unix_socket_path() {
            Some(p) => Some((listener::bind_unix(&p)?, p)),
            None => None,
        };
        let http = |addr: &str, key: &str| -> anyhow::Result<Option<std::net::TcpListener>> {
            if addr.is_empty() {
                return Ok(None);
            }
            let l = std::net::TcpListener::bind(addr).with_context(|| format!("cannot listen on {key} {addr}"))?;
            Ok(Some(l))
        };
        Ok(Bound { tcp, unix, admin: http(&config.admin.listen, "admin.listen")?, metrics: http(&config.metrics.listen, "metrics.listen")? })
    }
}

impl Actors {
    /// The worker arbiters (connections and supervisors) and the journal's, the
    /// journal lanes, the outbox, the notifier, the lease heartbeat, the router and
    /// the scheduler.
    fn start(config: &Config, store: &Store, node: uuid::Uuid, listening: Vec<SocketAddr>) -> anyhow::Result<Actors> {
        let workers_n = config.worker_threads();
        let arbiters: Vec<Arbiter> = (0..workers_n + 1).map(|_| Arbiter::new()).collect();
        let journal_arbiter = arbiters[workers_n].handle();
        let workers = Workers::new(arbiters[..workers_n].iter().map(Arbiter::handle).collect());
        let journal = Journal::start(
            store,
            node,
            &journal_arbiter,
            config.journal.lanes,
            config.journal.max_batch,
            Duration::from_millis(config.database.unavailable_after_ms),
        );
        let outbox = Outbox::new(store.clone(), journal.clone(), node).start();
        let policy = config
            .egress_policy()
            .map_err(|p| anyhow::anyhow!("invalid egress configuration: {}", p.into_iter().map(|(k, m)| format!("{k}: {m}")).collect::<Vec<_>>().join("; ")))?
            .with_own_listeners(listening);
        let notify_url = (!config.notify.webhook_url.is_empty()).then(|| config.notify.webhook_url.clone());
        // The operator's channel is trusted as configured, on a client of its own.
        let notify_egress = Egress::new(policy.clone().trusting(&config.notify.webhook_url)).context("cannot build the HTTP client")?;
        let egress = Egress::new(policy).context("cannot build the HTTP client")?;
        let notifier = Notifier::new(
            notify_egress.clone(),
            notify_url.clone(),
            Duration::from_secs(config.notify.window_seconds),
            config.notify.failing_threshold,
        )
        .start();
        let ttl = Duration::from_millis(config.lease.ttl_ms);
        let health = LeaseHealth::new(ttl);
        // The heartbeat outlives the drain (in-flight executions keep their leases
        // until the journal is flushed), so it has a token of its own.
        let heartbeat_stop = CancellationToken::new();
        actix_rt::spawn(leases::keep_heartbeat(store.clone(), node, health.clone(), heartbeat_stop.clone()));
        let deps = Arc::new(SupervisorDeps {
            store: store.clone(),
            journal: journal.clone(),
            outbox: outbox.clone(),
            notifier: notifier.clone(),
            egress: egress.clone(),
            node,
            health: health.clone(),
            concurrency: config.executor.concurrency_per_chatbot,
            queue_capacity: config.executor.queue_capacity,
            unavailable_after: Duration::from_millis(config.database.unavailable_after_ms),
            notify_url,
            notify_egress,
            step_timeout: Duration::from_millis(config.executor.step_timeout_ms),
            max_request_body_bytes: config.executor.max_request_body_bytes,
            stored_response_bytes: config.executor.stored_response_bytes,
            ack_timeout: Duration::from_millis(config.outbox.ack_timeout_ms),
            execution_timeout: Duration::from_millis(config.executor.execution_timeout_ms),
            retry: config.retry.clone(),
            limit_defaults: crate::chatbot::limits::Defaults::from_config(config),
            watchlist: config.metrics.watchlist.iter().filter_map(|s| s.parse().ok()).collect(),
        });
        let router = Router::new(deps, workers.handles(), Duration::from_secs(config.executor.idle_supervisor_seconds)).start();
        let scheduler = Scheduler {
            store: store.clone(),
            router: router.clone(),
            notifier,
            ttl,
            scan_interval: Duration::from_millis(config.scheduler.scan_interval_ms),
            unreachable_after: Duration::from_secs(config.notify.database_unreachable_seconds),
        };
        actix_rt::spawn(scheduler.run(heartbeat_stop.clone()));
        let prune_now = Arc::new(tokio::sync::Notify::new());
        actix_rt::spawn(crate::store::retention::keep_pruning(
            store.clone(),
            (&config.retention).into(),
            (&config.retention).into(),
            Duration::from_secs(config.retention.interval_seconds),
            prune_now.clone(),
            heartbeat_stop.clone(),
        ));
        Ok(Actors { arbiters, workers, journal, outbox, router, heartbeat_stop, egress, prune_now })
    }
}

/// Changes made by any process on this database (workflow and limit changes, replays,
/// commands and acks of other nodes, deleted chatbots) go to the router, the outbox or
/// the pruner; key revocations and rotations to the connections' sessions.
fn forward_changes(store: &Store, actors: &Actors, sessions: &Arc<Sessions>, shutdown: &CancellationToken) {
    let (change_tx, mut change_rx) = tokio::sync::mpsc::unbounded_channel();
    actix_rt::spawn(listen::run(store.clone(), change_tx, shutdown.clone()));
    let (r, o, prune_now) = (actors.router.clone(), actors.outbox.clone(), actors.prune_now.clone());
    let (sessions, store) = (sessions.clone(), store.clone());
    actix_rt::spawn(async move {
        while let Some(change) = change_rx.recv().await {
            match change {
                Change::Wake(chatbot_id) => r.do_send(Wake { chatbot_id, due_at: chrono::Utc::now() }),
                Change::Command { node, chatbot_id, command_id } => o.do_send(RemoteCommand { node, chatbot_id, command_id }),
                Change::CommandAcked { command_id, account } => {
                    let scope = account.map_or(Scope::All, Scope::Account);
                    o.do_send(RemoteAck { command_id, scope })
                }
                Change::Key(key) => {
                    actix_rt::spawn(sessions.clone().check(store.clone(), key));
                }
                Change::Resync => {
                    // Command announcements and key withdrawals missed while disconnected, too.
                    sessions.check_all(&store);
                    o.do_send(RedeliverPending);
                    r.do_send(WorkflowsChanged(Change::Resync))
                }
                Change::Deleted(chatbot_id) => {
                    r.do_send(WorkflowsChanged(change));
                    // Its history may be waiting to be pruned; and once more a little
                    // later, for executions the journal was committing as it was deleted.
                    prune_now.notify_one();
                    let again = prune_now.clone();
                    actix_rt::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        again.notify_one();
                    });
                    tracing::debug!(%chatbot_id, "heard of a deleted chatbot");
                }
                other => r.do_send(WorkflowsChanged(other)),
            }
        }
    });
}

impl RunningApp {
    /// Stops accepting and reading, answers every event in flight, waits for running
    /// executions up to the deadline, flushes the journal and stops the threads.
    pub async fn shutdown(self) {
        let deadline = Instant::now() + self.shutdown_timeout;
        tracing::info!("shutting down: no new connections or events");
        self.shutdown.cancel();
        while self.connections.load(std::sync::atomic::Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let open = self.connections.load(std::sync::atomic::Ordering::SeqCst);
        if open > 0 {
            tracing::warn!(open, "connections still had events in flight at the deadline");
        }
        loop {
            let busy = self.router.send(BusySupervisors).await.unwrap_or(0);
            if busy == 0 {
                break;
            }
            if Instant::now() >= deadline {
                tracing::warn!(busy, "executions still running at the deadline; they stay unfinished in the database");
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let flush_deadline = Instant::now() + Duration::from_secs(10);
        if tokio::time::timeout_at(flush_deadline.into(), self.journal.flush()).await.is_err() {
            tracing::warn!("the journal could not write everything before the deadline");
        }
        // What is still unfinished here is free for other nodes now, not after the TTL.
        self.heartbeat_stop.cancel();
        match leases::release_all(&self.store, self.node).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(executions = n, "released the leases of unfinished executions"),
            Err(error) => tracing::warn!(%error, "cannot release leases; other nodes take over after the TTL"),
        }
        if let Some(server) = self.metrics_server {
            server.stop(true).await;
        }
        if let Some(server) = self.admin_server {
            server.stop(true).await;
        }
        for a in &self.arbiters {
            a.stop();
        }
        for a in self.arbiters {
            let _ = a.join();
        }
        tracing::info!("botflow stopped");
    }

    /// The token every listener and connection watches (tests use it to check drains).
    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.is_cancelled()
    }
}

fn start_metrics_server(
    listener: std::net::TcpListener,
    handle: metrics_exporter_prometheus::PrometheusHandle,
) -> anyhow::Result<actix_web::dev::ServerHandle> {
    use actix_web::{web, HttpResponse};
    let upkeep = handle.clone();
    actix_rt::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    let server = actix_web::HttpServer::new(move || {
        let handle = handle.clone();
        actix_web::App::new().route(
            "/metrics",
            web::get().to(move || {
                let body = handle.render();
                async move { HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(body) }
            }),
        )
    })
    .workers(1)
    .disable_signals()
    .listen(listener)?
    .run();
    let h = server.handle();
    actix_rt::spawn(server);
    Ok(h)
}

/// Writes a secret readable by the owner only.
fn write_secret(path: &std::path::Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(secret.as_bytes())?;
    f.write_all(b"\n")
}
