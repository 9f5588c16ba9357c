//! `Identity`: users, sessions, tokens and service clients. This file holds the
//! struct and what every request needs — turning an access token, session cookie
//! or service token into a `Caller`. Use cases live in `auth.rs` and `users.rs`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use moka::sync::Cache as MokaCache;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::invalidation::Invalidation;
use super::{Caller, ServiceError, ServiceResult};
use crate::config::Settings;
use crate::crypto::jwt::{Claims, JwtError, JwtKeys, TokenType};
use crate::crypto::password::PasswordHasher;
use crate::store::{sessions, Cache, Db};

/// How long a replica may trust a cached "live" session before asking PostgreSQL
/// again (only matters if Redis lost a revocation while it was down).
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

/// A verified access token.
#[derive(Debug, Clone)]
pub struct AccessGrant {
    pub user_id: Uuid,
    pub session_id: Uuid,
    pub roles: Vec<String>,
    pub expires_at: i64,
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

/// Bound and lifetime of the profile cache; the TTL only limits how long a change
/// missed by a replica (Redis down) can linger.
const PROFILE_CACHE_CAPACITY: u64 = 100_000;
const PROFILE_CACHE_TTL: Duration = Duration::from_secs(30);

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
    /// Tells every replica's caches (API keys …) that a user changed.
    pub(crate) invalidation: Invalidation,
    /// Profiles by user id for GET /v1/users/me, the gateway's hottest read:
    /// dropped on every replica when the user changes (the invalidation bus).
    pub(crate) profiles: MokaCache<Uuid, Arc<crate::domain::user::User>>,
}

