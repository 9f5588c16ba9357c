//! Settings: one typed struct deserialized with envy after the env file is loaded
//! (ENV_FILE, else `.env`, else `.env.<env>` by APP_ENV), `${VAR}` expansion, and the
//! start-up validation that keeps staging and production from running insecurely.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::crypto::key_material::{self, Fingerprint};
use crate::domain::network::IpNetworks;

/// Where development keeps the key material it generated, under the working
/// directory: git-ignored, mode 600, shared by every replica started there.
pub const DEV_SECRETS_FILE: &str = ".secrets/dev.env";
/// What the example secret files (deploy/) hold until an operator fills them in.
pub const PLACEHOLDER_MARKER: &str = "REPLACE_ME";

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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    #[serde(alias = "text")]
    Plain,
    Json,
}

fn default_env() -> Environment {
    Environment::Development
}
fn default_host() -> String {
    "0.0.0.0".into()
}
fn default_port() -> u16 {
    8011
}
fn default_max_connections() -> u32 {
    20
}
fn default_redis_prefix() -> String {
    "us:".into()
}
fn default_true() -> bool {
    true
}
fn default_samesite() -> SameSite {
    SameSite::Lax
}
fn default_log_level() -> String {
    "info".into()
}
fn default_log_format() -> LogFormat {
    LogFormat::Pretty
}
fn default_login_attempts() -> u32 {
    5
}
fn default_lockout() -> u64 {
    900
}
fn default_password_min() -> usize {
    12
}
fn default_access_ttl() -> u64 {
    900
}
fn default_refresh_ttl() -> u64 {
    30 * 24 * 3600
}
fn default_session_idle() -> u64 {
    1800
}
fn default_service_ttl() -> u64 {
    300
}
fn default_issuer() -> String {
    "stocksblitz-user-service".into()
}
fn default_audience() -> String {
    "stocksblitz".into()
}
fn default_grace() -> u64 {
    10
}
fn default_key_cache_ttl() -> u64 {
    60
}
fn default_negative_cache_ttl() -> u64 {
    5
}
fn default_usage_capacity() -> usize {
    10_000
}
fn default_usage_flush_ms() -> u64 {
    1000
}
// ---- login lockout and abuse throttles (helper "login") ----
fn default_login_locked_delay_ms() -> u64 {
    2000
}

/// Every setting the service reads. Field names are the lower-cased variable names
/// (envy's mapping), so `USER_SERVICE_PORT` is `user_service_port`.
#[derive(Clone, Deserialize)]
pub struct Settings {
    #[serde(default = "default_env")]
    pub app_env: Environment,
    #[serde(default = "default_host")]
    pub user_service_host: String,
    #[serde(default = "default_port")]
    pub user_service_port: u16,

    pub database_url: SecretString,
    #[serde(default = "default_max_connections")]
    pub database_max_connections: u32,
    pub redis_url: SecretString,
    /// Every Redis key and channel starts with this, so environments or tests can
    /// share one Redis without seeing each other.
    #[serde(default = "default_redis_prefix")]
    pub redis_key_prefix: String,
    /// PEM file of the CA(s) a rediss:// server's certificate must chain to, for a
    /// private CA; without it the system's roots are trusted.
    pub redis_tls_ca_file: Option<String>,

    pub ticker_service_url: Option<String>,
    pub backend_service_url: Option<String>,
    pub alert_service_url: Option<String>,
    pub calendar_service_url: Option<String>,

    #[serde(default)]
    pub debug: bool,
    #[serde(default = "default_true")]
    pub session_cookie_secure: bool,
    #[serde(default = "default_samesite")]
    pub session_cookie_samesite: SameSite,
    #[serde(default)]
    pub cors_allowed_origins: String,
    #[serde(default = "default_log_level")]
    pub log_level: String,
    #[serde(default = "default_log_format")]
    pub log_format: LogFormat,
    pub sentry_dsn: Option<SecretString>,

    #[serde(default = "default_login_attempts")]
    pub login_max_attempts: u32,
    #[serde(default = "default_lockout")]
    pub login_lockout_seconds: u64,
    /// Login attempts per client IP per minute; 0 turns the per-IP throttle off.
    #[serde(default)]
    pub login_ip_max_per_minute: u32,
    #[serde(default = "default_password_min")]
    pub password_min_length: usize,
    /// Self sign-up; on in development unless set.
    pub registration_enabled: Option<bool>,

