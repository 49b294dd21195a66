//! Dead letters: list a chatbot's (operators: everyone's), read one, replay or
//! discard one, and replay or discard every open letter a filter matches.

use super::body::Object;
use super::auth::{Caller, OwnedChatbot};
use super::error::{ApiError, Errors};
use super::page::{self, Page, Position};
use super::AdminState;
use crate::store::dead_letters::{self, DeadLetter, Filter, State};
use actix_web::{delete, get, post, web, HttpResponse};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The filter of a list or a bulk action.
struct FilterQuery {
    workflow_id: Option<Uuid>,
    state: Option<State>,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    q: Option<String>,
}

impl FilterQuery {
    fn filter(&self, chatbot_id: Option<Uuid>) -> Result<Filter, ApiError> {
        let q = page::search_text(&self.q)?;
        page::check_window(self.since, self.until)?;
        Ok(Filter {
            chatbot_id,
            workflow_id: self.workflow_id,
            state: self.state.unwrap_or_default(),
            since: self.since,
            until: self.until,
            q,
        })
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Operators listing every account's letters: only this chatbot's.
    pub chatbot_id: Option<Uuid>,
    pub workflow_id: Option<Uuid>,
    /// open (default), replayed, discarded or all.
    pub state: Option<State>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub q: Option<String>,
    /// 1 to 500 (default 50).
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

impl ListQuery {
    fn split(&self) -> FilterQuery {
        FilterQuery {
            workflow_id: self.workflow_id,
            state: self.state,
            since: self.since,
            until: self.until,
            q: self.q.clone(),
        }
    }
}

async fn page_of(state: &AdminState, f: Filter, q: &ListQuery) -> Result<Page<DeadLetter>, ApiError> {
    let limit = page::limit(q.limit)?;
    let query = format!("dead-letters:{f:?}");
    let after = q.cursor.as_deref().map(|c| page::decode(c, &query)?.time()).transpose()?;
    let rows = dead_letters::list(&state.store, &f, after, limit + 1).await?;
    Ok(page::page(rows, limit, &query, |r| Position::at(r.created_at, r.id)))
}

#[utoipa::path(
    operation_id = "list_chatbot_dead_letters",
    summary = "List a chatbot's dead letters",
    description = "Executions that used up their attempts, newest first, filtered by state, workflow, text and time.",
    tag = "dead letters",
    params(("id" = Uuid, Path, description = "Chatbot id"), ListQuery),
    responses((status = 200, description = "A page of the chatbot's dead letters, newest first", body = Page<DeadLetter>), Errors)
)]
#[get("/v1/chatbots/{id}/dead-letters")]
pub async fn list(
    state: web::Data<AdminState>,
    bot: OwnedChatbot,
    q: web::Query<ListQuery>,
) -> Result<HttpResponse, ApiError> {
    if q.chatbot_id.is_some_and(|c| c != bot.id) {
        return Err(ApiError::bad_request("chatbot_id is for GET /v1/dead-letters").field("chatbot_id"));
    }
    let f = q.split().filter(Some(bot.id))?;
    Ok(HttpResponse::Ok().json(page_of(&state, f, &q).await?))
}

#[utoipa::path(
    operation_id = "list_dead_letters",
    summary = "List dead letters",
    description = "Dead letters of every chatbot the key reaches, newest first, with the same filters as a chatbot's list.",
    tag = "dead letters",
    params(ListQuery),
    responses((status = 200, description = "Operators: a page of every account's dead letters, newest first", body = Page<DeadLetter>), Errors)
)]
#[get("/v1/dead-letters")]
pub async fn list_all(state: web::Data<AdminState>, caller: Caller, q: web::Query<ListQuery>) -> Result<HttpResponse, ApiError> {
    caller.require_operator()?;
    let f = q.split().filter(q.chatbot_id)?;
    Ok(HttpResponse::Ok().json(page_of(&state, f, &q).await?))
}

async fn reachable(state: &AdminState, caller: &Caller, id: Uuid) -> Result<(), ApiError> {
    caller.require_admin()?;
    let chatbot = match dead_letters::get(&state.store, id).await {
        Ok(dl) => Some(dl.chatbot_id),
        Err(crate::store::StoreError::NotFound { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    caller.owner(state, chatbot, "dead letter", id).await.map(|_| ())
}

#[utoipa::path(
    operation_id = "get_dead_letter",
    summary = "Get a dead letter",
    description = "One dead letter with its execution's error and state.",
    tag = "dead letters",
    params(("id" = Uuid, Path, description = "Dead letter id")),
    responses((status = 200, description = "The dead letter with its event, last error and every attempt", body = DeadLetter), Errors)
)]
#[get("/v1/dead-letters/{id}")]
pub async fn get(state: web::Data<AdminState>, caller: Caller, path: web::Path<Uuid>) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    reachable(&state, &caller, id).await?;
    Ok(HttpResponse::Ok().json(dead_letters::get(&state.store, id).await?))
}

