//! Nodes and leases: which daemon may run which execution.
//!
//! Every daemon is a node with a row in `nodes` whose `heartbeat_at` it refreshes
//! (PostgreSQL's clock, never a node's). An execution is leased to a node
//! (`lease_owner`) under an epoch (`lease_epoch`) that grows with every claim; every
//! write about the execution carries the epoch it was claimed with and is refused if
//! the lease moved on. A node whose heartbeat is older than the lease TTL is dead: its
//! executions are claimed by others (epoch + 1), so it can never write over a newer
//! attempt, even if it was only paused and wakes up.
//!
//! A node's id is kept in `<data_dir>/node.id`, so a daemon restarted on the same data
//! frees its previous incarnation's leases at once instead of waiting out the TTL.

use super::{Store, StoreError, StoreResult};
use chrono::{DateTime, Utc};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// The node id for a data directory, created on first use.
pub fn node_id(data_dir: &Path) -> std::io::Result<Uuid> {
    let path = data_dir.join("node.id");
    if let Ok(text) = std::fs::read_to_string(&path) {
        if let Ok(id) = text.trim().parse() {
            return Ok(id);
        }
    }
    std::fs::create_dir_all(data_dir)?;
    let id = Uuid::new_v4();
    std::fs::write(&path, format!("{id}\n"))?;
    Ok(id)
}

/// Registers the node (or refreshes it after a restart) and frees every lease a
/// previous incarnation of it held: those executions are claimed again like any other.
pub async fn register(store: &Store, node: Uuid) -> StoreResult<u64> {
    let host = hostname();
    let client = store.pool().get().await?;
    client
        .execute(
            "INSERT INTO nodes (id, hostname, pid) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO UPDATE SET hostname = $2, pid = $3, started_at = now(), heartbeat_at = now()",
            &[&node, &host, &(std::process::id() as i32)],
        )
        .await?;
    drop(client);
    release_all(store, node).await
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Forgets nodes dead for a long while (ten TTLs) that hold no lease any more.
pub async fn forget_dead(store: &Store, ttl: Duration) -> StoreResult<()> {
    let client = store.pool().get().await?;
    client
        .execute(
            "DELETE FROM nodes n WHERE n.heartbeat_at < now() - make_interval(secs => $1)
             AND NOT EXISTS (SELECT 1 FROM executions e
                             WHERE e.lease_owner = n.id AND e.status IN ('queued', 'running', 'retrying', 'waiting'))",
            &[&(ttl.as_secs_f64() * 10.0)],
        )
        .await?;
    Ok(())
}

/// Chatbots with work for any node: free executions due before `horizon` from now,
/// and executions of nodes whose heartbeat is older than `ttl`. With the earliest due
/// time of each. Who is dead is decided here, on PostgreSQL's clock.
pub async fn due_chatbots(store: &Store, ttl: Duration, horizon: Duration) -> StoreResult<Vec<(Uuid, DateTime<Utc>)>> {
    let client = store.pool().get().await?;
    let stmt = client
        .prepare_cached(
            "SELECT chatbot_id, min(run_after) FROM (
                 SELECT chatbot_id, run_after FROM executions
                 WHERE lease_owner IS NULL AND status IN ('queued', 'running', 'retrying', 'waiting')
                   AND run_after <= now() + make_interval(secs => $2)
                 UNION ALL
                 SELECT chatbot_id, run_after FROM executions
                 WHERE status IN ('queued', 'running', 'retrying', 'waiting')
                   AND lease_owner IN (SELECT id FROM nodes WHERE heartbeat_at < now() - make_interval(secs => $1))
             ) due
             GROUP BY chatbot_id
             LIMIT 10000",
        )
        .await?;
    let rows = client.query(&stmt, &[&ttl.as_secs_f64(), &horizon.as_secs_f64()]).await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// An execution a node just claimed, with what it needs to go on.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: Uuid,
    pub workflow_id: Uuid,
    pub workflow_version: i32,
    pub event: serde_json::Value,
    pub conversation_id: String,
    pub step_index: i32,
    pub outputs: serde_json::Value,
    pub attempt: i32,
    pub epoch: i64,
    /// As it was before the claim (`running` means taken over from a dead node).
    pub status: String,
}

