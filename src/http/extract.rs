//! Extractors that answer in problem+json: JSON bodies with unknown fields refused,
//! path ids that must be UUIDs, the client IP and user agent.

use std::net::{IpAddr, SocketAddr};

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::problem::Problem;
use super::AppState;
use crate::domain::network::{client_address, IpNetworks};
use crate::service::{FieldError, RequestMeta};

/// `axum::Json`, but every rejection is problem+json with a stable code.
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Json(v)),
            Err(rej) => Err(json_problem(rej)),
        }
    }
}

pub fn json_problem(rej: JsonRejection) -> Problem {
    match rej {
        JsonRejection::MissingJsonContentType(_) => Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "expected content-type: application/json",
        ),
        JsonRejection::BytesRejection(b) if b.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "request body is larger than 1 MiB",
            )
        }
        JsonRejection::JsonDataError(e) => {
            // serde's message names the field ("unknown field `x`", "missing field `y`").
            let msg = e.body_text();
            let field = field_from_serde_message(&msg);
            Problem::validation(vec![FieldError::new(field, "invalid", msg)])
        }
        other => Problem::validation(vec![FieldError::new(
            "body",
            "invalid_json",
            other.body_text(),
        )]),
    }
}

/// Pulls the field name out of serde's "unknown field `x`" / "missing field `y`" /
/// "name: invalid type" messages, so clients learn which field failed.
fn field_from_serde_message(msg: &str) -> String {
    if let Some(start) = msg.find('`') {
        if let Some(len) = msg[start + 1..].find('`') {
            return msg[start + 1..start + 1 + len].to_string();
        }
    }
    // "Failed to deserialize the JSON body into the target type: scopes[0]: ..."
    if let Some(rest) = msg.split(": ").nth(1) {
        if !rest.contains(' ') {
            return rest.to_string();
        }
    }
    "body".into()
}

/// A path parameter that must parse (e.g. as a UUID); a bad one is a 404, since
/// no such resource can exist.
pub struct Path<T>(pub T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(Path(v)),
            Err(PathRejection::FailedToDeserializePathParams(_)) => Err(Problem::not_found()),
            Err(e) => Err(Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                e.body_text(),
            )),
        }
    }
}

/// Query string with problem+json rejections.
pub struct Query<T>(pub T);

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Query(v)),
            Err(QueryRejection::FailedToDeserializeQueryString(e)) => {
                let msg = e.body_text();
                Err(Problem::validation(vec![FieldError::new(
                    field_from_serde_message(&msg),
                    "invalid",
                    msg,
                )]))
            }
            Err(e) => Err(Problem::validation(vec![FieldError::new(
                "query",
                "invalid",
                e.body_text(),
            )])),
        }
    }
}

/// Client IP (X-Forwarded-For only from TRUSTED_PROXIES) and user agent.
pub struct Meta(pub RequestMeta);

impl FromRequestParts<AppState> for Meta {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        Ok(Meta(request_meta(parts, &state.settings.trusted_proxies)))
    }
}

pub fn request_meta(parts: &Parts, trusted_proxies: &IpNetworks) -> RequestMeta {
    RequestMeta {
        ip: client_ip(parts, trusted_proxies),
        user_agent: parts
            .headers
            .get(axum::http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.chars().take(512).collect()),
        request_id: parts
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    }
}

/// The caller's address: the peer, or, when the peer is one of TRUSTED_PROXIES,
/// the client it names in X-Forwarded-For (see `domain::network::client_address`).
pub fn client_ip(parts: &Parts, trusted_proxies: &IpNetworks) -> Option<IpAddr> {
    client_ip_of(&parts.extensions, &parts.headers, trusted_proxies)
}

/// `client_ip` from a request's extensions (the peer) and headers.
pub fn client_ip_of(
    extensions: &axum::http::Extensions,
    headers: &axum::http::HeaderMap,
    trusted_proxies: &IpNetworks,
) -> Option<IpAddr> {
    let peer = extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())?;
    let forwarded = headers.get("x-forwarded-for").and_then(|v| v.to_str().ok());
    Some(client_address(peer, forwarded, trusted_proxies))
}
