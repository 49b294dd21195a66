//! `/v1/keys`: list an account's API keys (never the keys themselves), revoke one, and
//! rotate one (a new key of the same account and role; the old one keeps working for
//! the grace period asked, then is refused).
//!
//! Who may do what: an admin key lists its own account's keys and revokes or rotates
//! its account's ingest and admin keys (its own included); an operator key does all of
//! it for every account, operator keys included. An admin may not revoke or rotate an
//! operator key, even one of its account (403): rotating hands out a new key of the
//! same role. Ingest keys manage nothing (403). Another account's key answers 404.

use super::auth::Caller;
use super::body::Object;
use super::error::{ApiError, Errors};
use super::page::{self, AccountQuery, Page, Position};
use super::AdminState;
use crate::store::accounts::Role;
use crate::store::keys::{self, KeyRow, Rotated};
use actix_web::{get, post, web, HttpResponse};
use serde::Deserialize;
use std::time::Duration;
use uuid::Uuid;

/// A rotation's grace period.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Grace {
    /// How long the old one keeps working, in seconds (0 to 2592000, 30 days; default 0).
    #[serde(default)]
    pub grace_seconds: u64,
}

impl Caller {
    /// A key this caller may see: its own account's (operators: any); anything else is
    /// "not found".
    async fn key(&self, state: &AdminState, id: Uuid) -> Result<KeyRow, ApiError> {
        self.require_admin()?;
        match keys::key_row(&state.store, id).await? {
            Some(k) if self.reaches(k.account_id) => Ok(k),
            _ => Err(ApiError::not_found(format!("key {id} not found"))),
        }
    }

    /// A key this caller may revoke or rotate.
    async fn managed_key(&self, state: &AdminState, id: Uuid) -> Result<KeyRow, ApiError> {
        let key = self.key(state, id).await?;
        if key.role == Role::Operator.as_str() && !self.is_operator() {
            return Err(ApiError::forbidden("only an operator key may revoke or rotate an operator key"));
        }
        Ok(key)
    }
}

#[utoipa::path(
    operation_id = "list_keys",
    summary = "List API keys",
    description = "The API keys of the key's account (an operator key: every account, or the one named), oldest first: \
                   prefix, role, creation, last use, revocation and expiry. Never the keys themselves.",
    tag = "keys",
    params(AccountQuery),
    responses((status = 200, description = "A page of keys, oldest first", body = Page<KeyRow>), Errors)
)]
#[get("/v1/keys")]
pub async fn list(state: web::Data<AdminState>, caller: Caller, q: web::Query<AccountQuery>) -> Result<HttpResponse, ApiError> {
    page::by_account(&caller, &q, "keys", |r: &KeyRow| Position::at(r.created_at, r.id), |account, after, limit| {
        keys::list(&state.store, account, after, limit)
    })
    .await
}

#[utoipa::path(
    operation_id = "revoke_key",
    summary = "Revoke an API key",
    description = "Revokes the key at once: HTTP requests with it answer 401 from now on, and the socket connections it \
                   opened, on every daemon, get an `unauthenticated` error line and are closed within a second. \
                   Audited. Revoking a revoked key changes nothing.",
    tag = "keys",
    params(("kid" = Uuid, Path, description = "Key id")),
    responses((status = 200, description = "The key, revoked", body = KeyRow), Errors)
)]
#[post("/v1/keys/{kid}/revoke")]
pub async fn revoke(state: web::Data<AdminState>, caller: Caller, kid: web::Path<Uuid>) -> Result<HttpResponse, ApiError> {
    let key = caller.managed_key(&state, kid.into_inner()).await?;
    let row = keys::revoke(&state.store, key.id, Some(&caller.principal)).await?;
    Ok(HttpResponse::Ok().json(row))
}

#[utoipa::path(
    operation_id = "rotate_key",
    summary = "Rotate an API key",
    description = "Creates a new key of the same account and role and answers it (shown only this once); the old key keeps \
                   working for `grace_seconds`, then is refused (its connections are closed as at a revocation). A revoked \
                   or already rotated key answers 409. Audited.",
    tag = "keys",
    params(("kid" = Uuid, Path, description = "Key id")),
    request_body = Grace,
    responses((status = 201, description = "The new key, and both keys' rows", body = Rotated), Errors)
)]
#[post("/v1/keys/{kid}/rotate")]
pub async fn rotate(
    state: web::Data<AdminState>,
    caller: Caller,
    kid: web::Path<Uuid>,
    body: Object<Grace>,
) -> Result<HttpResponse, ApiError> {
    let key = caller.managed_key(&state, kid.into_inner()).await?;
    let grace = grace(body.grace_seconds)?;
    let rotated = keys::rotate(&state.store, key.id, grace, Some(&caller.principal)).await?;
    Ok(HttpResponse::Created().json(rotated))
}

/// A grace period asked for in seconds, within 30 days.
pub fn grace(seconds: u64) -> Result<Duration, ApiError> {
    if seconds > keys::MAX_GRACE.as_secs() {
        return Err(ApiError::invalid("grace_seconds", format!("grace_seconds must be at most {}", keys::MAX_GRACE.as_secs())));
    }
    Ok(Duration::from_secs(seconds))
}