    #[serde(default = "default_access_ttl")]
    pub access_token_ttl_seconds: u64,
    #[serde(default = "default_refresh_ttl")]
    pub refresh_token_ttl_seconds: u64,
    /// A session with no request and no refresh for this long ends (reason
    /// `idle_timeout`), however long its refresh token would still live.
    #[serde(default = "default_session_idle")]
    pub session_idle_timeout_seconds: u64,
    #[serde(default = "default_service_ttl")]
    pub service_token_ttl_seconds: u64,
    #[serde(default = "default_issuer")]
    pub jwt_issuer: String,
    #[serde(default = "default_audience")]
    pub jwt_audience: String,
    pub jwt_private_key: Option<SecretString>,
    pub jwt_previous_public_keys: Option<String>,
    pub credentials_encryption_keys: Option<SecretString>,
    pub api_key_hash_secret: Option<SecretString>,
    pub metrics_token: Option<SecretString>,

    /// Concurrent argon2 computations; defaults to the number of cores.
    pub argon2_max_concurrency: Option<usize>,
    #[serde(default = "default_grace")]
    pub shutdown_grace_seconds: u64,
    #[serde(default = "default_key_cache_ttl")]
    pub api_key_cache_ttl_seconds: u64,
    #[serde(default = "default_negative_cache_ttl")]
    pub api_key_negative_cache_ttl_seconds: u64,
    #[serde(default = "default_usage_capacity")]
    pub usage_log_buffer_capacity: usize,
    #[serde(default = "default_usage_flush_ms")]
    pub usage_log_flush_interval_ms: u64,

    // --- key material (config helper) ---
    /// Fingerprints of this checkout's development key material (`.secrets/dev.env`),
    /// which staging and production refuse like the once-committed keys. Filled by
    /// loading, never from a variable.
    #[serde(skip)]
    pub development_key_fingerprints: Vec<Fingerprint>,
    // --- deploy: database roles ---
    /// The schema owner's URL, used only by `user-service migrate`. The service
    /// connects with DATABASE_URL, a role that may insert into audit_logs but not
    /// alter it (deploy/postgres/roles.sql). Unset: migrate uses DATABASE_URL.
    pub database_migration_url: Option<SecretString>,
    // ---- login lockout and abuse throttles (helper "login") ----
    /// The second check when an account is locked but this client IP never failed
    /// for it: the password is checked after this wait instead of refused.
    #[serde(default = "default_login_locked_delay_ms")]
    pub login_locked_delay_ms: u64,
    /// Sign-ups per client IP per hour; 0 turns the throttle off (development).
    #[serde(default)]
    pub register_ip_max_per_hour: u32,
    // ---- runtime: client networks, connection limits, database timeouts ----
    /// Networks whose clients may connect (CIDRs); unset means the environment's
    /// default (development: loopback and private ranges; elsewhere everyone),
    /// empty means everyone.
    pub allowed_client_networks: Option<IpNetworks>,
    /// Proxies whose X-Forwarded-For is believed (CIDRs); empty: none.
    #[serde(default)]
    pub trusted_proxies: IpNetworks,
    /// Replaced by TRUSTED_PROXIES; read only to say so.
    pub trust_forwarded_for: Option<String>,
    /// Server-side bound on every statement (0 turns it off).
    #[serde(default = "default_statement_timeout_ms")]
    pub database_statement_timeout_ms: u64,
    /// How long a request waits for a pooled connection before a 503.
    #[serde(default = "default_acquire_timeout_ms")]
    pub database_acquire_timeout_ms: u64,
    /// Open client connections at most; unset: sized from the file-descriptor limit.
    pub max_client_connections: Option<usize>,
    /// A client gets this long to send a request's headers; it is also how long
    /// an HTTP/1.1 connection waits for its first or next request.
    #[serde(default = "default_header_read_timeout")]
    pub http_header_read_timeout_seconds: u64,
    /// A connection with no request in flight for this long is closed (HTTP/2;
    /// HTTP/1.1 when shorter than the header-read timeout).
    #[serde(default = "default_idle_timeout")]
    pub http_idle_timeout_seconds: u64,
    /// HTTP/2 PING interval; a peer that does not answer within it is dropped.
    #[serde(default = "default_h2_keepalive")]
    pub http2_keepalive_interval_seconds: u64,
    #[serde(default = "default_h2_streams")]
    pub http2_max_concurrent_streams: u32,

