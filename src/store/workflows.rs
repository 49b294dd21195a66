//! Workflow rows: `apply` (create or replace by name), the admin API's create,
//! replace, enable/disable, delete, list and versions, and loading a chatbot's enabled
//! workflows for its supervisor. Every change is one transaction that bumps the
//! version where the definition changes, keeps every version in `workflow_versions`,
//! and sends a NOTIFY so running daemons reload.

use super::error::is_unique_violation;
use super::{Store, StoreError, StoreResult};
use crate::workflow::WorkflowSpec;
use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

/// The channel running daemons LISTEN on; the payload is the chatbot id.
pub const WORKFLOWS_CHANNEL: &str = "botflow_workflows";

/// A stored workflow as a supervisor loads it.
#[derive(Debug, Clone)]
pub struct StoredWorkflow {
    pub id: Uuid,
    pub version: i32,
    pub definition: serde_json::Value,
}

/// What `apply` did to one workflow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    Created { id: Uuid },
    Updated { id: Uuid, version: i32 },
    Unchanged { id: Uuid, version: i32 },
}

impl Applied {
    pub fn id(&self) -> Uuid {
        match self {
            Applied::Created { id } | Applied::Updated { id, .. } | Applied::Unchanged { id, .. } => *id,
        }
    }
}

/// Creates or replaces workflows of a chatbot by name, in one transaction. A
/// replaced workflow gets a new version; executions already started keep theirs.
pub async fn apply(store: &Store, chatbot_id: Uuid, specs: &[WorkflowSpec]) -> StoreResult<Vec<Applied>> {
    let mut client = store.pool().get().await?;
    let tx = client.transaction().await?;
    lock_chatbot(&tx, chatbot_id).await?;
    let mut out = Vec::with_capacity(specs.len());
    for spec in specs {
        let definition = to_definition(spec)?;
        let existing = tx
            .query_opt(
                "SELECT id, version, definition FROM workflows
                 WHERE chatbot_id = $1 AND name = $2 AND deleted_at IS NULL",
                &[&chatbot_id, &spec.name],
            )
            .await?;
        let applied = match existing {
            Some(row) => {
                let id: Uuid = row.get(0);
                let version: i32 = row.get(1);
                let old: serde_json::Value = row.get(2);
                if old == definition {
                    Applied::Unchanged { id, version }
                } else {
                    let row = write_version(&tx, chatbot_id, id, spec, &definition).await?;
                    Applied::Updated { id, version: row.version }
                }
            }
            None => Applied::Created { id: insert(&tx, chatbot_id, spec, &definition).await?.id },
        };
        out.push(applied);
    }
    if out.iter().any(|a| !matches!(a, Applied::Unchanged { .. })) {
        notify_changed(&tx, chatbot_id).await?;
    }
    tx.commit().await?;
    Ok(out)
}

/// A workflow as the admin API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct WorkflowRow {
    pub id: Uuid,
    pub chatbot_id: Uuid,
    pub name: String,
    /// Bumped by every replace; executions keep the version they started with.
    pub version: i32,
    pub enabled: bool,
    #[schema(value_type = WorkflowSpec)]
    pub definition: serde_json::Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// One saved version of a workflow.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct VersionRow {
    pub workflow_id: Uuid,
    pub version: i32,
    #[schema(value_type = WorkflowSpec)]
    pub definition: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

const ROW: &str = "id, chatbot_id, name, version, enabled, definition, created_at, updated_at";

fn from_row(r: &tokio_postgres::Row) -> WorkflowRow {
    WorkflowRow {
        id: r.get(0),
        chatbot_id: r.get(1),
        name: r.get(2),
        version: r.get(3),
        enabled: r.get(4),
        definition: r.get(5),
        created_at: r.get(6),
        updated_at: r.get(7),
    }
}

fn to_definition(spec: &WorkflowSpec) -> StoreResult<serde_json::Value> {
    serde_json::to_value(spec).map_err(|e| StoreError::Invalid(e.to_string()))
}

/// Serialises changes to one chatbot's workflows (two creates of one name cannot both
/// pass the name check), and says "not found" for a chatbot that does not exist.
async fn lock_chatbot(tx: &tokio_postgres::Transaction<'_>, chatbot_id: Uuid) -> StoreResult<()> {
    match tx.query_opt("SELECT 1 FROM chatbots WHERE id = $1 AND deleted_at IS NULL FOR UPDATE", &[&chatbot_id]).await? {
        Some(_) => Ok(()),
        None => Err(StoreError::NotFound { what: "chatbot", id: chatbot_id.to_string() }),
    }
}

