//! The verification cache: entries keyed by the key's hash, hits kept past
//! their fresh time for PostgreSQL outages (stale-while-revalidate), misses
//! briefly; loads that overlap an invalidation are answered but not cached.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::verify::{KeyInfo, VerifiedKey};
use super::ApiKeyService;
use crate::crypto::api_key_hash::ApiKeyHasher;
use crate::domain::api_key::parse_allowed_ip;
use crate::domain::user::{Role, User, UserStatus};
use crate::service::invalidation::Change;
use crate::service::swr::{Lean, Stamp};
use crate::service::{ServiceError, ServiceResult};
use crate::store::api_keys as store;

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
                CacheEntry::Key(k) if k.loaded_at.elapsed() > self.fresh => {
                    return Box::pin(self.revalidate(hash, entry)).await;
                }
                CacheEntry::Missing(at) if at.elapsed() > self.miss_ttl => {
                    // Lapsed: read again below (unless someone already has).
                    let at = *at;
                    self.verified
                        .remove_if(&slot, |e| matches!(e, CacheEntry::Missing(t) if *t == at));
                }
                _ => {
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

    async fn load(&self, hash: &[u8; 32]) -> ServiceResult<CacheEntry> {
        self.db_lookups.fetch_add(1, Ordering::Relaxed);
        let Some(row) = store::find_by_hash(&self.db, hash).await? else {
            return Ok(CacheEntry::Missing(Stamp::now()));
        };
        // The index found it; confirm without a timing side channel anyway.
        if !ApiKeyHasher::matches(&row.key.key_hash, hash) {
            return Ok(CacheEntry::Missing(Stamp::now()));
        }
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
        })))
    }
}

/// A pass over every entry for a key, user or account change: these are rare
/// next to verifications (a revoked key, a role change), and an invalidation
/// must never leave a matching entry behind.
pub(super) fn drop_matching(cache: &KeyCache, change: Change) {
    match change {
        Change::Everything => cache.clear(),
        // Nothing a key grants: its cached owner name may lag by the cache TTL.
        Change::Session(_) | Change::Profile(_) => {}
        Change::ApiKey(id) => {
            cache.retain(|_, e| !matches!(e, CacheEntry::Key(k) if k.key.id == id))
        }
        Change::User(id) => {
            cache.retain(|_, e| !matches!(e, CacheEntry::Key(k) if k.user.id == id))
        }
        Change::Account(id) => cache.retain(|_, e| {
            !matches!(e, CacheEntry::Key(k)
                if k.key.trading_account_ids.contains(&id) || k.accounts.iter().any(|a| a.account.id == id))
        }),
    }
}
