//! Validation: what makes settings unsafe to run, one line per problem (the
//! `error:` lines of `check-config` and `serve`).

use secrecy::ExposeSecret;

use super::{ConfigError, Environment, NotifySink, SameSite, Settings};
use crate::crypto::key_material::{self, Fingerprint};

impl Settings {
    /// Every problem with these settings, one line each. Empty means fine.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        // ---- runtime ----
        if self.trust_forwarded_for.is_some() {
            p.push(
                "TRUST_FORWARDED_FOR is replaced by TRUSTED_PROXIES: remove it and list the \
                 proxies whose X-Forwarded-For counts (CIDRs, e.g. 127.0.0.1/32,::1/128)"
                    .into(),
            );
        }
        if self.http_header_read_timeout_seconds == 0 || self.http_idle_timeout_seconds == 0 {
            p.push(
                "HTTP_HEADER_READ_TIMEOUT_SECONDS and HTTP_IDLE_TIMEOUT_SECONDS must be at least 1"
                    .into(),
            );
        }
        if self.max_client_connections == Some(0) || self.http2_max_concurrent_streams == 0 {
            p.push(
                "MAX_CLIENT_CONNECTIONS and HTTP2_MAX_CONCURRENT_STREAMS must be at least 1".into(),
            );
        }
        if self.http2_keepalive_interval_seconds == 0 {
            // Also the PING timeout: zero would drop every HTTP/2 connection.
            p.push("HTTP2_KEEPALIVE_INTERVAL_SECONDS must be at least 1".into());
        }
        if self.login_max_attempts == 0 {
            p.push("LOGIN_MAX_ATTEMPTS must be at least 1".into());
        }
        if self.password_min_length < 8 {
            p.push("PASSWORD_MIN_LENGTH must be at least 8 (NIST SP 800-63B)".into());
        }
        if self.password_min_length > 64 {
            p.push("PASSWORD_MIN_LENGTH must allow 64-character passwords".into());
        }
        if self.access_token_ttl_seconds == 0 || self.access_token_ttl_seconds > 3600 {
            p.push("ACCESS_TOKEN_TTL_SECONDS must be between 1 and 3600".into());
        }
        if self.session_idle_timeout_seconds < 120 {
            // Activity is recorded at most every 30 s (the session cache), so the
            // real window is the timeout less 30 s; below 120 it would end
            // sessions that are in use.
            p.push("SESSION_IDLE_TIMEOUT_SECONDS must be at least 120".into());
        }
        // tokens: in-process verification caches
        if !(1..=30).contains(&self.token_cache_ttl_seconds) {
            p.push("TOKEN_CACHE_TTL_SECONDS must be between 1 and 30".into());
        }
        if self.token_cache_capacity == 0 || self.api_key_cache_capacity == 0 {
            p.push("TOKEN_CACHE_CAPACITY and API_KEY_CACHE_CAPACITY must be positive".into());
        }
        if self.session_idle_timeout_seconds > self.refresh_token_ttl_seconds {
            p.push("SESSION_IDLE_TIMEOUT_SECONDS must not exceed REFRESH_TOKEN_TTL_SECONDS".into());
        }

