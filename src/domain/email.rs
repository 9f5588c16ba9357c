//! A normalised email address: Unicode NFKC, trimmed, lower-cased, so lookups and
//! lockout counters see one spelling per mailbox.

use unicode_normalization::UnicodeNormalization;
use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};

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
        if s.chars().any(is_invisible) {
            return Err("email must not contain invisible or text-direction characters");
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

/// Characters that show nothing or reorder what is shown, so two addresses that look
/// the same could differ (or one could pose as another): every format character
/// (Unicode category Cf: zero-width space and joiners, soft hyphen, byte-order mark,
/// bidirectional embeddings, overrides and isolates, invisible operators, tag
/// characters) and the other default-ignorable code points NFKC leaves in place
/// (Hangul fillers, variation selectors, the combining grapheme joiner).
fn is_invisible(c: char) -> bool {
    c.general_category() == GeneralCategory::Format
        || matches!(
            c,
            '\u{034F}'
                | '\u{115F}'
                | '\u{1160}'
                | '\u{17B4}'
                | '\u{17B5}'
                | '\u{180B}'..='\u{180F}'
                | '\u{3164}'
                | '\u{FE00}'..='\u{FE0F}'
                | '\u{FFA0}'
                | '\u{E0100}'..='\u{E01EF}'
        )
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

    #[test]
    fn refuses_invisible_and_direction_characters() {
        for c in [
            '\u{200B}',  // zero-width space
            '\u{200C}',  // zero-width non-joiner
            '\u{200D}',  // zero-width joiner
            '\u{2060}',  // word joiner
            '\u{00AD}',  // soft hyphen
            '\u{FEFF}',  // byte-order mark
            '\u{202E}',  // right-to-left override
            '\u{202A}',  // left-to-right embedding
            '\u{2066}',  // left-to-right isolate
            '\u{200F}',  // right-to-left mark
            '\u{061C}',  // Arabic letter mark
            '\u{E0041}', // tag latin capital A
            '\u{3164}',  // Hangul filler
            '\u{FE0F}',  // variation selector 16
        ] {
            for email in [
                format!("al{c}ice@example.com"),
                format!("{c}alice@example.com"),
                format!("alice@exa{c}mple.com"),
                format!("alice@example.com{c}"),
            ] {
                assert_eq!(
                    Email::parse(&email),
                    Err("email must not contain invisible or text-direction characters"),
                    "U+{:04X} in {email:?}",
                    c as u32
                );
            }
        }
        // Letters of other scripts are still fine.
        assert!(Email::parse("élise@exemple.fr").is_ok());
        assert!(Email::parse("用户@例子.中国").is_ok());
    }
}
