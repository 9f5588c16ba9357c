//! API keys: issue, list, revoke, rotate, usage; and verification, the platform's
//! hottest path. Verification results live in an in-process cache keyed by the
//! key's hash (misses, cached briefly, included), dropped on every replica through
//! the invalidation bus; usage goes through a bounded buffer flushed in batches.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use ipnet::IpNet;
use serde_json::json;
use tokio::sync::Semaphore;
use uuid::Uuid;

use super::accounts::AccountsService;
use super::api_key_usage::{KeyUse, UsageBuffer};
use super::audit::{AuditEntry, Outcome};
use super::invalidation::{Change, Invalidation};
use super::paging::{self, Page};
use super::policy::PolicyEngine;
use super::{Caller, FieldError, KeyGrant, RequestMeta, ServiceError, ServiceResult};
use crate::config::{Environment, Settings};
use crate::crypto::api_key_hash::ApiKeyHasher;
use crate::domain::account::{Access, AccountAccess};
use crate::domain::api_key::{
    ip_allowed, parse_allowed_ip, valid_key_name, ApiKeySecret, KeyFormatError, MAX_ALLOWED_IPS,
};
use crate::domain::scope;
use crate::store::api_keys::{self as store, ApiKeyRow, NewApiKey};
use crate::store::{Cache, Db};

const MAX_SCOPES: usize = 50;
/// Requests per minute a key may be limited to, at most.
const MAX_RATE_LIMIT: i64 = 1_000_000;

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
struct VerifyCounters {
    ok: metrics::Counter,
    error: metrics::Counter,
    by_result: [metrics::Counter; VerifyFailure::LABELS.len()],
    cache_hits: metrics::Counter,
    cache_misses: metrics::Counter,
}

