//! Workflow rows: `apply` from the CLI (create or replace by name, one version per
//! change, a NOTIFY so running daemons reload), and loading a chatbot's enabled
//! workflows for its supervisor.

use super::{Store, StoreError, StoreResult};
use crate::workflow::WorkflowSpec;
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
    // Serialises concurrent applies to one chatbot, so two of them cannot both create
    // a workflow of the same name.
    let found = tx.query_opt("SELECT 1 FROM chatbots WHERE id = $1 FOR UPDATE", &[&chatbot_id]).await?;
    if found.is_none() {
        return Err(StoreError::NotFound { what: "chatbot", id: chatbot_id.to_string() });
    }
    let mut out = Vec::with_capacity(specs.len());
    for spec in specs {
        let definition = serde_json::to_value(spec).map_err(|e| StoreError::Invalid(e.to_string()))?;
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
                    let version = version + 1;
                    tx.execute(
                        "UPDATE workflows SET version = $2, enabled = $3, definition = $4, updated_at = now() WHERE id = $1",
                        &[&id, &version, &spec.enabled, &definition],
                    )
                    .await?;
                    tx.execute(
                        "INSERT INTO workflow_versions (workflow_id, version, definition) VALUES ($1, $2, $3)",
                        &[&id, &version, &definition],
                    )
                    .await?;
                    Applied::Updated { id, version }
                }
            }
            None => {
                let id = Uuid::now_v7();
                tx.execute(
                    "INSERT INTO workflows (id, chatbot_id, name, version, enabled, definition) VALUES ($1, $2, $3, 1, $4, $5)",
                    &[&id, &chatbot_id, &spec.name, &spec.enabled, &definition],
                )
                .await?;
                tx.execute(
                    "INSERT INTO workflow_versions (workflow_id, version, definition) VALUES ($1, 1, $2)",
                    &[&id, &definition],
                )
                .await?;
                Applied::Created { id }
            }
        };
        out.push(applied);
    }
    if out.iter().any(|a| !matches!(a, Applied::Unchanged { .. })) {
        notify_changed(&tx, chatbot_id).await?;
    }
    tx.commit().await?;
    Ok(out)
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
