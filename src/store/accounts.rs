//! Accounts, API keys and chatbots: the rows that say who owns what.
//!
//! A key is `bfk_<prefix>_<secret>`. The prefix finds the row; the SHA-256 of the
//! whole key is stored and compared in constant time, so a stolen database does not
//! yield usable keys and a lookup does not leak how much of a guess was right.

use super::{Store, StoreError, StoreResult};
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::fmt;
use std::str::FromStr;
use subtle::ConstantTimeEq;
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Send events, receive commands.
    Ingest,
    /// Manage the account's chatbots and workflows, read their executions.
    Admin,
    /// Everything, across accounts.
    Operator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Ingest => "ingest",
            Role::Admin => "admin",
            Role::Operator => "operator",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "ingest" => Ok(Role::Ingest),
            "admin" => Ok(Role::Admin),
            "operator" => Ok(Role::Operator),
            other => Err(format!("unknown role {other:?} (expected ingest, admin or operator)")),
        }
    }
}

/// Who a valid key belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub key_id: Uuid,
    pub account_id: Uuid,
    pub role: Role,
}

/// Which chatbots a connection's key reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// An ingest key: its own account's chatbots.
    Account(Uuid),
    /// An operator key: every chatbot.
    All,
}

impl Scope {
    pub fn allows(&self, owner: Uuid) -> bool {
        match self {
            Scope::All => true,
            Scope::Account(a) => *a == owner,
        }
    }
}

impl Principal {
    /// The chatbots this key reaches: an operator's every chatbot, any other key its
    /// own account's.
    pub fn scope(&self) -> Scope {
        match self.role {
            Role::Operator => Scope::All,
            _ => Scope::Account(self.account_id),
        }
    }
}

/// The chatbot facts the daemon needs at run time.
#[derive(Debug, Clone)]
pub struct ChatbotRecord {
    pub id: Uuid,
    pub account_id: Uuid,
    pub name: String,
    /// Shared by every holder of the record (the router, the supervisor, its
    /// executors), so a rotated secret reaches the next webhook without a restart.
    pub signing: std::sync::Arc<std::sync::RwLock<Signing>>,
}

/// The secrets that sign a chatbot's webhooks: the current one, and during the grace
/// period of a rotation the previous one too.
#[derive(Debug, Clone, PartialEq)]
pub struct Signing {
    pub current: String,
    pub previous: Option<(String, chrono::DateTime<chrono::Utc>)>,
}

impl Signing {
    /// The secrets that sign now: the current one first.
    pub fn secrets(&self, now: chrono::DateTime<chrono::Utc>) -> Vec<String> {
        let previous = self.previous.iter().filter(|(_, until)| *until > now).map(|(s, _)| s.clone());
        std::iter::once(self.current.clone()).chain(previous).collect()
    }
}

impl ChatbotRecord {
    pub fn signing(&self) -> Signing {
        self.signing.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts rotated secrets in place for every holder of this record.
    pub fn set_signing(&self, signing: Signing) {
        *self.signing.write().unwrap_or_else(|p| p.into_inner()) = signing;
    }
}

pub(super) fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

fn hash_key(key: &str) -> Vec<u8> {
    Sha256::digest(key.as_bytes()).to_vec()
}

/// A new key of `account_id` with `role`, inserted through `db` (a client or a
/// transaction); returns its id and the key in clear.
pub(super) async fn insert_key(db: &impl deadpool_postgres::GenericClient, account_id: Uuid, role: Role) -> StoreResult<(Uuid, String)> {
    let prefix = random_hex(6);
    let key = format!("bfk_{prefix}_{}", random_hex(24));
    let id = Uuid::now_v7();
    db.execute(
        "INSERT INTO api_keys (id, account_id, prefix, key_hash, role) VALUES ($1, $2, $3, $4, $5)",
        &[&id, &account_id, &prefix, &hash_key(&key), &role.as_str()],
    )
    .await?;
    Ok((id, key))
}

/// Splits `bfk_<prefix>_<secret>`; anything else is not a key.
fn key_prefix(key: &str) -> Option<&str> {
    let rest = key.strip_prefix("bfk_")?;
    let (prefix, secret) = rest.split_once('_')?;
    (prefix.len() == 12 && secret.len() == 48 && prefix.bytes().all(|b| b.is_ascii_hexdigit())).then_some(prefix)
}

pub async fn create_account(store: &Store, name: &str) -> StoreResult<Uuid> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(StoreError::Invalid("account name must be 1 to 200 characters".into()));
    }
    let id = Uuid::now_v7();
    let client = store.pool().get().await?;
    client.execute("INSERT INTO accounts (id, name) VALUES ($1, $2)", &[&id, &name]).await?;
    Ok(id)
}

