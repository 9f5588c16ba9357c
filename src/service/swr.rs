//! An in-process cache whose entries are fresh for a while and then, only while
//! PostgreSQL cannot be reached, may still be served for a bounded time
//! (stale-while-revalidate). Invalidations remove entries outright, so a
//! revocation received is never answered from a stale copy.
//!
//! A load that overlaps an invalidation is answered but not cached (the epoch),
//! so a value read before a revocation committed cannot be stored after it.
//!
//! Storage is `quick_cache` rather than moka: these caches hold an entry per
//! user, session and token (100,000 each by default), and moka's bookkeeping
//! (access and write deques, timer wheel, frequency sketch) costs ~400 bytes per
//! entry before the value, quick_cache's a few dozen. Entries carry their load
//! time and are judged on read, so nothing needs a per-entry timer; an expired
//! entry just waits for eviction (the cache is bounded). One exception, for
//! frequent predicate invalidations: `SwrCache::for_frequent_predicates`.

use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{ServiceError, ServiceResult};

/// Who may try the database for a stale entry: one caller at a time (the
/// others answer the stale copy meanwhile), and nobody for a second after a
/// failure, so an outage costs one timed-out attempt a second, not one per
/// request.
pub struct Probe {
    /// Millis since `start` until which nobody else should try.
    busy_until: AtomicU64,
    start: Instant,
}

impl Default for Probe {
    fn default() -> Self {
        Self {
            busy_until: AtomicU64::new(0),
            start: Instant::now(),
        }
    }
}

impl Probe {
    /// How long a claim holds if its attempt never reports (a cancelled request).
    const CLAIM: Duration = Duration::from_secs(10);
    const AFTER_FAILURE: Duration = Duration::from_secs(1);

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// True when the caller should try the database now (and report back).
    pub fn claim(&self) -> bool {
        let now = self.now_ms();
        let current = self.busy_until.load(Ordering::Acquire);
        current <= now
            && self
                .busy_until
                .compare_exchange(
                    current,
                    now + Self::CLAIM.as_millis() as u64,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    pub fn succeeded(&self) {
        self.busy_until.store(0, Ordering::Release);
    }

    pub fn failed(&self) {
        self.busy_until.store(
            self.now_ms() + Self::AFTER_FAILURE.as_millis() as u64,
            Ordering::Release,
        );
    }
}

/// When an entry was loaded: nanoseconds since this process's first stamp. Half
/// the size of an `Instant` (16 bytes with padding), in every cached entry, and
/// 584 years before it wraps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp(u64);

impl Stamp {
    fn origin() -> Instant {
        static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *ORIGIN.get_or_init(Instant::now)
    }

    pub fn now() -> Self {
        Self(Self::origin().elapsed().as_nanos() as u64)
    }

    pub fn elapsed(self) -> Duration {
        Duration::from_nanos(Self::now().0.saturating_sub(self.0))
    }
}

#[derive(Clone)]
struct Stamped<V> {
    value: V,
    loaded: Stamp,
}

/// A bounded map with quick_cache's scan-resistant eviction (a flood of one-off
/// lookups does not push out the entries in real use).
pub type Lean<K, V> = quick_cache::sync::Cache<K, V>;

/// A `Lean` that holds `capacity` entries. quick_cache bounds each of its
/// shards to an equal share, and keys never hash perfectly evenly, so a cache
/// sized exactly would start evicting a little before it is full: 5 % more
/// keeps a configured bound (TOKEN_CACHE_CAPACITY, …) a number that really fits.
pub fn lean<K: Eq + Hash, V: Clone>(capacity: u64) -> Lean<K, V> {
    Lean::new((capacity + capacity / 20).max(1) as usize)
}

/// One shared copy of each distinct value of a handful (policy lists by role
/// set, tokens' `amr` lists): cached entries point to it instead of holding a
/// copy each. Bounded: past `bound` distinct values, a value is just not shared.
pub struct Interned<T: ?Sized> {
    seen: std::sync::Mutex<Vec<Arc<T>>>,
    bound: usize,
}

impl<T: ?Sized + PartialEq> Interned<T> {
    pub const fn new(bound: usize) -> Self {
        Self {
            seen: std::sync::Mutex::new(Vec::new()),
            bound,
        }
    }

    pub fn share<V: std::borrow::Borrow<T> + Into<Arc<T>>>(&self, value: V) -> Arc<T> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let wanted: &T = value.borrow();
        if let Some(a) = seen.iter().find(|a| &***a == wanted) {
            return a.clone();
        }
        let a: Arc<T> = value.into();
        if seen.len() < self.bound {
            seen.push(a.clone());
        }
        a
    }
}

/// Where a `SwrCache` keeps its entries.
#[derive(Clone)]
enum Entries<K, V> {
    /// Compact; `invalidate_if` is a pass over every entry.
    Lean(Arc<Lean<K, Stamped<V>>>),
    /// ~400 bytes more per entry, but `invalidate_if` only registers its
    /// predicate (applied lazily) and expired entries leave on their own: for a
    /// cache whose entries are dropped by predicate on frequent changes (session
    /// cookies, on every refresh), where a pass over 100,000 entries costs ~2 ms.
    Moka(moka::sync::Cache<K, Stamped<V>>),
}

/// Cheap to clone; clones share the entries.
#[derive(Clone)]
pub struct SwrCache<K, V> {
    entries: Entries<K, V>,
    fresh: Duration,
    stale: Duration,
    epoch: Arc<AtomicU64>,
    probe: Arc<Probe>,
    stale_served: metrics::Counter,
    /// `<metric>{result="hit"|"miss"}`, registered once (see `counting`).
    lookups: Option<Arc<[metrics::Counter; 2]>>,
}

impl<K, V> SwrCache<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// `name` labels the metrics; entries live `fresh`, then `stale` more for
    /// outages only.
    pub fn new(name: &'static str, capacity: u64, fresh: Duration, stale: Duration) -> Self {
        let entries = Entries::Lean(Arc::new(lean(capacity)));
        Self::with_entries(name, entries, fresh, stale)
    }

