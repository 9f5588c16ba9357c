//! /v1/users/me* and /v1/admin/users*: translate, call `Users` (own sessions:
//! `Sessions`).

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{delete, get, patch, post};
use axum::Router;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::auth::Authenticated;
use super::extract::{Json, Meta, Path, Query};
use super::list::Page;
use super::problem::Problem;
use super::AppState;
use crate::domain;
use crate::service::paging::PageQuery;
use crate::service::users::{UserChange, UserFilter};
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

// The wire types keep the names the OpenAPI document published (`User`,
// `SessionView`), so generated clients see no change. Plain comments where utoipa
// would otherwise publish a doc comment as a new schema description.

// A user as the gateway (and `admin create-user`) shows it: never the password hash.
#[derive(Serialize, utoipa::ToSchema)]
pub struct User {
    id: Uuid,
    email: String,
    full_name: String,
    roles: Vec<String>,
    /// `active` or `disabled`.
    status: String,
    // Whether the user proved they receive mail at `email` (DESIGN §8).
    email_verified: bool,
    created_at: DateTime<Utc>,
}

impl From<&domain::user::User> for User {
    fn from(u: &domain::user::User) -> Self {
        Self {
            id: u.id,
            email: u.email.clone(),
            full_name: u.full_name.clone(),
            roles: u.roles.iter().map(|r| r.as_str().to_string()).collect(),
            status: u.status.as_str().to_string(),
            email_verified: u.email_verified,
            created_at: u.created_at,
        }
    }
}

impl From<domain::user::User> for User {
    fn from(u: domain::user::User) -> Self {
        Self {
            id: u.id,
            email: u.email,
            full_name: u.full_name,
            roles: u.roles.iter().map(|r| r.as_str().to_string()).collect(),
            status: u.status.as_str().to_string(),
            email_verified: u.email_verified,
            created_at: u.created_at,
        }
    }
}

/// One of the caller's sessions.
#[derive(Serialize, utoipa::ToSchema)]
pub struct SessionView {
    id: Uuid,
    created_at: DateTime<Utc>,
    last_seen_at: DateTime<Utc>,
    ip: Option<String>,
    user_agent: Option<String>,
    /// The session this request was made with.
    current: bool,
    /// How the session was authenticated (RFC 8176 values: `pwd`, `otp`, `rc`,
    /// `hwk`, and `mfa` when two factors were used).
    amr: Vec<String>,
    /// When the user last authenticated in this session (login or step-up).
    auth_time: DateTime<Utc>,
}

impl From<crate::service::sessions::SessionView> for SessionView {
    fn from(s: crate::service::sessions::SessionView) -> Self {
        Self {
            id: s.id,
            created_at: s.created_at,
            last_seen_at: s.last_seen_at,
            ip: s.ip,
            user_agent: s.user_agent,
            current: s.current,
            amr: s.amr,
            auth_time: s.auth_time,
        }
    }
}

/// The caller's profile.
#[utoipa::path(
    get,
    path = "/v1/users/me",
    tag = "users",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, description = "The caller", body = User)),
)]
async fn me(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
) -> Result<axum::Json<User>, ServiceError> {
    let user = state.users.me(&caller).await?;
    Ok(axum::Json(User::from(&*user)))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct UpdateMe {
    full_name: Option<String>,
}

/// Profile edits: a login session, or an API key with the `profile:write` scope.
#[utoipa::path(
    patch,
    path = "/v1/users/me",
    tag = "users",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    request_body = UpdateMe,
    responses(
        (status = 200, description = "The updated user", body = User),
        (status = 403, description = "An API key without `profile:write` (`forbidden`)", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn update_me(
    State(state): State<AppState>,
    Meta(meta): Meta,
    Authenticated(caller): Authenticated,
    Json(body): Json<UpdateMe>,
) -> Result<axum::Json<User>, ServiceError> {
    let user = state
        .users
        .update_me(&caller, &meta, body.full_name)
        .await?;
    Ok(axum::Json(user.into()))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ChangePassword {
    current_password: String,
    new_password: String,
}

/// Changes the password and revokes the caller's other sessions.
#[utoipa::path(
    post,
    path = "/v1/users/me/password",
    tag = "users",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    request_body = ChangePassword,
    responses((status = 204, description = "Password changed")),
)]
async fn change_password(
    State(state): State<AppState>,
    Meta(meta): Meta,
    Authenticated(caller): Authenticated,
    Json(body): Json<ChangePassword>,
) -> Result<StatusCode, ServiceError> {
    state
        .users
        .change_password(&caller, &meta, body.current_password, body.new_password)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The caller's live sessions.
#[utoipa::path(
    get,
    path = "/v1/users/me/sessions",
    tag = "users",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, description = "Sessions, `current` marks this one", body = Page<SessionView>)),
)]
async fn list_sessions(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
) -> Result<axum::Json<Page<SessionView>>, ServiceError> {
    let page = state.sessions.list(&caller).await?;
    Ok(axum::Json(Page::new(page.items, page.next_cursor)))
}

/// Ends one of the caller's sessions.
#[utoipa::path(
    delete,
    path = "/v1/users/me/sessions/{id}",
    tag = "users",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    params(("id" = Uuid, Path, description = "Session id")),
    responses((status = 204, description = "Session ended")),
)]
async fn end_session(
    State(state): State<AppState>,
    Meta(meta): Meta,
    Authenticated(caller): Authenticated,
    Path(id): Path<Uuid>,
) -> Result<StatusCode, ServiceError> {
    state.sessions.end(&caller, &meta, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct AdminUserQuery {
    /// Substring of the email, case-insensitive.
    email: Option<String>,
    /// `active` or `disabled`.
    status: Option<String>,
    /// Page size, 1 to 200 (default 50).
    #[param(minimum = 1, maximum = 200)]
    limit: Option<i64>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// Admin only (`admin:users`): list and filter users.
#[utoipa::path(
    get,
    path = "/v1/admin/users",
    tag = "admin",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    params(AdminUserQuery),
    responses(
        (status = 200, description = "A page of users", body = Page<User>),
        (status = 403, description = "Not an admin (`forbidden`)", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn admin_list_users(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Query(q): Query<AdminUserQuery>,
) -> Result<axum::Json<Page<User>>, ServiceError> {
    let page = state
        .users
        .admin_list_users(
            &caller,
            UserFilter {
                email: q.email,
                status: q.status,
                page: PageQuery {
                    limit: q.limit,
                    cursor: q.cursor,
                },
            },
        )
        .await?;
    Ok(axum::Json(Page::new(page.items, page.next_cursor)))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct AdminUserPatch {
    /// `active` or `disabled`.
    status: Option<String>,
    roles: Option<Vec<String>>,
}

/// Admin only (`admin:users`): change a user's status and roles.
#[utoipa::path(
    patch,
    path = "/v1/admin/users/{id}",
    tag = "admin",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    params(("id" = Uuid, Path, description = "User id")),
    request_body = AdminUserPatch,
    responses(
        (status = 200, description = "The updated user", body = User),
        (status = 403, description = "Not an admin (`forbidden`)", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn admin_update_user(
    State(state): State<AppState>,
    Meta(meta): Meta,
    Authenticated(caller): Authenticated,
    Path(id): Path<Uuid>,
    Json(body): Json<AdminUserPatch>,
) -> Result<axum::Json<User>, ServiceError> {
    let user = state
        .users
        .admin_update_user(
            &caller,
            &meta,
            id,
            UserChange {
                status: body.status,
                roles: body.roles,
            },
        )
        .await?;
    Ok(axum::Json(user.into()))
}
