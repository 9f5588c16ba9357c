//! The login's second step and step-up (DESIGN §8): the `mfa_token` a right
//! password earns when the user has a second factor (single use, 300 s), its
//! completion with a factor (`POST /v1/auth/mfa`), and a session's fresh second
//! factor (`POST /v1/auth/step-up`). Wrong second factors count toward the same
//! lockout as wrong passwords (`Lockout::check_guarded`), and the count
//! resets only when a login completes.
//!
//! The pub API other factors plug into (passkeys): `MfaService::pending_user`
//! (who an `mfa_token` belongs to, to start an assertion),
//! `MfaService::finish_login_with` and `MfaService::step_up_with`, each taking
//! the method and a verification of the user's answer.

use std::future::Future;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::json;
use uuid::Uuid;

use super::audit::{AuditEntry, Outcome};
use super::lockout::Checked;
use super::mfa::MfaService;
use super::sessions::{sha256, LoginTokens};
use super::{Caller, RequestMeta, ServiceError, ServiceResult};
use crate::domain::mfa::{self as rules, Factors, Method};
use crate::domain::user::UserStatus;
use crate::store;

/// How long an `mfa_token` lives.
pub const MFA_TOKEN_TTL_SECS: u64 = 300;

/// A right password of a user with a second factor: what the client needs to
/// finish. Not Debug: it carries the token.
pub struct SecondStep {
    pub mfa_token: String,
    pub methods: Vec<Method>,
    pub expires_in: u64,
}

