//! The service-client side (gRPC): GetTradingAccount, ListUserAccounts,
//! CheckAccountAccess. Each checks its scope in the service
//! (`PolicyEngine::require_client_scope`), never in the transport.

use uuid::Uuid;

use super::{account_resource, AccountsService};
use crate::domain::account::{Access, AccountAccess, Permission, TradingAccount};
use crate::domain::policy::Decision;
use crate::service::{Caller, RequestMeta, ServiceError, ServiceResult};
use crate::store::accounts as store;

impl AccountsService {
    /// GetTradingAccount (scope accounts:read). Unknown or deleted → NotFound.
    pub async fn account_for_service(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        id: Uuid,
    ) -> ServiceResult<TradingAccount> {
        self.policy
            .require_client_scope(caller, meta, "accounts:read", Some(id))
            .await?;
        store::get_live(&self.db, id)
            .await?
            .ok_or(ServiceError::NotFound("trading account"))
    }

    /// ListUserAccounts (scope users:read).
    pub async fn accounts_for_service(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        user_id: Uuid,
    ) -> ServiceResult<Vec<AccountAccess>> {
        self.policy
            .require_client_scope(caller, meta, "users:read", None)
            .await?;
        let accounts = self.accounts_of(user_id).await?;
        if accounts.is_empty() && !store::user_exists(&self.db, user_id).await? {
            return Err(ServiceError::NotFound("user"));
        }
        Ok(accounts)
    }

    /// CheckAccountAccess (scope permissions:check): the user's roles and policies
    /// first (a deny there wins), then their standing on the account. Returns the
    /// decision and the user's access, if any.
    pub async fn check_access(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        user_id: Uuid,
        account_id: Uuid,
        permission: Permission,
    ) -> ServiceResult<(Decision, Option<Access>)> {
        self.policy
            .require_client_scope(caller, meta, "permissions:check", Some(account_id))
            .await?;
        let access = self.access_of(user_id, account_id).await?;
        let Some(access) = access else {
            return Ok((Decision::default_deny(), None));
        };
        let action = match permission {
            Permission::Read => "accounts:read",
            Permission::Trade => "orders:write",
            Permission::Manage => "accounts:write",
        };
        let by_policy = self
            .policy
            .user_allows(user_id, action, &account_resource(account_id))
            .await?;
        if !by_policy.allowed {
            return Ok((by_policy, Some(access)));
        }
        let decision = if access.allows(permission) {
            Decision::allow(access.rule())
        } else {
            Decision::deny(access.rule())
        };
        Ok((decision, Some(access)))
    }
}
