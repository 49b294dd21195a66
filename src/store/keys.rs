//! The lifecycle of API keys: list, revoke, rotate. A revoked key is refused at once;
//! a rotated key keeps working until the end of its grace period (`expires_at`), then
//! is refused as a revoked one. Every revocation and rotation is audited and announced
//! with NOTIFY (`botflow_keys`, the key id), so every daemon closes the socket
//! connections the key opened.

use super::accounts::{insert_key, Principal, Role};
use super::audit::{self, Action};
use super::{Store, StoreError, StoreResult};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;
use std::time::Duration;
use uuid::Uuid;

/// The channel key revocations and rotations are announced on; the payload is the key id.
pub const KEYS_CHANNEL: &str = "botflow_keys";

/// Longest grace period a rotation may give the old key.
pub const MAX_GRACE: Duration = Duration::from_secs(30 * 24 * 3600);

/// A key as the admin API shows it: never the key itself, nor its hash.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct KeyRow {
    pub id: Uuid,
    /// The public part of the key (`bfk_<prefix>_…`), to tell keys apart.
    pub prefix: String,
    pub account_id: Uuid,
    /// `ingest`, `admin` or `operator`.
    pub role: String,
    pub created_at: DateTime<Utc>,
    /// Refreshed at most once a minute per daemon; `null`: never used since this was recorded.
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// Set by a rotation: the key is refused from then on.
    pub expires_at: Option<DateTime<Utc>>,
    /// The key a rotation made in this one's place.
    pub replaced_by: Option<Uuid>,
    /// `active`, `expiring` (rotated, in its grace period), `expired` or `revoked`.
    pub state: String,
}

const KEY_ROW: &str = "id, prefix, account_id, role, created_at, last_used_at, revoked_at, expires_at, replaced_by,
    CASE WHEN revoked_at IS NOT NULL THEN 'revoked'
         WHEN expires_at IS NOT NULL AND expires_at <= now() THEN 'expired'
         WHEN expires_at IS NOT NULL THEN 'expiring'
         ELSE 'active' END";

fn to_key_row(r: &tokio_postgres::Row) -> KeyRow {
    KeyRow {
        id: r.get(0),
        prefix: r.get(1),
        account_id: r.get(2),
        role: r.get(3),
        created_at: r.get(4),
        last_used_at: r.get(5),
        revoked_at: r.get(6),
        expires_at: r.get(7),
        replaced_by: r.get(8),
        state: r.get(9),
    }
}

pub async fn key_row(store: &Store, id: Uuid) -> StoreResult<Option<KeyRow>> {
    let client = store.pool().get().await?;
    let row = client.query_opt(&format!("SELECT {KEY_ROW} FROM api_keys WHERE id = $1"), &[&id]).await?;
    Ok(row.as_ref().map(to_key_row))
}

/// A page of keys (of one account, or all), oldest first, after `(created_at, id)`.
pub async fn list(
    store: &Store,
    account: Option<Uuid>,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> StoreResult<Vec<KeyRow>> {
    let client = store.pool().get().await?;
    let (at, id) = after.unzip();
    let rows = client
        .query(
            &format!(
                "SELECT {KEY_ROW} FROM api_keys
                 WHERE ($1::uuid IS NULL OR account_id = $1)
                   AND ($2::timestamptz IS NULL OR (created_at, id) > ($2, $3))
                 ORDER BY created_at, id LIMIT $4"
            ),
            &[&account, &at, &id, &limit],
        )
        .await?;
    Ok(rows.iter().map(to_key_row).collect())
}

/// Revokes a key now. Revoking a revoked key changes nothing (and records nothing).
pub async fn revoke(store: &Store, id: Uuid, actor: Option<&Principal>) -> StoreResult<KeyRow> {
    let mut client = store.pool().get().await?;
    let tx = client.transaction().await?;
    let row = tx
        .query_opt("UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL RETURNING account_id", &[&id])
        .await?;
    if let Some(row) = row {
        let action = Action {
            account_id: row.get(0),
            actor,
            action: "key.revoke",
            target_type: "key",
            target_id: id,
            details: json!({}),
        };
        audit::record(&tx, action).await?;
        tx.execute("SELECT pg_notify($1, $2)", &[&KEYS_CHANNEL, &id.to_string()]).await?;
    }
    tx.commit().await?;
    drop(client);
    key_row(store, id).await?.ok_or_else(|| StoreError::NotFound { what: "key", id: id.to_string() })
}

/// What a rotation made: the new key in clear (shown only now), and both rows.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Rotated {
    /// The new key, shown only this once.
    pub key: String,
    pub new: KeyRow,
    /// The old key, refused from its `expires_at` on.
    pub old: KeyRow,
}

