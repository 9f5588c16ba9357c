//! Password hashes users bring from the FastAPI user_service (`admin import-users`):
//! bcrypt (`$2a$`, `$2b$`, `$2y$`), argon2 (`$argon2id$`, `$argon2i$`) and passlib's
//! `$pbkdf2-sha256$`. They are checked when imported and verified at login on the
//! hashing pool (crypto/password.rs), until that login replaces them with a current
//! argon2id hash.

use argon2::password_hash::PasswordHash;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use subtle::ConstantTimeEq as _;

/// One verification must stay affordable on the shared pool (a login flood of
/// imported users must not starve everyone else's logins), yet accept what passlib
/// and its users configure: bcrypt's default cost is 12, pbkdf2-sha256's 29 000
/// rounds (OWASP now says 600 000), argon2's 64 MiB, t=3, p=4.
const BCRYPT_MAX_COST: u32 = 14;
const PBKDF2_MAX_ROUNDS: u32 = 2_000_000;
const ARGON2_MAX_M_COST_KIB: u32 = 256 * 1024;
const ARGON2_MAX_T_COST: u32 = 16;
const ARGON2_MAX_P_COST: u32 = 16;

/// The kinds of hash an import accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Bcrypt,
    Argon2,
    Pbkdf2Sha256,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bcrypt => "bcrypt",
            Self::Argon2 => "argon2",
            Self::Pbkdf2Sha256 => "pbkdf2-sha256",
        }
    }
}

/// Whether `hash` is one this service can verify, within the cost bounds above. The
/// error says what is wrong without quoting the hash.
pub fn check(hash: &str) -> Result<Scheme, String> {
    if let Some(rest) = bcrypt_body(hash) {
        let (cost, body) = rest.split_once('$').ok_or("malformed bcrypt hash")?;
        // Always two digits: `$2b$04$`, `$2b$12$`.
        let cost: u32 = (cost.len() == 2 && cost.bytes().all(|b| b.is_ascii_digit()))
            .then(|| cost.parse().ok())
            .flatten()
            .ok_or("malformed bcrypt cost")?;
        if !(4..=BCRYPT_MAX_COST).contains(&cost) {
            return Err(format!(
                "bcrypt cost must be between 4 and {BCRYPT_MAX_COST}"
            ));
        }
        // 22 characters of salt and 31 of hash, in bcrypt's own base64 alphabet.
        if body.len() != 53
            || !body
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'/')
        {
            return Err("malformed bcrypt hash".into());
        }
        return Ok(Scheme::Bcrypt);
    }
    if hash.starts_with("$argon2id$") || hash.starts_with("$argon2i$") {
        let parsed = PasswordHash::new(hash).map_err(|_| "malformed argon2 hash")?;
        let params = argon2::Params::try_from(&parsed).map_err(|_| "invalid argon2 parameters")?;
        if parsed.salt.is_none() || parsed.hash.is_none() {
            return Err("malformed argon2 hash".into());
        }
        if params.m_cost() > ARGON2_MAX_M_COST_KIB
            || params.t_cost() > ARGON2_MAX_T_COST
            || params.p_cost() > ARGON2_MAX_P_COST
        {
            return Err(format!(
                "argon2 parameters must be at most m={ARGON2_MAX_M_COST_KIB}, \
                 t={ARGON2_MAX_T_COST}, p={ARGON2_MAX_P_COST}"
            ));
        }
        return Ok(Scheme::Argon2);
    }
    if hash.starts_with("$pbkdf2-sha256$") {
        let p = Pbkdf2::parse(hash)?;
        if !(1..=PBKDF2_MAX_ROUNDS).contains(&p.rounds) {
            return Err(format!(
                "pbkdf2-sha256 rounds must be between 1 and {PBKDF2_MAX_ROUNDS}"
            ));
        }
        return Ok(Scheme::Pbkdf2Sha256);
    }
    Err(
        "unsupported hash: expected bcrypt ($2a$, $2b$, $2y$), argon2 ($argon2id$, \
         $argon2i$) or passlib's $pbkdf2-sha256$"
            .into(),
    )
}

/// Verifies `password` against a bcrypt or pbkdf2-sha256 hash: Some(matches).
/// None for any other hash (argon2 ones are crypto/password.rs's). Blocks for the
/// whole computation: call it on the hashing pool.
pub fn verify(password: &[u8], hash: &str) -> Option<bool> {
    if bcrypt_body(hash).is_some() {
        // bcrypt uses the first 72 bytes of a password, as the hash's origin did
        // (passlib, PHP): the same password must open it here.
        return Some(bcrypt::verify(password, hash).unwrap_or(false));
    }
    if hash.starts_with("$pbkdf2-sha256$") {
        return Some(Pbkdf2::parse(hash).is_ok_and(|p| p.matches(password)));
    }
    None
}

/// What follows `$2a$`, `$2b$` or `$2y$` (never `$2x$`, the buggy variant's tag).
fn bcrypt_body(hash: &str) -> Option<&str> {
    ["$2a$", "$2b$", "$2y$"]
        .iter()
        .find_map(|prefix| hash.strip_prefix(prefix))
}

/// Digits only, no sign, no leading zero.
fn parse_decimal(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return None;
    }
    s.parse().ok()
}

