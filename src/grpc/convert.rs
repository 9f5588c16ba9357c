//! The one place proto messages meet domain and service types (qdrant's
//! `conversions.rs`): `From` for what goes out, `TryFrom` for what comes in, so
//! the adapters only call a service between two conversions. Every id field goes
//! through `Uuid::try_from(IdField)`: a malformed one answers INVALID_ARGUMENT
//! `<field>: must be a UUID` on every RPC, a well-formed unknown one is the
//! service's NOT_FOUND (DESIGN §9).

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use tonic::{Request, Status};
use uuid::Uuid;

use crate::domain::account::{
    Access, AccountAccess, BrokerCredentials, Permission, TradingAccount,
};
use crate::domain::policy::Decision;
use crate::domain::user::User;
use crate::proto;
use crate::proto::VerifyReason;
use crate::service::api_keys::{VerifiedKey, VerifyFailure, VerifyRequest};
use crate::service::sessions::{TokenRefusal, TokenVerification};
use crate::service::{bounded, Caller, RequestMeta};

// ---- inbound ---------------------------------------------------------------------

/// An id as a request carries it, with the field's name for the error.
pub struct IdField<'a>(pub &'static str, pub &'a str);

impl TryFrom<IdField<'_>> for Uuid {
    type Error = Status;

    fn try_from(IdField(field, raw): IdField<'_>) -> Result<Self, Status> {
        Uuid::parse_str(raw)
            .map_err(|_| Status::invalid_argument(format!("{field}: must be a UUID")))
    }
}

/// An optional id: absent or blank is `None`, anything else must be a UUID.
fn optional_id(field: &'static str, raw: Option<&str>) -> Result<Option<Uuid>, Status> {
    match raw.map(str::trim) {
        None | Some("") => Ok(None),
        Some(s) => Uuid::try_from(IdField(field, s)).map(Some),
    }
}

/// `read`, `trade` or `manage`; anything else is INVALID_ARGUMENT.
fn permission(raw: &str) -> Result<Permission, Status> {
    Permission::parse(raw)
        .map_err(|e| Status::invalid_argument(format!("permission: {}", e.message)))
}

/// CheckAccountAccess, parsed.
pub struct AccessQuery {
    pub user_id: Uuid,
    pub account_id: Uuid,
    pub permission: Permission,
}

impl TryFrom<&proto::CheckAccountAccessRequest> for AccessQuery {
    type Error = Status;

    fn try_from(r: &proto::CheckAccountAccessRequest) -> Result<Self, Status> {
        // Field order as before: a bad permission is reported before bad ids.
        let permission = permission(&r.permission)?;
        Ok(Self {
            user_id: IdField("user_id", &r.user_id).try_into()?,
            account_id: IdField("account_id", &r.account_id).try_into()?,
            permission,
        })
    }
}

/// VerifyApiKey, parsed: the presented key and what the caller asks of it.
pub struct KeyCheck {
    pub api_key: String,
    pub request: VerifyRequest,
}

impl TryFrom<proto::VerifyApiKeyRequest> for KeyCheck {
    type Error = Status;

    fn try_from(r: proto::VerifyApiKeyRequest) -> Result<Self, Status> {
        let client_ip = match r.client_ip.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(s) => Some(
                s.parse::<IpAddr>()
                    .map_err(|_| Status::invalid_argument("client_ip: must be an IP address"))?,
            ),
        };
        Ok(Self {
            request: VerifyRequest {
                client_ip,
                required_scopes: r.required_scopes,
                trading_account_id: optional_id(
                    "trading_account_id",
                    r.trading_account_id.as_deref(),
                )?,
            },
            api_key: r.api_key,
        })
    }
}