    // ---- tokens: in-process verification caches (issue 13) ----
    /// Verified access tokens (by keyed hash), session states and user
    /// snapshots each held in process, at most this many.
    #[serde(default = "default_token_cache_capacity")]
    pub token_cache_capacity: u64,
    /// Verified API keys held in process, at most this many.
    #[serde(default = "default_api_key_cache_capacity")]
    pub api_key_cache_capacity: u64,
    /// While PostgreSQL is unreachable, a cached key, session or user verified at
    /// most this long ago is still served (revocations received still apply);
    /// 0 turns stale serving off.
    #[serde(default = "default_cache_stale_seconds")]
    pub cache_stale_seconds: u64,
    /// How long a replica uses a cached session state or user before reading it
    /// again (changes reach it sooner through the invalidation channels); also
    /// how often session activity is recorded, hence at most 30.
    #[serde(default = "default_token_cache_ttl")]
    pub token_cache_ttl_seconds: u64,

    // ---- passkeys (issue 14) ----
    /// The WebAuthn relying-party id: the domain passkeys are bound to. It can
    /// never change without orphaning every registered passkey.
    #[serde(default = "default_webauthn_rp_id")]
    pub webauthn_rp_id: String,
    /// Comma-separated origins (scheme, host, port) a ceremony may come from;
    /// unset: the CORS origins (see `webauthn_origins()`).
    #[serde(default)]
    pub webauthn_origins: String,
}

fn default_webauthn_rp_id() -> String {
    "localhost".into()
}

fn default_token_cache_ttl() -> u64 {
    30
}

fn default_token_cache_capacity() -> u64 {
    100_000
}
fn default_api_key_cache_capacity() -> u64 {
    100_000
}
fn default_cache_stale_seconds() -> u64 {
    300
}

fn default_statement_timeout_ms() -> u64 {
    5000
}
fn default_acquire_timeout_ms() -> u64 {
    3000
}
fn default_header_read_timeout() -> u64 {
    10
}
fn default_idle_timeout() -> u64 {
    60
}
fn default_h2_keepalive() -> u64 {
    30
}
fn default_h2_streams() -> u32 {
    100
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Secrets are SecretString, whose Debug prints a redaction marker; the
        // DATABASE_URL and REDIS_URL are masked because they may carry passwords.
        f.debug_map().entries(self.effective()).finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: line {line}: variable ${{{var}}} is not set")]
    UnsetVariable {
        file: String,
        line: usize,
        var: String,
    },
    #[error("{file}: line {line}: {message}")]
    Syntax {
        file: String,
        line: usize,
        message: String,
    },
    #[error("cannot read {file}: {message}")]
    Read { file: String, message: String },
    #[error("cannot write {file}: {message}")]
    Write { file: String, message: String },
    #[error("invalid setting: {0}")]
    Invalid(String),
    #[error("{}", .0.iter().map(|p| format!("error: {p}")).collect::<Vec<_>>().join("\n"))]
    Insecure(Vec<String>),
}

/// Which env file applies: ENV_FILE if set, else `.env` in `dir` if present, else
/// `.env.<dev|staging|production>` by APP_ENV (development when unset).
pub fn choose_env_file(vars: &HashMap<String, String>, dir: &Path) -> Option<PathBuf> {
    if let Some(f) = vars.get("ENV_FILE").filter(|f| !f.is_empty()) {
        let p = PathBuf::from(f);
        return Some(if p.is_absolute() { p } else { dir.join(p) });
    }
    let dot_env = dir.join(".env");
    if dot_env.is_file() {
        return Some(dot_env);
    }
    let env = vars
        .get("APP_ENV")
        .and_then(|e| Environment::parse(e))
        .unwrap_or(Environment::Development);
    let p = dir.join(format!(".env.{}", env.file_suffix()));
    p.is_file().then_some(p)
}

/// Parses `KEY=value` lines (`export ` allowed, `#` comments, single or double
/// quotes, `\n` escapes inside double quotes) and expands `${VAR}` from `vars` and
/// from keys earlier in the file. An unset variable is an error naming it.
pub fn parse_env_file(
    content: &str,
    file: &str,
    vars: &HashMap<String, String>,
) -> Result<Vec<(String, String)>, ConfigError> {
    let (values, mut errors) = parse_env_file_all(content, file, vars);
    if errors.is_empty() {
        Ok(values)
    } else {
        Err(errors.remove(0))
    }
}

