//! API errors: `{"error": {"code", "message", "field"}}` with the fitting status.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;
use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
}

/// Every error the API answers.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody<'a> {
    pub error: ErrorDetail<'a>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorDetail<'a> {
    /// bad_request, unauthenticated, forbidden, not_found, conflict, too_large,
    /// unsupported_media_type, invalid, unavailable or internal.
    pub code: &'a str,
    /// What went wrong, for a person.
    pub message: &'a str,
    /// The request field at fault, when one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<&'a str>,
}

/// The error answers every endpoint may give, for the OpenAPI document.
pub struct Errors;

impl utoipa::IntoResponses for Errors {
    fn responses() -> std::collections::BTreeMap<String, utoipa::openapi::RefOr<utoipa::openapi::response::Response>> {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        [
            ("400", "Malformed request: bad JSON, wrong types, unknown fields, bad ids or cursors"),
            ("401", "Missing or unknown key"),
            ("403", "The key's role may not do this"),
            ("404", "No such resource, or it belongs to another account"),
            ("409", "Conflicts with the current state"),
            ("413", "The body is too large"),
            ("415", "The body is not JSON"),
            ("422", "Well-formed but not valid; `field` names the problem"),
            ("503", "The database is unreachable or the daemon is draining; try again"),
        ]
        .into_iter()
        .map(|(status, description)| {
            let content = ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build();
            (
                status.to_string(),
                ResponseBuilder::new().description(description).content("application/json", content).build().into(),
            )
        })
        .collect()
    }
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), field: None }
    }

    pub fn field(mut self, field: impl Into<String>) -> ApiError {
        self.field = Some(field.into());
        self
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", message).field(field)
    }

    pub fn unauthenticated(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", message)
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn too_large(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message)
    }

    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, "conflict", message)
    }

    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        HttpResponse::build(self.status).json(ErrorBody {
            error: ErrorDetail { code: self.code, message: &self.message, field: self.field.as_deref() },
        })
    }
}

/// Database failures: unavailable when worth retrying, 400 for a value the server
/// refuses (a NUL in text), otherwise an internal error
/// whose details go to the log, not to the caller.
impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> ApiError {
        use crate::store::StoreError;
        match &e {
            StoreError::NotFound { what, id } => ApiError::not_found(format!("{what} {id} not found")),
            StoreError::Invalid(m) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", m.clone()),
            StoreError::Conflict(m) => ApiError::conflict(m.clone()),
            _ if e.is_transient() => ApiError::unavailable("the database is unreachable; try again"),
            _ if crate::store::error::rejected_value(&e).is_some() => ApiError::bad_request(format!(
                "a value cannot be stored: {}",
                crate::store::error::rejected_value(&e).unwrap_or_default()
            )),
            _ => {
                tracing::error!(error = %e, "admin API database error");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error")
            }
        }
    }
}
