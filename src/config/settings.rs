//! The settings table: every variable the service reads, declared once. A row is
//! the field, its type, its default and how `check-config` shows it (grammar in
//! [`table`](super::table)); checks that span settings live in `checks.rs`.

use secrecy::SecretString;
use serde::Deserialize;

use super::table::{by_env, settings_table, Show};
use crate::crypto::key_material::Fingerprint;
use crate::domain::network::IpNetworks;

settings_table! {
    /// Every setting the service reads. Field names are the lower-cased variable
    /// names (envy's mapping), so `USER_SERVICE_PORT` is `user_service_port`.
    pub struct Settings {
        /// development, staging or production (also `dev`, `prod`).
        app_env: Environment = Environment::Development;
        /// Address the one listener (gRPC and JSON) binds.
        user_service_host: String = "0.0.0.0";
        /// Port of that listener; 0 picks a free one (tests).
        user_service_port: u16 = 8011;

        /// PostgreSQL URL of the service's own role.
        database_url: SecretString, secret(url);
        /// Size of the PostgreSQL pool.
        database_max_connections: u32 = 20;
        /// Redis URL (`rediss://` for TLS; Sentinel and Cluster URLs too).
        redis_url: SecretString, secret(url);
        /// Every Redis key and channel starts with this, so environments or tests can
        /// share one Redis without seeing each other.
        redis_key_prefix: String = "us:";
        /// PEM file of the CA(s) a rediss:// server's certificate must chain to, for a
        /// private CA; without it the system's roots are trusted.
        redis_tls_ca_file: Option<String>;

        /// The ticker service (the seed's dependency matrix).
        ticker_service_url: Option<String>;
        /// The backend.
        backend_service_url: Option<String>;
        /// The alert service.
        alert_service_url: Option<String>;
        /// The calendar service.
        calendar_service_url: Option<String>;

        /// Debug mode; refused outside development.
        debug: bool = false;
        /// Session cookie sent over HTTPS only (and `__Host-` prefixed).
        session_cookie_secure: bool = true;
        /// The session cookie's SameSite: lax, strict or none.
        session_cookie_samesite: SameSite = SameSite::Lax;
        /// Origins allowed by CORS, comma-separated; `*` is refused outside development.
        cors_allowed_origins: String = "";
        /// Log filter (a level or a tracing directive).
        log_level: String = "info";
        /// Log lines as pretty, plain (also `text`) or json.
        log_format: LogFormat = LogFormat::Pretty;
        /// Sentry DSN; unset: no error reporting.
        sentry_dsn: Option<SecretString>, secret;

        /// Failed logins before an account is locked.
        login_max_attempts: u32 = 5;
        /// How long a lockout lasts.
        login_lockout_seconds: u64 = 900;
        /// Login attempts per client IP per minute; 0 turns the per-IP throttle off.
        login_ip_max_per_minute: u32 = 0;
        /// Shortest password accepted.
        password_min_length: usize = 12;
        /// Self sign-up; on in development only unless set.
        registration_enabled: bool = by_env(true, false, false);

        /// Lifetime of an access token (at most 3600).
        access_token_ttl_seconds: u64 = 900;
        /// Lifetime of a refresh token.
        refresh_token_ttl_seconds: u64 = 30 * 24 * 3600;
        /// A session with no request and no refresh for this long ends (reason
        /// `idle_timeout`), however long its refresh token would still live.
        session_idle_timeout_seconds: u64 = 1800;
        /// Lifetime of a service client's token.
        service_token_ttl_seconds: u64 = 300;
        /// `iss` of the tokens issued.
        jwt_issuer: String = "stocksblitz-user-service";
        /// `aud` of the tokens issued.
        jwt_audience: String = "stocksblitz";
        /// The active signing key (PEM, Ed25519 or P-256).
        jwt_private_key: Option<SecretString>, secret;
        /// Public keys still published in JWKS during a rotation (PEMs).
        jwt_previous_public_keys: Option<String>,
            shown(|s| s.jwt_previous_public_keys.as_ref().map_or("", |_| "(set)").into());
        /// Broker-credential encryption keys, `kid:base64key,…`; the first is active.
        credentials_encryption_keys: Option<SecretString>, secret;
        /// Server-side secret of the API-key hashes.
        api_key_hash_secret: Option<SecretString>, secret;
        /// Bearer token `/metrics` asks for outside development.
        metrics_token: Option<SecretString>, secret;

        /// Concurrent argon2 computations; defaults to the number of cores.
        argon2_max_concurrency: Option<usize>;
        /// How long in-flight requests get to finish after SIGTERM.
        shutdown_grace_seconds: u64 = 10;
        /// How long a replica trusts a verified API key without asking Redis.
        api_key_cache_ttl_seconds: u64 = 60;
        /// How long an unknown API key is remembered as unknown.
        api_key_negative_cache_ttl_seconds: u64 = 5;
        /// API-key usage records buffered before writes are dropped.
        usage_log_buffer_capacity: usize = 10_000;
        /// How often buffered API-key usage is written.
        usage_log_flush_interval_ms: u64 = 1000;

        /// The second check when an account is locked but this client IP never failed
        /// for it: the password is checked after this wait instead of refused.
        login_locked_delay_ms: u64 = 2000;
        /// Sign-ups per client IP per hour; 0 turns the throttle off (development).
        register_ip_max_per_hour: u32 = 0;

        /// Networks whose clients may connect (CIDRs); unset means the environment's
        /// default (development: loopback and private ranges; elsewhere everyone),
        /// empty means everyone.
        allowed_client_networks: Option<IpNetworks>, keep_empty,
            shown(|s| s.allowed_client_networks().to_string());
        /// Proxies whose X-Forwarded-For is believed (CIDRs); empty: none.
        trusted_proxies: IpNetworks = IpNetworks::default();
        /// Replaced by TRUSTED_PROXIES; read only to say so.
        trust_forwarded_for: Option<String>, hidden;
        /// Server-side bound on every statement (0 turns it off).
        database_statement_timeout_ms: u64 = 5000;
        /// How long a request waits for a pooled connection before a 503.
        database_acquire_timeout_ms: u64 = 3000;
        /// Open client connections at most; unset: sized from the file-descriptor limit.
        max_client_connections: Option<usize>;
        /// A client gets this long to send a request's headers; it is also how long
        /// an HTTP/1.1 connection waits for its first or next request.
        http_header_read_timeout_seconds: u64 = 10;
        /// A connection with no request in flight for this long is closed (HTTP/2;
        /// HTTP/1.1 when shorter than the header-read timeout).
        http_idle_timeout_seconds: u64 = 60;
        /// HTTP/2 PING interval; a peer that does not answer within it is dropped.
        http2_keepalive_interval_seconds: u64 = 30;
        /// Concurrent streams per HTTP/2 connection.
        http2_max_concurrent_streams: u32 = 100;

        /// The schema owner's URL, used only by `user-service migrate`. The service
        /// connects with DATABASE_URL, a role that may insert into audit_logs but not
        /// alter it (deploy/postgres/roles.sql). Unset: migrate uses DATABASE_URL.
        database_migration_url: Option<SecretString>, secret(url);

        /// Verified access tokens (by keyed hash), session states and user
        /// snapshots each held in process, at most this many.
        token_cache_capacity: u64 = 100_000;
        /// Verified API keys held in process, at most this many.
        api_key_cache_capacity: u64 = 100_000;
        /// While PostgreSQL is unreachable, a cached key, session or user verified at
        /// most this long ago is still served (revocations received still apply);
        /// 0 turns stale serving off.
        cache_stale_seconds: u64 = 300;
        /// How long a replica uses a cached session state or user before reading it
        /// again (changes reach it sooner through the invalidation channels); also
        /// how often session activity is recorded, hence at most 30.
        token_cache_ttl_seconds: u64 = 30;

        /// Base URL of the web app that links in emails point under
        /// (`{PUBLIC_APP_URL}/verify-email?token=…`); unset, the environment's own.
        public_app_url: Option<String>, shown(|s| s.public_app_url());
        /// Bearer token sent to the alert service, when it wants one.
        alert_service_token: Option<SecretString>, secret;
        /// `http` (POST to ALERT_SERVICE_URL) or `log` (the message, link included,
        /// in the service log; development only).
        notify_sink: NotifySink = by_env(NotifySink::Log, NotifySink::Http, NotifySink::Http);
        /// Delivery attempts of one notification before it is marked dead.
        notify_max_attempts: u32 = 8;
        /// The wait after the first failed delivery; it doubles with each failure.
        notify_backoff_base_ms: u64 = 5_000;
        /// The longest wait between two delivery attempts.
        notify_backoff_max_ms: u64 = 900_000;
        /// How often each replica looks for notifications to deliver.
        notify_poll_interval_ms: u64 = 1_000;
        /// One POST to the alert service gets this long.
        notify_http_timeout_ms: u64 = 5_000;
        /// Step-up operations refused (403 email_unverified) until the user's email
        /// is verified.
        require_verified_email: bool = by_env(false, true, true);
        /// Lifetime of a password-reset link.
        password_reset_ttl_seconds: u64 = 1800;
        /// Lifetime of an email-verification link.
        email_verification_ttl_seconds: u64 = 86_400;
        /// Password-reset requests and verification resends per email address per
        /// hour (whether or not it belongs to a user); 0 turns the throttle off.
        password_reset_email_max_per_hour: u32 = 5;
        /// Password-reset requests per client IP per hour; 0 turns the throttle off.
        password_reset_ip_max_per_hour: u32 = 30;

        /// How recent a second factor must be for the step-up operations (DESIGN §8).
        mfa_step_up_seconds: u64 = 600;
        /// Roles whose holders must enrol a second factor (comma-separated); unset:
        /// `admin` in production, none elsewhere.
        mfa_required_roles: Option<String>;
        /// Whether trading-account managers must enrol a second factor.
        mfa_required_for_managers: bool = by_env(false, false, true);

        /// The WebAuthn relying-party id: the domain passkeys are bound to. It can
        /// never change without orphaning every registered passkey.
        webauthn_rp_id: String = "localhost";
        /// Comma-separated origins (scheme, host, port) a passkey ceremony may come
        /// from; unset: the CORS origins, else the relying party's https origin.
        webauthn_origins: String = "", shown(|s| s.webauthn_origins().join(","));
    }
    internal {
        /// Fingerprints of this checkout's development key material (`.secrets/dev.env`),
        /// which staging and production refuse like the once-committed keys. Filled by
        /// loading, never from a variable.
        development_key_fingerprints: Vec<Fingerprint>,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    #[serde(alias = "dev")]
    Development,
    Staging,
    #[serde(alias = "prod")]
    Production,
}

impl Environment {
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "development" | "dev" => Some(Self::Development),
            "staging" | "stg" => Some(Self::Staging),
            "production" | "prod" | "prd" => Some(Self::Production),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Development => "development",
            Self::Staging => "staging",
            Self::Production => "production",
        }
    }

    /// Suffix of the env file: `.env.dev`, `.env.staging`, `.env.production`.
    pub fn file_suffix(self) -> &'static str {
        match self {
            Self::Development => "dev",
            Self::Staging => "staging",
            Self::Production => "production",
        }
    }

    /// Tag in API keys: `sbk_dev_`, `sbk_stg_`, `sbk_prd_`.
    pub fn key_tag(self) -> &'static str {
        match self {
            Self::Development => "dev",
            Self::Staging => "stg",
            Self::Production => "prd",
        }
    }
}

