//! Notifications through a transactional outbox. `notify` writes a message in the
//! transaction of the change that causes it (so a rollback sends nothing and a
//! crash loses nothing); the `Dispatcher`, one per replica, delivers due messages
//! to the alert service with backoff, at least once, each under its
//! `Idempotency-Key` so the receiver can drop a repeat.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use serde_json::Value;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::{ServiceError, ServiceResult};
use crate::alert::{Notification, Refused, Sink};
use crate::config::Settings;
use crate::domain::recovery::{backoff, Template};
use crate::shutdown::Shutdown;
use crate::store::{outbox, Db, StoreError, Tx};

/// Messages one dispatcher claims (and sends concurrently) per round.
const BATCH: i64 = 16;
/// Delivered messages older than this are dropped from the outbox.
const KEEP_DELIVERED_DAYS: i32 = 7;
/// Polls between two purges of delivered messages.
const PURGE_EVERY: u32 = 600;
/// Polls between two readings of the pending gauge.
const GAUGE_EVERY: u32 = 10;

/// Queues `template` for the user's current address, in `tx`. For callers that
/// have the user id only (security notices: `mfa_enabled`, `password_changed` …).
pub async fn notify(
    tx: &mut Tx,
    template: Template,
    user_id: Uuid,
    data: Value,
) -> ServiceResult<()> {
    let email = crate::store::users::by_id(tx, user_id)
        .await?
        .ok_or(ServiceError::NotFound("user"))?
        .email;
    notify_to(tx, template, &email, Some(user_id), data).await
}

/// Queues `template` for the address `to`, in `tx`.
pub async fn notify_to(
    tx: &mut Tx,
    template: Template,
    to: &str,
    user_id: Option<Uuid>,
    data: Value,
) -> ServiceResult<()> {
    outbox::insert(tx, Uuid::now_v7(), template.as_str(), to, user_id, &data).await?;
    // Counted when written: a write whose transaction rolls back still counts.
    metrics::counter!("notifications_total", "template" => template.as_str(), "result" => "queued")
        .increment(1);
    Ok(())
}

/// Delivers the outbox on this replica until shutdown.
pub struct Dispatcher {
    db: Db,
    sink: Sink,
    max_attempts: u32,
    backoff_base: Duration,
    backoff_max: Duration,
    poll: Duration,
}

impl Dispatcher {
    pub fn new(settings: &Settings, db: Db) -> anyhow::Result<Self> {
        Ok(Self {
            db,
            sink: Sink::from_settings(settings)?,
            max_attempts: settings.notify_max_attempts.max(1),
            backoff_base: Duration::from_millis(settings.notify_backoff_base_ms.max(1)),
            backoff_max: Duration::from_millis(settings.notify_backoff_max_ms.max(1)),
            poll: Duration::from_millis(settings.notify_poll_interval_ms.max(1)),
        })
    }

    /// Spawns the delivery loop on `tasks`. On shutdown it stops claiming; a round
    /// in flight finishes (its sends are bounded by NOTIFY_HTTP_TIMEOUT_MS) or, if
    /// the process exits first, rolls back, and the messages go out after restart.
    pub fn spawn(self, shutdown: Shutdown, tasks: &TaskTracker) {
        let this = Arc::new(self);
        // The series exists from the start (metrics do not appear mid-run).
        metrics::gauge!("notification_outbox_pending").set(0.0);
        tasks.spawn(async move {
            let mut rounds: u32 = 0;
            loop {
                tokio::select! {
                    _ = shutdown.wait() => break,
                    _ = tokio::time::sleep(this.poll) => {}
                }
                // Drain what is due, then wait for the next poll.
                while !shutdown.is_triggered() {
                    match this.round().await {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "notification delivery round failed; retrying at the next poll");
                            break;
                        }
                    }
                }
                rounds = rounds.wrapping_add(1);
                if rounds % PURGE_EVERY == 1 {
                    this.housekeeping().await;
                }
                // A count, not free when the alert service has been down for long.
                if rounds % GAUGE_EVERY == 1 {
                    if let Ok(n) = outbox::pending_count(&this.db).await {
                        metrics::gauge!("notification_outbox_pending").set(n as f64);
                    }
                }
            }
        });
    }

    /// One round: claim due messages (skipping those another replica holds), send
    /// them concurrently, record each outcome, commit. The row locks are held while
    /// the messages are in flight; if the database connection dies meanwhile, the
    /// transaction rolls back and the messages are sent again later, under the same
    /// Idempotency-Key.
    async fn round(&self) -> Result<usize, StoreError> {
        let mut tx = self.db.begin().await?;
        let rows = outbox::claim_due(&mut tx, BATCH).await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let results = futures::future::join_all(rows.iter().map(|r| {
            let n = Notification {
                id: r.id,
                template: r.template.clone(),
                to: r.recipient.clone(),
                user_id: r.user_id,
                data: r.data.clone(),
                created_at: r.created_at,
            };
            async move { self.sink.deliver(&n).await }
        }))
        .await;
        let mut outcomes = Vec::with_capacity(rows.len());
        for (row, result) in rows.iter().zip(results) {
            let attempt = row.attempts.max(0) as u32 + 1;
            let outcome = match result {
                Ok(()) => {
                    outbox::mark_delivered(&mut tx, row.id).await?;
                    "delivered"
                }
                Err(refused) if attempt >= self.max_attempts => {
                    outbox::mark_dead(&mut tx, row.id, &refused.reason).await?;
                    tracing::error!(
                        id = %row.id,
                        template = %row.template,
                        user_id = ?row.user_id,
                        attempts = attempt,
                        reason = %refused.reason,
                        "notification dead: NOTIFY_MAX_ATTEMPTS delivery attempts failed"
                    );
                    "dead"
                }
                Err(refused) => {
                    let wait = self.retry_wait(attempt, &refused);
                    outbox::mark_retry(&mut tx, row.id, wait.as_millis() as i64, &refused.reason)
                        .await?;
                    tracing::warn!(
                        id = %row.id,
                        template = %row.template,
                        attempt,
                        retry_in_ms = wait.as_millis() as u64,
                        reason = %refused.reason,
                        "notification not delivered; will retry"
                    );
                    "retried"
                }
            };
            outcomes.push((row.template.clone(), outcome));
        }
        tx.commit().await?;
        // Counted once the outcome is recorded.
        for (template, result) in outcomes {
            metrics::counter!("notifications_total", "template" => template, "result" => result)
                .increment(1);
        }
        Ok(rows.len())
    }

    /// Exponential backoff with ±20% jitter (replicas retrying one receiver do not
    /// move in step), stretched to the receiver's Retry-After when it asks for more.
    fn retry_wait(&self, failures: u32, refused: &Refused) -> Duration {
        let wait = backoff(failures, self.backoff_base, self.backoff_max);
        let jittered = wait.mul_f64(rand::thread_rng().gen_range(0.8..1.2));
        match refused.retry_after {
            Some(asked) if asked > jittered => asked.min(self.backoff_max),
            _ => jittered,
        }
    }

    async fn housekeeping(&self) {
        match outbox::purge_delivered(&self.db, KEEP_DELIVERED_DAYS).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(purged = n, "old delivered notifications dropped"),
            Err(e) => tracing::debug!(error = %e, "outbox purge skipped"),
        }
    }
}