impl VerifyCounters {
    fn new() -> Self {
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

#[derive(Debug, Clone)]
pub struct KeyInfo {
    pub id: Uuid,
    pub name: String,
    pub prefix: String,
    /// The key's scopes that its owner still holds.
    pub scopes: Vec<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub allowed_ips: Vec<IpNet>,
    /// As granted; empty means every account the owner can access.
    pub trading_account_ids: Vec<Uuid>,
    pub rate_limit_per_minute: Option<i32>,
    pub revoked: bool,
}

#[derive(Debug, Clone)]
pub struct OwnerInfo {
    pub id: Uuid,
    pub email: String,
    pub full_name: String,
    pub roles: Vec<String>,
    pub status: String,
    pub created_at: DateTime<Utc>,
}

/// A key as verification sees it, with its owner and accounts.
#[derive(Debug)]
pub struct VerifiedKey {
    pub key: KeyInfo,
    pub user: OwnerInfo,
    /// The trading accounts the key may act on, with its owner's access.
    pub accounts: Vec<AccountAccess>,
    /// When it was read from PostgreSQL (stale-while-revalidate).
    pub loaded_at: Instant,
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

#[derive(Clone)]
enum CacheEntry {
    Missing,
    Key(Arc<VerifiedKey>),
}

/// Hits are fresh API_KEY_CACHE_TTL_SECONDS and kept CACHE_STALE_SECONDS more
/// for PostgreSQL outages; misses live API_KEY_NEGATIVE_CACHE_TTL_SECONDS.
struct EntryExpiry {
    hit: Duration,
    miss: Duration,
}

impl moka::Expiry<[u8; 32], CacheEntry> for EntryExpiry {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        value: &CacheEntry,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(match value {
            CacheEntry::Missing => self.miss,
            CacheEntry::Key(_) => self.hit,
        })
    }
}

enum LoadError {
    /// Loaded while an invalidation ran: answer with it, but do not cache it.
    Stale(CacheEntry),
    Failed(ServiceError),
}

/// The public facts of a key (never the key or its hash).
#[derive(Debug, Clone)]
pub struct KeyView {
    pub id: Uuid,
    pub name: String,
    pub prefix: String,
    pub scopes: Vec<String>,
    pub allowed_ips: Vec<String>,
    pub trading_account_ids: Vec<Uuid>,
    pub rate_limit_per_minute: Option<i32>,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl From<ApiKeyRow> for KeyView {
    fn from(r: ApiKeyRow) -> Self {
        Self {
            id: r.id,
            name: r.name,
            prefix: r.prefix,
            scopes: r.scopes,
            allowed_ips: r.allowed_ips,
            trading_account_ids: r.trading_account_ids,
            rate_limit_per_minute: r.rate_limit_per_minute,
            created_at: r.created_at,
            last_used_at: r.last_used_at,
            expires_at: r.expires_at,
            revoked_at: r.revoked_at,
        }
    }
}

/// A freshly issued key: the plaintext is in here and nowhere else, ever.
#[derive(Debug)]
pub struct IssuedKey {
    pub view: KeyView,
    pub secret: ApiKeySecret,
}

#[derive(Debug, Clone, Default)]
pub struct NewKey {
    pub name: String,
    pub scopes: Vec<String>,
    pub expires_at: Option<DateTime<Utc>>,
    pub allowed_ips: Vec<String>,
    pub trading_account_ids: Vec<Uuid>,
    pub rate_limit_per_minute: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct UsageItem {
    pub used_at: DateTime<Utc>,
    pub ip: Option<String>,
    pub operation: String,
    pub result: String,
    /// Identical uses in one flush window share a row; `used_at` is the last.
    pub count: i32,
}

pub struct ApiKeyService {
    db: Db,
    policy: PolicyEngine,
    accounts: AccountsService,
    redis: Cache,
    env: Environment,
    hasher: ApiKeyHasher,
    invalidation: Invalidation,
    verified: moka::future::Cache<[u8; 32], CacheEntry>,
    /// Bumped by every invalidation; a load that overlaps one is not cached.
    epoch: Arc<AtomicU64>,
    usage: Arc<UsageBuffer>,
    /// Misses may use at most half the pool, so a flood of made-up (but
    /// well-formed) keys cannot starve everything else of connections.
    miss_permits: Semaphore,
    db_lookups: AtomicU64,
    /// Per-replica rate-limit counters, used only while Redis is unreachable.
    local_windows: moka::sync::Cache<Uuid, Arc<AtomicU64>>,
    counters: VerifyCounters,
    /// A hit older than this is read again; if PostgreSQL is unreachable it is
    /// still answered until `fresh + stale` (revocations received still apply).
    fresh: Duration,
    stale: Duration,
    /// One stale reload at a time, none for a second after a failure.
    probe: super::swr::Probe,
}

impl ApiKeyService {
    pub fn new(
        settings: &Settings,
        db: Db,
        redis: Cache,
        invalidation: Invalidation,
        policy: PolicyEngine,
        accounts: AccountsService,
    ) -> Self {
        let fresh = Duration::from_secs(settings.api_key_cache_ttl_seconds);
        let stale = Duration::from_secs(settings.cache_stale_seconds);
        // TinyLFU admission keeps a flood of one-off misses from evicting the
        // keys in real use.
        let verified = moka::future::Cache::builder()
            .max_capacity(settings.api_key_cache_capacity)
            .expire_after(EntryExpiry {
                hit: fresh + stale,
                miss: Duration::from_secs(settings.api_key_negative_cache_ttl_seconds),
            })
            .support_invalidation_closures()
            .build();
        let epoch = Arc::new(AtomicU64::new(0));
        {
            let (verified, epoch) = (verified.clone(), epoch.clone());
            invalidation.on_change(move |change| {
                epoch.fetch_add(1, Ordering::SeqCst);
                drop_matching(&verified, change);
            });
        }
        Self {
            db,
            policy,
            accounts,
            redis,
            env: settings.app_env,
            hasher: ApiKeyHasher::new(settings.api_key_hash_secret.as_ref()),
            invalidation,
            verified,
            epoch,
            usage: UsageBuffer::new(settings.usage_log_buffer_capacity),
            miss_permits: Semaphore::new((settings.database_max_connections as usize / 2).max(1)),
            db_lookups: AtomicU64::new(0),
            local_windows: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(60))
                .build(),
            counters: VerifyCounters::new(),
            fresh,
            stale,
            probe: Default::default(),
        }
    }

    pub fn usage_buffer(&self) -> &Arc<UsageBuffer> {
        &self.usage
    }

    /// How many times verification went to PostgreSQL (cache misses that loaded).
    pub fn db_lookups(&self) -> u64 {
        self.db_lookups.load(Ordering::Relaxed)
    }

    // ---- verification -------------------------------------------------------

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
            CacheEntry::Missing => return Ok(Err(VerifyFailure::NotFound)),
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
        if k.user.status != "active" {
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

    async fn lookup(&self, hash: [u8; 32]) -> ServiceResult<CacheEntry> {
        // The common case first: a plain get is cheaper than try_get_with's
        // coalescing machinery, and tells a hit from a miss for the metrics.
        if let Some(entry) = self.verified.get(&hash).await {
            match &entry {
                CacheEntry::Key(k) if k.loaded_at.elapsed() > self.fresh => {
                    return self.revalidate(hash, entry).await;
                }
                _ => {
                    self.counters.cache_hits.increment(1);
                    return Ok(entry);
                }
            }
        }
        let epoch = self.epoch.load(Ordering::SeqCst);
        let loaded = self
            .verified
            .try_get_with(hash, async {
                self.counters.cache_misses.increment(1);
                let _permit = self
                    .miss_permits
                    .acquire()
                    .await
                    .map_err(|e| LoadError::Failed(ServiceError::internal(e)))?;
                let entry = self.load(&hash).await.map_err(LoadError::Failed)?;
                if self.epoch.load(Ordering::SeqCst) != epoch {
                    return Err(LoadError::Stale(entry));
                }
                Ok(entry)
            })
            .await;
        match loaded {
            Ok(e) => Ok(e),
            Err(err) => match &*err {
                LoadError::Stale(e) => Ok(e.clone()),
                LoadError::Failed(ServiceError::Unavailable(m)) => {
                    Err(ServiceError::Unavailable(m.clone()))
                }
                LoadError::Failed(e) => Err(ServiceError::Internal(anyhow::anyhow!("{e:#}"))),
            },
        }
    }

    /// A hit past its fresh time: read again, or, while PostgreSQL is
    /// unreachable, answer the stale copy within its bound. An invalidation
    /// removes the entry, so a revoked key never gets here.
    async fn revalidate(&self, hash: [u8; 32], stale: CacheEntry) -> ServiceResult<CacheEntry> {
        let servable = |e: &CacheEntry| matches!(e, CacheEntry::Key(k) if k.loaded_at.elapsed() <= self.fresh + self.stale);
        let serve_stale = |e: CacheEntry| {
            metrics::counter!("cache_stale_served_total", "cache" => "api_keys").increment(1);
            Ok(e)
        };
        let claimed = self.probe.claim();
        if !claimed && servable(&stale) {
            return serve_stale(stale);
        }
        let epoch = self.epoch.load(Ordering::SeqCst);
        let loaded = self.load(&hash).await;
        if claimed {
            match &loaded {
                Err(ServiceError::Unavailable(_)) => self.probe.failed(),
                _ => self.probe.succeeded(),
            }
        }
        match loaded {
            Ok(entry) => {
                if self.epoch.load(Ordering::SeqCst) == epoch {
                    self.verified.insert(hash, entry.clone()).await;
                }
                Ok(entry)
            }
            Err(ServiceError::Unavailable(m)) => {
                if self.epoch.load(Ordering::SeqCst) == epoch && servable(&stale) {
                    serve_stale(stale)
                } else {
                    Err(ServiceError::Unavailable(m))
                }
            }
            Err(e) => Err(e),
        }
    }

    async fn load(&self, hash: &[u8; 32]) -> ServiceResult<CacheEntry> {
        self.db_lookups.fetch_add(1, Ordering::Relaxed);
        let Some(row) = store::find_by_hash(&self.db.pool, hash).await? else {
            return Ok(CacheEntry::Missing);
        };
        // The index found it; confirm without a timing side channel anyway.
        if !ApiKeyHasher::matches(&row.key.key_hash, hash) {
            return Ok(CacheEntry::Missing);
        }
        let key = row.key;
        let usable = key.revoked_at.is_none() && row.user_status == "active";
        let (user_scopes, accounts) = if usable {
            (
                self.policy.user_scopes(key.user_id).await?,
                self.accounts.accounts_of(key.user_id).await?,
            )
        } else {
            (Vec::new(), Vec::new())
        };
        let scopes = key
            .scopes
            .iter()
            .filter(|s| user_scopes.contains(s))
            .cloned()
            .collect();
        let accounts = accounts
            .into_iter()
            .filter(|a| {
                key.trading_account_ids.is_empty()
                    || key.trading_account_ids.contains(&a.account.id)
            })
            .collect();
        Ok(CacheEntry::Key(Arc::new(VerifiedKey {
            key: KeyInfo {
                id: key.id,
                name: key.name,
                prefix: key.prefix,
                scopes,
                expires_at: key.expires_at,
                allowed_ips: key
                    .allowed_ips
                    .iter()
                    .filter_map(|s| parse_allowed_ip(s))
                    .collect(),
                trading_account_ids: key.trading_account_ids,
                rate_limit_per_minute: key.rate_limit_per_minute,
                revoked: key.revoked_at.is_some(),
            },
            user: OwnerInfo {
                id: key.user_id,
                email: row.user_email,
                full_name: row.user_full_name,
                roles: row.user_roles,
                status: row.user_status,
                created_at: row.user_created_at,
            },
            accounts,
            loaded_at: Instant::now(),
        })))
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
                    scopes: k.key.scopes.clone(),
                    trading_account_ids: k.key.trading_account_ids.clone(),
                }),
            }),
            Err(VerifyFailure::RateLimited { retry_after_secs }) => {
                Err(ServiceError::RateLimited { retry_after_secs })
            }
            Err(_) => Err(ServiceError::InvalidToken),
        }
    }

    // ---- management ---------------------------------------------------------

    #[tracing::instrument(skip_all, fields(user_id))]
    pub async fn create(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        input: NewKey,
    ) -> ServiceResult<IssuedKey> {
        let user_id = key_manager(caller)?;
        tracing::Span::current().record("user_id", tracing::field::display(user_id));
        self.accounts
            .step_up
            .require_step_up(caller, meta, "api_key.create")
            .await?;
        let grants = self.check_grants(user_id, input).await?;
        let secret = ApiKeySecret::generate(self.env);
        let hash = self.hasher.hash(&secret);
        let id = Uuid::now_v7();
        let mut tx = self.db.begin().await?;
        let row = store::insert(
            &mut tx,
            &NewApiKey {
                id,
                user_id,
                name: &grants.name,
                prefix: secret.prefix(),
                key_hash: &hash,
                scopes: &grants.scopes,
                allowed_ips: &grants.allowed_ips,
                trading_account_ids: &grants.trading_account_ids,
                rate_limit_per_minute: grants.rate_limit_per_minute,
                expires_at: grants.expires_at,
                rotated_from: None,
            },
        )
        .await?;
        crate::store::audit::insert(
            &mut tx,
            &AuditEntry::new("api_key.created", Outcome::Success)
                .by(caller)
                .meta(meta)
                .target("api_key", id)
                .details(json!({
                    "key_id": id,
                    "prefix": secret.prefix(),
                    "name": grants.name,
                    "scopes": grants.scopes,
                })),
        )
        .await?;
        tx.commit().await.map_err(crate::store::StoreError::from)?;
        Ok(IssuedKey {
            view: row.into(),
            secret,
        })
    }

    /// Every rule a new key's grant must meet: 400 for what is malformed or
    /// unknown, 403 for a scope the user does not hold.
    async fn check_grants(&self, user_id: Uuid, input: NewKey) -> ServiceResult<Grants> {
        let mut errors = Vec::new();
        let name = input.name.trim().to_string();
        if !valid_key_name(&name) {
            errors.push(FieldError::new(
                "name",
                "invalid",
                "must be 1 to 100 printable characters",
            ));
        }

        let catalog = store::grantable_scopes(&self.db.pool).await?;
        let mut scopes: Vec<String> = Vec::new();
        if input.scopes.is_empty() {
            errors.push(FieldError::new(
                "scopes",
                "required",
                "at least one scope is required",
            ));
        } else if input.scopes.len() > MAX_SCOPES {
            errors.push(FieldError::new(
                "scopes",
                "too_many",
                format!("at most {MAX_SCOPES} scopes"),
            ));
        }
        for (i, s) in input.scopes.iter().enumerate() {
            match catalog.iter().find(|(name, _)| name == s) {
                Some((_, true)) => {
                    if !scopes.contains(s) {
                        scopes.push(s.clone());
                    }
                }
                Some((_, false)) => errors.push(FieldError::new(
                    format!("scopes[{i}]"),
                    "not_grantable",
                    format!("scope {s:?} cannot be granted to an API key"),
                )),
                None => errors.push(FieldError::new(
                    format!("scopes[{i}]"),
                    "unknown_scope",
                    format!("unknown scope {s:?}"),
                )),
            }
        }

        if let Some(t) = input.expires_at {
            if let Err(ServiceError::Validation(e)) = paging::check_time("expires_at", Some(t)) {
                errors.extend(e);
            } else if t <= Utc::now() {
                errors.push(FieldError::new(
                    "expires_at",
                    "in_past",
                    "must be in the future",
                ));
            }
        }

        let mut allowed_ips = Vec::new();
        if input.allowed_ips.len() > MAX_ALLOWED_IPS {
            errors.push(FieldError::new(
                "allowed_ips",
                "too_many",
                format!("at most {MAX_ALLOWED_IPS} entries"),
            ));
        }
        for (i, s) in input.allowed_ips.iter().enumerate() {
            match parse_allowed_ip(s) {
                Some(net) => {
                    let net = net.to_string();
                    if !allowed_ips.contains(&net) {
                        allowed_ips.push(net);
                    }
                }
                None => errors.push(FieldError::new(
                    format!("allowed_ips[{i}]"),
                    "invalid",
                    "must be an IPv4 or IPv6 address or CIDR",
                )),
            }
        }

        let rate_limit_per_minute = match input.rate_limit_per_minute {
            None => None,
            Some(n) if (1..=MAX_RATE_LIMIT).contains(&n) => Some(n as i32),
            Some(_) => {
                errors.push(FieldError::new(
                    "rate_limit_per_minute",
                    "out_of_range",
                    format!("must be between 1 and {MAX_RATE_LIMIT}"),
                ));
                None
            }
        };

        let mut trading_account_ids = Vec::new();
        if !input.trading_account_ids.is_empty() {
            let accessible: HashMap<Uuid, Access> = self
                .accounts
                .accounts_of(user_id)
                .await?
                .into_iter()
                .map(|a| (a.account.id, a.access))
                .collect();
            for (i, id) in input.trading_account_ids.iter().enumerate() {
                let field = || format!("trading_account_ids[{i}]");
                match accessible.get(id) {
                    // Same answer for "no such account" and "not yours".
                    None => errors.push(FieldError::new(
                        field(),
                        "unknown_account",
                        "no such trading account",
                    )),
                    Some(access) => {
                        if let Some(s) = scope::first_uncovered(*access, &scopes) {
                            errors.push(FieldError::new(
                                field(),
                                "insufficient_access",
                                format!(
                                    "the scope {s} needs {} on this account; your access is {}",
                                    scope::account_permission(s),
                                    access.as_str()
                                ),
                            ));
                        } else if !trading_account_ids.contains(id) {
                            trading_account_ids.push(*id);
                        }
                    }
                }
            }
        }

        if !errors.is_empty() {
            return Err(ServiceError::Validation(errors));
        }
        let held = self.policy.user_scopes(user_id).await?;
        if let Some(s) = scopes.iter().find(|s| !held.contains(s)) {
            return Err(ServiceError::Forbidden(format!(
                "you do not hold the scope {s:?}"
            )));
        }
        Ok(Grants {
            name,
            scopes,
            expires_at: input.expires_at,
            allowed_ips,
            trading_account_ids,
            rate_limit_per_minute,
        })
    }

    pub async fn list(
        &self,
        caller: &Caller,
        limit: Option<i64>,
        cursor: Option<&str>,
    ) -> ServiceResult<Page<KeyView>> {
        let user_id = key_manager(caller)?;
        let limit = paging::limit(limit)?;
        let before = cursor.map(paging::decode_key::<Uuid>).transpose()?;
        let rows = store::list_for_user(&self.db.pool, user_id, before, limit + 1).await?;
        let page = paging::finish(rows, limit, |r| paging::encode(&r.id.to_string()));
        Ok(page.map(KeyView::from))
    }

    pub async fn get(&self, caller: &Caller, id: Uuid) -> ServiceResult<KeyView> {
        let user_id = key_manager(caller)?;
        store::get_for_user(&self.db.pool, user_id, id)
            .await?
            .map(KeyView::from)
            .ok_or(ServiceError::NotFound("api key"))
    }

    /// Revokes at once on this replica and within a second on the others.
    /// Revoking a revoked key is a no-op.
    pub async fn revoke(&self, caller: &Caller, meta: &RequestMeta, id: Uuid) -> ServiceResult<()> {
        let user_id = key_manager(caller)?;
        let mut tx = self.db.begin().await?;
        let key = store::lock_for_user(&mut tx, user_id, id)
            .await?
            .ok_or(ServiceError::NotFound("api key"))?;
        if store::revoke(&mut tx, id, "revoked").await? {
            crate::store::audit::insert(
                &mut tx,
                &AuditEntry::new("api_key.revoked", Outcome::Success)
                    .by(caller)
                    .meta(meta)
                    .target("api_key", id)
                    .details(json!({ "key_id": id, "prefix": key.prefix })),
            )
            .await?;
        }
        tx.commit().await.map_err(crate::store::StoreError::from)?;
        self.invalidation.publish(Change::ApiKey(id)).await;
        Ok(())
    }

    /// A new key with the same grants; the old one is revoked in the same
    /// transaction.
    pub async fn rotate(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        id: Uuid,
    ) -> ServiceResult<IssuedKey> {
        let user_id = key_manager(caller)?;
        self.accounts
            .step_up
            .require_step_up(caller, meta, "api_key.rotate")
            .await?;
        let mut tx = self.db.begin().await?;
        let old = store::lock_for_user(&mut tx, user_id, id)
            .await?
            .ok_or(ServiceError::NotFound("api key"))?;
        if old.revoked_at.is_some() {
            return Err(ServiceError::Conflict("the api key is revoked".into()));
        }
        if old.expires_at.is_some_and(|t| t <= Utc::now()) {
            return Err(ServiceError::Conflict("the api key has expired".into()));
        }
        let secret = ApiKeySecret::generate(self.env);
        let hash = self.hasher.hash(&secret);
        let new_id = Uuid::now_v7();
        let row = store::insert(
            &mut tx,
            &NewApiKey {
                id: new_id,
                user_id,
                name: &old.name,
                prefix: secret.prefix(),
                key_hash: &hash,
                scopes: &old.scopes,
                allowed_ips: &old.allowed_ips,
                trading_account_ids: &old.trading_account_ids,
                rate_limit_per_minute: old.rate_limit_per_minute,
                expires_at: old.expires_at,
                rotated_from: Some(old.id),
            },
        )
        .await?;
        store::revoke(&mut tx, old.id, "rotated").await?;
        crate::store::audit::insert(
            &mut tx,
            &AuditEntry::new("api_key.rotated", Outcome::Success)
                .by(caller)
                .meta(meta)
                .target("api_key", new_id)
                .details(json!({
                    "key_id": new_id,
                    "prefix": secret.prefix(),
                    "old_key_id": old.id,
                    "old_prefix": old.prefix,
                })),
        )
        .await?;
        tx.commit().await.map_err(crate::store::StoreError::from)?;
        self.invalidation.publish(Change::ApiKey(old.id)).await;
        Ok(IssuedKey {
            view: row.into(),
            secret,
        })
    }

    pub async fn usage(
        &self,
        caller: &Caller,
        id: Uuid,
        limit: Option<i64>,
        cursor: Option<&str>,
    ) -> ServiceResult<Page<UsageItem>> {
        let user_id = key_manager(caller)?;
        let limit = paging::limit(limit)?;
        store::get_for_user(&self.db.pool, user_id, id)
            .await?
            .ok_or(ServiceError::NotFound("api key"))?;
        let before = cursor.map(paging::decode_time_id::<i64>).transpose()?;
        let rows = store::usage_page(&self.db.pool, id, before, limit + 1).await?;
        let page = paging::finish(rows, limit, |r| paging::encode_time_id(r.used_at, r.id));
        Ok(page.map(|r| UsageItem {
            used_at: r.used_at,
            ip: r.ip,
            operation: r.operation,
            result: r.result,
            count: r.request_count,
        }))
    }
}

