//! Second factors on the gateway (DESIGN §8): /v1/users/me/mfa*, the login's
//! second step (POST /v1/auth/mfa), step-up and an admin's removal. Translate,
//! call `MfaService`.

use axum::extract::State;
use axum::http::header::CACHE_CONTROL;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::auth::Authenticated;
use super::auth_api::token_response;
use super::extract::{Json, Meta, Path};
use super::problem::Problem;
use super::AppState;
use crate::service::mfa_login::SecondStep;
use crate::service::ServiceError;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/users/me/mfa", get(status))
        .route(
            "/v1/users/me/mfa/totp",
            post(start_totp).delete(remove_totp),
        )
        .route("/v1/users/me/mfa/totp/confirm", post(confirm_totp))
        .route("/v1/users/me/mfa/recovery-codes", post(recovery_codes))
        .route("/v1/auth/mfa", post(second_step))
        .route("/v1/auth/step-up", post(step_up))
        .route("/v1/admin/users/{id}/mfa", delete(admin_remove))
}

/// Secrets and codes are never cached by anything in between.
fn no_store(mut res: Response) -> Response {
    res.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// The answer to a right password when the user has a second factor: no
/// tokens, no cookie.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct MfaRequiredBody {
    /// Always true: finish with POST /v1/auth/mfa.
    mfa_required: bool,
    /// Single use, valid `expires_in` seconds.
    mfa_token: String,
    /// The second factors this user can use: `totp`, `recovery_code`, `webauthn`.
    methods: Vec<&'static str>,
    expires_in: u64,
}

/// `POST /v1/auth/login`'s answer for a user with a second factor.
pub(super) fn mfa_required_response(step: SecondStep) -> Response {
    no_store(
        axum::Json(MfaRequiredBody {
            mfa_required: true,
            mfa_token: step.mfa_token,
            methods: step.methods.iter().map(|m| m.as_str()).collect(),
            expires_in: step.expires_in,
        })
        .into_response(),
    )
}

#[derive(Serialize, utoipa::ToSchema)]
struct MfaStatusBody {
    /// TOTP is enabled (confirmed).
    totp: bool,
    /// Registered passkeys.
    passkeys: i64,
    /// Unused recovery codes.
    recovery_codes_left: i64,
}

