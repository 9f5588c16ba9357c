//! The API key format `sbk_<dev|stg|prd>_<random><checksum>`: 32 random bytes from
//! the OS CSPRNG in base62, then a CRC32 of everything before it (base62, 6 chars),
//! so a typo, a made-up key or a secret scanner's hit is judged offline.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use rand::rngs::OsRng;
use rand::RngCore;

use crate::config::Environment;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// Fixed literal a secret scanner can match on.
pub const KEY_LITERAL: &str = "sbk_";
/// 32 bytes (256 bits) need 43 base62 digits; always padded to that width.
const RANDOM_LEN: usize = 43;
/// 62^6 > 2^32, so any CRC32 fits in 6 base62 digits.
const CHECKSUM_LEN: usize = 6;
/// `sbk_` + 3-letter environment tag + `_`.
const HEAD_LEN: usize = KEY_LITERAL.len() + 4;
pub const KEY_LEN: usize = HEAD_LEN + RANDOM_LEN + CHECKSUM_LEN;
/// Random characters shown in the displayable prefix: enough to tell keys apart,
/// and what stays hidden (35 base62 chars, ~208 bits) is still far above 128 bits.
const PREFIX_RANDOM_CHARS: usize = 8;

/// Why a presented string is not a usable key of this environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyFormatError {
    /// Not our format, or the checksum does not match: never a real key.
    Malformed,
    /// A well-formed key minted for another environment.
    WrongEnvironment,
}

/// A plaintext API key. Shown to its owner once, at creation; `Debug` hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKeySecret(String);

impl fmt::Debug for ApiKeySecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKeySecret({}…)", self.prefix())
    }
}

impl ApiKeySecret {
    /// A fresh key for `env` from the OS CSPRNG.
    pub fn generate(env: Environment) -> Self {
        let mut bytes = [0u8; 32];
        OsRng.fill_bytes(&mut bytes);
        Self::from_random(env, bytes)
    }

    fn from_random(env: Environment, bytes: [u8; 32]) -> Self {
        let mut s = String::with_capacity(KEY_LEN);
        s.push_str(KEY_LITERAL);
        s.push_str(env.key_tag());
        s.push('_');
        s.push_str(&base62_fixed(&bytes, RANDOM_LEN));
        let crc = crc32fast::hash(s.as_bytes());
        s.push_str(&base62_fixed(&crc.to_be_bytes(), CHECKSUM_LEN));
        Self(s)
    }

    /// Checks the shape and checksum (no storage involved) and that the key belongs
    /// to `env`.
    pub fn parse(presented: &str, env: Environment) -> Result<Self, KeyFormatError> {
        let s = presented.trim();
        if s.len() != KEY_LEN || !s.starts_with(KEY_LITERAL) || !s.is_ascii() {
            return Err(KeyFormatError::Malformed);
        }
        let tag = &s[KEY_LITERAL.len()..KEY_LITERAL.len() + 3];
        let key_env = match tag {
            "dev" => Environment::Development,
            "stg" => Environment::Staging,
            "prd" => Environment::Production,
            _ => return Err(KeyFormatError::Malformed),
        };
        if s.as_bytes()[HEAD_LEN - 1] != b'_'
            || !s[HEAD_LEN..].bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return Err(KeyFormatError::Malformed);
        }
        let (body, checksum) = s.split_at(KEY_LEN - CHECKSUM_LEN);
        let crc = crc32fast::hash(body.as_bytes());
        if base62_fixed(&crc.to_be_bytes(), CHECKSUM_LEN) != checksum {
            return Err(KeyFormatError::Malformed);
        }
        if key_env != env {
            return Err(KeyFormatError::WrongEnvironment);
        }
        Ok(Self(s.to_string()))
    }

    /// The displayable start of the key (`sbk_dev_` + 8 characters), stored in
    /// clear so owners can tell keys apart; the key starts with it.
    pub fn prefix(&self) -> &str {
        &self.0[..HEAD_LEN + PREFIX_RANDOM_CHARS]
    }

    /// The plaintext, for the one response that returns it and for hashing.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// `bytes` as a big-endian number in base62, left-padded with '0' to `width`.