impl Show for Environment {
    fn show(&self) -> String {
        self.as_str().into()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SameSite {
    #[serde(alias = "Lax")]
    Lax,
    #[serde(alias = "Strict")]
    Strict,
    #[serde(alias = "None")]
    None,
}

impl SameSite {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Lax => "Lax",
            Self::Strict => "Strict",
            Self::None => "None",
        }
    }
}

impl Show for SameSite {
    fn show(&self) -> String {
        self.as_str().to_ascii_lowercase()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    #[serde(alias = "text")]
    Plain,
    Json,
}

/// Where notifications go: the alert service, or the service's own log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NotifySink {
    Http,
    Log,
}

impl NotifySink {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Log => "log",
        }
    }
}

impl Show for NotifySink {
    fn show(&self) -> String {
        self.as_str().into()
    }
}

impl Show for LogFormat {
    fn show(&self) -> String {
        format!("{self:?}").to_ascii_lowercase()
    }
}

/// Deserializes from a variable map with envy: values as given, defaults for the
/// rest (per environment where the table says so).
pub(super) fn from_env_iter<I>(vars: I) -> Result<Settings, envy::Error>
where
    I: IntoIterator<Item = (String, String)>,
{
    envy::from_iter::<_, Raw>(vars)?.resolve()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::table::Setting;

    fn load(pairs: &[(&str, &str)]) -> Settings {
        let base = [
            ("DATABASE_URL", "postgresql://u@localhost/db"),
            ("REDIS_URL", "redis://localhost/0"),
        ];
        Settings::from_vars(
            base.iter()
                .chain(pairs)
                .map(|(k, v)| (k.to_string(), v.to_string())),
        )
        .unwrap()
    }

    #[test]
    fn every_secret_row_is_masked_in_check_config_and_debug() {
        const CANARY: &str = "canary-7f3a9";
        let secrets: Vec<&Setting> = SETTINGS.iter().filter(|s| s.secret).collect();
        assert!(secrets.len() >= 8, "{secrets:?}");
        let vars: Vec<(String, String)> = secrets
            .iter()
            .map(|s| {
                let value = if s.name.ends_with("_URL") {
                    format!("postgresql://u:{CANARY}@localhost/{CANARY}db")
                } else {
                    CANARY.to_string()
                };
                (s.name.to_string(), value)
            })
            .collect();
        let settings = Settings::from_vars(vars).unwrap();
        let shown = settings.effective();
        for s in &secrets {
            let (_, value) = shown.iter().find(|(k, _)| *k == s.name).unwrap();
            assert!(!value.is_empty(), "{} shows as unset", s.name);
        }
        for (k, v) in &shown {
            assert!(
                !v.contains(&format!(":{CANARY}@")) && v != CANARY,
                "{k}={v}"
            );
        }
        let debug = format!("{settings:?}");
        assert!(!debug.contains(&format!(":{CANARY}@")), "{debug}");
        assert!(!debug.contains(&format!("\"{CANARY}\"")), "{debug}");
    }

    #[test]
    fn check_config_lines_follow_the_table() {
        let shown: Vec<&str> = load(&[]).effective().into_iter().map(|(k, _)| k).collect();
        let table: Vec<&str> = SETTINGS
            .iter()
            .filter(|s| s.shown)
            .map(|s| s.name)
            .collect();
        assert_eq!(shown, table);
        assert!(!shown.contains(&"TRUST_FORWARDED_FOR"));
        assert_eq!(shown[0], "APP_ENV");
        let mut names: Vec<&str> = SETTINGS.iter().map(|s| s.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), SETTINGS.len());
        for s in SETTINGS {
            assert_eq!(s.name, s.name.to_ascii_uppercase());
            assert!(
                !s.doc.is_empty() && !s.doc[0].trim().is_empty(),
                "{}",
                s.name
            );
        }
    }

    #[test]
    fn defaults_follow_the_environment_unless_set() {
        assert!(load(&[]).registration_enabled);
        assert!(load(&[("APP_ENV", "dev")]).registration_enabled);
        assert!(!load(&[("APP_ENV", "staging")]).registration_enabled);
        assert!(!load(&[("APP_ENV", "production")]).registration_enabled);
        assert!(
            load(&[("APP_ENV", "production"), ("REGISTRATION_ENABLED", "true")])
                .registration_enabled
        );
        assert!(!load(&[("REGISTRATION_ENABLED", "false")]).registration_enabled);
        // Fixed defaults, and a value given wins.
        let s = load(&[]);
        assert_eq!(s.user_service_host, "0.0.0.0");
        assert_eq!(s.refresh_token_ttl_seconds, 30 * 24 * 3600);
        assert_eq!(s.session_cookie_samesite, SameSite::Lax);
        assert!(s.session_cookie_secure && !s.debug);
        assert!(s.sentry_dsn.is_none());
        assert_eq!(load(&[("USER_SERVICE_PORT", "9")]).user_service_port, 9);
    }

    #[test]
    fn required_settings_are_reported_in_table_order_and_empty_can_be_a_value() {
        let err = Settings::from_vars(Vec::new()).unwrap_err().to_string();
        assert_eq!(err, "invalid setting: DATABASE_URL is required");
        let err = Settings::from_vars([("DATABASE_URL".to_string(), "x".to_string())])
            .unwrap_err()
            .to_string();
        assert_eq!(err, "invalid setting: REDIS_URL is required");
        // keep_empty: an empty ALLOWED_CLIENT_NETWORKS means everyone, not unset.
        let open = load(&[("ALLOWED_CLIENT_NETWORKS", "")]);
        assert_eq!(open.allowed_client_networks, Some(IpNetworks::default()));
        assert!(load(&[("SENTRY_DSN", "")]).sentry_dsn.is_none());
    }
}