/// `method` as the wire gives it; one the user does not hold is a validation
/// error on `method`, before anything is counted.
pub fn parse_method(raw: &str, factors: &Factors) -> ServiceResult<Method> {
    let offered = factors.methods();
    match Method::parse(raw) {
        Some(m) if offered.contains(&m) => Ok(m),
        Some(_) => Err(ServiceError::validation(
            "method",
            "unavailable",
            format!(
                "{raw} is not one of this user's second factors ({})",
                offered
                    .iter()
                    .map(|m| m.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
        None => Err(ServiceError::validation(
            "method",
            "invalid",
            "method must be totp, recovery_code or webauthn",
        )),
    }
}

impl MfaService {
    /// The password was right and the user has a second factor: a single-use
    /// `mfa_token` for the second step. No session, no tokens, no cookie yet.
    pub(crate) async fn begin_second_step(
        &self,
        meta: &RequestMeta,
        user_id: Uuid,
        factors: &Factors,
    ) -> ServiceResult<SecondStep> {
        let token = super::random_token();
        let id = Uuid::now_v7();
        let amr = [rules::amr::PWD.to_string()];
        let methods = factors.methods();
        let mut tx = self.db.begin().await?;
        store::mfa::insert_challenge(
            &mut tx,
            &store::mfa::NewChallenge {
                id,
                token_hash: &sha256(&token),
                user_id,
                amr: &amr,
                expires_at: Utc::now() + chrono::Duration::seconds(MFA_TOKEN_TTL_SECS as i64),
                ip: meta.ip.map(|ip| ip.to_string()),
                user_agent: meta.user_agent.as_deref(),
            },
        )
        .await?;
        tx.audit(
            &AuditEntry::new("auth.login.mfa_required", Outcome::Success)
                .actor("user", user_id)
                .target("user", user_id)
                .meta(meta)
                .details(json!({
                    "challenge_id": id,
                    "methods": methods.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
                })),
        )
        .await?;
        tx.commit().await?;
        Ok(SecondStep {
            mfa_token: token,
            methods,
            expires_in: MFA_TOKEN_TTL_SECS,
        })
    }

    /// Second steps count against the login throttle per client IP, as logins do.
    async fn throttle_second_factor(&self, meta: &RequestMeta) -> ServiceResult<()> {
        self.throttle
            .per_ip(
                meta,
                "login",
                self.ip_max_per_minute,
                Duration::from_secs(60),
            )
            .await
    }
}

/// What this replica knows of `mfa_token`s, by hash, so that a flood of
/// second factors on one costs no round trip and cannot slow the hot path
/// (issue 14). Bounded (made-up tokens only evict); clones share the caches.
#[derive(Clone)]
pub(crate) struct TokenMemo {
    /// Used, expired or unknown: refused for as long as a token could live.
    dead: moka::sync::Cache<[u8; 32], ()>,
    /// Found locked (with when): refused without I/O for `LOCKED_RECHECK`,
    /// then the lockout is asked again; the lock's audit row is written once
    /// per token. The token itself lives on (§8: it dies after one success or
    /// 300 s), so it works again once the lock lapses.
    locked: moka::sync::Cache<[u8; 32], Instant>,
}

/// How long a locked `mfa_token` is refused from memory before the lockout is
/// asked again (a lifted lock shows within this).
const LOCKED_RECHECK: Duration = Duration::from_secs(1);

impl TokenMemo {
    pub(crate) fn new() -> Self {
        fn cache<V: Clone + Send + Sync + 'static>() -> moka::sync::Cache<[u8; 32], V> {
            moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(MFA_TOKEN_TTL_SECS))
                .build()
        }
        Self {
            dead: cache(),
            locked: cache(),
        }
    }

    fn refuses(&self, hash: &[u8; 32]) -> bool {
        self.dead.contains_key(hash)
            || self
                .locked
                .get(hash)
                .is_some_and(|at| at.elapsed() < LOCKED_RECHECK)
    }
}

impl MfaService {
    /// The hash of `mfa_token`, unless it is malformed or this replica knows it
    /// dead or locked (then the caller refuses before any I/O).
    fn hash_unless_refused(&self, mfa_token: &str) -> Option<[u8; 32]> {
        if mfa_token.is_empty() || mfa_token.len() > 128 {
            return None;
        }
        let hash = sha256(mfa_token);
        if self.token_memo.refuses(&hash) {
            // A flood costs no I/O; this counter is where it still shows.
            metrics::counter!("logins_total", "result" => "mfa_token_refused").increment(1);
            return None;
        }
        Some(hash)
    }

    /// A live challenge for `mfa_token`, or the same refusal as a wrong code.
    async fn live_challenge(&self, hash: &[u8; 32]) -> ServiceResult<store::mfa::ChallengeRow> {
        match store::mfa::challenge(&self.db, hash).await? {
            Some(c) if c.live => Ok(c),
            _ => {
                self.token_memo.dead.insert(*hash, ());
                Err(ServiceError::SecondFactorRefused)
            }
        }
    }

    /// Who a live `mfa_token` belongs to, and the factors they hold (for a
    /// second factor that needs a challenge first, e.g. a passkey assertion).
    pub async fn pending_user(&self, mfa_token: &str) -> ServiceResult<(Uuid, Factors)> {
        let hash = self
            .hash_unless_refused(mfa_token)
            .ok_or(ServiceError::SecondFactorRefused)?;
        let c = self.live_challenge(&hash).await?;
        Ok((c.user_id, self.factors(c.user_id).await?))
    }

    /// `POST /v1/auth/mfa` with a code (`totp`, `recovery_code`).
    #[tracing::instrument(skip_all)]
    pub async fn finish_login(
        &self,
        meta: &RequestMeta,
        mfa_token: &str,
        method: &str,
        code: &str,
    ) -> ServiceResult<LoginTokens> {
        let code = code.to_string();
        self.finish_login_with(meta, mfa_token, method, |uid, m| async move {
            self.check_code(uid, m, &code).await
        })
        .await
    }

    /// The second step with any method: `verify(user_id, method)` answers
    /// whether the user's answer is right (and records what makes it single
    /// use). Under the lockout policy: a locked account is refused without
    /// looking, a wrong answer counts, a right one completes the login (the
    /// `mfa_token` dies) and resets the count.
    pub async fn finish_login_with<F, Fut>(
        &self,
        meta: &RequestMeta,
        mfa_token: &str,
        method: &str,
        verify: F,
    ) -> ServiceResult<LoginTokens>
    where
        F: FnOnce(Uuid, Method) -> Fut,
        Fut: Future<Output = ServiceResult<bool>>,
    {
        let hash = self
            .hash_unless_refused(mfa_token)
            .ok_or(ServiceError::SecondFactorRefused)?;
        self.throttle_second_factor(meta).await?;
        let challenge = self.live_challenge(&hash).await?;
        let uid = challenge.user_id;
        let factors = self.factors(uid).await?;
        let method = parse_method(method, &factors)?;
        let failed = |reason: &str| {
            AuditEntry::new("auth.mfa.failed", Outcome::Failure)
                .target("user", uid)
                .meta(meta)
                .details(json!({ "method": method.as_str(), "reason": reason, "during": "login" }))
        };
        let checked = self
            .lockout
            .check_guarded(
                meta,
                uid,
                failed("wrong_code"),
                true,
                verify(uid, method),
                async {},
            )
            .await?;
        match checked {
            Checked::Right | Checked::Wrong => {
                self.token_memo.locked.invalidate(&hash);
            }
            Checked::Locked => {
                metrics::counter!("logins_total", "result" => "locked").increment(1);
                // One audit row per token and replica, not one per guess.
                let seen = self.token_memo.locked.contains_key(&hash);
                self.token_memo.locked.insert(hash, Instant::now());
                if !seen {
                    super::audit::write_alone(&self.db, failed("locked")).await;
                }
                return Err(ServiceError::SecondFactorRefused);
            }
        }
        if checked == Checked::Wrong {
            metrics::counter!("logins_total", "result" => "mfa_failed").increment(1);
            return Err(ServiceError::SecondFactorRefused);
        }
        let record = store::users::get(&self.db, uid)
            .await?
            .filter(|u| u.status == UserStatus::Active);
        // The mfa_token is used up in the session's own transaction: no
        // session without it, and no used-up token without a session.
        let mut tx = self.db.begin().await?;
        let consumed = store::mfa::consume_challenge(&mut tx, challenge.id).await?;
        // Another request finished this login first, or the user went away
        // (disabled meanwhile: the token is used up all the same).
        let (true, Some(record)) = (consumed, record) else {
            if consumed {
                tx.commit().await?;
            }
            self.token_memo.dead.insert(hash, ());
            return Err(ServiceError::SecondFactorRefused);
        };
        metrics::counter!("logins_total", "result" => "succeeded").increment(1);
        let amr = rules::amr_after(&challenge.amr, method);
        let user = record.into_user();
        let audit =
            AuditEntry::new("auth.login.succeeded", Outcome::Success).actor("user", user.id);
        let tokens = self.sessions.open_in(tx, meta, user, &amr, audit).await?;
        self.token_memo.dead.insert(hash, ());
        Ok(tokens)
    }

    /// `POST /v1/auth/step-up` with a code.
    #[tracing::instrument(skip_all)]
    pub async fn step_up(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        method: &str,
        code: &str,
    ) -> ServiceResult<LoginTokens> {
        let code = code.to_string();
        self.step_up_with(caller, meta, method, |uid, m| async move {
            self.check_code(uid, m, &code).await
        })
        .await
    }

    /// A fresh second factor for the caller's session: `auth_time` becomes now
    /// and `amr` gains the method and `mfa`; answers a login body for the same
    /// session (a new access token and refresh token). Wrong answers count
    /// toward the lockout like a login's.
    pub async fn step_up_with<F, Fut>(
        &self,
        caller: &Caller,
        meta: &RequestMeta,
        method: &str,
        verify: F,
    ) -> ServiceResult<LoginTokens>
    where
        F: FnOnce(Uuid, Method) -> Fut,
        Fut: Future<Output = ServiceResult<bool>>,
    {
        let (uid, sid) = match caller {
            Caller::User {
                user_id,
                session_id: Some(sid),
                key: None,
                ..
            } => (*user_id, *sid),
            _ => {
                return Err(ServiceError::Forbidden(
                    "step-up needs a login session (bearer token or cookie), not an API key".into(),
                ))
            }
        };
        self.throttle_second_factor(meta).await?;
        let factors = self.factors(uid).await?;
        let method = parse_method(method, &factors)?;
        let failed = |reason: &str| {
            AuditEntry::new("auth.step_up.failed", Outcome::Failure)
                .by(caller)
                .target("session", sid)
                .meta(meta)
                .details(json!({ "method": method.as_str(), "reason": reason }))
        };
        let checked = self
            .lockout
            .check_guarded(
                meta,
                uid,
                failed("wrong_code"),
                true,
                verify(uid, method),
                async {},
            )
            .await?;
        match checked {
            Checked::Right => {}
            Checked::Wrong => return Err(ServiceError::SecondFactorRefused),
            Checked::Locked => {
                super::audit::write_alone(&self.db, failed("locked")).await;
                return Err(ServiceError::SecondFactorRefused);
            }
        }
        let record = store::users::get(&self.db, uid)
            .await?
            .filter(|u| u.status == UserStatus::Active)
            .ok_or(ServiceError::InvalidToken)?;
        let now = Utc::now();
        let refresh = super::random_token();
        let mut tx = self.db.begin().await?;
        let Some((before, expires_at)) =
            store::mfa::live_session_for_update(&mut tx, sid, uid).await?
        else {
            return Err(ServiceError::InvalidToken);
        };
        let amr = rules::amr_after(&before, method);
        store::mfa::set_session_auth(&mut tx, sid, &amr, now).await?;
        store::sessions::insert_refresh_token(&mut tx, sid, &sha256(&refresh), expires_at).await?;
        tx.audit(
            &AuditEntry::new("auth.step_up.succeeded", Outcome::Success)
                .by(caller)
                .target("session", sid)
                .meta(meta)
                .details(json!({ "method": method.as_str(), "amr": amr })),
        )
        .await?;
        tx.commit().await?;
        self.sessions
            .tokens_for(record.into_user(), sid, refresh, &amr, now.timestamp())
    }
}
