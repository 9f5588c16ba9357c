//! The browser edge of the gateway (DESIGN §9), one middleware around every route,
//! the fallbacks included: CORS for the allowed origins, and the security headers
//! every response carries, errors included.
//!
//! Written out rather than taken from `tower_http::cors`: that layer answers a
//! preflight from any origin with the allowed methods and headers (only the
//! `Access-Control-Allow-Origin` is left out), while the contract says an origin
//! outside the list gets no CORS headers at all.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::config::{Environment, Settings};

const ALLOW_METHODS: &str = "GET, POST, PUT, PATCH, DELETE";
const ALLOW_HEADERS: &str = "content-type, authorization, x-api-key, x-request-id";
/// Response headers a page may read besides the CORS-safelisted ones.
const EXPOSE_HEADERS: &str = "x-request-id, retry-after, www-authenticate";
/// How long a browser may reuse a preflight answer (seconds).
const MAX_AGE: &str = "600";

const CSP: &str = "default-src 'none'; frame-ancestors 'none'";
const HSTS: &str = "max-age=63072000; includeSubDomains";

/// What the middleware needs from the settings, read once at start.
#[derive(Clone)]
pub struct EdgePolicy(Arc<Inner>);

struct Inner {
    /// Exact origins (`scheme://host[:port]`, lowercase, no trailing slash).
    origins: Vec<String>,
    hsts: bool,
}

impl EdgePolicy {
    pub fn new(settings: &Settings) -> Self {
        let origins = settings
            .cors_origins()
            .into_iter()
            // `*` cannot go with credentials; staging and production refuse it.
            .filter(|o| o != "*")
            .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
            .collect();
        Self(Arc::new(Inner {
            origins,
            hsts: matches!(
                settings.app_env,
                Environment::Staging | Environment::Production
            ),
        }))
    }

    /// The request's `Origin` when it is on the allow list.
    fn allowed_origin(&self, headers: &HeaderMap) -> Option<HeaderValue> {
        let origin = headers.get(header::ORIGIN)?;
        let text = origin.to_str().ok()?;
        self.0
            .origins
            .iter()
            .any(|o| o.eq_ignore_ascii_case(text))
            .then(|| origin.clone())
    }
}

/// CORS and security headers. gRPC passes through untouched: browsers do not
/// speak it, and its trailers-only answers are no place for HTML-era headers.
pub async fn edge(State(policy): State<EdgePolicy>, req: Request, next: Next) -> Response {
    if super::is_grpc(req.headers()) {
        return next.run(req).await;
    }
    let origin = policy.allowed_origin(req.headers());
    let preflight = req.method() == Method::OPTIONS
        && req.headers().contains_key(header::ORIGIN)
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);

    let mut res = match (&origin, preflight) {
        (Some(_), true) => {
            let mut res = StatusCode::NO_CONTENT.into_response();
            let h = res.headers_mut();
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static(ALLOW_METHODS),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static(ALLOW_HEADERS),
            );
            h.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static(MAX_AGE),
            );
            res
        }
        // A preflight from elsewhere is routed like any request (no route takes
        // OPTIONS, so it is a 405 or 404) and gets no CORS headers.
        _ => next.run(req).await,
    };

    let h = res.headers_mut();
    if let Some(origin) = origin {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
        if !preflight {
            h.insert(
                header::ACCESS_CONTROL_EXPOSE_HEADERS,
                HeaderValue::from_static(EXPOSE_HEADERS),
            );
        }
    }
    // Whatever the origin: a cache must not serve one origin's answer to another.
    h.append(header::VARY, HeaderValue::from_static("origin"));
    security_headers(h, policy.0.hsts);
    res
}

fn security_headers(h: &mut HeaderMap, hsts: bool) {
    let fixed: [(HeaderName, &'static str); 4] = [
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::REFERRER_POLICY, "no-referrer"),
    ];
    for (name, value) in fixed {
        h.insert(name, HeaderValue::from_static(value));
    }
    if hsts {
        h.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static(HSTS),
        );
    }
    // Tokens, keys, secrets and personal data: nothing the gateway answers may be
    // stored by a browser or a shared cache, unless the handler said otherwise
    // (the JWKS and the OpenAPI document are public and cacheable).
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
}
