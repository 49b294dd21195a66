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
use std::sync::atomic::{AtomicU64, Ordering};
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
    let freed = client
        .execute(
            "UPDATE executions SET lease_owner = NULL
             WHERE lease_owner = $1 AND status IN ('queued', 'running', 'retrying', 'waiting')",
            &[&node],
        )
        .await?;
    Ok(freed)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Refreshes the node's heartbeat.
pub async fn heartbeat(store: &Store, node: Uuid) -> StoreResult<()> {
    let client = store.pool().get().await?;
    let n = client.execute("UPDATE nodes SET heartbeat_at = now() WHERE id = $1", &[&node]).await?;
    if n == 0 {
        // Removed by an operator or another node's cleanup: come back.
        client
            .execute(
                "INSERT INTO nodes (id, hostname, pid) VALUES ($1, $2, $3) ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()",
                &[&node, &hostname(), &(std::process::id() as i32)],
            )
            .await?;
    }
    Ok(())
}

/// Nodes other than `me` whose heartbeat is older than `ttl`.
pub async fn dead_nodes(store: &Store, me: Uuid, ttl: Duration) -> StoreResult<Vec<Uuid>> {
    let client = store.pool().get().await?;
    let rows = client
        .query(
            "SELECT id FROM nodes WHERE id <> $1 AND heartbeat_at < now() - make_interval(secs => $2)",
            &[&me, &(ttl.as_secs_f64())],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Forgets dead nodes that hold no lease any more.
pub async fn forget_dead(store: &Store, dead: &[Uuid]) -> StoreResult<()> {
    if dead.is_empty() {
        return Ok(());
    }
    let client = store.pool().get().await?;
    client
        .execute(
            "DELETE FROM nodes n WHERE n.id = ANY($1)
             AND NOT EXISTS (SELECT 1 FROM executions e
                             WHERE e.lease_owner = n.id AND e.status IN ('queued', 'running', 'retrying', 'waiting'))",
            &[&dead],
        )
        .await?;
    Ok(())
}

/// Chatbots with work for any node: free executions due before `horizon` from now,
/// and executions of dead nodes. With the earliest due time of each.
pub async fn due_chatbots(store: &Store, dead: &[Uuid], horizon: Duration) -> StoreResult<Vec<(Uuid, DateTime<Utc>)>> {
    let client = store.pool().get().await?;
    let stmt = client
        .prepare_cached(
            "SELECT chatbot_id, min(run_after) FROM executions
             WHERE status IN ('queued', 'running', 'retrying', 'waiting')
               AND (lease_owner IS NULL OR lease_owner = ANY($1))
               AND run_after <= now() + make_interval(secs => $2)
             GROUP BY chatbot_id
             LIMIT 10000",
        )
        .await?;
    let rows = client.query(&stmt, &[&dead, &horizon.as_secs_f64()]).await?;
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

/// Claims up to `limit` due executions of a chatbot that are free or held by a dead
/// node, oldest due first. Rows another node is claiming at the same moment are
/// skipped, never waited for.
pub async fn claim(store: &Store, node: Uuid, chatbot: Uuid, dead: &[Uuid], limit: i64) -> StoreResult<Vec<Claimed>> {
    if limit <= 0 {
        return Ok(Vec::new());
    }
    let client = store.pool().get().await?;
    let stmt = client
        .prepare_cached(
            "WITH c AS (
                 SELECT id, status FROM executions
                 WHERE chatbot_id = $2 AND status IN ('queued', 'running', 'retrying', 'waiting')
                   AND run_after <= now() AND (lease_owner IS NULL OR lease_owner = ANY($3))
                 ORDER BY run_after, id
                 LIMIT $4
                 FOR UPDATE SKIP LOCKED
             )
             UPDATE executions e SET lease_owner = $1, lease_epoch = e.lease_epoch + 1
             FROM c WHERE e.id = c.id
             RETURNING e.id, e.workflow_id, e.workflow_version, e.event, e.conversation_id, e.step_index,
                       e.outputs, e.attempt, e.lease_epoch, c.status",
        )
        .await?;
    let rows = client.query(&stmt, &[&node, &chatbot, &dead, &limit]).await?;
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

/// Whether this node's leases can be trusted right now: its last heartbeat succeeded
/// within the TTL (with a margin, measured from when the heartbeat was sent). Steps
/// are not started while it cannot: another node may be taking them over.
#[derive(Clone)]
pub struct LeaseHealth {
    epoch: Instant,
    /// Milliseconds since `epoch` at which the last successful heartbeat was sent.
    last_ok_ms: Arc<AtomicU64>,
    ttl: Duration,
}

impl LeaseHealth {
    pub fn new(ttl: Duration) -> LeaseHealth {
        LeaseHealth { epoch: Instant::now(), last_ok_ms: Arc::new(AtomicU64::new(0)), ttl }
    }

    /// Records a heartbeat that succeeded, sent at `sent`.
    pub fn beat(&self, sent: Instant) {
        let ms = sent.saturating_duration_since(self.epoch).as_millis() as u64;
        self.last_ok_ms.fetch_max(ms, Ordering::SeqCst);
    }

    pub fn healthy(&self) -> bool {
        let last = self.epoch + Duration::from_millis(self.last_ok_ms.load(Ordering::SeqCst));
        // Two thirds of the TTL: the remaining third covers clock drift between the
        // daemon and the server and the time a step needs to notice.
        last.elapsed() < self.ttl * 2 / 3
    }

    /// Waits until healthy, checking every 50 ms.
    pub async fn wait_healthy(&self) {
        while !self.healthy() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
