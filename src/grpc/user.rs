//! UserService adapter: convert, call the service, convert.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::convert::{accounts, IdField};
use super::interceptor::require_scope;
use crate::proto::user_service_server::UserService;
use crate::proto::{
    CheckPermissionRequest, CheckPermissionResponse, ListUserAccountsRequest,
    ListUserAccountsResponse,
};
use crate::proto::{GetUserRequest, GetUserResponse};
use crate::service::accounts::AccountsService;
use crate::service::policy::PolicyEngine;
use crate::service::users::Users;
use crate::service::{Caller, RequestMeta};

pub struct UserApi {
    users: Arc<Users>,
    accounts: AccountsService,
    policy: PolicyEngine,
}

impl UserApi {
    pub fn new(users: Arc<Users>, accounts: AccountsService, policy: PolicyEngine) -> Self {
        Self {
            users,
            accounts,
            policy,
        }
    }
}

#[tonic::async_trait]
impl UserService for UserApi {
    async fn get_user(
        &self,
        req: Request<GetUserRequest>,
    ) -> Result<Response<GetUserResponse>, Status> {
        let caller = require_scope(&req, "users:read")?;
        let id = Uuid::try_from(IdField("user_id", &req.get_ref().user_id))?;
        let user = self.users.get_user(caller, id).await?;
        Ok(Response::new(GetUserResponse {
            user: Some((&user).into()),
        }))
    }

    async fn list_user_accounts(
        &self,
        req: Request<ListUserAccountsRequest>,
    ) -> Result<Response<ListUserAccountsResponse>, Status> {
        let caller = Caller::try_from(&req)?;
        let meta = RequestMeta::from(&req);
        let user_id = Uuid::try_from(IdField("user_id", &req.get_ref().user_id))?;
        let list = self
            .accounts
            .accounts_for_service(&caller, &meta, user_id)
            .await?;
        Ok(Response::new(ListUserAccountsResponse {
            accounts: accounts(list.iter()),
        }))
    }

    async fn check_permission(
        &self,
        req: Request<CheckPermissionRequest>,
    ) -> Result<Response<CheckPermissionResponse>, Status> {
        let caller = Caller::try_from(&req)?;
        let meta = RequestMeta::from(&req);
        let r = req.get_ref();
        let decision = self
            .policy
            .check_permission_for(&caller, &meta, &r.subject, &r.action, &r.resource)
            .await?;
        Ok(Response::new(decision.into()))
    }
}
