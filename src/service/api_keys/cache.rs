//! The verification cache: entries keyed by the key's hash, hits kept past
//! their fresh time for PostgreSQL outages (stale-while-revalidate), misses
//! briefly; loads that overlap an invalidation are answered but not cached.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::verify::{KeyInfo, VerifiedKey};
use super::ApiKeyService;
use crate::crypto::api_key_hash::ApiKeyHasher;
use crate::domain::api_key::parse_allowed_ip;
use crate::domain::user::{Role, User, UserStatus};
use crate::service::invalidation::Change;
use crate::service::swr::{Lean, Stamp};
use crate::service::{ServiceError, ServiceResult};
use crate::shutdown::Shutdown;
use crate::store::api_keys as store;

/// Keys reloaded per query by the refresh ahead of staleness.
const REFRESH_BATCH: usize = 1000;

#[derive(Clone)]
pub(super) enum CacheEntry {
    /// No such key, as of this instant (kept API_KEY_NEGATIVE_CACHE_TTL_SECONDS).
    Missing(Stamp),
    Key(Arc<VerifiedKey>),
}

/// The verification cache. Hits are fresh API_KEY_CACHE_TTL_SECONDS and kept
/// CACHE_STALE_SECONDS more for PostgreSQL outages; misses live
/// API_KEY_NEGATIVE_CACHE_TTL_SECONDS. Entries are judged by their load time on
/// read (see `service::swr` for why quick_cache and not moka). Keyed by the
/// first half of the key's HMAC (`slot`): a collision of 128 bits of a keyed
/// hash is out of reach, and the load compares the whole hash anyway.
pub(super) type KeyCache = Lean<[u8; 16], CacheEntry>;

/// A key hash's place in the cache.
fn slot(hash: &[u8; 32]) -> [u8; 16] {
    let mut s = [0u8; 16];
    s.copy_from_slice(&hash[..16]);
    s
}

