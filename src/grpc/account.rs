//! AccountService adapter: convert, call `AccountsService` (which checks the
//! scope), convert.

use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::convert::{AccessQuery, IdField};
use crate::proto::account_service_server::AccountService;
use crate::proto::{
    CheckAccountAccessRequest, CheckAccountAccessResponse, GetBrokerCredentialsRequest,
    GetBrokerCredentialsResponse, GetTradingAccountRequest, GetTradingAccountResponse,
};
use crate::service::accounts::AccountsService;
use crate::service::{Caller, RequestMeta};

pub struct AccountApi {
    accounts: AccountsService,
}

impl AccountApi {
    pub fn new(accounts: AccountsService) -> Self {
        Self { accounts }
    }
}

#[tonic::async_trait]
impl AccountService for AccountApi {
    async fn get_trading_account(
        &self,
        req: Request<GetTradingAccountRequest>,
    ) -> Result<Response<GetTradingAccountResponse>, Status> {
        let caller = Caller::try_from(&req)?;
        let meta = RequestMeta::from(&req);
        let account_id = Uuid::try_from(IdField("account_id", &req.get_ref().account_id))?;
        let account = self
            .accounts
            .account_for_service(&caller, &meta, account_id)
            .await?;
        Ok(Response::new(GetTradingAccountResponse {
            account: Some((&account).into()),
        }))
    }

    async fn check_account_access(
        &self,
        req: Request<CheckAccountAccessRequest>,
    ) -> Result<Response<CheckAccountAccessResponse>, Status> {
        let caller = Caller::try_from(&req)?;
        let meta = RequestMeta::from(&req);
        let q = AccessQuery::try_from(req.get_ref())?;
        let answer = self
            .accounts
            .check_access(&caller, &meta, q.user_id, q.account_id, q.permission)
            .await?;
        Ok(Response::new(answer.into()))
    }

    async fn get_broker_credentials(
        &self,
        req: Request<GetBrokerCredentialsRequest>,
    ) -> Result<Response<GetBrokerCredentialsResponse>, Status> {
        let caller = Caller::try_from(&req)?;
        let meta = RequestMeta::from(&req);
        let account_id = Uuid::try_from(IdField("account_id", &req.get_ref().account_id))?;
        let creds = self
            .accounts
            .broker_credentials(&caller, &meta, account_id)
            .await?;
        Ok(Response::new(GetBrokerCredentialsResponse {
            credentials: Some(creds.into()),
        }))
    }
}
