//! AuthService adapter.

use tonic::{Request, Response, Status};

use super::interceptor::require_scope;
use super::user::user_to_proto;
use crate::app::AppState;
use crate::proto::auth_service_server::AuthService;
use crate::proto::{VerifyApiKeyRequest, VerifyApiKeyResponse};
use crate::proto::{VerifyReason, VerifyTokenRequest, VerifyTokenResponse};
use crate::service::api_keys::{VerifiedKey, VerifyFailure, VerifyRequest};
use crate::service::identity::{TokenRefusal, TokenVerification};

pub struct AuthApi {
    state: AppState,
}

impl AuthApi {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

fn refusal_reason(r: TokenRefusal) -> VerifyReason {
    match r {
        TokenRefusal::Invalid => VerifyReason::InvalidToken,
        TokenRefusal::Expired => VerifyReason::Expired,
        TokenRefusal::SessionRevoked => VerifyReason::SessionRevoked,
        TokenRefusal::UserDisabled => VerifyReason::UserDisabled,
    }
}

#[tonic::async_trait]
impl AuthService for AuthApi {
    /// The hot path: a bad key is an answer (valid=false, reason), not an error.
    async fn verify_api_key(
        &self,
        req: Request<VerifyApiKeyRequest>,
    ) -> Result<Response<VerifyApiKeyResponse>, Status> {
        require_scope(&req, "auth:verify")?;
        let r = req.into_inner();
        let client_ip = match r.client_ip.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(s) => Some(
                s.parse()
                    .map_err(|_| Status::invalid_argument("client_ip is not an IP address"))?,
            ),
        };
        let trading_account_id = match r.trading_account_id.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(s) => Some(
                s.parse()
                    .map_err(|_| Status::invalid_argument("trading_account_id is not a UUID"))?,
            ),
        };
        let verify = VerifyRequest {
            client_ip,
            required_scopes: r.required_scopes,
            trading_account_id,
        };
        let answer = self
            .state
            .api_keys
            .verify(&r.api_key, &verify, "grpc:VerifyApiKey")
            .await?;
        Ok(Response::new(match answer {
            Ok(k) => verified_key_to_proto(&k, verify.trading_account_id),
            Err(f) => VerifyApiKeyResponse {
                valid: false,
                reason: key_refusal_reason(f) as i32,
                ..Default::default()
            },
        }))
    }

    async fn verify_token(
        &self,
        req: Request<VerifyTokenRequest>,
    ) -> Result<Response<VerifyTokenResponse>, Status> {
        let caller = require_scope(&req, "auth:verify")?;
        let answer = self
            .state
            .identity
            .verify_token(caller, &req.get_ref().token)
            .await?;
        Ok(Response::new(match answer {
            TokenVerification::Valid {
                user,
                accounts,
                session_id,
                expires_at,
                amr,
                auth_time,
            } => VerifyTokenResponse {
                valid: true,
                reason: VerifyReason::Unspecified as i32,
                accounts: accounts
                    .iter()
                    .map(super::convert_accounts::account_access_to_proto)
                    .collect(),
                user: Some(user_to_proto(&user)),
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
            TokenVerification::Refused(r) => VerifyTokenResponse {
                valid: false,
                reason: refusal_reason(r) as i32,
                ..Default::default()
            },
        }))
    }
}

fn key_refusal_reason(f: VerifyFailure) -> VerifyReason {
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

fn verified_key_to_proto(k: &VerifiedKey, account: Option<uuid::Uuid>) -> VerifyApiKeyResponse {
    use super::user::timestamp;
    VerifyApiKeyResponse {
        valid: true,
        reason: VerifyReason::Unspecified as i32,
        user: Some(crate::proto::User {
            id: k.user.id.to_string(),
            email: k.user.email.clone(),
            full_name: k.user.full_name.clone(),
            roles: k.user.roles.clone(),
            status: k.user.status.clone(),
            created_at: Some(timestamp(k.user.created_at)),
        }),
        key: Some(crate::proto::ApiKey {
            id: k.key.id.to_string(),
            name: k.key.name.clone(),
            prefix: k.key.prefix.clone(),
            scopes: k.scopes_for(account),
            expires_at: k.key.expires_at.map(timestamp),
        }),
        accounts: k
            .accounts
            .iter()
            .map(super::convert_accounts::account_access_to_proto)
            .collect(),
    }
}