fn name_taken(e: StoreError, name: &str) -> StoreError {
    if is_unique_violation(&e) {
        StoreError::Conflict(format!("this chatbot already has a workflow named {name:?}"))
    } else {
        e
    }
}

async fn insert(
    tx: &tokio_postgres::Transaction<'_>,
    chatbot_id: Uuid,
    spec: &WorkflowSpec,
    definition: &serde_json::Value,
) -> StoreResult<WorkflowRow> {
    let id = Uuid::now_v7();
    let row = tx
        .query_one(
            &format!(
                "INSERT INTO workflows (id, chatbot_id, name, version, enabled, definition)
                 VALUES ($1, $2, $3, 1, $4, $5) RETURNING {ROW}"
            ),
            &[&id, &chatbot_id, &spec.name, &spec.enabled, &definition],
        )
        .await
        .map_err(|e| name_taken(e.into(), &spec.name))?;
    tx.execute("INSERT INTO workflow_versions (workflow_id, version, definition) VALUES ($1, 1, $2)", &[&id, &definition])
        .await?;
    Ok(from_row(&row))
}

/// Makes `spec` the next version of workflow `id`.
async fn write_version(
    tx: &tokio_postgres::Transaction<'_>,
    chatbot_id: Uuid,
    id: Uuid,
    spec: &WorkflowSpec,
    definition: &serde_json::Value,
) -> StoreResult<WorkflowRow> {
    let row = tx
        .query_opt(
            &format!(
                "UPDATE workflows SET version = version + 1, name = $3, enabled = $4, definition = $5, updated_at = now()
                 WHERE id = $1 AND chatbot_id = $2 AND deleted_at IS NULL RETURNING {ROW}"
            ),
            &[&id, &chatbot_id, &spec.name, &spec.enabled, &definition],
        )
        .await
        .map_err(|e| name_taken(e.into(), &spec.name))?
        .ok_or_else(|| StoreError::NotFound { what: "workflow", id: id.to_string() })?;
    let row = from_row(&row);
    tx.execute(
        "INSERT INTO workflow_versions (workflow_id, version, definition) VALUES ($1, $2, $3)",
        &[&id, &row.version, &definition],
    )
    .await?;
    Ok(row)
}

/// Creates one workflow; a name the chatbot already uses is a conflict.
pub async fn create(store: &Store, chatbot_id: Uuid, spec: &WorkflowSpec) -> StoreResult<WorkflowRow> {
    let definition = to_definition(spec)?;
    let mut client = store.pool().get().await?;
    let tx = client.transaction().await?;
    lock_chatbot(&tx, chatbot_id).await?;
    let row = insert(&tx, chatbot_id, spec, &definition).await?;
    notify_changed(&tx, chatbot_id).await?;
    tx.commit().await?;
    Ok(row)
}

/// Replaces a workflow's definition: always a new version.
pub async fn replace(store: &Store, chatbot_id: Uuid, id: Uuid, spec: &WorkflowSpec) -> StoreResult<WorkflowRow> {
    let definition = to_definition(spec)?;
    let mut client = store.pool().get().await?;
    let tx = client.transaction().await?;
    lock_chatbot(&tx, chatbot_id).await?;
    let row = write_version(&tx, chatbot_id, id, spec, &definition).await?;
    notify_changed(&tx, chatbot_id).await?;
    tx.commit().await?;
    Ok(row)
}

/// Enables or disables a workflow. Not a new version: the definition is unchanged
/// apart from its `enabled` flag.
pub async fn set_enabled(store: &Store, chatbot_id: Uuid, id: Uuid, enabled: bool) -> StoreResult<WorkflowRow> {
    let mut client = store.pool().get().await?;
    let tx = client.transaction().await?;
    let row = tx
        .query_opt(
            &format!(
                "UPDATE workflows SET enabled = $3, definition = jsonb_set(definition, '{{enabled}}', to_jsonb($3::bool)),
                        updated_at = CASE WHEN enabled = $3 THEN updated_at ELSE now() END
                 WHERE id = $1 AND chatbot_id = $2 AND deleted_at IS NULL RETURNING {ROW}"
            ),
            &[&id, &chatbot_id, &enabled],
        )
        .await?
        .ok_or_else(|| StoreError::NotFound { what: "workflow", id: id.to_string() })?;
    notify_changed(&tx, chatbot_id).await?;
    tx.commit().await?;
    Ok(from_row(&row))
}

