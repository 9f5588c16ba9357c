//! `Identity`: users, sessions, tokens and service clients. This file holds the
//! struct and what every request needs — turning an access token, session cookie
//! or service token into a `Caller`. Use cases live in `auth.rs` and `users.rs`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use moka::sync::Cache as MokaCache;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::invalidation::{Change, Invalidation};
use super::swr::SwrCache;
use super::{Caller, ServiceError, ServiceResult};
use crate::config::Settings;
use crate::crypto::jwt::{Claims, JwtError, JwtKeys, TokenType};
use crate::crypto::password::PasswordHasher;
use crate::domain::account::AccountAccess;
use crate::domain::user::User;
use crate::store::{sessions, Cache, Db};

/// How long Redis keeps a "live" session state.
const LIVE_SESSION_CACHE: Duration = Duration::from_secs(30);
/// Verified service tokens kept in process.
const SERVICE_TOKEN_CACHE_CAPACITY: u64 = 10_000;

/// A session as the Redis cache holds it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "s", rename_all = "lowercase")]
pub enum SessionState {
    Live {
        uid: Uuid,
        roles: Vec<String>,
    },
    /// `reason`: `logout`, `ended`, `password_changed`, `user_disabled`, `refresh_reuse`…
    Revoked {
        reason: String,
    },
}

/// Why an access token was refused; VerifyToken reports it, the gateway says 401.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    Invalid,
    Expired,
    SessionRevoked,
    UserDisabled,
}

impl From<TokenRefusal> for ServiceError {
    fn from(_: TokenRefusal) -> Self {
        ServiceError::InvalidToken
    }
}

/// A verified access token, with its (cached) user.
#[derive(Debug, Clone)]
pub struct AccessGrant {
    pub user_id: Uuid,
    pub session_id: Uuid,
    pub roles: Vec<String>,
    pub expires_at: i64,
    pub user: Arc<User>,
    /// The token's `amr` and `auth_time` (issue 14).
    pub amr: Arc<[String]>,
    pub auth_time: i64,
}

/// What an access token's signature established, cached by a keyed hash of the
/// token: nothing here can be revoked (the session and user are checked apart).
#[derive(Debug)]
struct AccessClaims {
    user_id: Uuid,
    session_id: Uuid,
    exp: i64,
    amr: Arc<[String]>,
    auth_time: i64,
}

/// A session cookie (the session's current refresh token) as last read.
#[derive(Debug, Clone, Copy)]
struct CookieSession {
    session_id: Uuid,
    user_id: Uuid,
    /// Unused, unexpired and its session live when read.
    usable: bool,
}

/// Verified access tokens live until the signature check would refuse them:
/// `exp` plus the verifier's leeway, to the second.
struct UntilAccessExp;

impl moka::Expiry<[u8; 32], Arc<AccessClaims>> for UntilAccessExp {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        value: &Arc<AccessClaims>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        let last_valid = value.exp + crate::crypto::jwt::LEEWAY_SECS as i64;
        Some(Duration::from_secs(
            (last_valid + 1).saturating_sub(now_secs()).max(0) as u64,
        ))
    }
}

impl AccessGrant {
    pub fn caller(&self) -> Caller {
        Caller::User {
            user_id: self.user_id,
            roles: self.roles.clone(),
            session_id: Some(self.session_id),
            key: None,
        }
    }
}

/// A verified service token, cached by the token itself.
#[derive(Debug)]
struct ServiceGrant {
    client_id: Arc<str>,
    scopes: Arc<[String]>,
    exp: i64,
}

/// Verified service tokens, keyed by the whole token string: a hit needs
/// byte-equal text, so no forged token reaches one, and a fast seeded hash
/// (foldhash) replaces the SHA-256 of the ~450-byte token that was measurable on
/// every call. The key comparison is not constant-time; it can only tell how long
/// a prefix a probe shares with whichever cached tokens sit on its probe path
/// (per-process random seed), in nanoseconds far below network jitter, and a
/// token's secret part, its signature, is at the end. The tokens stay in memory
/// until they expire, as they did in the request buffers.
type ServiceTokenCache = MokaCache<Box<str>, Arc<ServiceGrant>, foldhash::fast::RandomState>;

struct UntilExp;

impl moka::Expiry<Box<str>, Arc<ServiceGrant>> for UntilExp {
    fn expire_after_create(
        &self,
        _key: &Box<str>,
        value: &Arc<ServiceGrant>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(Duration::from_secs(
            value.exp.saturating_sub(now_secs()).max(0) as u64,
        ))
    }
}

