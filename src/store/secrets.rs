//! Rotating a chatbot's webhook secret: the new one signs from now on, the old one goes
//! on signing beside it for a grace period (`accounts::Signing`), so receivers can
//! switch without refusing requests. Audited, and announced on `botflow_secrets`.

use super::accounts::{random_hex, Principal, Signing};
use super::audit;
use super::{Store, StoreError, StoreResult};
use uuid::Uuid;

/// The channel a rotated webhook secret is announced on; the payload is the chatbot id.
pub const SECRETS_CHANNEL: &str = "botflow_secrets";

/// Gives a chatbot a new webhook secret; the old one goes on signing beside it for
/// `grace` (a secret rotated during another's grace replaces that one). Audited and
/// announced, so every daemon signs with both.
pub async fn rotate(store: &Store, id: Uuid, grace: std::time::Duration, actor: Option<&Principal>) -> StoreResult<Signing> {
    let mut client = store.pool().get().await?;
    let tx = client.transaction().await?;
    let grace_ms = grace.as_millis() as f64;
    let row = tx
        .query_opt(
            "UPDATE chatbots SET previous_webhook_secret = webhook_secret,
                 previous_secret_expires_at = now() + $2::float8 * interval '1 millisecond', webhook_secret = $3
             WHERE id = $1 AND deleted_at IS NULL RETURNING account_id, webhook_secret, previous_webhook_secret, previous_secret_expires_at",
            &[&id, &grace_ms, &random_hex(32)],
        )
        .await?
        .ok_or_else(|| StoreError::NotFound { what: "chatbot", id: id.to_string() })?;
    let signing = Signing { current: row.get(1), previous: row.get::<_, Option<String>>(2).zip(row.get(3)) };
    let action = audit::Action {
        account_id: row.get(0),
        actor,
        action: "chatbot.rotate_secret",
        target_type: "chatbot",
        target_id: id,
        details: serde_json::json!({"grace_seconds": grace.as_secs_f64()}),
    };
    audit::record(&tx, action).await?;
    tx.execute("SELECT pg_notify($1, $2)", &[&SECRETS_CHANNEL, &id.to_string()]).await?;
    tx.commit().await?;
    Ok(signing)
}

