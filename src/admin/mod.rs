//! The admin HTTP API (actix-web): JSON in and out, bearer keys with roles.
//!
//! One file per resource; `auth` says who is calling and enforces ownership in one
//! place, `error` shapes every error as `{"error": {"code", "message", "field"}}`,
//! `page` is the one pagination scheme. Routes are registered through
//! utoipa-actix-web from the same attributes that document them, so
//! `/v1/openapi.json` cannot drift from what is served. Malformed JSON, wrong types,
//! unknown fields, bad UUIDs in paths or queries and oversized bodies all answer 4xx
//! with a message naming the problem.

pub mod audit;
pub mod auth;
pub mod body;
pub mod chatbots;
pub mod dead_letters;
pub mod error;
pub mod events;
pub mod executions;
pub mod health;
pub mod keys;
pub mod limits;
pub mod retention;
pub mod page;
pub mod workflows;

use crate::router::Router;
use crate::chatbot::limits::Defaults;
use crate::store::Store;
use actix::Addr;
use actix_web::{web, App, HttpResponse, HttpServer};
use error::ApiError;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi;
use utoipa_actix_web::AppExt;

/// Largest request body accepted (HTTP ingest has its own, larger limit).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// What handlers share.
pub struct AdminState {
    pub store: Store,
    pub router: Addr<Router>,
    pub limit_defaults: Defaults,
    /// Cancelled when the daemon starts draining: `/readyz` fails, ingest refuses.
    pub shutdown: CancellationToken,
    /// Ingest requests in flight count as open connections for the shutdown drain.
    pub connections: Arc<AtomicUsize>,
    pub max_frame_bytes: usize,
    /// Workflows whose webhook URL is a literal refused address are refused at save.
    pub egress: crate::egress::Egress,
    /// `[retention]`: what a chatbot without its own keeps, and what its owner may lower.
    pub retention_defaults: crate::store::retention::RetentionDays,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "botflow admin API",
        version = "1",
        description = "Manage chatbots and their workflows, read execution history and analytics, \
                       handle dead letters, tune rate limits and data retention, and send events over HTTP. Every \
                       request carries `Authorization: Bearer <key>`; a key reaches its own \
                       account's chatbots (operators: every account), anything else is 404."
    ),
    // Enums used only in query parameters are referenced, so listed here.
    components(schemas(error::ErrorBody, error::ErrorDetail, crate::store::dead_letters::State, crate::store::deletion::History)),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("bfk_…").build()),
        );
    }
}

fn json_error(err: actix_web::error::JsonPayloadError, _req: &actix_web::HttpRequest) -> actix_web::Error {
    use actix_web::error::JsonPayloadError as E;
    let e = match &err {
        E::OverflowKnownLength { length, limit } => {
            ApiError::too_large(format!("the body is {length} bytes, over the limit of {limit}"))
        }
        E::Overflow { limit } => ApiError::too_large(format!("the body is over the limit of {limit} bytes")),
        E::ContentType => ApiError::new(
            actix_web::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send JSON with Content-Type: application/json",
        ),
        E::Deserialize(de) => body::invalid_body(&de.to_string()),
        _ => ApiError::bad_request(format!("the body cannot be read: {err}")),
    };
    e.into()
}

fn path_error(err: actix_web::error::PathError, _req: &actix_web::HttpRequest) -> actix_web::Error {
    ApiError::bad_request(format!("a path parameter is not valid: {err}")).into()
}

fn query_error(err: actix_web::error::QueryPayloadError, _req: &actix_web::HttpRequest) -> actix_web::Error {
    let message = err.to_string();
    let field = message.split('`').nth(1).filter(|_| message.contains("field")).map(str::to_string);
    let mut e = ApiError::bad_request(format!("a query parameter is not valid: {message}"));
    if let Some(f) = field {
        e = e.field(f);
    }
    e.into()
}

async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::not_found("no such endpoint"))
}

