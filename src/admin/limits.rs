//! `GET /v1/chatbots/{id}/limits` (the limits in force, the chatbot's own values, the
//! defaults, current usage and the recent changes) and `PUT` (operators only).

use super::body::Object;
use super::auth::OwnedChatbot;
use super::error::{ApiError, Errors};
use super::AdminState;
use crate::chatbot::limits::{Limits, Usage};
use crate::router::{ApplyChatbotLimits, ChatbotUsage};
use crate::store::limits::{self, Change, Overrides};
use actix_web::{get, put, web, HttpResponse};
use serde::Serialize;
use uuid::Uuid;

#[derive(Serialize, utoipa::ToSchema)]
pub struct LimitsView {
    pub chatbot_id: Uuid,
    /// In force: the chatbot's own values, the defaults for the rest.
    pub limits: Limits,
    pub overrides: Overrides,
    pub defaults: Limits,
    /// What it uses now; `null` when its supervisor is idle (it uses nothing).
    pub usage: Option<Usage>,
    pub changes: Vec<Change>,
}

async fn view(state: &AdminState, chatbot: Uuid) -> Result<LimitsView, ApiError> {
    let overrides = limits::get(&state.store, chatbot).await?;
    let usage = state.router.send(ChatbotUsage(chatbot)).await.ok().flatten().map(|(_, u)| u);
    Ok(LimitsView {
        chatbot_id: chatbot,
        limits: state.limit_defaults.resolve(&overrides),
        overrides,
        defaults: state.limit_defaults.0,
        usage,
        changes: limits::history(&state.store, chatbot, 20).await?,
    })
}

#[utoipa::path(
    operation_id = "get_limits",
    summary = "Get rate limits",
    description = "The limits in force for the chatbot, its own overrides, current usage and the audited changes.",
    tag = "limits",
    params(("id" = Uuid, Path, description = "Chatbot id")),
    responses((status = 200, description = "The limits in force, the chatbot's own values, the defaults, usage and recent changes", body = LimitsView), Errors)
)]
#[get("/v1/chatbots/{id}/limits")]
pub async fn get(state: web::Data<AdminState>, bot: OwnedChatbot) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(view(&state, bot.id).await?))
}

#[utoipa::path(
    operation_id = "put_limits",
    summary = "Set rate limits",
    description = "Sets the chatbot's own limits (an operator key); running daemons apply them within a second.",
    tag = "limits",
    params(("id" = Uuid, Path, description = "Chatbot id")),
    request_body = Overrides,
    responses((status = 200, description = "Saved; in force on every daemon within a second", body = LimitsView), Errors)
)]
#[put("/v1/chatbots/{id}/limits")]
pub async fn put(
    state: web::Data<AdminState>,
    bot: OwnedChatbot,
    body: Object<Overrides>,
) -> Result<HttpResponse, ApiError> {
    bot.caller.require_operator()?;
    let overrides = body.into_inner();
    overrides.validate().map_err(|(field, message)| ApiError::invalid(field, format!("{field} {message}")))?;
    let by = format!("key {}", bot.caller.principal.key_id);
    limits::set(&state.store, bot.id, overrides, &by).await?;
    // Applied here before answering, so the usage shown is under the new limits (other
    // nodes apply them when the change is announced).
    let _ = state.router.send(ApplyChatbotLimits(bot.id, state.limit_defaults.resolve(&overrides))).await;
    Ok(HttpResponse::Ok().json(view(&state, bot.id).await?))
}
