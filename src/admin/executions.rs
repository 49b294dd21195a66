//! Execution history: `GET /v1/chatbots/{id}/executions` (filtered pages, newest
//! first), `GET /v1/executions/{eid}` (one execution with every step attempt) and
//! `GET /v1/chatbots/{id}/analytics` (per-workflow figures over a window).

use super::auth::{Caller, OwnedChatbot};
use super::error::{ApiError, Errors};
use super::page::{self, Page, Position};
use super::AdminState;
use crate::execution::Status;
use crate::store::executions::{self, Analytics, ExecutionDetail, ExecutionSummary, Filter, Method};
use actix_web::{get, web, HttpResponse};
use chrono::{DateTime, TimeDelta, Utc};
use serde::Deserialize;
use uuid::Uuid;

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    pub workflow_id: Option<Uuid>,
    /// queued, running, retrying, waiting, succeeded, failed, dead or cancelled.
    pub status: Option<String>,
    pub conversation_id: Option<String>,
    /// Created at or after (RFC 3339).
    pub since: Option<DateTime<Utc>>,
    /// Created before (RFC 3339).
    pub until: Option<DateTime<Utc>>,
    /// Text in the error message, case-insensitive, taken literally (at most 200 characters).
    pub q: Option<String>,
    /// 1 to 500 (default 50).
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

fn filter(q: &ListQuery) -> Result<Filter, ApiError> {
    if let Some(s) = &q.status {
        if Status::parse(s).is_none() {
            let shown: String = s.chars().take(40).collect();
            return Err(ApiError::bad_request(format!(
                "status {shown:?} is not one of {}",
                Status::names().collect::<Vec<_>>().join(", ")
            ))
            .field("status"));
        }
    }
    let text = page::search_text(&q.q)?;
    if q.conversation_id.as_ref().is_some_and(|c| c.len() > 256 || c.contains('\0')) {
        return Err(ApiError::bad_request("conversation_id must be at most 256 bytes, without NUL").field("conversation_id"));
    }
    page::check_window(q.since, q.until)?;
    Ok(Filter {
        workflow_id: q.workflow_id,
        status: q.status.clone(),
        conversation_id: q.conversation_id.clone(),
        since: q.since,
        until: q.until,
        q: text,
    })
}

#[utoipa::path(
    operation_id = "list_executions",
    summary = "List executions",
    description = "The chatbot's execution history, newest first, filtered by workflow, status, conversation, time window and text.",
    tag = "executions",
    params(("id" = Uuid, Path, description = "Chatbot id"), ListQuery),
    responses((status = 200, description = "A page of executions, newest first", body = Page<ExecutionSummary>), Errors)
)]
#[get("/v1/chatbots/{id}/executions")]
pub async fn list(
    state: web::Data<AdminState>,
    bot: OwnedChatbot,
    q: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    let limit = page::limit(q.limit)?;
    let f = filter(&q)?;
    let query = format!("executions:{}:{f:?}", bot.id);
    let after = q.cursor.as_deref().map(|c| page::decode(c, &query)?.time()).transpose()?;
    let rows = executions::list(&state.store, bot.id, &f, after, limit + 1).await?;
    Ok(HttpResponse::Ok().json(page::page(rows, limit, &query, |r| Position::at(r.created_at, r.id))))
}

#[utoipa::path(
    operation_id = "get_execution",
    summary = "Get an execution",
    description = "One execution with every step and attempt, their timings, request and response excerpts and errors.",
    tag = "executions",
    params(("eid" = Uuid, Path, description = "Execution id")),
    responses((status = 200, description = "The execution with every step attempt", body = ExecutionDetail), Errors)
)]
#[get("/v1/executions/{eid}")]
pub async fn get(state: web::Data<AdminState>, caller: Caller, path: web::Path<Uuid>) -> Result<HttpResponse, ApiError> {
    let eid = path.into_inner();
    caller.require_admin()?;
    let chatbot = executions::chatbot_of(&state.store, eid).await?;
    caller.owner(&state, chatbot, "execution", eid).await?;
    let detail = executions::get(&state.store, eid)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("execution {eid} not found")))?;
    Ok(HttpResponse::Ok().json(detail))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AnalyticsQuery {
    /// Start of the window (RFC 3339); 24 hours before `until` when absent.
    pub since: Option<DateTime<Utc>>,
    /// End of the window (RFC 3339, exclusive); now when absent.
    pub until: Option<DateTime<Utc>>,
    /// auto (default): exact percentiles for windows of up to 50,000 executions, the
    /// per-minute histograms above; exact or rollup to choose.
    pub method: Option<String>,
}

/// Longest window analytics answer for.
const MAX_WINDOW_DAYS: i64 = 400;

#[utoipa::path(
    operation_id = "chatbot_analytics",
    summary = "Workflow analytics",
    description = "Executions, success rate and duration percentiles per workflow over a time window, exact or from the per-minute rollups.",
    tag = "executions",
    params(("id" = Uuid, Path, description = "Chatbot id"), AnalyticsQuery),
    responses((status = 200, description = "Per-workflow figures for executions created in the window", body = Analytics), Errors)
)]
#[get("/v1/chatbots/{id}/analytics")]
pub async fn analytics(
    state: web::Data<AdminState>,
    bot: OwnedChatbot,
    q: web::Query<AnalyticsQuery>,
) -> Result<HttpResponse, ApiError> {
    // The bounds given are checked before any arithmetic on them.
    page::check_window(q.since, q.until)?;
    let until = q.until.unwrap_or_else(Utc::now);
    let since = q.since.unwrap_or(until - TimeDelta::hours(24));
    page::check_window(Some(since), Some(until))?;
    if until - since > TimeDelta::days(MAX_WINDOW_DAYS) {
        return Err(ApiError::bad_request(format!("the window is longer than {MAX_WINDOW_DAYS} days")).field("since"));
    }
    let method = match q.method.as_deref() {
        None | Some("auto") => Method::Auto,
        Some("exact") => Method::Exact,
        Some("rollup") => Method::Rollup,
        Some(other) => {
            let shown: String = other.chars().take(40).collect();
            return Err(ApiError::bad_request(format!("method {shown:?} is not auto, exact or rollup")).field("method"));
        }
    };
    Ok(HttpResponse::Ok().json(executions::analytics(&state.store, bot.id, since, until, method).await?))
}
