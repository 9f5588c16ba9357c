//! Settings: one typed struct deserialized with envy after the env file is loaded
//! (ENV_FILE, else `.env`, else `.env.<env>` by APP_ENV), `${VAR}` expansion, and the
//! start-up validation that keeps staging and production from running insecurely.
//!
//! - `settings.rs`: the settings table, each setting declared once;
//! - `table.rs`: the macro that turns the table into `Settings`, its defaults and
//!   the `check-config` lines;
//! - `env_file.rs`: which env file applies, its lines, `${VAR}` expansion;
//! - `load.rs`: merging file and environment, reporting every problem in one pass;
//! - `dev_secrets.rs`: development key material in `.secrets/dev.env`;
//! - `checks.rs`: validation, one line per problem.
//!
//! # Adding a setting
//!
//! Add one row to the table in `settings.rs`, with a one-line doc comment:
//!
//! ```text
//! /// Lifetime of a password-reset link.
//! password_reset_ttl_seconds: u64 = 1800;
//! /// Verified email required for the step-up operations.
//! require_verified_email: bool = by_env(false, true, true);
//! /// Bearer token for the alert service.
//! alert_service_token: Option<SecretString>, secret;
//! ```
//!
//! The variable is the field name upper-cased (`PASSWORD_RESET_TTL_SECONDS`). That
//! row is the field, its default (`by_env(development, staging, production)` when
//! they differ; none for `Option<T>`, unset; none otherwise: required) and its
//! `check-config` line (a secret must say `secret` or `secret(url)`, or it does not
//! compile). A rule on its value (a range, a combination, what staging refuses)
//! goes in `checks.rs`, `Settings::problems`. Nothing else needs editing.

use std::fmt;

mod checks;
mod dev_secrets;
mod env_file;
mod load;
mod settings;
pub(crate) mod table;

pub use env_file::{choose_env_file, parse_env_file, parse_env_file_all};
pub use settings::{Environment, LogFormat, NotifySink, SameSite, Settings, SETTINGS};
pub use table::Setting;

use crate::domain::network::IpNetworks;

/// Where development keeps the key material it generated, under the working
/// directory: git-ignored, mode 600, shared by every replica started there.
pub const DEV_SECRETS_FILE: &str = ".secrets/dev.env";
/// What the example secret files (deploy/) hold until an operator fills them in.
pub const PLACEHOLDER_MARKER: &str = "REPLACE_ME";

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

impl Settings {
    /// ALLOWED_CLIENT_NETWORKS, or the environment's default when unset.
    pub fn allowed_client_networks(&self) -> IpNetworks {
        match (&self.allowed_client_networks, self.app_env) {
            (Some(n), _) => n.clone(),
            (None, Environment::Development) => IpNetworks::private_and_loopback(),
            (None, _) => IpNetworks::default(),
        }
    }

    /// Self sign-up (REGISTRATION_ENABLED, by default on in development only).
    pub fn registration_enabled(&self) -> bool {
        self.registration_enabled
    }

    /// NOTIFY_SINK (log in development unless set).
    pub fn notify_sink(&self) -> NotifySink {
        self.notify_sink
    }

    /// REQUIRE_VERIFIED_EMAIL (off in development unless set).
    pub fn require_verified_email(&self) -> bool {
        self.require_verified_email
    }

    /// PUBLIC_APP_URL without a trailing slash; unset, the environment's web app
    /// (the origins CORS_ALLOWED_ORIGINS names first in the env files).
    pub fn public_app_url(&self) -> String {
        match (&self.public_app_url, self.app_env) {
            (Some(u), _) => u.trim_end_matches('/').to_string(),
            (None, Environment::Development) => "http://localhost:3000".into(),
            (None, Environment::Staging) => "http://localhost:3002".into(),
            (None, Environment::Production) => "https://app.stocksblitz.com".into(),
        }
    }

    /// MFA_REQUIRED_ROLES as a list, or the environment's default.
    pub fn mfa_required_roles(&self) -> Vec<String> {
        match &self.mfa_required_roles {
            Some(list) => list
                .split(',')
                .map(|r| r.trim().to_string())
                .filter(|r| !r.is_empty())
                .collect(),
            None if self.app_env == Environment::Production => vec!["admin".to_string()],
            None => Vec::new(),
        }
    }

    /// MFA_REQUIRED_FOR_MANAGERS (true in production unless set).
    pub fn mfa_required_for_managers(&self) -> bool {
        self.mfa_required_for_managers
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

    pub fn cors_origins(&self) -> Vec<String> {
        self.cors_allowed_origins
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    }

    /// Session cookie name: `__Host-` prefixed whenever the cookie is Secure.
    pub fn session_cookie_name(&self) -> &'static str {
        if self.session_cookie_secure {
            "__Host-sb_session"
        } else {
            "sb_session"
        }
    }
}

/// `scheme://user:password@host/db` → `scheme://user:***@host/db`.
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

    #[test]
    fn mask_url_hides_password() {
        assert_eq!(
            mask_url("postgresql://u:pw@localhost:8003/db"),
            "postgresql://u:***@localhost:8003/db"
        );
    }
}