/// The routes, documented. Used for serving and for building the document.
fn routes<T>(app: utoipa_actix_web::UtoipaApp<T>) -> utoipa_actix_web::UtoipaApp<T>
where
    T: actix_web::dev::ServiceFactory<actix_web::dev::ServiceRequest, Config = (), Error = actix_web::Error, InitError = ()>,
{
    app.openapi(ApiDoc::openapi())
        .app_data(web::JsonConfig::default().limit(MAX_BODY_BYTES).error_handler(json_error))
        .app_data(web::PathConfig::default().error_handler(path_error))
        .app_data(web::QueryConfig::default().error_handler(query_error))
        .service(health::livez)
        .service(health::readyz)
        .service(chatbots::create)
        .service(chatbots::list)
        .service(chatbots::get)
        .service(chatbots::rotate_secret)
        .service(chatbots::delete)
        .service(workflows::dry_run)
        .service(workflows::apply)
        .service(workflows::list)
        .service(workflows::create)
        .service(workflows::get)
        .service(workflows::replace)
        .service(workflows::patch)
        .service(workflows::delete)
        .service(workflows::versions)
        .service(workflows::copy)
        .service(executions::list)
        .service(executions::get)
        .service(executions::analytics)
        .service(dead_letters::list_all)
        .service(dead_letters::bulk_replay)
        .service(dead_letters::bulk_discard)
        .service(dead_letters::list)
        .service(dead_letters::get)
        .service(dead_letters::replay)
        .service(dead_letters::discard)
        .service(limits::get)
        .service(limits::put)
        .service(retention::get)
        .service(retention::put)
        .service(events::ingest)
        .service(keys::list)
        .service(keys::revoke)
        .service(keys::rotate)
        .service(audit::list)
}

/// The OpenAPI document of every route, generated from the handlers' attributes.
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes(App::new().into_utoipa_app()).split_for_parts().1
}

async fn openapi_json(doc: web::Data<OpenApiJson>) -> HttpResponse {
    HttpResponse::Ok().content_type("application/json").body(doc.0.clone())
}

struct OpenApiJson(String);

/// Serves the API on `listener` until the returned handle stops it.
pub fn start(listener: std::net::TcpListener, state: AdminState, workers: usize) -> std::io::Result<actix_web::dev::ServerHandle> {
    let state = web::Data::new(state);
    let doc = web::Data::new(OpenApiJson(openapi().to_json().map_err(std::io::Error::other)?));
    let server = HttpServer::new(move || {
        let (app, _) = routes(App::new().app_data(state.clone()).app_data(doc.clone()).into_utoipa_app()).split_for_parts();
        app.route("/v1/openapi.json", web::get().to(openapi_json)).default_service(web::to(not_found))
    })
    .workers(workers)
    .disable_signals()
    .listen(listener)?
    .run();
    let handle = server.handle();
    actix_rt::spawn(server);
    Ok(handle)
}

#[cfg(test)]
mod tests {
    /// Every operation has a summary and a description (what generated clients and API
    /// browsers show), and an operation id of its own (the specification requires them
    /// unique; client generators name methods after them).
    #[test]
    fn every_operation_is_summarised_described_and_uniquely_named() {
        let doc = serde_json::to_value(super::openapi()).unwrap();
        let mut ids = std::collections::HashSet::new();
        let mut problems = Vec::new();
        for (path, ops) in doc["paths"].as_object().unwrap() {
            for (method, op) in ops.as_object().unwrap() {
                let at = format!("{} {path}", method.to_uppercase());
                for field in ["summary", "description", "operationId"] {
                    if op[field].as_str().is_none_or(str::is_empty) {
                        problems.push(format!("{at}: no {field}"));
                    }
                }
                if let Some(id) = op["operationId"].as_str() {
                    if !ids.insert(id.to_string()) {
                        problems.push(format!("{at}: operationId {id} is used twice"));
                    }
                }
            }
        }
        assert!(ids.len() >= 28, "{ids:?}");
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }
}
