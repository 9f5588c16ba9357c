//! GET /metrics: Prometheus text from the process recorder, with the store gauges
//! refreshed at scrape time. Open in development; elsewhere only to local callers or
//! with `Authorization: Bearer <METRICS_TOKEN>`, and a 404 to everyone else.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;

use super::problem::Problem;
use super::AppState;
use crate::config::Environment;

/// The exposition format Prometheus scrapes.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Prometheus metrics. Open in development; elsewhere only to loopback callers
/// (not proxied) or with `Authorization: Bearer <METRICS_TOKEN>`.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "ops",
    responses(
        (status = 200, description = "Prometheus text exposition format", body = String,
            content_type = "text/plain; version=0.0.4; charset=utf-8"),
        (status = 404, description = "Not allowed to scrape; answers as if absent (`not_found`)",
            body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn metrics(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let forwarded = headers.contains_key("x-forwarded-for") || headers.contains_key("forwarded");
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if !allowed(
        state.config.environment,
        peer.ip(),
        forwarded,
        bearer,
        state.config.metrics_token.as_ref(),
    ) {
        // 404, not 403: outside callers should not learn the endpoint exists.
        return Problem::not_found().into_response();
    }
    record_store_gauges(&state).await;
    let body = crate::telemetry::metrics_handle().render();
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE))],
        body,
    )
        .into_response()
}

/// Who may scrape. A loopback peer that forwards for someone else (Nginx on the same
/// host sets X-Forwarded-For) is not a local caller: without this, every request
/// through the proxy would look local.
pub fn allowed(
    env: Environment,
    peer: IpAddr,
    forwarded: bool,
    authorization: Option<&str>,
    token: Option<&SecretString>,
) -> bool {
    if env == Environment::Development {
        return true;
    }
    if is_loopback(peer) && !forwarded {
        return true;
    }
    match (token, authorization.and_then(|a| a.strip_prefix("Bearer "))) {
        (Some(expected), Some(given)) => {
            let expected = expected.expose_secret().as_bytes();
            !expected.is_empty() && bool::from(expected.ct_eq(given.trim().as_bytes()))
        }
        _ => false,
    }
}

/// 127.0.0.0/8, ::1, and IPv4-mapped loopback (a dual-stack listener reports
/// `::ffff:127.0.0.1`).
fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Pool occupancy and store reachability, sampled now so a scrape sees the present.
async fn record_store_gauges(state: &AppState) {
    let pool = state.probe.pool();
    metrics::gauge!("db_pool_connections", "state" => "idle").set(pool.idle as f64);
    metrics::gauge!("db_pool_connections", "state" => "in_use")
        .set(pool.size.saturating_sub(pool.idle) as f64);
    metrics::gauge!("db_pool_max_connections").set(pool.max as f64);
    let up = state.probe.check().await;
    metrics::gauge!("database_up").set(if up.database { 1.0 } else { 0.0 });
    metrics::gauge!("redis_up").set(if up.redis { 1.0 } else { 0.0 });
    metrics::gauge!("api_key_usage_buffer_depth").set(state.api_keys.usage_buffer().depth() as f64);
    metrics::gauge!(
        "user_service_build_info",
        "version" => env!("CARGO_PKG_VERSION"),
        "environment" => state.config.environment.as_str()
    )
    .set(1.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> SecretString {
        SecretString::from("s3cret-metrics-token")
    }

    #[test]
    fn development_is_open_to_anyone() {
        let remote: IpAddr = "203.0.113.9".parse().unwrap();
        assert!(allowed(Environment::Development, remote, true, None, None));
    }

    #[test]
    fn staging_allows_direct_loopback_callers_only() {
        for ip in ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(allowed(Environment::Staging, ip, false, None, None), "{ip}");
            // The same peer relaying for a client (Nginx) is not local.
            assert!(!allowed(Environment::Staging, ip, true, None, None), "{ip}");
        }
        for ip in ["10.0.0.5", "192.168.1.2", "::ffff:10.0.0.5", "2001:db8::1"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert!(
                !allowed(Environment::Production, ip, false, None, None),
                "{ip}"
            );
        }
    }

    #[test]
    fn a_matching_bearer_token_opens_it_from_anywhere() {
        let remote: IpAddr = "10.0.0.5".parse().unwrap();
        let t = token();
        let env = Environment::Production;
        assert!(allowed(
            env,
            remote,
            true,
            Some("Bearer s3cret-metrics-token"),
            Some(&t)
        ));
        assert!(!allowed(env, remote, true, Some("Bearer wrong"), Some(&t)));
        assert!(!allowed(
            env,
            remote,
            true,
            Some("s3cret-metrics-token"),
            Some(&t)
        ));
        assert!(!allowed(env, remote, true, Some("Bearer "), Some(&t)));
        // No token configured: no bearer opens it.
        assert!(!allowed(env, remote, false, Some("Bearer anything"), None));
        let empty = SecretString::from("");
        assert!(!allowed(env, remote, false, Some("Bearer "), Some(&empty)));
    }
}
