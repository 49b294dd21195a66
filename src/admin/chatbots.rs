//! `/v1/chatbots`: create (in the caller's account; operators may name another),
//! list (the caller's account; operators: all, or one account), read one, rotate its
//! webhook signing secret and delete it (the chatbot's admins and operators).

use super::body::Object;
use super::auth::{Caller, OwnedChatbot};
use super::error::{ApiError, Errors};
use super::page::{self, AccountQuery, Page, Position};
use super::AdminState;
use crate::store::accounts::{self, ChatbotRow};
use actix_web::{delete, get, post, web, HttpResponse};
use crate::router::{ChatbotDeleted, SetSigning};
use crate::store::deletion::{self, Deleted, History};
use serde::Deserialize;
use uuid::Uuid;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewChatbot {
    /// 1 to 200 characters.
    pub name: String,
    /// The owning account: the caller's own when absent (only operators may name another).
    #[serde(default)]
    pub account_id: Option<Uuid>,
}

#[utoipa::path(
    operation_id = "create_chatbot",
    summary = "Create a chatbot",
    description = "Creates a chatbot in the key's account (an operator names the account) with a new webhook signing secret.",
    tag = "chatbots",
    request_body = NewChatbot,
    responses((status = 201, description = "Created", body = ChatbotRow), Errors)
)]
#[post("/v1/chatbots")]
pub async fn create(state: web::Data<AdminState>, caller: Caller, body: Object<NewChatbot>) -> Result<HttpResponse, ApiError> {
    caller.require_admin()?;
    let body = body.into_inner();
    let account = body.account_id.unwrap_or(caller.principal.account_id);
    if !caller.reaches(account) {
        return Err(ApiError::not_found(format!("account {account} not found")).field("account_id"));
    }
    let name = body.name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(ApiError::invalid("name", "name must be 1 to 200 characters"));
    }
    let id = accounts::create_chatbot(&state.store, account, name).await.map_err(|e| match e {
        crate::store::StoreError::NotFound { .. } => {
            ApiError::not_found(format!("account {account} not found")).field("account_id")
        }
        e => e.into(),
    })?;
    let row = accounts::chatbot_row(&state.store, id).await?.ok_or_else(|| ApiError::unavailable("try again"))?;
    Ok(HttpResponse::Created().json(row))
}

#[utoipa::path(
    operation_id = "list_chatbots",
    summary = "List chatbots",
    description = "The chatbots of the key's account (an operator key: every account), oldest first, a page at a time.",
    tag = "chatbots",
    params(AccountQuery),
    responses((status = 200, description = "A page of chatbots, oldest first", body = Page<ChatbotRow>), Errors)
)]
#[get("/v1/chatbots")]
pub async fn list(state: web::Data<AdminState>, caller: Caller, q: web::Query<AccountQuery>) -> Result<HttpResponse, ApiError> {
    page::by_account(&caller, &q, "chatbots", |r: &ChatbotRow| Position::at(r.created_at, r.id), |account, after, limit| {
        accounts::list_chatbots(&state.store, account, after, limit)
    })
    .await
}

#[utoipa::path(
    operation_id = "get_chatbot",
    summary = "Get a chatbot",
    description = "One chatbot of the key's account; another account's answers 404, as one that does not exist.",
    tag = "chatbots",
    params(("id" = Uuid, Path, description = "Chatbot id")),
    responses((status = 200, description = "The chatbot", body = ChatbotRow), Errors)
)]
#[get("/v1/chatbots/{id}")]
pub async fn get(state: web::Data<AdminState>, bot: OwnedChatbot) -> Result<HttpResponse, ApiError> {
    let row = accounts::chatbot_row(&state.store, bot.id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("chatbot {} not found", bot.id)))?;
    Ok(HttpResponse::Ok().json(row))
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct SecretRotated {
    pub chatbot_id: Uuid,
    /// The new webhook signing secret.
    pub secret: String,
    /// Until when webhooks also carry the old secret's signature (`null`: they do not).
    pub previous_secret_expires_at: Option<chrono::DateTime<chrono::Utc>>,
}

#[utoipa::path(
    operation_id = "rotate_chatbot_secret",
    summary = "Rotate a chatbot's webhook secret",
    description = "Gives the chatbot a new webhook signing secret and answers it. For `grace_seconds` webhooks carry two \
                   signatures, `X-Botflow-Signature: v1=<new>,v1=<old>`, so a receiver can switch secrets without \
                   refusing requests; after it only the new one. Audited.",
    tag = "chatbots",
    params(("id" = Uuid, Path, description = "Chatbot id")),
    request_body = super::keys::Grace,
    responses((status = 200, description = "The new secret", body = SecretRotated), Errors)
)]
#[post("/v1/chatbots/{id}/rotate-secret")]
pub async fn rotate_secret(state: web::Data<AdminState>, bot: OwnedChatbot, body: Object<super::keys::Grace>) -> Result<HttpResponse, ApiError> {
    let grace = super::keys::grace(body.grace_seconds)?;
    let signing = crate::store::secrets::rotate(&state.store, bot.id, grace, Some(&bot.caller.principal)).await?;
    // In place on this daemon before answering, so the next webhook is signed with both.
    let _ = state.router.send(SetSigning(bot.id, signing.clone())).await;
    let previous_secret_expires_at = signing.previous.as_ref().map(|(_, until)| *until).filter(|until| *until > chrono::Utc::now());
    Ok(HttpResponse::Ok().json(SecretRotated { chatbot_id: bot.id, secret: signing.current, previous_secret_expires_at }))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    /// `keep`: the executions, dead letters and commands stay, pruned as the chatbot's
    /// retention says; `prune`: they are removed now, in the background, in small batches.
    pub history: Option<History>,
    /// Cancel unfinished executions (queued, running, retrying, waiting) instead of
    /// refusing with 409.
    #[serde(default)]
    pub force: bool,
}

#[utoipa::path(
    operation_id = "delete_chatbot",
    summary = "Delete a chatbot",
    description = "Deletes a chatbot: from the answer on, the API answers 404 for it and ingest `unknown_chatbot`, and \
                   every daemon on the database stops its supervisor within a second. Refused with 409 while it has \
                   unfinished executions, unless `force=true`, which cancels them. `history` (required) says whether its \
                   executions, dead letters and commands are kept (pruned as its retention says) or pruned now; the \
                   chatbot's workflows, limits and retention go once its history is gone. Audited.",
    tag = "chatbots",
    params(("id" = Uuid, Path, description = "Chatbot id"), DeleteQuery),
    responses((status = 200, description = "Deleted", body = Deleted), Errors)
)]
#[delete("/v1/chatbots/{id}")]
pub async fn delete(state: web::Data<AdminState>, bot: OwnedChatbot, q: web::Query<DeleteQuery>) -> Result<HttpResponse, ApiError> {
    let history = q.history.ok_or_else(|| {
        ApiError::invalid("history", "say what becomes of the chatbot's history: history=keep or history=prune")
    })?;
    let deleted = deletion::delete_chatbot(&state.store, bot.id, history, q.force, Some(&bot.caller.principal)).await?;
    // Stopped on this daemon before answering; the others hear of it by NOTIFY.
    let _ = state.router.send(ChatbotDeleted(bot.id)).await;
    Ok(HttpResponse::Ok().json(deleted))
}
