//! GET /health (database and Redis checks) and GET /health/live (no I/O).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde::Serialize;

use super::AppState;

#[derive(Serialize)]
pub struct Checks {
    pub database: &'static str,
    pub redis: &'static str,
}

#[derive(Serialize)]
pub struct Health {
    pub status: &'static str,
    pub environment: &'static str,
    pub version: &'static str,
    pub checks: Checks,
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
pub async fn health(State(state): State<AppState>) -> impl IntoResponse {
    let (db_ok, redis_ok) = tokio::join!(state.db.ping(), state.cache.ping());
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
            environment: state.settings.app_env.as_str(),
            version: env!("CARGO_PKG_VERSION"),
            checks: Checks {
                database: word(db_ok),
                redis: word(redis_ok),
            },
        }),
    )
}

pub async fn live() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}
