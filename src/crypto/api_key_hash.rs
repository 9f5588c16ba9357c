//! The stored form of an API key: HMAC-SHA-256 under API_KEY_HASH_SECRET.

use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::domain::api_key::ApiKeySecret;

/// Why keyed rather than a plain SHA-256: the keys have 256 bits of entropy, so
/// neither resists brute force better; what the key buys is that a leaked
/// `api_keys` table (a backup, a replica, an SQL injection) is not enough to
/// confirm a candidate key offline — say one found in a log or a repository —
/// nor to match leaked keys to users. The attacker also needs the server-side
/// secret, which lives outside the database.
#[derive(Clone)]
pub struct ApiKeyHasher {
    mac: Hmac<Sha256>,
}

impl ApiKeyHasher {
    /// Without a secret (only settings built by hand: loading always has one, and
    /// check-config refuses its absence) a random one for this process, never a
    /// constant anyone could know.
    pub fn new(secret: Option<&SecretString>) -> Self {
        let secret = secret
            .map(|s| s.expose_secret().as_bytes().to_vec())
            .unwrap_or_else(|| crate::crypto::key_material::generate_hash_secret().into_bytes());
        Self {
            mac: Hmac::<Sha256>::new_from_slice(&secret).expect("HMAC accepts any key length"),
        }
    }

    /// 32 bytes, the lookup value of `api_keys.key_hash`.
    pub fn hash(&self, key: &ApiKeySecret) -> [u8; 32] {
        let mut mac = self.mac.clone();
        mac.update(key.expose().as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// Constant-time equality, so a lookup hit on an index is still confirmed
    /// without a timing side channel.
    pub fn matches(a: &[u8], b: &[u8]) -> bool {
        a.ct_eq(b).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Environment;

    #[test]
    fn hash_depends_on_the_secret_and_the_key() {
        let a = ApiKeyHasher::new(Some(&SecretString::from("secret-a".to_string())));
        let b = ApiKeyHasher::new(Some(&SecretString::from("secret-b".to_string())));
        let k1 = ApiKeySecret::generate(Environment::Development);
        let k2 = ApiKeySecret::generate(Environment::Development);
        assert_eq!(a.hash(&k1), a.hash(&k1));
        assert_ne!(a.hash(&k1), b.hash(&k1));
        assert_ne!(a.hash(&k1), a.hash(&k2));
        assert!(ApiKeyHasher::matches(&a.hash(&k1), &a.hash(&k1)));
        assert!(!ApiKeyHasher::matches(&a.hash(&k1), &a.hash(&k2)));
        assert!(!ApiKeyHasher::matches(&a.hash(&k1), &a.hash(&k1)[..31]));
    }
}
