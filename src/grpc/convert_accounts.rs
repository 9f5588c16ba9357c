//! Trading accounts between the domain and the wire (proto). Credentials have no
//! place in `TradingAccount`; only GetBrokerCredentials carries them.

use uuid::Uuid;

use super::user::timestamp;
use crate::domain::account::{AccountAccess, BrokerCredentials, Permission, TradingAccount};
use crate::proto;

pub fn account_to_proto(a: &TradingAccount) -> proto::TradingAccount {
    proto::TradingAccount {
        id: a.id.to_string(),
        owner_user_id: a.owner_user_id.to_string(),
        broker: a.broker.clone(),
        broker_user_id: a.broker_user_id.clone(),
        nickname: a.nickname.clone(),
        status: a.status.as_str().into(),
        subscription_tier: a.subscription_tier.as_str().into(),
        subscription_status: a.subscription_status.as_str().into(),
        subscription_expires_at: a.subscription_expires_at.map(timestamp),
        has_credentials: a.has_credentials,
        credentials_updated_at: a.credentials_updated_at.map(timestamp),
        credentials_hint: a.credentials_hint.clone().unwrap_or_default(),
        created_at: Some(timestamp(a.created_at)),
    }
}

pub fn account_access_to_proto(a: &AccountAccess) -> proto::AccountAccess {
    proto::AccountAccess {
        account: Some(account_to_proto(&a.account)),
        access: a.access.as_str().into(),
        permissions: a.permissions().iter().map(|p| p.as_str().into()).collect(),
    }
}

pub fn credentials_to_proto(c: BrokerCredentials) -> proto::BrokerCredentials {
    proto::BrokerCredentials {
        api_key: c.api_key,
        api_secret: c.api_secret,
        access_token: c.access_token.unwrap_or_default(),
    }
}

/// An id field (`field` is its name in the request): a malformed one is
/// INVALID_ARGUMENT on every RPC, a well-formed unknown one is the service's
/// NOT_FOUND (DESIGN §9).
pub fn id(raw: &str, field: &'static str) -> Result<Uuid, tonic::Status> {
    Uuid::parse_str(raw)
        .map_err(|_| tonic::Status::invalid_argument(format!("{field}: must be a UUID")))
}

/// `read`, `trade` or `manage`; anything else is INVALID_ARGUMENT.
pub fn permission(raw: &str) -> Result<Permission, tonic::Status> {
    Permission::parse(raw)
        .map_err(|e| tonic::Status::invalid_argument(format!("permission: {}", e.message)))
}

/// Where a gRPC call came from, for audit rows.
pub fn request_meta<T>(req: &tonic::Request<T>) -> crate::service::RequestMeta {
    let header = |name: &str| {
        req.metadata()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.chars().take(512).collect::<String>())
    };
    crate::service::RequestMeta {
        ip: req.remote_addr().map(|a| a.ip()).or_else(|| {
            // Served through axum: the peer address is axum's ConnectInfo.
            req.extensions()
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|c| c.0.ip())
        }),
        user_agent: header("user-agent"),
        request_id: header("x-request-id"),
    }
}

/// The service client the interceptor authenticated. Which scope a method needs
/// is decided (and a refusal audited) by the service.
pub fn caller<T>(req: &tonic::Request<T>) -> Result<crate::service::Caller, tonic::Status> {
    req.extensions()
        .get::<crate::service::Caller>()
        .cloned()
        .ok_or_else(|| tonic::Status::unauthenticated("missing service token"))
}
