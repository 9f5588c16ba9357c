//! The password policy (NIST SP 800-63B): a minimum length per environment, a hard
//! cap, no composition rules, no truncation; weak, common or email-derived
//! passwords refused (zxcvbn). Each refusal says why.

use secrecy::{ExposeSecret, SecretString};

use super::email::Email;

/// Longer passwords are refused before any hashing (DESIGN.md section 7).
pub const MAX_PASSWORD_CHARS: usize = 256;
/// zxcvbn score a new password must reach (0–4).
pub const MIN_STRENGTH_SCORE: u8 = 3;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswordError {
    pub code: &'static str,
    pub message: String,
}

impl PasswordError {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// A password as typed; never logged (SecretString's Debug is redacted).
pub struct Password(SecretString);

impl Password {
    /// Any candidate for verification: only the hard cap applies, so an over-long
    /// value costs no hashing.
    pub fn candidate(raw: String) -> Result<Self, PasswordError> {
        if raw.chars().count() > MAX_PASSWORD_CHARS {
            return Err(PasswordError::new(
                "too_long",
                format!("password must be at most {MAX_PASSWORD_CHARS} characters"),
            ));
        }
        Ok(Self(SecretString::from(raw)))
    }

    /// A new password under the policy. `user_inputs` (e.g. the full name) also
    /// count against its strength.
    pub fn new_for(
        raw: String,
        min_length: usize,
        email: &Email,
        user_inputs: &[&str],
    ) -> Result<Self, PasswordError> {
        let p = Self::candidate(raw)?;
        let s = p.0.expose_secret();
        let len = s.chars().count();
        if len < min_length {
            return Err(PasswordError::new(
                "too_short",
                format!("password must be at least {min_length} characters"),
            ));
        }
        let local = email.local_part();
        if local.chars().count() >= 3 && s.to_lowercase().contains(local) {
            return Err(PasswordError::new(
                "contains_email",
                "password must not contain your email address",
            ));
        }
        let mut inputs: Vec<&str> = vec![email.as_str(), local];
        inputs.extend_from_slice(user_inputs);
        let entropy = zxcvbn::zxcvbn(s, &inputs);
        if u8::from(entropy.score()) < MIN_STRENGTH_SCORE {
            let hint = entropy
                .feedback()
                .and_then(|f| f.warning())
                .map(|w| format!(": {w}"))
                .unwrap_or_default();
            return Err(PasswordError::new(
                "too_weak",
                format!("password is too easy to guess{hint}; use a longer passphrase"),
            ));
        }
        Ok(p)
    }

    pub fn into_secret(self) -> SecretString {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn email() -> Email {
        Email::parse("alice.smith@example.com").unwrap()
    }

    #[test]
    fn policy_reasons() {
        let e = email();
        let err = |p: &str| {
            Password::new_for(p.into(), 12, &e, &[])
                .err()
                .map(|e| e.code)
        };
        assert_eq!(err("short"), Some("too_short"));
        assert_eq!(err("passwordpassword"), Some("too_weak"));
        assert_eq!(err("xX alice.smith 9q!vz Lm"), Some("contains_email"));
        assert_eq!(err(&"a".repeat(257)), Some("too_long"));
        assert_eq!(err("violet-tunnel-orbit-97-marsh"), None);
        // 64 characters (and no composition rule) is fine.
        let long: String = "correct horse battery staple "
            .repeat(3)
            .chars()
            .take(64)
            .collect();
        assert_eq!(err(&long), None);
    }
}