        if self.session_cookie_samesite == SameSite::None && !self.session_cookie_secure {
            p.push("SESSION_COOKIE_SAMESITE=none requires SESSION_COOKIE_SECURE=true".into());
        }
        // second factors and step-up
        if self.mfa_step_up_seconds == 0 {
            p.push("MFA_STEP_UP_SECONDS must be at least 1".into());
        }
        if let Some(bad) = self
            .mfa_required_roles()
            .iter()
            .find(|r| crate::domain::user::Role::parse(r).is_none())
        {
            p.push(format!(
                "MFA_REQUIRED_ROLES names an unknown role {bad:?} (known: {})",
                crate::domain::user::Role::ALL
                    .map(|r| r.as_str())
                    .join(", ")
            ));
        }
        p.extend(self.notification_problems());
        p.extend(crate::domain::passkey::origin_problems(
            &self.webauthn_rp_id,
            &self.webauthn_origins(),
            self.app_env != Environment::Development,
        ));
        p.extend(self.key_material_problems());
        if self.app_env == Environment::Development {
            return p;
        }
        let env = self.app_env.as_str();
        // (Development reports an unreadable URL when it connects; an empty one is
        // already reported as missing.)
        match remote_database_without_verified_tls(self.database_url.expose_secret()) {
            _ if self.database_url.expose_secret().is_empty() => {}
            Err(()) => p.push("DATABASE_URL is not a valid PostgreSQL URL".into()),
            Ok(Some(host)) => p.push(format!(
                "DATABASE_URL points at {host} without sslmode=verify-full, refused in {env}"
            )),
            Ok(None) => {}
        }
        match remote_redis_without_tls(self.redis_url.expose_secret()) {
            _ if self.redis_url.expose_secret().is_empty() => {}
            Err(()) => p.push("REDIS_URL is not a valid Redis URL".into()),
            Ok(Some(host)) => p.push(format!(
                "REDIS_URL points at {host} without TLS (rediss://), refused in {env}"
            )),
            Ok(None) => {}
        }
        if self.debug {
            p.push(format!("DEBUG=true is not allowed in {env}"));
        }
        if !self.session_cookie_secure {
            p.push(format!(
                "SESSION_COOKIE_SECURE=false is not allowed in {env}"
            ));
        }
        if self.cors_origins().iter().any(|o| o == "*") {
            p.push(format!(
                "CORS_ALLOWED_ORIGINS must not contain '*' in {env}"
            ));
        }
        p
    }

    /// Recovery and notifications: a sink that can deliver, links that point at a
    /// real app, and outside development no tokens in the log.
    fn notification_problems(&self) -> Vec<String> {
        let env = self.app_env.as_str();
        let mut p = Vec::new();
        if self.notify_max_attempts == 0 {
            p.push("NOTIFY_MAX_ATTEMPTS must be at least 1".into());
        }
        if self.notify_poll_interval_ms == 0 || self.notify_http_timeout_ms == 0 {
            p.push("NOTIFY_POLL_INTERVAL_MS and NOTIFY_HTTP_TIMEOUT_MS must be at least 1".into());
        }
        if self.notify_backoff_base_ms == 0
            || self.notify_backoff_max_ms < self.notify_backoff_base_ms
        {
            p.push(
                "NOTIFY_BACKOFF_BASE_MS must be at least 1 and at most NOTIFY_BACKOFF_MAX_MS"
                    .into(),
            );
        }
        if !(60..=86_400).contains(&self.password_reset_ttl_seconds) {
            p.push("PASSWORD_RESET_TTL_SECONDS must be between 60 and 86400".into());
        }
        if !(60..=7 * 86_400).contains(&self.email_verification_ttl_seconds) {
            p.push("EMAIL_VERIFICATION_TTL_SECONDS must be between 60 and 604800".into());
        }
        match self.notify_sink() {
            NotifySink::Http => match self.alert_service_url.as_deref().map(url::Url::parse) {
                None => p.push("NOTIFY_SINK=http needs ALERT_SERVICE_URL".into()),
                Some(Ok(u)) if matches!(u.scheme(), "http" | "https") => {}
                Some(_) => p.push("ALERT_SERVICE_URL must be an http(s) URL".into()),
            },
            // The log sink prints every link, reset tokens included.
            NotifySink::Log if self.app_env != Environment::Development => p.push(format!(
                "NOTIFY_SINK=log would print password-reset links to the log, refused in {env}"
            )),
            NotifySink::Log => {}
        }
        if let Some(raw) = &self.public_app_url {
            match url::Url::parse(raw) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                _ => p.push("PUBLIC_APP_URL must be an http(s) URL".into()),
            }
        }
        p
    }

    /// The key settings: each must parse as the service will use it, and outside
    /// development none may be development material. That is decided on the parsed
    /// bytes' fingerprints (the signing key's public key, each encryption key's 32
    /// bytes whatever its id, the hash secret), never on the text, so a different
    /// PEM layout, label or base64 spelling of a known key is still refused.
    fn key_material_problems(&self) -> Vec<String> {
        use key_material::fingerprint;
        let env = self.app_env.as_str();
        let known = |fp: &Fingerprint| {
            self.app_env != Environment::Development
                && (key_material::was_committed(fp)
                    || self.development_key_fingerprints.contains(fp))
        };
        let refused =
            |what: String| format!("{what} is development key material, refused in {env}");
        let mut p = Vec::new();
        match self.jwt_private_key.as_ref() {
            None => p.push(format!("JWT_PRIVATE_KEY is required in {env}")),
            Some(k) => match key_material::parse_signing_key(k.expose_secret()) {
                Err(e) => p.push(format!("JWT_PRIVATE_KEY {e}")),
                Ok(k) if known(&fingerprint(&k.public_key)) => {
                    p.push(refused("JWT_PRIVATE_KEY".into()))
                }
                Ok(_) => {}
            },
        }
        if let Some(prev) = &self.jwt_previous_public_keys {
            match key_material::parse_public_keys(prev) {
                Err(e) => p.push(format!("JWT_PREVIOUS_PUBLIC_KEYS {e}")),
                Ok(keys) => {
                    for (i, k) in keys.iter().enumerate() {
                        if known(&fingerprint(k)) {
                            p.push(refused(format!("JWT_PREVIOUS_PUBLIC_KEYS key {}", i + 1)));
                        }
                    }
                }
            }
        }
        match self.credentials_encryption_keys.as_ref() {
            None => p.push(format!("CREDENTIALS_ENCRYPTION_KEYS is required in {env}")),
            Some(k) => match key_material::parse_key_ring(k.expose_secret()) {
                Err(e) => p.push(format!("CREDENTIALS_ENCRYPTION_KEYS: {e}")),
                Ok(ring) => {
                    for (kid, key) in &ring {
                        if known(&fingerprint(key)) {
                            p.push(refused(format!("CREDENTIALS_ENCRYPTION_KEYS key {kid:?}")));
                        }
                    }
                }
            },
        }
        match self.api_key_hash_secret.as_ref().map(|k| k.expose_secret()) {
            None => p.push(format!("API_KEY_HASH_SECRET is required in {env}")),
            Some(k) if known(&key_material::secret_fingerprint(k)) => {
                p.push(refused("API_KEY_HASH_SECRET".into()))
            }
            Some(k) if self.app_env != Environment::Development && k.trim().len() < 32 => p.push(
                format!("API_KEY_HASH_SECRET must be at least 32 characters in {env}"),
            ),
            Some(_) => {}
        }
        p.extend(self.database_role_problems());
        p
    }

    /// Staging and production: the migration role travels like DATABASE_URL (verified
    /// TLS off the host) and is not the service's own role, which must not be able
    /// to alter audit_logs. Whether DATABASE_URL's role owns the table is checked
    /// against the database when `serve` starts.
    fn database_role_problems(&self) -> Vec<String> {
        let env = self.app_env.as_str();
        let Some(migration) = &self.database_migration_url else {
            return Vec::new();
        };
        let migration = migration.expose_secret();
        match remote_database_without_verified_tls(migration) {
            Err(()) => return vec!["DATABASE_MIGRATION_URL is not a valid PostgreSQL URL".into()],
            Ok(Some(host)) => {
                return vec![format!(
                    "DATABASE_MIGRATION_URL points at {host} without sslmode=verify-full, refused in {env}"
                )]
            }
            Ok(None) => {}
        }
        let user = |url: &str| {
            url.parse::<sqlx::postgres::PgConnectOptions>()
                .map(|o| o.get_username().to_string())
                .ok()
        };
        match (user(migration), user(self.database_url.expose_secret())) {
            (Some(owner), Some(app)) if owner == app => vec![format!(
                "DATABASE_URL uses the migration role {app:?}: the service could alter audit_logs; \
                 connect it as its own role (deploy/postgres/roles.sql), refused in {env}"
            )],
            _ => Vec::new(),
        }
    }

    /// Fails with every problem listed when the settings are unsafe to run.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let p = self.problems();
        if p.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Insecure(p))
        }
    }
}

