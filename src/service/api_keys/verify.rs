//! Verification of a presented key: the rules, cheapest and most definitive
//! first, and the counters of the hot path. A bad key is an answer (a
//! `VerifyFailure`), not an error.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ipnet::IpNet;
use uuid::Uuid;

use super::cache::CacheEntry;
use super::ApiKeyService;
use crate::domain::account::{Access, AccountAccess};
use crate::domain::api_key::{ip_allowed, ApiKeySecret, KeyFormatError};
use crate::domain::scope;
use crate::service::api_key_usage::KeyUse;
use crate::service::swr::Stamp;
use crate::service::{Caller, KeyGrant, RequestMeta, ServiceError, ServiceResult};

/// Why a key was refused; each maps to one wire reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyFailure {
    NotFound,
    Malformed,
    Expired,
    Revoked,
    UserDisabled,
    IpNotAllowed,
    InsufficientScope,
    AccountNotAllowed,
    RateLimited { retry_after_secs: u64 },
    WrongEnvironment,
}

impl VerifyFailure {
    /// Every label `as_str` gives, in the order of `VerifyCounters::by_result`.
    const LABELS: [&'static str; 10] = [
        "not_found",
        "malformed",
        "expired",
        "revoked",
        "user_disabled",
        "ip_not_allowed",
        "insufficient_scope",
        "account_not_allowed",
        "rate_limited",
        "wrong_environment",
    ];

    fn index(self) -> usize {
        match self {
            VerifyFailure::NotFound => 0,
            VerifyFailure::Malformed => 1,
            VerifyFailure::Expired => 2,
            VerifyFailure::Revoked => 3,
            VerifyFailure::UserDisabled => 4,
            VerifyFailure::IpNotAllowed => 5,
            VerifyFailure::InsufficientScope => 6,
            VerifyFailure::AccountNotAllowed => 7,
            VerifyFailure::RateLimited { .. } => 8,
            VerifyFailure::WrongEnvironment => 9,
        }
    }

    pub fn as_str(self) -> &'static str {
        Self::LABELS[self.index()]
    }
}

/// The hot path's counters, registered once: looking a labelled counter up in
/// the registry on every call was a measurable share of a warm verification.
pub(super) struct VerifyCounters {
    ok: metrics::Counter,
    error: metrics::Counter,
    by_result: [metrics::Counter; VerifyFailure::LABELS.len()],
    pub(super) cache_hits: metrics::Counter,
    pub(super) cache_misses: metrics::Counter,
}

impl VerifyCounters {
    pub(super) fn new() -> Self {
        let verifications = |result: &'static str| metrics::counter!("api_key_verifications_total", "result" => result);
        Self {
            ok: verifications("ok"),
            error: verifications("error"),
            by_result: VerifyFailure::LABELS.map(verifications),
            cache_hits: metrics::counter!("api_key_cache_hits_total"),
            cache_misses: metrics::counter!("api_key_cache_misses_total"),
        }
    }
}

/// What the caller of VerifyApiKey asks besides "is this key good".
#[derive(Debug, Clone, Default)]
pub struct VerifyRequest {
    pub client_ip: Option<IpAddr>,
    pub required_scopes: Vec<String>,
    pub trading_account_id: Option<Uuid>,
}

/// Boxed slices and strings rather than `Vec`/`String` (8 bytes less each): up
/// to API_KEY_CACHE_CAPACITY of these are cached, and a `VerifiedKey` of 232
/// bytes fell in a 256-byte allocation class, one of 192 in the 192 class.
#[derive(Debug, Clone)]
pub struct KeyInfo {
    pub id: Uuid,
    pub name: Box<str>,
    pub prefix: Box<str>,
    /// The key's scopes that its owner still holds.
    pub scopes: Box<[String]>,
    pub expires_at: Option<DateTime<Utc>>,
    pub allowed_ips: Box<[IpNet]>,
    /// As granted; empty means every account the owner can access.
    pub trading_account_ids: Box<[Uuid]>,
    pub rate_limit_per_minute: Option<i32>,
    pub revoked: bool,
}

/// A key as verification sees it, with its owner and accounts.
#[derive(Debug)]
pub struct VerifiedKey {
    pub key: KeyInfo,
    /// The owner as of the load (one copy shared with the session caches).
    pub user: Arc<crate::domain::user::User>,
    /// The trading accounts the key may act on, with its owner's access.
    pub accounts: Box<[AccountAccess]>,
    /// When it was read from PostgreSQL (stale-while-revalidate).
    pub loaded_at: Stamp,
    /// Set once a hit has queued it for the refresh ahead of staleness.
    pub refresh_queued: AtomicBool,
}

impl VerifiedKey {
    /// The owner's access on `account`, when the key may act on it.
    pub fn access_on(&self, account: Uuid) -> Option<Access> {
        self.accounts
            .iter()
            .find(|a| a.account.id == account)
            .map(|a| a.access)
    }

    /// The key's scopes as they hold for a request: on one account, only those
    /// the owner's access there covers (a caller branching on `scopes` then sees
    /// no `orders:write` on an account where its owner is a viewer).
    pub fn scopes_for(&self, account: Option<Uuid>) -> Vec<String> {
        let access = account.and_then(|a| self.access_on(a));
        self.key
            .scopes
            .iter()
            .filter(|s| match (account, access) {
                (None, _) => true,
                (Some(_), Some(access)) => access.allows(scope::account_permission(s)),
                (Some(_), None) => false,
            })
            .cloned()
            .collect()
    }
}

