//! GET /v1/admin/audit-logs: translate, call `AuditLog`.

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::auth::Authenticated;
use super::extract::{Meta, Query};
use super::list::PageBody;
use super::AppState;
use crate::service::audit_log::{AuditFilter, AuditRow};
use crate::service::paging::PageQuery;
use crate::service::ServiceError;

pub fn routes() -> Router<AppState> {
    Router::new().route("/v1/admin/audit-logs", get(list))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    action: Option<String>,
    actor_id: Option<String>,
    target_id: Option<String>,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    /// Page size, 1 to 200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    limit: Option<i64>,
    cursor: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
struct AuditItem {
    id: i64,
    occurred_at: DateTime<Utc>,
    actor_type: String,
    actor_id: Option<String>,
    action: String,
    target_type: Option<String>,
    target_id: Option<String>,
    outcome: String,
    ip: Option<String>,
    user_agent: Option<String>,
    #[schema(value_type = Object)]
    details: serde_json::Value,
}

impl From<AuditRow> for AuditItem {
    fn from(r: AuditRow) -> Self {
        Self {
            id: r.id,
            occurred_at: r.occurred_at,
            actor_type: r.actor_type,
            actor_id: r.actor_id,
            action: r.action,
            target_type: r.target_type,
            target_id: r.target_id,
            outcome: r.outcome,
            ip: r.ip,
            user_agent: r.user_agent,
            details: r.details,
        }
    }
}

/// The audit trail, newest first (administrators only).
#[utoipa::path(
    get,
    path = "/v1/admin/audit-logs",
    operation_id = "admin_list_audit_logs",
    tag = "admin",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    params(AuditQuery),
    responses(
        (status = 200, description = "Audit rows, newest first", body = PageBody<AuditItem>),
        (status = 403, description = "Not an administrator (`forbidden`)"),
    ),
)]
async fn list(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Meta(meta): Meta,
    Query(q): Query<AuditQuery>,
) -> Result<axum::Json<PageBody<AuditItem>>, ServiceError> {
    let filter = AuditFilter {
        action: q.action,
        actor_id: q.actor_id,
        target_id: q.target_id,
        since: q.since,
        until: q.until,
    };
    let page = state
        .audit_log
        .list(
            &caller,
            &meta,
            filter,
            PageQuery {
                limit: q.limit,
                cursor: q.cursor,
            },
        )
        .await?;
    Ok(axum::Json(page.into()))
}
