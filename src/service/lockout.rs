//! Password checks under the lockout policy (`domain::lockout`), shared by login
//! and password change. Only a password actually checked and found wrong is
//! counted, per account and per (account, client IP), with its `failed` audit
//! row and, when it sets a lock, `auth.lockout`, all in one transaction; a store
//! or hashing failure (503) counts nothing. Checks of one user take turns on this
//! replica, so a parallel burst evaluates no more than the limit, while parallel
//! right passwords all pass.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use secrecy::SecretString;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::audit::{AuditEntry, Outcome};
use super::{RequestMeta, ServiceError, ServiceResult};
use crate::config::Settings;
use crate::crypto::password::PasswordHasher;
use crate::domain::lockout::{self, Gate};
use crate::shutdown::Shutdown;
use crate::store::{login_failures, Db};

/// What a credential check under the lockout policy found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    Right,
    Wrong,
    /// Refused without looking at the password (after the same argon2 work).
    Locked,
}

pub struct Lockout {
    db: Db,
    hasher: PasswordHasher,
    /// Password checks of one user take turns (the lockout count stays exact).
    turns: Turns,
    /// LOGIN_MAX_ATTEMPTS wrong passwords within LOGIN_LOCKOUT_SECONDS lock for
    /// as long; a second check while an address is delayed waits
    /// LOGIN_LOCKED_DELAY_MS.
    max_attempts: u32,
    lockout_secs: u64,
    delay: Duration,
}

impl Lockout {
    pub fn new(settings: &Settings, db: Db, hasher: PasswordHasher) -> Self {
        Self {
            db,
            hasher,
            turns: Turns::default(),
            max_attempts: settings.login_max_attempts,
            lockout_secs: settings.login_lockout_seconds,
            delay: Duration::from_millis(settings.login_locked_delay_ms),
        }
    }

    /// Checks `password` of `user_id` against `hash`; `failed` is the audit row
    /// a wrong password writes; the same argon2 work (a decoy) when locked.
    /// `finishes_login`: see `check_guarded`.
    pub async fn check_password(
        &self,
        meta: &RequestMeta,
        user_id: Uuid,
        hash: Option<String>,
        password: SecretString,
        failed: AuditEntry,
        finishes_login: bool,
    ) -> ServiceResult<Checked> {
        let decoy = password.clone();
        self.check_guarded(
            meta,
            user_id,
            failed,
            finishes_login,
            async {
                self.hasher
                    .verify(password, hash)
                    .await
                    .map_err(ServiceError::hashing)
            },
            async {
                // The same argon2 work as a real check: a lock does not show in timing.
                let _ = self.hasher.verify(decoy, None).await;
            },
        )
        .await
    }

    /// Checks a credential of `user_id` (a password, a second factor) under the
    /// lockout policy. A right answer clears the counts only when
    /// `finishes_login` (a password followed by a second factor clears nothing:
    /// the count resets when the login completes). `locked_work` runs instead
    /// of `check` when locked.
    pub async fn check_guarded(
        &self,
        meta: &RequestMeta,
        user_id: Uuid,
        failed: AuditEntry,
        finishes_login: bool,
        check: impl std::future::Future<Output = ServiceResult<bool>>,
        locked_work: impl std::future::Future<Output = ()>,
    ) -> ServiceResult<Checked> {
        let window = self.lockout_secs;
        let ip = meta
            .ip
            .map_or_else(|| "unknown".to_string(), |ip| ip.to_string());
        let mut turn = self.turns.take(user_id).await;
        let (mut account, mut pair) =
            login_failures::standing(&self.db, user_id, &ip, window).await?;
        let mut gate = lockout::gate(account, pair);
        if gate == Gate::Delayed {
            // The second check for an address that has not failed: a wait, out of
            // turn, then the standing again (it may have changed meanwhile).
            drop(turn);
            metrics::counter!("logins_total", "result" => "delayed").increment(1);
            tokio::time::sleep(self.delay).await;
            turn = self.turns.take(user_id).await;
            (account, pair) = login_failures::standing(&self.db, user_id, &ip, window).await?;
            gate = lockout::gate(account, pair);
        }
        if gate == Gate::Locked {
            drop(turn);
            locked_work.await;
            return Ok(Checked::Locked);
        }
        let right = check.await?;
        if right {
            // Nothing counted in the window: no transaction (a login's hot path
            // is one argon2 hash plus the fewest round trips).
            if finishes_login && (account.failures > 0 || pair.failures > 0) {
                let mut tx = self.db.begin().await?;
                login_failures::clear(&mut tx, user_id, &ip, window).await?;
                tx.commit().await?;
            }
            return Ok(Checked::Right);
        }
        let mut tx = self.db.begin().await?;
        let (max, lockout) = (self.max_attempts, self.lockout_secs);
        let mut locks = Vec::new();
        for (scope, key) in [("account", login_failures::ANY_IP), ("client_ip", &ip)] {
            if login_failures::record_failure(&mut tx, user_id, key, window, max, lockout).await? {
                locks.push(scope);
            }
        }
        tx.audit(&failed).await?;
        if !locks.is_empty() {
            let entry = AuditEntry::new("auth.lockout", Outcome::Denied)
                .target("user", user_id)
                .meta(meta)
                .details(serde_json::json!({
                    "locks": locks,
                    "attempts": max,
                    "lockout_seconds": lockout,
                }));
            tx.audit(&entry).await?;
        }
        tx.commit().await?;
        if !locks.is_empty() {
            metrics::counter!("login_lockouts_total").increment(1);
        }
        Ok(Checked::Wrong)
    }
}

/// How often a replica deletes the lockout's expired rows.
pub const SWEEP_EVERY: Duration = Duration::from_secs(600);

impl Lockout {
    /// Deletes the failure counts and locks that no longer count; answers how
    /// many went.
    pub async fn sweep(&self) -> ServiceResult<u64> {
        Ok(login_failures::delete_expired(&self.db, self.lockout_secs).await?)
    }

    /// `sweep` every `SWEEP_EVERY` (the first at once) until `shutdown`.
    pub fn spawn_sweeper(self: &Arc<Self>, shutdown: Shutdown, tasks: &TaskTracker) {
        let this = self.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.wait() => break,
                    _ = tick.tick() => {
                        if let Err(e) = this.sweep().await {
                            tracing::warn!(error = %e, "sweeping expired login failures failed; next time");
                        }
                    }
                }
            }
        });
    }
}

/// One turn at a time per user for password checks on this replica: the lockout
/// count is read, the password checked and the result recorded before the next
/// check of the same user starts.
#[derive(Default)]
struct Turns {
    inner: Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>,
}

struct Turn<'a> {
    turns: &'a Turns,
    user_id: Uuid,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Turns {
    async fn take(&self, user_id: Uuid) -> Turn<'_> {
        let lock = self
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(user_id)
            .or_default()
            .clone();
        Turn {
            turns: self,
            user_id,
            guard: Some(lock.lock_owned().await),
        }
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut map = self.turns.inner.lock().unwrap_or_else(|p| p.into_inner());
        // Nobody else holds or waits for this user's lock: forget it.
        if map
            .get(&self.user_id)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            map.remove(&self.user_id);
        }
    }
}
