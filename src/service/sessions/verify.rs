//! What every request needs: an access token, a session cookie or (VerifyToken) a
//! caller's bearer token turned into a verdict, from this process's caches for a
//! repeat token.

use hmac::Mac;
use std::sync::Arc;
use uuid::Uuid;

use super::{sha256, Sessions};
use crate::crypto::jwt::{Claims, JwtError, TokenType};
use crate::domain::account::AccountAccess;
use crate::domain::session::{RevocationReason, SessionState};
use crate::domain::user::{Role, User};
use crate::service::swr::Interned;
use crate::service::{now_secs, Caller, ServiceError, ServiceResult};
use crate::store::sessions;

/// Accounts listed per user in VerifyToken, at most (as the accounts service).
const MAX_TOKEN_ACCOUNTS: i64 = 1000;

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
    pub roles: Vec<Role>,
    pub expires_at: i64,
    pub user: Arc<User>,
    /// The token's `amr` and `auth_time` (issue 14).
    pub amr: Arc<[String]>,
    pub auth_time: i64,
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

/// What an access token's signature established, cached by a keyed hash of the
/// token: nothing here can be revoked (the session and user are checked apart).
/// Held inline in the cache (64 bytes), not behind an Arc of its own.
#[derive(Debug, Clone)]
pub(super) struct AccessClaims {
    user_id: Uuid,
    session_id: Uuid,
    exp: i64,
    amr: Arc<[String]>,
    auth_time: i64,
}

/// A session cookie (the session's current refresh token) as last read.
#[derive(Debug, Clone, Copy)]
pub(super) struct CookieSession {
    pub(super) session_id: Uuid,
    user_id: Uuid,
    /// Unused, unexpired and its session live when read.
    usable: bool,
}

/// The `amr` lists tokens carry are a handful of combinations of our own
/// values (only signed tokens get here): cached tokens share one copy of each
/// instead of a list per token.
fn intern_amr(amr: Vec<String>) -> Arc<[String]> {
    static SEEN: Interned<[String]> = Interned::new(64);
    SEEN.share(amr)
}

/// One shared empty list for every user without accounts, not an allocation
/// per cached user.
fn no_accounts() -> Arc<[AccountAccess]> {
    static EMPTY: std::sync::OnceLock<Arc<[AccountAccess]>> = std::sync::OnceLock::new();
    EMPTY.get_or_init(|| Arc::from(Vec::new())).clone()
}

impl Sessions {
    /// The cache key of a token: 128 bits of its HMAC under this process's
    /// random key (a collision is out of reach, and half of the 32 bytes saved
    /// in each of up to 100,000 entries).
    fn token_hash(&self, token: &str) -> [u8; 16] {
        let mut mac = self.token_key.clone();
        mac.update(token.as_bytes());
        let mut key = [0u8; 16];
        key.copy_from_slice(&mac.finalize().into_bytes()[..16]);
        key
    }

