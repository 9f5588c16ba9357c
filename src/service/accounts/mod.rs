//! Trading accounts, shared access and broker credentials: who sees an account
//! (owner and live members; anyone else gets the same 404 as a missing id), what
//! each member role may do, and the sealed credentials only a service client reads.
//!
//! `authz` decides (the prologue every use case on one account opens with),
//! `manage` the account itself, `members` shared access, `credentials` the
//! sealed broker credentials, `for_clients` the gRPC side; this file holds the
//! service and its caches.

mod authz;
mod credentials;
mod for_clients;
mod manage;
mod members;

use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

pub(super) use authz::{Denial, RowLock};
pub use credentials::{reencrypt_credentials, ReencryptFailure, ReencryptSummary};

use super::invalidation::{Change, Invalidation};
use super::policy::PolicyEngine;
use super::swr::SwrCache;
use super::{Caller, ServiceResult};
use crate::crypto::aead::KeyRing;
use crate::domain::account::{Access, AccountAccess};
use crate::domain::policy::Resource;
use crate::store::accounts as store;
use crate::store::Db;

/// No user holds more accounts than this; the unpaginated list stops here.
const MAX_ACCOUNTS: i64 = 1000;
/// How long a cached access answer or account list may live on a replica that
/// missed an invalidation (Redis down); changes on the same replica apply at once.
const CACHE_TTL: Duration = Duration::from_secs(30);

const TARGET: &str = "trading_account";

#[derive(Clone)]
pub struct AccountsService {
    db: Db,
    /// `None` when CREDENTIALS_ENCRYPTION_KEYS is unset (development only):
    /// credentials can then be neither written nor read.
    keys: Option<Arc<KeyRing>>,
    policy: PolicyEngine,
    invalidation: Invalidation,
    /// (user, account) → access, for CheckAccountAccess and API-key checks.
    /// A load that overlaps an invalidation is not cached (SwrCache's epoch), so
    /// a removal racing a cache fill cannot resurrect the old answer.
    access_cache: SwrCache<(Uuid, Uuid), Option<Access>>,
    /// user → every account they own or share, for ListUserAccounts and API keys.
    lists_cache: SwrCache<Uuid, Arc<Vec<AccountAccess>>>,
    /// REQUIRE_VERIFIED_EMAIL for the step-up operations (issue 15).
    email_gate: crate::service::recovery::EmailGate,
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
        // No stale serving: an authorisation answer is fresh or read again.
        let access_cache: SwrCache<(Uuid, Uuid), Option<Access>> =
            SwrCache::new("account_access", 100_000, CACHE_TTL, Duration::ZERO)
                .counting("account_access_cache_total");
        let lists_cache: SwrCache<Uuid, Arc<Vec<AccountAccess>>> =
            SwrCache::new("account_lists", 20_000, CACHE_TTL, Duration::ZERO)
                .counting("account_list_cache_total");
        {
            let (access, lists) = (access_cache.clone(), lists_cache.clone());
            invalidation.on_change(move |change| match change {
                Change::User(u) => {
                    access.invalidate_if(move |k, _| k.0 == u);
                    lists.invalidate(&u);
                }
                Change::Account(a) => {
                    access.invalidate_if(move |k, _| k.1 == a);
                    lists.invalidate_if(move |_, v| v.iter().any(|x| x.account.id == a));
                }
                Change::Everything => {
                    access.invalidate_all();
                    lists.invalidate_all();
                }
                Change::ApiKey(_) | Change::Session(_) | Change::Profile(_) => {}
            });
        }
        Self {
            db,
            keys,
            policy,
            invalidation,
            access_cache,
            lists_cache,
            email_gate: crate::service::recovery::EmailGate::off(),
            step_up,
        }
    }

    /// The step-up operations refuse unverified emails (REQUIRE_VERIFIED_EMAIL).
    pub fn with_email_gate(mut self, gate: crate::service::recovery::EmailGate) -> Self {
        self.email_gate = gate;
        self
    }

    /// 403 `email_unverified` when the gate is on and the caller is unverified.
    pub async fn require_verified(&self, caller: &Caller) -> ServiceResult<()> {
        self.email_gate.require_verified(caller).await
    }

    pub fn key_ring(&self) -> Option<&KeyRing> {
        self.keys.as_deref()
    }

    // ---- internal queries (the caller has already been authorised) -------------

    /// Every live account the user owns or is a live member of, with the user's
    /// access (owner or member role) and the permissions it carries.
    /// Cached; account and membership changes invalidate it on every replica.
    pub async fn accounts_of(&self, user_id: Uuid) -> ServiceResult<Vec<AccountAccess>> {
        let list = self
            .lists_cache
            .get_or_load(user_id, || async move {
                let list =
                    store::list_for_user(&self.db, user_id, None, None, MAX_ACCOUNTS).await?;
                Ok(Arc::new(list))
            })
            .await?;
        Ok(list.as_ref().clone())
    }

    /// The user's access on one live account; `None` when they have none (or the
    /// account does not exist or is deleted). Cached; membership changes
    /// invalidate it on every replica.
    pub async fn access_of(
        &self,
        user_id: Uuid,
        account_id: Uuid,
    ) -> ServiceResult<Option<Access>> {
        self.access_cache
            .get_or_load((user_id, account_id), || async move {
                Ok(store::access_of(&self.db, user_id, account_id).await?)
            })
            .await
    }

    pub(in crate::service) async fn membership_changed(&self, account: Uuid, user: Uuid) {
        self.invalidation.publish(Change::Account(account)).await;
        self.invalidation.publish(Change::User(user)).await;
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
