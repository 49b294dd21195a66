//! Who is calling, and what they may reach. Every handler takes a `Caller`, or an
//! `OwnedChatbot` for the chatbot its path names; every chatbot-scoped resource goes
//! through `Caller::chatbot`, which is the one place ownership is enforced: another
//! account's chatbot answers 404, as if it did not exist.

use super::error::ApiError;
use super::AdminState;
use crate::store::accounts::{self, ChatbotRecord, Principal, Role};
use actix_web::{web, FromRequest, HttpRequest};
use serde::Deserialize;
use std::future::Future;
use std::pin::Pin;
use uuid::Uuid;

#[derive(Debug, Clone)]
pub struct Caller {
    pub principal: Principal,
}

impl Caller {
    pub fn is_operator(&self) -> bool {
        self.principal.role == Role::Operator
    }

    /// Admin or operator: may read and manage (its own account's) chatbots.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self.principal.role {
            Role::Admin | Role::Operator => Ok(()),
            Role::Ingest => Err(ApiError::forbidden("this key has the ingest role; an admin or operator key is needed")),
        }
    }

    pub fn require_operator(&self) -> Result<(), ApiError> {
        if self.is_operator() {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "this key has the {} role; only an operator key may do this",
                self.principal.role
            )))
        }
    }

    /// Whether this caller reaches chatbots of `account`.
    pub fn reaches(&self, account: Uuid) -> bool {
        self.is_operator() || self.principal.account_id == account
    }

    /// Which account a list is filtered to when `asked` is the `account_id` the caller
    /// gave: an operator's choice (`Some(None)`: every account), an admin's own account.
    /// `None` when an admin named another account: the list is empty, as if that
    /// account had nothing.
    pub fn listed_account(&self, asked: Option<Uuid>) -> Option<Option<Uuid>> {
        match asked {
            _ if self.is_operator() => Some(asked),
            Some(a) if a != self.principal.account_id => None,
            _ => Some(Some(self.principal.account_id)),
        }
    }

    /// The chatbot of a resource found by its own id (an execution, a dead letter), if
    /// this caller may reach it; otherwise the resource is "not found", named as asked.
    pub async fn owner(&self, state: &AdminState, chatbot: Option<Uuid>, what: &str, id: Uuid) -> Result<ChatbotRecord, ApiError> {
        let missing = || ApiError::not_found(format!("{what} {id} not found"));
        let chatbot = chatbot.ok_or_else(missing)?;
        self.chatbot(state, chatbot).await.map_err(|e| if e.status == 404 { missing() } else { e })
    }

    /// The chatbot, if this caller may reach it (admins: their own account's; operators:
    /// any). Anything else is "not found", with no hint that it exists.
    pub async fn chatbot(&self, state: &AdminState, id: Uuid) -> Result<ChatbotRecord, ApiError> {
        self.require_admin()?;
        match accounts::get_chatbot(&state.store, id).await? {
            Some(c) if self.reaches(c.account_id) => Ok(c),
            _ => Err(ApiError::not_found(format!("chatbot {id} not found"))),
        }
    }
}

fn bearer(req: &HttpRequest) -> Result<String, ApiError> {
    let header = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .ok_or_else(|| ApiError::unauthenticated("missing Authorization: Bearer <key> header"))?;
    let value = header.to_str().map_err(|_| ApiError::unauthenticated("the Authorization header is not text"))?;
    let key = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(|| ApiError::unauthenticated("the Authorization header must be \"Bearer <key>\""))?;
    Ok(key.trim().to_string())
}

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Caller, ApiError>>>>;

    fn from_request(req: &HttpRequest, _payload: &mut actix_web::dev::Payload) -> Self::Future {
        let key = bearer(req);
        let state = req.app_data::<web::Data<AdminState>>().cloned();
        Box::pin(async move {
            let key = key?;
            let state = state.ok_or_else(|| ApiError::unavailable("the admin API is not ready"))?;
            match accounts::authenticate(&state.store, &key).await? {
                Some(principal) => Ok(Caller { principal }),
                None => Err(ApiError::unauthenticated("the key is not valid")),
            }
        })
    }
}

/// The `{id}` segment of a chatbot-scoped path (other segments are the handler's).
#[derive(Deserialize)]
struct ChatbotIdParam {
    id: Uuid,
}

/// The chatbot a request's path names (`/v1/chatbots/{id}/…`), once the caller is
/// known to reach it: the path and ownership check every chatbot-scoped handler starts
/// with. Checked in the order a client fixes them: the key (401), the path (400), then
/// the chatbot (404 for a missing or another account's one).
pub struct OwnedChatbot {
    pub caller: Caller,
    pub chatbot: ChatbotRecord,
}

impl std::ops::Deref for OwnedChatbot {
    type Target = ChatbotRecord;
    fn deref(&self) -> &ChatbotRecord {
        &self.chatbot
    }
}

impl FromRequest for OwnedChatbot {
    type Error = actix_web::Error;
    type Future = Pin<Box<dyn Future<Output = Result<OwnedChatbot, actix_web::Error>>>>;

    fn from_request(req: &HttpRequest, payload: &mut actix_web::dev::Payload) -> Self::Future {
        let caller = Caller::from_request(req, payload);
        // Parsed through `web::Path`, so a bad id gets the app's usual path error.
        let id = web::Path::<ChatbotIdParam>::extract(req);
        let state = req.app_data::<web::Data<AdminState>>().cloned();
        Box::pin(async move {
            let caller = caller.await?;
            let id = id.await?.into_inner().id;
            let state = state.ok_or_else(|| ApiError::unavailable("the admin API is not ready"))?;
            let chatbot = caller.chatbot(&state, id).await?;
            Ok(OwnedChatbot { caller, chatbot })
        })
    }
}
