//! `/livez` (the process answers; never touches the database) and `/readyz` (the
//! database answers, its schema is the one this binary expects, and the daemon is not
//! draining). Neither needs a key, so load balancers and orchestrators can probe them.

use super::error::ApiError;
use super::AdminState;
use crate::store::migrate;
use actix_web::{get, web, HttpResponse};
use serde::Serialize;
use std::time::Duration;

#[derive(Serialize, utoipa::ToSchema)]
pub struct Health {
    /// ok, or what is wrong.
    pub status: String,
    /// The schema version of the database and the one this binary expects (`/readyz`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schema_version: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected_schema_version: Option<i32>,
}

#[utoipa::path(
    operation_id = "livez",
    summary = "Liveness",
    description = "Answers 200 while the process runs; for a supervisor's liveness probe.",
    tag = "health",
    security(()),
    responses((status = 200, description = "The process is alive", body = Health))
)]
#[get("/livez")]
pub async fn livez() -> HttpResponse {
    HttpResponse::Ok().json(Health { status: "ok".into(), schema_version: None, expected_schema_version: None })
}

/// How long `/readyz` waits for the database before saying it is not ready.
const DB_TIMEOUT: Duration = Duration::from_secs(2);

#[utoipa::path(
    operation_id = "readyz",
    summary = "Readiness",
    description = "Answers 200 once the daemon serves and its database answers, 503 while it starts, drains or the database is away.",
    tag = "health",
    security(()),
    responses(
        (status = 200, description = "Ready for traffic", body = Health),
        (status = 503, description = "Not ready: the database is unreachable, its schema is not current, or the daemon is draining", body = Health)
    )
)]
#[get("/readyz")]
pub async fn readyz(state: web::Data<AdminState>) -> Result<HttpResponse, ApiError> {
    let expected = migrate::latest_version();
    let unready = |status: String, version: Option<i32>| {
        HttpResponse::ServiceUnavailable().json(Health {
            status,
            schema_version: version,
            expected_schema_version: Some(expected),
        })
    };
    if state.shutdown.is_cancelled() {
        return Ok(unready("draining".into(), None));
    }
    let version = match tokio::time::timeout(DB_TIMEOUT, migrate::current_version(&state.store)).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => return Ok(unready(format!("database unreachable: {e}"), None)),
        Err(_) => return Ok(unready("database unreachable: no answer within 2 s".into(), None)),
    };
    if version != expected {
        return Ok(unready(format!("schema version {version}, expected {expected}"), Some(version)));
    }
    Ok(HttpResponse::Ok().json(Health { status: "ok".into(), schema_version: Some(version), expected_schema_version: Some(expected) }))
}