fn base62_fixed(bytes: &[u8], width: usize) -> String {
    let mut num = bytes.to_vec();
    let mut digits = Vec::with_capacity(width);
    while num.iter().any(|&b| b != 0) {
        let mut rem: u32 = 0;
        for b in num.iter_mut() {
            let acc = (rem << 8) | u32::from(*b);
            *b = (acc / 62) as u8;
            rem = acc % 62;
        }
        digits.push(BASE62[rem as usize]);
    }
    while digits.len() < width {
        digits.push(b'0');
    }
    digits.reverse();
    String::from_utf8(digits).expect("base62 is ASCII")
}

/// Why a key stopped working before its expiry, as `api_keys.revoked_reason`
/// records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevocationReason {
    /// Its owner revoked it.
    Revoked,
    /// Its owner rotated it: a new key with the same grant replaced it.
    Rotated,
}

impl RevocationReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RevocationReason::Revoked => "revoked",
            RevocationReason::Rotated => "rotated",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [RevocationReason::Revoked, RevocationReason::Rotated]
            .into_iter()
            .find(|r| r.as_str() == s)
    }
}

/// Largest CIDR list a key may carry.
pub const MAX_ALLOWED_IPS: usize = 100;

/// One allow-list entry: an address (a /32 or /128) or a CIDR, IPv4 or IPv6.
pub fn parse_allowed_ip(s: &str) -> Option<IpNet> {
    let s = s.trim();
    if let Ok(net) = s.parse::<IpNet>() {
        // "10.1.2.3/8" is almost certainly a mistake; store the network it names.
        return Some(net.trunc());
    }
    s.parse::<IpAddr>().ok().map(IpNet::from)
}

/// True when the key has no allow-list or `ip` falls in one of its networks.
/// An IPv4-mapped IPv6 address is judged as the IPv4 address it carries.
pub fn ip_allowed(allowed: &[IpNet], ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    allowed.is_empty() || allowed.iter().any(|net| net.contains(&ip))
}

