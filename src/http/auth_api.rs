//! /v1/auth/* and the JWKS document: translate wire bodies, call `Identity`.

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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterBody {
    email: String,
    password: String,
    full_name: String,
}

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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginBody {
    email: String,
    password: String,
}

#[derive(Serialize)]
struct TokenPair {
    access_token: String,
    refresh_token: String,
    token_type: &'static str,
    expires_in: u64,
    user: User,
}

/// The login-shaped body plus the session cookie; never cached.
fn token_response(state: &AppState, t: LoginTokens) -> Response {
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RefreshBody {
    refresh_token: String,
}

/// `{refresh_token}` in the body, or (no body) the session cookie.
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
        serde_json::from_slice::<RefreshBody>(&bytes)
            .map_err(|e| {
                Problem::validation(vec![FieldError::new("body", "invalid", e.to_string())])
            })?
            .refresh_token
    };
    let tokens = state.identity.refresh(&meta, &token).await?;
    Ok(token_response(&state, tokens))
}

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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    grant_type: String,
    client_id: String,
    client_secret: String,
    /// Accepted for OAuth compatibility; the token carries the client's scopes.
    #[allow(dead_code)]
    scope: Option<String>,
}

#[derive(Serialize)]
struct ServiceTokenBody {
    access_token: String,
    token_type: &'static str,
    expires_in: u64,
    scope: String,
}

/// Client credentials, as a form (RFC 6749) or JSON.
async fn token(State(state): State<AppState>, req: Request) -> Result<Response, Problem> {
    let is_form = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let body: TokenBody = if is_form {
        axum::Form::<TokenBody>::from_request(req, &state)
            .await
            .map_err(|e| {
                Problem::validation(vec![FieldError::new("body", "invalid", e.body_text())])
            })?
            .0
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

async fn jwks(State(state): State<AppState>) -> impl IntoResponse {
    let mut headers = HeaderMap::new();
    headers.insert(
        CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    (headers, axum::Json(state.identity.jwks().clone()))
}