/// Deletes a workflow: it never matches again; executions already started finish on
/// their version, and its history stays readable.
pub async fn delete(store: &Store, chatbot_id: Uuid, id: Uuid) -> StoreResult<()> {
    let mut client = store.pool().get().await?;
    let tx = client.transaction().await?;
    let n = tx
        .execute(
            "UPDATE workflows SET deleted_at = now(), enabled = false, updated_at = now()
             WHERE id = $1 AND chatbot_id = $2 AND deleted_at IS NULL",
            &[&id, &chatbot_id],
        )
        .await?;
    if n == 0 {
        return Err(StoreError::NotFound { what: "workflow", id: id.to_string() });
    }
    notify_changed(&tx, chatbot_id).await?;
    tx.commit().await?;
    Ok(())
}

/// A workflow of this chatbot that is not deleted.
pub async fn get(store: &Store, chatbot_id: Uuid, id: Uuid) -> StoreResult<WorkflowRow> {
    let client = store.pool().get().await?;
    let row = client
        .query_opt(
            &format!("SELECT {ROW} FROM workflows WHERE id = $1 AND chatbot_id = $2 AND deleted_at IS NULL"),
            &[&id, &chatbot_id],
        )
        .await?;
    row.as_ref().map(from_row).ok_or_else(|| StoreError::NotFound { what: "workflow", id: id.to_string() })
}

/// A page of a chatbot's workflows, oldest first, after the (created_at, id) given.
pub async fn list(
    store: &Store,
    chatbot_id: Uuid,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: i64,
) -> StoreResult<Vec<WorkflowRow>> {
    let client = store.pool().get().await?;
    let (at, id) = after.unzip();
    let rows = client
        .query(
            &format!(
                "SELECT {ROW} FROM workflows
                 WHERE chatbot_id = $1 AND deleted_at IS NULL
                   AND ($2::timestamptz IS NULL OR (created_at, id) > ($2, $3))
                 ORDER BY created_at, id LIMIT $4"
            ),
            &[&chatbot_id, &at, &id, &limit],
        )
        .await?;
    Ok(rows.iter().map(from_row).collect())
}

/// A page of a workflow's versions, newest first, below the version given.
pub async fn versions(store: &Store, workflow_id: Uuid, below: Option<i32>, limit: i64) -> StoreResult<Vec<VersionRow>> {
    let client = store.pool().get().await?;
    let rows = client
        .query(
            "SELECT workflow_id, version, definition, created_at FROM workflow_versions
             WHERE workflow_id = $1 AND ($2::int4 IS NULL OR version < $2)
             ORDER BY version DESC LIMIT $3",
            &[&workflow_id, &below, &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| VersionRow { workflow_id: r.get(0), version: r.get(1), definition: r.get(2), created_at: r.get(3) })
        .collect())
}

/// Tells every daemon on this database that a chatbot's workflows changed; delivered
/// when the surrounding transaction commits.
pub async fn notify_changed(tx: &tokio_postgres::Transaction<'_>, chatbot_id: Uuid) -> StoreResult<()> {
    tx.execute("SELECT pg_notify($1, $2)", &[&WORKFLOWS_CHANNEL, &chatbot_id.to_string()]).await?;
    Ok(())
}

/// The enabled, not deleted workflows of a chatbot, oldest first (so matching order is
/// stable across reloads).
pub async fn load_enabled(store: &Store, chatbot_id: Uuid) -> StoreResult<Vec<StoredWorkflow>> {
    let client = store.pool().get().await?;
    let stmt = client
        .prepare_cached(
            "SELECT id, version, definition FROM workflows
             WHERE chatbot_id = $1 AND enabled AND deleted_at IS NULL ORDER BY created_at, id",
        )
        .await?;
    let rows = client.query(&stmt, &[&chatbot_id]).await?;
    Ok(rows
        .into_iter()
        .map(|r| StoredWorkflow { id: r.get(0), version: r.get(1), definition: r.get(2) })
        .collect())
}
