//! `/v1/chatbots`: create (in the caller's account; operators may name another),
//! list (the caller's account; operators: all, or one account) and read one.

use super::body::Object;
use super::auth::{Caller, OwnedChatbot};
use super::error::{ApiError, Errors};
use super::page::{self, AccountQuery, Page, Position};
use super::AdminState;
use crate::store::accounts::{self, ChatbotRow};
use actix_web::{get, post, web, HttpResponse};
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
