//! Invitations: `POST /v1/trading-accounts/{id}/members` invites (202, the same
//! answer whether or not the email is registered), managers list and withdraw
//! pending ones, and the invitee answers under `/v1/users/me/invitations`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::accounts::AccessBody;
use super::auth::Authenticated;
use super::extract::{Json, Meta, Path, Query};
use super::list::{PageBody, PageParams};
use super::AppState;
use crate::domain::account::{MemberRole, MemberTarget};
use crate::domain::invitation::{Invitation, ReceivedInvitation};
use crate::service::ServiceError;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/trading-accounts/{id}/invitations", get(pending))
        .route(
            "/v1/trading-accounts/{id}/invitations/{invitation_id}",
            delete(revoke),
        )
        .route("/v1/users/me/invitations", get(received))
        .route("/v1/users/me/invitations/{id}/accept", post(accept))
        .route("/v1/users/me/invitations/{id}/decline", post(decline))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct InviteBody {
    /// A registered user's id; or give `email`.
    #[serde(default)]
    user_id: Option<Uuid>,
    #[serde(default)]
    email: Option<String>,
    /// `viewer`, `trader` or `manager`, never above the inviter's own.
    role: String,
}

/// An invitation as the account's owner and managers see it.
#[derive(Serialize, utoipa::ToSchema)]
struct InvitationBody {
    id: Uuid,
    email: String,
    role: &'static str,
    /// `pending` until the invitee answers.
    status: &'static str,
    invited_by: Option<Uuid>,
    created_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
}

impl From<Invitation> for InvitationBody {
    fn from(i: Invitation) -> Self {
        Self {
            id: i.id,
            email: i.email,
            role: i.role.as_str(),
            status: i.status.as_str(),
            invited_by: i.invited_by,
            created_at: i.created_at,
            expires_at: i.expires_at,
        }
    }
}

/// The answer to an invite: nothing about whether the email is registered.
#[derive(Serialize, utoipa::ToSchema)]
struct InvitedBody {
    /// Always `invited`.
    status: &'static str,
    invitation: InvitationBody,
}

#[derive(Serialize, utoipa::ToSchema)]
struct InvitedAccountBody {
    id: Uuid,
    broker: String,
    nickname: String,
}

/// An invitation as its invitee sees it.
#[derive(Serialize, utoipa::ToSchema)]
struct ReceivedBody {
    id: Uuid,
    account: InvitedAccountBody,
    role: &'static str,
    invited_by_email: Option<String>,
    created_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
}

impl From<ReceivedInvitation> for ReceivedBody {
    fn from(i: ReceivedInvitation) -> Self {
        Self {
            id: i.id,
            account: InvitedAccountBody {
                id: i.account_id,
                broker: i.broker,
                nickname: i.nickname,
            },
            role: i.role.as_str(),
            invited_by_email: i.invited_by_email,
            created_at: i.created_at,
            expires_at: i.expires_at,
        }
    }
}

/// Owner or manager: invites a user (by id) or an email with a role; the member
/// is added only when the invitee accepts. Registered or not, an email gets the
/// same 202.
#[utoipa::path(
    post,
    path = "/v1/trading-accounts/{id}/members",
    tag = "accounts",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    params(("id" = Uuid, Path, description = "Trading account id")),
    request_body = InviteBody,
    responses(
        (status = 202, description = "Invited; the invitee accepts in GET /v1/users/me/invitations", body = InvitedBody),
        (status = 403, description = "Below manager, or above the inviter's role (`forbidden`)"),
        (status = 404, description = "No such account, or an unknown `user_id` (`not_found`)"),
        (status = 409, description = "Already a member, or an invitation is pending for this email (`conflict`)"),
    ),
)]
pub(super) async fn invite(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Meta(meta): Meta,
    Path(id): Path<Uuid>,
    Json(body): Json<InviteBody>,
) -> Result<Response, ServiceError> {
    let mut errors = Vec::new();
    let target = MemberTarget::parse(body.user_id, body.email.as_deref())
        .map_err(|e| errors.push(e))
        .ok();
    let role = MemberRole::parse(&body.role)
        .map_err(|e| errors.push(e))
        .ok();
    let (Some(target), Some(role)) = (target, role) else {
        return Err(ServiceError::Validation(errors));
    };
    let invitation = state
        .invitations
        .invite(&caller, &meta, id, target, role)
        .await?;
    let body = InvitedBody {
        status: "invited",
        invitation: invitation.into(),
    };
    Ok((StatusCode::ACCEPTED, axum::Json(body)).into_response())
}

