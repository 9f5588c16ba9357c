//! Passkeys (WebAuthn): what a registered passkey looks like to its owner, the
//! rules for its name, the ceremonies a challenge can belong to, and which
//! relying-party settings are sound. No I/O; the ceremonies themselves are in
//! `service::passkeys`.

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// A challenge lives this long and is used at most once (DESIGN §8).
pub const CHALLENGE_TTL_SECONDS: i64 = 300;
/// Passkeys one user may hold: enough for every device a person owns, few
/// enough that the list and the exclude list stay small.
pub const MAX_PER_USER: i64 = 20;
/// A passkey's name, in characters.
pub const NAME_MAX_CHARS: usize = 64;
/// The name a passkey gets when registration gives none.
pub const DEFAULT_NAME: &str = "Passkey";

/// RFC 8176 `amr` of a passwordless login: a hardware-bound key (`hwk`) with
/// user verification, which is two factors (possession and the PIN or
/// biometric), hence `mfa` too.
pub const AMR_PASSWORDLESS: [&str; 2] = ["hwk", "mfa"];
/// The `amr` value a passkey adds when it is the second factor after a password.
pub const AMR_PASSKEY: &str = "hwk";

/// A registered passkey as its owner sees it (never the public key or counter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasskeySummary {
    pub id: Uuid,
    pub name: String,
    pub created_at: DateTime<Utc>,
    /// The last login or second factor it completed; null until then.
    pub last_used_at: Option<DateTime<Utc>>,
}

/// Which ceremony a stored challenge belongs to: a challenge started for one
/// can never finish another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ceremony {
    /// Adding a passkey to the signed-in user.
    Register,
    /// Passwordless login with a discoverable credential: no user yet.
    Login,
    /// The second step of a password login, for one user.
    SecondFactor,
}

impl Ceremony {
    pub fn as_str(self) -> &'static str {
        match self {
            Ceremony::Register => "register",
            Ceremony::Login => "login",
            Ceremony::SecondFactor => "second_factor",
        }
    }
}

/// A passkey name: trimmed, 1 to 64 characters, no control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasskeyName(String);

impl PasskeyName {
    pub fn parse(raw: Option<&str>) -> Result<Self, &'static str> {
        let Some(raw) = raw else {
            return Ok(Self(DEFAULT_NAME.into()));
        };
        let s = raw.trim();
        let n = s.chars().count();
        if n == 0 || n > NAME_MAX_CHARS {
            return Err("name must be 1 to 64 characters");
        }
        if s.chars().any(char::is_control) {
            return Err("name must not contain control characters");
        }
        Ok(Self(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Whether `host` is `rp_id` or a subdomain of it (the label boundary matters:
/// `evilstocksblitz.com` is not under `stocksblitz.com`).
pub fn host_is_under(host: &str, rp_id: &str) -> bool {
    let (host, rp_id) = (host.to_ascii_lowercase(), rp_id.to_ascii_lowercase());
    host == rp_id || host.ends_with(&format!(".{rp_id}"))
}

/// What is wrong with a relying-party id and its origins, one line each. Every
/// origin must be a bare `scheme://host[:port]` under the rp id; browsers run
/// WebAuthn only in secure contexts, so outside development an origin must be
/// https unless it is on localhost.
pub fn origin_problems(rp_id: &str, origins: &[String], strict: bool) -> Vec<String> {
    let mut p = Vec::new();
    let rp_ok = !rp_id.is_empty()
        && !rp_id.contains(['/', ':', ' '])
        && url::Host::parse(rp_id).is_ok_and(|h| matches!(h, url::Host::Domain(_)));
    if !rp_ok {
        p.push(format!(
            "WEBAUTHN_RP_ID {rp_id:?} must be a domain name (no scheme, port or path)"
        ));
    }
    if origins.is_empty() {
        p.push("WEBAUTHN_ORIGINS is empty: passkeys need at least one origin".into());
    }
    for o in origins {
        let Ok(u) = url::Url::parse(o) else {
            p.push(format!("WEBAUTHN_ORIGINS: {o:?} is not a URL"));
            continue;
        };
        let host = u.host_str().unwrap_or_default();
        let bare = u.path() == "/" && u.query().is_none() && u.fragment().is_none();
        if !matches!(u.scheme(), "http" | "https") || host.is_empty() || !bare {
            p.push(format!(
                "WEBAUTHN_ORIGINS: {o:?} must be an origin: http(s)://host[:port], nothing after"
            ));
            continue;
        }
        if rp_ok && !host_is_under(host, rp_id) {
            p.push(format!(
                "WEBAUTHN_ORIGINS: {o:?} is not under WEBAUTHN_RP_ID {rp_id:?}"
            ));
        }
        if strict && u.scheme() != "https" && host != "localhost" {
            p.push(format!(
                "WEBAUTHN_ORIGINS: {o:?} must use https outside development"
            ));
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origins(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn names_are_trimmed_bounded_and_printable() {
        assert_eq!(PasskeyName::parse(None).unwrap().as_str(), DEFAULT_NAME);
        assert_eq!(
            PasskeyName::parse(Some("  YubiKey 5 ")).unwrap().as_str(),
            "YubiKey 5"
        );
        assert!(PasskeyName::parse(Some("   ")).is_err());
        assert!(PasskeyName::parse(Some(&"é".repeat(64))).is_ok());
        assert!(PasskeyName::parse(Some(&"é".repeat(65))).is_err());
        assert!(PasskeyName::parse(Some("a\u{0007}b")).is_err());
    }

    #[test]
    fn origins_must_sit_under_the_rp_id() {
        let ok = origin_problems(
            "stocksblitz.com",
            &origins(&["https://app.stocksblitz.com", "https://stocksblitz.com"]),
            true,
        );
        assert!(ok.is_empty(), "{ok:?}");
        let dev = origin_problems("localhost", &origins(&["http://localhost:3000"]), false);
        assert!(dev.is_empty(), "{dev:?}");

        let bad = origin_problems(
            "stocksblitz.com",
            &origins(&[
                "https://evilstocksblitz.com",
                "http://app.stocksblitz.com",
                "https://app.stocksblitz.com/login",
                "not a url",
            ]),
            true,
        );
        assert_eq!(bad.len(), 4, "{bad:?}");
        assert!(bad[0].contains("not under"), "{bad:?}");
        assert!(bad[1].contains("https"), "{bad:?}");
        assert!(bad[2].contains("must be an origin"), "{bad:?}");

        assert_eq!(
            origin_problems("https://x.com", &origins(&[]), false).len(),
            2
        );
    }
}
