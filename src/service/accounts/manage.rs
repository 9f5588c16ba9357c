//! A user (session or API key) acting on accounts themselves: create, list,
//! read, update, delete.

use serde_json::json;
use uuid::Uuid;

use super::authz::{Denial, RowLock};
use super::{key_accounts, AccountsService};
use crate::domain::account::{
    Access, AccountAccess, AccountPatch, NewAccount, Permission, SubscriptionTier, TradingAccount,
};
use crate::service::audit::{AuditEntry, Outcome};
use crate::service::invalidation::Change;
use crate::service::paging::{self, Page, PageQuery};
use crate::service::{Caller, RequestMeta, ServiceResult};
use crate::store::accounts as store;

impl AccountsService {
    pub async fn create(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        input: NewAccount,
    ) -> ServiceResult<TradingAccount> {
        let user_id = self
            .authorize_scope(caller, meta, "accounts:write", None)
            .await?;
        // The tier is billing's business, as on PATCH: refused rather than
        // silently defaulted, so a client never believes it bought a tier.
        if input.subscription_tier.is_some() && !caller.has_role(crate::domain::user::Role::Admin) {
            let d = Denial::forbidden(
                "subscription_admin_only",
                "subscription_tier is set by an administrator; leave it out to get the default",
            );
            return Err(self
                .deny_now(caller, meta, None, "subscription_tier", d)
                .await);
        }
        let id = Uuid::now_v7();
        let mut tx = self.db.begin().await?;
        let account = store::insert(
            &mut tx,
            &store::NewAccount {
                id,
                owner_user_id: user_id,
                broker: input.broker.as_str(),
                broker_user_id: input.broker_user_id.as_str(),
                nickname: input.nickname.as_str(),
                subscription_tier: input.subscription_tier.unwrap_or(SubscriptionTier::DEFAULT),
            },
        )
        .await?;
        tx.audit(
            &AuditEntry::new("trading_account.created", Outcome::Success)
                .by(caller)
                .meta(meta)
                .target(super::TARGET, id)
                .details(json!({
                    "broker": account.broker,
                    "subscription_tier": account.subscription_tier.as_str(),
                })),
        )
        .await?;
        tx.commit().await?;
        self.invalidation.publish(Change::User(user_id)).await;
        Ok(account)
    }

    /// The caller's accounts (owned and shared), oldest first. An API key
    /// restricted to some accounts sees only those.
    pub async fn list(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        page: PageQuery,
    ) -> ServiceResult<Page<AccountAccess>> {
        let user_id = self
            .authorize_scope(caller, meta, "accounts:read", None)
            .await?;
        let page = page.parse()?;
        let rows = store::list_for_user(
            &self.db,
            user_id,
            key_accounts(caller),
            page.after,
            page.fetch(),
        )
        .await?;
        Ok(page.page(rows, |r| (r.account.created_at, r.account.id)))
    }

    pub async fn get(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        id: Uuid,
    ) -> ServiceResult<AccountAccess> {
        let g = self
            .open(caller, meta, id, Permission::Read, RowLock::Skip)
            .await?
            .commit()
            .await?;
        Ok(AccountAccess {
            account: g.account,
            access: g.access,
        })
    }

    /// Owner or manager. Subscription terms only through an administrator.
    pub async fn update(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        id: Uuid,
        patch: AccountPatch,
    ) -> ServiceResult<TradingAccount> {
        if let Some(at) = patch.subscription_expires_at {
            paging::check_time("subscription_expires_at", at)?;
        }
        let mut op = self
            .open(caller, meta, id, Permission::Manage, RowLock::Hold)
            .await?;
        if patch.touches_subscription() && !caller.has_role(crate::domain::user::Role::Admin) {
            return op
                .refuse(Denial::forbidden(
                    "subscription_admin_only",
                    "subscription terms are changed by billing, not by the account holder",
                ))
                .await;
        }
        if patch.is_empty() {
            return Ok(op.commit().await?.account);
        }
        let account = store::update(
            &mut op.tx,
            id,
            &store::AccountChanges {
                nickname: patch.nickname.as_ref().map(|n| n.as_str()),
                status: patch.status,
                subscription_tier: patch.subscription_tier,
                subscription_status: patch.subscription_status,
                subscription_expires_at: patch.subscription_expires_at,
            },
        )
        .await?;
        op.audit(
            "trading_account.updated",
            json!({ "fields": patch.changed_fields() }),
        )
        .await?;
        op.commit().await?;
        // Cached account lists carry these fields.
        self.invalidation.publish(Change::Account(id)).await;
        Ok(account)
    }

    /// Owner only. A soft delete: the row stays for the audit trail, every
    /// membership ends, and the account disappears from every read at once.
    pub async fn delete(&self, caller: &Caller, meta: &RequestMeta, id: Uuid) -> ServiceResult<()> {
        let mut op = self
            .open(caller, meta, id, Permission::Manage, RowLock::Hold)
            .await?;
        if op.granted.access != Access::Owner {
            return op
                .refuse(Denial::forbidden(
                    "owner_only",
                    "only the owner can delete an account",
                ))
                .await;
        }
        let ended = store::soft_delete(&mut op.tx, id).await?;
        op.audit(
            "trading_account.deleted",
            json!({ "memberships_ended": ended.len() }),
        )
        .await?;
        let g = op.commit().await?;
        self.invalidation.publish(Change::Account(id)).await;
        for user in ended.into_iter().chain([g.user_id]) {
            self.invalidation.publish(Change::User(user)).await;
        }
        Ok(())
    }
}