/// Like [`parse_env_file`], but reads past problems: every bad line and every unset
/// `${VAR}` is reported (a line with one is left out), so one pass shows them all.
pub fn parse_env_file_all(
    content: &str,
    file: &str,
    vars: &HashMap<String, String>,
) -> (Vec<(String, String)>, Vec<ConfigError>) {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut errors = Vec::new();
    for (idx, raw) in content.lines().enumerate() {
        let line_no = idx + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((key, value)) = line.split_once('=') else {
            errors.push(ConfigError::Syntax {
                file: file.into(),
                line: line_no,
                message: "expected KEY=value".into(),
            });
            continue;
        };
        let key = key.trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            errors.push(ConfigError::Syntax {
                file: file.into(),
                line: line_no,
                message: format!("invalid variable name {key:?}"),
            });
            continue;
        }
        let value = value.trim();
        let (value, expand) =
            if let Some(v) = value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
                (v.to_string(), false)
            } else if let Some(v) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
                (v.replace("\\n", "\n").replace("\\\"", "\""), true)
            } else {
                // Unquoted: a ` #` starts a comment.
                let v = value.split(" #").next().unwrap_or("").trim_end();
                (v.to_string(), true)
            };
        if !expand {
            out.push((key.to_string(), value));
            continue;
        }
        let expanded = expand_vars(&value, |name| {
            vars.get(name).cloned().or_else(|| {
                out.iter()
                    .rev()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.clone())
            })
        });
        match expanded {
            Ok(v) => out.push((key.to_string(), v)),
            Err(unset) => errors.extend(unset.into_iter().map(|var| ConfigError::UnsetVariable {
                file: file.into(),
                line: line_no,
                var,
            })),
        }
    }
    (out, errors)
}

/// Replaces every `${NAME}`; the error lists every unset name.
/// Empty values mean "unset" for optional settings (SENTRY_DSN= in a file),
/// except ALLOWED_CLIENT_NETWORKS, where empty means everyone.
fn keep_var((k, v): &(String, String)) -> bool {
    !v.is_empty() || k == "ALLOWED_CLIENT_NETWORKS"
}

