//! Passkeys (DESIGN §8): the signed-in user's passkeys under
//! `/v1/users/me/passkeys`, passwordless login under `/v1/auth/passkey`, and the
//! start of a passkey second factor, `/v1/auth/mfa/webauthn/start`.

use axum::extract::State;
use axum::http::header::CACHE_CONTROL;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::auth::Authenticated;
use super::auth_api::{token_response, TokenPair};
use super::extract::{Json, Meta, Path};
use super::list::PageBody;
use super::AppState;
use crate::domain::passkey;
use crate::service::paging::Page;
use crate::service::passkeys::Challenge;
use crate::service::ServiceError;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/users/me/passkeys", get(list))
        .route("/v1/users/me/passkeys/{id}", delete(remove))
        .route("/v1/users/me/passkeys/register/start", post(register_start))
        .route(
            "/v1/users/me/passkeys/register/finish",
            post(register_finish),
        )
        .route("/v1/auth/passkey/start", post(login_start))
        .route("/v1/auth/passkey/finish", post(login_finish))
        .route("/v1/auth/mfa/webauthn/start", post(mfa_start))
        .route("/v1/auth/step-up/webauthn/start", post(step_up_start))
}

/// A started WebAuthn ceremony.
#[derive(Serialize, utoipa::ToSchema)]
struct ChallengeBody {
    /// Give it back to the matching `…/finish`; single use, expires in 300 s.
    challenge_id: Uuid,
    /// The `publicKey` options for `navigator.credentials.create()` (registration)
    /// or `.get()` (login), binary fields base64url.
    #[schema(value_type = Object)]
    options: serde_json::Value,
}

/// Challenges are single use: never cached.
fn challenge_response(c: Challenge) -> Response {
    let mut res = axum::Json(ChallengeBody {
        challenge_id: c.id,
        options: c.options,
    })
    .into_response();
    res.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// The caller's passkeys.
/// A registered passkey as its owner sees it (never the public key or counter).
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct PasskeySummary {
    id: Uuid,
    name: String,
    created_at: chrono::DateTime<chrono::Utc>,
    /// The last login or second factor it completed; null until then.
    last_used_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl From<passkey::PasskeySummary> for PasskeySummary {
    fn from(p: passkey::PasskeySummary) -> Self {
        Self {
            id: p.id,
            name: p.name,
            created_at: p.created_at,
            last_used_at: p.last_used_at,
        }
    }
}

#[utoipa::path(
    get,
    path = "/v1/users/me/passkeys",
    tag = "users",
    security(("bearer" = []), ("session_cookie" = [])),
    responses(
        (status = 200, description = "The caller's passkeys, oldest first (one page)", body = PageBody<PasskeySummary>),
        (status = 403, description = "An API key, not a login session (`forbidden`)"),
    ),
)]
async fn list(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
) -> Result<axum::Json<PageBody<PasskeySummary>>, ServiceError> {
    let items: Vec<PasskeySummary> = state
        .passkeys
        .list(&caller)
        .await?
        .into_iter()
        .map(Into::into)
        .collect();
    Ok(axum::Json(PageBody::from(Page {
        items,
        next_cursor: None,
    })))
}

/// Starts adding a passkey to the caller: creation options for a discoverable,
/// user-verified credential.
#[utoipa::path(
    post,
    path = "/v1/users/me/passkeys/register/start",
    tag = "users",
    security(("bearer" = []), ("session_cookie" = [])),
    responses(
        (status = 200, description = "The challenge and the creation options", body = ChallengeBody),
        (status = 403, description = "An API key, not a login session (`forbidden`)"),
        (status = 409, description = "The caller already has the most passkeys allowed (`conflict`)"),
    ),
)]
async fn register_start(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
) -> Result<Response, ServiceError> {
    Ok(challenge_response(
        state.passkeys.start_registration(&caller).await?,
    ))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct RegisterFinishBody {
    challenge_id: Uuid,
    /// What the user calls this passkey, 1 to 64 characters (default `Passkey`).
    #[serde(default)]
    name: Option<String>,
    /// The `PublicKeyCredential` from `navigator.credentials.create()`, as JSON
    /// (`toJSON()`: binary fields base64url).
    #[schema(value_type = Object)]
    credential: serde_json::Value,
}

/// Finishes adding a passkey.
#[utoipa::path(
    post,
    path = "/v1/users/me/passkeys/register/finish",
    tag = "users",
    security(("bearer" = []), ("session_cookie" = [])),
    request_body = RegisterFinishBody,
    responses(
        (status = 201, description = "The new passkey", body = PasskeySummary),
        (status = 400, description = "Unknown, expired or used `challenge_id`, a bad `name`, or a credential that does not verify (`validation_failed`)"),
        (status = 403, description = "An API key, not a login session (`forbidden`)"),
        (status = 409, description = "This authenticator's credential is already registered (`conflict`)"),
    ),
)]
async fn register_finish(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Meta(meta): Meta,
    Json(body): Json<RegisterFinishBody>,
) -> Result<(StatusCode, axum::Json<PasskeySummary>), ServiceError> {
    let created = state
        .passkeys
        .finish_registration(
            &caller,
            &meta,
            body.challenge_id,
            body.name.as_deref(),
            body.credential,
        )
        .await?;
    Ok((StatusCode::CREATED, axum::Json(created.into())))
}