/// Makes a new key of the same account and role, and lets the old one work for `grace`
/// more. A key that is revoked, expired or already rotated cannot be rotated (409).
pub async fn rotate(store: &Store, id: Uuid, grace: Duration, actor: Option<&Principal>) -> StoreResult<Rotated> {
    let mut client = store.pool().get().await?;
    let tx = client.transaction().await?;
    let row = tx
        .query_opt(
            "SELECT account_id, role, revoked_at IS NOT NULL, expires_at IS NOT NULL FROM api_keys WHERE id = $1 FOR UPDATE",
            &[&id],
        )
        .await?
        .ok_or_else(|| StoreError::NotFound { what: "key", id: id.to_string() })?;
    let (account_id, role): (Uuid, String) = (row.get(0), row.get(1));
    if row.get::<_, bool>(2) {
        return Err(StoreError::Conflict(format!("key {id} is revoked; create a new key instead")));
    }
    if row.get::<_, bool>(3) {
        return Err(StoreError::Conflict(format!("key {id} was already rotated (or expires); rotate its replacement instead")));
    }
    let role: Role = role.parse().map_err(StoreError::Invalid)?;
    let (new_id, key) = insert_key(&tx, account_id, role).await?;
    let grace_ms = grace.as_millis().min(MAX_GRACE.as_millis()) as f64;
    tx.execute(
        "UPDATE api_keys SET expires_at = now() + $2::float8 * interval '1 millisecond', replaced_by = $3 WHERE id = $1",
        &[&id, &grace_ms, &new_id],
    )
    .await?;
    let action = Action {
        account_id,
        actor,
        action: "key.rotate",
        target_type: "key",
        target_id: id,
        details: json!({"new_key_id": new_id, "grace_seconds": grace.as_secs_f64()}),
    };
    audit::record(&tx, action).await?;
    tx.execute("SELECT pg_notify($1, $2)", &[&KEYS_CHANNEL, &id.to_string()]).await?;
    tx.commit().await?;
    drop(client);
    let missing = || StoreError::NotFound { what: "key", id: id.to_string() };
    Ok(Rotated { key, new: key_row(store, new_id).await?.ok_or_else(missing)?, old: key_row(store, id).await?.ok_or_else(missing)? })
}

/// Whether a key still opens anything, as the database sees it now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Standing {
    Valid,
    /// Valid for this long more (a rotated key in its grace period).
    ExpiresIn(Duration),
    Revoked,
    Expired,
    /// No such key.
    Gone,
}

pub async fn standing(store: &Store, id: Uuid) -> StoreResult<Standing> {
    let client = store.pool().get().await?;
    let row = client
        .query_opt(
            "SELECT revoked_at IS NOT NULL, EXTRACT(EPOCH FROM (expires_at - now()))::float8 FROM api_keys WHERE id = $1",
            &[&id],
        )
        .await?;
    Ok(match row {
        None => Standing::Gone,
        Some(r) if r.get::<_, bool>(0) => Standing::Revoked,
        Some(r) => match r.get::<_, Option<f64>>(1) {
            None => Standing::Valid,
            Some(s) if s <= 0.0 => Standing::Expired,
            Some(s) => Standing::ExpiresIn(Duration::from_secs_f64(s)),
        },
    })
}