/// Loopback (or a Unix socket) is the one place a store may be reached in the clear.
fn is_local_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.is_empty()
        || host.starts_with('/')
        || host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Where DATABASE_URL leads over the network without verified TLS: None for a
/// Unix socket, loopback, or sslmode=verify-full. The URL is read with sqlx's own
/// parser, so host, socket and mode are the ones it will use (the last of a
/// repeated parameter, hostaddr, PGHOST/PGSSLMODE from the environment).
/// verify-ca is not enough: it checks the chain but not the name, and sqlx adds
/// sslrootcert to the system's roots, so any public certificate would pass.
fn remote_database_without_verified_tls(database_url: &str) -> Result<Option<String>, ()> {
    use sqlx::postgres::{PgConnectOptions, PgSslMode};
    let opts = database_url.parse::<PgConnectOptions>().map_err(|_| ())?;
    if opts.get_socket().is_some() || is_local_host(opts.get_host()) {
        return Ok(None);
    }
    Ok(
        (!matches!(opts.get_ssl_mode(), PgSslMode::VerifyFull))
            .then(|| opts.get_host().to_string()),
    )
}

/// Where REDIS_URL leads over the network in plaintext: a remote server, or any
/// Sentinel or Cluster URL without TLS, since those discover the servers they
/// then talk to (with the password) from the ones named.
fn remote_redis_without_tls(redis_url: &str) -> Result<Option<String>, ()> {
    use fred::types::config::{Config, ServerConfig};
    let config = Config::from_url(redis_url).map_err(|_| ())?;
    if config.tls.is_some() {
        return Ok(None);
    }
    let hosts = config.server.hosts();
    let remote = hosts.iter().find(|h| !is_local_host(&h.host));
    Ok(match (&config.server, remote) {
        (_, Some(h)) => Some(h.host.to_string()),
        (ServerConfig::Centralized { .. }, None) => None,
        (_, None) => Some("the servers a Sentinel or Cluster reports".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_off_loopback_need_verified_tls() {
        for (url, refused) in [
            ("postgresql://u:p@localhost:5432/db", None),
            ("postgresql://u:p@127.0.0.1/db", None),
            ("postgresql://u:p@[::1]:5432/db", None),
            ("postgresql://u@localhost/db?host=/run/postgresql", None),
            ("postgres:///db?host=/run/postgresql&user=u", None),
            ("postgresql://u:p@db.internal/db", Some("db.internal")),
            (
                "postgresql://u:p@db.internal/db?sslmode=require",
                Some("db.internal"),
            ),
            (
                "postgresql://u:p@10.0.0.5/db?sslmode=prefer",
                Some("10.0.0.5"),
            ),
            ("postgresql://u:p@db.internal/db?sslmode=verify-full", None),
            (
                "postgresql://u:p@db.internal/db?sslmode=verify-ca&sslrootcert=/ca.pem",
                Some("db.internal"),
            ),
            (
                "postgresql://u:p@localhost/db?host=db.internal",
                Some("db.internal"),
            ),
            (
                "postgresql://u:p@localhost/db?hostaddr=10.0.0.5",
                Some("10.0.0.5"),
            ),
            (
                "postgresql://u:p@localhost/db?host=localhost&host=db.internal",
                Some("db.internal"),
            ),
            (
                "postgresql://u:p@db.internal/db?sslmode=verify-full&sslmode=disable",
                Some("db.internal"),
            ),
        ] {
            assert_eq!(
                remote_database_without_verified_tls(url)
                    .unwrap()
                    .as_deref(),
                refused,
                "{url}"
            );
        }
        assert_eq!(remote_database_without_verified_tls("not a url"), Err(()));
        assert_eq!(remote_redis_without_tls("not a url"), Err(()));
        for (url, refused) in [
            ("redis://localhost:6379/0", None),
            ("redis://:pw@127.0.0.1:6379/0", None),
            ("redis://:pw@cache.internal:6379/0", Some("cache.internal")),
            (
                "redis-cluster://cache.internal:6379",
                Some("cache.internal"),
            ),
            (
                "redis-cluster://localhost:6379?node=cache.internal:6379",
                Some("cache.internal"),
            ),
            (
                "redis-cluster://localhost:6379",
                Some("the servers a Sentinel or Cluster reports"),
            ),
            (
                "redis-sentinel://localhost:26379/0?sentinelServiceName=m",
                Some("the servers a Sentinel or Cluster reports"),
            ),
            ("rediss://:pw@cache.internal:6380/0", None),
            (
                "rediss-cluster://cache.internal:6380?node=other.internal:6380",
                None,
            ),
            ("valkeys://cache.internal:6380/0", None),
        ] {
            assert_eq!(
                remote_redis_without_tls(url).unwrap().as_deref(),
                refused,
                "{url}"
            );
        }
    }
}