/// The caller's second factors.
#[utoipa::path(
    get,
    path = "/v1/users/me/mfa",
    tag = "mfa",
    security(("bearer" = []), ("session_cookie" = [])),
    responses(
        (status = 200, description = "Which factors the caller holds", body = MfaStatusBody),
        (status = 403, description = "An API key (`forbidden`)", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn status(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
) -> Result<axum::Json<MfaStatusBody>, ServiceError> {
    let s = state.mfa.status(&caller).await?;
    Ok(axum::Json(MfaStatusBody {
        totp: s.totp,
        passkeys: s.passkeys,
        recovery_codes_left: s.recovery_codes_left,
    }))
}

#[derive(Serialize, utoipa::ToSchema)]
struct TotpEnrolmentBody {
    /// The base32 secret, for typing into an authenticator.
    secret: String,
    /// `otpauth://totp/StocksBlitz:<email>?secret=…&issuer=StocksBlitz`
    otpauth_uri: String,
    /// An SVG QR code of `otpauth_uri`.
    qr_svg: String,
}

/// Starts TOTP enrolment: a new secret, pending until confirmed with a code.
#[utoipa::path(
    post,
    path = "/v1/users/me/mfa/totp",
    tag = "mfa",
    security(("bearer" = []), ("session_cookie" = [])),
    responses(
        (status = 201, description = "A pending enrolment", body = TotpEnrolmentBody),
        (status = 409, description = "TOTP is already enabled (`conflict`)", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn start_totp(
    State(state): State<AppState>,
    Meta(meta): Meta,
    Authenticated(caller): Authenticated,
) -> Result<Response, ServiceError> {
    let e = state.mfa.start_totp(&caller, &meta).await?;
    Ok(no_store(
        (
            StatusCode::CREATED,
            axum::Json(TotpEnrolmentBody {
                secret: e.secret_base32,
                otpauth_uri: e.otpauth_uri,
                qr_svg: e.qr_svg,
            }),
        )
            .into_response(),
    ))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CodeBody {
    /// The authenticator's current six-digit code.
    #[schema(example = "123456")]
    code: String,
}

#[derive(Serialize, utoipa::ToSchema)]
struct RecoveryCodesBody {
    /// Ten single-use codes, shown this once.
    recovery_codes: Vec<String>,
}

fn recovery_codes_response(codes: Vec<String>) -> Response {
    no_store(
        axum::Json(RecoveryCodesBody {
            recovery_codes: codes,
        })
        .into_response(),
    )
}

/// Confirms TOTP with a code: TOTP is on, and the recovery codes are shown once.
#[utoipa::path(
    post,
    path = "/v1/users/me/mfa/totp/confirm",
    tag = "mfa",
    security(("bearer" = []), ("session_cookie" = [])),
    request_body = CodeBody,
    responses(
        (status = 200, description = "TOTP enabled; ten recovery codes", body = RecoveryCodesBody),
        (status = 400, description = "A wrong code (`validation_failed`, field `code`)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Nothing to confirm, or already enabled (`conflict`)", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn confirm_totp(
    State(state): State<AppState>,
    Meta(meta): Meta,
    Authenticated(caller): Authenticated,
    Json(body): Json<CodeBody>,
) -> Result<Response, ServiceError> {
    let codes = state.mfa.confirm_totp(&caller, &meta, &body.code).await?;
    Ok(recovery_codes_response(codes))
}

/// Removes TOTP (needs a recent second factor).
#[utoipa::path(
    delete,
    path = "/v1/users/me/mfa/totp",
    tag = "mfa",
    security(("bearer" = []), ("session_cookie" = [])),
    responses(
        (status = 204, description = "TOTP removed"),
        (status = 403, description = "No recent second factor (`mfa_required`)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "TOTP is not enabled (`not_found`)", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn remove_totp(
    State(state): State<AppState>,
    Meta(meta): Meta,
    Authenticated(caller): Authenticated,
) -> Result<StatusCode, ServiceError> {
    state.mfa.remove_totp(&caller, &meta).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A new set of recovery codes (needs a recent second factor); the old set dies.
#[utoipa::path(
    post,
    path = "/v1/users/me/mfa/recovery-codes",
    tag = "mfa",
    security(("bearer" = []), ("session_cookie" = [])),
    responses(
        (status = 200, description = "Ten new recovery codes, shown this once", body = RecoveryCodesBody),
        (status = 403, description = "No recent second factor (`mfa_required`)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "No second factor to back up (`conflict`)", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn recovery_codes(
    State(state): State<AppState>,
    Meta(meta): Meta,
    Authenticated(caller): Authenticated,
) -> Result<Response, ServiceError> {
    let codes = state.mfa.regenerate_recovery_codes(&caller, &meta).await?;
    Ok(recovery_codes_response(codes))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct SecondStepBody {
    /// From the login's `mfa_required` answer.
    mfa_token: String,
    /// `totp`, `recovery_code` or `webauthn`.
    #[schema(example = "totp")]
    method: String,
    /// The TOTP code or a recovery code (`totp`, `recovery_code`).
    code: Option<String>,
    /// From POST /v1/auth/mfa/webauthn/start (`webauthn`).
    challenge_id: Option<String>,
    /// The assertion (`webauthn`).
    #[schema(value_type = Option<Object>)]
    credential: Option<serde_json::Value>,
}

fn required_code(code: Option<String>) -> Result<String, ServiceError> {
    code.filter(|c| !c.trim().is_empty()).ok_or_else(|| {
        ServiceError::validation("code", "required", "code is required for this method")
    })
}

/// The login's second step: the `mfa_token` and a second factor → the login body
/// and the session cookie. A wrong code counts toward the lockout.
#[utoipa::path(
    post,
    path = "/v1/auth/mfa",
    tag = "auth",
    request_body = SecondStepBody,
    responses(
        (status = 200, description = "Tokens and the user; `Set-Cookie` carries the session", body = super::auth_api::TokenPair,
            headers(("set-cookie" = String, description = "The session cookie (HttpOnly)"))),
        (status = 400, description = "A method the user does not have, or no code (`validation_failed`)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Wrong code, dead `mfa_token`, or a locked account (`invalid_credentials`)", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn second_step(
    State(state): State<AppState>,
    Meta(meta): Meta,
    Json(body): Json<SecondStepBody>,
) -> Result<Response, ServiceError> {
    if body.method == "webauthn" {
        let (challenge_id, credential) = (body.challenge_id, body.credential);
        let tokens = state
            .mfa
            .finish_login_with(&meta, &body.mfa_token, "webauthn", |uid, _| {
                state
                    .passkeys
                    .check_second_factor(&meta, uid, challenge_id, credential)
            })
            .await?;
        return Ok(token_response(&state, tokens));
    }
    let code = required_code(body.code)?;
    let tokens = state
        .mfa
        .finish_login(&meta, &body.mfa_token, &body.method, &code)
        .await?;
    Ok(token_response(&state, tokens))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct StepUpBody {
    /// `totp`, `recovery_code` or `webauthn`.
    #[schema(example = "totp")]
    method: String,
    code: Option<String>,
    challenge_id: Option<String>,
    #[schema(value_type = Option<Object>)]
    credential: Option<serde_json::Value>,
}

/// A fresh second factor for the current session: a new login body whose token
/// has `auth_time` now and `mfa` in `amr`.
#[utoipa::path(
    post,
    path = "/v1/auth/step-up",
    tag = "auth",
    security(("bearer" = []), ("session_cookie" = [])),
    request_body = StepUpBody,
    responses(
        (status = 200, description = "Tokens for the same session", body = super::auth_api::TokenPair,
            headers(("set-cookie" = String, description = "The session cookie (HttpOnly)"))),
        (status = 400, description = "A method the user does not have (`validation_failed`)", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Wrong code or a locked account (`invalid_credentials`)", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn step_up(
    State(state): State<AppState>,
    Meta(meta): Meta,
    Authenticated(caller): Authenticated,
    Json(body): Json<StepUpBody>,
) -> Result<Response, ServiceError> {
    if body.method == "webauthn" {
        let (challenge_id, credential) = (body.challenge_id, body.credential);
        let tokens = state
            .mfa
            .step_up_with(&caller, &meta, "webauthn", |uid, _| {
                state
                    .passkeys
                    .check_second_factor(&meta, uid, challenge_id, credential)
            })
            .await?;
        return Ok(token_response(&state, tokens));
    }
    let code = required_code(body.code)?;
    let tokens = state
        .mfa
        .step_up(&caller, &meta, &body.method, &code)
        .await?;
    Ok(token_response(&state, tokens))
}

/// Admin only: removes every second factor of a user (audited).
#[utoipa::path(
    delete,
    path = "/v1/admin/users/{id}/mfa",
    tag = "admin",
    security(("bearer" = []), ("session_cookie" = [])),
    params(("id" = Uuid, Path, description = "User id")),
    responses(
        (status = 204, description = "Every factor removed"),
        (status = 403, description = "Not an admin (`forbidden`), or no recent second factor (`mfa_required`)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such user (`not_found`)", body = Problem, content_type = "application/problem+json"),
    ),
)]
async fn admin_remove(
    State(state): State<AppState>,
    Meta(meta): Meta,
    Authenticated(caller): Authenticated,
    Path(id): Path<Uuid>,
) -> Result<StatusCode, ServiceError> {
    state.mfa.admin_remove_all(&caller, &meta, id).await?;
    Ok(StatusCode::NO_CONTENT)
}
