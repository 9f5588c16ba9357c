//! API key usage without a write per request: a bounded in-memory buffer, flushed
//! in batches every USAGE_LOG_FLUSH_INTERVAL_MS and once more at shutdown. Identical
//! uses within a window (key, operation, result, client IP) share one record with a
//! count, so a hot key costs one row per window; when the buffer holds its bound of
//! distinct records, new ones are dropped and counted, never blocking a request.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::task::TaskTracker;

use super::audit::{AuditEntry, Outcome};
use crate::shutdown::Shutdown;
use crate::store::api_keys::{record_usage, NewUsage};
use crate::store::{Db, StoreResult};

/// One record of the buffer: identical uses of a key until the next flush.
#[derive(Debug, Clone)]
struct UsageRecord {
    key_id: uuid::Uuid,
    key_prefix: String,
    used_at: chrono::DateTime<chrono::Utc>,
    ip: Option<IpAddr>,
    operation: String,
    result: &'static str,
    /// A revoked key was presented: audited as `api_key.revoked_used`.
    revoked_use: bool,
    /// How many identical uses this record stands for.
    count: i32,
}

impl UsageRecord {
    fn row(&self) -> NewUsage<'_> {
        NewUsage {
            key_id: self.key_id,
            used_at: self.used_at,
            ip: self.ip,
            operation: &self.operation,
            result: self.result,
            count: self.count,
        }
    }

    /// The audit row for uses of a revoked key: someone still holds it.
    fn revoked_use_entry(&self) -> AuditEntry {
        let entry = AuditEntry::new("api_key.revoked_used", Outcome::Denied)
            .actor("api_key", self.key_id)
            .target("api_key", self.key_id)
            .details(serde_json::json!({
                "key_id": self.key_id,
                "prefix": self.key_prefix,
                "operation": self.operation,
                "used_at": self.used_at,
                "uses": self.count,
            }));
        AuditEntry {
            ip: self.ip,
            ..entry
        }
    }
}

/// Writes a batch in one transaction: the usage rows and last_used_at (the
/// store's part), and an `api_key.revoked_used` row for each record of a
/// revoked key's use.
async fn write_batch(db: &Db, batch: &[UsageRecord]) -> StoreResult<()> {
    let mut tx = db.begin().await?;
    let rows: Vec<NewUsage<'_>> = batch.iter().map(UsageRecord::row).collect();
    record_usage(&mut tx, &rows).await?;
    for r in batch.iter().filter(|r| r.revoked_use) {
        tx.audit(&r.revoked_use_entry()).await?;
    }
    tx.commit().await
}

/// One use of a key, borrowed from the request: nothing is copied unless the
/// use starts a new record.
pub struct KeyUse<'a> {
    pub key_id: uuid::Uuid,
    pub key_prefix: &'a str,
    pub used_at: chrono::DateTime<chrono::Utc>,
    pub ip: Option<IpAddr>,
    pub operation: &'a str,
    pub result: &'static str,
    pub revoked_use: bool,
}