    /// As `new`, for entries dropped by predicate often (see `Entries::Moka`).
    pub fn for_frequent_predicates(
        name: &'static str,
        capacity: u64,
        fresh: Duration,
        stale: Duration,
    ) -> Self {
        let entries = Entries::Moka(
            moka::sync::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(fresh + stale)
                .support_invalidation_closures()
                .build(),
        );
        Self::with_entries(name, entries, fresh, stale)
    }

    fn with_entries(
        name: &'static str,
        entries: Entries<K, V>,
        fresh: Duration,
        stale: Duration,
    ) -> Self {
        Self {
            entries,
            fresh,
            stale,
            epoch: Arc::default(),
            probe: Arc::default(),
            stale_served: metrics::counter!("cache_stale_served_total", "cache" => name),
            lookups: None,
        }
    }

    /// Counts every lookup in `metric` by result: "hit" (answered from the
    /// cache) or "miss" (`load` ran).
    pub fn counting(mut self, metric: &'static str) -> Self {
        self.lookups = Some(Arc::new(
            ["hit", "miss"].map(|r| metrics::counter!(metric, "result" => r)),
        ));
        self
    }

    fn count(&self, missed: bool) {
        if let Some(c) = &self.lookups {
            c[usize::from(missed)].increment(1);
        }
    }