pub(crate) fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

pub(crate) fn sha256(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

/// Accounts listed per user in VerifyToken, at most (as the accounts service).
const MAX_TOKEN_ACCOUNTS: i64 = 1000;

pub struct Identity {
    pub(crate) db: Db,
    pub(crate) cache: Cache,
    pub(crate) settings: Settings,
    pub(crate) hasher: PasswordHasher,
    pub(crate) jwt: JwtKeys,
    service_tokens: ServiceTokenCache,
    /// service_token_cache_total{result="hit"|"miss"}, registered once (hot path).
    service_token_hits: metrics::Counter,
    service_token_misses: metrics::Counter,
    pub(crate) local_counters: super::auth::LocalCounters,
    /// Password checks of one user take turns (the lockout count stays exact).
    pub(crate) login_turns: super::auth::Turns,
    /// The step-up rule (issue 14) for the use cases here that need it.
    pub(crate) step_up: super::mfa::StepUp,
    /// Tells every replica's caches (API keys …) that a user changed.
    pub(crate) invalidation: Invalidation,
    /// Users by id (GET /v1/users/me, bearer roles, VerifyToken): dropped on
    /// every replica when the user changes (the invalidation channels).
    pub(crate) profiles: SwrCache<Uuid, Option<Arc<User>>>,
    /// Verified access-token claims by HMAC(token_key, token): a repeat token
    /// costs a keyed hash instead of an Ed25519 verification.
    token_claims: MokaCache<[u8; 32], Arc<AccessClaims>>,
    /// Per-process random key for `token_claims` and `cookies`: the tokens
    /// themselves are never cache keys.
    token_key: Hmac<Sha256>,
    /// Session states by id; a `Session` change drops one at once.
    sessions: SwrCache<Uuid, SessionState>,
    /// Session cookies by HMAC(token_key, cookie).
    cookies: SwrCache<[u8; 32], CookieSession>,
    /// VerifyToken's account lists by user.
    token_accounts: SwrCache<Uuid, Arc<[AccountAccess]>>,
    /// token_verifications_total{kind="access"} by result (valid, invalid,
    /// expired, session_revoked, user_disabled), registered once (hot path).
    access_verifications: [metrics::Counter; 5],
}

impl Identity {
    pub fn new(
        settings: &Settings,
        db: Db,
        cache: Cache,
        invalidation: Invalidation,
    ) -> anyhow::Result<Self> {
        let capacity = settings.token_cache_capacity;
        let stale = Duration::from_secs(settings.cache_stale_seconds);
        // Fresh this long (TOKEN_CACHE_TTL_SECONDS, at most 30: the activity
        // recording interval); the invalidation channels drop entries sooner.
        let fresh = Duration::from_secs(settings.token_cache_ttl_seconds.clamp(1, 30));
        let profiles = SwrCache::new("users", capacity, fresh, stale);
        let sessions = SwrCache::new("sessions", capacity, fresh, stale);
        let cookies = SwrCache::new("session_cookies", capacity, fresh, stale);
        let token_accounts = SwrCache::new("token_accounts", capacity, fresh, stale);
        {
            let (profiles, sessions, cookies, token_accounts) = (
                profiles.clone(),
                sessions.clone(),
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
                    sessions.invalidate(&sid);
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
                    sessions.invalidate_all();
                    cookies.invalidate_all();
                    token_accounts.invalidate_all();
                }
            });
        }
        let mut secret = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut secret);
        Ok(Self {
            profiles,
            token_claims: MokaCache::builder()
                .max_capacity(capacity)
                .expire_after(UntilAccessExp)
                .build(),
            token_key: Hmac::<Sha256>::new_from_slice(&secret).expect("HMAC takes any key"),
            sessions,
            cookies,
            token_accounts,
            invalidation,
            jwt: JwtKeys::from_settings(settings)?,
            hasher: PasswordHasher::new(settings.argon2_max_concurrency),
            service_tokens: MokaCache::builder()
                .max_capacity(SERVICE_TOKEN_CACHE_CAPACITY)
                .expire_after(UntilExp)
                .build_with_hasher(foldhash::fast::RandomState::default()),
            service_token_hits: metrics::counter!("service_token_cache_total", "result" => "hit"),
            service_token_misses: metrics::counter!("service_token_cache_total", "result" => "miss"),
            access_verifications: [
                "valid",
                "invalid",
                "expired",
                "session_revoked",
                "user_disabled",
            ]
            .map(|r| metrics::counter!("token_verifications_total", "kind" => "access", "result" => r)),
            local_counters: super::auth::LocalCounters::default(),
            login_turns: super::auth::Turns::default(),
            step_up: super::mfa::StepUp::new(db.clone(), settings),
            settings: settings.clone(),
            db,
            cache,
        })
    }

    pub fn jwks(&self) -> &serde_json::Value {
        self.jwt.jwks()
    }

    pub(crate) fn session_key(sid: Uuid) -> String {
        format!("session:{sid}")
    }

    /// Tombstones outlive every access token the session may have issued.
    pub(crate) fn tombstone_ttl(&self) -> Duration {
        Duration::from_secs(
            self.settings.access_token_ttl_seconds + crate::crypto::jwt::LEEWAY_SECS + 60,
        )
    }

    /// Records a session state in Redis (best effort: PostgreSQL stays the truth)
    /// and, when the session ended, drops it from every replica's cache (the
    /// PostgreSQL trigger on `sessions` says the same without Redis).
    pub(crate) async fn cache_session(&self, sid: Uuid, state: &SessionState) {
        let ttl = match state {
            SessionState::Live { .. } => LIVE_SESSION_CACHE,
            SessionState::Revoked { .. } => self.tombstone_ttl(),
        };
        if let Ok(v) = serde_json::to_string(state) {
            if let Err(e) = self
                .cache
                .set_string(&Self::session_key(sid), &v, ttl)
                .await
            {
                tracing::warn!(error = %e, "session cache write failed");
            }
        }
        if matches!(state, SessionState::Revoked { .. }) {
            self.invalidation.session_changed(sid).await;
        }
    }

    /// Drops cached "live" entries (after a role change) so the next request reads
    /// PostgreSQL.
    pub(crate) async fn forget_session(&self, sid: Uuid) {
        let _ = self.cache.del(&Self::session_key(sid)).await;
        self.invalidation.session_changed(sid).await;
    }

    /// Drops the cached state of every live session of a user, so a change of
    /// roles is seen on the next request.
    pub async fn forget_user_sessions(&self, user_id: Uuid) -> ServiceResult<()> {
        for sid in sessions::live_ids_for_user(&self.db.pool, user_id).await? {
            self.forget_session(sid).await;
        }
        Ok(())
    }

    /// Is the session live? From this process's cache while fresh (30 s, which
    /// is also how often activity is recorded); then a Redis tombstone, else
    /// PostgreSQL (which records the activity). An ended session is dropped from
    /// every replica's cache by the invalidation channels.
    pub async fn session_state(&self, sid: Uuid) -> ServiceResult<SessionState> {
        self.sessions
            .get_or_load(sid, || self.load_session_state(sid))
            .await
    }

    async fn load_session_state(&self, sid: Uuid) -> ServiceResult<SessionState> {
        match self.cache.get_string(&Self::session_key(sid)).await {
            Ok(Some(v)) => {
                if let Ok(state @ SessionState::Revoked { .. }) =
                    serde_json::from_str::<SessionState>(&v)
                {
                    return Ok(state);
                }
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "session cache unavailable, asking PostgreSQL"),
        }
        let idle = self.settings.session_idle_timeout_seconds;
        let state = match sessions::auth_state(&self.db.pool, sid, idle).await? {
            None => SessionState::Revoked {
                reason: "unknown".into(),
            },
            Some(s) if s.user_status != "active" => SessionState::Revoked {
                reason: "user_disabled".into(),
            },
            Some(s) if s.revoked || s.expired => SessionState::Revoked {
                reason: s.revoked_reason.unwrap_or_else(|| "expired".into()),
            },
            Some(s) => SessionState::Live {
                uid: s.user_id,
                roles: s.roles,
            },
        };
        if let SessionState::Revoked { .. } = state {
            // A tombstone for the other replicas; no invalidation (nothing changed).
            if let Ok(v) = serde_json::to_string(&state) {
                let _ = self
                    .cache
                    .set_string(&Self::session_key(sid), &v, self.tombstone_ttl())
                    .await;
            }
        }
        Ok(state)
    }

    /// A user as the caches hold it (`None`: no such user).
    pub(crate) async fn cached_user(&self, id: Uuid) -> ServiceResult<Option<Arc<User>>> {
        self.profiles
            .get_or_load(id, || async move {
                Ok(crate::store::users::get(&self.db.pool, id)
                    .await?
                    .map(|u| Arc::new(u.into_user())))
            })
            .await
    }

    fn token_hash(&self, token: &str) -> [u8; 32] {
        let mut mac = self.token_key.clone();
        mac.update(token.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// The signature facts of an access token: from the cache for a repeat
    /// (refused once past `exp` plus the leeway, exactly as the verifier would),
    /// otherwise by an Ed25519 verification.
    fn access_claims(&self, token: &str) -> Result<Arc<AccessClaims>, TokenRefusal> {
        let key = self.token_hash(token);
        if let Some(c) = self.token_claims.get(&key) {
            if now_secs() > c.exp + crate::crypto::jwt::LEEWAY_SECS as i64 {
                return Err(TokenRefusal::Expired);
            }
            return Ok(c);
        }
        let claims: Claims = match self.jwt.verify(token, TokenType::Access) {
            Ok(c) => c,
            Err(JwtError::Expired) => return Err(TokenRefusal::Expired),
            Err(JwtError::Invalid) => return Err(TokenRefusal::Invalid),
        };
        let (Ok(user_id), Some(session_id)) = (
            Uuid::parse_str(&claims.sub),
            claims.sid.as_deref().and_then(|s| Uuid::parse_str(s).ok()),
        ) else {
            return Err(TokenRefusal::Invalid);
        };
        let c = Arc::new(AccessClaims {
            user_id,
            session_id,
            exp: claims.exp,
            // Tokens signed before amr existed were password logins.
            amr: claims.amr.unwrap_or_default().into(),
            auth_time: claims.auth_time.unwrap_or(claims.iat),
        });
        self.token_claims.insert(key, c.clone());
        Ok(c)
    }

    /// Verifies an access token and that its session is live. The outer error is
    /// a failure to find out (database down), not a verdict on the token.
    pub async fn verify_access_token(
        &self,
        token: &str,
    ) -> ServiceResult<Result<AccessGrant, TokenRefusal>> {
        let verdict = self.check_access_token(token).await?;
        let i = match &verdict {
            Ok(_) => 0,
            Err(TokenRefusal::Invalid) => 1,
            Err(TokenRefusal::Expired) => 2,
            Err(TokenRefusal::SessionRevoked) => 3,
            Err(TokenRefusal::UserDisabled) => 4,
        };
        self.access_verifications[i].increment(1);
        Ok(verdict)
    }

    async fn check_access_token(
        &self,
        token: &str,
    ) -> ServiceResult<Result<AccessGrant, TokenRefusal>> {
        let claims = match self.access_claims(token) {
            Ok(c) => c,
            Err(r) => return Ok(Err(r)),
        };
        let (user_id, sid) = (claims.user_id, claims.session_id);
        match self.session_state(sid).await? {
            SessionState::Live { uid, .. } if uid == user_id => {}
            SessionState::Live { .. } => return Ok(Err(TokenRefusal::Invalid)),
            SessionState::Revoked { reason } if reason == "user_disabled" => {
                return Ok(Err(TokenRefusal::UserDisabled))
            }
            SessionState::Revoked { .. } => return Ok(Err(TokenRefusal::SessionRevoked)),
        }
        // Roles and status from the user as it is now (a role change or a
        // disabled user drops the cached copy on every replica).
        Ok(match self.cached_user(user_id).await? {
            Some(u) if u.is_active() => Ok(AccessGrant {
                user_id,
                session_id: sid,
                roles: u.roles.clone(),
                expires_at: claims.exp,
                user: u,
                amr: claims.amr.clone(),
                auth_time: claims.auth_time,
            }),
            Some(_) => Err(TokenRefusal::UserDisabled),
            None => Err(TokenRefusal::Invalid),
        })
    }

    /// The session cookie holds the session's current refresh token: it
    /// authenticates browser requests without rotating.
    pub async fn verify_session_cookie(&self, value: &str) -> ServiceResult<Caller> {
        let cookie = self
            .cookies
            .get_or_load(self.token_hash(value), || async {
                let idle = self.settings.session_idle_timeout_seconds;
                Ok(
                    match sessions::refresh_token(&self.db.pool, &sha256(value), idle).await? {
                        None => CookieSession {
                            session_id: Uuid::nil(),
                            user_id: Uuid::nil(),
                            usable: false,
                        },
                        Some(row) => CookieSession {
                            session_id: row.session_id,
                            user_id: row.user_id,
                            usable: !(row.used || row.expired || !row.session_live),
                        },
                    },
                )
            })
            .await?;
        if !cookie.usable {
            return Err(ServiceError::InvalidToken);
        }
        match self.session_state(cookie.session_id).await? {
            SessionState::Live { uid, .. } if uid == cookie.user_id => {}
            _ => return Err(ServiceError::InvalidToken),
        }
        match self.cached_user(cookie.user_id).await? {
            Some(u) if u.is_active() => Ok(Caller::User {
                user_id: u.id,
                roles: u.roles.clone(),
                session_id: Some(cookie.session_id),
                key: None,
            }),
            _ => Err(ServiceError::InvalidToken),
        }
    }

    /// Verifies a service token; a repeat of a token already verified costs a hash
    /// and a lookup instead of an Ed25519 verification.
    pub fn verify_service_token(&self, token: &str) -> ServiceResult<Caller> {
        let grant = match self.service_tokens.get(token) {
            Some(g) if g.exp > now_secs() => {
                self.service_token_hits.increment(1);
                g
            }
            _ => {
                self.service_token_misses.increment(1);
                let claims = self
                    .jwt
                    .verify(token, TokenType::Service)
                    .map_err(|_| ServiceError::InvalidToken)?;
                let grant = Arc::new(ServiceGrant {
                    client_id: claims.sub.into(),
                    scopes: claims
                        .scope
                        .unwrap_or_default()
                        .split_whitespace()
                        .map(str::to_string)
                        .collect(),
                    exp: claims.exp,
                });
                self.service_tokens.insert(token.into(), grant.clone());
                grant
            }
        };
        Ok(Caller::ServiceClient {
            client_id: grant.client_id.clone(),
            scopes: grant.scopes.clone(),
        })
    }
}

/// The answer to VerifyToken: a bad token is an answer, not an error.
pub enum TokenVerification {
    Valid {
        user: Arc<User>,
        accounts: Arc<[AccountAccess]>,
        session_id: Uuid,
        expires_at: i64,
        amr: Arc<[String]>,
        auth_time: i64,
    },
    Refused(TokenRefusal),
}

impl Identity {
    /// VerifyToken for a service client holding `auth:verify`: signature, claims,
    /// session still live and user still active, with the user's accounts. A
    /// repeat token is answered from this process's caches.
    pub async fn verify_token(
        &self,
        caller: &Caller,
        token: &str,
    ) -> ServiceResult<TokenVerification> {
        if !matches!(caller, Caller::ServiceClient { .. })
            || !caller.key_allows_scope("auth:verify")
        {
            return Err(ServiceError::Forbidden("scope auth:verify required".into()));
        }
        let grant = match self.verify_access_token(token).await? {
            Ok(g) => g,
            Err(r) => return Ok(TokenVerification::Refused(r)),
        };
        let uid = grant.user_id;
        let accounts = self
            .token_accounts
            .get_or_load(uid, || async move {
                let list = crate::store::accounts::list_for_user(
                    &self.db,
                    uid,
                    None,
                    None,
                    MAX_TOKEN_ACCOUNTS,
                )
                .await?;
                Ok(Arc::from(list))
            })
            .await?;
        Ok(TokenVerification::Valid {
            user: grant.user,
            accounts,
            session_id: grant.session_id,
            expires_at: grant.expires_at,
            amr: grant.amr,
            auth_time: grant.auth_time,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    pub(super) fn offline_identity() -> Identity {
        let vars = [
            ("DATABASE_URL", "postgres://x@127.0.0.1:1/x"),
            ("REDIS_URL", "redis://127.0.0.1:1/0"),
            (
                "JWT_PRIVATE_KEY",
                &crate::crypto::key_material::generate_signing_key_pem(),
            ),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let settings = Settings::from_vars(vars).unwrap();
        let db = Db::connect_lazy(&settings).unwrap();
        let cache = Cache::connect(&settings).unwrap();
        Identity::new(&settings, db, cache.clone(), Invalidation::new(cache)).unwrap()
    }

    /// A cached access token is refused in the very second the signature check
    /// would refuse it (exp plus the verifier's leeway), not when its cache
    /// entry happens to go.
    #[tokio::test]
    async fn cached_access_tokens_expire_to_the_second() {
        let id = offline_identity();
        let mut claims = id.jwt.claims(
            TokenType::Access,
            Uuid::new_v4().to_string(),
            Duration::from_secs(300),
            Some(Uuid::new_v4().to_string()),
            None,
        );
        // Still accepted during this second only.
        let leeway = crate::crypto::jwt::LEEWAY_SECS as i64;
        claims.exp = now_secs() - leeway;
        let token = id.jwt.sign(&claims).unwrap();
        if id.access_claims(&token).is_err() {
            return; // the second ended between the two lines: nothing to learn
        }
        assert!(id.token_claims.contains_key(&id.token_hash(&token)));
        while now_secs() <= claims.exp + leeway {
            assert!(id.access_claims(&token).is_ok());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(id.access_claims(&token).unwrap_err(), TokenRefusal::Expired);
        // And a token that never verified is never cached.
        let forged = format!("{token}x");
        assert_eq!(
            id.access_claims(&forged).unwrap_err(),
            TokenRefusal::Invalid
        );
        assert!(!id.token_claims.contains_key(&id.token_hash(&forged)));
    }

    /// The interceptor's hot path: a repeat service token must cost a hash and a
    /// lookup, not an Ed25519 verification.
    #[tokio::test]
    async fn repeat_service_tokens_skip_signature_verification() {
        let id = offline_identity();
        let claims = id.jwt.claims(
            TokenType::Service,
            "backend".into(),
            Duration::from_secs(300),
            None,
            Some("auth:verify users:read".into()),
        );
        let token = id.jwt.sign(&claims).unwrap();

        const N: u32 = 2_000;
        let started = Instant::now();
        for _ in 0..N {
            id.jwt.verify(&token, TokenType::Service).unwrap();
        }
        let uncached = started.elapsed() / N;
        id.verify_service_token(&token).unwrap();
        let started = Instant::now();
        for _ in 0..N {
            let c = id.verify_service_token(&token).unwrap();
            assert!(c.key_allows_scope("users:read"));
        }
        let cached = started.elapsed() / N;
        println!("service token: full verify {uncached:?}, cached {cached:?}");
        assert!(cached * 3 < uncached, "cached {cached:?} vs {uncached:?}");
        // A token that does not verify is never served from the cache.
        assert!(id.verify_service_token(&format!("{token}x")).is_err());
    }
}

#[cfg(test)]
mod rss_probe {
    use super::*;

    fn rss_kib() -> u64 {
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap()
    }

    /// What 100,000 distinct cached tokens (each its own session and user) cost:
    /// `cargo test --release --lib rss_of_100k -- --ignored --nocapture`.
    #[tokio::test]
    #[ignore = "a measurement, run by hand"]
    async fn rss_of_100k_cached_tokens() {
        let id = super::tests::offline_identity();
        let before = rss_kib();
        for i in 0..100_000u32 {
            let uid = Uuid::new_v4();
            let sid = Uuid::new_v4();
            let mut h = [0u8; 32];
            h[..4].copy_from_slice(&i.to_le_bytes());
            id.token_claims.insert(
                h,
                Arc::new(AccessClaims {
                    user_id: uid,
                    session_id: sid,
                    exp: now_secs() + 900,
                    amr: Arc::from(Vec::new()),
                    auth_time: now_secs(),
                }),
            );
            let _ = id
                .sessions
                .get_or_load(sid, || async move {
                    Ok(SessionState::Live {
                        uid,
                        roles: vec!["user".into()],
                    })
                })
                .await;
            let _ = id
                .profiles
                .get_or_load(uid, || async move {
                    Ok(Some(Arc::new(User {
                        id: uid,
                        email: format!("user{i}@example.com"),
                        full_name: format!("User number {i}"),
                        roles: vec!["user".into()],
                        status: "active".into(),
                        email_verified: false,
                        created_at: chrono::Utc::now(),
                    })))
                })
                .await;
            let _ = id
                .token_accounts
                .get_or_load(uid, || async { Ok(Arc::from(Vec::new())) })
                .await;
        }
        id.token_claims.run_pending_tasks();
        println!(
            "RSS {} KiB -> {} KiB: {} KiB for 100k tokens (claims, session, user, accounts)",
            before,
            rss_kib(),
            rss_kib() - before
        );
    }
}
