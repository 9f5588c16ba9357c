//! Who is calling the gateway: the `Authenticated` extractor turns a bearer access
//! token or the session cookie into a `Caller`; the session cookie helpers.

use axum::extract::FromRequestParts;
use axum::http::header::{AUTHORIZATION, COOKIE};
use axum::http::request::Parts;
use axum::http::HeaderValue;

use super::{AppState, CookieConfig};
use crate::service::{Caller, ServiceError};

/// An authenticated caller; a missing or bad credential is 401 `invalid_token`
/// with `WWW-Authenticate: Bearer`.
pub struct Authenticated(pub Caller);

impl FromRequestParts<AppState> for Authenticated {
    type Rejection = ServiceError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        // ---- X-API-Key branch (owned by the API-key helper) goes here ----
        // Checked first: a request that carries a key is authenticated by it.
        if let Some(value) = parts.headers.get("x-api-key") {
            let key = value.to_str().map_err(|_| ServiceError::InvalidToken)?;
            // Only the address: the rest of the request's metadata is not needed.
            let ip = super::extract::client_ip(parts, &state.config.trusted_proxies);
            let route = parts
                .extensions
                .get::<axum::extract::MatchedPath>()
                .map_or("unmatched", |m| m.as_str());
            let operation = format!("{} {}", parts.method, route);
            return state
                .api_keys
                .authenticate(key, ip, &operation)
                .await
                .map(Authenticated);
        }
        // ---- end of X-API-Key branch ----

        if let Some(value) = parts.headers.get(AUTHORIZATION) {
            let token = bearer_token(value).ok_or(ServiceError::InvalidToken)?;
            let grant = state.sessions.verify_access_token(token).await??;
            return Ok(Authenticated(grant.caller()));
        }
        if let Some(cookie) = cookie_value(parts, state.config.cookie.name) {
            return state
                .sessions
                .verify_session_cookie(&cookie)
                .await
                .map(Authenticated);
        }
        Err(ServiceError::InvalidToken)
    }
}

/// `Bearer <token>` (scheme case-insensitive, RFC 6750).
pub fn bearer_token(value: &HeaderValue) -> Option<&str> {
    let s = value.to_str().ok()?;
    let (scheme, token) = s.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The value of cookie `name`, from any `Cookie` header.
pub fn cookie_value(parts: &Parts, name: &str) -> Option<String> {
    parts
        .headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// `Set-Cookie` for the session: HttpOnly always, Secure and SameSite from the
/// environment's settings, host-only (`__Host-` prefix when Secure), Path=/.
pub fn session_cookie(cookie: &CookieConfig, value: &str, max_age_secs: u64) -> HeaderValue {
    let mut c = format!(
        "{}={}; Path=/; HttpOnly; SameSite={}; Max-Age={}",
        cookie.name, value, cookie.same_site, max_age_secs
    );
    if cookie.secure {
        c.push_str("; Secure");
    }
    HeaderValue::from_str(&c).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Expires the session cookie.
pub fn clear_session_cookie(cookie: &CookieConfig) -> HeaderValue {
    session_cookie(cookie, "", 0)
}