    /// The signature facts of an access token: from the cache for a repeat
    /// (refused once past `exp` plus the leeway, exactly as the verifier would),
    /// otherwise by an Ed25519 verification.
    fn access_claims(&self, token: &str) -> Result<AccessClaims, TokenRefusal> {
        let key = self.token_hash(token);
        if let Some(c) = self.token_claims.get(&key) {
            if now_secs() > c.exp + crate::crypto::jwt::LEEWAY_SECS as i64 {
                self.token_claims.remove(&key);
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
        let c = AccessClaims {
            user_id,
            session_id,
            exp: claims.exp,
            // Tokens signed before amr existed were password logins.
            amr: intern_amr(claims.amr.unwrap_or_default()),
            auth_time: claims.auth_time.unwrap_or(claims.iat),
        };
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
        match self.state(sid).await? {
            SessionState::Live { user_id: uid, .. } if uid == user_id => {}
            SessionState::Live { .. } => return Ok(Err(TokenRefusal::Invalid)),
            SessionState::Revoked {
                reason: RevocationReason::UserDisabled,
            } => return Ok(Err(TokenRefusal::UserDisabled)),
            SessionState::Revoked { .. } => return Ok(Err(TokenRefusal::SessionRevoked)),
        }
        // Roles and status from the user as it is now (a role change or a
        // disabled user drops the cached copy on every replica).
        Ok(match self.user(user_id).await? {
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
                let idle = self.idle_timeout_secs;
                Ok(
                    match sessions::refresh_token(&self.db, &sha256(value), idle).await? {
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
        match self.state(cookie.session_id).await? {
            SessionState::Live { user_id, .. } if user_id == cookie.user_id => {}
            _ => return Err(ServiceError::InvalidToken),
        }
        match self.user(cookie.user_id).await? {
            Some(u) if u.is_active() => Ok(Caller::User {
                user_id: u.id,
                roles: u.roles.clone(),
                session_id: Some(cookie.session_id),
                key: None,
            }),
            _ => Err(ServiceError::InvalidToken),
        }
    }

    /// VerifyToken for a service client holding `auth:verify`: signature, claims,
    /// session still live and user still active, with the user's accounts. A
    /// repeat token is answered from this process's caches.
    pub async fn verify_token(
        &self,
        caller: &Caller,
        token: &str,
    ) -> ServiceResult<TokenVerification> {
        caller.require_service_scope("auth:verify")?;
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
                Ok(if list.is_empty() {
                    no_accounts()
                } else {
                    Arc::from(list)
                })
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
    use super::*;
    use crate::config::Settings;
    use crate::service::invalidation::Invalidation;
    use crate::store::{Cache, Db};
    use std::time::Duration;

    pub(super) fn offline_sessions() -> Sessions {
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
        let jwt = Arc::new(crate::crypto::jwt::JwtKeys::from_settings(&settings).unwrap());
        Sessions::new(&settings, db, cache.clone(), Invalidation::new(cache), jwt)
    }

    /// A cached access token is refused in the very second the signature check
    /// would refuse it (exp plus the verifier's leeway), not when its cache
    /// entry happens to go.
    #[tokio::test]
    async fn cached_access_tokens_expire_to_the_second() {
        let s = offline_sessions();
        let mut claims = s.jwt.claims(
            TokenType::Access,
            Uuid::new_v4().to_string(),
            Duration::from_secs(300),
            Some(Uuid::new_v4().to_string()),
            None,
        );
        // Still accepted during this second only.
        let leeway = crate::crypto::jwt::LEEWAY_SECS as i64;
        claims.exp = now_secs() - leeway;
        let token = s.jwt.sign(&claims).unwrap();
        if s.access_claims(&token).is_err() {
            return; // the second ended between the two lines: nothing to learn
        }
        assert!(s.token_claims.contains_key(&s.token_hash(&token)));
        while now_secs() <= claims.exp + leeway {
            assert!(s.access_claims(&token).is_ok());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(s.access_claims(&token).unwrap_err(), TokenRefusal::Expired);
        // And a token that never verified is never cached.
        let forged = format!("{token}x");
        assert_eq!(s.access_claims(&forged).unwrap_err(), TokenRefusal::Invalid);
        assert!(!s.token_claims.contains_key(&s.token_hash(&forged)));
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
        let s = super::tests::offline_sessions();
        let ids: Vec<(Uuid, Uuid)> = (0..100_000)
            .map(|_| (Uuid::new_v4(), Uuid::new_v4()))
            .collect();
        let last = std::cell::Cell::new(rss_kib());
        let start = last.get();
        let step = |what: &str| {
            let now = rss_kib();
            println!("{what}: {} KiB", now.saturating_sub(last.get()));
            last.set(now);
        };
        for (i, (uid, sid)) in ids.iter().enumerate() {
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&(i as u32).to_le_bytes());
            s.token_claims.insert(
                h,
                AccessClaims {
                    user_id: *uid,
                    session_id: *sid,
                    exp: now_secs() + 900,
                    amr: intern_amr(vec!["pwd".to_string()]),
                    auth_time: now_secs(),
                },
            );
        }
        step("claims (by token hash)");
        for (uid, sid) in &ids {
            let uid = *uid;
            let _ = s
                .states
                .get_or_load(
                    *sid,
                    || async move { Ok(SessionState::Live { user_id: uid }) },
                )
                .await;
        }
        step("session states (SwrCache)");
        for (i, (uid, _)) in ids.iter().enumerate() {
            let uid = *uid;
            let _ = s
                .profiles
                .get_or_load(uid, || async move {
                    Ok(Some(Arc::new(User {
                        id: uid,
                        email: format!("user{i}@example.com"),
                        full_name: format!("User number {i}"),
                        roles: vec![Role::User],
                        status: crate::domain::user::UserStatus::Active,
                        email_verified: false,
                        created_at: chrono::Utc::now(),
                    })))
                })
                .await;
        }
        step("users (SwrCache)");
        for (uid, _) in &ids {
            let _ = s
                .token_accounts
                .get_or_load(*uid, || async { Ok(Arc::from(Vec::new())) })
                .await;
        }
        step("accounts lists, empty (SwrCache)");
        println!(
            "RSS {start} KiB -> {} KiB: {} KiB for 100k tokens (claims, session, user, accounts)",
            last.get(),
            last.get() - start
        );
        // Session cookies: a session change drops its cookies with a pass over
        // all of them (SwrCache::invalidate_if); what one pass costs when full.
        for (i, (uid, sid)) in ids.iter().enumerate() {
            let (uid, sid) = (*uid, *sid);
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&(i as u32).to_le_bytes());
            let _ = s
                .cookies
                .get_or_load(h, || async move {
                    Ok(CookieSession {
                        session_id: sid,
                        user_id: uid,
                        usable: true,
                    })
                })
                .await;
        }
        step("session cookies (SwrCache)");
        let gone = ids[0].1;
        let t = std::time::Instant::now();
        s.cookies
            .invalidate_if(move |_, c: &CookieSession| c.session_id == gone);
        println!("one session change over 100k cookies: {:?}", t.elapsed());
    }
}
