//! Trading accounts, shared access and broker credentials: who sees an account
//! (owner and live members; anyone else gets the same 404 as a missing id), what
//! each member role may do, and the sealed credentials only a service client reads.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use sqlx::PgConnection;
use uuid::Uuid;

use super::audit::{AuditEntry, Outcome};
use super::invalidation::{Change, Invalidation};
use super::paging::{self, Page};
use super::policy::PolicyEngine;
use super::{Caller, RequestMeta, ServiceError, ServiceResult};
use crate::crypto::aead::{credential_aad, AeadError, KeyRing};
use crate::domain::account::{
    credentials_hint, Access, AccountAccess, AccountPatch, BrokerCredentials, Member, MemberRole,
    NewAccount, Permission, SubscriptionTier, TradingAccount,
};
use crate::domain::policy::{Decision, Resource};
use crate::domain::scope;
use crate::store::accounts::{self as store, After, SealedCredentials};
use crate::store::{audit, Db, StoreError};

/// No user holds more accounts than this; the unpaginated list stops here.
const MAX_ACCOUNTS: i64 = 1000;
/// How long a cached access answer or account list may live on a replica that
/// missed an invalidation (Redis down); changes on the same replica apply at once.
const CACHE_TTL: Duration = Duration::from_secs(30);

const TARGET: &str = "trading_account";

/// What a successful authorisation established.
pub(super) struct Granted {
    pub(super) user_id: Uuid,
    pub(super) account: TradingAccount,
    pub(super) access: Access,
}

/// Why access was refused: the error the client sees and the reason the audit
/// row records.
pub(super) struct Denial {
    error: ServiceError,
    reason: &'static str,
    decided_by: Option<String>,
}

impl Denial {
    pub(super) fn hidden(reason: &'static str) -> Self {
        Self {
            error: ServiceError::NotFound("trading account"),
            reason,
            decided_by: None,
        }
    }

    pub(super) fn forbidden(reason: &'static str, detail: &str) -> Self {
        Self {
            error: ServiceError::Forbidden(detail.into()),
            reason,
            decided_by: None,
        }
    }
}

/// What `reencrypt_credentials` did, printed by the admin command.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReencryptSummary {
    pub active_key_id: String,
    pub candidates: usize,
    pub reencrypted: usize,
    pub already_current: usize,
    pub failed: Vec<ReencryptFailure>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ReencryptFailure {
    pub account_id: Uuid,
    pub error: String,
}

#[derive(Clone)]
pub struct AccountsService {
    db: Db,
    /// `None` when CREDENTIALS_ENCRYPTION_KEYS is unset (development only):
    /// credentials can then be neither written nor read.
    keys: Option<Arc<KeyRing>>,
    policy: PolicyEngine,
    invalidation: Invalidation,
    /// (user, account) → access, for CheckAccountAccess and API-key checks.
    access_cache: moka::future::Cache<(Uuid, Uuid), Option<Access>>,
    /// user → every account they own or share, for ListUserAccounts and API keys.
    lists_cache: moka::future::Cache<Uuid, Arc<Vec<AccountAccess>>>,
    /// Bumped by every invalidation; a load that overlaps one is not cached, so
    /// a removal racing a cache fill cannot resurrect the old answer.
    epoch: Arc<AtomicU64>,
    /// The step-up rule (issue 14) for credentials and memberships; invitations
    /// and API keys use it through this service.
    pub(crate) step_up: super::mfa::StepUp,
}

