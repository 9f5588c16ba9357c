//! /v1/trading-accounts* and /v1/users/me/accounts: translate, call
//! `AccountsService`. Broker credentials only ever come in; reads show whether
//! they are set, when, and a masked hint.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, put};
use axum::Router;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use uuid::Uuid;

use super::auth::Authenticated;
use super::extract::{Json, Meta, Path, Query};
use super::list::{PageBody, PageParams};
use super::AppState;
use crate::domain::account::{
    AccountAccess, AccountPatch, BrokerCredentials, Member, MemberRole, NewAccount, TradingAccount,
};
use crate::service::ServiceError;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/trading-accounts", get(list).post(create))
        .route(
            "/v1/trading-accounts/{id}",
            get(show).patch(update).delete(remove),
        )
        .route(
            "/v1/trading-accounts/{id}/credentials",
            put(set_credentials).get(credentials_status),
        )
        .route(
            "/v1/trading-accounts/{id}/members",
            get(list_members).post(super::invitations::invite),
        )
        .route(
            "/v1/trading-accounts/{id}/members/{user_id}",
            patch(change_member).delete(remove_member),
        )
        .route("/v1/users/me/accounts", get(my_accounts))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    broker: String,
    broker_user_id: String,
    #[serde(default)]
    nickname: Option<String>,
    #[serde(default)]
    subscription_tier: Option<String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct PatchBody {
    #[serde(default)]
    nickname: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    subscription_tier: Option<String>,
    #[serde(default)]
    subscription_status: Option<String>,
    /// Absent: unchanged; `null`: cleared.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<DateTime<Utc>>)]
    subscription_expires_at: Option<Option<DateTime<Utc>>>,
}

/// Tells a field sent as `null` (Some(None)) from one left out (None).
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// The values are write-only: this type is never serialized or logged.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CredentialsBody {
    api_key: String,
    api_secret: String,
    #[serde(default)]
    access_token: Option<String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct RoleBody {
    role: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct AccountBody {
    id: Uuid,
    broker: String,
    broker_user_id: String,
    nickname: String,
    status: &'static str,
    subscription_tier: &'static str,
    subscription_status: &'static str,
    subscription_expires_at: Option<DateTime<Utc>>,
    has_credentials: bool,
    credentials_updated_at: Option<DateTime<Utc>>,
    credentials_hint: Option<String>,
    created_at: DateTime<Utc>,
}

impl From<TradingAccount> for AccountBody {
    fn from(a: TradingAccount) -> Self {
        Self {
            id: a.id,
            broker: a.broker,
            broker_user_id: a.broker_user_id,
            nickname: a.nickname,
            status: a.status.as_str(),
            subscription_tier: a.subscription_tier.as_str(),
            subscription_status: a.subscription_status.as_str(),
            subscription_expires_at: a.subscription_expires_at,
            has_credentials: a.has_credentials,
            credentials_updated_at: a.credentials_updated_at,
            credentials_hint: a.credentials_hint,
            created_at: a.created_at,
        }
    }
}

/// The account shape plus the caller's access and what it permits.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct AccessBody {
    #[serde(flatten)]
    account: AccountBody,
    access: &'static str,
    permissions: Vec<&'static str>,
}

impl From<AccountAccess> for AccessBody {
    fn from(a: AccountAccess) -> Self {
        Self {
            permissions: a.permissions().iter().map(|p| p.as_str()).collect(),
            access: a.access.as_str(),
            account: a.account.into(),
        }
    }
}

