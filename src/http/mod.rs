//! The JSON gateway (axum): adapters only. Each handler parses wire input, calls a
//! service with the `Caller`, and turns the result (or ServiceError) into JSON.

pub mod accounts;
pub mod admin_audit;
pub mod api_keys;
pub mod auth;
pub mod auth_api;
pub mod edge;
pub mod extract;
pub mod health;
pub mod invitations;
pub mod list;
pub mod metrics;
pub mod mfa;
pub mod network;
pub mod observe;
pub mod openapi;
pub mod passkeys;
pub mod problem;
pub mod recovery;
pub mod users;

use std::ops::Deref;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use secrecy::SecretString;
use tokio_util::task::TaskTracker;

use crate::config::{Environment, Settings};
use crate::domain::network::IpNetworks;
use crate::service::Services;
use crate::shutdown::Shutdown;
use problem::Problem;

/// What the gateway's handlers reach: the services (through `Deref`), the
/// settings the gateway itself answers with, and the shutdown signal (health
/// says `unavailable` while draining). No store: health and metrics read the
/// services' probe. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    services: Arc<Services>,
    pub config: Arc<HttpConfig>,
    pub shutdown: Shutdown,
    /// Work a request starts and the process waits for at exit (a password
    /// reset request's lookup and message, issue 15).
    pub tasks: TaskTracker,
}

impl AppState {
    pub fn new(
        services: Services,
        config: HttpConfig,
        shutdown: Shutdown,
        tasks: TaskTracker,
    ) -> Self {
        Self {
            services: Arc::new(services),
            config: Arc::new(config),
            shutdown,
            tasks,
        }
    }
}

impl Deref for AppState {
    type Target = Services;
    fn deref(&self) -> &Services {
        &self.services
    }
}

/// The settings the gateway answers with, read once at start.
pub struct HttpConfig {
    pub environment: Environment,
    /// Whose X-Forwarded-For is believed (client IPs for audit rows and limits).
    pub trusted_proxies: IpNetworks,
    pub cookie: CookieConfig,
    /// Opens /metrics to remote scrapers that present it.
    pub metrics_token: Option<SecretString>,
}

/// The session cookie: its name, attributes and lifetime.
pub struct CookieConfig {
    pub name: &'static str,
    pub same_site: &'static str,
    pub secure: bool,
    /// REFRESH_TOKEN_TTL_SECONDS: the cookie holds the refresh token.
    pub max_age_secs: u64,
}

impl HttpConfig {
    pub fn from_settings(settings: &Settings) -> Self {
        Self {
            environment: settings.app_env,
            trusted_proxies: settings.trusted_proxies.clone(),
            cookie: CookieConfig {
                name: settings.session_cookie_name(),
                same_site: settings.session_cookie_samesite.as_str(),
                secure: settings.session_cookie_secure,
                max_age_secs: settings.refresh_token_ttl_seconds,
            },
            metrics_token: settings.metrics_token.clone(),
        }
    }
}

/// Request bodies over 1 MiB are refused with 413.
pub const BODY_LIMIT: usize = 1024 * 1024;

/// The gateway's routes (no fallback: the app adds one that answers by protocol,
/// and wraps everything in [`edge::edge`] for CORS and the security headers).
pub fn routes(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health::health))
        .route("/health/live", get(health::live))
        .route("/metrics", get(metrics::metrics))
        .route("/openapi.json", get(openapi::openapi_json))
        .merge(auth_api::routes())
        .merge(accounts::routes())
        .merge(admin_audit::routes())
        .merge(api_keys::routes())
        .merge(invitations::routes())
        .merge(passkeys::routes())
        .merge(users::routes())
        .merge(recovery::routes())
        .merge(mfa::routes())
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// Whether a request speaks gRPC (its content type): gRPC answers in its own
/// protocol, with a status in trailers rather than problem+json.
pub fn is_grpc(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// What matches no route answers by protocol: gRPC UNIMPLEMENTED for gRPC
/// requests, problem+json 404 otherwise.
pub async fn fallback(req: Request) -> Response {
    if is_grpc(req.headers()) {
        return tonic::Status::unimplemented(format!("unknown method {}", req.uri().path()))
            .into_http::<axum::body::Body>()
            .into_response();
    }
    let mut p = Problem::not_found();
    if req.method() != Method::GET && req.method() != Method::HEAD {
        p.detail = format!("no route for {} {}", req.method(), req.uri().path());
    }
    p.into_response()
}

/// 405 in the same problem+json shape.
pub async fn method_not_allowed() -> Response {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this resource",
    )
    .into_response()
}
