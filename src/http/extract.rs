//! Extractors that answer in problem+json: JSON bodies with unknown fields refused,
//! path ids that must be UUIDs, the client IP and user agent.

use std::net::{IpAddr, SocketAddr};

use axum::body::Bytes;
use axum::extract::path::ErrorKind;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use serde::de::DeserializeOwned;

use super::problem::Problem;
use super::AppState;
use crate::domain::network::{client_address, IpNetworks};
use crate::service::{FieldError, RequestMeta, ServiceError};

/// `axum::Json`, but every rejection is problem+json with a stable code, and a
/// body that does not fit the type names the JSON path of the field (`email`,
/// `scopes[1]`), never the value it carried.
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(req.headers()) {
            return Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "expected content-type: application/json",
            ));
        }
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(body_problem)?;
        Ok(Json(parse_json(&bytes)?))
    }
}

/// `application/json` or any `application/*+json`, parameters allowed.
fn is_json(headers: &HeaderMap) -> bool {
    let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// A body that could not be read: too large (413) or cut short.
pub fn body_problem(rej: BytesRejection) -> Problem {
    if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
        Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "request body is larger than 1 MiB",
        )
    } else {
        Problem::validation(vec![FieldError::new(
            "body",
            "invalid_body",
            "the request body could not be read",
        )])
    }
}

/// A JSON body into `T`; failures name the JSON path of the bad field.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ServiceError> {
    let invalid = |e: FieldError| ServiceError::Validation(vec![e]);
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let inner = e.inner();
        invalid(match inner.classify() {
            serde_json::error::Category::Data => field_error(e.path(), &inner.to_string()),
            _ => malformed_json(inner),
        })
    })?;
    de.end().map_err(|e| invalid(malformed_json(&e)))?;
    Ok(value)
}

/// Not JSON at all (or cut short): where, never what.
fn malformed_json(e: &serde_json::Error) -> FieldError {
    FieldError::new(
        "body",
        "invalid_json",
        format!(
            "the body is not well-formed JSON (line {}, column {})",
            e.line(),
            e.column()
        ),
    )
}

/// A query string or form body into `T`; failures name the bad field (`whole`
/// when the input as a whole is wrong).
pub fn parse_urlencoded<T: DeserializeOwned>(input: &[u8], whole: &str) -> Result<T, ServiceError> {
    let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(input));
    serde_path_to_error::deserialize(de).map_err(|e| {
        let mut fe = field_error(e.path(), &e.inner().to_string());
        if fe.field == "body" {
            fe.field = whole.to_string();
        }
        ServiceError::Validation(vec![fe])
    })
}

/// Longest field path echoed back (a client chooses unknown keys' names).
const MAX_FIELD_LEN: usize = 128;

/// One failure from serde's message, rewritten so that only the field's path, the
/// kind of failure and what was expected remain: serde's own text quotes the value
/// (`invalid type: integer `12345`, expected a string`).
fn field_error(path: &serde_path_to_error::Path, message: &str) -> FieldError {
    let path = path.to_string();
    let path = if path == "." { String::new() } else { path };
    // serde_json appends " at line L column C"; the position is not the field.
    let message = match message.rfind(" at line ") {
        Some(i) => &message[..i],
        None => message,
    };
    let quoted = |prefix: &str| {
        message
            .strip_prefix(prefix)
            .and_then(|rest| rest.split('`').next())
            .map(str::to_string)
    };
    // "expected struct LoginBody": the Rust type's name is no business of clients.
    let expected = message.split_once(", expected ").map(|(_, e)| {
        if e.starts_with("struct ") || e.starts_with("a map") {
            "expected an object".to_string()
        } else {
            format!("expected {e}")
        }
    });
    let join = |name: &str| {
        let segs = path.rsplit('.').next().unwrap_or("");
        if path.is_empty() {
            name.to_string()
        } else if segs == name {
            path.clone()
        } else {
            format!("{path}.{name}")
        }
    };
    let (field, code, text) = if let Some(name) = quoted("missing field `") {
        (join(&name), "required", "is required".to_string())
    } else if let Some(name) = quoted("unknown field `") {
        (
            join(&name),
            "unknown_field",
            "is not a known field".to_string(),
        )
    } else if let Some(name) = quoted("duplicate field `") {
        (
            join(&name),
            "duplicate_field",
            "is given more than once".to_string(),
        )
    } else if path.is_empty() {
        // The body as a whole (an array, a string …) where an object belongs.
        (
            path.clone(),
            "invalid_type",
            "expected an object".to_string(),
        )
    } else if message.starts_with("invalid type: ") {
        let text = expected.unwrap_or_else(|| "has the wrong type".into());
        (path.clone(), "invalid_type", text)
    } else if message.starts_with("invalid value: ")
        || message.starts_with("invalid length ")
        || message.starts_with("unknown variant `")
    {
        let text = expected.unwrap_or_else(|| "is not a valid value".into());
        (path.clone(), "invalid", text)
    } else {
        // A type's own parser (dates, UUIDs …) may quote the input: say no more.
        (path.clone(), "invalid", "is not a valid value".to_string())
    };
    let mut field = if field.is_empty() {
        "body".to_string()
    } else {
        field
    };
    if field.len() > MAX_FIELD_LEN {
        let mut end = MAX_FIELD_LEN;
        while !field.is_char_boundary(end) {
            end -= 1;
        }
        field.truncate(end);
    }
    FieldError::new(field, code, text)
}

