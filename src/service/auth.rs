//! Sign-up, login (enumeration-safe, with per-account lockout), refresh-token
//! rotation with reuse detection, logout and service-client tokens.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use uuid::Uuid;

use super::audit::{AuditEntry, Outcome};
use super::identity::{sha256, Identity, SessionState};
use super::{Caller, FieldError, RequestMeta, ServiceError, ServiceResult};
use crate::crypto::client_secret;
use crate::crypto::jwt::TokenType;
use crate::domain::email::Email;
use crate::domain::lockout::{self, Gate};
use crate::domain::password::Password;
use crate::domain::user::User;
use crate::store::{audit, login_failures, service_clients, sessions, users};

/// What a password login answers: tokens, or (the user has a second factor) the
/// second step to take (issue 14).
pub enum LoginOutcome {
    Tokens(LoginTokens),
    MfaRequired(super::mfa_login::SecondStep),
}

/// What a login or refresh hands out. Not Debug: it carries tokens.
pub struct LoginTokens {
    pub access_token: String,
    pub refresh_token: String,
    pub expires_in: u64,
    pub user: User,
    pub session_id: Uuid,
}

pub struct ServiceToken {
    pub access_token: String,
    pub expires_in: u64,
    pub scope: String,
}

/// In-process request counters, used only while Redis is unreachable so a throttle
/// never becomes unlimited (each replica then limits on its own).
#[derive(Default)]
pub struct LocalCounters {
    inner: Mutex<HashMap<String, (i64, Instant, Duration)>>,
}

impl LocalCounters {
    /// Same contract as `Cache::incr_window`: (count, milliseconds left).
    pub fn incr_window(&self, key: &str, window: Duration) -> (i64, i64) {
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

    pub fn reset(&self, key: &str) {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }
}

/// What a password check under the lockout policy found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Checked {
    Right,
    Wrong,
    /// Refused without looking at the password (after the same argon2 work).
    Locked,
}

/// One turn at a time per user for password checks on this replica: the lockout
/// count is read, the password checked and the result recorded before the next
/// check of the same user starts.
#[derive(Default)]
pub struct Turns {
    inner: Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>,
}

