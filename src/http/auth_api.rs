//! /v1/auth/* and the JWKS document: translate wire bodies, call `Identity`.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, SET_COOKIE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::{Deserialize, Serialize};

use super::auth::{clear_session_cookie, cookie_value, session_cookie, Authenticated};
use super::extract::{Json, Meta};
use super::problem::Problem;
use super::AppState;
use crate::domain::user::User;
use crate::service::auth::{LoginTokens, RegisterInput};
use crate::service::{FieldError, ServiceError};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/auth/register", post(register))
        .route("/v1/auth/login", post(login))
        .route("/v1/auth/refresh", post(refresh))
        .route("/v1/auth/logout", post(logout))
        .route("/v1/auth/token", post(token))
        .route("/.well-known/jwks.json", get(jwks))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterBody {
    email: String,
    password: String,
    full_name: String,
}

/// Self sign-up (when enabled for the environment); the new user has role `user`.
#[utoipa::path(
    post,
    path = "/v1/auth/register",
    tag = "auth",
    request_body = RegisterBody,
    responses(
        (status = 201, description = "The new user", body = User),
        (status = 403, description = "Sign-up is disabled (`forbidden`)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Email already registered (`conflict`)", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Too many sign-ups from this IP (`rate_limited`, `Retry-After`; REGISTER_IP_MAX_PER_HOUR)", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn register(
    State(state): State<AppState>,
    Meta(meta): Meta,
    Json(body): Json<RegisterBody>,
) -> Result<(StatusCode, axum::Json<User>), ServiceError> {
    let user = state
        .identity
        .register(
            &meta,
            RegisterInput {
                email: body.email,
                password: body.password,
                full_name: body.full_name,
            },
        )
        .await?;
    Ok((StatusCode::CREATED, axum::Json(user)))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginBody {
    email: String,
    password: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct TokenPair {
    access_token: String,
    refresh_token: String,
    #[schema(example = "Bearer")]
    token_type: &'static str,
    /// Seconds until the access token expires.
    expires_in: u64,
    user: User,
}

/// The login-shaped body plus the session cookie; never cached.
pub(super) fn token_response(state: &AppState, t: LoginTokens) -> Response {
    let cookie = session_cookie(
        &state.settings,
        &t.refresh_token,
        state.settings.refresh_token_ttl_seconds,
    );
    let mut res = axum::Json(TokenPair {
        access_token: t.access_token,
        refresh_token: t.refresh_token,
        token_type: "Bearer",
        expires_in: t.expires_in,
        user: t.user,
    })
    .into_response();
    res.headers_mut().insert(SET_COOKIE, cookie);
    res.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// Email (case-insensitive) and password; also sets the session cookie.
#[utoipa::path(
    post,
    path = "/v1/auth/login",
    tag = "auth",
    request_body = LoginBody,
    responses(
        (status = 200, description = "Tokens and the user; `Set-Cookie` carries the session", body = TokenPair,
            headers(("set-cookie" = String, description = "The session cookie (HttpOnly)"))),
        (status = 401, description = "Any failure, locked or disabled included (`invalid_credentials`)", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn login(
    State(state): State<AppState>,
    Meta(meta): Meta,
    Json(body): Json<LoginBody>,
) -> Result<Response, ServiceError> {
    let tokens = state
        .identity
        .login(&meta, &body.email, body.password)
        .await?;
    Ok(token_response(&state, tokens))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct RefreshBody {
    refresh_token: String,
}

/// `{refresh_token}` in the body, or (no body) the session cookie.
#[utoipa::path(
    post,
    path = "/v1/auth/refresh",
    tag = "auth",
    request_body(content = Option<RefreshBody>, description = "Omit the body to use the session cookie"),
    security((), ("session_cookie" = [])),
    responses(
        (status = 200, description = "A new pair; the old refresh token dies", body = TokenPair,
            headers(("set-cookie" = String, description = "The session cookie (HttpOnly)"))),
        (status = 401, description = "Dead, reused or missing refresh token (`invalid_token`)", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn refresh(
    State(state): State<AppState>,
    Meta(meta): Meta,
    req: Request,
) -> Result<Response, Problem> {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, super::BODY_LIMIT)
        .await
        .map_err(|_| {
            Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "request body is larger than 1 MiB",
            )
        })?;
    let token = if bytes.iter().all(u8::is_ascii_whitespace) {
        cookie_value(&parts, state.settings.session_cookie_name())
            .ok_or(ServiceError::InvalidToken)?
    } else {
        super::extract::parse_json::<RefreshBody>(&bytes)?.refresh_token
    };
    let tokens = state.identity.refresh(&meta, &token).await?;
    Ok(token_response(&state, tokens))
}

/// Revokes the caller's session and clears the cookie.
#[utoipa::path(
    post,
    path = "/v1/auth/logout",
    tag = "auth",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 204, description = "Session revoked")),
)]
async fn logout(
    State(state): State<AppState>,
    Meta(meta): Meta,
    Authenticated(caller): Authenticated,
) -> Result<Response, ServiceError> {
    state.identity.logout(&caller, &meta).await?;
    let mut res = StatusCode::NO_CONTENT.into_response();
    res.headers_mut()
        .insert(SET_COOKIE, clear_session_cookie(&state.settings));
    Ok(res)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    #[schema(example = "client_credentials")]
    grant_type: String,
    client_id: String,
    client_secret: String,
    /// Accepted for OAuth compatibility; the token carries the client's scopes.
    #[allow(dead_code)]
    scope: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
struct ServiceTokenBody {
    access_token: String,
    #[schema(example = "Bearer")]
    token_type: &'static str,
    expires_in: u64,
    /// The client's scopes, space-separated (OAuth 2.0).
    #[schema(example = "auth:verify users:read")]
    scope: String,
}

/// Client credentials, as a form (RFC 6749) or JSON.
#[utoipa::path(
    post,
    path = "/v1/auth/token",
    tag = "auth",
    request_body(content(
        (TokenBody = "application/json"),
        (TokenBody = "application/x-www-form-urlencoded"),
    )),
    responses(
        (status = 200, description = "A service JWT", body = ServiceTokenBody),
        (status = 401, description = "Unknown client or wrong secret (`invalid_client`)", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn token(State(state): State<AppState>, req: Request) -> Result<Response, Problem> {
    let is_form = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let body: TokenBody = if is_form {
        let bytes = Bytes::from_request(req, &state)
            .await
            .map_err(super::extract::body_problem)?;
        super::extract::parse_urlencoded(&bytes, "body")?
    } else {
        Json::<TokenBody>::from_request(req, &state).await?.0
    };
    if body.grant_type != "client_credentials" {
        return Err(Problem::validation(vec![FieldError::new(
            "grant_type",
            "unsupported",
            "grant_type must be client_credentials",
        )]));
    }
    let t = state
        .identity
        .issue_service_token(&body.client_id, body.client_secret)
        .await?;
    let mut res = axum::Json(ServiceTokenBody {
        access_token: t.access_token,
        token_type: "Bearer",
        expires_in: t.expires_in,
        scope: t.scope,
    })
    .into_response();
    res.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(res)
}

/// The JWKS document (RFC 7517) `GET /.well-known/jwks.json` answers.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
struct Jwks {
    /// Public JWKs: `kty`, `kid`, `alg`, `use` and the key parameters.
    keys: Vec<serde_json::Value>,
}

/// Public signing keys, so callers can verify access tokens locally.
#[utoipa::path(
    get,
    path = "/.well-known/jwks.json",
    tag = "auth",
    responses((status = 200, description = "Current and still-published previous keys", body = Jwks)),
)]
async fn jwks(State(state): State<AppState>) -> impl IntoResponse {
    let mut headers = HeaderMap::new();
    headers.insert(
        CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    (headers, axum::Json(state.identity.jwks().clone()))
}
