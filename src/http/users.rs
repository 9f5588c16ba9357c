//! /v1/users/me* and /v1/admin/users*: translate, call `Identity`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{delete, get, patch, post};
use axum::Router;
use serde::Deserialize;
use uuid::Uuid;

use super::auth::Authenticated;
use super::extract::{Json, Meta, Path, Query};
use super::AppState;
use crate::domain::user::User;
use crate::service::users::{Page, SessionView, UserChange, UserFilter};
use crate::service::ServiceError;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/users/me", get(me).patch(update_me))
        .route("/v1/users/me/password", post(change_password))
        .route("/v1/users/me/sessions", get(list_sessions))
        .route("/v1/users/me/sessions/{id}", delete(end_session))
        .route("/v1/admin/users", get(admin_list_users))
        .route("/v1/admin/users/{id}", patch(admin_update_user))
}

async fn me(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
) -> Result<axum::Json<User>, ServiceError> {
    Ok(axum::Json(state.identity.me(&caller).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateMe {
    full_name: Option<String>,
}

async fn update_me(
    State(state): State<AppState>,
    Meta(meta): Meta,
    Authenticated(caller): Authenticated,
    Json(body): Json<UpdateMe>,
) -> Result<axum::Json<User>, ServiceError> {
    Ok(axum::Json(
        state
            .identity
            .update_me(&caller, &meta, body.full_name)
            .await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChangePassword {
    current_password: String,
    new_password: String,
}

async fn change_password(
    State(state): State<AppState>,
    Meta(meta): Meta,
    Authenticated(caller): Authenticated,
    Json(body): Json<ChangePassword>,
) -> Result<StatusCode, ServiceError> {
    state
        .identity
        .change_password(&caller, &meta, body.current_password, body.new_password)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_sessions(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
) -> Result<axum::Json<Page<SessionView>>, ServiceError> {
    Ok(axum::Json(state.identity.list_sessions(&caller).await?))
}

async fn end_session(
    State(state): State<AppState>,
    Meta(meta): Meta,
    Authenticated(caller): Authenticated,
    Path(id): Path<Uuid>,
) -> Result<StatusCode, ServiceError> {
    state.identity.end_session(&caller, &meta, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminUserQuery {
    /// Substring of the email, case-insensitive.
    email: Option<String>,
    status: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
}

async fn admin_list_users(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Query(q): Query<AdminUserQuery>,
) -> Result<axum::Json<Page<User>>, ServiceError> {
    Ok(axum::Json(
        state
            .identity
            .admin_list_users(
                &caller,
                UserFilter {
                    email: q.email,
                    status: q.status,
                    limit: q.limit,
                    cursor: q.cursor,
                },
            )
            .await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminUserPatch {
    status: Option<String>,
    roles: Option<Vec<String>>,
}

async fn admin_update_user(
    State(state): State<AppState>,
    Meta(meta): Meta,
    Authenticated(caller): Authenticated,
    Path(id): Path<Uuid>,
    Json(body): Json<AdminUserPatch>,
) -> Result<axum::Json<User>, ServiceError> {
    Ok(axum::Json(
        state
            .identity
            .admin_update_user(
                &caller,
                &meta,
                id,
                UserChange {
                    status: body.status,
                    roles: body.roles,
                },
            )
            .await?,
    ))
}
