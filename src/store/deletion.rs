//! Deleting a chatbot. One transaction marks it deleted (gone for the API and for
//! ingest from its commit), cancels its unfinished executions, expires its pending
//! commands, records who did it, and announces it on `botflow_chatbots` so every daemon
//! stops its supervisor. Its history stays until the pruner removes it in small
//! batches (`retention::purge_deleted`): all of it at once when the operator asked
//! for `prune`, as its retention says when `keep`; the chatbot row (with its
//! workflows, limits and retention) goes last.

use super::accounts::Principal;
use super::audit;
use super::{Store, StoreError, StoreResult};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The channel a deleted chatbot is announced on; the payload is the chatbot id.
pub const CHATBOTS_CHANNEL: &str = "botflow_chatbots";

/// The statuses of an execution that has not finished.
pub const UNFINISHED: &str = "('queued', 'running', 'retrying', 'waiting')";

/// What becomes of a deleted chatbot's executions, dead letters and commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum History {
    /// Kept, and pruned as the chatbot's retention says.
    #[default]
    Keep,
    /// Removed now, in the background, in small batches.
    Prune,
}

impl History {
    pub fn as_str(self) -> &'static str {
        match self {
            History::Keep => "keep",
            History::Prune => "prune",
        }
    }
}

/// What a deletion did.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Deleted {
    pub chatbot_id: Uuid,
    pub deleted_at: chrono::DateTime<chrono::Utc>,
    pub history: History,
    /// Unfinished executions cancelled (only with `force`; without it there were none).
    pub cancelled_executions: i64,
}

/// Deletes a chatbot. Refused (`Conflict`) while it has unfinished executions (queued,
/// running, retrying or waiting on a delay) unless `force`, which cancels them: their
/// status becomes `cancelled` and their lease is taken away, so a step still running
/// somewhere cannot write its outcome.
pub async fn delete_chatbot(store: &Store, id: Uuid, history: History, force: bool, actor: Option<&Principal>) -> StoreResult<Deleted> {
    let mut client = store.pool().get().await?;
    let tx = client.transaction().await?;
    // The row lock orders this against workflow and limit changes, which lock it too.
    let row = tx
        .query_opt("SELECT account_id FROM chatbots WHERE id = $1 AND deleted_at IS NULL FOR UPDATE", &[&id])
        .await?
        .ok_or_else(|| StoreError::NotFound { what: "chatbot", id: id.to_string() })?;
    let account_id: Uuid = row.get(0);
    let unfinished: i64 = tx
        .query_one(&format!("SELECT count(*) FROM executions WHERE chatbot_id = $1 AND status IN {UNFINISHED}"), &[&id])
        .await?
        .get(0);
    if unfinished > 0 && !force {
        return Err(StoreError::Conflict(format!(
            "chatbot {id} has {unfinished} unfinished executions (queued, running, retrying or waiting); \
             delete it with force to cancel them"
        )));
    }
    // One statement: the time a forced deletion takes grows with the chatbot's backlog
    // (a few seconds for a hundred thousand unfinished executions).
    let cancelled = tx.execute(&cancel_sql(false), &[&id]).await? as i64;
    tx.execute("UPDATE outbox SET status = 'expired' WHERE chatbot_id = $1 AND status = 'pending'", &[&id]).await?;
    let deleted_at: chrono::DateTime<chrono::Utc> = tx
        .query_one(
            "UPDATE chatbots SET deleted_at = now(), purge_history = $2 WHERE id = $1 RETURNING deleted_at",
            &[&id, &(history == History::Prune)],
        )
        .await?
        .get(0);
    let action = audit::Action {
        account_id,
        actor,
        action: "chatbot.delete",
        target_type: "chatbot",
        target_id: id,
        details: serde_json::json!({"history": history.as_str(), "force": force, "cancelled_executions": cancelled}),
    };
    audit::record(&tx, action).await?;
    tx.execute("SELECT pg_notify($1, $2)", &[&CHATBOTS_CHANNEL, &id.to_string()]).await?;
    tx.commit().await?;
    Ok(Deleted { chatbot_id: id, deleted_at, history, cancelled_executions: cancelled })
}

/// Cancels a deleted chatbot's unfinished executions (`$1`), taking their leases away
/// (a new epoch: a write under the old one is refused). The deletion cancels them all
/// in its transaction; the pruner, `batched` (`$2` rows a statement), those a daemon
/// committed before it heard of the deletion.
pub fn cancel_sql(batched: bool) -> String {
    let which = if batched {
        format!("id IN (SELECT id FROM executions WHERE chatbot_id = $1 AND status IN {UNFINISHED} LIMIT $2 FOR UPDATE SKIP LOCKED)")
    } else {
        format!("chatbot_id = $1 AND status IN {UNFINISHED}")
    };
    format!(
        "UPDATE executions SET status = 'cancelled', error = 'the chatbot was deleted', finished_at = now(),
                lease_owner = NULL, lease_epoch = lease_epoch + 1
          WHERE {which}"
    )
}

/// Which of `ids` are deleted (for a daemon that may have missed an announcement).
pub async fn deleted_among(store: &Store, ids: &[Uuid]) -> StoreResult<Vec<Uuid>> {
    let client = store.pool().get().await?;
    let rows = client.query("SELECT id FROM chatbots WHERE id = ANY($1) AND deleted_at IS NOT NULL", &[&ids]).await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}
