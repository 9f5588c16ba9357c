//! Login sessions: opening one after a login, refresh-token rotation with reuse
//! detection, logout, a user's own sessions, and (`verify`) turning an access
//! token or session cookie into a `Caller`, with the caches that make a repeat
//! token cheap. PostgreSQL holds the truth; Redis carries tombstones for every
//! replica; the in-process caches drop entries when the invalidation channels say
//! a session, user or account changed.

mod verify;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use self::verify::{AccessClaims, CookieSession};
pub use self::verify::{AccessGrant, TokenRefusal, TokenVerification};
use super::audit::{AuditEntry, Outcome};
use super::invalidation::{Change, Invalidation};
use super::paging::Page;
use super::swr::{lean, Lean, SwrCache};
use super::user_copies::UserCopies;
use super::{Caller, RequestMeta, ServiceError, ServiceResult};
use crate::config::Settings;
use crate::crypto::jwt::{JwtKeys, TokenType};
use crate::domain::account::AccountAccess;
use crate::domain::session::{RevocationReason, SessionState};
use crate::domain::user::{User, UserStatus};
use crate::store::{sessions, users, Cache, Db, SessionCache, Tx};

/// What a login or refresh hands out. Not Debug: it carries tokens.
pub struct LoginTokens {
    pub access_token: String,
    pub refresh_token: String,
    pub expires_in: u64,
    pub user: User,
    pub session_id: Uuid,
}

/// One of the caller's sessions.
#[derive(Debug, Clone)]
pub struct SessionView {
    pub id: Uuid,
    pub created_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    /// The session this request was made with.
    pub current: bool,
    /// How the session was authenticated (RFC 8176 values, issue 14).
    pub amr: Vec<String>,
    /// When the user last authenticated in this session (login or step-up).
    pub auth_time: DateTime<Utc>,
}

pub struct Sessions {
    db: Db,
    /// The Redis copy of session states (tombstones for every replica).
    redis: SessionCache,
    invalidation: Invalidation,
    jwt: Arc<JwtKeys>,
    /// ACCESS_TOKEN_TTL_SECONDS, REFRESH_TOKEN_TTL_SECONDS and
    /// SESSION_IDLE_TIMEOUT_SECONDS.
    access_ttl_secs: u64,
    refresh_ttl_secs: u64,
    idle_timeout_secs: u64,
    /// Session states by id; a `Session` change drops one at once.
    states: SwrCache<Uuid, SessionState>,
    /// Users by id (GET /v1/users/me, bearer roles, VerifyToken): dropped on
    /// every replica when the user changes (the invalidation channels).
    profiles: SwrCache<Uuid, Option<Arc<User>>>,
    /// The one copy of each cached user record, shared with the API-key cache.
    user_copies: Arc<UserCopies>,
    /// Verified access-token claims by HMAC(token_key, token): a repeat token
    /// costs a keyed hash instead of an Ed25519 verification. An entry is
    /// refused (and dropped) on read once past `exp` plus the leeway.
    token_claims: Lean<[u8; 16], AccessClaims>,
    /// Per-process random key for `token_claims` and `cookies`: the tokens
    /// themselves are never cache keys.
    token_key: Hmac<Sha256>,
    /// Session cookies by HMAC(token_key, cookie).
    cookies: SwrCache<[u8; 16], CookieSession>,
    /// VerifyToken's account lists by user.
    token_accounts: SwrCache<Uuid, Arc<[AccountAccess]>>,
    /// token_verifications_total{kind="access"} by result (valid, invalid,
    /// expired, session_revoked, user_disabled), registered once (hot path).
    access_verifications: [metrics::Counter; 5],
}

