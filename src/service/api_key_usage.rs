//! API key usage without a write per request: a bounded in-memory buffer, flushed
//! in batches every USAGE_LOG_FLUSH_INTERVAL_MS and once more at shutdown. When the
//! buffer is full new records are dropped and counted, never blocking a request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::task::TaskTracker;

use crate::shutdown::Shutdown;
use crate::store::api_keys::{flush_usage, UsageRecord};
use crate::store::Db;

pub struct UsageBuffer {
    records: Mutex<Vec<UsageRecord>>,
    capacity: usize,
    dropped: AtomicU64,
}

impl UsageBuffer {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            records: Mutex::new(Vec::with_capacity(capacity.min(65_536))),
            capacity: capacity.max(1),
            dropped: AtomicU64::new(0),
        })
    }

    pub fn record(&self, r: UsageRecord) {
        let mut records = self.records.lock().expect("usage buffer lock");
        if records.len() >= self.capacity {
            drop(records);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("api_key_usage_dropped_total").increment(1);
            return;
        }
        records.push(r);
    }

    /// Records waiting for the next flush.
    pub fn depth(&self) -> usize {
        self.records.lock().expect("usage buffer lock").len()
    }

    /// Records dropped because the buffer was full, since start.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn take(&self) -> Vec<UsageRecord> {
        std::mem::take(&mut *self.records.lock().expect("usage buffer lock"))
    }

    /// Puts a batch that failed to flush back in front, as far as room allows.
    fn put_back(&self, mut batch: Vec<UsageRecord>) {
        let mut records = self.records.lock().expect("usage buffer lock");
        let room = self.capacity.saturating_sub(records.len());
        if batch.len() > room {
            let lost = batch.len() - room;
            batch.truncate(room);
            self.dropped.fetch_add(lost as u64, Ordering::Relaxed);
            metrics::counter!("api_key_usage_dropped_total").increment(lost as u64);
        }
        batch.append(&mut records);
        *records = batch;
    }

    async fn flush(&self, db: &Db) -> bool {
        let batch = self.take();
        if batch.is_empty() {
            return true;
        }
        match flush_usage(&db.pool, &batch).await {
            Ok(()) => {
                metrics::counter!("api_key_usage_flushed_total").increment(batch.len() as u64);
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
                if this.flush(&db).await && this.records.lock().expect("lock").is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }
}