/// Where a gRPC call came from, for audit rows and rate limits.
impl<T> From<&Request<T>> for RequestMeta {
    fn from(req: &Request<T>) -> Self {
        let header = |name: &str| {
            req.metadata()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(|s| bounded(s, 512))
        };
        RequestMeta {
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
}

/// The service client the interceptor authenticated; UNAUTHENTICATED without one.
/// Which scope a method needs is decided (and a refusal audited) by the service.
impl<T> TryFrom<&Request<T>> for Caller {
    type Error = Status;

    fn try_from(req: &Request<T>) -> Result<Self, Status> {
        req.extensions()
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("missing service token"))
    }
}

// ---- outbound --------------------------------------------------------------------

/// A point in time as protobuf carries it. A function, not a `From`: both types are
/// foreign to this crate.
pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// The wire form of a user (never the password hash: the domain type has none).
impl From<&User> for proto::User {
    fn from(u: &User) -> Self {
        Self {
            id: u.id.to_string(),
            email: u.email.clone(),
            full_name: u.full_name.clone(),
            roles: u.roles.iter().map(|r| r.as_str().into()).collect(),
            status: u.status.as_str().into(),
            created_at: Some(timestamp(u.created_at)),
            email_verified: u.email_verified,
        }
    }
}

/// Credentials have no place in `TradingAccount`; only GetBrokerCredentials
/// carries them.
impl From<&TradingAccount> for proto::TradingAccount {
    fn from(a: &TradingAccount) -> Self {
        Self {
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
}

impl From<&AccountAccess> for proto::AccountAccess {
    fn from(a: &AccountAccess) -> Self {
        Self {
            account: Some((&a.account).into()),
            access: a.access.as_str().into(),
            permissions: a.permissions().iter().map(|p| p.as_str().into()).collect(),
        }
    }
}

impl From<BrokerCredentials> for proto::BrokerCredentials {
    fn from(c: BrokerCredentials) -> Self {
        Self {
            api_key: c.api_key,
            api_secret: c.api_secret,
            access_token: c.access_token.unwrap_or_default(),
        }
    }
}

/// CheckAccountAccess's answer: the decision and, when the user has any, their access.
impl From<(Decision, Option<Access>)> for proto::CheckAccountAccessResponse {
    fn from((decision, access): (Decision, Option<Access>)) -> Self {
        Self {
            allowed: decision.allowed,
            access: access.map(|a| a.as_str().to_string()).unwrap_or_default(),
            decided_by: decision.decided_by,
        }
    }
}

impl From<Decision> for proto::CheckPermissionResponse {
    fn from(d: Decision) -> Self {
        Self {
            allowed: d.allowed,
            decided_by: d.decided_by,
        }
    }
}

/// The accounts of a verified token or key.
pub fn accounts<'a>(
    list: impl IntoIterator<Item = &'a AccountAccess>,
) -> Vec<proto::AccountAccess> {
    list.into_iter().map(proto::AccountAccess::from).collect()
}

impl From<TokenRefusal> for VerifyReason {
    fn from(r: TokenRefusal) -> Self {
        match r {
            TokenRefusal::Invalid => VerifyReason::InvalidToken,
            TokenRefusal::Expired => VerifyReason::Expired,
            TokenRefusal::SessionRevoked => VerifyReason::SessionRevoked,
            TokenRefusal::UserDisabled => VerifyReason::UserDisabled,
        }
    }
}

impl From<VerifyFailure> for VerifyReason {
    fn from(f: VerifyFailure) -> Self {
        match f {
            VerifyFailure::NotFound => VerifyReason::NotFound,
            VerifyFailure::Malformed => VerifyReason::Malformed,
            VerifyFailure::Expired => VerifyReason::Expired,
            VerifyFailure::Revoked => VerifyReason::Revoked,
            VerifyFailure::UserDisabled => VerifyReason::UserDisabled,
            VerifyFailure::IpNotAllowed => VerifyReason::IpNotAllowed,
            VerifyFailure::InsufficientScope => VerifyReason::InsufficientScope,
            VerifyFailure::AccountNotAllowed => VerifyReason::AccountNotAllowed,
            VerifyFailure::RateLimited { .. } => VerifyReason::RateLimited,
            VerifyFailure::WrongEnvironment => VerifyReason::WrongEnvironment,
        }
    }
}

/// A refused token is an answer (valid=false, reason), not an error.
impl From<TokenVerification> for proto::VerifyTokenResponse {
    fn from(v: TokenVerification) -> Self {
        match v {
            TokenVerification::Valid {
                user,
                accounts: list,
                session_id,
                expires_at,
                amr,
                auth_time,
            } => Self {
                valid: true,
                reason: VerifyReason::Unspecified as i32,
                accounts: accounts(list.iter()),
                user: Some(user.as_ref().into()),
                session_id: session_id.to_string(),
                expires_at: Some(prost_types::Timestamp {
                    seconds: expires_at,
                    nanos: 0,
                }),
                amr: amr.to_vec(),
                auth_time: Some(prost_types::Timestamp {
                    seconds: auth_time,
                    nanos: 0,
                }),
            },
            TokenVerification::Refused(r) => Self {
                valid: false,
                reason: VerifyReason::from(r) as i32,
                ..Default::default()
            },
        }
    }
}

/// VerifyApiKey's answer: a refused key is valid=false with its reason. `account`
/// is the request's `trading_account_id`: the key's scopes are reported as they
/// hold there.
pub fn key_verification(
    answer: Result<&VerifiedKey, VerifyFailure>,
    account: Option<Uuid>,
) -> proto::VerifyApiKeyResponse {
    match answer {
        Ok(k) => proto::VerifyApiKeyResponse {
            valid: true,
            reason: VerifyReason::Unspecified as i32,
            user: Some(k.user.as_ref().into()),
            key: Some(proto::ApiKey {
                id: k.key.id.to_string(),
                name: k.key.name.to_string(),
                prefix: k.key.prefix.to_string(),
                scopes: k.scopes_for(account),
                expires_at: k.key.expires_at.map(timestamp),
            }),
            accounts: accounts(&k.accounts),
        },
        Err(f) => proto::VerifyApiKeyResponse {
            valid: false,
            reason: VerifyReason::from(f) as i32,
            ..Default::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_id_field_fails_the_same_way() {
        for field in ["user_id", "account_id", "trading_account_id"] {
            for raw in ["", "nope", "123", "0000"] {
                let err = Uuid::try_from(IdField(field, raw)).unwrap_err();
                assert_eq!(err.code(), tonic::Code::InvalidArgument);
                assert_eq!(err.message(), format!("{field}: must be a UUID"));
            }
        }
        let id = Uuid::new_v4();
        assert_eq!(
            Uuid::try_from(IdField("user_id", &id.to_string())).unwrap(),
            id
        );
        assert_eq!(optional_id("trading_account_id", Some("  ")).unwrap(), None);
        assert_eq!(optional_id("trading_account_id", None).unwrap(), None);
        assert_eq!(
            optional_id("trading_account_id", Some(&id.to_string())).unwrap(),
            Some(id)
        );
    }

    #[test]
    fn timestamps_keep_nanoseconds() {
        let t = DateTime::from_timestamp(1_700_000_000, 123_456_789).unwrap();
        let ts = timestamp(t);
        assert_eq!((ts.seconds, ts.nanos), (1_700_000_000, 123_456_789));
    }
}