fn by(caller: &Caller) -> String {
    format!("key {}", caller.principal.key_id)
}

#[utoipa::path(
    operation_id = "replay_dead_letter",
    summary = "Replay a dead letter",
    description = "Runs the execution again from the step that failed, with a fresh set of attempts.",
    tag = "dead letters",
    params(("id" = Uuid, Path, description = "Dead letter id")),
    responses((status = 200, description = "Replayed: the execution runs again from the step that failed", body = DeadLetter), Errors)
)]
#[post("/v1/dead-letters/{id}/replay")]
pub async fn replay(state: web::Data<AdminState>, caller: Caller, path: web::Path<Uuid>) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    reachable(&state, &caller, id).await?;
    Ok(HttpResponse::Ok().json(dead_letters::replay(&state.store, id, &by(&caller)).await?))
}

#[utoipa::path(
    operation_id = "discard_dead_letter",
    summary = "Discard a dead letter",
    description = "Marks the dead letter discarded (who and when are recorded); nothing runs.",
    tag = "dead letters",
    params(("id" = Uuid, Path, description = "Dead letter id")),
    responses((status = 200, description = "Discarded (kept, marked with who and when)", body = DeadLetter), Errors)
)]
#[delete("/v1/dead-letters/{id}")]
pub async fn discard(state: web::Data<AdminState>, caller: Caller, path: web::Path<Uuid>) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    reachable(&state, &caller, id).await?;
    Ok(HttpResponse::Ok().json(dead_letters::discard(&state.store, id, &by(&caller)).await?))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkRequest {
    pub workflow_id: Option<Uuid>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// Text in the last error, case-insensitive, taken literally.
    pub q: Option<String>,
    /// Act on at most this many (1 to 100000, default 10000).
    pub max: Option<i64>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct BulkResult {
    /// Letters replayed or discarded.
    pub count: i64,
}

async fn bulk(state: &AdminState, bot: OwnedChatbot, body: BulkRequest, replaying: bool) -> Result<HttpResponse, ApiError> {
    let max = body.max.unwrap_or(10_000);
    if !(1..=100_000).contains(&max) {
        return Err(ApiError::bad_request("max must be 1 to 100000").field("max"));
    }
    let f = FilterQuery { workflow_id: body.workflow_id, state: None, since: body.since, until: body.until, q: body.q }
        .filter(Some(bot.id))?;
    let count = dead_letters::act_matching(&state.store, &f, replaying, &by(&bot.caller), max).await?;
    Ok(HttpResponse::Ok().json(BulkResult { count }))
}

#[utoipa::path(
    operation_id = "replay_chatbot_dead_letters",
    summary = "Replay dead letters in bulk",
    description = "Runs again every open dead letter of the chatbot that the filter matches, from the step that failed.",
    tag = "dead letters",
    params(("id" = Uuid, Path, description = "Chatbot id")),
    request_body = BulkRequest,
    responses((status = 200, description = "Every open letter matching the filter was replayed", body = BulkResult), Errors)
)]
#[post("/v1/chatbots/{id}/dead-letters/replay")]
pub async fn bulk_replay(
    state: web::Data<AdminState>,
    bot: OwnedChatbot,
    body: Object<BulkRequest>,
) -> Result<HttpResponse, ApiError> {
    bulk(&state, bot, body.into_inner(), true).await
}

#[utoipa::path(
    operation_id = "discard_chatbot_dead_letters",
    summary = "Discard dead letters in bulk",
    description = "Discards every open dead letter of the chatbot that the filter matches; each is audited.",
    tag = "dead letters",
    params(("id" = Uuid, Path, description = "Chatbot id")),
    request_body = BulkRequest,
    responses((status = 200, description = "Every open letter matching the filter was discarded", body = BulkResult), Errors)
)]
#[post("/v1/chatbots/{id}/dead-letters/discard")]
pub async fn bulk_discard(
    state: web::Data<AdminState>,
    bot: OwnedChatbot,
    body: Object<BulkRequest>,
) -> Result<HttpResponse, ApiError> {
    bulk(&state, bot, body.into_inner(), false).await
}
