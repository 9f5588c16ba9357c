//! An in-process cache whose entries are fresh for a while and then, only while
//! PostgreSQL cannot be reached, may still be served for a bounded time
//! (stale-while-revalidate). Invalidations remove entries outright, so a
//! revocation received is never answered from a stale copy.
//!
//! A load that overlaps an invalidation is answered but not cached (the epoch),
//! so a value read before a revocation committed cannot be stored after it.

use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{ServiceError, ServiceResult};

#[derive(Clone)]
struct Stamped<V> {
    value: V,
    loaded: Instant,
}

/// Cheap to clone; clones share the entries.
#[derive(Clone)]
pub struct SwrCache<K, V> {
    entries: moka::sync::Cache<K, Stamped<V>>,
    fresh: Duration,
    stale: Duration,
    epoch: Arc<AtomicU64>,
    /// While set (millis since `start`), loads are not tried: the database just
    /// failed, so a stale entry is answered at once instead of after a timeout.
    down_until: Arc<AtomicU64>,
    start: Instant,
    stale_served: metrics::Counter,
}

impl<K, V> SwrCache<K, V>
where
    K: Hash + Eq + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// `name` labels the metrics; entries live `fresh`, then `stale` more for
    /// outages only.
    pub fn new(name: &'static str, capacity: u64, fresh: Duration, stale: Duration) -> Self {
        Self {
            entries: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(fresh + stale)
                .support_invalidation_closures()
                .build(),
            fresh,
            stale,
            epoch: Arc::default(),
            down_until: Arc::default(),
            start: Instant::now(),
            stale_served: metrics::counter!("cache_stale_served_total", "cache" => name),
        }
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// The cached value while fresh; otherwise `load` runs, and if it finds the
    /// database unavailable a value loaded within fresh + stale is answered.
    pub async fn get_or_load<F, Fut>(&self, key: K, load: F) -> ServiceResult<V>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = ServiceResult<V>>,
    {
        let cached = self.entries.get(&key);
        let stale = match cached {
            Some(s) if s.loaded.elapsed() <= self.fresh => return Ok(s.value),
            Some(s) if s.loaded.elapsed() <= self.fresh + self.stale => Some(s.value),
            _ => None,
        };
        if let Some(v) = &stale {
            if self.down_until.load(Ordering::Relaxed) > self.now_ms() {
                self.stale_served.increment(1);
                return Ok(v.clone());
            }
        }
        let epoch = self.epoch.load(Ordering::SeqCst);
        match load().await {
            Ok(v) => {
                if self.epoch.load(Ordering::SeqCst) == epoch {
                    self.entries.insert(
                        key,
                        Stamped {
                            value: v.clone(),
                            loaded: Instant::now(),
                        },
                    );
                }
                Ok(v)
            }
            Err(ServiceError::Unavailable(m)) => {
                self.down_until
                    .store(self.now_ms() + 1_000, Ordering::Relaxed);
                // Only an entry no invalidation has touched since it was read.
                match stale {
                    Some(v) if self.epoch.load(Ordering::SeqCst) == epoch => {
                        self.stale_served.increment(1);
                        Ok(v)
                    }
                    _ => Err(ServiceError::Unavailable(m)),
                }
            }
            Err(e) => Err(e),
        }
    }

    pub fn invalidate(&self, key: &K) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.entries.invalidate(key);
    }

    /// Drops every entry `pred` holds for (all of them if the closure registry is
    /// unavailable, which it is not: it is enabled in `new`).
    pub fn invalidate_if(&self, pred: impl Fn(&K, &V) -> bool + Send + Sync + 'static) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        if self
            .entries
            .invalidate_entries_if(move |k, s| pred(k, &s.value))
            .is_err()
        {
            self.entries.invalidate_all();
        }
    }

    pub fn invalidate_all(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.entries.invalidate_all();
    }
}