    /// The cached value while fresh; otherwise `load` runs, and if it finds the
    /// database unavailable a value loaded within fresh + stale is answered.
    pub async fn get_or_load<F, Fut>(&self, key: K, load: F) -> ServiceResult<V>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = ServiceResult<V>>,
    {
        let cached = match &self.entries {
            Entries::Lean(c) => c.get(&key),
            Entries::Moka(c) => c.get(&key),
        };
        let stale = match cached {
            Some(s) if s.loaded.elapsed() <= self.fresh => {
                self.count(false);
                return Ok(s.value);
            }
            Some(s) if s.loaded.elapsed() <= self.fresh + self.stale => Some(s.value),
            _ => None,
        };
        // A stale copy is refreshed by one caller at a time; the rest answer it.
        if let Some(v) = &stale {
            if !self.probe.claim() {
                self.count(false);
                self.stale_served.increment(1);
                return Ok(v.clone());
            }
        }
        self.count(true);
        let epoch = self.epoch.load(Ordering::SeqCst);
        let loaded = load().await;
        if stale.is_some() {
            match &loaded {
                Err(ServiceError::Unavailable(_)) => self.probe.failed(),
                _ => self.probe.succeeded(),
            }
        }
        match loaded {
            Ok(v) => {
                if self.epoch.load(Ordering::SeqCst) == epoch {
                    let entry = Stamped {
                        value: v.clone(),
                        loaded: Stamp::now(),
                    };
                    match &self.entries {
                        Entries::Lean(c) => c.insert(key.clone(), entry),
                        Entries::Moka(c) => c.insert(key.clone(), entry),
                    }
                    // An invalidation that ran between the check and the insert
                    // (its pass may have missed the new entry): drop it again.
                    if self.epoch.load(Ordering::SeqCst) != epoch {
                        self.remove(&key);
                    }
                }
                Ok(v)
            }
            // Only an entry no invalidation has touched since it was read.
            Err(ServiceError::Unavailable(_))
                if stale.is_some() && self.epoch.load(Ordering::SeqCst) == epoch =>
            {
                self.stale_served.increment(1);
                Ok(stale.expect("checked"))
            }
            Err(e) => Err(e),
        }
    }