impl ApiKeyService {
    pub(super) async fn lookup(&self, hash: [u8; 32]) -> ServiceResult<CacheEntry> {
        // The common case first: a plain get is cheaper than the placeholder
        // machinery, and tells a hit from a miss for the metrics.
        let slot = slot(&hash);
        if let Some(entry) = self.verified.get(&slot) {
            match &entry {
                CacheEntry::Key(k) => {
                    let age = k.loaded_at.elapsed();
                    if age > self.fresh {
                        return Box::pin(self.revalidate(hash, entry)).await;
                    }
                    if age > self.refresh_after {
                        self.queue_refresh(k, slot);
                    }
                    self.counters.cache_hits.increment(1);
                    return Ok(entry);
                }
                CacheEntry::Missing(at) if at.elapsed() > self.miss_ttl => {
                    // Lapsed: read again below (unless someone already has).
                    let at = *at;
                    self.verified
                        .remove_if(&slot, |e| matches!(e, CacheEntry::Missing(t) if *t == at));
                }
                CacheEntry::Missing(_) => {
                    self.counters.cache_hits.increment(1);
                    return Ok(entry);
                }
            }
        }
        let epoch = self.epoch.load(Ordering::SeqCst);
        // Concurrent misses of one key wait for the first one's read.
        let guard = match self.verified.get_value_or_guard_async(&slot).await {
            Ok(entry) => return Ok(entry),
            Err(guard) => guard,
        };
        self.counters.cache_misses.increment(1);
        let _permit = self
            .miss_permits
            .acquire()
            .await
            .map_err(ServiceError::internal)?;
        // On an error the guard is dropped unfilled and a waiter tries itself.
        // Boxed, as is the revalidation above: the database read's future is
        // most of this one's size, and every hit would carry it.
        let entry = Box::pin(self.load(&hash)).await?;
        // Loaded while an invalidation ran: answer with it, but do not cache it.
        if self.epoch.load(Ordering::SeqCst) == epoch {
            let _ = guard.insert(entry.clone());
            self.drop_if_invalidated_since(epoch, &slot);
        }
        Ok(entry)
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
                    let slot = slot(&hash);
                    self.verified.insert(slot, entry.clone());
                    self.drop_if_invalidated_since(epoch, &slot);
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

    /// An invalidation that ran between the epoch check and the insert may have
    /// passed over the new entry (its pass skips a filling placeholder): drop it.
    fn drop_if_invalidated_since(&self, epoch: u64, slot: &[u8; 16]) {
        if self.epoch.load(Ordering::SeqCst) != epoch {
            self.verified.remove(slot);
        }
    }

    /// Queues a key in use for the next refresh, once per load.
    fn queue_refresh(&self, k: &VerifiedKey, slot: [u8; 16]) {
        // Read first: the hits of the last quarter of a fresh time do not all
        // write to the entry.
        if !k.refresh_queued.load(Ordering::Relaxed)
            && !k.refresh_queued.swap(true, Ordering::Relaxed)
        {
            self.refresh_queue
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((k.key.id, slot));
        }
    }

    /// Reloads the keys hit in the last quarter of their fresh time, in one query
    /// per `REFRESH_BATCH`, before they go stale: no request then waits for a
    /// revalidation, and PostgreSQL answers one query per batch instead of one
    /// per key and fresh time (100,000 keys in use would be ~1,700 queries a
    /// second per replica). Keys unused lately are left to expire. A batch that
    /// overlaps an invalidation of keys is dropped, and so are a failed batch and
    /// those after it (PostgreSQL down): their keys are queued again by their
    /// next hit, and once stale go through the on-request revalidation with its
    /// stale bound.
    /// Answers how many entries were reloaded.
    pub async fn refresh_ahead(&self) -> ServiceResult<usize> {
        let mut queued =
            std::mem::take(&mut *self.refresh_queue.lock().unwrap_or_else(|p| p.into_inner()));
        // A key reloaded and hit again before this pass is queued twice; the
        // second copy would find no row left and drop the fresh entry.
        queued.sort_unstable();
        queued.dedup();
        let mut reloaded = 0;
        for (n, batch) in queued.chunks(REFRESH_BATCH).enumerate() {
            match self.refresh_batch(batch).await {
                Ok(count) => reloaded += count,
                Err(e) => {
                    // This batch and the ones after it: queued again by a hit.
                    self.requeue_on_next_hit(&queued[n * REFRESH_BATCH..]);
                    return Err(e);
                }
            }
        }
        metrics::counter!("cache_refreshed_total", "cache" => "api_keys")
            .increment(reloaded as u64);
        Ok(reloaded)
    }

    async fn refresh_batch(&self, batch: &[(Uuid, [u8; 16])]) -> ServiceResult<usize> {
        let epoch = self.epoch.load(Ordering::SeqCst);
        let ids: Vec<Uuid> = batch.iter().map(|(id, _)| *id).collect();
        let rows = Box::pin(store::find_by_ids(&self.db, &ids)).await?;
        let mut fresh = HashMap::with_capacity(rows.len());
        for row in rows {
            let Ok(hash) = <[u8; 32]>::try_from(row.key.key_hash.as_slice()) else {
                continue;
            };
            let id = row.key.id;
            fresh.insert(id, (slot(&hash), Box::pin(self.entry_from(row)).await?));
        }
        let mut reloaded = 0;
        for (i, (id, at)) in batch.iter().enumerate() {
            // Read before an invalidation that has run since: not cached, not
            // even for the moment until `drop_if_invalidated_since`.
            if self.epoch.load(Ordering::SeqCst) != epoch {
                self.requeue_on_next_hit(&batch[i..]);
                break;
            }
            match fresh.remove(id) {
                Some((s, entry)) if s == *at => {
                    self.verified.insert(*at, entry);
                    reloaded += 1;
                }
                // Deleted, or its hash changed: read again on demand.
                _ => {
                    self.verified.remove(at);
                }
            }
            self.drop_if_invalidated_since(epoch, at);
        }
        Ok(reloaded)
    }

    fn requeue_on_next_hit(&self, batch: &[(Uuid, [u8; 16])]) {
        for (id, at) in batch {
            if let Some(CacheEntry::Key(k)) = self.verified.get(at) {
                if k.key.id == *id {
                    k.refresh_queued.store(false, Ordering::Relaxed);
                }
            }
        }
    }

    /// The refresh every second, tracked by `tasks`, until `shutdown`.
    pub fn spawn_refresher(self: &Arc<Self>, shutdown: Shutdown, tasks: &TaskTracker) {
        let this = self.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.wait() => break,
                    _ = tick.tick() => {
                        if let Err(e) = this.refresh_ahead().await {
                            tracing::debug!(error = %e, "API-key cache refresh failed");
                        }
                    }
                }
            }
        });
    }

    async fn load(&self, hash: &[u8; 32]) -> ServiceResult<CacheEntry> {
        self.db_lookups.fetch_add(1, Ordering::Relaxed);
        let Some(row) = store::find_by_hash(&self.db, hash).await? else {
            return Ok(CacheEntry::Missing(Stamp::now()));
        };
        // The index found it; confirm without a timing side channel anyway.
        if !ApiKeyHasher::matches(&row.key.key_hash, hash) {
            return Ok(CacheEntry::Missing(Stamp::now()));
        }
        self.entry_from(row).await
    }

    /// The cache entry for a key read from PostgreSQL: its grant narrowed to
    /// what its owner holds now, and the accounts it may act on.
    async fn entry_from(&self, row: store::KeyWithOwner) -> ServiceResult<CacheEntry> {
        let key = row.key;
        // The column's check constraint allows only these two.
        let status = UserStatus::parse(&row.user_status).unwrap_or(UserStatus::Disabled);
        let usable = key.revoked_at.is_none() && status == UserStatus::Active;
        let (user_scopes, accounts) = if usable {
            (
                // The owner's roles came with the row: their grant without a
                // query or a cache entry per user.
                self.policy.scopes_for_roles(&row.user_roles).await?,
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
                name: key.name.into(),
                prefix: key.prefix.into(),
                scopes,
                expires_at: key.expires_at,
                allowed_ips: key
                    .allowed_ips
                    .iter()
                    .filter_map(|s| parse_allowed_ip(s))
                    .collect(),
                trading_account_ids: key.trading_account_ids.into(),
                rate_limit_per_minute: key.rate_limit_per_minute,
                revoked: key.revoked_at.is_some(),
            },
            user: self.user_copies.share(User {
                id: key.user_id,
                email: row.user_email,
                full_name: row.user_full_name,
                roles: Role::from_names(&row.user_roles),
                status,
                email_verified: row.user_email_verified,
                created_at: row.user_created_at,
            }),
            accounts,
            loaded_at: Stamp::now(),
            refresh_queued: AtomicBool::new(false),
        })))
    }
}