pub async fn account_exists(store: &Store, id: Uuid) -> StoreResult<bool> {
    let client = store.pool().get().await?;
    Ok(client.query_opt("SELECT 1 FROM accounts WHERE id = $1", &[&id]).await?.is_some())
}

/// Creates a key and returns it in clear, the only time it is ever available.
pub async fn create_key(store: &Store, account_id: Uuid, role: Role) -> StoreResult<String> {
    if !account_exists(store, account_id).await? {
        return Err(StoreError::NotFound { what: "account", id: account_id.to_string() });
    }
    let client = store.pool().get().await?;
    Ok(insert_key(&client, account_id, role).await?.1)
}

/// The principal of a key, or `None` for a key that is malformed, unknown, revoked or
/// past the grace period of a rotation. Notes the key's last use (see `note_use`).
pub async fn authenticate(store: &Store, key: &str) -> StoreResult<Option<Principal>> {
    let Some(prefix) = key_prefix(key) else { return Ok(None) };
    let client = store.pool().get().await?;
    let row = client
        .query_opt(
            "SELECT id, account_id, key_hash, role FROM api_keys
             WHERE prefix = $1 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())",
            &[&prefix],
        )
        .await?;
    let Some(row) = row else { return Ok(None) };
    let stored: Vec<u8> = row.get(2);
    if !bool::from(stored.ct_eq(&hash_key(key))) {
        return Ok(None);
    }
    let role: String = row.get(3);
    let role = role.parse().map_err(StoreError::Invalid)?;
    let principal = Principal { key_id: row.get(0), account_id: row.get(1), role };
    note_use(&client, principal.key_id).await;
    Ok(Some(principal))
}

/// How often one daemon writes a key's `last_used_at`: HTTP ingest authenticates every
/// request, and a write per request would cost more than the request.
const LAST_USED_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Writes `last_used_at` if this process has not done so for the key in the last
/// minute. A failure is not the caller's: the key was valid.
async fn note_use(client: &tokio_postgres::Client, key_id: Uuid) {
    static NOTED: std::sync::Mutex<Option<std::collections::HashMap<Uuid, std::time::Instant>>> = std::sync::Mutex::new(None);
    let now = std::time::Instant::now();
    {
        let mut noted = NOTED.lock().unwrap_or_else(|p| p.into_inner());
        let map = noted.get_or_insert_with(Default::default);
        if map.get(&key_id).is_some_and(|at| now.duration_since(*at) < LAST_USED_EVERY) {
            return;
        }
        if map.len() > 100_000 {
            map.retain(|_, at| now.duration_since(*at) < LAST_USED_EVERY);
        }
        map.insert(key_id, now);
    }
    if let Err(error) = client.execute("UPDATE api_keys SET last_used_at = now() WHERE id = $1", &[&key_id]).await {
        tracing::debug!(%error, "cannot note a key's last use");
    }
}

pub async fn create_chatbot(store: &Store, account_id: Uuid, name: &str) -> StoreResult<Uuid> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(StoreError::Invalid("chatbot name must be 1 to 200 characters".into()));
    }
    if !account_exists(store, account_id).await? {
        return Err(StoreError::NotFound { what: "account", id: account_id.to_string() });
    }
    let id = Uuid::now_v7();
    let client = store.pool().get().await?;
    client
        .execute(
            "INSERT INTO chatbots (id, account_id, name, webhook_secret) VALUES ($1, $2, $3, $4)",
            &[&id, &account_id, &name, &random_hex(32)],
        )
        .await?;
    Ok(id)
}

/// A chatbot that is not deleted.
pub async fn get_chatbot(store: &Store, id: Uuid) -> StoreResult<Option<ChatbotRecord>> {
    let client = store.pool().get().await?;
    let stmt = client
        .prepare_cached(
            "SELECT id, account_id, name, webhook_secret, previous_webhook_secret, previous_secret_expires_at
             FROM chatbots WHERE id = $1 AND deleted_at IS NULL",
        )
        .await?;
    Ok(client.query_opt(&stmt, &[&id]).await?.map(|r| {
        let previous = r.get::<_, Option<String>>(4).zip(r.get(5));
        ChatbotRecord {
            id: r.get(0),
            account_id: r.get(1),
            name: r.get(2),
            signing: std::sync::Arc::new(std::sync::RwLock::new(Signing { current: r.get(3), previous })),
        }
    }))
}