#[derive(Serialize, utoipa::ToSchema)]
struct CredentialsStatusBody {
    has_credentials: bool,
    credentials_updated_at: Option<DateTime<Utc>>,
    credentials_hint: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
struct MemberBody {
    user_id: Uuid,
    email: String,
    role: &'static str,
    added_at: DateTime<Utc>,
}

impl From<Member> for MemberBody {
    fn from(m: Member) -> Self {
        Self {
            user_id: m.user_id,
            email: m.email,
            role: m.role.as_str(),
            added_at: m.added_at,
        }
    }
}

/// Creates a trading account owned by the caller.
#[utoipa::path(
    post,
    path = "/v1/trading-accounts",
    tag = "accounts",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    request_body = CreateBody,
    responses(
        (status = 201, description = "The account", body = AccountBody),
        (status = 403, description = "The key or the caller's roles lack accounts:write (`forbidden`)"),
        (status = 409, description = "This broker login already has a live account (`conflict`)"),
    ),
)]
async fn create(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Meta(meta): Meta,
    Json(body): Json<CreateBody>,
) -> Result<Response, ServiceError> {
    let input = NewAccount::parse(
        &body.broker,
        &body.broker_user_id,
        body.nickname.as_deref(),
        body.subscription_tier.as_deref(),
    )
    .map_err(ServiceError::Validation)?;
    let account = state.accounts.create(&caller, &meta, input).await?;
    Ok((StatusCode::CREATED, axum::Json(AccountBody::from(account))).into_response())
}

/// Accounts the caller owns or shares, each with the caller's access.
#[utoipa::path(
    get,
    path = "/v1/trading-accounts",
    tag = "accounts",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    params(PageParams),
    responses((status = 200, description = "Oldest first", body = PageBody<AccessBody>)),
)]
async fn list(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Meta(meta): Meta,
    Query(q): Query<PageParams>,
) -> Result<axum::Json<PageBody<AccessBody>>, ServiceError> {
    let page = state.accounts.list(&caller, &meta, q.into()).await?;
    Ok(axum::Json(page.into()))
}

#[utoipa::path(
    get,
    path = "/v1/users/me/accounts",
    tag = "accounts",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    params(PageParams),
    responses((status = 200, description = "Owned and shared accounts with `access` and `permissions`", body = PageBody<AccessBody>)),
)]
async fn my_accounts(
    state: State<AppState>,
    caller: Authenticated,
    meta: Meta,
    q: Query<PageParams>,
) -> Result<axum::Json<PageBody<AccessBody>>, ServiceError> {
    list(state, caller, meta, q).await
}

/// One account (owner and members only; anyone else gets 404).
#[utoipa::path(
    get,
    path = "/v1/trading-accounts/{id}",
    tag = "accounts",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    params(("id" = Uuid, Path, description = "Trading account id")),
    responses((status = 200, description = "The account with the caller's access", body = AccessBody)),
)]
async fn show(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Meta(meta): Meta,
    Path(id): Path<Uuid>,
) -> Result<axum::Json<AccessBody>, ServiceError> {
    let a = state.accounts.get(&caller, &meta, id).await?;
    Ok(axum::Json(a.into()))
}

/// Owner or manager; subscription fields need an administrator.
#[utoipa::path(
    patch,
    path = "/v1/trading-accounts/{id}",
    tag = "accounts",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    params(("id" = Uuid, Path, description = "Trading account id")),
    request_body = PatchBody,
    responses(
        (status = 200, description = "The updated account", body = AccountBody),
        (status = 403, description = "Below manager, or subscription fields (`forbidden`)"),
    ),
)]
async fn update(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Meta(meta): Meta,
    Path(id): Path<Uuid>,
    Json(body): Json<PatchBody>,
) -> Result<axum::Json<AccountBody>, ServiceError> {
    let patch = AccountPatch::parse(
        body.nickname.as_deref(),
        body.status.as_deref(),
        body.subscription_tier.as_deref(),
        body.subscription_status.as_deref(),
        body.subscription_expires_at,
    )
    .map_err(ServiceError::Validation)?;
    let a = state.accounts.update(&caller, &meta, id, patch).await?;
    Ok(axum::Json(a.into()))
}

