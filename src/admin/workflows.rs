//! `/v1/chatbots/{id}/workflows`: list, create, read, replace (a new version), enable
//! or disable, delete, list versions, copy to another chatbot, and dry-run a workflow
//! against an event. Every change reaches running supervisors through the store's
//! NOTIFY; bodies are validated with the same parser as `botflow workflows apply`, so
//! errors name the field (`steps[1].url`).

use super::body::Object;
use super::auth::OwnedChatbot;
use super::error::{ApiError, Errors};
use super::page::{self, Page, Position};
use super::AdminState;
use crate::store::workflows::{self, VersionRow, WorkflowRow};
use crate::workflow::parse::parse_one;
use crate::workflow::parse_workflows;
use crate::workflow::{CompiledWorkflow, ValidationError, WorkflowSpec};
use actix_web::{delete, get, patch, post, put, web, HttpResponse};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A validation error as the API answers it: 422 naming the field.
fn invalid(e: ValidationError, prefix: &str) -> ApiError {
    let field = match (prefix.is_empty(), e.field.is_empty()) {
        (true, true) => "workflow".to_string(),
        (true, false) => e.field,
        (false, true) => prefix.to_string(),
        (false, false) => format!("{prefix}.{}", e.field),
    };
    ApiError::invalid(field.clone(), format!("{field}: {}", e.message))
}

fn parse(state: &AdminState, doc: &serde_json::Value, prefix: &str) -> Result<WorkflowSpec, ApiError> {
    if !doc.is_object() {
        return Err(ApiError::invalid(
            if prefix.is_empty() { "workflow" } else { prefix },
            "a workflow must be a JSON object",
        ));
    }
    let spec = parse_one(doc).map_err(|e| invalid(e, prefix))?;
    state.egress.policy().check_workflow(&spec).map_err(|e| invalid(e, prefix))?;
    Ok(spec)
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// 1 to 500 (default 50).
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

/// The `{wid}` of a workflow's path (its `{id}` is `OwnedChatbot`'s).
#[derive(Deserialize)]
pub struct WorkflowPath {
    wid: Uuid,
}

type Ids = web::Path<WorkflowPath>;

#[utoipa::path(
    operation_id = "list_workflows",
    summary = "List workflows",
    description = "The chatbot's workflows, oldest first, a page at a time.",
    tag = "workflows",
    params(("id" = Uuid, Path, description = "Chatbot id"), PageQuery),
    responses((status = 200, description = "A page of workflows, oldest first", body = Page<WorkflowRow>), Errors)
)]
#[get("/v1/chatbots/{id}/workflows")]
pub async fn list(
    state: web::Data<AdminState>,
    bot: OwnedChatbot,
    q: web::Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    let limit = page::limit(q.limit)?;
    let query = format!("workflows:{}", bot.id);
    let after = q.cursor.as_deref().map(|c| page::decode(c, &query)?.time()).transpose()?;
    let rows = workflows::list(&state.store, bot.id, after, limit + 1).await?;
    Ok(HttpResponse::Ok().json(page::page(rows, limit, &query, |r| Position::at(r.created_at, r.id))))
}

#[utoipa::path(
    operation_id = "create_workflow",
    summary = "Create a workflow",
    description = "Validates and saves a new workflow (version 1); errors name the field at fault.",
    tag = "workflows",
    params(("id" = Uuid, Path, description = "Chatbot id")),
    request_body = WorkflowSpec,
    responses((status = 201, description = "Created (version 1)", body = WorkflowRow), Errors)
)]
#[post("/v1/chatbots/{id}/workflows")]
pub async fn create(
    state: web::Data<AdminState>,
    bot: OwnedChatbot,
    body: web::Json<serde_json::Value>,
) -> Result<HttpResponse, ApiError> {
    let spec = parse(&state, &body, "")?;
    let row = workflows::create(&state.store, bot.id, &spec).await?;
    Ok(HttpResponse::Created().json(row))
}

#[utoipa::path(
    operation_id = "get_workflow",
    summary = "Get a workflow",
    description = "The workflow's current version.",
    tag = "workflows",
    params(("id" = Uuid, Path, description = "Chatbot id"), ("wid" = Uuid, Path, description = "Workflow id")),
    responses((status = 200, description = "The workflow's current version", body = WorkflowRow), Errors)
)]
#[get("/v1/chatbots/{id}/workflows/{wid}")]
pub async fn get(state: web::Data<AdminState>, bot: OwnedChatbot, path: Ids) -> Result<HttpResponse, ApiError> {
    let wid = path.wid;
    Ok(HttpResponse::Ok().json(workflows::get(&state.store, bot.id, wid).await?))
}