/// Removes one of the caller's passkeys.
#[utoipa::path(
    delete,
    path = "/v1/users/me/passkeys/{id}",
    tag = "users",
    security(("bearer" = []), ("session_cookie" = [])),
    params(("id" = Uuid, Path, description = "Passkey id")),
    responses(
        (status = 204, description = "Removed"),
        (status = 403, description = "An API key, not a login session (`forbidden`); a recent second factor is needed (`mfa_required`)"),
    ),
)]
async fn remove(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
    Meta(meta): Meta,
    Path(id): Path<Uuid>,
) -> Result<StatusCode, ServiceError> {
    state.passkeys.remove(&caller, &meta, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Starts a passwordless login: request options naming no credential, so the
/// authenticator offers the discoverable passkeys it holds for this site.
#[utoipa::path(
    post,
    path = "/v1/auth/passkey/start",
    tag = "auth",
    responses(
        (status = 200, description = "The challenge and the request options", body = ChallengeBody),
    ),
)]
async fn login_start(
    State(state): State<AppState>,
    Meta(meta): Meta,
) -> Result<Response, ServiceError> {
    Ok(challenge_response(state.passkeys.start_login(&meta).await?))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct LoginFinishBody {
    challenge_id: Uuid,
    /// The `PublicKeyCredential` from `navigator.credentials.get()`, as JSON
    /// (`toJSON()`: binary fields base64url).
    #[schema(value_type = Object)]
    credential: serde_json::Value,
}

/// Finishes a passwordless login: the login body and session cookie, with `amr`
/// `["hwk","mfa"]` in the access token.
#[utoipa::path(
    post,
    path = "/v1/auth/passkey/finish",
    tag = "auth",
    request_body = LoginFinishBody,
    responses(
        (status = 200, description = "Tokens and the user; `Set-Cookie` carries the session", body = TokenPair,
            headers(("set-cookie" = String, description = "The session cookie (HttpOnly)"))),
        (status = 401, description = "Any refusal: unknown, expired or used challenge, unknown passkey, a signature, origin or counter that does not verify, a disabled user (`invalid_credentials`)"),
    ),
)]
async fn login_finish(
    State(state): State<AppState>,
    Meta(meta): Meta,
    Json(body): Json<LoginFinishBody>,
) -> Result<Response, ServiceError> {
    let tokens = state
        .passkeys
        .finish_login(&meta, body.challenge_id, body.credential)
        .await?;
    Ok(token_response(&state, tokens))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct MfaStartBody {
    /// From the password step of `POST /v1/auth/login`.
    mfa_token: String,
}

/// Starts a passkey as the second step of a login; finish it with
/// `POST /v1/auth/mfa {mfa_token, method: "webauthn", challenge_id, credential}`.
#[utoipa::path(
    post,
    path = "/v1/auth/mfa/webauthn/start",
    tag = "auth",
    request_body = MfaStartBody,
    responses(
        (status = 200, description = "The challenge and the request options (the user's passkeys)", body = ChallengeBody),
        (status = 400, description = "The account has no passkey (`validation_failed`)"),
        (status = 401, description = "Unknown, used or expired `mfa_token` (`invalid_token`)"),
    ),
)]
async fn mfa_start(
    State(state): State<AppState>,
    Json(body): Json<MfaStartBody>,
) -> Result<Response, ServiceError> {
    let user_id = mfa_token_user(&state, &body.mfa_token).await?;
    Ok(challenge_response(
        state.passkeys.start_second_factor(user_id).await?,
    ))
}

/// The user whose password step issued `mfa_token`, without using the token up.
async fn mfa_token_user(state: &AppState, mfa_token: &str) -> Result<Uuid, ServiceError> {
    Ok(state.mfa.pending_user(mfa_token).await?.0)
}

/// Starts a passkey step-up for the signed-in user; finish it with
/// `POST /v1/auth/step-up {method: "webauthn", challenge_id, credential}`.
#[utoipa::path(
    post,
    path = "/v1/auth/step-up/webauthn/start",
    tag = "auth",
    security(("bearer" = []), ("session_cookie" = [])),
    responses(
        (status = 200, description = "The challenge and the request options (the caller's passkeys)", body = ChallengeBody),
        (status = 400, description = "The caller has no passkey (`validation_failed`)"),
        (status = 403, description = "An API key, not a login session (`forbidden`)"),
    ),
)]
async fn step_up_start(
    State(state): State<AppState>,
    Authenticated(caller): Authenticated,
) -> Result<Response, ServiceError> {
    Ok(challenge_response(
        state.passkeys.start_step_up(&caller).await?,
    ))
}