/// Claims up to `limit` due executions of a chatbot that are free or held by a node
/// whose heartbeat is older than `ttl`, oldest due first. Rows another node is
/// claiming at the same moment are skipped, never waited for. An execution that was
/// `running` when it was interrupted gets its next attempt number, so one that keeps
/// crashing its daemon still comes to an end.
pub async fn claim(store: &Store, node: Uuid, chatbot: Uuid, ttl: Duration, limit: i64) -> StoreResult<Vec<Claimed>> {
    if limit <= 0 {
        return Ok(Vec::new());
    }
    let client = store.pool().get().await?;
    let stmt = client
        .prepare_cached(
            "WITH c AS (
                 SELECT id, status FROM executions
                 WHERE chatbot_id = $2 AND status IN ('queued', 'running', 'retrying', 'waiting')
                   AND run_after <= now()
                   AND (lease_owner IS NULL
                        -- Never from itself: right after a stall its own heartbeat looks
                        -- old, while what it holds is still running here (it releases
                        -- those itself once it sees the lapse).
                        OR lease_owner IN (SELECT id FROM nodes WHERE heartbeat_at < now() - make_interval(secs => $3) AND id <> $1))
                 ORDER BY run_after, id
                 LIMIT $4
                 FOR UPDATE SKIP LOCKED
             )
             UPDATE executions e
             SET lease_owner = $1, lease_epoch = e.lease_epoch + 1,
                 attempt = CASE WHEN c.status = 'running' THEN e.attempt + 1 ELSE e.attempt END
             FROM c WHERE e.id = c.id
             RETURNING e.id, e.workflow_id, e.workflow_version, e.event, e.conversation_id, e.step_index,
                       e.outputs, e.attempt, e.lease_epoch, c.status",
        )
        .await?;
    let rows = client.query(&stmt, &[&node, &chatbot, &ttl.as_secs_f64(), &limit]).await?;
    if !rows.is_empty() {
        metrics::counter!(crate::telemetry::metrics::CLAIMS).increment(rows.len() as u64);
    }
    Ok(rows
        .iter()
        .map(|r| Claimed {
            id: r.get(0),
            workflow_id: r.get(1),
            workflow_version: r.get(2),
            event: r.get(3),
            conversation_id: r.get(4),
            step_index: r.get(5),
            outputs: r.get(6),
            attempt: r.get(7),
            epoch: r.get(8),
            status: r.get(9),
        })
        .collect())
}

/// Gives up this node's lease on one execution (if it still holds it at `epoch`), so
/// any node may claim it again when due. The node is alive and chose to stop (its
/// heartbeat lapsed, say): a `running` execution goes back to `queued`, so that the
/// next claim does not take it for a run interrupted by a crash and use up one of the
/// workflow's attempts.
pub async fn release(store: &Store, node: Uuid, execution: Uuid, epoch: i64) -> StoreResult<()> {
    let client = store.pool().get().await?;
    client
        .execute(
            "UPDATE executions SET lease_owner = NULL, status = CASE WHEN status = 'running' THEN 'queued' ELSE status END
             WHERE id = $1 AND lease_owner = $2 AND lease_epoch = $3",
            &[&execution, &node, &epoch],
        )
        .await?;
    Ok(())
}