/// The owning account of each of `ids` that exists, in one query.
pub async fn chatbot_owners(store: &Store, ids: &[Uuid]) -> StoreResult<std::collections::HashMap<Uuid, Uuid>> {
    let client = store.pool().get().await?;
    let rows = client.query("SELECT id, account_id FROM chatbots WHERE id = ANY($1) AND deleted_at IS NULL", &[&ids]).await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// On the first start against an empty database there is no key at all, so nobody
/// could create one through the API: make an `operators` account with an operator key.
/// Returns the new key, or `None` when keys already exist. Safe against two daemons
/// starting together (the check and insert run under an advisory lock).
pub async fn bootstrap_operator_key(store: &Store) -> StoreResult<Option<String>> {
    let mut client = store.pool().get().await?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock(7306599413585950466)", &[]).await?;
    let any: bool = tx.query_one("SELECT EXISTS (SELECT 1 FROM api_keys)", &[]).await?.get(0);
    if any {
        return Ok(None);
    }
    let account_id = Uuid::now_v7();
    tx.execute("INSERT INTO accounts (id, name) VALUES ($1, 'operators')", &[&account_id]).await?;
    let (_, key) = insert_key(&tx, account_id, Role::Operator).await?;
    tx.commit().await?;
    Ok(Some(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_prefix_accepts_only_well_formed_keys() {
        let key = format!("bfk_{}_{}", "a1b2c3d4e5f6", "0".repeat(48));
        assert_eq!(key_prefix(&key), Some("a1b2c3d4e5f6"));
        assert_eq!(key_prefix("bfk_short_x"), None);
        assert_eq!(key_prefix(""), None);
        assert_eq!(key_prefix(&format!("xyz_{}_{}", "a1b2c3d4e5f6", "0".repeat(48))), None);
        assert_eq!(key_prefix(&format!("bfk_{}_{}", "zzzzzzzzzzzz", "0".repeat(48))), None);
    }

    #[test]
    fn roles_round_trip() {
        for r in [Role::Ingest, Role::Admin, Role::Operator] {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), r);
        }
        assert!("root".parse::<Role>().unwrap_err().contains("root"));
    }
}

/// A chatbot as the admin API shows it (never its webhook secret).
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct ChatbotRow {
    pub id: Uuid,
    pub account_id: Uuid,
    pub name: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// Workflows that are not deleted.
    pub workflows: i64,
}

const CHATBOT_ROW: &str = "c.id, c.account_id, c.name, c.created_at,
    (SELECT count(*) FROM workflows w WHERE w.chatbot_id = c.id AND w.deleted_at IS NULL)";

fn to_chatbot_row(r: &tokio_postgres::Row) -> ChatbotRow {
    ChatbotRow { id: r.get(0), account_id: r.get(1), name: r.get(2), created_at: r.get(3), workflows: r.get(4) }
}

pub async fn chatbot_row(store: &Store, id: Uuid) -> StoreResult<Option<ChatbotRow>> {
    let client = store.pool().get().await?;
    let row = client.query_opt(&format!("SELECT {CHATBOT_ROW} FROM chatbots c WHERE c.id = $1 AND c.deleted_at IS NULL"), &[&id]).await?;
    Ok(row.as_ref().map(to_chatbot_row))
}

/// A page of chatbots (of one account, or all), oldest first, after `(created_at, id)`.
pub async fn list_chatbots(
    store: &Store,
    account: Option<Uuid>,
    after: Option<(chrono::DateTime<chrono::Utc>, Uuid)>,
    limit: i64,
) -> StoreResult<Vec<ChatbotRow>> {
    let client = store.pool().get().await?;
    let (at, id) = after.unzip();
    let rows = client
        .query(
            &format!(
                "SELECT {CHATBOT_ROW} FROM chatbots c
                 WHERE ($1::uuid IS NULL OR c.account_id = $1) AND c.deleted_at IS NULL
                   AND ($2::timestamptz IS NULL OR (c.created_at, c.id) > ($2, $3))
                 ORDER BY c.created_at, c.id LIMIT $4"
            ),
            &[&account, &at, &id, &limit],
        )
        .await?;
    Ok(rows.iter().map(to_chatbot_row).collect())
}