pub(crate) struct Turn<'a> {
    turns: &'a Turns,
    user_id: Uuid,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Turns {
    pub(crate) async fn take(&self, user_id: Uuid) -> Turn<'_> {
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

/// A new opaque refresh token: 256 random bits, base64url.
fn new_refresh_token() -> String {
    use base64::Engine as _;
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn password_error(e: crate::domain::password::PasswordError) -> ServiceError {
    ServiceError::Validation(vec![FieldError::new("password", e.code, e.message)])
}

fn full_name_of(raw: &str) -> ServiceResult<String> {
    let s = raw.trim();
    let n = s.chars().count();
    if n == 0 || n > 200 {
        return Err(ServiceError::validation(
            "full_name",
            "invalid_length",
            "full_name must be 1 to 200 characters",
        ));
    }
    if s.chars().any(char::is_control) {
        return Err(ServiceError::validation(
            "full_name",
            "invalid",
            "full_name must not contain control characters",
        ));
    }
    Ok(s.to_string())
}

/// Who creates a user: the user signing up, or an operator at the CLI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CreatedBy {
    SignUp,
    Operator,
}

pub struct RegisterInput {
    pub email: String,
    pub password: String,
    pub full_name: String,
}

impl Identity {
    pub(crate) fn parse_full_name(raw: &str) -> ServiceResult<String> {
        full_name_of(raw)
    }

    pub(crate) fn parse_new_password(
        &self,
        raw: String,
        email: &Email,
        full_name: &str,
    ) -> ServiceResult<Password> {
        let inputs: Vec<&str> = full_name.split_whitespace().collect();
        Password::new_for(raw, self.settings.password_min_length, email, &inputs)
            .map_err(password_error)
    }

    /// Self sign-up: a new active user with role `user`.
    #[tracing::instrument(skip_all)]
    pub async fn register(&self, meta: &RequestMeta, input: RegisterInput) -> ServiceResult<User> {
        if !self.settings.registration_enabled() {
            return Err(ServiceError::Forbidden("self sign-up is disabled".into()));
        }
        let per_hour = self.settings.register_ip_max_per_hour;
        self.throttle_ip(meta, "register", per_hour, Duration::from_secs(3600))
            .await?;
        let mut errors = Vec::new();
        let email = Email::parse(&input.email)
            .map_err(|m| errors.push(FieldError::new("email", "invalid", m)))
            .ok();
        let name = full_name_of(&input.full_name)
            .map_err(|e| {
                if let ServiceError::Validation(v) = e {
                    errors.extend(v)
                }
            })
            .ok();
        let password = match &email {
            Some(email) => self
                .parse_new_password(input.password, email, name.as_deref().unwrap_or(""))
                .map_err(|e| {
                    if let ServiceError::Validation(v) = e {
                        errors.extend(v)
                    }
                })
                .ok(),
            None => None,
        };
        let (Some(email), Some(name), Some(password)) = (email, name, password) else {
            return Err(ServiceError::Validation(errors));
        };
        self.create_user(
            meta,
            CreatedBy::SignUp,
            &email,
            &name,
            password.into_secret(),
            &["user".into()],
        )
        .await
    }

    /// `admin create-user`: an operator creates a user (the first admin) under the
    /// same email and password rules as sign-up.
    #[tracing::instrument(skip_all)]
    pub async fn create_user_by_operator(
        &self,
        email: &str,
        full_name: &str,
        password: String,
        roles: &[String],
    ) -> ServiceResult<User> {
        let email =
            Email::parse(email).map_err(|m| ServiceError::validation("email", "invalid", m))?;
        let name = full_name_of(full_name)?;
        let password = self.parse_new_password(password, &email, &name)?;
        let mut roles = if roles.is_empty() {
            vec!["user".to_string()]
        } else {
            roles.to_vec()
        };
        roles.sort();
        roles.dedup();
        if let Some(bad) = roles
            .iter()
            .find(|r| !crate::domain::user::ROLES.contains(&r.as_str()))
        {
            return Err(ServiceError::validation(
                "role",
                "unknown_role",
                format!("unknown role {bad}"),
            ));
        }
        self.create_user(
            &RequestMeta::default(),
            CreatedBy::Operator,
            &email,
            &name,
            password.into_secret(),
            &roles,
        )
        .await
    }

    /// Creates a user (sign-up or operator) with its audit row in one transaction.
    pub(crate) async fn create_user(
        &self,
        meta: &RequestMeta,
        by: CreatedBy,
        email: &Email,
        name: &str,
        password: SecretString,
        roles: &[String],
    ) -> ServiceResult<User> {
        let hash = self
            .hasher
            .hash(password)
            .await
            .map_err(ServiceError::hashing)?;
        let id = Uuid::now_v7();
        let mut tx = self.db.begin().await?;
        let user = users::insert(&mut tx, id, email.as_str(), name, &hash, roles)
            .await?
            .into_user();
        // Hook (issue 15): sign-up sends the `email_verification` link.
        if by == CreatedBy::SignUp {
            super::recovery::on_registered(&mut tx, &self.settings, id, email.as_str()).await?;
        }
        let action = match by {
            CreatedBy::SignUp => "auth.register",
            CreatedBy::Operator => "user.created",
        };
        let entry = AuditEntry::new(action, Outcome::Success)
            .target("user", id)
            .meta(meta)
            .details(serde_json::json!({ "roles": roles }));
        let entry = match by {
            CreatedBy::SignUp => entry.actor("user", id),
            CreatedBy::Operator => entry.actor("system", "cli"),
        };
        audit::insert(&mut tx, &entry).await?;
        tx.commit().await?;
        Ok(user)
    }

    /// Counts one request for `key` in `window`, through Redis (shared by every
    /// replica and transport) or the in-process fallback when Redis is down; past
    /// `max` (0 = no limit) the answer is 429 with Retry-After. A throttle on
    /// requests, not the lockout: that counts only checked, wrong passwords.
    pub(crate) async fn throttle(
        &self,
        key: &str,
        max: u32,
        window: Duration,
    ) -> ServiceResult<()> {
        if max == 0 {
            return Ok(());
        }
        let (n, ttl) = match self.cache.incr_window(key, window).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "rate-limit counter unavailable, using in-process fallback");
                self.local_counters.incr_window(key, window)
            }
        };
        if n > i64::from(max) {
            return Err(ServiceError::RateLimited {
                retry_after_secs: (ttl.max(0) as u64).div_ceil(1000).max(1),
            });
        }
        Ok(())
    }

    /// `throttle` for `what` (login, register …) per client IP; a request with no
    /// known IP is not throttled here.
    async fn throttle_ip(
        &self,
        meta: &RequestMeta,
        what: &str,
        max: u32,
        window: Duration,
    ) -> ServiceResult<()> {
        match meta.ip {
            Some(ip) => self.throttle(&format!("{what}:ip:{ip}"), max, window).await,
            None => Ok(()),
        }
    }

    async fn audit_alone(&self, entry: AuditEntry) {
        let r = async {
            let mut tx = self.db.begin().await?;
            audit::insert(&mut tx, &entry).await?;
            tx.commit().await?;
            Ok::<_, crate::store::StoreError>(())
        }
        .await;
        if let Err(e) = r {
            tracing::error!(error = %e, action = %entry.action, "audit write failed");
        }
    }

    /// Checks a password of `user_id` under the lockout policy (domain::lockout):
    /// `check_guarded` with an argon2 verification, and the same argon2 work
    /// (a decoy) when locked. `finishes_login`: see `check_guarded`.
    pub(crate) async fn check_password_guarded(
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
    /// lockout policy (domain::lockout). Only a credential actually checked and
    /// found wrong is counted, per account and per (account, client IP), with
    /// the `failed` audit row and, when it sets a lock, `auth.lockout`, all in
    /// one transaction; a store or hashing failure (503) counts nothing. Checks
    /// of one user take turns on this replica, so a parallel burst evaluates no
    /// more than the limit, while parallel right answers all pass. A right
    /// answer clears the counts only when `finishes_login` (a password followed
    /// by a second factor clears nothing: the count resets when the login
    /// completes). `locked_work` runs instead of `check` when locked.
    pub(crate) async fn check_guarded(
        &self,
        meta: &RequestMeta,
        user_id: Uuid,
        failed: AuditEntry,
        finishes_login: bool,
        check: impl std::future::Future<Output = ServiceResult<bool>>,
        locked_work: impl std::future::Future<Output = ()>,
    ) -> ServiceResult<Checked> {
        let window = self.settings.login_lockout_seconds;
        let ip = meta
            .ip
            .map_or_else(|| "unknown".to_string(), |ip| ip.to_string());
        let mut turn = self.login_turns.take(user_id).await;
        let (account, pair) = login_failures::standing(&self.db.pool, user_id, &ip, window).await?;
        let mut gate = lockout::gate(account, pair);
        if gate == Gate::Delayed {
            // The second check for an address that has not failed: a wait, out of
            // turn, then the standing again (it may have changed meanwhile).
            drop(turn);
            metrics::counter!("logins_total", "result" => "delayed").increment(1);
            tokio::time::sleep(Duration::from_millis(self.settings.login_locked_delay_ms)).await;
            turn = self.login_turns.take(user_id).await;
            let (account, pair) =
                login_failures::standing(&self.db.pool, user_id, &ip, window).await?;
            gate = lockout::gate(account, pair);
        }
        if gate == Gate::Locked {
            drop(turn);
            locked_work.await;
            return Ok(Checked::Locked);
        }
        let right = check.await?;
        let mut tx = self.db.begin().await?;
        if right {
            if finishes_login {
                login_failures::clear(&mut tx, user_id, &ip, window).await?;
                tx.commit().await?;
            }
            return Ok(Checked::Right);
        }
        let (max, lockout) = (
            self.settings.login_max_attempts,
            self.settings.login_lockout_seconds,
        );
        let mut locks = Vec::new();
        for (scope, key) in [("account", login_failures::ANY_IP), ("client_ip", &ip)] {
            if login_failures::record_failure(&mut tx, user_id, key, window, max, lockout).await? {
                locks.push(scope);
            }
        }
        audit::insert(&mut tx, &failed).await?;
        if !locks.is_empty() {
            let entry = AuditEntry::new("auth.lockout", Outcome::Denied)
                .target("user", user_id)
                .meta(meta)
                .details(serde_json::json!({
                    "locks": locks,
                    "attempts": max,
                    "lockout_seconds": lockout,
                }));
            audit::insert(&mut tx, &entry).await?;
        }
        tx.commit().await?;
        if !locks.is_empty() {
            metrics::counter!("login_lockouts_total").increment(1);
        }
        Ok(Checked::Wrong)
    }

    /// Login. Every failure — unknown email, wrong password, disabled or locked
    /// account — is the same `InvalidCredentials` after the same argon2 work.
    #[tracing::instrument(skip_all)]
    pub async fn login(
        &self,
        meta: &RequestMeta,
        email: &str,
        password: String,
    ) -> ServiceResult<LoginOutcome> {
        let password = Password::candidate(password)
            .map_err(password_error)?
            .into_secret();
        let per_minute = self.settings.login_ip_max_per_minute;
        self.throttle_ip(meta, "login", per_minute, Duration::from_secs(60))
            .await?;
        let Ok(email) = Email::parse(email) else {
            let _ = self.hasher.verify(password, None).await;
            return Err(ServiceError::InvalidCredentials);
        };
        let record = users::by_email(&self.db.pool, email.as_str()).await?;
        let failed = |reason: &str, user: Option<Uuid>| {
            let e = AuditEntry::new("auth.login.failed", Outcome::Failure)
                .meta(meta)
                .details(serde_json::json!({ "reason": reason }));
            match user {
                Some(id) => e.target("user", id),
                None => e,
            }
        };
        let refuse = |result: &'static str| {
            metrics::counter!("logins_total", "result" => result).increment(1);
            Err(ServiceError::InvalidCredentials)
        };
        let Some(record) = record else {
            let _ = self.hasher.verify(password, None).await;
            self.audit_alone(failed("unknown_user", None)).await;
            return refuse("failed");
        };
        // A user with a second factor: a right password does not end the login,
        // so it clears no failure count (issue 14).
        let factors = crate::store::mfa::factors(&self.db, record.id).await?;
        let checked = self
            .check_password_guarded(
                meta,
                record.id,
                record.password_hash.clone(),
                password.clone(),
                failed("wrong_password", Some(record.id)),
                !factors.any(),
            )
            .await?;
        match checked {
            Checked::Locked => {
                self.audit_alone(failed("locked", Some(record.id))).await;
                return refuse("locked");
            }
            Checked::Wrong => return refuse("failed"),
            Checked::Right if record.status != "active" => {
                self.audit_alone(failed("disabled", Some(record.id))).await;
                return refuse("failed");
            }
            Checked::Right => {}
        }
        // An imported user's legacy hash becomes a current argon2id one.
        let hash = record.password_hash.as_deref();
        super::import_users::upgrade_password_hash(
            &self.hasher,
            &self.db,
            meta,
            record.id,
            hash,
            password,
        )
        .await;
        if factors.any() {
            metrics::counter!("logins_total", "result" => "mfa_required").increment(1);
            let challenge = self.begin_second_step(meta, record.id, &factors).await?;
            return Ok(LoginOutcome::MfaRequired(challenge));
        }
        metrics::counter!("logins_total", "result" => "succeeded").increment(1);
        let amr = [crate::domain::mfa::amr::PWD.to_string()];
        Ok(LoginOutcome::Tokens(
            self.open_session(meta, record, &amr).await?,
        ))
    }

    /// A completed login: a new session authenticated by `amr` now, its first
    /// refresh token and the `auth.login.succeeded` row in one transaction.
    pub(crate) async fn open_session(
        &self,
        meta: &RequestMeta,
        record: users::UserRecord,
        amr: &[String],
    ) -> ServiceResult<LoginTokens> {
        let session_id = Uuid::now_v7();
        let refresh = new_refresh_token();
        let now = chrono::Utc::now();
        let expires_at =
            now + chrono::Duration::seconds(self.settings.refresh_token_ttl_seconds as i64);
        let mut tx = self.db.begin().await?;
        sessions::create(
            &mut tx,
            session_id,
            record.id,
            expires_at,
            meta.ip.map(|ip| ip.to_string()),
            meta.user_agent.as_deref(),
        )
        .await?;
        crate::store::mfa::set_session_auth(&mut tx, session_id, amr, now).await?;
        sessions::insert_refresh_token(&mut tx, session_id, &sha256(&refresh), expires_at).await?;
        // Hook (issue 15): `new_sign_in` from an address unseen for 30 days.
        super::recovery::on_sign_in(&mut tx, record.id, &record.email, meta).await?;
        audit::insert(
            &mut tx,
            &AuditEntry::new("auth.login.succeeded", Outcome::Success)
                .actor("user", record.id)
                .target("session", session_id)
                .meta(meta)
                .detail("amr", amr.to_vec()),
        )
        .await?;
        tx.commit().await?;
        let user = record.into_user();
        self.cache_session(
            session_id,
            &SessionState::Live {
                uid: user.id,
                roles: user.roles.clone(),
            },
        )
        .await;
        self.tokens_for(user, session_id, refresh, amr, now.timestamp())
    }

    /// An access token for the session, saying how and when the user
    /// authenticated (`amr`, `auth_time`).
    pub(crate) fn tokens_for(
        &self,
        user: User,
        session_id: Uuid,
        refresh: String,
        amr: &[String],
        auth_time: i64,
    ) -> ServiceResult<LoginTokens> {
        let ttl = self.settings.access_token_ttl_seconds;
        let mut claims = self.jwt.claims(
            TokenType::Access,
            user.id.to_string(),
            Duration::from_secs(ttl),
            Some(session_id.to_string()),
            None,
        );
        claims.amr = Some(amr.to_vec());
        claims.auth_time = Some(auth_time);
        Ok(LoginTokens {
            access_token: self.jwt.sign(&claims).map_err(ServiceError::internal)?,
            refresh_token: refresh,
            expires_in: ttl,
            user,
            session_id,
        })
    }

    /// Rotates a refresh token. Presenting one already used is reuse: the whole
    /// session ends, since either the client or a thief holds a stolen copy.
    #[tracing::instrument(skip_all)]
    pub async fn refresh(
        &self,
        meta: &RequestMeta,
        refresh_token: &str,
    ) -> ServiceResult<LoginTokens> {
        if refresh_token.is_empty() || refresh_token.len() > 256 {
            return Err(ServiceError::InvalidToken);
        }
        let mut tx = self.db.begin().await?;
        let idle = self.settings.session_idle_timeout_seconds;
        let Some(row) =
            sessions::refresh_token_for_update(&mut tx, &sha256(refresh_token), idle).await?
        else {
            return Err(ServiceError::InvalidToken);
        };
        if row.used {
            let audit = AuditEntry::new("auth.refresh.reused", Outcome::Denied);
            return self
                .end_session_on_refresh(tx, &row, "refresh_reuse", audit, meta)
                .await;
        }
        if row.expired || !row.session_live {
            return Err(ServiceError::InvalidToken);
        }
        if row.session_idle {
            let audit = AuditEntry::new("auth.session.idle_timeout", Outcome::Denied)
                .details(serde_json::json!({ "idle_timeout_seconds": idle }));
            return self
                .end_session_on_refresh(tx, &row, "idle_timeout", audit, meta)
                .await;
        }
        let user = users::by_id(&mut tx, row.user_id)
            .await?
            .filter(|u| u.status == "active")
            .ok_or(ServiceError::InvalidToken)?
            .into_user();
        sessions::mark_refresh_used(&mut tx, row.id).await?;
        sessions::touch(&mut tx, row.session_id).await?;
        let (amr, auth_time) = crate::store::mfa::session_auth_in(&mut tx, row.session_id)
            .await?
            .ok_or(ServiceError::InvalidToken)?;
        let refresh = new_refresh_token();
        sessions::insert_refresh_token(
            &mut tx,
            row.session_id,
            &sha256(&refresh),
            row.session_expires_at,
        )
        .await?;
        tx.commit().await?;
        // The used token no longer works as the session cookie on any replica
        // (also said by the refresh_tokens trigger, for when Redis is down).
        self.invalidation.session_changed(row.session_id).await;
        self.tokens_for(user, row.session_id, refresh, &amr, auth_time.timestamp())
    }

    /// A refresh that ends its session (token reuse, idle timeout): revoke and
    /// audit in one transaction, then the tombstone for every replica; the
    /// caller gets 401 invalid_token.
    async fn end_session_on_refresh(
        &self,
        mut tx: crate::store::Tx,
        row: &sessions::RefreshRow,
        reason: &str,
        audit: AuditEntry,
        meta: &RequestMeta,
    ) -> ServiceResult<LoginTokens> {
        let ended = sessions::revoke(&mut tx, row.session_id, reason).await?;
        audit::insert(
            &mut tx,
            &audit
                .actor("user", row.user_id)
                .target("session", row.session_id)
                .meta(meta)
                .detail("session_ended", ended),
        )
        .await?;
        tx.commit().await?;
        let state = SessionState::Revoked {
            reason: reason.into(),
        };
        self.cache_session(row.session_id, &state).await;
        Err(ServiceError::InvalidToken)
    }

    /// Ends the caller's session at once (every replica sees the tombstone).
    #[tracing::instrument(skip_all)]
    pub async fn logout(&self, caller: &Caller, meta: &RequestMeta) -> ServiceResult<()> {
        let Caller::User {
            user_id,
            session_id: Some(sid),
            ..
        } = caller
        else {
            return Ok(());
        };
        let mut tx = self.db.begin().await?;
        if sessions::revoke(&mut tx, *sid, "logout").await? {
            audit::insert(
                &mut tx,
                &AuditEntry::new("auth.logout", Outcome::Success)
                    .actor("user", user_id)
                    .target("session", sid)
                    .meta(meta),
            )
            .await?;
        }
        tx.commit().await?;
        self.cache_session(
            *sid,
            &SessionState::Revoked {
                reason: "logout".into(),
            },
        )
        .await;
        Ok(())
    }

    /// OAuth 2.0 client credentials: a short-lived service JWT with the client's
    /// scopes. Unknown client, wrong secret or disabled client look the same.
    #[tracing::instrument(skip_all)]
    pub async fn issue_service_token(
        &self,
        client_id: &str,
        client_secret: String,
    ) -> ServiceResult<ServiceToken> {
        if client_id.len() > 64 || client_secret.len() > 256 {
            return Err(ServiceError::InvalidClient);
        }
        let client = service_clients::by_client_id(&self.db.pool, client_id).await?;
        let hash = client
            .as_ref()
            .filter(|c| c.status == "active")
            .and_then(|c| c.secret_hash.clone());
        let ok = match hash {
            // Secrets issued before SHA-256 storage: argon2, on the hashing pool,
            // once; a match re-stores the secret in the fast form.
            Some(phc) if phc.starts_with("$argon2") => {
                let ok = self
                    .hasher
                    .verify(SecretString::from(client_secret.clone()), Some(phc.clone()))
                    .await
                    .map_err(ServiceError::hashing)?;
                if ok {
                    service_clients::upgrade_secret_hash(
                        &self.db.pool,
                        client_id,
                        &phc,
                        &client_secret::hash(&client_secret),
                    )
                    .await?;
                }
                ok
            }
            // Unknown or inactive clients compare against a value nothing
            // matches, at the same (tiny) cost.
            stored => client_secret::matches(&client_secret, stored.as_deref()),
        };
        let Some(client) = client.filter(|_| ok) else {
            return Err(ServiceError::InvalidClient);
        };
        let ttl = self.settings.service_token_ttl_seconds;
        let scope = client.scopes.join(" ");
        let claims = self.jwt.claims(
            TokenType::Service,
            client.client_id,
            Duration::from_secs(ttl),
            None,
            Some(scope.clone()),
        );
        Ok(ServiceToken {
            access_token: self.jwt.sign(&claims).map_err(ServiceError::internal)?,
            expires_in: ttl,
            scope,
        })
    }

    /// A random client secret (256 bits, base64url), shown once.
    pub(crate) fn new_client_secret() -> SecretString {
        SecretString::from(new_refresh_token())
    }

    /// How a client secret is stored: SHA-256, not argon2. The secret is 256
    /// random bits, so no guess list applies and a slow hash buys nothing; and
    /// argon2 runs at idle priority (crypto::password), where token renewals
    /// would starve exactly when VerifyApiKey keeps the core busy, and every
    /// caller's gRPC calls would then fail for want of a token.
    pub(crate) async fn hash_secret(&self, secret: &SecretString) -> ServiceResult<String> {
        Ok(client_secret::hash(secret.expose_secret()))
    }
}

