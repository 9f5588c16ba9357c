//! A normalised email address: Unicode NFKC, trimmed, lower-cased, so lookups and
//! lockout counters see one spelling per mailbox.

use unicode_normalization::UnicodeNormalization;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Email(String);

impl Email {
    /// Normalises and checks the shape; the error says why.
    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        let s: String = raw.nfkc().collect::<String>().trim().to_lowercase();
        if s.is_empty() {
            return Err("email is required");
        }
        if s.chars().count() > 320 {
            return Err("email is longer than 320 characters");
        }
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("email must not contain spaces or control characters");
        }
        let Some((local, domain)) = s.rsplit_once('@') else {
            return Err("email must contain @");
        };
        if local.is_empty() || local.contains('@') {
            return Err("email must have exactly one @ with a name before it");
        }
        if domain.len() < 3
            || !domain.contains('.')
            || domain.starts_with('.')
            || domain.ends_with('.')
            || domain.contains("..")
        {
            return Err("email must end with a domain such as example.com");
        }
        Ok(Self(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part before the `@`.
    pub fn local_part(&self) -> &str {
        self.0.rsplit_once('@').map_or(&self.0, |(l, _)| l)
    }
}

impl AsRef<str> for Email {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_case_space_and_compatibility_forms() {
        let e = Email::parse("  Alice@Example.COM ").unwrap();
        assert_eq!(e.as_str(), "alice@example.com");
        // Fullwidth letters (NFKC) fold to ASCII.
        assert_eq!(
            Email::parse("ＢＯＢ@example.com").unwrap().as_str(),
            "bob@example.com"
        );
        assert_eq!(e.local_part(), "alice");
    }

    #[test]
    fn refuses_malformed() {
        for bad in [
            "",
            "no-at",
            "@example.com",
            "a@b",
            "a b@example.com",
            "a@example..com",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad}");
        }
    }
}
