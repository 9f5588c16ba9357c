//! The JSON gateway (axum): adapters only. Each handler parses wire input, calls a
//! service with the `Caller`, and turns the result (or ServiceError) into JSON.

pub mod accounts;
pub mod admin_audit;
pub mod api_keys;
pub mod auth;
pub mod auth_api;
pub mod extract;
pub mod health;
pub mod invitations;
pub mod list;
pub mod metrics;
pub mod network;
pub mod observe;
pub mod openapi;
pub mod problem;
pub mod users;

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tower_http::cors::{AllowOrigin, CorsLayer};

pub use crate::app::AppState;
use problem::Problem;

/// Request bodies over 1 MiB are refused with 413.
pub const BODY_LIMIT: usize = 1024 * 1024;

/// The gateway's routes (no fallback: the app adds one that answers by protocol).
pub fn routes(state: AppState) -> Router {
    let cors = cors_layer(&state.settings.cors_origins());
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
        .merge(users::routes())
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(cors)
        .with_state(state)
}

fn cors_layer(origins: &[String]) -> CorsLayer {
    let origins: Vec<HeaderValue> = origins
        .iter()
        .filter(|o| o.as_str() != "*")
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_credentials(true)
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::HeaderName::from_static("x-api-key"),
            header::HeaderName::from_static("x-request-id"),
        ])
}

/// What matches no route answers by protocol: gRPC UNIMPLEMENTED for gRPC
/// requests, problem+json 404 otherwise.
pub async fn fallback(req: Request) -> Response {
    let is_grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if is_grpc {
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