/// Owner or manager: the account's pending invitations, oldest first.
#[utoipa::path(
    get,
    path = "/v1/trading-accounts/{id}/invitations",
    tag = "accounts",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    params(("id" = Uuid, Path, description = "Trading account id"), PageParams),
    responses(
        (status = 200, description = "Pending invitations", body = PageBody<InvitationBody>),
        (status = 403, description = "Below manager (`forbidden`)"),
    ),
)]
async fn pending(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Meta(meta): Meta,
    Path(id): Path<Uuid>,
    Query(q): Query<PageParams>,
) -> Result<axum::Json<PageBody<InvitationBody>>, ServiceError> {
    let page = state
        .invitations
        .pending(&caller, &meta, id, q.into())
        .await?;
    Ok(axum::Json(page.into()))
}

/// Owner or manager: withdraws a pending invitation.
#[utoipa::path(
    delete,
    path = "/v1/trading-accounts/{id}/invitations/{invitation_id}",
    tag = "accounts",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    params(
        ("id" = Uuid, Path, description = "Trading account id"),
        ("invitation_id" = Uuid, Path, description = "The invitation"),
    ),
    responses(
        (status = 204, description = "Withdrawn"),
        (status = 404, description = "No such pending invitation (`not_found`)"),
    ),
)]
async fn revoke(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Meta(meta): Meta,
    Path((id, invitation_id)): Path<(Uuid, Uuid)>,
) -> Result<StatusCode, ServiceError> {
    state
        .invitations
        .revoke(&caller, &meta, id, invitation_id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The caller's pending invitations (session only), oldest first.
#[utoipa::path(
    get,
    path = "/v1/users/me/invitations",
    tag = "users",
    security(("bearer" = []), ("session_cookie" = [])),
    params(PageParams),
    responses(
        (status = 200, description = "Pending invitations to the caller", body = PageBody<ReceivedBody>),
        (status = 403, description = "Called with an API key (`forbidden`)"),
    ),
)]
async fn received(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Query(q): Query<PageParams>,
) -> Result<axum::Json<PageBody<ReceivedBody>>, ServiceError> {
    let page = state.invitations.received(&caller, q.into()).await?;
    Ok(axum::Json(page.into()))
}

/// Accepts an invitation (session only): the caller becomes a member.
#[utoipa::path(
    post,
    path = "/v1/users/me/invitations/{id}/accept",
    tag = "users",
    security(("bearer" = []), ("session_cookie" = [])),
    params(("id" = Uuid, Path, description = "The invitation")),
    responses(
        (status = 200, description = "The account with the caller's new access", body = AccessBody),
        (status = 404, description = "No such pending invitation to the caller (`not_found`)"),
        (status = 409, description = "Expired, withdrawn by its inviter's loss of authority, or already a member (`conflict`)"),
    ),
)]
async fn accept(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Meta(meta): Meta,
    Path(id): Path<Uuid>,
) -> Result<axum::Json<AccessBody>, ServiceError> {
    let a = state.invitations.accept(&caller, &meta, id).await?;
    Ok(axum::Json(a.into()))
}

/// Declines an invitation (session only).
#[utoipa::path(
    post,
    path = "/v1/users/me/invitations/{id}/decline",
    tag = "users",
    security(("bearer" = []), ("session_cookie" = [])),
    params(("id" = Uuid, Path, description = "The invitation")),
    responses(
        (status = 204, description = "Declined"),
        (status = 404, description = "No such pending invitation to the caller (`not_found`)"),
    ),
)]
async fn decline(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Meta(meta): Meta,
    Path(id): Path<Uuid>,
) -> Result<StatusCode, ServiceError> {
    state.invitations.decline(&caller, &meta, id).await?;
    Ok(StatusCode::NO_CONTENT)
}
