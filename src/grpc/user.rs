//! UserService adapter.

use tonic::{Request, Response, Status};

use super::interceptor::require_scope;
use crate::app::AppState;
use crate::proto::user_service_server::UserService;
use crate::proto::{
    CheckPermissionRequest, CheckPermissionResponse, ListUserAccountsRequest,
    ListUserAccountsResponse,
};
use crate::proto::{GetUserRequest, GetUserResponse};

pub struct UserApi {
    state: AppState,
}

impl UserApi {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }
}

/// RFC 3339 time → protobuf Timestamp.
pub fn timestamp(t: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// The wire form of a user (never the password hash: the domain type has none).
pub fn user_to_proto(u: &crate::domain::user::User) -> crate::proto::User {
    crate::proto::User {
        id: u.id.to_string(),
        email: u.email.clone(),
        full_name: u.full_name.clone(),
        roles: u.roles.clone(),
        status: u.status.clone(),
        created_at: Some(timestamp(u.created_at)),
        email_verified: u.email_verified,
    }
}

#[tonic::async_trait]
impl UserService for UserApi {
    async fn get_user(
        &self,
        req: Request<GetUserRequest>,
    ) -> Result<Response<GetUserResponse>, Status> {
        let caller = require_scope(&req, "users:read")?;
        let id = super::convert_accounts::id(&req.get_ref().user_id, "user_id")?;
        let user = self.state.identity.get_user(caller, id).await?;
        Ok(Response::new(GetUserResponse {
            user: Some(user_to_proto(&user)),
        }))
    }

    async fn list_user_accounts(
        &self,
        req: Request<ListUserAccountsRequest>,
    ) -> Result<Response<ListUserAccountsResponse>, Status> {
        let caller = super::convert_accounts::caller(&req)?;
        let meta = super::convert_accounts::request_meta(&req);
        let user_id = super::convert_accounts::id(&req.get_ref().user_id, "user_id")?;
        let accounts = self
            .state
            .accounts
            .accounts_for_service(&caller, &meta, user_id)
            .await?;
        Ok(Response::new(ListUserAccountsResponse {
            accounts: accounts
                .iter()
                .map(super::convert_accounts::account_access_to_proto)
                .collect(),
        }))
    }

    async fn check_permission(
        &self,
        req: Request<CheckPermissionRequest>,
    ) -> Result<Response<CheckPermissionResponse>, Status> {
        let caller = super::convert_accounts::caller(&req)?;
        let meta = super::convert_accounts::request_meta(&req);
        let r = req.get_ref();
        let decision = self
            .state
            .policy
            .check_permission_for(&caller, &meta, &r.subject, &r.action, &r.resource)
            .await?;
        Ok(Response::new(CheckPermissionResponse {
            allowed: decision.allowed,
            decided_by: decision.decided_by,
        }))
    }
}
