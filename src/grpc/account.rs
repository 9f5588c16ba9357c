//! AccountService adapter: convert, call `AccountsService` (which checks the
//! scope), convert.

use tonic::{Request, Response, Status};

use super::convert_accounts::{
    account_to_proto, caller, credentials_to_proto, id, permission, request_meta,
};
use crate::app::AppState;
use crate::proto::account_service_server::AccountService;
use crate::proto::{
    CheckAccountAccessRequest, CheckAccountAccessResponse, GetBrokerCredentialsRequest,
    GetBrokerCredentialsResponse, GetTradingAccountRequest, GetTradingAccountResponse,
};

pub struct AccountApi {
    state: AppState,
}

impl AccountApi {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl AccountService for AccountApi {
    async fn get_trading_account(
        &self,
        req: Request<GetTradingAccountRequest>,
    ) -> Result<Response<GetTradingAccountResponse>, Status> {
        let caller = caller(&req)?;
        let meta = request_meta(&req);
        let account_id = id(&req.get_ref().account_id, "account_id")?;
        let account = self
            .state
            .accounts
            .account_for_service(&caller, &meta, account_id)
            .await?;
        Ok(Response::new(GetTradingAccountResponse {
            account: Some(account_to_proto(&account)),
        }))
    }

    async fn check_account_access(
        &self,
        req: Request<CheckAccountAccessRequest>,
    ) -> Result<Response<CheckAccountAccessResponse>, Status> {
        let caller = caller(&req)?;
        let meta = request_meta(&req);
        let r = req.get_ref();
        let permission = permission(&r.permission)?;
        let user_id = id(&r.user_id, "user_id")?;
        let account_id = id(&r.account_id, "account_id")?;
        let (decision, access) = self
            .state
            .accounts
            .check_access(&caller, &meta, user_id, account_id, permission)
            .await?;
        Ok(Response::new(CheckAccountAccessResponse {
            allowed: decision.allowed,
            access: access.map(|a| a.as_str().to_string()).unwrap_or_default(),
            decided_by: decision.decided_by,
        }))
    }

    async fn get_broker_credentials(
        &self,
        req: Request<GetBrokerCredentialsRequest>,
    ) -> Result<Response<GetBrokerCredentialsResponse>, Status> {
        let caller = caller(&req)?;
        let meta = request_meta(&req);
        let account_id = id(&req.get_ref().account_id, "account_id")?;
        let creds = self
            .state
            .accounts
            .broker_credentials(&caller, &meta, account_id)
            .await?;
        Ok(Response::new(GetBrokerCredentialsResponse {
            credentials: Some(credentials_to_proto(creds)),
        }))
    }
}