impl AccountsService {
    pub fn new(
        db: Db,
        keys: Option<Arc<KeyRing>>,
        policy: PolicyEngine,
        invalidation: Invalidation,
        step_up: super::mfa::StepUp,
    ) -> Self {
        let access_cache: moka::future::Cache<(Uuid, Uuid), Option<Access>> =
            moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(CACHE_TTL)
                .support_invalidation_closures()
                .build();
        let lists_cache: moka::future::Cache<Uuid, Arc<Vec<AccountAccess>>> =
            moka::future::Cache::builder()
                .max_capacity(20_000)
                .time_to_live(CACHE_TTL)
                .support_invalidation_closures()
                .build();
        let epoch = Arc::new(AtomicU64::new(0));
        {
            let (access, lists, epoch) = (access_cache.clone(), lists_cache.clone(), epoch.clone());
            invalidation.on_change(move |change| {
                epoch.fetch_add(1, Ordering::SeqCst);
                // invalidate_entries_if fails only without invalidation closures,
                // which both caches enable.
                match change {
                    Change::User(u) => {
                        let _ = access.invalidate_entries_if(move |k, _| k.0 == u);
                        let _ = lists.invalidate_entries_if(move |k, _| *k == u);
                    }
                    Change::Account(a) => {
                        let _ = access.invalidate_entries_if(move |k, _| k.1 == a);
                        let _ = lists
                            .invalidate_entries_if(move |_, v| v.iter().any(|x| x.account.id == a));
                    }
                    Change::Everything => {
                        access.invalidate_all();
                        lists.invalidate_all();
                    }
                    Change::ApiKey(_) | Change::Session(_) | Change::Profile(_) => {}
                }
            });
        }
        Self {
            db,
            keys,
            policy,
            invalidation,
            access_cache,
            lists_cache,
            epoch,
            step_up,
        }
    }

    pub fn key_ring(&self) -> Option<&KeyRing> {
        self.keys.as_deref()
    }

    // ---- internal queries (the caller has already been authorised) -------------

    /// Every live account the user owns or is a live member of, with the user's
    /// access (owner or member role) and the permissions it carries.
    /// Cached; account and membership changes invalidate it on every replica.
    pub async fn accounts_of(&self, user_id: Uuid) -> ServiceResult<Vec<AccountAccess>> {
        if let Some(hit) = self.lists_cache.get(&user_id).await {
            metrics::counter!("account_list_cache_total", "result" => "hit").increment(1);
            return Ok(hit.as_ref().clone());
        }
        metrics::counter!("account_list_cache_total", "result" => "miss").increment(1);
        let epoch = self.epoch.load(Ordering::SeqCst);
        let list = store::list_for_user(&self.db.pool, user_id, None, None, MAX_ACCOUNTS).await?;
        if self.epoch.load(Ordering::SeqCst) == epoch {
            self.lists_cache
                .insert(user_id, Arc::new(list.clone()))
                .await;
        }
        Ok(list)
    }

    /// The user's access on one live account; `None` when they have none (or the
    /// account does not exist or is deleted). Cached; membership changes
    /// invalidate it on every replica.
    pub async fn access_of(
        &self,
        user_id: Uuid,
        account_id: Uuid,
    ) -> ServiceResult<Option<Access>> {
        if let Some(hit) = self.access_cache.get(&(user_id, account_id)).await {
            metrics::counter!("account_access_cache_total", "result" => "hit").increment(1);
            return Ok(hit);
        }
        metrics::counter!("account_access_cache_total", "result" => "miss").increment(1);
        let epoch = self.epoch.load(Ordering::SeqCst);
        let mut conn = self.db.pool.acquire().await.map_err(StoreError::from)?;
        let access = store::get_with_access(&mut conn, user_id, account_id, false)
            .await?
            .and_then(|(_, access)| access);
        if self.epoch.load(Ordering::SeqCst) == epoch {
            self.access_cache
                .insert((user_id, account_id), access)
                .await;
        }
        Ok(access)
    }

    // ---- REST: a user (session or API key) acting on accounts -------------------

    pub async fn create(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        input: NewAccount,
    ) -> ServiceResult<TradingAccount> {
        let user_id = self
            .authorize_scope(caller, meta, "accounts:write", None)
            .await?;
        let id = Uuid::now_v7();
        let mut tx = self.db.begin().await?;
        // The tier is billing's business, as on PATCH: refused rather than
        // silently defaulted, so a client never believes it bought a tier.
        if input.subscription_tier.is_some() && !caller.has_role("admin") {
            let d = Denial::forbidden(
                "subscription_admin_only",
                "subscription_tier is set by an administrator; leave it out to get the default",
            );
            let err = self
                .record_denial(&mut tx, caller, meta, None, "subscription_tier", d)
                .await;
            return self.commit_denial(tx, err).await;
        }
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
        audit::insert(
            &mut tx,
            &AuditEntry::new("trading_account.created", Outcome::Success)
                .by(caller)
                .meta(meta)
                .target(TARGET, id)
                .details(json!({
                    "broker": account.broker,
                    "subscription_tier": account.subscription_tier.as_str(),
                })),
        )
        .await?;
        tx.commit().await.map_err(StoreError::from)?;
        self.invalidation.publish(Change::User(user_id)).await;
        Ok(account)
    }