fn expand_vars(
    value: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, Vec<String>> {
    let mut out = String::with_capacity(value.len());
    let mut unset = Vec::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            rest = "";
            break;
        };
        let name = &after[..end];
        match lookup(name) {
            Some(v) => out.push_str(&v),
            None if !unset.iter().any(|u| u == name) => unset.push(name.to_string()),
            None => {}
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    if unset.is_empty() {
        Ok(out)
    } else {
        Err(unset)
    }
}

/// An envy error without the value it quotes (the value may be a secret).
fn describe_envy_error(e: &envy::Error) -> String {
    match e {
        envy::Error::MissingValue(field) => format!("{} is required", field.to_ascii_uppercase()),
        envy::Error::Custom(msg) => match msg.split_once(" while parsing value '") {
            Some((reason, _)) => reason.to_string(),
            None => msg.clone(),
        },
    }
}

impl Settings {
    /// Loads from the process environment and the env file in the current directory.
    pub fn load() -> Result<Self, ConfigError> {
        let vars: HashMap<String, String> = std::env::vars().collect();
        let dir = std::env::current_dir().map_err(|e| ConfigError::Read {
            file: ".".into(),
            message: e.to_string(),
        })?;
        Self::load_from(&vars, &dir)
    }

    /// The whole loading rule, with the environment passed in so tests need not
    /// touch the process environment. Fails with every problem found, loading and
    /// validation alike (see [`Settings::inspect_from`]).
    pub fn load_from(vars: &HashMap<String, String>, dir: &Path) -> Result<Self, ConfigError> {
        let (settings, mut problems) = Self::inspect_from(vars, dir)?;
        if problems.is_empty() {
            Ok(settings)
        } else {
            problems.extend(settings.problems());
            Err(ConfigError::Insecure(problems))
        }
    }

    /// Reads everything it can and reports each loading problem instead of stopping
    /// at the first: every unset `${VAR}`, bad line, invalid value, missing required
    /// setting and unfilled `REPLACE_ME` placeholder (whose setting is then treated
    /// as unset). Development fills unset key settings from `.secrets/dev.env` under
    /// `dir`, generating it once. Fails outright only when a file cannot be read or
    /// written.
    pub fn inspect_from(
        vars: &HashMap<String, String>,
        dir: &Path,
    ) -> Result<(Self, Vec<String>), ConfigError> {
        let mut merged: HashMap<String, String> = HashMap::new();
        let mut problems = Vec::new();
        if let Some(path) = choose_env_file(vars, dir) {
            let name = path.display().to_string();
            let content = std::fs::read_to_string(&path).map_err(|e| ConfigError::Read {
                file: name.clone(),
                message: e.to_string(),
            })?;
            let (values, errors) = parse_env_file_all(&content, &name, vars);
            merged.extend(values);
            // A file line whose variable is unset does not matter when a process
            // variable overrides that setting anyway.
            let lines = content.lines().collect::<Vec<_>>();
            for e in errors {
                let overridden = match &e {
                    ConfigError::UnsetVariable { line, .. } => lines
                        .get(line - 1)
                        .and_then(|l| l.trim().trim_start_matches("export ").split_once('='))
                        .is_some_and(|(k, _)| vars.contains_key(k.trim())),
                    _ => false,
                };
                if !overridden {
                    problems.push(e.to_string());
                }
            }
        }
        // Real process variables win over file values and are used as given.
        for (k, v) in vars {
            merged.insert(k.clone(), v.clone());
        }
        let mut placeholders: Vec<String> = merged
            .iter()
            .filter(|(_, v)| v.contains(PLACEHOLDER_MARKER))
            .map(|(k, _)| k.clone())
            .collect();
        placeholders.sort();
        for k in &placeholders {
            merged.remove(k);
        }

        let env = merged
            .get("APP_ENV")
            .map(|e| Environment::parse(e))
            .unwrap_or(Some(Environment::Development));
        let dev_secrets = dir.join(DEV_SECRETS_FILE);
        let mut development_key_fingerprints = Vec::new();
        match env {
            Some(Environment::Development) => {
                for (k, v) in dev_secrets::fill_unset(&dev_secrets, &merged)? {
                    merged.insert(k, v);
                }
            }
            Some(_) => {
                if let Some(dev) = dev_secrets::read(&dev_secrets)? {
                    let get = |k: &str| dev.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
                    development_key_fingerprints = key_material::fingerprints_of(
                        get("JWT_PRIVATE_KEY"),
                        get("JWT_PREVIOUS_PUBLIC_KEYS"),
                        get("CREDENTIALS_ENCRYPTION_KEYS"),
                        get("API_KEY_HASH_SECRET"),
                    );
                }
            }
            None => {}
        }

        let (mut settings, load_problems) = Self::from_vars_reporting(merged);
        // Reported for the settings themselves (JWT_PRIVATE_KEY), not for the
        // variables a file expanded into them (STAGING_JWT_PRIVATE_KEY).
        let names: Vec<&str> = settings.effective().into_iter().map(|(k, _)| k).collect();
        problems.extend(
            placeholders
                .iter()
                .filter(|k| names.contains(&k.as_str()))
                .map(|k| {
                    format!("{k} still holds the example placeholder {PLACEHOLDER_MARKER}: set a real value")
                }),
        );
        problems.extend(load_problems);
        settings.development_key_fingerprints = development_key_fingerprints;
        Ok((settings, problems))
    }

    /// Deserializes from a variable map (no file, no expansion).
    pub fn from_vars<I>(vars: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        // Empty values mean "unset" for optional settings (SENTRY_DSN= in a file),
        // except ALLOWED_CLIENT_NETWORKS, where empty means everyone.
        let vars = vars.into_iter().filter(keep_var);
        envy::from_iter::<_, Settings>(vars)
            .map_err(|e| ConfigError::Invalid(describe_envy_error(&e)))
    }

    /// Deserializes, reporting every invalid value and missing required setting
    /// rather than the first: each variable is tried on its own, bad ones are left
    /// out (their defaults apply) and missing required ones are left empty, so the
    /// effective settings can still be shown.
    fn from_vars_reporting(vars: HashMap<String, String>) -> (Self, Vec<String>) {
        let mut vars: Vec<(String, String)> = vars.into_iter().filter(keep_var).collect();
        vars.sort();
        let mut problems = Vec::new();
        if envy::from_iter::<_, Settings>(vars.clone()).is_err() {
            vars.retain(|(k, v)| {
                let probe = [("DATABASE_URL", "-"), ("REDIS_URL", "-")]
                    .into_iter()
                    .filter(|(name, _)| name != k)
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .chain([(k.clone(), v.clone())]);
                match envy::from_iter::<_, Settings>(probe) {
                    Ok(_) => true,
                    Err(e) => {
                        problems.push(format!("{k}: {}", describe_envy_error(&e)));
                        false
                    }
                }
            });
        }
        loop {
            match envy::from_iter::<_, Settings>(vars.clone()) {
                Ok(s) => return (s, problems),
                Err(envy::Error::MissingValue(field)) => {
                    let name = field.to_ascii_uppercase();
                    problems.push(format!("{name} is required"));
                    vars.push((name, String::new()));
                }
                // Every variable deserialized on its own above; one that fails only
                // in company is reported as such, and defaults apply.
                Err(e) => {
                    problems.push(describe_envy_error(&e));
                    let defaults = [("DATABASE_URL", ""), ("REDIS_URL", "")]
                        .map(|(k, v)| (k.to_string(), v.to_string()));
                    let s =
                        envy::from_iter::<_, Settings>(defaults).expect("the defaults deserialize");
                    return (s, problems);
                }
            }
        }
    }

    /// ALLOWED_CLIENT_NETWORKS, or the environment's default when unset.
    pub fn allowed_client_networks(&self) -> IpNetworks {
        match (&self.allowed_client_networks, self.app_env) {
            (Some(n), _) => n.clone(),
            (None, Environment::Development) => IpNetworks::private_and_loopback(),
            (None, _) => IpNetworks::default(),
        }
    }

    pub fn registration_enabled(&self) -> bool {
        self.registration_enabled
            .unwrap_or(self.app_env == Environment::Development)
    }

    pub fn cors_origins(&self) -> Vec<String> {
        self.cors_allowed_origins
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    }

    /// WEBAUTHN_ORIGINS; unset, the CORS origins; without those either, the
    /// relying party's own `https://` origin (so a deployment that sets neither,
    /// such as the compose file, still starts).
    pub fn webauthn_origins(&self) -> Vec<String> {
        let list: Vec<String> = self
            .webauthn_origins
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        match (list.is_empty(), self.cors_origins()) {
            (false, _) => list,
            (true, cors) if !cors.is_empty() => cors,
            (true, _) => vec![format!("https://{}", self.webauthn_rp_id)],
        }
    }

    /// Session cookie name: `__Host-` prefixed whenever the cookie is Secure.
    pub fn session_cookie_name(&self) -> &'static str {
        if self.session_cookie_secure {
            "__Host-sb_session"
        } else {
            "sb_session"
        }
    }

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
        p.extend(self.key_material_problems());
        p.extend(crate::domain::passkey::origin_problems(
            &self.webauthn_rp_id,
            &self.webauthn_origins(),
            self.app_env != Environment::Development,
        ));
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

    /// The effective settings as `KEY=value` pairs, every secret masked as `***`.
    pub fn effective(&self) -> Vec<(&'static str, String)> {
        fn opt(v: &Option<String>) -> String {
            v.clone().unwrap_or_default()
        }
        fn secret(v: &Option<SecretString>) -> String {
            if v.is_some() {
                "***".into()
            } else {
                String::new()
            }
        }
        vec![
            ("APP_ENV", self.app_env.as_str().into()),
            ("USER_SERVICE_HOST", self.user_service_host.clone()),
            ("USER_SERVICE_PORT", self.user_service_port.to_string()),
            ("DATABASE_URL", mask_url(self.database_url.expose_secret())),
            (
                "DATABASE_MAX_CONNECTIONS",
                self.database_max_connections.to_string(),
            ),
            ("REDIS_URL", mask_url(self.redis_url.expose_secret())),
            ("REDIS_KEY_PREFIX", self.redis_key_prefix.clone()),
            ("REDIS_TLS_CA_FILE", opt(&self.redis_tls_ca_file)),
            ("TICKER_SERVICE_URL", opt(&self.ticker_service_url)),
            ("BACKEND_SERVICE_URL", opt(&self.backend_service_url)),
            ("ALERT_SERVICE_URL", opt(&self.alert_service_url)),
            ("CALENDAR_SERVICE_URL", opt(&self.calendar_service_url)),
            ("DEBUG", self.debug.to_string()),
            (
                "SESSION_COOKIE_SECURE",
                self.session_cookie_secure.to_string(),
            ),
            (
                "SESSION_COOKIE_SAMESITE",
                self.session_cookie_samesite.as_str().to_ascii_lowercase(),
            ),
            ("CORS_ALLOWED_ORIGINS", self.cors_allowed_origins.clone()),
            ("LOG_LEVEL", self.log_level.clone()),
            (
                "LOG_FORMAT",
                format!("{:?}", self.log_format).to_ascii_lowercase(),
            ),
            ("SENTRY_DSN", secret(&self.sentry_dsn)),
            ("LOGIN_MAX_ATTEMPTS", self.login_max_attempts.to_string()),
            (
                "LOGIN_LOCKOUT_SECONDS",
                self.login_lockout_seconds.to_string(),
            ),
            (
                "LOGIN_IP_MAX_PER_MINUTE",
                self.login_ip_max_per_minute.to_string(),
            ),
            ("PASSWORD_MIN_LENGTH", self.password_min_length.to_string()),
            (
                "REGISTRATION_ENABLED",
                self.registration_enabled().to_string(),
            ),
            (
                "ACCESS_TOKEN_TTL_SECONDS",
                self.access_token_ttl_seconds.to_string(),
            ),
            (
                "REFRESH_TOKEN_TTL_SECONDS",
                self.refresh_token_ttl_seconds.to_string(),
            ),
            (
                "SESSION_IDLE_TIMEOUT_SECONDS",
                self.session_idle_timeout_seconds.to_string(),
            ),
            (
                "SERVICE_TOKEN_TTL_SECONDS",
                self.service_token_ttl_seconds.to_string(),
            ),
            ("JWT_ISSUER", self.jwt_issuer.clone()),
            ("JWT_AUDIENCE", self.jwt_audience.clone()),
            ("JWT_PRIVATE_KEY", secret(&self.jwt_private_key)),
            (
                "JWT_PREVIOUS_PUBLIC_KEYS",
                if self.jwt_previous_public_keys.is_some() {
                    "(set)".into()
                } else {
                    String::new()
                },
            ),
            (
                "CREDENTIALS_ENCRYPTION_KEYS",
                secret(&self.credentials_encryption_keys),
            ),
            ("API_KEY_HASH_SECRET", secret(&self.api_key_hash_secret)),
            ("METRICS_TOKEN", secret(&self.metrics_token)),
            (
                "ARGON2_MAX_CONCURRENCY",
                self.argon2_max_concurrency
                    .map(|n| n.to_string())
                    .unwrap_or_default(),
            ),
            (
                "SHUTDOWN_GRACE_SECONDS",
                self.shutdown_grace_seconds.to_string(),
            ),
            (
                "API_KEY_CACHE_TTL_SECONDS",
                self.api_key_cache_ttl_seconds.to_string(),
            ),
            (
                "API_KEY_NEGATIVE_CACHE_TTL_SECONDS",
                self.api_key_negative_cache_ttl_seconds.to_string(),
            ),
            (
                "USAGE_LOG_BUFFER_CAPACITY",
                self.usage_log_buffer_capacity.to_string(),
            ),
            (
                "USAGE_LOG_FLUSH_INTERVAL_MS",
                self.usage_log_flush_interval_ms.to_string(),
            ),
            // ---- login lockout and abuse throttles (helper "login") ----
            (
                "LOGIN_LOCKED_DELAY_MS",
                self.login_locked_delay_ms.to_string(),
            ),
            (
                "REGISTER_IP_MAX_PER_HOUR",
                self.register_ip_max_per_hour.to_string(),
            ),
            // ---- runtime ----
            (
                "ALLOWED_CLIENT_NETWORKS",
                self.allowed_client_networks().to_string(),
            ),
            ("TRUSTED_PROXIES", self.trusted_proxies.to_string()),
            (
                "DATABASE_STATEMENT_TIMEOUT_MS",
                self.database_statement_timeout_ms.to_string(),
            ),
            (
                "DATABASE_ACQUIRE_TIMEOUT_MS",
                self.database_acquire_timeout_ms.to_string(),
            ),
            (
                "MAX_CLIENT_CONNECTIONS",
                self.max_client_connections
                    .map(|n| n.to_string())
                    .unwrap_or_default(),
            ),
            (
                "HTTP_HEADER_READ_TIMEOUT_SECONDS",
                self.http_header_read_timeout_seconds.to_string(),
            ),
            (
                "HTTP_IDLE_TIMEOUT_SECONDS",
                self.http_idle_timeout_seconds.to_string(),
            ),
            (
                "HTTP2_KEEPALIVE_INTERVAL_SECONDS",
                self.http2_keepalive_interval_seconds.to_string(),
            ),
            (
                "HTTP2_MAX_CONCURRENT_STREAMS",
                self.http2_max_concurrent_streams.to_string(),
            ),
            // --- deploy: database roles ---
            (
                "DATABASE_MIGRATION_URL",
                self.database_migration_url
                    .as_ref()
                    .map(|u| mask_url(u.expose_secret()))
                    .unwrap_or_default(),
            ),
            // tokens: in-process verification caches
            (
                "TOKEN_CACHE_CAPACITY",
                self.token_cache_capacity.to_string(),
            ),
            (
                "API_KEY_CACHE_CAPACITY",
                self.api_key_cache_capacity.to_string(),
            ),
            ("CACHE_STALE_SECONDS", self.cache_stale_seconds.to_string()),
            (
                "TOKEN_CACHE_TTL_SECONDS",
                self.token_cache_ttl_seconds.to_string(),
            ),
            // ---- passkeys ----
            ("WEBAUTHN_RP_ID", self.webauthn_rp_id.clone()),
            ("WEBAUTHN_ORIGINS", self.webauthn_origins().join(",")),
        ]
    }
}

