//! Email verification, password reset and email change (DESIGN.md section 8):
//! translate, call `Users`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use serde::Deserialize;
use uuid::Uuid;

use super::auth::Authenticated;
use super::extract::{Json, Meta, Path};
use super::problem::Problem;
use super::AppState;
use crate::service::ServiceError;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/auth/verify-email", post(verify_email))
        .route("/v1/auth/password-reset", post(request_password_reset))
        .route(
            "/v1/auth/password-reset/confirm",
            post(confirm_password_reset),
        )
        .route("/v1/users/me/email", post(change_email))
        .route("/v1/users/me/email/verification", post(resend_verification))
        .route(
            "/v1/admin/users/{id}/password-reset",
            post(admin_password_reset),
        )
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct VerifyEmailBody {
    /// The token of the emailed link (`…/verify-email?token=…`).
    token: String,
}

/// Confirms an address with the emailed token: the user's own (it becomes
/// verified), or the new one of an email change (the change applies and the old
/// address gets `email_changed`). Each token works once.
#[utoipa::path(
    post,
    path = "/v1/auth/verify-email",
    tag = "auth",
    request_body = VerifyEmailBody,
    responses(
        (status = 204, description = "Address verified (or changed)"),
        (status = 400, description = "Invalid, expired or used token (`validation_failed`, field `token`)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The new address was registered by someone else meanwhile (`conflict`)", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn verify_email(
    State(state): State<AppState>,
    Meta(meta): Meta,
    Json(body): Json<VerifyEmailBody>,
) -> Result<StatusCode, ServiceError> {
    state.users.verify_email(&meta, &body.token).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct PasswordResetBody {
    email: String,
}

/// Asks for a password-reset link. The answer is 202 with no body whether or not
/// the address belongs to a user (and takes as long); throttled per address and
/// per client IP.
#[utoipa::path(
    post,
    path = "/v1/auth/password-reset",
    tag = "auth",
    request_body = PasswordResetBody,
    responses(
        (status = 202, description = "If the address is a user's, a `password_reset` link is on its way"),
        (status = 429, description = "Too many requests for this address or from this IP (`rate_limited`, `Retry-After`; PASSWORD_RESET_EMAIL_MAX_PER_HOUR, PASSWORD_RESET_IP_MAX_PER_HOUR)", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn request_password_reset(
    State(state): State<AppState>,
    Meta(meta): Meta,
    Json(body): Json<PasswordResetBody>,
) -> Result<StatusCode, ServiceError> {
    state
        .users
        .request_password_reset(&meta, &body.email, &state.tasks)
        .await?;
    Ok(StatusCode::ACCEPTED)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct PasswordResetConfirmBody {
    /// The token of the emailed link (`…/reset-password?token=…`).
    token: String,
    new_password: String,
}

/// Sets a new password with the emailed token: the password policy applies,
/// every session of the user ends, the token works once. Second factors stay: the
/// next login still asks for one.
#[utoipa::path(
    post,
    path = "/v1/auth/password-reset/confirm",
    tag = "auth",
    request_body = PasswordResetConfirmBody,
    responses(
        (status = 204, description = "Password replaced, every session ended"),
        (status = 400, description = "Invalid, expired or used token (field `token`), or a password the policy refuses (field `password`) (`validation_failed`)", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn confirm_password_reset(
    State(state): State<AppState>,
    Meta(meta): Meta,
    Json(body): Json<PasswordResetConfirmBody>,
) -> Result<StatusCode, ServiceError> {
    state
        .users
        .confirm_password_reset(&meta, &body.token, body.new_password)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ChangeEmailBody {
    new_email: String,
    current_password: String,
}

/// Asks to move to a new address: an `email_verification` link goes to it, and the
/// change applies when that link is confirmed (`POST /v1/auth/verify-email`); the
/// old address is then told (`email_changed`).
#[utoipa::path(
    post,
    path = "/v1/users/me/email",
    tag = "users",
    security(("bearer" = []), ("session_cookie" = [])),
    request_body = ChangeEmailBody,
    responses(
        (status = 202, description = "A confirmation link was sent to the new address"),
        (status = 400, description = "Invalid or unchanged address (field `new_email`) or wrong current password (field `current_password`) (`validation_failed`)", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "An API key (`forbidden`), or an unverified email while REQUIRE_VERIFIED_EMAIL is on (`email_unverified`)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The address is already registered (`conflict`, field `new_email`)", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn change_email(
    State(state): State<AppState>,
    Meta(meta): Meta,
    Authenticated(caller): Authenticated,
    Json(body): Json<ChangeEmailBody>,
) -> Result<StatusCode, ServiceError> {
    state
        .users
        .request_email_change(&caller, &meta, &body.new_email, body.current_password)
        .await?;
    Ok(StatusCode::ACCEPTED)
}

/// Sends a new `email_verification` link to the caller's address (nothing when it
/// is already verified).
#[utoipa::path(
    post,
    path = "/v1/users/me/email/verification",
    tag = "users",
    security(("bearer" = []), ("session_cookie" = [])),
    responses(
        (status = 202, description = "A new link is on its way"),
        (status = 403, description = "An API key (`forbidden`)", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn resend_verification(
    State(state): State<AppState>,
    Meta(meta): Meta,
    Authenticated(caller): Authenticated,
) -> Result<StatusCode, ServiceError> {
    state.users.resend_verification(&caller, &meta).await?;
    Ok(StatusCode::ACCEPTED)
}

/// Admin only (`admin:users`): sends the user a `password_reset` link. The
/// current password works until the link is used.
#[utoipa::path(
    post,
    path = "/v1/admin/users/{id}/password-reset",
    tag = "admin",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    params(("id" = Uuid, Path, description = "User id")),
    responses(
        (status = 202, description = "The link is on its way"),
        (status = 403, description = "Not an admin (`forbidden`)", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn admin_password_reset(
    State(state): State<AppState>,
    Meta(meta): Meta,
    Authenticated(caller): Authenticated,
    Path(id): Path<Uuid>,
) -> Result<StatusCode, ServiceError> {
    state.users.admin_password_reset(&caller, &meta, id).await?;
    Ok(StatusCode::ACCEPTED)
}