/// `release` on a task of its own, tried until it is written. A lease left behind
/// keeps the execution from every node until this one restarts (it never takes over
/// from itself, and the others see it alive), and a release is usually asked for when
/// the database is away. The task outlives whoever asked (a supervisor stopped as idle
/// meanwhile); the update only matches this epoch's lease, so a late one changes nothing.
pub fn release_until_written(store: Store, node: Uuid, execution: Uuid, epoch: i64) {
    tokio::spawn(async move {
        let mut wait = std::time::Duration::from_millis(100);
        let mut failures = 0u32;
        while let Err(error) = release(&store, node, execution, epoch).await {
            failures += 1;
            if failures == 1 || failures % 20 == 0 {
                tracing::warn!(%error, %execution, failures, "cannot release a lease yet; trying again");
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(std::time::Duration::from_secs(2));
        }
    });
}

/// Gives up every lease this node holds (at shutdown, so others need not wait out the
/// TTL; and at start, for a previous incarnation's).
pub async fn release_all(store: &Store, node: Uuid) -> StoreResult<u64> {
    let client = store.pool().get().await?;
    Ok(client
        .execute(
            "UPDATE executions SET lease_owner = NULL
             WHERE lease_owner = $1 AND status IN ('queued', 'running', 'retrying', 'waiting')",
            &[&node],
        )
        .await?)
}

/// A stored workflow version (for executions that run a version other than the
/// current one).
pub async fn workflow_version(store: &Store, workflow: Uuid, version: i32) -> StoreResult<serde_json::Value> {
    let client = store.pool().get().await?;
    let row = client
        .query_opt(
            "SELECT definition FROM workflow_versions WHERE workflow_id = $1 AND version = $2",
            &[&workflow, &version],
        )
        .await?;
    row.map(|r| r.get(0))
        .ok_or_else(|| StoreError::NotFound { what: "workflow version", id: format!("{workflow} v{version}") })
}

/// Whether this node's leases can be trusted right now, shared by the heartbeat task
/// (which updates it) and every executor (which checks it around each step).
///
/// `healthy` is false while the last successful heartbeat is older than two thirds of
/// the TTL (the rest covers clock drift and the time a step needs to notice): another
/// node may be about to take this one's executions. `generation` grows when a heartbeat
/// finds this node was away longer than the TTL: other nodes may have claimed any of
/// its executions, so every job started before is abandoned (and its lease given up)
/// rather than trusted.
#[derive(Clone)]
pub struct LeaseHealth {
    tx: Arc<tokio::sync::watch::Sender<LeaseState>>,
    ttl: Duration,
    start: Instant,
    /// Milliseconds after `start` at which the last successful heartbeat was sent.
    /// Read at every check: after the process was paused, the flag in `tx` is stale
    /// until the heartbeat task runs again, but the time since this is not.
    last_ok_ms: Arc<std::sync::atomic::AtomicU64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseState {
    pub generation: u64,
    pub healthy: bool,
}

impl LeaseHealth {
    pub fn new(ttl: Duration) -> LeaseHealth {
        let (tx, _) = tokio::sync::watch::channel(LeaseState { generation: 0, healthy: true });
        LeaseHealth { tx: Arc::new(tx), ttl, start: Instant::now(), last_ok_ms: Arc::default() }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn fresh(&self) -> bool {
        let ms = self.last_ok_ms.load(std::sync::atomic::Ordering::SeqCst);
        (self.start + Duration::from_millis(ms)).elapsed() < self.ttl * 2 / 3
    }

    /// The state now: healthy only if the last heartbeat is recent by the clock, too.
    pub fn state(&self) -> LeaseState {
        let s = *self.tx.borrow();
        LeaseState { healthy: s.healthy && self.fresh(), ..s }
    }

    /// Wakes whoever waits on it when the heartbeat task changes the state.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<LeaseState> {
        self.tx.subscribe()
    }

    /// Time since the last heartbeat that succeeded was sent, by this node's clock.
    pub fn since_last_beat(&self) -> Duration {
        let ms = self.last_ok_ms.load(std::sync::atomic::Ordering::SeqCst);
        (self.start + Duration::from_millis(ms)).elapsed()
    }

    /// A heartbeat sent at `sent` succeeded.
    pub fn beat(&self, sent: Instant) {
        let ms = sent.saturating_duration_since(self.start).as_millis() as u64;
        self.last_ok_ms.fetch_max(ms, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.tx.send_if_modified(|s| {
            let changed = s.healthy != healthy;
            s.healthy = healthy;
            changed
        });
    }

    /// Every job started so far is void.
    pub fn new_generation(&self) {
        self.tx.send_modify(|s| s.generation += 1);
    }
}

/// Keeps this node's heartbeat on a connection of its own (so a busy pool cannot make
/// a live node look dead) and keeps `LeaseHealth` up to date.
pub async fn keep_heartbeat(store: Store, node: Uuid, health: LeaseHealth, cancel: tokio_util::sync::CancellationToken) {
    let ttl = health.ttl();
    let tick = (ttl / 6).max(Duration::from_millis(20));
    let mut client: Option<tokio_postgres::Client> = None;
    // The registration at start was a heartbeat.
    health.beat(Instant::now());
    let mut beat_due = Instant::now();
    loop {
        if Instant::now() >= beat_due {
            beat_due = Instant::now() + ttl / 3;
            let sent = Instant::now();
            match beat(&store, &mut client, node).await {
                Ok(away) => {
                    if away.is_none_or(|a| a >= ttl) {
                        // Away long enough to be declared dead: whatever this node held
                        // may have been claimed by another. Start over. The figures tell
                        // a slow database (the query took long) from a stalled node or
                        // host (the query was quick, but this node's own clock shows a
                        // long gap since the last beat).
                        tracing::warn!(
                            away_ms = away.map(|a| a.as_millis() as u64),
                            query_ms = sent.elapsed().as_millis() as u64,
                            since_last_beat_ms = health.since_last_beat().as_millis() as u64,
                            ttl_ms = ttl.as_millis() as u64,
                            "this node's heartbeat lapsed; abandoning its executions"
                        );
                        health.new_generation();
                    }
                    health.beat(sent);
                }
                Err(error) => {
                    client = None;
                    tracing::warn!(%error, "heartbeat failed");
                }
            }
        }
        health.set_healthy(health.fresh());
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
    }
}

/// One heartbeat; returns how long the node's previous one was ago (PostgreSQL's
/// clock), or `None` if its row was gone.
async fn beat(store: &Store, client: &mut Option<tokio_postgres::Client>, node: Uuid) -> StoreResult<Option<Duration>> {
    if client.as_ref().is_none_or(|c| c.is_closed()) {
        let c = store.dedicated().await?;
        c.batch_execute("SET statement_timeout = 5000").await?;
        *client = Some(c);
    }
    let Some(c) = client.as_ref() else { return Err(StoreError::Connect("no heartbeat connection".into())) };
    let row = c
        .query_opt(
            "WITH old AS (SELECT heartbeat_at FROM nodes WHERE id = $1 FOR UPDATE)
             UPDATE nodes SET heartbeat_at = now() FROM old WHERE nodes.id = $1
             RETURNING extract(epoch FROM now() - old.heartbeat_at)::float8",
            &[&node],
        )
        .await?;
    match row {
        Some(r) => Ok(Some(Duration::from_secs_f64(r.get::<_, f64>(0).max(0.0)))),
        None => {
            // Forgotten as dead: come back as a new registration.
            c.execute(
                "INSERT INTO nodes (id, hostname, pid) VALUES ($1, $2, $3) ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()",
                &[&node, &hostname(), &(std::process::id() as i32)],
            )
            .await?;
            Ok(None)
        }
    }
}