/// `.secrets/dev.env`: the development key material generated once per working
/// directory. Written whole under an exclusive lock and renamed into place, so
/// replicas starting at the same moment end up with one set of keys.
mod dev_secrets {
    use std::collections::HashMap;
    use std::io::Write as _;
    use std::os::fd::AsRawFd as _;
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
    use std::path::Path;

    use super::{parse_env_file_all, ConfigError};
    use crate::crypto::key_material;

    fn io_error(path: &Path, e: std::io::Error) -> ConfigError {
        ConfigError::Write {
            file: path.display().to_string(),
            message: e.to_string(),
        }
    }

    /// The file's values, or None when it does not exist.
    pub(super) fn read(path: &Path) -> Result<Option<Vec<(String, String)>>, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(content) => {
                let name = path.display().to_string();
                Ok(Some(parse_env_file_all(&content, &name, &HashMap::new()).0))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ConfigError::Read {
                file: path.display().to_string(),
                message: e.to_string(),
            }),
        }
    }

    /// Values for the key settings `merged` leaves unset: from the file, generated
    /// into it first when it lacks them.
    pub(super) fn fill_unset(
        path: &Path,
        merged: &HashMap<String, String>,
    ) -> Result<Vec<(String, String)>, ConfigError> {
        let unset: Vec<&str> = key_material::GENERATED_IN_DEVELOPMENT
            .into_iter()
            .filter(|k| merged.get(*k).is_none_or(|v| v.is_empty()))
            .collect();
        if unset.is_empty() {
            return Ok(Vec::new());
        }
        let pick = |values: &[(String, String)]| -> Option<Vec<(String, String)>> {
            unset
                .iter()
                .map(|k| {
                    values
                        .iter()
                        .rev()
                        .find(|(n, v)| n == k && !v.is_empty())
                        .cloned()
                })
                .collect()
        };
        if let Some(found) = read(path)?.as_deref().and_then(pick) {
            // Tighten a copy made with the wrong mode; not ours to fail on.
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
            return Ok(found);
        }

        let dir = path.parent().expect("the file lives in .secrets/");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io_error(dir, e))?;
        let lock_path = path.with_extension("env.lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| io_error(&lock_path, e))?;
        // flock(2) rather than File::lock, which is newer than the crate's MSRV. The
        // lock is released when `lock` is dropped (the descriptor closes).
        // SAFETY: flock on a descriptor this function owns; no memory is involved.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io_error(&lock_path, std::io::Error::last_os_error()));
        }
        // Another process may have written it while this one waited.
        let existing = std::fs::read_to_string(path).unwrap_or_default();
        let mut values = parse_env_file_all(&existing, "", &HashMap::new()).0;
        let mut content = if existing.is_empty() {
            "# Development key material, generated by user-service on first start in this\n\
             # directory and shared by every replica started here. Never commit it; never\n\
             # use it outside development (staging and production refuse these keys).\n"
                .to_string()
        } else {
            let mut c = existing.clone();
            if !c.ends_with('\n') {
                c.push('\n');
            }
            c
        };
        for name in &unset {
            if values.iter().any(|(n, v)| n == name && !v.is_empty()) {
                continue;
            }
            let value = key_material::generate(name).expect("a generated setting");
            content.push_str(&format!("{name}=\"{}\"\n", value.replace('\n', "\\n")));
            values.push((name.to_string(), value));
        }
        let tmp = path.with_extension("env.tmp");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| io_error(&tmp, e))?;
        f.write_all(content.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| io_error(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| io_error(path, e))?;
        drop(lock);
        Ok(pick(&values).expect("every unset key was generated"))
    }
}

/// `scheme://user:password@host/db` → `scheme://user:***@host/db`.
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

pub fn mask_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "***".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn expands_and_reports_unset_variable_by_name() {
        let v = vars(&[("PW", "s3cret")]);
        let parsed = parse_env_file("A=x${PW}y\nB=\"${A}-z\"\nC='${NOT}'", "f", &v).unwrap();
        assert_eq!(parsed[0].1, "xs3crety");
        assert_eq!(parsed[1].1, "xs3crety-z");
        assert_eq!(parsed[2].1, "${NOT}");
        let err = parse_env_file("# c\nDB=${MISSING_PW}", "f", &v).unwrap_err();
        assert!(err.to_string().contains("MISSING_PW"), "{err}");
    }

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

    #[test]
    fn mask_url_hides_password() {
        assert_eq!(
            mask_url("postgresql://u:pw@localhost:8003/db"),
            "postgresql://u:***@localhost:8003/db"
        );
    }
}