#[utoipa::path(
    operation_id = "replace_workflow",
    summary = "Replace a workflow",
    description = "Saves a new version; running executions keep the version they started with.",
    tag = "workflows",
    params(("id" = Uuid, Path, description = "Chatbot id"), ("wid" = Uuid, Path, description = "Workflow id")),
    request_body = WorkflowSpec,
    responses((status = 200, description = "Replaced: the new version", body = WorkflowRow), Errors)
)]
#[put("/v1/chatbots/{id}/workflows/{wid}")]
pub async fn replace(
    state: web::Data<AdminState>,
    bot: OwnedChatbot,
    path: Ids,
    body: web::Json<serde_json::Value>,
) -> Result<HttpResponse, ApiError> {
    let wid = path.wid;
    let spec = parse(&state, &body, "")?;
    Ok(HttpResponse::Ok().json(workflows::replace(&state.store, bot.id, wid, &spec).await?))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Patch {
    /// Enable or disable the workflow (not a new version).
    pub enabled: bool,
}

#[utoipa::path(
    operation_id = "patch_workflow",
    summary = "Enable or disable a workflow",
    description = "Turns the workflow on or off without a new version.",
    tag = "workflows",
    params(("id" = Uuid, Path, description = "Chatbot id"), ("wid" = Uuid, Path, description = "Workflow id")),
    request_body = Patch,
    responses((status = 200, description = "Updated", body = WorkflowRow), Errors)
)]
#[patch("/v1/chatbots/{id}/workflows/{wid}")]
pub async fn patch(
    state: web::Data<AdminState>,
    bot: OwnedChatbot,
    path: Ids,
    body: Object<Patch>,
) -> Result<HttpResponse, ApiError> {
    let wid = path.wid;
    Ok(HttpResponse::Ok().json(workflows::set_enabled(&state.store, bot.id, wid, body.enabled).await?))
}

#[utoipa::path(
    operation_id = "delete_workflow",
    summary = "Delete a workflow",
    description = "Deletes the workflow; its executions stay in the history.",
    tag = "workflows",
    params(("id" = Uuid, Path, description = "Chatbot id"), ("wid" = Uuid, Path, description = "Workflow id")),
    responses((status = 204, description = "Deleted; executions already started finish on their version"), Errors)
)]
#[delete("/v1/chatbots/{id}/workflows/{wid}")]
pub async fn delete(state: web::Data<AdminState>, bot: OwnedChatbot, path: Ids) -> Result<HttpResponse, ApiError> {
    let wid = path.wid;
    workflows::delete(&state.store, bot.id, wid).await?;
    Ok(HttpResponse::NoContent().finish())
}