/// What makes two uses the same row, but for the operation: the few records of
/// one group (one per operation) are told apart by a scan, so a repeat use is
/// found without building an owned key.
type Group = (uuid::Uuid, &'static str, Option<IpAddr>);

#[derive(Default)]
struct Records {
    groups: HashMap<Group, Vec<UsageRecord>>,
    len: usize,
}

impl Records {
    /// Adds the use to its record; a new record only when `!full`. False when
    /// dropped. `count` is how many uses it stands for.
    fn merge(&mut self, u: KeyUse<'_>, count: i32, full: bool) -> bool {
        let group = (u.key_id, u.result, u.ip);
        let seen = self
            .groups
            .get_mut(&group)
            .and_then(|records| records.iter_mut().find(|r| r.operation == u.operation));
        if let Some(seen) = seen {
            seen.count = seen.count.saturating_add(count);
            seen.used_at = seen.used_at.max(u.used_at);
            seen.revoked_use |= u.revoked_use;
            return true;
        }
        if full {
            return false;
        }
        // Only now a map entry: a full buffer must not grow by empty groups.
        self.groups.entry(group).or_default().push(UsageRecord {
            key_id: u.key_id,
            key_prefix: u.key_prefix.to_string(),
            used_at: u.used_at,
            ip: u.ip,
            operation: u.operation.to_string(),
            result: u.result,
            revoked_use: u.revoked_use,
            count,
        });
        self.len += 1;
        true
    }
}

pub struct UsageBuffer {
    records: Mutex<Records>,
    capacity: usize,
    dropped: AtomicU64,
}

impl UsageBuffer {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            records: Mutex::new(Records {
                groups: HashMap::with_capacity(capacity.min(65_536)),
                len: 0,
            }),
            capacity: capacity.max(1),
            dropped: AtomicU64::new(0),
        })
    }

    pub fn record(&self, u: KeyUse<'_>) {
        let mut records = self.records.lock().expect("usage buffer lock");
        let full = records.len >= self.capacity;
        if !records.merge(u, 1, full) {
            drop(records);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("api_key_usage_dropped_total").increment(1);
        }
    }

    /// Records waiting for the next flush.
    pub fn depth(&self) -> usize {
        self.records.lock().expect("usage buffer lock").len
    }

    /// Records dropped because the buffer was full, since start.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn take(&self) -> Vec<UsageRecord> {
        std::mem::take(&mut *self.records.lock().expect("usage buffer lock"))
            .groups
            .into_values()
            .flatten()
            .collect()
    }

    /// Merges a batch that failed to flush back in, as far as room allows.
    fn put_back(&self, batch: Vec<UsageRecord>) {
        let mut records = self.records.lock().expect("usage buffer lock");
        let mut lost = 0u64;
        for r in &batch {
            let full = records.len >= self.capacity;
            let u = KeyUse {
                key_id: r.key_id,
                key_prefix: &r.key_prefix,
                used_at: r.used_at,
                ip: r.ip,
                operation: &r.operation,
                result: r.result,
                revoked_use: r.revoked_use,
            };
            if !records.merge(u, r.count, full) {
                lost += r.count.max(1) as u64;
            }
        }
        if lost > 0 {
            self.dropped.fetch_add(lost, Ordering::Relaxed);
            metrics::counter!("api_key_usage_dropped_total").increment(lost);
        }
    }

    async fn flush(&self, db: &Db) -> bool {
        let batch = self.take();
        if batch.is_empty() {
            return true;
        }
        match write_batch(db, &batch).await {
            Ok(()) => {
                let uses: u64 = batch.iter().map(|r| r.count.max(0) as u64).sum();
                metrics::counter!("api_key_usage_flushed_total").increment(uses);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, records = batch.len(), "usage flush failed; will retry");
                self.put_back(batch);
                false
            }
        }
    }

    /// The flusher, tracked by `tasks` so the server's exit waits for its last
    /// flush after `shutdown`.
    pub fn spawn_flusher(
        self: &Arc<Self>,
        db: Db,
        interval: Duration,
        shutdown: Shutdown,
        tasks: &TaskTracker,
    ) {
        let this = self.clone();
        let tracker = tasks.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(interval.max(Duration::from_millis(10)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.wait() => break,
                    _ = tick.tick() => { this.flush(&db).await; }
                }
            }
            // In-flight requests still record while the server drains; the app
            // closes the tracker once the server has stopped, then one last flush.
            while !tracker.is_closed() {
                tokio::time::sleep(Duration::from_millis(50)).await;
                this.flush(&db).await;
            }
            for _ in 0..3 {
                if this.flush(&db).await && this.depth() == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn use_of(key: uuid::Uuid, ip: &str) -> KeyUse<'static> {
        KeyUse {
            key_id: key,
            key_prefix: "sbk_dev_abcdefgh",
            used_at: chrono::Utc::now(),
            ip: ip.parse().ok(),
            operation: "grpc:VerifyApiKey",
            result: "ok",
            revoked_use: false,
        }
    }

    #[test]
    fn identical_uses_share_a_record_and_a_full_buffer_still_counts_them() {
        let buf = UsageBuffer::new(2);
        let (a, b, c) = (
            uuid::Uuid::new_v4(),
            uuid::Uuid::new_v4(),
            uuid::Uuid::new_v4(),
        );
        for _ in 0..3 {
            buf.record(use_of(a, "192.0.2.1"));
        }
        buf.record(use_of(b, "192.0.2.1"));
        assert_eq!(buf.depth(), 2);
        // Full: a new group is dropped and counted, a known one still merges.
        buf.record(use_of(c, "192.0.2.1"));
        buf.record(use_of(a, "192.0.2.1"));
        assert_eq!(buf.dropped(), 1);
        let mut taken = buf.take();
        taken.sort_by_key(|r| std::cmp::Reverse(r.count));
        assert_eq!(taken.len(), 2);
        assert_eq!((taken[0].key_id, taken[0].count), (a, 4));
        assert_eq!((taken[1].key_id, taken[1].count), (b, 1));
        assert_eq!(buf.depth(), 0);
    }

    #[test]
    fn operations_are_separate_records_and_a_full_buffer_keeps_no_empty_groups() {
        let buf = UsageBuffer::new(2);
        let key = uuid::Uuid::new_v4();
        let via = |operation| KeyUse {
            operation,
            ..use_of(key, "2001:db8::1")
        };
        buf.record(via("grpc:VerifyApiKey"));
        buf.record(via("GET /v1/users/me"));
        buf.record(via("GET /v1/users/me"));
        assert_eq!(buf.depth(), 2);
        // Full: uses of other keys are dropped without leaving a map entry behind.
        for _ in 0..100 {
            buf.record(use_of(uuid::Uuid::new_v4(), "192.0.2.7"));
        }
        assert_eq!(buf.dropped(), 100);
        assert_eq!(buf.records.lock().expect("lock").groups.len(), 1);
        let mut taken = buf.take();
        taken.sort_by(|a, b| a.operation.cmp(&b.operation));
        let got: Vec<(&str, i32)> = taken
            .iter()
            .map(|r| (r.operation.as_str(), r.count))
            .collect();
        assert_eq!(got, [("GET /v1/users/me", 2), ("grpc:VerifyApiKey", 1)]);
    }
}
