//! Service clients (internal callers): the client-credentials grant that issues
//! their short-lived service tokens, the verification of those tokens on every
//! gRPC call (cached: a repeat token costs a lookup), and the operator's
//! create / rotate-secret.

use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use super::audit::{AuditEntry, Outcome};
use super::swr::{lean, Lean};
use super::{now_secs, Caller, ServiceError, ServiceResult};
use crate::config::Settings;
use crate::crypto::client_secret;
use crate::crypto::jwt::{JwtKeys, TokenType};
use crate::crypto::password::PasswordHasher;
use crate::store::{service_clients, Db};

/// Verified service tokens kept in process.
const SERVICE_TOKEN_CACHE_CAPACITY: u64 = 10_000;

/// Scopes only service clients hold (DESIGN.md section 2); with the API-key
/// catalog they are what a service client may be given.
pub const SERVICE_SCOPES: [&str; 5] = [
    "auth:verify",
    "users:read",
    "permissions:check",
    "accounts:read",
    "credentials:read",
];

pub struct ServiceToken {
    pub access_token: String,
    pub expires_in: u64,
    pub scope: String,
}

/// A service client's id and its secret, shown this once. Not Debug.
pub struct ClientCredentials {
    pub client_id: String,
    pub client_secret: SecretString,
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
/// (quick_cache's ahash) replaces the SHA-256 of the ~450-byte token that was measurable on
/// every call. The key comparison is not constant-time; it can only tell how long
/// a prefix a probe shares with whichever cached tokens sit on its probe path
/// (per-process random seed), in nanoseconds far below network jitter, and a
/// token's secret part, its signature, is at the end.
///
/// quick_cache rather than moka: a moka read records the access in a buffer of
/// its own, ~1 µs on every gRPC call (a dwarf profile of VerifyApiKey). There is
/// no per-entry timer: `verify_token` checks `exp` on every hit, and an expired
/// token waits for eviction within the bound (`swr::lean`, as the other caches).
type ServiceTokenCache = Lean<Box<str>, Arc<ServiceGrant>>;

pub struct ServiceClients {
    db: Db,
    /// For secrets stored before SHA-256 (argon2), verified once and re-stored.
    hasher: PasswordHasher,
    jwt: Arc<JwtKeys>,
    /// SERVICE_TOKEN_TTL_SECONDS.
    token_ttl_secs: u64,
    tokens: ServiceTokenCache,
    /// service_token_cache_total{result="hit"|"miss"}, registered once (hot path).
    token_hits: metrics::Counter,
    token_misses: metrics::Counter,
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

/// A random client secret (256 bits, base64url), shown once, and how it is
/// stored: SHA-256, not argon2. The secret is 256 random bits, so no guess list
/// applies and a slow hash buys nothing; and argon2 runs at idle priority
/// (crypto::password), where token renewals would starve exactly when
/// VerifyApiKey keeps the core busy, and every caller's gRPC calls would then
/// fail for want of a token.
fn new_secret() -> (SecretString, String) {
    let secret = SecretString::from(super::random_token());
    let hash = client_secret::hash(secret.expose_secret());
    (secret, hash)
}

impl ServiceClients {
    pub fn new(settings: &Settings, db: Db, hasher: PasswordHasher, jwt: Arc<JwtKeys>) -> Self {
        Self {
            db,
            hasher,
            jwt,
            token_ttl_secs: settings.service_token_ttl_seconds,
            tokens: lean(SERVICE_TOKEN_CACHE_CAPACITY),
            token_hits: metrics::counter!("service_token_cache_total", "result" => "hit"),
            token_misses: metrics::counter!("service_token_cache_total", "result" => "miss"),
        }
    }

    /// OAuth 2.0 client credentials: a short-lived service JWT with the client's
    /// scopes. Unknown client, wrong secret or disabled client look the same.
    #[tracing::instrument(skip_all)]
    pub async fn issue_token(
        &self,
        client_id: &str,
        client_secret: String,
    ) -> ServiceResult<ServiceToken> {
        if client_id.len() > 64 || client_secret.len() > 256 {
            return Err(ServiceError::InvalidClient);
        }
        let client = service_clients::by_client_id(&self.db, client_id).await?;
        let hash = client
            .as_ref()
            .filter(|c| c.active)
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
                        &self.db,
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
        let ttl = self.token_ttl_secs;
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

    /// Verifies a service token; a repeat of a token already verified costs a hash
    /// and a lookup instead of an Ed25519 verification.
    pub fn verify_token(&self, token: &str) -> ServiceResult<Caller> {
        let grant = match self.tokens.get(token) {
            Some(g) if g.exp > now_secs() => {
                self.token_hits.increment(1);
                g
            }
            _ => {
                self.token_misses.increment(1);
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
                self.tokens.insert(token.into(), grant.clone());
                grant
            }
        };
        Ok(Caller::ServiceClient {
            client_id: grant.client_id.clone(),
            scopes: grant.scopes.clone(),
        })
    }

    /// A new service client with a fresh secret (operator CLI, tests).
    #[tracing::instrument(skip_all, fields(client_id = %client_id))]
    pub async fn create(
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
        let known = service_clients::known_scopes(&self.db).await?;
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
        let (secret, hash) = new_secret();
        let mut tx = self.db.begin().await?;
        let id = service_clients::insert(&mut tx, client_id, client_id, scopes, &hash).await?;
        tx.audit(
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
    pub async fn rotate_secret(
        &self,
        actor: Option<&Caller>,
        client_id: &str,
    ) -> ServiceResult<ClientCredentials> {
        let (secret, hash) = new_secret();
        let mut tx = self.db.begin().await?;
        if !service_clients::set_secret(&mut tx, client_id, &hash).await? {
            return Err(ServiceError::NotFound("service client"));
        }
        tx.audit(
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

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::store::Db;

    fn offline_clients() -> ServiceClients {
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
        let jwt = Arc::new(JwtKeys::from_settings(&settings).unwrap());
        ServiceClients::new(&settings, db, PasswordHasher::new(Some(1)), jwt)
    }

    /// The interceptor's hot path: a repeat service token must cost a hash and a
    /// lookup, not an Ed25519 verification.
    #[tokio::test]
    async fn repeat_service_tokens_skip_signature_verification() {
        let clients = offline_clients();
        let claims = clients.jwt.claims(
            TokenType::Service,
            "backend".into(),
            Duration::from_secs(300),
            None,
            Some("auth:verify users:read".into()),
        );
        let token = clients.jwt.sign(&claims).unwrap();

        const N: u32 = 2_000;
        let started = Instant::now();
        for _ in 0..N {
            clients.jwt.verify(&token, TokenType::Service).unwrap();
        }
        let uncached = started.elapsed() / N;
        clients.verify_token(&token).unwrap();
        let started = Instant::now();
        for _ in 0..N {
            let c = clients.verify_token(&token).unwrap();
            assert!(c.key_allows_scope("users:read"));
        }
        let cached = started.elapsed() / N;
        println!("service token: full verify {uncached:?}, cached {cached:?}");
        assert!(cached * 3 < uncached, "cached {cached:?} vs {uncached:?}");
        // A token that does not verify is never served from the cache.
        assert!(clients.verify_token(&format!("{token}x")).is_err());
    }
}