    /// The caller's accounts (owned and shared), oldest first. An API key
    /// restricted to some accounts sees only those.
    pub async fn list(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        limit: Option<i64>,
        cursor: Option<&str>,
    ) -> ServiceResult<Page<AccountAccess>> {
        let user_id = self
            .authorize_scope(caller, meta, "accounts:read", None)
            .await?;
        let limit = paging::limit(limit)?;
        let after = cursor
            .map(paging::decode_time_id)
            .transpose()?
            .map(|(created_at, id)| After { created_at, id });
        let rows = store::list_for_user(
            &self.db.pool,
            user_id,
            key_accounts(caller),
            after,
            limit + 1,
        )
        .await?;
        Ok(paging::finish(rows, limit, |r| {
            paging::encode_time_id(r.account.created_at, r.account.id)
        }))
    }

    pub async fn get(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        id: Uuid,
    ) -> ServiceResult<AccountAccess> {
        let mut tx = self.db.begin().await?;
        let g = match self
            .authorize(&mut tx, caller, meta, id, Permission::Read, false)
            .await?
        {
            Ok(g) => g,
            Err(e) => return self.commit_denial(tx, e).await,
        };
        tx.commit().await.map_err(StoreError::from)?;
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
        let mut tx = self.db.begin().await?;
        let g = match self
            .authorize(&mut tx, caller, meta, id, Permission::Manage, true)
            .await?
        {
            Ok(g) => g,
            Err(e) => return self.commit_denial(tx, e).await,
        };
        if patch.touches_subscription() && !caller.has_role("admin") {
            let d = Denial::forbidden(
                "subscription_admin_only",
                "subscription terms are changed by billing, not by the account holder",
            );
            return self
                .deny_in(tx, caller, meta, id, Permission::Manage, d)
                .await;
        }
        if patch.is_empty() {
            tx.commit().await.map_err(StoreError::from)?;
            return Ok(g.account);
        }
        let account = store::update(
            &mut tx,
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
        audit::insert(
            &mut tx,
            &AuditEntry::new("trading_account.updated", Outcome::Success)
                .by(caller)
                .meta(meta)
                .target(TARGET, id)
                .details(json!({ "fields": patch.changed_fields() })),
        )
        .await?;
        tx.commit().await.map_err(StoreError::from)?;
        // Cached account lists carry these fields.
        self.invalidation.publish(Change::Account(id)).await;
        Ok(account)
    }

    /// Owner only. A soft delete: the row stays for the audit trail, every
    /// membership ends, and the account disappears from every read at once.
    pub async fn delete(&self, caller: &Caller, meta: &RequestMeta, id: Uuid) -> ServiceResult<()> {
        let mut tx = self.db.begin().await?;
        let g = match self
            .authorize(&mut tx, caller, meta, id, Permission::Manage, true)
            .await?
        {
            Ok(g) => g,
            Err(e) => return self.commit_denial(tx, e).await,
        };
        if g.access != Access::Owner {
            let d = Denial::forbidden("owner_only", "only the owner can delete an account");
            return self
                .deny_in(tx, caller, meta, id, Permission::Manage, d)
                .await;
        }
        let ended = store::soft_delete(&mut tx, id).await?;
        audit::insert(
            &mut tx,
            &AuditEntry::new("trading_account.deleted", Outcome::Success)
                .by(caller)
                .meta(meta)
                .target(TARGET, id)
                .details(json!({ "memberships_ended": ended.len() })),
        )
        .await?;
        tx.commit().await.map_err(StoreError::from)?;
        self.invalidation.publish(Change::Account(id)).await;
        for user in ended.into_iter().chain([g.user_id]) {
            self.invalidation.publish(Change::User(user)).await;
        }
        Ok(())
    }

    /// Owner or manager. Seals each value under the active key, bound to this
    /// account and field; stores a masked hint of the API key.
    #[tracing::instrument(skip_all, fields(account_id = %id))]
    pub async fn set_credentials(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        id: Uuid,
        creds: BrokerCredentials,
    ) -> ServiceResult<()> {
        let keys = self.keys.as_ref().ok_or_else(|| {
            ServiceError::Unavailable("CREDENTIALS_ENCRYPTION_KEYS is not configured".into())
        })?;
        self.step_up
            .require_step_up(caller, meta, "trading_account.credentials.update")
            .await?;
        let mut tx = self.db.begin().await?;
        if let Err(e) = self
            .authorize(&mut tx, caller, meta, id, Permission::Manage, true)
            .await?
        {
            return self.commit_denial(tx, e).await;
        }
        let sealed = seal_credentials(keys, id, &creds)?;
        store::set_credentials(&mut tx, id, &sealed, &credentials_hint(&creds.api_key)).await?;
        audit::insert(
            &mut tx,
            &AuditEntry::new("trading_account.credentials.updated", Outcome::Success)
                .by(caller)
                .meta(meta)
                .target(TARGET, id)
                .details(json!({
                    "key_id": sealed.credentials_key_id,
                    "has_access_token": creds.access_token.is_some(),
                })),
        )
        .await?;
        tx.commit().await.map_err(StoreError::from)?;
        // Cached account lists show has_credentials and the hint.
        self.invalidation.publish(Change::Account(id)).await;
        Ok(())
    }

    /// The credentials' metadata (never their values): owner or manager only.
    pub async fn credentials_status(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        id: Uuid,
    ) -> ServiceResult<TradingAccount> {
        let mut tx = self.db.begin().await?;
        let g = match self
            .authorize(&mut tx, caller, meta, id, Permission::Manage, false)
            .await?
        {
            Ok(g) => g,
            Err(e) => return self.commit_denial(tx, e).await,
        };
        tx.commit().await.map_err(StoreError::from)?;
        Ok(g.account)
    }

    pub async fn list_members(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        id: Uuid,
        limit: Option<i64>,
        cursor: Option<&str>,
    ) -> ServiceResult<Page<Member>> {
        let limit = paging::limit(limit)?;
        let after = cursor
            .map(paging::decode_time_id)
            .transpose()?
            .map(|(created_at, id)| After { created_at, id });
        let mut tx = self.db.begin().await?;
        if let Err(e) = self
            .authorize(&mut tx, caller, meta, id, Permission::Read, false)
            .await?
        {
            return self.commit_denial(tx, e).await;
        }
        tx.commit().await.map_err(StoreError::from)?;
        let rows = store::list_members(&self.db.pool, id, after, limit + 1).await?;
        Ok(paging::finish(rows, limit, |m| {
            paging::encode_time_id(m.added_at, m.user_id)
        }))
    }

    /// Owner or manager. Nobody raises their own role, grants above their own,
    /// or changes the role of someone above them.
    pub async fn change_member_role(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        id: Uuid,
        member: Uuid,
        role: MemberRole,
    ) -> ServiceResult<Member> {
        self.step_up
            .require_step_up(caller, meta, "membership.role_change")
            .await?;
        let mut tx = self.db.begin().await?;
        let g = match self
            .authorize(&mut tx, caller, meta, id, Permission::Manage, true)
            .await?
        {
            Ok(g) => g,
            Err(e) => return self.commit_denial(tx, e).await,
        };
        let current = store::member_role_for_update(&mut tx, id, member)
            .await?
            .ok_or(ServiceError::NotFound("member"))?;
        let refusal = if member == g.user_id && role > current {
            Some(("raise_own_role", "cannot raise your own role"))
        } else if !g.access.may_grant(role) {
            Some(("grant_above_own_role", "cannot grant a role above your own"))
        } else if matches!(g.access, Access::Member(own) if current > own) {
            Some((
                "member_above_own_role",
                "cannot change the role of a member above you",
            ))
        } else {
            None
        };
        if let Some((reason, detail)) = refusal {
            let d = Denial::forbidden(reason, detail);
            return self
                .deny_in(tx, caller, meta, id, Permission::Manage, d)
                .await;
        }
        let updated = store::set_member_role(&mut tx, id, member, role).await?;
        if current != role {
            audit::insert(
                &mut tx,
                &AuditEntry::new("membership.role_changed", Outcome::Success)
                    .by(caller)
                    .meta(meta)
                    .target(TARGET, id)
                    .details(json!({
                        "user_id": member,
                        "from": current.as_str(),
                        "to": role.as_str(),
                    })),
            )
            .await?;
        }
        tx.commit().await.map_err(StoreError::from)?;
        self.membership_changed(id, member).await;
        Ok(updated)
    }

    /// A member may always leave; otherwise owner or manager, and not someone
    /// above the remover. Takes effect at once on every replica.
    pub async fn remove_member(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        id: Uuid,
        member: Uuid,
    ) -> ServiceResult<()> {
        let leaving = caller.user_id() == Some(member);
        let need = if leaving {
            Permission::Read
        } else {
            Permission::Manage
        };
        // Leaving only gives up access: no step-up for that.
        if !leaving {
            self.step_up
                .require_step_up(caller, meta, "membership.remove")
                .await?;
        }
        let mut tx = self.db.begin().await?;
        let g = match self
            .authorize(&mut tx, caller, meta, id, need, true)
            .await?
        {
            Ok(g) => g,
            Err(e) => return self.commit_denial(tx, e).await,
        };
        let current = store::member_role_for_update(&mut tx, id, member)
            .await?
            .ok_or(ServiceError::NotFound("member"))?;
        if !leaving && matches!(g.access, Access::Member(own) if current > own) {
            let d = Denial::forbidden("member_above_own_role", "cannot remove a member above you");
            return self.deny_in(tx, caller, meta, id, need, d).await;
        }
        store::remove_member(&mut tx, id, member).await?;
        audit::insert(
            &mut tx,
            &AuditEntry::new("membership.removed", Outcome::Success)
                .by(caller)
                .meta(meta)
                .target(TARGET, id)
                .details(json!({
                    "user_id": member,
                    "role": current.as_str(),
                    "left": leaving,
                })),
        )
        .await?;
        tx.commit().await.map_err(StoreError::from)?;
        self.membership_changed(id, member).await;
        Ok(())
    }

    // ---- gRPC: service clients asking about accounts ---------------------------

    /// GetTradingAccount (scope accounts:read). Unknown or deleted → NotFound.
    pub async fn account_for_service(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        id: Uuid,
    ) -> ServiceResult<TradingAccount> {
        self.require_client_scope(caller, meta, "accounts:read", Some(id))
            .await?;
        store::get_live(&self.db.pool, id)
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
        self.require_client_scope(caller, meta, "users:read", None)
            .await?;
        let accounts = self.accounts_of(user_id).await?;
        if accounts.is_empty() && !store::user_exists(&self.db.pool, user_id).await? {
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
        self.require_client_scope(caller, meta, "permissions:check", Some(account_id))
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

    /// GetBrokerCredentials (scope credentials:read, service clients only). Every
    /// call leaves an audit row naming the client, committed before the values
    /// leave; a value that fails authentication is refused and audited.
    #[tracing::instrument(skip_all, fields(account_id = %id))]
    pub async fn broker_credentials(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        id: Uuid,
    ) -> ServiceResult<BrokerCredentials> {
        self.require_client_scope(caller, meta, "credentials:read", Some(id))
            .await?;
        let keys = self.keys.as_ref().ok_or_else(|| {
            ServiceError::Unavailable("CREDENTIALS_ENCRYPTION_KEYS is not configured".into())
        })?;
        if store::get_live(&self.db.pool, id).await?.is_none() {
            return Err(ServiceError::NotFound("trading account"));
        }
        let sealed = store::sealed_credentials(&self.db.pool, id)
            .await?
            .ok_or(ServiceError::NotFound("broker credentials"))?;
        let creds = match open_credentials(keys, id, &sealed) {
            Ok(c) => c,
            Err(e) => {
                let mut conn = self.db.pool.acquire().await.map_err(StoreError::from)?;
                audit::insert(
                    &mut conn,
                    &AuditEntry::new(
                        "trading_account.credentials.decrypt_failed",
                        Outcome::Failure,
                    )
                    .by(caller)
                    .meta(meta)
                    .target(TARGET, id)
                    .details(json!({
                        "key_id": sealed.credentials_key_id,
                        "error": aead_reason(&e),
                    })),
                )
                .await?;
                return Err(ServiceError::Integrity("stored broker credentials"));
            }
        };
        let mut conn = self.db.pool.acquire().await.map_err(StoreError::from)?;
        audit::insert(
            &mut conn,
            &AuditEntry::new("trading_account.credentials.read", Outcome::Success)
                .by(caller)
                .meta(meta)
                .target(TARGET, id)
                .details(json!({ "key_id": sealed.credentials_key_id })),
        )
        .await?;
        Ok(creds)
    }

    // ---- operations -------------------------------------------------------------

    /// Moves every sealed value to the active key (see `reencrypt_credentials`).
    pub async fn reencrypt_credentials(&self) -> ServiceResult<ReencryptSummary> {
        let keys = self.keys.as_ref().ok_or_else(|| {
            ServiceError::Unavailable("CREDENTIALS_ENCRYPTION_KEYS is not configured".into())
        })?;
        reencrypt_credentials(&self.db, keys).await
    }

    // ---- authorisation ----------------------------------------------------------

    /// Scope and role checks that do not depend on an account: the caller is a
    /// user, their key (if any) carries `scope`, and their roles' policies allow
    /// it. Records a denial.
    async fn authorize_scope(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        scope: &'static str,
        account: Option<Uuid>,
    ) -> ServiceResult<Uuid> {
        match self.scope_check(caller, scope, account).await? {
            Ok(user_id) => Ok(user_id),
            Err(d) => {
                let mut conn = self.db.pool.acquire().await.map_err(StoreError::from)?;
                Err(self
                    .record_denial(&mut conn, caller, meta, account, scope, d)
                    .await)
            }
        }
    }

    async fn scope_check(
        &self,
        caller: &Caller,
        scope: &'static str,
        account: Option<Uuid>,
    ) -> ServiceResult<Result<Uuid, Denial>> {
        let Some(user_id) = caller.user_id() else {
            return Ok(Err(Denial::forbidden(
                "not_a_user",
                "trading accounts are managed by users",
            )));
        };
        if !caller.key_allows_scope(scope) {
            return Ok(Err(Denial::forbidden(
                "key_scope",
                &format!("this API key lacks the {scope} scope"),
            )));
        }
        let resource = account.map(account_resource).unwrap_or(Resource::Any);
        let decision = self.policy.user_allows(user_id, scope, &resource).await?;
        if !decision.allowed {
            return Ok(Err(Denial {
                decided_by: Some(decision.decided_by),
                ..Denial::forbidden("policy", &format!("your roles do not allow {scope}"))
            }));
        }
        Ok(Ok(user_id))
    }

    /// Everything a request on one account needs: scope (read → accounts:read,
    /// trade/manage → accounts:write), roles' policies, the key's account list,
    /// then the caller's standing on the account. A caller without standing gets
    /// the same NotFound as for a missing id. With `lock`, the account row stays
    /// locked for the transaction. `Err` inside `Ok` is a denial to be recorded.
    pub(super) async fn authorize(
        &self,
        tx: &mut PgConnection,
        caller: &Caller,
        meta: &RequestMeta,
        id: Uuid,
        need: Permission,
        lock: bool,
    ) -> ServiceResult<Result<Granted, ServiceError>> {
        let scope = match need {
            Permission::Read => "accounts:read",
            Permission::Trade | Permission::Manage => "accounts:write",
        };
        // An API key acts on the account only as far as its owner's access
        // covers the scope the request uses (the table VerifyApiKey uses too).
        let need = need.max(scope::account_permission(scope));
        let denial = match self.scope_check(caller, scope, Some(id)).await? {
            Err(d) => d,
            Ok(user_id) => {
                let loaded = store::get_with_access(tx, user_id, id, lock).await?;
                match loaded {
                    _ if key_accounts(caller).is_some_and(|ids| !ids.contains(&id)) => {
                        Denial::hidden("key_account_restriction")
                    }
                    None => Denial::hidden("unknown_or_deleted"),
                    Some((_, None)) => Denial::hidden("not_member"),
                    Some((_, Some(access))) if !access.allows(need) => Denial {
                        decided_by: Some(access.rule()),
                        ..Denial::forbidden(
                            "insufficient_role",
                            &format!("your access ({}) does not include {need}", access.as_str()),
                        )
                    },
                    Some((account, Some(access))) => {
                        return Ok(Ok(Granted {
                            user_id,
                            account,
                            access,
                        }))
                    }
                }
            }
        };
        Ok(Err(self
            .record_denial(tx, caller, meta, Some(id), need.as_str(), denial)
            .await))
    }

    /// Records a refusal found after the transaction had started (the row is
    /// written in it), commits, and returns the refusal.
    pub(super) async fn deny_in<T>(
        &self,
        mut tx: crate::store::Tx,
        caller: &Caller,
        meta: &RequestMeta,
        id: Uuid,
        need: Permission,
        d: Denial,
    ) -> ServiceResult<T> {
        let err = self
            .record_denial(&mut tx, caller, meta, Some(id), need.as_str(), d)
            .await;
        self.commit_denial(tx, err).await
    }

    /// Commits a transaction that holds only a denial's audit row.
    pub(super) async fn commit_denial<T>(
        &self,
        tx: crate::store::Tx,
        err: ServiceError,
    ) -> ServiceResult<T> {
        tx.commit().await.map_err(StoreError::from)?;
        Err(err)
    }

    /// The service-client methods decide here, not in the transport: only a
    /// service client holding `scope` passes; any other caller is refused and the
    /// refusal audited.
    async fn require_client_scope(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        scope: &'static str,
        account: Option<Uuid>,
    ) -> ServiceResult<()> {
        let holds = matches!(caller, Caller::ServiceClient { scopes, .. } if scopes.iter().any(|s| s == scope));
        if holds {
            return Ok(());
        }
        let mut conn = self.db.pool.acquire().await.map_err(StoreError::from)?;
        let d = Denial::forbidden("client_scope", &format!("requires the {scope} scope"));
        Err(self
            .record_denial(&mut conn, caller, meta, account, scope, d)
            .await)
    }

    pub(super) async fn membership_changed(&self, account: Uuid, user: Uuid) {
        self.invalidation.publish(Change::Account(account)).await;
        self.invalidation.publish(Change::User(user)).await;
    }
}

/// Moves every sealed value to the active key. Each account is its own
/// transaction (row locked, re-checked), so the command can be interrupted and
/// re-run; values already under the active key are left alone.
pub async fn reencrypt_credentials(db: &Db, keys: &KeyRing) -> ServiceResult<ReencryptSummary> {
    let active = keys.active_kid().to_string();
    let ids = store::ids_sealed_with_other_key(&db.pool, &active).await?;
    let mut summary = ReencryptSummary {
        active_key_id: active.clone(),
        candidates: ids.len(),
        reencrypted: 0,
        already_current: 0,
        failed: Vec::new(),
    };
    for id in ids {
        let mut tx = db.begin().await?;
        let Some(sealed) = store::sealed_for_update(&mut tx, id).await? else {
            summary.already_current += 1;
            continue;
        };
        if sealed.credentials_key_id == active {
            summary.already_current += 1;
            continue;
        }
        let from = sealed.credentials_key_id.clone();
        let (outcome, action, details) = match open_credentials(keys, id, &sealed)
            .and_then(|c| seal_credentials_raw(keys, id, &c))
        {
            Ok(resealed) => {
                store::reseal(&mut tx, id, &resealed).await?;
                summary.reencrypted += 1;
                (
                    Outcome::Success,
                    "trading_account.credentials.reencrypted",
                    json!({ "from_key_id": from, "to_key_id": active }),
                )
            }
            Err(e) => {
                summary.failed.push(ReencryptFailure {
                    account_id: id,
                    error: e.to_string(),
                });
                (
                    Outcome::Failure,
                    "trading_account.credentials.decrypt_failed",
                    json!({ "key_id": from, "error": aead_reason(&e), "during": "reencrypt" }),
                )
            }
        };
        audit::insert(
            &mut tx,
            &AuditEntry::new(action, outcome)
                .actor("system", "reencrypt-credentials")
                .target(TARGET, id)
                .details(details),
        )
        .await?;
        tx.commit().await.map_err(StoreError::from)?;
    }
    Ok(summary)
}

impl AccountsService {
    /// Writes the `authz.denied` row (the first ones of a stream: see
    /// `DenialAudit`) and returns the error the client gets. If the
    /// row cannot be written the request fails anyway, so nothing is lost silently.
    async fn record_denial(
        &self,
        conn: &mut PgConnection,
        caller: &Caller,
        meta: &RequestMeta,
        account: Option<Uuid>,
        need: &str,
        d: Denial,
    ) -> ServiceError {
        let mut entry = AuditEntry::new("authz.denied", Outcome::Denied)
            .by(caller)
            .meta(meta)
            .details(json!({
                "reason": d.reason,
                "need": need,
                "decided_by": d.decided_by,
                "user_id": caller.user_id(),
            }));
        if let Some(id) = account {
            entry = entry.target(TARGET, id);
        }
        match self.policy.denials.write(conn, entry).await {
            Ok(()) => d.error,
            Err(e) => ServiceError::from(e),
        }
    }
}

fn account_resource(id: Uuid) -> Resource {
    Resource::Item {
        kind: TARGET.into(),
        id: id.to_string(),
    }
}

/// The accounts an API key is restricted to; `None` when unrestricted.
fn key_accounts(caller: &Caller) -> Option<&[Uuid]> {
    match caller {
        Caller::User { key: Some(k), .. } if !k.trading_account_ids.is_empty() => {
            Some(&k.trading_account_ids)
        }
        _ => None,
    }
}

fn aead_reason(e: &AeadError) -> &'static str {
    match e {
        AeadError::UnknownKey(_) => "unknown_key",
        AeadError::Tampered => "authentication_failed",
        AeadError::BadKeyRing(_) | AeadError::Seal => "crypto_error",
    }
}

fn seal_credentials_raw(
    keys: &KeyRing,
    id: Uuid,
    c: &BrokerCredentials,
) -> Result<SealedCredentials, AeadError> {
    let seal = |field: &str, v: &str| keys.seal(&credential_aad(id, field), v.as_bytes());
    Ok(SealedCredentials {
        api_key_ciphertext: seal("api_key", &c.api_key)?,
        api_secret_ciphertext: seal("api_secret", &c.api_secret)?,
        access_token_ciphertext: c
            .access_token
            .as_deref()
            .map(|t| seal("access_token", t))
            .transpose()?,
        credentials_key_id: keys.active_kid().to_string(),
    })
}

fn seal_credentials(
    keys: &KeyRing,
    id: Uuid,
    c: &BrokerCredentials,
) -> ServiceResult<SealedCredentials> {
    seal_credentials_raw(keys, id, c).map_err(ServiceError::internal)
}

fn open_credentials(
    keys: &KeyRing,
    id: Uuid,
    s: &SealedCredentials,
) -> Result<BrokerCredentials, AeadError> {
    let open = |field: &str, ct: &[u8]| -> Result<String, AeadError> {
        let bytes = keys.open(&s.credentials_key_id, &credential_aad(id, field), ct)?;
        String::from_utf8(bytes).map_err(|_| AeadError::Tampered)
    };
    Ok(BrokerCredentials {
        api_key: open("api_key", &s.api_key_ciphertext)?,
        api_secret: open("api_secret", &s.api_secret_ciphertext)?,
        access_token: s
            .access_token_ciphertext
            .as_deref()
            .map(|ct| open("access_token", ct))
            .transpose()?,
    })
}