impl Identity {
    pub fn new(
        settings: &Settings,
        db: Db,
        cache: Cache,
        invalidation: Invalidation,
    ) -> anyhow::Result<Self> {
        let profiles: MokaCache<Uuid, Arc<crate::domain::user::User>> = MokaCache::builder()
            .max_capacity(PROFILE_CACHE_CAPACITY)
            .time_to_live(PROFILE_CACHE_TTL)
            .build();
        {
            let profiles = profiles.clone();
            invalidation.on_change(move |change| match change {
                super::invalidation::Change::User(id) => profiles.invalidate(&id),
                super::invalidation::Change::Everything => profiles.invalidate_all(),
                super::invalidation::Change::ApiKey(_)
                | super::invalidation::Change::Account(_) => {}
            });
        }
        Ok(Self {
            profiles,
            invalidation,
            jwt: JwtKeys::from_settings(settings)?,
            hasher: PasswordHasher::new(settings.argon2_max_concurrency),
            service_tokens: MokaCache::builder()
                .max_capacity(SERVICE_TOKEN_CACHE_CAPACITY)
                .expire_after(UntilExp)
                .build_with_hasher(foldhash::fast::RandomState::default()),
            service_token_hits: metrics::counter!("service_token_cache_total", "result" => "hit"),
            service_token_misses: metrics::counter!("service_token_cache_total", "result" => "miss"),
            local_counters: super::auth::LocalCounters::default(),
            login_turns: super::auth::Turns::default(),
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

    /// Records a session state in Redis (best effort: PostgreSQL stays the truth).
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
    }

    /// Drops cached "live" entries (after a role change) so the next request reads
    /// PostgreSQL.
    pub(crate) async fn forget_session(&self, sid: Uuid) {
        let _ = self.cache.del(&Self::session_key(sid)).await;
    }

    /// Drops the cached state of every live session of a user, so a change of
    /// roles is seen on the next request.
    pub async fn forget_user_sessions(&self, user_id: Uuid) -> ServiceResult<()> {
        for sid in sessions::live_ids_for_user(&self.db.pool, user_id).await? {
            self.forget_session(sid).await;
        }
        Ok(())
    }

    /// Is the session live? Redis first (shared by replicas, so an ended session is
    /// refused at once everywhere); PostgreSQL when Redis misses or is down.
    pub async fn session_state(&self, sid: Uuid) -> ServiceResult<SessionState> {
        match self.cache.get_string(&Self::session_key(sid)).await {
            Ok(Some(v)) => {
                if let Ok(state) = serde_json::from_str::<SessionState>(&v) {
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
        self.cache_session(sid, &state).await;
        Ok(state)
    }

    /// Verifies an access token and that its session is live. The outer error is
    /// a failure to find out (database down), not a verdict on the token.
    pub async fn verify_access_token(
        &self,
        token: &str,
    ) -> ServiceResult<Result<AccessGrant, TokenRefusal>> {
        let verdict = self.check_access_token(token).await?;
        let result = match &verdict {
            Ok(_) => "valid",
            Err(TokenRefusal::Invalid) => "invalid",
            Err(TokenRefusal::Expired) => "expired",
            Err(TokenRefusal::SessionRevoked) => "session_revoked",
            Err(TokenRefusal::UserDisabled) => "user_disabled",
        };
        metrics::counter!("token_verifications_total", "kind" => "access", "result" => result)
            .increment(1);
        Ok(verdict)
    }

    async fn check_access_token(
        &self,
        token: &str,
    ) -> ServiceResult<Result<AccessGrant, TokenRefusal>> {
        let claims: Claims = match self.jwt.verify(token, TokenType::Access) {
            Ok(c) => c,
            Err(JwtError::Expired) => return Ok(Err(TokenRefusal::Expired)),
            Err(JwtError::Invalid) => return Ok(Err(TokenRefusal::Invalid)),
        };
        let (Ok(user_id), Some(sid)) = (
            Uuid::parse_str(&claims.sub),
            claims.sid.as_deref().and_then(|s| Uuid::parse_str(s).ok()),
        ) else {
            return Ok(Err(TokenRefusal::Invalid));
        };
        Ok(match self.session_state(sid).await? {
            SessionState::Live { uid, roles } if uid == user_id => Ok(AccessGrant {
                user_id,
                session_id: sid,
                roles,
                expires_at: claims.exp,
            }),
            SessionState::Live { .. } => Err(TokenRefusal::Invalid),
            SessionState::Revoked { reason } if reason == "user_disabled" => {
                Err(TokenRefusal::UserDisabled)
            }
            SessionState::Revoked { .. } => Err(TokenRefusal::SessionRevoked),
        })
    }

    /// The session cookie holds the session's current refresh token: it
    /// authenticates browser requests without rotating.
    pub async fn verify_session_cookie(&self, value: &str) -> ServiceResult<Caller> {
        let idle = self.settings.session_idle_timeout_seconds;
        let row = sessions::refresh_token(&self.db.pool, &sha256(value), idle)
            .await?
            .ok_or(ServiceError::InvalidToken)?;
        if row.used || row.expired || !row.session_live {
            return Err(ServiceError::InvalidToken);
        }
        match self.session_state(row.session_id).await? {
            SessionState::Live { uid, roles } if uid == row.user_id => Ok(Caller::User {
                user_id: uid,
                roles,
                session_id: Some(row.session_id),
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
        user: crate::domain::user::User,
        session_id: Uuid,
        expires_at: i64,
    },
    Refused(TokenRefusal),
}

impl Identity {
    /// VerifyToken for a service client holding `auth:verify`: signature, claims,
    /// session still live and user still active.
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
        match crate::store::users::get(&self.db.pool, grant.user_id).await? {
            Some(u) if u.status == "active" => Ok(TokenVerification::Valid {
                user: u.into_user(),
                session_id: grant.session_id,
                expires_at: grant.expires_at,
            }),
            Some(_) => Ok(TokenVerification::Refused(TokenRefusal::UserDisabled)),
            None => Ok(TokenVerification::Refused(TokenRefusal::Invalid)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    /// The interceptor's hot path: a repeat service token must cost a hash and a
    /// lookup, not an Ed25519 verification.
    #[tokio::test]
    async fn repeat_service_tokens_skip_signature_verification() {
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
        let id = Identity::new(&settings, db, cache.clone(), Invalidation::new(cache)).unwrap();
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
