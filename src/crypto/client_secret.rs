//! The stored form of a service client's secret: `$sha256$` and the digest in
//! hex. The secret is 256 random bits, so no guess list applies and a slow hash
//! (argon2) would buy nothing (see `service::service_clients`).

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

const PREFIX: &str = "$sha256$";

/// A well-formed stored value no secret has (its "digest" is not hex).
const UNMATCHABLE: &str =
    "$sha256$zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz";

pub fn hash(secret: &str) -> String {
    let mut out = String::with_capacity(PREFIX.len() + 64);
    out.push_str(PREFIX);
    for b in Sha256::digest(secret.as_bytes()) {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Constant-time check of a presented secret against its stored form. With no
/// stored form (unknown or inactive client) it compares against a value nothing
/// matches, at the same cost.
pub fn matches(presented: &str, stored: Option<&str>) -> bool {
    let stored = stored.unwrap_or(UNMATCHABLE);
    let candidate = hash(presented);
    candidate.len() == stored.len() && bool::from(candidate.as_bytes().ct_eq(stored.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_only_the_same_secret() {
        let stored = hash("s3cret");
        assert!(stored.starts_with(PREFIX) && stored.len() == PREFIX.len() + 64);
        assert!(matches("s3cret", Some(&stored)));
        assert!(!matches("s3cret!", Some(&stored)));
        assert!(!matches("s3cret", None));
        assert!(!matches("s3cret", Some("$argon2id$v=19$whatever")));
    }
}