/// passlib's pbkdf2_sha256: `$pbkdf2-sha256$<rounds>$<salt>$<checksum>`, salt and
/// checksum in passlib's "adapted base64" (the standard alphabet with `.` for `+`,
/// no padding). The salt is used as the decoded bytes; the checksum is the 32-byte
/// PBKDF2-HMAC-SHA256 of the password's UTF-8 bytes.
struct Pbkdf2 {
    rounds: u32,
    salt: Vec<u8>,
    checksum: Vec<u8>,
}

impl Pbkdf2 {
    fn parse(hash: &str) -> Result<Self, String> {
        let rest = hash
            .strip_prefix("$pbkdf2-sha256$")
            .ok_or("not a pbkdf2-sha256 hash")?;
        let mut parts = rest.split('$');
        let (Some(rounds), Some(salt), Some(checksum), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("malformed pbkdf2-sha256 hash".into());
        };
        let rounds = parse_decimal(rounds).ok_or("malformed pbkdf2-sha256 rounds")?;
        let salt = ab64_decode(salt).ok_or("malformed pbkdf2-sha256 salt")?;
        let checksum = ab64_decode(checksum).ok_or("malformed pbkdf2-sha256 checksum")?;
        if checksum.len() != 32 {
            return Err("malformed pbkdf2-sha256 checksum".into());
        }
        Ok(Self {
            rounds,
            salt,
            checksum,
        })
    }

    fn matches(&self, password: &[u8]) -> bool {
        let mut derived = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<sha2::Sha256>(password, &self.salt, self.rounds, &mut derived);
        derived.ct_eq(&self.checksum).into()
    }
}

/// passlib's `ab64_decode`: `.` stands for `+`; padding optional. Lenient about
/// unused trailing bits, as Python's decoder is.
fn ab64_decode(s: &str) -> Option<Vec<u8>> {
    const AB64: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new()
            .with_decode_padding_mode(DecodePaddingMode::Indifferent)
            .with_decode_allow_trailing_bits(true),
    );
    if s.contains('+') {
        return None;
    }
    AB64.decode(s.replace('.', "+")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Made by passlib 1.7.4: `pbkdf2_sha256.using(salt=bytes([0xfb, 2] + [7] * 14)).hash("password")`,
    /// a `.` in both salt and checksum.
    const PASSLIB_PBKDF2: &str =
        "$pbkdf2-sha256$29000$.wIHBwcHBwcHBwcHBwcHBw$nvAdo9.kXrXJ.Q87xAajjNNoqHLhEEhWuGmjTQAvKn4";

    #[test]
    fn verifies_passlib_pbkdf2_sha256() {
        assert_eq!(check(PASSLIB_PBKDF2), Ok(Scheme::Pbkdf2Sha256));
        assert_eq!(verify(b"password", PASSLIB_PBKDF2), Some(true));
        assert_eq!(verify(b"Password", PASSLIB_PBKDF2), Some(false));
        // The `.` is passlib's `+`: read as anything else, the checksum differs.
        let standard = PASSLIB_PBKDF2.replace('.', "+");
        assert!(check(&standard).is_err());
    }

    #[test]
    fn verifies_bcrypt_under_each_accepted_tag() {
        let hash = bcrypt::hash_with_salt("pässword", 4, [7u8; 16])
            .unwrap()
            .format_for_version(bcrypt::Version::TwoB);
        for tag in ["$2a$", "$2b$", "$2y$"] {
            let h = format!("{tag}{}", &hash[4..]);
            assert_eq!(check(&h), Ok(Scheme::Bcrypt), "{tag}");
            assert_eq!(verify("pässword".as_bytes(), &h), Some(true), "{tag}");
            assert_eq!(verify(b"password", &h), Some(false), "{tag}");
        }
        let x = format!("$2x${}", &hash[4..]);
        assert!(check(&x).is_err());
        assert_eq!(verify(b"password", &x), None);
    }

    #[test]
    fn refuses_what_it_cannot_verify_or_afford_without_quoting_it() {
        let too_costly = "$2b$15$abcdefghijklmnopqrstuuabcdefghijklmnopqrstuvwxyz01234";
        for (hash, says) in [
            ("$1$saltsalt$hash", "unsupported"),
            ("plain text", "unsupported"),
            (
                "$argon2d$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaA",
                "unsupported",
            ),
            ("$2b$10$short", "malformed"),
            (too_costly, "cost"),
            (
                "$2b$010$abcdefghijklmnopqrstuuabcdefghijklmnopqrstuvwxyz01234",
                "cost",
            ),
            ("$pbkdf2-sha256$29000$c2FsdA$c2hvcnQ", "checksum"),
            (
                "$pbkdf2-sha256$0$c2FsdA$Y.RDnnq8vsezSZSKy1QNy6xhKPdoBIwc.0XDdRm9sJ8",
                "rounds",
            ),
            ("$pbkdf2-sha256$29000$c2FsdA", "malformed"),
            (
                "$argon2id$v=19$m=1048576,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
                "at most",
            ),
            ("$argon2id$garbage", "argon2"),
        ] {
            let err = check(hash).unwrap_err();
            assert!(err.contains(says), "{hash}: {err}");
            assert!(!err.contains(hash), "{err}");
        }
    }

    #[test]
    fn argon2_hashes_are_left_to_the_argon2_path() {
        let h = "$argon2i$v=19$m=65536,t=3,p=4$EWJMyXlPKSWEMOZcS+m9dw$iFfpLV2L6RE62cFc2P34Bf/RO69uJ0PyEuJOFxtP5jM";
        assert_eq!(check(h), Ok(Scheme::Argon2));
        assert_eq!(verify(b"x", h), None);
    }
}
