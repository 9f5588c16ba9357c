//! ALLOWED_CLIENT_NETWORKS at the door: a request from outside the allowed
//! networks is refused before any other work, in its own protocol — 403
//! `forbidden` problem+json, or gRPC PERMISSION_DENIED.

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::problem::Problem;
use crate::config::Settings;
use crate::domain::network::IpNetworks;

/// The client networks in force, parsed once.
#[derive(Clone)]
pub struct NetworkGuard {
    allowed: IpNetworks,
    trusted_proxies: IpNetworks,
}

impl NetworkGuard {
    pub fn new(settings: &Settings) -> Self {
        Self {
            allowed: settings.allowed_client_networks(),
            trusted_proxies: settings.trusted_proxies.clone(),
        }
    }
}

/// The client is the peer, or behind a trusted proxy the address it forwards
/// for (so an office allow-list still works behind the ingress).
pub async fn guard(State(g): State<NetworkGuard>, req: Request, next: Next) -> Response {
    if g.allowed.is_empty() {
        return next.run(req).await;
    }
    let client = super::extract::client_ip_of(req.extensions(), req.headers(), &g.trusted_proxies);
    match client {
        Some(ip) if g.allowed.contains(ip) => next.run(req).await,
        _ => {
            tracing::info!(client = ?client, path = req.uri().path(), "client network not allowed");
            refuse(&req)
        }
    }
}

fn refuse(req: &Request) -> Response {
    let detail = "your network may not reach this service";
    if super::is_grpc(req.headers()) {
        return tonic::Status::permission_denied(detail)
            .into_http::<axum::body::Body>()
            .into_response();
    }
    Problem::new(StatusCode::FORBIDDEN, "forbidden", detail).into_response()
}