    pub fn invalidate(&self, key: &K) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.remove(key);
    }

    fn remove(&self, key: &K) {
        match &self.entries {
            Entries::Lean(c) => {
                c.remove(key);
            }
            Entries::Moka(c) => c.invalidate(key),
        }
    }

    /// Drops every entry `pred` holds for. On compact entries that is a pass
    /// over all of them, shard by shard: for rare changes (an account's
    /// membership), not per request (see `for_frequent_predicates`).
    pub fn invalidate_if(&self, pred: impl Fn(&K, &V) -> bool + Send + Sync + 'static) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        match &self.entries {
            Entries::Lean(c) => c.retain(|k, s| !pred(k, &s.value)),
            Entries::Moka(c) => {
                // Fails only without invalidation closures, enabled above.
                if c.invalidate_entries_if(move |k, s| pred(k, &s.value))
                    .is_err()
                {
                    c.invalidate_all();
                }
            }
        }
    }

    pub fn invalidate_all(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        match &self.entries {
            Entries::Lean(c) => c.clear(),
            Entries::Moka(c) => c.invalidate_all(),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The rules every cached key, token and session state relies on: fresh
    //! entries answer without a load, nothing answers past fresh + stale, a stale
    //! copy only while the database is unavailable, and an invalidation is never
    //! undone by a load that overlapped it. Both storages, as both are in use.

    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use super::{Probe, Stamp, SwrCache};
    use crate::service::{ServiceError, ServiceResult};

    const FRESH: Duration = Duration::from_millis(400);
    const STALE: Duration = Duration::from_millis(600);

    fn caches() -> [SwrCache<u32, u32>; 2] {
        [
            SwrCache::new("test", 100, FRESH, STALE),
            SwrCache::for_frequent_predicates("test", 100, FRESH, STALE),
        ]
    }

    /// `get_or_load` with a load answering `answer`, counting its calls.
    async fn get(
        c: &SwrCache<u32, u32>,
        loads: &AtomicU32,
        answer: ServiceResult<u32>,
    ) -> ServiceResult<u32> {
        c.get_or_load(1, || async {
            loads.fetch_add(1, Ordering::SeqCst);
            answer
        })
        .await
    }

    fn down() -> ServiceResult<u32> {
        Err(ServiceError::Unavailable("database down".into()))
    }

    #[tokio::test]
    async fn fresh_entries_answer_without_a_load_and_expire_on_time() {
        for c in caches() {
            let loads = AtomicU32::new(0);
            assert_eq!(get(&c, &loads, Ok(7)).await.unwrap(), 7);
            assert_eq!(get(&c, &loads, Ok(8)).await.unwrap(), 7);
            assert_eq!(loads.load(Ordering::SeqCst), 1);
            tokio::time::sleep(FRESH + Duration::from_millis(30)).await;
            assert_eq!(get(&c, &loads, Ok(8)).await.unwrap(), 8, "loaded again");
            assert_eq!(loads.load(Ordering::SeqCst), 2);
        }
    }

    #[tokio::test]
    async fn stale_copies_only_while_the_database_is_down_and_only_within_the_bound() {
        for c in caches() {
            let loads = AtomicU32::new(0);
            get(&c, &loads, Ok(7)).await.unwrap();
            tokio::time::sleep(FRESH + Duration::from_millis(30)).await;
            // Past fresh: a refusal (not an outage) is answered as it is.
            assert!(matches!(
                get(&c, &loads, Err(ServiceError::InvalidToken)).await,
                Err(ServiceError::InvalidToken)
            ));
            // An outage: the stale copy.
            assert_eq!(get(&c, &loads, down()).await.unwrap(), 7);
            tokio::time::sleep(STALE).await;
            // Past fresh + stale: the outage is the answer.
            assert!(matches!(
                get(&c, &loads, down()).await,
                Err(ServiceError::Unavailable(_))
            ));
        }
    }

    #[tokio::test]
    async fn an_invalidated_entry_is_never_served_stale() {
        for c in caches() {
            let loads = AtomicU32::new(0);
            get(&c, &loads, Ok(7)).await.unwrap();
            c.invalidate(&1);
            assert!(matches!(
                get(&c, &loads, down()).await,
                Err(ServiceError::Unavailable(_))
            ));
            get(&c, &loads, Ok(7)).await.unwrap();
            c.invalidate_if(|k, _| *k == 1);
            assert!(get(&c, &loads, down()).await.is_err());
            get(&c, &loads, Ok(7)).await.unwrap();
            c.invalidate_all();
            assert!(get(&c, &loads, down()).await.is_err());
        }
    }

    #[tokio::test]
    async fn a_load_that_overlaps_an_invalidation_is_answered_not_cached() {
        for c in caches() {
            let answer = c
                .get_or_load(1, || async {
                    // The revocation commits while the old value is in flight.
                    c.invalidate(&1);
                    Ok(7)
                })
                .await
                .unwrap();
            assert_eq!(answer, 7);
            let loads = AtomicU32::new(0);
            assert_eq!(get(&c, &loads, Ok(8)).await.unwrap(), 8);
            assert_eq!(
                loads.load(Ordering::SeqCst),
                1,
                "the overlapped value was not kept"
            );
        }
    }

    #[tokio::test]
    async fn during_an_outage_one_caller_a_second_tries_the_database() {
        let c: SwrCache<u32, u32> = SwrCache::new("test", 100, FRESH, Duration::from_secs(30));
        let loads = AtomicU32::new(0);
        get(&c, &loads, Ok(7)).await.unwrap();
        tokio::time::sleep(FRESH + Duration::from_millis(30)).await;
        assert_eq!(get(&c, &loads, down()).await.unwrap(), 7);
        assert_eq!(loads.load(Ordering::SeqCst), 2);
        // Within a second of the failure: the stale copy, no attempt.
        for _ in 0..5 {
            assert_eq!(get(&c, &loads, down()).await.unwrap(), 7);
        }
        assert_eq!(loads.load(Ordering::SeqCst), 2);
        tokio::time::sleep(Probe::AFTER_FAILURE + Duration::from_millis(50)).await;
        assert_eq!(
            get(&c, &loads, Ok(9)).await.unwrap(),
            9,
            "tried again, recovered"
        );
        assert_eq!(loads.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn stamps_measure_elapsed_time() {
        let s = Stamp::now();
        std::thread::sleep(Duration::from_millis(20));
        let e = s.elapsed();
        assert!(
            e >= Duration::from_millis(20) && e < Duration::from_secs(5),
            "{e:?}"
        );
    }
}