/// A path parameter that must parse (e.g. as a UUID); a bad one is a 404, since
/// no such resource can exist. A handler asking for parameters its route does
/// not have is a programming error: logged, and the generic `internal` problem
/// (never axum's text).
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
            Err(PathRejection::FailedToDeserializePathParams(e))
                if !matches!(
                    e.kind(),
                    ErrorKind::WrongNumberOfParameters { .. } | ErrorKind::UnsupportedType { .. }
                ) =>
            {
                Err(Problem::not_found())
            }
            Err(e) => Err(ServiceError::Internal(anyhow::anyhow!(
                "path parameters of {}: {}",
                parts.uri.path(),
                e.body_text()
            ))
            .into()),
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

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or("");
        Ok(Query(parse_urlencoded(query.as_bytes(), "query")?))
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
        Ok(Meta(request_meta(parts, &state.config.trusted_proxies)))
    }
}

pub fn request_meta(parts: &Parts, trusted_proxies: &IpNetworks) -> RequestMeta {
    RequestMeta {
        ip: client_ip(parts, trusted_proxies),
        user_agent: parts
            .headers
            .get(axum::http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|s| crate::service::bounded(s, 512)),
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

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        name: String,
        scopes: Vec<String>,
        #[serde(default)]
        limits: Option<Inner>,
        #[serde(default)]
        role: Option<Role>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        per_minute: u32,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "lowercase")]
    enum Role {
        Viewer,
        Trader,
    }

    fn failure(body: &str) -> (String, &'static str, String) {
        let p = Problem::from(parse_json::<Outer>(body.as_bytes()).unwrap_err());
        let e = p.errors.unwrap().remove(0);
        let text = format!("{} {} {}", p.detail, e.field, e.message);
        assert!(!text.contains("SECRET"), "value leaked: {text}");
        (e.field, e.code, e.message)
    }

    #[test]
    fn failures_name_the_path_and_never_the_value() {
        let cases = [
            (r#"{"name": 7, "scopes": []}"#, "name", "invalid_type"),
            (
                r#"{"name": "n", "scopes": ["a", 1234]}"#,
                "scopes[1]",
                "invalid_type",
            ),
            (r#"{"scopes": ["SECRET"]}"#, "name", "required"),
            (
                r#"{"name": "SECRET", "scopes": [], "api_secret": 1}"#,
                "api_secret",
                "unknown_field",
            ),
            (
                r#"{"name": "n", "scopes": [], "limits": {}}"#,
                "limits.per_minute",
                "required",
            ),
            (
                r#"{"name": "n", "scopes": [], "limits": "SECRET"}"#,
                "limits",
                "invalid_type",
            ),
            (
                r#"{"name": "n", "scopes": [], "limits": {"per_minute": "SECRET"}}"#,
                "limits.per_minute",
                "invalid_type",
            ),
            (
                r#"{"name": "n", "scopes": [], "limits": {"per_minute": 1, "x": "SECRET"}}"#,
                "limits.x",
                "unknown_field",
            ),
            (
                r#"{"name": "n", "scopes": [], "role": "SECRET"}"#,
                "role",
                "invalid",
            ),
            (r#"["SECRET"]"#, "body", "invalid_type"),
            (r#"{"name": "SECRET", "#, "body", "invalid_json"),
            (
                r#"{"name": "n", "scopes": []} "SECRET""#,
                "body",
                "invalid_json",
            ),
        ];
        for (body, field, code) in cases {
            let got = failure(body);
            assert_eq!((got.0.as_str(), got.1), (field, code), "{body}: {got:?}");
        }
        // The unknown key's name is the field; it is not the value, yet a long one
        // is cut so a client cannot make the answer grow with it.
        let long = format!(
            r#"{{"name": "n", "scopes": [], "{}": 1}}"#,
            "k".repeat(5000)
        );
        assert!(failure(&long).0.len() <= MAX_FIELD_LEN);
        // What was expected is kept: it comes from the type, not the input.
        assert_eq!(
            failure(r#"{"name": 7, "scopes": []}"#).2,
            "expected a string"
        );
        let inner = failure(r#"{"name": "n", "scopes": [], "limits": 1}"#).2;
        assert_eq!(inner, "expected an object");
        assert!(failure(r#"{"name": "n", "scopes": [], "role": "x"}"#)
            .2
            .contains("`viewer`"));
    }

    #[test]
    fn query_strings_name_the_parameter() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Q {
            limit: Option<u32>,
        }
        let p = Problem::from(parse_urlencoded::<Q>(b"limit=SECRET", "query").unwrap_err());
        let e = &p.errors.as_ref().unwrap()[0];
        assert_eq!((e.field.as_str(), e.code), ("limit", "invalid"));
        assert!(!format!("{p:?}").contains("SECRET"));
    }

    /// A route whose handler asks for a path parameter the route does not
    /// have is a programming error: it answers the generic `internal`
    /// problem, never axum's own text.
    #[tokio::test]
    async fn a_path_rejection_other_than_a_bad_value_is_a_generic_internal_problem() {
        use tower::ServiceExt;

        async fn handler(Path(_id): Path<uuid::Uuid>) -> &'static str {
            "unreachable"
        }
        // A route without parameters (wrong number of parameters) and a
        // fallback (no parameters at all).
        let router = axum::Router::new()
            .route("/no-params", axum::routing::get(handler))
            .fallback(handler);
        for uri in ["/no-params", "/elsewhere"] {
            let res = router
                .clone()
                .oneshot(
                    axum::http::Request::get(uri)
                        .body(axum::body::Body::empty())
                        .unwrap(),
                )
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR, "{uri}");
            assert_eq!(
                res.headers()[header::CONTENT_TYPE],
                "application/problem+json"
            );
            let body = axum::body::to_bytes(res.into_body(), 4096).await.unwrap();
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(body["code"], "internal", "{uri}");
            assert_eq!(body["detail"], "internal error", "{uri}: {body}");
        }
    }
}
