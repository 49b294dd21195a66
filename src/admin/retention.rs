//! `GET /v1/chatbots/{id}/retention` (how long its history is kept: in force, its own
//! values, the defaults) and `PUT` (its owner may keep less than the defaults; only an
//! operator may keep more, or forever).

use super::auth::OwnedChatbot;
use super::body::Object;
use super::error::{ApiError, Errors};
use super::AdminState;
use crate::store::retention::{self, RetentionDays, RetentionOverrides};
use actix_web::{get, put, web, HttpResponse};
use serde::Serialize;
use uuid::Uuid;

#[derive(Serialize, utoipa::ToSchema)]
pub struct RetentionView {
    pub chatbot_id: Uuid,
    /// In force, in days (0: kept forever): the chatbot's own values, the defaults for the rest.
    pub retention: RetentionDays,
    pub overrides: RetentionOverrides,
    pub defaults: RetentionDays,
}

fn resolve(d: RetentionDays, o: &RetentionOverrides) -> RetentionDays {
    RetentionDays {
        executions: o.executions_days.unwrap_or(d.executions),
        dead_letters: o.dead_letters_days.unwrap_or(d.dead_letters),
        acked_commands: o.acked_commands_days.unwrap_or(d.acked_commands),
    }
}

async fn view(state: &AdminState, chatbot: Uuid) -> Result<RetentionView, ApiError> {
    let overrides = retention::get(&state.store, chatbot).await?;
    let defaults = state.retention_defaults;
    Ok(RetentionView { chatbot_id: chatbot, retention: resolve(defaults, &overrides), overrides, defaults })
}

#[utoipa::path(
    operation_id = "get_retention",
    summary = "Get data retention",
    description = "How many days the chatbot's finished executions, dead letters and acked commands are kept (0: forever): in force, its own values and the defaults.",
    tag = "retention",
    params(("id" = Uuid, Path, description = "Chatbot id")),
    responses((status = 200, description = "The retention in force, the chatbot's own values and the defaults", body = RetentionView), Errors)
)]
#[get("/v1/chatbots/{id}/retention")]
pub async fn get(state: web::Data<AdminState>, bot: OwnedChatbot) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(view(&state, bot.id).await?))
}

#[utoipa::path(
    operation_id = "put_retention",
    summary = "Set data retention",
    description = "Sets the chatbot's own retention in days (null: the default). Its owner may keep less than the defaults; keeping more, or forever (0), takes an operator key. The pruner applies it at its next pass.",
    tag = "retention",
    params(("id" = Uuid, Path, description = "Chatbot id")),
    request_body = RetentionOverrides,
    responses((status = 200, description = "Saved", body = RetentionView), Errors)
)]
#[put("/v1/chatbots/{id}/retention")]
pub async fn put(state: web::Data<AdminState>, bot: OwnedChatbot, body: Object<RetentionOverrides>) -> Result<HttpResponse, ApiError> {
    let overrides = body.into_inner();
    overrides.validate().map_err(|(field, message)| ApiError::invalid(field, format!("{field} {message}")))?;
    if !bot.caller.is_operator() {
        let d = state.retention_defaults;
        for (field, value, default) in [
            ("executions_days", overrides.executions_days, d.executions),
            ("dead_letters_days", overrides.dead_letters_days, d.dead_letters),
            ("acked_commands_days", overrides.acked_commands_days, d.acked_commands),
        ] {
            // 0 keeps forever: more than any default but "forever" itself.
            let more = default != 0 && value.is_some_and(|v| v == 0 || v > default);
            if more {
                return Err(ApiError::forbidden(format!(
                    "{field}: keeping history longer than the default ({default} days) takes an operator key"
                ))
                .field(field));
            }
        }
    }
    let by = format!("key {}", bot.caller.principal.key_id);
    retention::set(&state.store, bot.id, overrides, &by).await?;
    Ok(HttpResponse::Ok().json(view(&state, bot.id).await?))
}