/// A pass over every entry for a key, user or account change: these are rare
/// next to verifications (a revoked key, a role change), and an invalidation
/// must never leave a matching entry behind.
/// Drops the entries `change` touches, moving `epoch` first so that a load or
/// refresh in flight is not cached. Sessions and profiles touch nothing a key
/// holds, and one comes with every token refresh: they move neither.
pub(super) fn drop_matching(cache: &KeyCache, epoch: &AtomicU64, change: Change) {
    let drop_keys = |gone: &dyn Fn(&VerifiedKey) -> bool| {
        epoch.fetch_add(1, Ordering::SeqCst);
        cache.retain(|_, e| !matches!(e, CacheEntry::Key(k) if gone(k)));
    };
    match change {
        Change::Everything => {
            epoch.fetch_add(1, Ordering::SeqCst);
            cache.clear();
        }
        // Nothing a key grants: its cached owner name may lag by the cache TTL.
        Change::Session(_) | Change::Profile(_) => {}
        Change::ApiKey(id) => drop_keys(&|k| k.key.id == id),
        Change::User(id) => drop_keys(&|k| k.user.id == id),
        Change::Account(id) => drop_keys(&|k| {
            k.key.trading_account_ids.contains(&id) || k.accounts.iter().any(|a| a.account.id == id)
        }),
    }
}
