//! Account recovery and verification as pure rules: what a link token proves, the
//! notification templates (DESIGN.md section 8), and the delivery backoff.

use std::time::Duration;

/// What a single-use link token proves once confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenPurpose {
    /// The user's current address is theirs.
    VerifyEmail,
    /// The new address the user asked for is theirs: the change applies.
    ChangeEmail,
    /// The holder may set a new password.
    ResetPassword,
}

impl TokenPurpose {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::VerifyEmail => "verify_email",
            Self::ChangeEmail => "change_email",
            Self::ResetPassword => "reset_password",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "verify_email" => Self::VerifyEmail,
            "change_email" => Self::ChangeEmail,
            "reset_password" => Self::ResetPassword,
            _ => return None,
        })
    }
}

/// Link tokens are 32 random bytes in unpadded base64url: 43 characters.
pub const LINK_TOKEN_CHARS: usize = 43;

/// Whether `raw` has the shape of a link token, so anything else is refused
/// before a lookup (and never echoed).
pub fn is_link_token(raw: &str) -> bool {
    raw.len() == LINK_TOKEN_CHARS
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The messages the alert service knows, by the names DESIGN.md section 8 gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Template {
    /// `{link, token, expires_at}`: confirm an address (at sign-up, on resend,
    /// or the new address of an email change).
    EmailVerification,
    /// `{link, token, expires_at}`.
    PasswordReset,
    /// `{new_email}`, to the old address.
    EmailChanged,
    PasswordChanged,
    MfaEnabled,
    MfaDisabled,
    /// `{ip, user_agent}`: a sign-in from an address not seen for 30 days.
    NewSignIn,
    /// `{name, prefix}`.
    ApiKeyCreated,
    /// `{account_id}`.
    BrokerCredentialsChanged,
}

impl Template {
    pub const ALL: [Template; 9] = [
        Self::EmailVerification,
        Self::PasswordReset,
        Self::EmailChanged,
        Self::PasswordChanged,
        Self::MfaEnabled,
        Self::MfaDisabled,
        Self::NewSignIn,
        Self::ApiKeyCreated,
        Self::BrokerCredentialsChanged,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::EmailVerification => "email_verification",
            Self::PasswordReset => "password_reset",
            Self::EmailChanged => "email_changed",
            Self::PasswordChanged => "password_changed",
            Self::MfaEnabled => "mfa_enabled",
            Self::MfaDisabled => "mfa_disabled",
            Self::NewSignIn => "new_sign_in",
            Self::ApiKeyCreated => "api_key_created",
            Self::BrokerCredentialsChanged => "broker_credentials_changed",
        }
    }

    /// Whether the message carries a live credential (a link token): its `link`
    /// and `token` are erased from the outbox once it is delivered or dead.
    pub fn carries_token(self) -> bool {
        matches!(self, Self::EmailVerification | Self::PasswordReset)
    }
}

/// How long to wait after the `failures`-th failed delivery (1 for the first):
/// `base` doubled each time, at most `max`. The dispatcher adds jitter.
pub fn backoff(failures: u32, base: Duration, max: Duration) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    base.saturating_mul(1u32 << exp).min(max)
}

/// A sign-in from an address this user has not used for this long is news.
pub const SIGN_IN_MEMORY: Duration = Duration::from_secs(30 * 24 * 3600);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let (b, m) = (Duration::from_secs(5), Duration::from_secs(60));
        let waits: Vec<u64> = (1..=6).map(|n| backoff(n, b, m).as_secs()).collect();
        assert_eq!(waits, [5, 10, 20, 40, 60, 60]);
        assert_eq!(backoff(1000, b, m), m);
    }

    #[test]
    fn link_tokens_have_one_shape() {
        assert!(is_link_token(&"a".repeat(43)));
        assert!(is_link_token("abcdefghijklmnopqrstuvwxyzABCDEFGHIJ-_01234"));
        assert!(!is_link_token(&"a".repeat(42)));
        assert!(!is_link_token(&format!("{}=", "a".repeat(42))));
        assert!(!is_link_token(&format!("{}é", "a".repeat(41))));
    }

    #[test]
    fn template_names_are_the_contract() {
        let names: Vec<&str> = Template::ALL.iter().map(|t| t.as_str()).collect();
        assert_eq!(
            names,
            [
                "email_verification",
                "password_reset",
                "email_changed",
                "password_changed",
                "mfa_enabled",
                "mfa_disabled",
                "new_sign_in",
                "api_key_created",
                "broker_credentials_changed"
            ]
        );
        for p in ["verify_email", "change_email", "reset_password"] {
            assert_eq!(TokenPurpose::parse(p).unwrap().as_str(), p);
        }
    }
}