pub(crate) fn sha256(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

impl Sessions {
    pub fn new(
        settings: &Settings,
        db: Db,
        cache: Cache,
        invalidation: Invalidation,
        jwt: Arc<JwtKeys>,
    ) -> Self {
        let capacity = settings.token_cache_capacity;
        let stale = Duration::from_secs(settings.cache_stale_seconds);
        // Fresh this long (TOKEN_CACHE_TTL_SECONDS, at most 30: the activity
        // recording interval); the invalidation channels drop entries sooner.
        let fresh = Duration::from_secs(settings.token_cache_ttl_seconds.clamp(1, 30));
        let profiles = SwrCache::new("users", capacity, fresh, stale);
        let states = SwrCache::new("sessions", capacity, fresh, stale);
        // Every refresh drops its session's cookies by predicate.
        let cookies = SwrCache::for_frequent_predicates("session_cookies", capacity, fresh, stale);
        let token_accounts = SwrCache::new("token_accounts", capacity, fresh, stale);
        {
            let (profiles, states, cookies, token_accounts) = (
                profiles.clone(),
                states.clone(),
                cookies.clone(),
                token_accounts.clone(),
            );
            invalidation.on_change(move |change| match change {
                Change::User(id) => {
                    profiles.invalidate(&id);
                    token_accounts.invalidate(&id);
                }
                Change::Profile(id) => profiles.invalidate(&id),
                Change::Session(sid) => {
                    states.invalidate(&sid);
                    cookies.invalidate_if(move |_, c: &CookieSession| c.session_id == sid);
                }
                Change::Account(aid) => {
                    token_accounts.invalidate_if(move |_, list: &Arc<[AccountAccess]>| {
                        list.iter().any(|a| a.account.id == aid)
                    })
                }
                Change::ApiKey(_) => {}
                Change::Everything => {
                    profiles.invalidate_all();
                    states.invalidate_all();
                    cookies.invalidate_all();
                    token_accounts.invalidate_all();
                }
            });
        }
        let mut secret = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut secret);
        Self {
            db,
            redis: SessionCache::new(cache),
            invalidation,
            jwt,
            access_ttl_secs: settings.access_token_ttl_seconds,
            refresh_ttl_secs: settings.refresh_token_ttl_seconds,
            idle_timeout_secs: settings.session_idle_timeout_seconds,
            states,
            profiles,
            user_copies: Arc::new(UserCopies::new(capacity)),
            token_claims: lean(capacity),
            token_key: Hmac::<Sha256>::new_from_slice(&secret).expect("HMAC takes any key"),
            cookies,
            token_accounts,
            access_verifications: [
                "valid",
                "invalid",
                "expired",
                "session_revoked",
                "user_disabled",
            ]
            .map(|r| metrics::counter!("token_verifications_total", "kind" => "access", "result" => r)),
        }
    }

    /// Where cached user records are shared (the API-key cache uses it too).
    pub fn user_copies(&self) -> Arc<UserCopies> {
        self.user_copies.clone()
    }

    /// The public signing keys (JWKS), for callers that verify tokens locally.
    pub fn jwks(&self) -> &serde_json::Value {
        self.jwt.jwks()
    }

    // ---- session states ---------------------------------------------------------

    /// Tombstones outlive every access token the session may have issued.
    fn tombstone_ttl(&self) -> Duration {
        Duration::from_secs(self.access_ttl_secs + crate::crypto::jwt::LEEWAY_SECS + 60)
    }

    /// After a transaction that ended `sids` for `reason` has committed: a Redis
    /// tombstone for each (best effort: PostgreSQL stays the truth), and every
    /// replica drops them from its cache (the PostgreSQL trigger on `sessions`
    /// says the same without Redis).
    pub async fn ended(&self, sids: &[Uuid], reason: RevocationReason) {
        for sid in sids {
            if let Err(e) = self
                .redis
                .put_revoked(*sid, reason, self.tombstone_ttl())
                .await
            {
                tracing::warn!(error = %e, "session cache write failed");
            }
            self.invalidation.session_changed(*sid).await;
        }
    }

    /// Is the session live? From this process's cache while fresh (30 s, which
    /// is also how often activity is recorded); then a Redis tombstone, else
    /// PostgreSQL (which records the activity). An ended session is dropped from
    /// every replica's cache by the invalidation channels.
    async fn state(&self, sid: Uuid) -> ServiceResult<SessionState> {
        self.states.get_or_load(sid, || self.load_state(sid)).await
    }

    async fn load_state(&self, sid: Uuid) -> ServiceResult<SessionState> {
        match self.redis.get(sid).await {
            Ok(Some(state @ SessionState::Revoked { .. })) => return Ok(state),
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "session cache unavailable, asking PostgreSQL"),
        }
        let idle = self.idle_timeout_secs;
        let state = match sessions::auth_state(&self.db, sid, idle).await? {
            None => SessionState::Revoked {
                reason: RevocationReason::Unknown,
            },
            Some(s) if s.user_status != UserStatus::Active => SessionState::Revoked {
                reason: RevocationReason::UserDisabled,
            },
            Some(s) if s.revoked || s.expired => SessionState::Revoked {
                reason: s.revoked_reason.unwrap_or(RevocationReason::Expired),
            },
            Some(s) => SessionState::Live { user_id: s.user_id },
        };
        if let SessionState::Revoked { reason } = state {
            // A tombstone for the other replicas; no invalidation (nothing changed).
            let _ = self
                .redis
                .put_revoked(sid, reason, self.tombstone_ttl())
                .await;
        }
        Ok(state)
    }

    /// A user as the caches hold it (`None`: no such user). Shared with the
    /// cache: a hit copies nothing.
    pub async fn user(&self, id: Uuid) -> ServiceResult<Option<Arc<User>>> {
        self.profiles
            .get_or_load(id, || async move {
                Ok(users::get(&self.db, id)
                    .await?
                    .map(|u| self.user_copies.share(u.into_user())))
            })
            .await
    }

    // ---- opening, rotating and ending sessions ----------------------------------

    /// A new session for `user`, whose credentials a use case has just checked,
    /// authenticated by `amr` now; `audit` (the login's row) is written with it,
    /// naming the session, in the transaction of the session.
    pub async fn open(
        &self,
        meta: &RequestMeta,
        user: User,
        amr: &[String],
        audit: AuditEntry,
    ) -> ServiceResult<LoginTokens> {
        let tx = self.db.begin().await?;
        self.open_in(tx, meta, user, amr, audit).await
    }

    /// `open` in a transaction the caller began and wrote in (e.g. the second
    /// step using up its `mfa_token`): both commit together, or neither.
    pub async fn open_in(
        &self,
        mut tx: crate::store::Tx,
        meta: &RequestMeta,
        user: User,
        amr: &[String],
        audit: AuditEntry,
    ) -> ServiceResult<LoginTokens> {
        let session_id = Uuid::now_v7();
        let refresh = super::random_token();
        let now = Utc::now();
        let expires_at = now + chrono::Duration::seconds(self.refresh_ttl_secs as i64);
        sessions::create(
            &mut tx,
            &sessions::NewSession {
                id: session_id,
                user_id: user.id,
                expires_at,
                ip: meta.ip.map(|ip| ip.to_string()),
                user_agent: meta.user_agent.as_deref(),
                amr,
                auth_time: now,
                refresh_token_hash: &sha256(&refresh),
            },
        )
        .await?;
        // Hook (issue 15): `new_sign_in` from an address unseen for 30 days.
        super::recovery::on_sign_in(&mut tx, user.id, &user.email, meta).await?;
        tx.audit(
            &audit
                .target("session", session_id)
                .meta(meta)
                .detail("amr", amr.to_vec()),
        )
        .await?;
        tx.commit().await?;
        // No Redis write: a new session needs no tombstone, and the "live" marks
        // this build wrote once were never read (a round trip per login).
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
        let ttl = self.access_ttl_secs;
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
        let idle = self.idle_timeout_secs;
        let Some(row) =
            sessions::refresh_token_for_update(&mut tx, &sha256(refresh_token), idle).await?
        else {
            return Err(ServiceError::InvalidToken);
        };
        if row.used {
            let audit = AuditEntry::new("auth.refresh.reused", Outcome::Denied);
            return self
                .end_on_refresh(tx, &row, RevocationReason::RefreshReuse, audit, meta)
                .await;
        }
        if row.expired || !row.session_live {
            return Err(ServiceError::InvalidToken);
        }
        if row.session_idle {
            let audit = AuditEntry::new("auth.session.idle_timeout", Outcome::Denied)
                .details(serde_json::json!({ "idle_timeout_seconds": idle }));
            return self
                .end_on_refresh(tx, &row, RevocationReason::IdleTimeout, audit, meta)
                .await;
        }
        let user = users::by_id(&mut tx, row.user_id)
            .await?
            .filter(|u| u.status == UserStatus::Active)
            .ok_or(ServiceError::InvalidToken)?
            .into_user();
        sessions::mark_refresh_used(&mut tx, row.id).await?;
        sessions::touch(&mut tx, row.session_id).await?;
        let (amr, auth_time) = crate::store::mfa::session_auth_in(&mut tx, row.session_id)
            .await?
            .ok_or(ServiceError::InvalidToken)?;
        let refresh = super::random_token();
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
    async fn end_on_refresh(
        &self,
        mut tx: Tx,
        row: &sessions::RefreshRow,
        reason: RevocationReason,
        audit: AuditEntry,
        meta: &RequestMeta,
    ) -> ServiceResult<LoginTokens> {
        let ended = sessions::revoke(&mut tx, row.session_id, reason).await?;
        tx.audit(
            &audit
                .actor("user", row.user_id)
                .target("session", row.session_id)
                .meta(meta)
                .detail("session_ended", ended),
        )
        .await?;
        tx.commit().await?;
        self.ended(&[row.session_id], reason).await;
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
        if sessions::revoke(&mut tx, *sid, RevocationReason::Logout).await? {
            tx.audit(
                &AuditEntry::new("auth.logout", Outcome::Success)
                    .actor("user", user_id)
                    .target("session", sid)
                    .meta(meta),
            )
            .await?;
        }
        tx.commit().await?;
        self.ended(&[*sid], RevocationReason::Logout).await;
        Ok(())
    }

    /// The caller's live sessions, newest first.
    pub async fn list(&self, caller: &Caller) -> ServiceResult<Page<SessionView>> {
        let (user_id, current) = caller.session_user()?;
        let items = sessions::list_live(&self.db, user_id)
            .await?
            .into_iter()
            .map(|s| SessionView {
                current: Some(s.id) == current,
                id: s.id,
                created_at: s.created_at,
                last_seen_at: s.last_seen_at,
                ip: s.ip,
                user_agent: s.user_agent,
                amr: s.amr,
                auth_time: s.auth_time,
            })
            .collect();
        Ok(Page::all(items))
    }

    /// Ends one of the caller's own sessions; another user's is "not found".
    pub async fn end(&self, caller: &Caller, meta: &RequestMeta, sid: Uuid) -> ServiceResult<()> {
        let (user_id, _) = caller.session_user()?;
        let mut tx = self.db.begin().await?;
        if !sessions::live_of_user_for_update(&mut tx, sid, user_id).await? {
            return Err(ServiceError::NotFound("session"));
        }
        sessions::revoke(&mut tx, sid, RevocationReason::Ended).await?;
        tx.audit(
            &AuditEntry::new("session.ended", Outcome::Success)
                .by(caller)
                .target("session", sid)
                .meta(meta),
        )
        .await?;
        tx.commit().await?;
        self.ended(&[sid], RevocationReason::Ended).await;
        Ok(())
    }
}
