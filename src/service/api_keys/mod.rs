//! API keys: issue, list, revoke, rotate, usage; and verification, the platform's
//! hottest path. Verification results live in an in-process cache keyed by the
//! key's hash (misses, cached briefly, included), dropped on every replica through
//! the invalidation bus; usage goes through a bounded buffer flushed in batches.
//!
//! `verify` holds the rules a presented key meets, `cache` the verification
//! cache, `manage` the owner's use cases; this file the service.

mod cache;
mod manage;
mod verify;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use uuid::Uuid;

use cache::{drop_matching, KeyCache};
pub use manage::{IssuedKey, KeyView, UsageItem};
use verify::VerifyCounters;
pub use verify::{KeyInfo, VerifiedKey, VerifyFailure, VerifyRequest};

use super::accounts::AccountsService;
use super::api_key_usage::UsageBuffer;
use super::invalidation::Invalidation;
use super::policy::PolicyEngine;
use super::user_copies::UserCopies;
use crate::config::{Environment, Settings};
use crate::crypto::api_key_hash::ApiKeyHasher;
use crate::store::{Cache, Db};

pub struct ApiKeyService {
    db: Db,
    policy: PolicyEngine,
    accounts: AccountsService,
    redis: Cache,
    env: Environment,
    hasher: ApiKeyHasher,
    invalidation: Invalidation,
    verified: Arc<KeyCache>,
    /// Owners' records, one copy shared with the session caches.
    user_copies: Arc<UserCopies>,
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
    /// A hit older than this queues its key for the refresh ahead of staleness
    /// (three quarters of `fresh`), which `refresh_ahead` reloads in batches.
    refresh_after: Duration,
    refresh_queue: std::sync::Mutex<Vec<(Uuid, [u8; 16])>>,
    /// How long "no such key" is believed.
    miss_ttl: Duration,
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
        user_copies: Arc<UserCopies>,
    ) -> Self {
        let fresh = Duration::from_secs(settings.api_key_cache_ttl_seconds);
        let stale = Duration::from_secs(settings.cache_stale_seconds);
        // quick_cache's scan-resistant eviction keeps a flood of one-off misses
        // from evicting the keys in real use.
        let verified: Arc<KeyCache> = Arc::new(super::swr::lean(settings.api_key_cache_capacity));
        let epoch = Arc::new(AtomicU64::new(0));
        {
            let (verified, epoch) = (verified.clone(), epoch.clone());
            invalidation.on_change(move |change| drop_matching(&verified, &epoch, change));
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
            user_copies,
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
            refresh_after: fresh * 3 / 4,
            refresh_queue: Default::default(),
            miss_ttl: Duration::from_secs(settings.api_key_negative_cache_ttl_seconds),
            probe: Default::default(),
        }
    }

    pub fn usage_buffer(&self) -> &Arc<UsageBuffer> {
        &self.usage
    }

    /// How many times verification went to PostgreSQL on a request's path (cache
    /// misses and revalidations that loaded; the refresh ahead of staleness, off
    /// that path, is `cache_refreshed_total`).
    pub fn db_lookups(&self) -> u64 {
        self.db_lookups.load(Ordering::Relaxed)
    }
}