/// Scopes only service clients hold (DESIGN.md section 2); with the API-key
/// catalog they are what a service client may be given.
pub const SERVICE_SCOPES: [&str; 5] = [
    "auth:verify",
    "users:read",
    "permissions:check",
    "accounts:read",
    "credentials:read",
];

/// A service client's id and its secret, shown this once. Not Debug.
pub struct ClientCredentials {
    pub client_id: String,
    pub client_secret: SecretString,
}

/// Operator commands have no caller: the actor is the system.
fn by_or_system(entry: AuditEntry, actor: Option<&Caller>) -> AuditEntry {
    match actor {
        Some(c) => entry.by(c),
        None => entry.actor("system", "cli"),
    }
}

fn valid_client_id(id: &str) -> bool {
    let mut chars = id.chars();
    (2..=64).contains(&id.len())
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

impl Identity {
    /// A new service client with a fresh secret (operator CLI, tests).
    #[tracing::instrument(skip_all, fields(client_id = %client_id))]
    pub async fn create_service_client(
        &self,
        actor: Option<&Caller>,
        client_id: &str,
        scopes: &[String],
    ) -> ServiceResult<ClientCredentials> {
        if !valid_client_id(client_id) {
            return Err(ServiceError::validation(
                "client_id",
                "invalid",
                "client id must be 2-64 characters: a lowercase letter, then lowercase letters, digits, _ or -",
            ));
        }
        let known = service_clients::known_scopes(&self.db.pool).await?;
        if let Some(bad) = scopes
            .iter()
            .find(|s| !SERVICE_SCOPES.contains(&s.as_str()) && !known.contains(s))
        {
            return Err(ServiceError::validation(
                "scopes",
                "unknown_scope",
                format!("unknown scope {bad}"),
            ));
        }
        let secret = Self::new_client_secret();
        let hash = self.hash_secret(&secret).await?;
        let mut tx = self.db.begin().await?;
        let id = service_clients::insert(&mut tx, client_id, client_id, scopes, &hash).await?;
        audit::insert(
            &mut tx,
            &by_or_system(
                AuditEntry::new("service_client.created", Outcome::Success),
                actor,
            )
            .target("service_client", client_id)
            .details(serde_json::json!({ "id": id, "scopes": scopes })),
        )
        .await?;
        tx.commit().await?;
        Ok(ClientCredentials {
            client_id: client_id.to_string(),
            client_secret: secret,
        })
    }

    /// A new secret for a client; the old one stops working at once (tokens
    /// already issued live out their short lifetime).
    #[tracing::instrument(skip_all, fields(client_id = %client_id))]
    pub async fn rotate_service_client_secret(
        &self,
        actor: Option<&Caller>,
        client_id: &str,
    ) -> ServiceResult<ClientCredentials> {
        let secret = Self::new_client_secret();
        let hash = self.hash_secret(&secret).await?;
        let mut tx = self.db.begin().await?;
        if !service_clients::set_secret(&mut tx, client_id, &hash).await? {
            return Err(ServiceError::NotFound("service client"));
        }
        audit::insert(
            &mut tx,
            &by_or_system(
                AuditEntry::new("service_client.secret.rotated", Outcome::Success),
                actor,
            )
            .target("service_client", client_id),
        )
        .await?;
        tx.commit().await?;
        Ok(ClientCredentials {
            client_id: client_id.to_string(),
            client_secret: secret,
        })
    }
}
