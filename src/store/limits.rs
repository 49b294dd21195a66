//! Per-chatbot rate limit overrides: read by supervisors, changed by operators (each
//! change audited, and announced with NOTIFY so every daemon applies it at once).

use super::{Store, StoreError, StoreResult};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The channel limit changes are announced on; the payload is the chatbot id.
pub const LIMITS_CHANNEL: &str = "botflow_limits";

/// A chatbot's own values; `None` means the daemon's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    #[serde(default)]
    pub events_per_second: Option<u32>,
    #[serde(default)]
    pub burst: Option<u32>,
    #[serde(default)]
    pub executions_per_second: Option<u32>,
    #[serde(default)]
    pub max_concurrent: Option<u32>,
}

/// Largest value any limit may take.
pub const MAX_LIMIT: u32 = 1_000_000;

impl Overrides {
    /// The first value out of range, named.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        for (field, v) in [
            ("events_per_second", self.events_per_second),
            ("burst", self.burst),
            ("executions_per_second", self.executions_per_second),
            ("max_concurrent", self.max_concurrent),
        ] {
            if let Some(v) = v {
                if v == 0 || v > MAX_LIMIT {
                    return Err((field, format!("must be within 1..{MAX_LIMIT}, got {v}")));
                }
            }
        }
        Ok(())
    }
}

fn opt(v: Option<i32>) -> Option<u32> {
    v.map(|v| v.max(0) as u32)
}

pub async fn get(store: &Store, chatbot: Uuid) -> StoreResult<Overrides> {
    let client = store.pool().get().await?;
    let stmt = client
        .prepare_cached(
            "SELECT events_per_second, burst, executions_per_second, max_concurrent FROM chatbot_limits WHERE chatbot_id = $1",
        )
        .await?;
    Ok(client
        .query_opt(&stmt, &[&chatbot])
        .await?
        .map(|r| Overrides {
            events_per_second: opt(r.get(0)),
            burst: opt(r.get(1)),
            executions_per_second: opt(r.get(2)),
            max_concurrent: opt(r.get(3)),
        })
        .unwrap_or_default())
}

/// Replaces a chatbot's overrides, records the change and tells every daemon.
/// Returns the overrides before and after.
pub async fn set(store: &Store, chatbot: Uuid, new: Overrides, by: &str) -> StoreResult<(Overrides, Overrides)> {
    new.validate().map_err(|(f, m)| StoreError::Invalid(format!("{f} {m}")))?;
    let mut client = store.pool().get().await?;
    let tx = client.transaction().await?;
    // Serialises changes to one chatbot, so the audit's "old" is really the old value.
    if tx.query_opt("SELECT 1 FROM chatbots WHERE id = $1 AND deleted_at IS NULL FOR UPDATE", &[&chatbot]).await?.is_none() {
        return Err(StoreError::NotFound { what: "chatbot", id: chatbot.to_string() });
    }
    let row = tx
        .query_opt(
            "SELECT events_per_second, burst, executions_per_second, max_concurrent FROM chatbot_limits WHERE chatbot_id = $1",
            &[&chatbot],
        )
        .await?;
    let old = row
        .map(|r| Overrides {
            events_per_second: opt(r.get(0)),
            burst: opt(r.get(1)),
            executions_per_second: opt(r.get(2)),
            max_concurrent: opt(r.get(3)),
        })
        .unwrap_or_default();
    let i = |v: Option<u32>| v.map(|v| v as i32);
    tx.execute(
        "INSERT INTO chatbot_limits (chatbot_id, events_per_second, burst, executions_per_second, max_concurrent, updated_by)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (chatbot_id) DO UPDATE SET events_per_second = $2, burst = $3, executions_per_second = $4,
             max_concurrent = $5, updated_at = now(), updated_by = $6",
        &[&chatbot, &i(new.events_per_second), &i(new.burst), &i(new.executions_per_second), &i(new.max_concurrent), &by],
    )
    .await?;
    let (old_json, new_json) = (serde_json::to_value(old).unwrap_or_default(), serde_json::to_value(new).unwrap_or_default());
    tx.execute(
        "INSERT INTO limit_changes (chatbot_id, changed_by, old_limits, new_limits) VALUES ($1, $2, $3, $4)",
        &[&chatbot, &by, &old_json, &new_json],
    )
    .await?;
    tx.execute("SELECT pg_notify($1, $2)", &[&LIMITS_CHANNEL, &chatbot.to_string()]).await?;
    tx.commit().await?;
    Ok((old, new))
}

/// One recorded change.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Change {
    pub changed_at: DateTime<Utc>,
    pub changed_by: String,
    pub old: serde_json::Value,
    pub new: serde_json::Value,
}

pub async fn history(store: &Store, chatbot: Uuid, limit: i64) -> StoreResult<Vec<Change>> {
    let client = store.pool().get().await?;
    let rows = client
        .query(
            "SELECT changed_at, changed_by, old_limits, new_limits FROM limit_changes
             WHERE chatbot_id = $1 ORDER BY changed_at DESC, id DESC LIMIT $2",
            &[&chatbot, &limit],
        )
        .await?;
    Ok(rows.iter().map(|r| Change { changed_at: r.get(0), changed_by: r.get(1), old: r.get(2), new: r.get(3) }).collect())
}