/// Key names: 1 to 100 characters, no control characters.
pub fn valid_key_name(name: &str) -> bool {
    let n = name.trim().chars().count();
    (1..=100).contains(&n) && !name.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocation_reasons_round_trip_as_stored() {
        for r in [RevocationReason::Revoked, RevocationReason::Rotated] {
            assert_eq!(RevocationReason::parse(r.as_str()), Some(r));
        }
        assert_eq!(RevocationReason::parse("expired"), None);
    }

    const ENVS: [Environment; 3] = [
        Environment::Development,
        Environment::Staging,
        Environment::Production,
    ];

    #[test]
    fn generated_keys_have_the_documented_shape_and_parse() {
        for env in ENVS {
            for _ in 0..200 {
                let k = ApiKeySecret::generate(env);
                let s = k.expose();
                assert_eq!(s.len(), KEY_LEN);
                assert!(s.starts_with(&format!("sbk_{}_", env.key_tag())));
                assert!(s.starts_with(k.prefix()));
                assert_eq!(k.prefix().len(), 16);
                assert_eq!(ApiKeySecret::parse(s, env), Ok(k.clone()));
            }
        }
    }

    #[test]
    fn extreme_random_values_keep_the_fixed_width() {
        for bytes in [[0u8; 32], [0xff; 32], [1; 32]] {
            let k = ApiKeySecret::from_random(Environment::Development, bytes);
            assert_eq!(k.expose().len(), KEY_LEN);
            assert!(ApiKeySecret::parse(k.expose(), Environment::Development).is_ok());
        }
        // 2^256 - 1 needs all 43 digits: the width is not padding a shorter number.
        assert_eq!(base62_fixed(&[0xff; 32], RANDOM_LEN).len(), RANDOM_LEN);
        assert_ne!(&base62_fixed(&[0xff; 32], RANDOM_LEN)[..1], "0");
    }

    #[test]
    fn any_single_character_change_is_malformed() {
        let k = ApiKeySecret::generate(Environment::Production);
        let s = k.expose().as_bytes().to_vec();
        // Every position after the literal, every base62 replacement.
        for i in HEAD_LEN..s.len() {
            for &c in BASE62.iter() {
                if c == s[i] {
                    continue;
                }
                let mut t = s.clone();
                t[i] = c;
                let t = String::from_utf8(t).unwrap();
                assert_eq!(
                    ApiKeySecret::parse(&t, Environment::Production),
                    Err(KeyFormatError::Malformed),
                    "{t}"
                );
            }
        }
    }

    #[test]
    fn a_key_of_another_environment_is_wrong_environment() {
        let dev = ApiKeySecret::generate(Environment::Development);
        assert_eq!(
            ApiKeySecret::parse(dev.expose(), Environment::Production),
            Err(KeyFormatError::WrongEnvironment)
        );
        assert_eq!(
            ApiKeySecret::parse(dev.expose(), Environment::Staging),
            Err(KeyFormatError::WrongEnvironment)
        );
        // Swapping the tag without knowing the checksum does not help.
        let forged = dev.expose().replacen("sbk_dev_", "sbk_prd_", 1);
        assert_eq!(
            ApiKeySecret::parse(&forged, Environment::Production),
            Err(KeyFormatError::Malformed)
        );
    }

    #[test]
    fn garbage_is_malformed() {
        let env = Environment::Development;
        let good = ApiKeySecret::generate(env);
        for s in [
            "",
            "sbk_dev_",
            "hello",
            &"a".repeat(KEY_LEN),
            &good.expose()[..KEY_LEN - 1],
            &format!("{}x", good.expose()),
            &good.expose().replacen("sbk_", "sbx_", 1),
            &good.expose().replacen("sbk_dev_", "sbk_xyz_", 1),
            &good.expose().replacen("sbk_dev_", "sbk_dev-", 1),
        ] {
            assert_eq!(
                ApiKeySecret::parse(s, env),
                Err(KeyFormatError::Malformed),
                "{s}"
            );
        }
        // Non-ASCII of the right byte length must not panic on a char boundary.
        let mut t = good.expose()[..KEY_LEN - 2].to_string();
        t.push('é');
        assert_eq!(ApiKeySecret::parse(&t, env), Err(KeyFormatError::Malformed));
    }

    #[test]
    fn random_made_up_keys_are_rejected_offline() {
        let mut misses = 0;
        for _ in 0..10_000 {
            let mut bytes = [0u8; 49];
            OsRng.fill_bytes(&mut bytes);
            let body: String = bytes
                .iter()
                .map(|b| BASE62[(*b as usize) % 62] as char)
                .collect();
            let s = format!("sbk_dev_{body}");
            if ApiKeySecret::parse(&s, Environment::Development).is_err() {
                misses += 1;
            }
        }
        assert_eq!(misses, 10_000);
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let k = ApiKeySecret::generate(Environment::Development);
        let d = format!("{k:?}");
        assert!(!d.contains(&k.expose()[HEAD_LEN + PREFIX_RANDOM_CHARS..]));
    }

    #[test]
    fn allow_list_entries_and_matching() {
        let nets: Vec<IpNet> = ["10.0.0.0/8", "203.0.113.7", "2001:db8::/32", "::1"]
            .iter()
            .map(|s| parse_allowed_ip(s).unwrap())
            .collect();
        assert!(ip_allowed(&nets, "10.9.8.7".parse().unwrap()));
        assert!(ip_allowed(&nets, "203.0.113.7".parse().unwrap()));
        assert!(!ip_allowed(&nets, "203.0.113.8".parse().unwrap()));
        assert!(ip_allowed(&nets, "2001:db8:1::5".parse().unwrap()));
        assert!(!ip_allowed(&nets, "2001:db9::1".parse().unwrap()));
        assert!(ip_allowed(&nets, "::ffff:10.1.1.1".parse().unwrap()));
        assert!(ip_allowed(&[], "192.0.2.1".parse().unwrap()));
        assert_eq!(
            parse_allowed_ip("10.1.2.3/8").unwrap().to_string(),
            "10.0.0.0/8"
        );
        for bad in ["", "10.0.0.0/33", "not-an-ip", "10.0.0", "::/129"] {
            assert!(parse_allowed_ip(bad).is_none(), "{bad}");
        }
    }
}