struct Grants {
    name: String,
    scopes: Vec<String>,
    expires_at: Option<DateTime<Utc>>,
    allowed_ips: Vec<String>,
    trading_account_ids: Vec<Uuid>,
    rate_limit_per_minute: Option<i32>,
}

/// Keys are managed by their owner in person: an API key cannot mint, rotate or
/// revoke keys (it would outlive its own revocation), nor can a service client.
fn key_manager(caller: &Caller) -> ServiceResult<Uuid> {
    match caller {
        Caller::User {
            user_id, key: None, ..
        } => Ok(*user_id),
        Caller::User { key: Some(_), .. } => Err(ServiceError::Forbidden(
            "API keys cannot be managed with an API key".into(),
        )),
        Caller::ServiceClient { .. } => {
            Err(ServiceError::Forbidden("API keys belong to users".into()))
        }
    }
}

fn drop_matching(cache: &moka::future::Cache<[u8; 32], CacheEntry>, change: Change) {
    let dropped = match change {
        Change::Everything => {
            cache.invalidate_all();
            return;
        }
        // Nothing a key grants: its cached owner name may lag by the cache TTL.
        Change::Session(_) | Change::Profile(_) => return,
        Change::ApiKey(id) => cache.invalidate_entries_if(
            move |_, e| matches!(e, CacheEntry::Key(k) if k.key.id == id),
        ),
        Change::User(id) => cache.invalidate_entries_if(
            move |_, e| matches!(e, CacheEntry::Key(k) if k.user.id == id),
        ),
        Change::Account(id) => cache.invalidate_entries_if(move |_, e| {
            matches!(e, CacheEntry::Key(k)
                if k.key.trading_account_ids.contains(&id) || k.accounts.iter().any(|a| a.account.id == id))
        }),
    };
    if dropped.is_err() {
        cache.invalidate_all();
    }
}