impl ApiKeyService {
    /// VerifyApiKey: only a service client holding `auth:verify` may ask (a
    /// refusal is audited); then as `verify`.
    pub async fn verify_for_client(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        presented: &str,
        req: &VerifyRequest,
    ) -> ServiceResult<Result<Arc<VerifiedKey>, VerifyFailure>> {
        self.policy
            .require_client_scope(caller, meta, "auth:verify", None)
            .await?;
        self.verify(presented, req, "grpc:VerifyApiKey").await
    }

    /// Verifies a presented key. A bad key is `Ok(Err(reason))`; `Err` only when
    /// the answer cannot be known (the database is unreachable on a cache miss).
    #[tracing::instrument(skip_all)]
    pub async fn verify(
        &self,
        presented: &str,
        req: &VerifyRequest,
        operation: &str,
    ) -> ServiceResult<Result<Arc<VerifiedKey>, VerifyFailure>> {
        let outcome = self.verify_inner(presented, req, operation).await;
        let counters = &self.counters;
        match &outcome {
            Ok(Ok(_)) => &counters.ok,
            Ok(Err(f)) => &counters.by_result[f.index()],
            Err(_) => &counters.error,
        }
        .increment(1);
        outcome
    }

    async fn verify_inner(
        &self,
        presented: &str,
        req: &VerifyRequest,
        operation: &str,
    ) -> ServiceResult<Result<Arc<VerifiedKey>, VerifyFailure>> {
        let secret = match ApiKeySecret::parse(presented, self.env) {
            Ok(s) => s,
            Err(KeyFormatError::Malformed) => return Ok(Err(VerifyFailure::Malformed)),
            Err(KeyFormatError::WrongEnvironment) => {
                return Ok(Err(VerifyFailure::WrongEnvironment))
            }
        };
        let hash = self.hasher.hash(&secret);
        let found = match self.lookup(hash).await? {
            CacheEntry::Missing(_) => return Ok(Err(VerifyFailure::NotFound)),
            CacheEntry::Key(k) => k,
        };
        let outcome = self.judge(&found, req).await;
        self.usage.record(KeyUse {
            key_id: found.key.id,
            key_prefix: &found.key.prefix,
            used_at: Utc::now(),
            ip: req.client_ip,
            operation,
            result: outcome.err().map_or("ok", VerifyFailure::as_str),
            revoked_use: outcome == Err(VerifyFailure::Revoked),
        });
        Ok(outcome.map(|()| found))
    }

    /// The rules, cheapest and most definitive first; the rate limit last so a
    /// refused request does not spend quota.
    async fn judge(&self, k: &VerifiedKey, req: &VerifyRequest) -> Result<(), VerifyFailure> {
        if k.key.revoked {
            return Err(VerifyFailure::Revoked);
        }
        if k.key.expires_at.is_some_and(|t| t <= Utc::now()) {
            return Err(VerifyFailure::Expired);
        }
        if !k.user.is_active() {
            return Err(VerifyFailure::UserDisabled);
        }
        if !k.key.allowed_ips.is_empty() {
            // A key bound to addresses is refused when the address is not known.
            match req.client_ip {
                Some(ip) if ip_allowed(&k.key.allowed_ips, ip) => {}
                _ => return Err(VerifyFailure::IpNotAllowed),
            }
        }
        if !req
            .required_scopes
            .iter()
            .all(|s| k.key.scopes.iter().any(|h| h == s))
        {
            return Err(VerifyFailure::InsufficientScope);
        }
        if let Some(account) = req.trading_account_id {
            // The key acts on the account only as far as its owner may now: a
            // viewer's key is no trading key there, whatever scopes it carries.
            match k.access_on(account) {
                Some(access) if scope::first_uncovered(access, &req.required_scopes).is_none() => {}
                _ => return Err(VerifyFailure::AccountNotAllowed),
            }
        }
        if let Some(limit) = k.key.rate_limit_per_minute {
            self.spend_rate(k.key.id, limit).await?;
        }
        Ok(())
    }

    async fn spend_rate(&self, key_id: Uuid, limit: i32) -> Result<(), VerifyFailure> {
        let window = Duration::from_secs(60);
        let (count, ttl_ms) = match self
            .redis
            .incr_window(&format!("rl:api_key:{key_id}"), window)
            .await
        {
            Ok(v) => v,
            Err(_) => {
                // Redis down: a per-replica window keeps the limit from vanishing.
                let n = self
                    .local_windows
                    .get_with(key_id, || Arc::new(AtomicU64::new(0)))
                    .fetch_add(1, Ordering::Relaxed)
                    + 1;
                (n as i64, 60_000)
            }
        };
        if count > i64::from(limit) {
            let retry_after_secs = (ttl_ms.max(1000) as u64).div_ceil(1000);
            return Err(VerifyFailure::RateLimited { retry_after_secs });
        }
        Ok(())
    }

    /// The gateway's `X-API-Key`: the caller the key stands for, limited to the
    /// key's grant. Any refusal is 401 `invalid_token`, except the rate limit.
    #[tracing::instrument(skip_all)]
    pub async fn authenticate(
        &self,
        presented: &str,
        client_ip: Option<IpAddr>,
        operation: &str,
    ) -> ServiceResult<Caller> {
        let req = VerifyRequest {
            client_ip,
            ..Default::default()
        };
        match self.verify(presented, &req, operation).await? {
            Ok(k) => Ok(Caller::User {
                user_id: k.user.id,
                roles: k.user.roles.clone(),
                session_id: None,
                key: Some(KeyGrant {
                    key_id: k.key.id,
                    scopes: k.key.scopes.to_vec(),
                    trading_account_ids: k.key.trading_account_ids.to_vec(),
                }),
            }),
            Err(VerifyFailure::RateLimited { retry_after_secs }) => {
                Err(ServiceError::RateLimited { retry_after_secs })
            }
            Err(_) => Err(ServiceError::InvalidToken),
        }
    }
}
