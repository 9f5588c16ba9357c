//! Request throttles (sign-ups, logins per client IP): a count per key in a
//! window, in Redis (shared by every replica and transport) or, while Redis is
//! down, in this process, so a throttle never becomes unlimited. Not the lockout:
//! that counts only checked, wrong passwords (`lockout`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{RequestMeta, ServiceError, ServiceResult};
use crate::store::Cache;

pub struct Throttle {
    cache: Cache,
    local: LocalCounters,
}

impl Throttle {
    pub fn new(cache: Cache) -> Self {
        Self {
            cache,
            local: LocalCounters::default(),
        }
    }

    /// Counts one request for `key` in `window`; past `max` (0 = no limit) the
    /// answer is 429 with Retry-After.
    pub async fn check(&self, key: &str, max: u32, window: Duration) -> ServiceResult<()> {
        if max == 0 {
            return Ok(());
        }
        let (n, ttl) = match self.cache.incr_window(key, window).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "rate-limit counter unavailable, using in-process fallback");
                self.local.incr_window(key, window)
            }
        };
        if n > i64::from(max) {
            return Err(ServiceError::RateLimited {
                retry_after_secs: (ttl.max(0) as u64).div_ceil(1000).max(1),
            });
        }
        Ok(())
    }

    /// `check` for `what` (login, register …) per client IP; a request with no
    /// known IP is not throttled here.
    pub async fn per_ip(
        &self,
        meta: &RequestMeta,
        what: &str,
        max: u32,
        window: Duration,
    ) -> ServiceResult<()> {
        match meta.ip {
            Some(ip) => self.check(&format!("{what}:ip:{ip}"), max, window).await,
            None => Ok(()),
        }
    }
}

/// In-process request counters, used only while Redis is unreachable (each
/// replica then limits on its own).
#[derive(Default)]
struct LocalCounters {
    inner: Mutex<HashMap<String, (i64, Instant, Duration)>>,
}

impl LocalCounters {
    /// Same contract as `Cache::incr_window`: (count, milliseconds left).
    fn incr_window(&self, key: &str, window: Duration) -> (i64, i64) {
        let now = Instant::now();
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > 100_000 {
            map.retain(|_, (_, start, w)| now.duration_since(*start) < *w);
        }
        let e = map.entry(key.to_string()).or_insert((0, now, window));
        if now.duration_since(e.1) >= e.2 {
            *e = (0, now, window);
        }
        e.0 += 1;
        let left = e.2.saturating_sub(now.duration_since(e.1));
        (e.0, left.as_millis() as i64)
    }
}