/// Owner only: soft delete, ending every membership.
#[utoipa::path(
    delete,
    path = "/v1/trading-accounts/{id}",
    tag = "accounts",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    params(("id" = Uuid, Path, description = "Trading account id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 403, description = "Not the owner (`forbidden`)"),
    ),
)]
async fn remove(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Meta(meta): Meta,
    Path(id): Path<Uuid>,
) -> Result<StatusCode, ServiceError> {
    state.accounts.delete(&caller, &meta, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Owner or manager: write-only broker credentials, sealed at rest.
#[utoipa::path(
    put,
    path = "/v1/trading-accounts/{id}/credentials",
    tag = "accounts",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    params(("id" = Uuid, Path, description = "Trading account id")),
    request_body = CredentialsBody,
    responses(
        (status = 204, description = "Stored"),
        (status = 403, description = "Below manager (`forbidden`)"),
    ),
)]
async fn set_credentials(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Meta(meta): Meta,
    Path(id): Path<Uuid>,
    Json(body): Json<CredentialsBody>,
) -> Result<StatusCode, ServiceError> {
    let creds = BrokerCredentials::parse(
        &body.api_key,
        &body.api_secret,
        body.access_token.as_deref(),
    )
    .map_err(ServiceError::Validation)?;
    state
        .accounts
        .set_credentials(&caller, &meta, id, creds)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Owner or manager: whether credentials are set, when, and a masked hint.
#[utoipa::path(
    get,
    path = "/v1/trading-accounts/{id}/credentials",
    tag = "accounts",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    params(("id" = Uuid, Path, description = "Trading account id")),
    responses(
        (status = 200, description = "Never the values", body = CredentialsStatusBody),
        (status = 403, description = "Below manager (`forbidden`)"),
    ),
)]
async fn credentials_status(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Meta(meta): Meta,
    Path(id): Path<Uuid>,
) -> Result<axum::Json<CredentialsStatusBody>, ServiceError> {
    let a = state
        .accounts
        .credentials_status(&caller, &meta, id)
        .await?;
    Ok(axum::Json(CredentialsStatusBody {
        has_credentials: a.has_credentials,
        credentials_updated_at: a.credentials_updated_at,
        credentials_hint: a.credentials_hint,
    }))
}

#[utoipa::path(
    get,
    path = "/v1/trading-accounts/{id}/members",
    tag = "accounts",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    params(("id" = Uuid, Path, description = "Trading account id"), PageParams),
    responses((status = 200, description = "Live members, oldest first", body = PageBody<MemberBody>)),
)]
async fn list_members(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Meta(meta): Meta,
    Path(id): Path<Uuid>,
    Query(q): Query<PageParams>,
) -> Result<axum::Json<PageBody<MemberBody>>, ServiceError> {
    let page = state
        .accounts
        .list_members(&caller, &meta, id, q.into())
        .await?;
    Ok(axum::Json(page.into()))
}

/// Owner or manager; nobody raises their own role.
#[utoipa::path(
    patch,
    path = "/v1/trading-accounts/{id}/members/{user_id}",
    tag = "accounts",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    params(
        ("id" = Uuid, Path, description = "Trading account id"),
        ("user_id" = Uuid, Path, description = "The member"),
    ),
    request_body = RoleBody,
    responses(
        (status = 200, description = "The member", body = MemberBody),
        (status = 403, description = "Not allowed to give this role (`forbidden`)"),
    ),
)]
async fn change_member(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Meta(meta): Meta,
    Path((id, user_id)): Path<(Uuid, Uuid)>,
    Json(body): Json<RoleBody>,
) -> Result<axum::Json<MemberBody>, ServiceError> {
    let role = MemberRole::parse(&body.role).map_err(|e| ServiceError::Validation(vec![e]))?;
    let m = state
        .accounts
        .change_member_role(&caller, &meta, id, user_id, role)
        .await?;
    Ok(axum::Json(m.into()))
}

/// Owner or manager, or the member leaving.
#[utoipa::path(
    delete,
    path = "/v1/trading-accounts/{id}/members/{user_id}",
    tag = "accounts",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    params(
        ("id" = Uuid, Path, description = "Trading account id"),
        ("user_id" = Uuid, Path, description = "The member"),
    ),
    responses(
        (status = 204, description = "Removed, effective at once"),
        (status = 403, description = "Not allowed to remove this member (`forbidden`)"),
    ),
)]
async fn remove_member(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Meta(meta): Meta,
    Path((id, user_id)): Path<(Uuid, Uuid)>,
) -> Result<StatusCode, ServiceError> {
    state
        .accounts
        .remove_member(&caller, &meta, id, user_id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
