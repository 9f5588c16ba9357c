//! AuthService adapter: convert, call the service, convert.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert::{key_verification, KeyCheck};
use crate::proto::auth_service_server::AuthService;
use crate::proto::{VerifyApiKeyRequest, VerifyApiKeyResponse};
use crate::proto::{VerifyTokenRequest, VerifyTokenResponse};
use crate::service::api_keys::ApiKeyService;
use crate::service::sessions::Sessions;
use crate::service::{Caller, RequestMeta};

pub struct AuthApi {
    sessions: Arc<Sessions>,
    api_keys: Arc<ApiKeyService>,
}

impl AuthApi {
    pub fn new(sessions: Arc<Sessions>, api_keys: Arc<ApiKeyService>) -> Self {
        Self { sessions, api_keys }
    }
}

#[tonic::async_trait]
impl AuthService for AuthApi {
    /// The hot path: a bad key is an answer (valid=false, reason), not an error.
    async fn verify_api_key(
        &self,
        req: Request<VerifyApiKeyRequest>,
    ) -> Result<Response<VerifyApiKeyResponse>, Status> {
        let caller = Caller::try_from(&req)?;
        let meta = RequestMeta::from(&req);
        let check = KeyCheck::try_from(req.into_inner())?;
        let answer = self
            .api_keys
            .verify_for_client(&caller, &meta, &check.api_key, &check.request)
            .await?;
        Ok(Response::new(key_verification(
            answer.as_deref().map_err(|f| *f),
            check.request.trading_account_id,
        )))
    }

    async fn verify_token(
        &self,
        req: Request<VerifyTokenRequest>,
    ) -> Result<Response<VerifyTokenResponse>, Status> {
        // The scope is the service's to check.
        let caller = Caller::try_from(&req)?;
        let answer = self
            .sessions
            .verify_token(&caller, &req.get_ref().token)
            .await?;
        Ok(Response::new(answer.into()))
    }
}