#[utoipa::path(
    operation_id = "list_workflow_versions",
    summary = "List a workflow's versions",
    description = "Every saved version, newest first.",
    tag = "workflows",
    params(("id" = Uuid, Path, description = "Chatbot id"), ("wid" = Uuid, Path, description = "Workflow id"), PageQuery),
    responses((status = 200, description = "Every saved version, newest first", body = Page<VersionRow>), Errors)
)]
#[get("/v1/chatbots/{id}/workflows/{wid}/versions")]
pub async fn versions(
    state: web::Data<AdminState>,
    bot: OwnedChatbot,
    path: Ids,
    q: web::Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    let wid = path.wid;
    let current = workflows::get(&state.store, bot.id, wid).await?;
    let limit = page::limit(q.limit)?;
    let query = format!("versions:{wid}");
    let below = q.cursor.as_deref().map(|c| page::decode(c, &query)).transpose()?;
    let below = below.map(|p| i32::try_from(p.key).unwrap_or(i32::MAX));
    let rows = workflows::versions(&state.store, current.id, below, limit + 1).await?;
    Ok(HttpResponse::Ok().json(page::page(rows, limit, &query, |r| Position { key: r.version as i64, id: r.workflow_id })))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CopyRequest {
    /// A chatbot of the same account (operators: any account).
    pub target_chatbot_id: Uuid,
    /// The copy's name; the original's when absent.
    #[serde(default)]
    pub name: Option<String>,
}

#[utoipa::path(
    operation_id = "copy_workflow",
    summary = "Copy a workflow",
    description = "Copies the workflow to another chatbot of the same account (or the same chatbot), as version 1 there.",
    tag = "workflows",
    params(("id" = Uuid, Path, description = "Chatbot id"), ("wid" = Uuid, Path, description = "Workflow id")),
    request_body = CopyRequest,
    responses((status = 201, description = "The copy: a new workflow of the target chatbot", body = WorkflowRow), Errors)
)]
#[post("/v1/chatbots/{id}/workflows/{wid}/copy")]
pub async fn copy(
    state: web::Data<AdminState>,
    bot: OwnedChatbot,
    path: Ids,
    body: Object<CopyRequest>,
) -> Result<HttpResponse, ApiError> {
    let wid = path.wid;
    let source = workflows::get(&state.store, bot.id, wid).await?;
    let target = bot.caller.chatbot(&state, body.target_chatbot_id).await.map_err(|e| e.field("target_chatbot_id"))?;
    if !bot.caller.is_operator() && target.account_id != bot.account_id {
        return Err(ApiError::not_found(format!("chatbot {} not found", target.id)).field("target_chatbot_id"));
    }
    let mut doc = source.definition;
    if let Some(name) = &body.name {
        doc["name"] = serde_json::Value::String(name.clone());
    }
    let spec = parse(&state, &doc, "")?;
    let row = workflows::create(&state.store, target.id, &spec).await?;
    Ok(HttpResponse::Created().json(row))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Applied {
    pub id: Uuid,
    pub name: String,
    /// created, updated or unchanged.
    pub result: &'static str,
    pub version: i32,
}

#[utoipa::path(
    operation_id = "apply_workflows",
    summary = "Apply workflows by name",
    description = "Creates or replaces one workflow or a list by name, in one transaction; unchanged ones keep their version.",
    tag = "workflows",
    params(("id" = Uuid, Path, description = "Chatbot id")),
    request_body(content = Vec<WorkflowSpec>, description = "One workflow or a list"),
    responses((status = 200, description = "Each workflow created or replaced by name, in one transaction", body = Vec<Applied>), Errors)
)]
#[post("/v1/chatbots/{id}/workflows/apply")]
pub async fn apply(
    state: web::Data<AdminState>,
    bot: OwnedChatbot,
    body: web::Json<serde_json::Value>,
) -> Result<HttpResponse, ApiError> {
    let is_list = body.is_array();
    let bytes = serde_json::to_vec(&body.into_inner()).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let specs = parse_workflows(&bytes).map_err(|e| invalid(e, ""))?;
    for (i, spec) in specs.iter().enumerate() {
        // Named as `parse_workflows` names fields: `[i].` only for a list.
        let prefix = if is_list { format!("[{i}]") } else { String::new() };
        state.egress.policy().check_workflow(spec).map_err(|e| invalid(e, &prefix))?;
    }
    let applied = workflows::apply(&state.store, bot.id, &specs).await?;
    let out: Vec<Applied> = specs
        .iter()
        .zip(applied)
        .map(|(spec, a)| {
            let (result, version) = match a {
                workflows::Applied::Created { .. } => ("created", 1),
                workflows::Applied::Updated { version, .. } => ("updated", version),
                workflows::Applied::Unchanged { version, .. } => ("unchanged", version),
            };
            Applied { id: a.id(), name: spec.name.clone(), result, version }
        })
        .collect();
    Ok(HttpResponse::Ok().json(out))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DryRunRequest {
    /// The workflow to try; or give `workflow_id` to try a saved one.
    #[schema(value_type = Option<WorkflowSpec>)]
    #[serde(default)]
    pub workflow: Option<serde_json::Value>,
    #[serde(default)]
    pub workflow_id: Option<Uuid>,
    /// An event as it would arrive: at least `type`, usually `data` too.
    #[schema(value_type = Object)]
    pub event: serde_json::Value,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct DryRunResult {
    pub matches: bool,
    /// Why not: the first check that failed (event type, trigger filter or condition).
    pub reason: Option<String>,
    /// The workflow field that failed: `trigger.event`, `trigger.sentiment`, `conditions[0]`.
    pub field: Option<String>,
}

#[utoipa::path(
    operation_id = "dry_run_workflow",
    summary = "Dry-run a workflow",
    description = "Says whether a workflow (given, or saved) would match an event, and why not; runs nothing.",
    tag = "workflows",
    params(("id" = Uuid, Path, description = "Chatbot id")),
    request_body = DryRunRequest,
    responses((status = 200, description = "Whether the workflow would match the event, and why not", body = DryRunResult), Errors)
)]
#[post("/v1/chatbots/{id}/workflows/dry-run")]
pub async fn dry_run(
    state: web::Data<AdminState>,
    bot: OwnedChatbot,
    body: Object<DryRunRequest>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let spec = match (body.workflow, body.workflow_id) {
        (Some(doc), None) => parse(&state, &doc, "workflow")?,
        (None, Some(wid)) => {
            let row = workflows::get(&state.store, bot.id, wid).await.map_err(|e| ApiError::from(e).field("workflow_id"))?;
            parse(&state, &row.definition, "workflow")?
        }
        _ => return Err(ApiError::invalid("workflow", "give either workflow or workflow_id")),
    };
    let mut event = match body.event {
        serde_json::Value::Object(map) => map,
        _ => return Err(ApiError::invalid("event", "the event must be a JSON object")),
    };
    match event.get("type") {
        Some(serde_json::Value::String(_)) => {}
        _ => return Err(ApiError::invalid("event.type", "the event needs a \"type\" (a string)")),
    }
    // The document a workflow sees, as the supervisor builds it from a received line.
    event.remove("op");
    event.entry("data").or_insert_with(|| serde_json::Value::Object(Default::default()));
    let doc = serde_json::Value::Object(event);
    let compiled = CompiledWorkflow::compile(Uuid::nil(), 1, spec).map_err(|e| invalid(e, "workflow"))?;
    let reason = compiled.explain(&doc);
    let field = reason.as_deref().and_then(|r| r.split_once(':')).map(|(f, _)| f.to_string());
    Ok(HttpResponse::Ok().json(DryRunResult { matches: reason.is_none(), reason, field }))
}
