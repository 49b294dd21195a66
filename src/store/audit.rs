//! The audit log: who (which API key, of which account and role) did what to which key
//! or chatbot, and when. Entries are written in the transaction of the change they
//! record, so there is no change without its entry. Rate-limit changes keep their own
//! record (`limit_changes`, shown with the limits).

use super::accounts::Principal;
use super::{Store, StoreResult};
use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

/// One recorded action.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Entry {
    pub id: Uuid,
    pub at: DateTime<Utc>,
    /// The account whose key or chatbot was acted on.
    pub account_id: Uuid,
    /// The API key that acted (`null`: the command line on the database).
    pub actor_key_id: Option<Uuid>,
    pub actor_account_id: Option<Uuid>,
    pub actor_role: Option<String>,
    /// `key.revoke`, `key.rotate`, `chatbot.rotate_secret` or `chatbot.delete`.
    pub action: String,
    /// `key` or `chatbot`.
    pub target_type: String,
    pub target_id: Uuid,
    /// What the action did (the new key's id, the grace period).
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
}

/// What an entry says; written by `record` in the caller's transaction.
pub struct Action<'a> {
    pub account_id: Uuid,
    pub actor: Option<&'a Principal>,
    pub action: &'static str,
    pub target_type: &'static str,
    pub target_id: Uuid,
    pub details: serde_json::Value,
}

pub async fn record(tx: &tokio_postgres::Transaction<'_>, a: Action<'_>) -> StoreResult<()> {
    let role = a.actor.map(|p| p.role.as_str());
    tx.execute(
        "INSERT INTO audit_log (id, account_id, actor_key_id, actor_account, actor_role, action, target_type, target_id, details)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        &[
            &Uuid::now_v7(),
            &a.account_id,
            &a.actor.map(|p| p.key_id),
            &a.actor.map(|p| p.account_id),
            &role,
            &a.action,
            &a.target_type,
            &a.target_id,
            &a.details,
        ],
    )
    .await?;
    Ok(())
}

/// A page of entries (of one account, or all), newest first, before `(at, id)`.
pub async fn list(
    store: &Store,
    account: Option<Uuid>,
    before: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> StoreResult<Vec<Entry>> {
    let client = store.pool().get().await?;
    let (at, id) = before.unzip();
    let rows = client
        .query(
            "SELECT id, at, account_id, actor_key_id, actor_account, actor_role, action, target_type, target_id, details
             FROM audit_log
             WHERE ($1::uuid IS NULL OR account_id = $1)
               AND ($2::timestamptz IS NULL OR (at, id) < ($2, $3))
             ORDER BY at DESC, id DESC LIMIT $4",
            &[&account, &at, &id, &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Entry {
            id: r.get(0),
            at: r.get(1),
            account_id: r.get(2),
            actor_key_id: r.get(3),
            actor_account_id: r.get(4),
            actor_role: r.get(5),
            action: r.get(6),
            target_type: r.get(7),
            target_id: r.get(8),
            details: r.get(9),
        })
        .collect())
}
