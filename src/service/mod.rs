//! The use cases both transports call. Every method takes the `Caller` (who is
//! asking, already authenticated by the transport) and decides; errors are one
//! `ServiceError`, mapped exhaustively to gRPC statuses and problem+json.

pub mod accounts;
pub mod api_key_usage;
pub mod api_keys;
pub mod audit;
pub mod audit_log;
mod graph;
pub mod import_users;
pub mod invalidation;
pub mod invitations;
pub mod lockout;
pub mod login;
pub mod mfa;
pub mod mfa_login;
pub mod notify;
pub mod paging;
pub mod passkeys;
pub mod policy;
pub mod recovery;
pub mod service_clients;
pub mod sessions;
pub mod swr;
pub mod throttle;
pub mod user_copies;
pub mod users;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use uuid::Uuid;

pub use graph::Services;

use crate::domain::user::Role;
/// Field-level validation failures are a domain notion (the domain's parsers
/// produce them); re-exported here, where every use case reports them.
pub use crate::domain::FieldError;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("validation failed")]
    Validation(Vec<FieldError>),
    /// Login failed; deliberately says nothing about why.
    #[error("invalid email or password")]
    InvalidCredentials,
    /// A missing, malformed, expired or revoked bearer token, cookie or API key.
    #[error("invalid or missing credentials")]
    InvalidToken,
    #[error("invalid client credentials")]
    InvalidClient,
    /// A wrong, used or expired second factor, or a dead `mfa_token` (401
    /// `invalid_credentials`, like a wrong password).
    #[error("invalid or expired second factor")]
    SecondFactorRefused,
    /// A step-up operation without a recent second factor (403 `mfa_required`),
    /// or by a user the policy requires to enrol one (403 `mfa_enrollment_required`).
    #[error("{}", step_up_message(*.0))]
    StepUp(crate::domain::mfa::StepUpRefusal),
    #[error("{0}")]
    Forbidden(String),
    /// A step-up operation refused until the user's email is verified
    /// (REQUIRE_VERIFIED_EMAIL): 403 `email_unverified`.
    #[error("verify your email address first")]
    EmailUnverified,
    /// `what` names the kind of thing ("trading account"), never whether it exists.
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("{0}")]
    Conflict(String),
    /// A conflict caused by one field: 409 naming it with code `taken` (DESIGN §9).
    #[error("{message}")]
    Taken {
        field: &'static str,
        message: String,
    },
    #[error("too many requests")]
    RateLimited { retry_after_secs: u64 },
    #[error("service unavailable: {0}")]
    Unavailable(String),
    /// Stored data failed an integrity check (e.g. a tampered ciphertext): fail
    /// closed, and do not retry. The string names what, never the data.
    #[error("integrity check failed: {0}")]
    Integrity(&'static str),
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ServiceError {
    pub fn validation(field: &str, code: &'static str, message: impl Into<String>) -> Self {
        Self::Validation(vec![FieldError::new(field, code, message)])
    }

    pub fn internal(e: impl Into<anyhow::Error>) -> Self {
        Self::Internal(e.into())
    }

    /// A password-hashing failure: 503 when the pool stayed full (come back
    /// later), 500 otherwise.
    pub fn hashing(e: anyhow::Error) -> Self {
        if e.is::<crate::crypto::password::Busy>() {
            Self::Unavailable("password hashing is busy".into())
        } else {
            Self::Internal(e)
        }
    }
}

impl From<crate::store::StoreError> for ServiceError {
    fn from(e: crate::store::StoreError) -> Self {
        match e {
            crate::store::StoreError::Conflict(what) => ServiceError::Conflict(what),
            crate::store::StoreError::Taken { field, message } => {
                ServiceError::Taken { field, message }
            }
            crate::store::StoreError::NotFound(what) => ServiceError::NotFound(what),
            crate::store::StoreError::Unavailable(msg) => ServiceError::Unavailable(msg),
            crate::store::StoreError::Other(e) => ServiceError::Internal(e),
        }
    }
}

pub type ServiceResult<T> = Result<T, ServiceError>;

fn step_up_message(r: crate::domain::mfa::StepUpRefusal) -> &'static str {
    match r {
        crate::domain::mfa::StepUpRefusal::MfaRequired => {
            "this operation needs a recent second factor: POST /v1/auth/step-up"
        }
        crate::domain::mfa::StepUpRefusal::EnrollmentRequired => {
            "enrol a second factor (POST /v1/users/me/mfa/totp) before this operation"
        }
    }
}

/// Where a request came from; recorded in audit rows and used by rate limits.
#[derive(Debug, Clone, Default)]
pub struct RequestMeta {
    pub ip: Option<IpAddr>,
    pub user_agent: Option<String>,
    pub request_id: Option<String>,
}

/// The first `max` characters of a request header kept for the audit log (user
/// agent, request id), copied once rather than pushed character by character:
/// both adapters build a `RequestMeta` on every call.
pub fn bounded(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((end, _)) => s[..end].to_owned(),
        None => s.to_owned(),
    }
}

