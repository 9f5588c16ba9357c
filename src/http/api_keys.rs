//! /v1/api-keys*: translate, call `ApiKeyService`. The plaintext key appears in
//! exactly one response, the 201 of create or rotate.

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::auth::Authenticated;
use super::extract::{Json, Meta, Path, Query};
use super::list::{PageBody, PageParams};
use super::AppState;
use crate::domain::api_key_grant::NewKey;
use crate::service::api_keys::{IssuedKey, KeyView, UsageItem};
use crate::service::ServiceError;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/api-keys", post(create).get(list))
        .route("/v1/api-keys/{id}", get(show).delete(revoke))
        .route("/v1/api-keys/{id}/rotate", post(rotate))
        .route("/v1/api-keys/{id}/usage", get(usage))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    name: String,
    scopes: Vec<String>,
    #[serde(default)]
    expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    allowed_ips: Option<Vec<String>>,
    #[serde(default)]
    trading_account_ids: Option<Vec<Uuid>>,
    #[serde(default)]
    rate_limit_per_minute: Option<i64>,
}

#[derive(Serialize, utoipa::ToSchema)]
struct KeyBody {
    id: Uuid,
    name: String,
    prefix: String,
    scopes: Vec<String>,
    allowed_ips: Vec<String>,
    trading_account_ids: Vec<Uuid>,
    rate_limit_per_minute: Option<i32>,
    created_at: DateTime<Utc>,
    last_used_at: Option<DateTime<Utc>>,
    expires_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
}

impl From<KeyView> for KeyBody {
    fn from(k: KeyView) -> Self {
        Self {
            id: k.id,
            name: k.name,
            prefix: k.prefix,
            scopes: k.scopes,
            allowed_ips: k.allowed_ips,
            trading_account_ids: k.trading_account_ids,
            rate_limit_per_minute: k.rate_limit_per_minute,
            created_at: k.created_at,
            last_used_at: k.last_used_at,
            expires_at: k.expires_at,
            revoked_at: k.revoked_at,
        }
    }
}

#[derive(Serialize, utoipa::ToSchema)]
struct IssuedBody {
    id: Uuid,
    name: String,
    /// The plaintext key: shown this once.
    key: String,
    prefix: String,
    scopes: Vec<String>,
    allowed_ips: Vec<String>,
    trading_account_ids: Vec<Uuid>,
    rate_limit_per_minute: Option<i32>,
    expires_at: Option<DateTime<Utc>>,
    created_at: DateTime<Utc>,
}

/// 201 with the key, never cached by anything in between.
fn issued(k: IssuedKey) -> Response {
    let v = k.view;
    let body = IssuedBody {
        id: v.id,
        name: v.name,
        key: k.secret.expose().to_string(),
        prefix: v.prefix,
        scopes: v.scopes,
        allowed_ips: v.allowed_ips,
        trading_account_ids: v.trading_account_ids,
        rate_limit_per_minute: v.rate_limit_per_minute,
        expires_at: v.expires_at,
        created_at: v.created_at,
    };
    let mut res = (StatusCode::CREATED, axum::Json(body)).into_response();
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

#[derive(Serialize, utoipa::ToSchema)]
struct UsageBody {
    /// The last of the uses this row stands for.
    used_at: DateTime<Utc>,
    ip: Option<String>,
    operation: String,
    result: String,
    /// Identical uses (same operation, result and IP) within one flush window.
    count: i32,
}

impl From<UsageItem> for UsageBody {
    fn from(u: UsageItem) -> Self {
        Self {
            used_at: u.used_at,
            ip: u.ip,
            operation: u.operation,
            result: u.result,
            count: u.count,
        }
    }
}

#[utoipa::path(
    post,
    path = "/v1/api-keys",
    tag = "api_keys",
    security(("bearer" = []), ("session_cookie" = [])),
    request_body = CreateBody,
    responses(
        (status = 201, description = "The key; `key` is shown this once", body = IssuedBody),
        (status = 400, description = "Unknown scope, bad CIDR, past expiry, unknown account (`validation_failed`)"),
        (status = 403, description = "A scope the user does not hold, or called with an API key (`forbidden`)"),
    ),
)]
async fn create(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Meta(meta): Meta,
    Json(body): Json<CreateBody>,
) -> Result<Response, ServiceError> {
    let input = NewKey {
        name: body.name,
        scopes: body.scopes,
        expires_at: body.expires_at,
        allowed_ips: body.allowed_ips.unwrap_or_default(),
        trading_account_ids: body.trading_account_ids.unwrap_or_default(),
        rate_limit_per_minute: body.rate_limit_per_minute,
    };
    Ok(issued(state.api_keys.create(&caller, &meta, input).await?))
}

