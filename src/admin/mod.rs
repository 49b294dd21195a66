//! The admin HTTP API (actix-web): JSON in and out, bearer keys with roles.
//!
//! One file per resource; `auth` says who is calling and enforces ownership in one
//! place, `error` shapes every error as `{"error": {"code", "message", "field"}}`.
//! Malformed JSON, wrong types, unknown fields, bad UUIDs in paths and oversized
//! bodies all answer 4xx with a message naming the problem.

pub mod auth;
pub mod error;
pub mod limits;

use crate::router::Router;
use crate::store::limits::Defaults;
use crate::store::Store;
use actix::Addr;
use actix_web::{web, App, HttpResponse, HttpServer};
use error::ApiError;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// What handlers share.
pub struct AdminState {
    pub store: Store,
    pub router: Addr<Router>,
    pub limit_defaults: Defaults,
}

fn json_error(err: actix_web::error::JsonPayloadError, _req: &actix_web::HttpRequest) -> actix_web::Error {
    use actix_web::error::JsonPayloadError as E;
    let e = match &err {
        E::OverflowKnownLength { length, limit } => ApiError::new(
            actix_web::http::StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the body is {length} bytes, over the limit of {limit}"),
        ),
        E::Overflow { limit } => ApiError::new(
            actix_web::http::StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the body is over the limit of {limit} bytes"),
        ),
        E::ContentType => ApiError::new(
            actix_web::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send JSON with Content-Type: application/json",
        ),
        E::Deserialize(de) => {
            let message = de.to_string();
            let field = message
                .split('`')
                .nth(1)
                .filter(|_| message.starts_with("unknown field") || message.starts_with("missing field"));
            let mut e = ApiError::bad_request(format!("the JSON body is not valid: {message}"));
            if let Some(f) = field {
                e = e.field(f);
            }
            e
        }
        _ => ApiError::bad_request(format!("the body cannot be read: {err}")),
    };
    e.into()
}

fn path_error(err: actix_web::error::PathError, _req: &actix_web::HttpRequest) -> actix_web::Error {
    ApiError::bad_request(format!("a path parameter is not valid: {err}")).into()
}

fn query_error(err: actix_web::error::QueryPayloadError, _req: &actix_web::HttpRequest) -> actix_web::Error {
    ApiError::bad_request(format!("a query parameter is not valid: {err}")).into()
}

async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::not_found("no such endpoint"))
}

/// Registers every route (also used by tests that build the app without a listener).
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.app_data(web::JsonConfig::default().limit(MAX_BODY_BYTES).error_handler(json_error))
        .app_data(web::PathConfig::default().error_handler(path_error))
        .app_data(web::QueryConfig::default().error_handler(query_error))
        .route("/v1/chatbots/{id}/limits", web::get().to(limits::get))
        .route("/v1/chatbots/{id}/limits", web::put().to(limits::put))
        .default_service(web::to(not_found));
}

/// Serves the API on `listener` until the returned handle stops it.
pub fn start(listener: std::net::TcpListener, state: AdminState, workers: usize) -> std::io::Result<actix_web::dev::ServerHandle> {
    let state = web::Data::new(state);
    let server = HttpServer::new(move || App::new().app_data(state.clone()).configure(configure))
        .workers(workers)
        .disable_signals()
        .listen(listener)?
        .run();
    let handle = server.handle();
    actix_rt::spawn(server);
    Ok(handle)
}