/// An API key's grant when a user acts through a key rather than a session.
#[derive(Debug, Clone)]
pub struct KeyGrant {
    pub key_id: Uuid,
    pub scopes: Vec<String>,
    /// Empty means every account the user can access.
    pub trading_account_ids: Vec<Uuid>,
}

/// Who is asking, as established by a transport.
#[derive(Debug, Clone)]
pub enum Caller {
    User {
        user_id: Uuid,
        roles: Vec<Role>,
        /// Set when authenticated by an access token or session cookie.
        session_id: Option<Uuid>,
        /// Set when authenticated by an API key: limits what the caller may do.
        key: Option<KeyGrant>,
    },
    /// Shared with the service-token cache: cloning a caller costs no allocation.
    ServiceClient {
        client_id: Arc<str>,
        scopes: Arc<[String]>,
    },
}

impl Caller {
    pub fn user_id(&self) -> Option<Uuid> {
        match self {
            Caller::User { user_id, .. } => Some(*user_id),
            Caller::ServiceClient { .. } => None,
        }
    }

    pub fn has_role(&self, role: Role) -> bool {
        matches!(self, Caller::User { roles, .. } if roles.contains(&role))
    }

    /// For audit rows: ("user", id), ("api_key", id) or ("service_client", id).
    pub fn actor(&self) -> (&'static str, String) {
        match self {
            Caller::User { key: Some(k), .. } => ("api_key", k.key_id.to_string()),
            Caller::User { user_id, .. } => ("user", user_id.to_string()),
            Caller::ServiceClient { client_id, .. } => ("service_client", client_id.to_string()),
        }
    }

    /// A user acting through their own session (not an API key, not a
    /// service): (user id, session id).
    pub fn session_user(&self) -> ServiceResult<(Uuid, Option<Uuid>)> {
        self.session_user_for("this needs")
    }

    /// `session_user` for managing a kind of credential: an API key is
    /// refused with "`what` a login session" (e.g. "passkeys are managed with").
    pub fn session_user_for(&self, what: &str) -> ServiceResult<(Uuid, Option<Uuid>)> {
        match self {
            Caller::User {
                user_id,
                session_id,
                key: None,
                ..
            } => Ok((*user_id, *session_id)),
            Caller::User { key: Some(_), .. } => Err(ServiceError::Forbidden(format!(
                "{what} a login session, not an API key"
            ))),
            Caller::ServiceClient { .. } => Err(ServiceError::Forbidden("users only".into())),
        }
    }

    /// The RPCs only service clients call: the caller is one, holding `scope`.
    pub fn require_service_scope(&self, scope: &str) -> ServiceResult<()> {
        match self {
            Caller::ServiceClient { scopes, .. } if scopes.iter().any(|s| s == scope) => Ok(()),
            _ => Err(ServiceError::Forbidden(format!("scope {scope} required"))),
        }
    }

    /// An API-key caller may only use what its key's scopes allow; a session
    /// caller is limited by its roles (checked by the policy engine).
    pub fn key_allows_scope(&self, scope: &str) -> bool {
        match self {
            Caller::User { key: Some(k), .. } => k.scopes.iter().any(|s| s == scope),
            Caller::User { key: None, .. } => true,
            Caller::ServiceClient { scopes, .. } => scopes.iter().any(|s| s == scope),
        }
    }
}

/// Seconds since the epoch (token expiry checks).
pub(crate) fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A new opaque secret (refresh tokens, client secrets): 256 random bits,
/// base64url.
pub(crate) fn random_token() -> String {
    use base64::Engine as _;
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_keeps_at_most_max_characters_whole() {
        assert_eq!(bounded("tonic/0.14", 512), "tonic/0.14");
        assert_eq!(bounded("abcdef", 3), "abc");
        assert_eq!(bounded("abc", 3), "abc");
        // Characters, not bytes: a multi-byte one is never cut in half.
        assert_eq!(bounded("ééé", 2), "éé");
        assert_eq!(bounded(&"x".repeat(600), 512).len(), 512);
    }

    #[test]
    fn service_scopes_are_for_service_clients_holding_them() {
        let client = Caller::ServiceClient {
            client_id: "backend".into(),
            scopes: vec!["auth:verify".to_string()].into(),
        };
        assert!(client.require_service_scope("auth:verify").is_ok());
        let refused = client.require_service_scope("users:read").unwrap_err();
        assert!(
            matches!(&refused, ServiceError::Forbidden(m) if m == "scope users:read required"),
            "{refused:?}"
        );
        // A user (even an admin) never holds a service scope.
        let user = Caller::User {
            user_id: Uuid::nil(),
            roles: vec![Role::Admin],
            session_id: None,
            key: None,
        };
        assert!(user.require_service_scope("auth:verify").is_err());
    }

    #[test]
    fn a_busy_hashing_pool_is_unavailable_not_internal() {
        let busy = ServiceError::hashing(anyhow::Error::new(crate::crypto::password::Busy));
        assert!(matches!(busy, ServiceError::Unavailable(_)), "{busy:?}");
        let other = ServiceError::hashing(anyhow::anyhow!("argon2 hash failed"));
        assert!(matches!(other, ServiceError::Internal(_)), "{other:?}");
    }
}