#[utoipa::path(
    get,
    path = "/v1/api-keys",
    tag = "api_keys",
    security(("bearer" = []), ("session_cookie" = [])),
    params(PageParams),
    responses((status = 200, description = "The caller's keys, newest first", body = PageBody<KeyBody>)),
)]
async fn list(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Query(q): Query<PageParams>,
) -> Result<axum::Json<PageBody<KeyBody>>, ServiceError> {
    let page = state.api_keys.list(&caller, q.into()).await?;
    Ok(axum::Json(page.into()))
}

#[utoipa::path(
    get,
    path = "/v1/api-keys/{id}",
    tag = "api_keys",
    security(("bearer" = []), ("session_cookie" = [])),
    params(("id" = Uuid, Path, description = "API key id")),
    responses(
        (status = 200, description = "The key's public facts (never the key)", body = KeyBody),
        (status = 404, description = "No such key of the caller's (`not_found`)"),
    ),
)]
async fn show(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Path(id): Path<Uuid>,
) -> Result<axum::Json<KeyBody>, ServiceError> {
    Ok(axum::Json(state.api_keys.get(&caller, id).await?.into()))
}

#[utoipa::path(
    delete,
    path = "/v1/api-keys/{id}",
    tag = "api_keys",
    security(("bearer" = []), ("session_cookie" = [])),
    params(("id" = Uuid, Path, description = "API key id")),
    responses(
        (status = 204, description = "Revoked on every replica within a second"),
        (status = 404, description = "No such key of the caller's (`not_found`)"),
    ),
)]
async fn revoke(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Meta(meta): Meta,
    Path(id): Path<Uuid>,
) -> Result<StatusCode, ServiceError> {
    state.api_keys.revoke(&caller, &meta, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    post,
    path = "/v1/api-keys/{id}/rotate",
    tag = "api_keys",
    security(("bearer" = []), ("session_cookie" = [])),
    params(("id" = Uuid, Path, description = "API key id")),
    responses(
        (status = 201, description = "A new key (new id) with the same grants; the old one is revoked", body = IssuedBody),
        (status = 404, description = "No such key of the caller's (`not_found`)"),
        (status = 409, description = "The key is revoked or expired (`conflict`)"),
    ),
)]
async fn rotate(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Meta(meta): Meta,
    Path(id): Path<Uuid>,
) -> Result<Response, ServiceError> {
    Ok(issued(state.api_keys.rotate(&caller, &meta, id).await?))
}

#[utoipa::path(
    get,
    path = "/v1/api-keys/{id}/usage",
    tag = "api_keys",
    security(("bearer" = []), ("session_cookie" = [])),
    params(("id" = Uuid, Path, description = "API key id"), PageParams),
    responses(
        (status = 200, description = "Usage log, newest first", body = PageBody<UsageBody>),
        (status = 404, description = "No such key of the caller's (`not_found`)"),
    ),
)]
async fn usage(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Path(id): Path<Uuid>,
    Query(q): Query<PageParams>,
) -> Result<axum::Json<PageBody<UsageBody>>, ServiceError> {
    let page = state.api_keys.usage(&caller, id, q.into()).await?;
    Ok(axum::Json(page.into()))
}
