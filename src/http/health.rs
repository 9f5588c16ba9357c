//! GET /health (database and Redis checks) and GET /health/live (no I/O).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde::Serialize;

use super::AppState;

#[derive(Serialize, utoipa::ToSchema)]
pub struct Checks {
    #[schema(schema_with = ok_or_error)]
    pub database: &'static str,
    #[schema(schema_with = ok_or_error)]
    pub redis: &'static str,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Health {
    #[schema(schema_with = health_status)]
    pub status: &'static str,
    #[schema(example = "development")]
    pub environment: &'static str,
    #[schema(example = "0.1.0")]
    pub version: &'static str,
    pub checks: Checks,
}

/// The liveness body; documents the `json!` that `live` answers.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct Live {
    #[schema(schema_with = ok_only)]
    status: &'static str,
}

fn string_enum(values: &[&str]) -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(values.iter().copied()))
        .build()
}

fn ok_or_error() -> utoipa::openapi::Object {
    string_enum(&["ok", "error"])
}

fn health_status() -> utoipa::openapi::Object {
    string_enum(&["ok", "degraded", "unavailable"])
}

fn ok_only() -> utoipa::openapi::Object {
    string_enum(&["ok"])
}

fn word(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "error"
    }
}

/// 200 `ok`; 200 `degraded` when only Redis is down; 503 `unavailable` when the
/// database is down (or the service is shutting down).
#[utoipa::path(
    get,
    path = "/health",
    tag = "health",
    responses(
        (status = 200, description = "Database up (`ok`, or `degraded` when only Redis is down)", body = Health),
        (status = 503, description = "Database down or shutting down (`unavailable`)", body = Health),
    )
)]
pub async fn health(State(state): State<AppState>) -> impl IntoResponse {
    let checked = state.probe.check().await;
    let (db_ok, redis_ok) = (checked.database, checked.redis);
    let draining = state.shutdown.is_triggered();
    let (code, status) = match (db_ok && !draining, redis_ok) {
        (true, true) => (StatusCode::OK, "ok"),
        (true, false) => (StatusCode::OK, "degraded"),
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
    };
    (
        code,
        Json(Health {
            status,
            environment: state.config.environment.as_str(),
            version: env!("CARGO_PKG_VERSION"),
            checks: Checks {
                database: word(db_ok),
                redis: word(redis_ok),
            },
        }),
    )
}

#[utoipa::path(
    get,
    path = "/health/live",
    tag = "health",
    responses((status = 200, description = "The process runs (no I/O)", body = Live))
)]
pub async fn live() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}
