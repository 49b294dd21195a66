//! Dead letters: executions that used up their attempts, kept for an operator to
//! replay (one more attempt of the same execution, from the step that failed) or to
//! discard (recording who did it and when).

use super::listen::WAKE_CHANNEL;
use super::{Store, StoreError, StoreResult};
use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub id: Uuid,
    pub execution_id: Uuid,
    pub chatbot_id: Uuid,
    pub workflow_id: Uuid,
    pub workflow_version: i32,
    pub event: serde_json::Value,
    pub last_error: Option<String>,
    pub attempts: i32,
    pub history: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub replayed_at: Option<DateTime<Utc>>,
    pub replayed_by: Option<String>,
    pub discarded_at: Option<DateTime<Utc>>,
    pub discarded_by: Option<String>,
}

impl DeadLetter {
    pub fn state(&self) -> &'static str {
        if self.replayed_at.is_some() {
            "replayed"
        } else if self.discarded_at.is_some() {
            "discarded"
        } else {
            "open"
        }
    }
}

const COLUMNS: &str = "id, execution_id, chatbot_id, workflow_id, workflow_version, event, last_error, attempts, history,
                       created_at, replayed_at, replayed_by, discarded_at, discarded_by";

fn from_row(r: &tokio_postgres::Row) -> DeadLetter {
    DeadLetter {
        id: r.get(0),
        execution_id: r.get(1),
        chatbot_id: r.get(2),
        workflow_id: r.get(3),
        workflow_version: r.get(4),
        event: r.get(5),
        last_error: r.get(6),
        attempts: r.get(7),
        history: r.get(8),
        created_at: r.get(9),
        replayed_at: r.get(10),
        replayed_by: r.get(11),
        discarded_at: r.get(12),
        discarded_by: r.get(13),
    }
}

/// Dead letters, newest first; only open ones unless `all`.
pub async fn list(store: &Store, chatbot: Option<Uuid>, all: bool, limit: i64) -> StoreResult<Vec<DeadLetter>> {
    let client = store.pool().get().await?;
    let rows = client
        .query(
            &format!(
                "SELECT {COLUMNS} FROM dead_letters
                 WHERE ($1::uuid IS NULL OR chatbot_id = $1)
                   AND ($2 OR (replayed_at IS NULL AND discarded_at IS NULL))
                 ORDER BY created_at DESC, id DESC LIMIT $3"
            ),
            &[&chatbot, &all, &limit],
        )
        .await?;
    Ok(rows.iter().map(from_row).collect())
}

pub async fn get(store: &Store, id: Uuid) -> StoreResult<DeadLetter> {
    let client = store.pool().get().await?;
    let row = client.query_opt(&format!("SELECT {COLUMNS} FROM dead_letters WHERE id = $1"), &[&id]).await?;
    row.as_ref().map(from_row).ok_or_else(|| StoreError::NotFound { what: "dead letter", id: id.to_string() })
}

/// Locks an open dead letter in `tx`, or says why it cannot be acted on.
async fn lock_open(tx: &tokio_postgres::Transaction<'_>, id: Uuid) -> StoreResult<DeadLetter> {
    let row = tx.query_opt(&format!("SELECT {COLUMNS} FROM dead_letters WHERE id = $1 FOR UPDATE"), &[&id]).await?;
    let dl = row.as_ref().map(from_row).ok_or_else(|| StoreError::NotFound { what: "dead letter", id: id.to_string() })?;
    match dl.state() {
        "open" => Ok(dl),
        state => Err(StoreError::Invalid(format!("dead letter {id} was already {state}"))),
    }
}

/// Starts one more attempt of the dead execution, from the step that failed. Running
/// daemons hear of it through NOTIFY and pick it up at once.
pub async fn replay(store: &Store, id: Uuid, by: &str) -> StoreResult<DeadLetter> {
    let mut client = store.pool().get().await?;
    let tx = client.transaction().await?;
    let dl = lock_open(&tx, id).await?;
    let n = tx
        .execute(
            "UPDATE executions SET status = 'queued', attempt = attempt + 1, run_after = now(), lease_owner = NULL,
                    error = NULL, finished_at = NULL, duration_ms = NULL
             WHERE id = $1 AND status = 'dead'",
            &[&dl.execution_id],
        )
        .await?;
    if n == 0 {
        return Err(StoreError::Invalid(format!("execution {} is no longer dead", dl.execution_id)));
    }
    tx.execute("UPDATE dead_letters SET replayed_at = now(), replayed_by = $2 WHERE id = $1", &[&id, &by]).await?;
    tx.execute("SELECT pg_notify($1, $2)", &[&WAKE_CHANNEL, &dl.chatbot_id.to_string()]).await?;
    tx.commit().await?;
    get(store, id).await
}

/// Gives up on the dead execution for good, recording who did it.
pub async fn discard(store: &Store, id: Uuid, by: &str) -> StoreResult<DeadLetter> {
    let mut client = store.pool().get().await?;
    let tx = client.transaction().await?;
    lock_open(&tx, id).await?;
    tx.execute("UPDATE dead_letters SET discarded_at = now(), discarded_by = $2 WHERE id = $1", &[&id, &by]).await?;
    tx.commit().await?;
    get(store, id).await
}
