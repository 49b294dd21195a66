//! `GET /v1/audit`: who revoked or rotated which key, rotated which chatbot's webhook
//! secret, and when. An admin key reads its own account's
//! entries; an operator key every account's, or one account's.

use super::auth::Caller;
use super::error::{ApiError, Errors};
use super::page::{self, AccountQuery, Page, Position};
use super::AdminState;
use crate::store::audit::{self, Entry};
use actix_web::{get, web, HttpResponse};

#[utoipa::path(
    operation_id = "list_audit",
    summary = "Read the audit log",
    description = "Key revocations and rotations and webhook secret rotations of the key's account \
                   (an operator key: every account, or the one named), newest first, each with the key that acted.",
    tag = "audit",
    params(AccountQuery),
    responses((status = 200, description = "A page of entries, newest first", body = Page<Entry>), Errors)
)]
#[get("/v1/audit")]
pub async fn list(state: web::Data<AdminState>, caller: Caller, q: web::Query<AccountQuery>) -> Result<HttpResponse, ApiError> {
    page::by_account(&caller, &q, "audit", |r: &Entry| Position::at(r.at, r.id), |account, before, limit| {
        audit::list(&state.store, account, before, limit)
    })
    .await
}
