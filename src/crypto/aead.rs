//! AES-256-GCM for broker credentials under a key ring (`kid:base64key,…`, the first
//! is active). Each value is sealed with a fresh 96-bit nonce and stored as
//! nonce || ciphertext || tag; the associated data binds it to its row and field.

use std::fmt;

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use secrecy::{ExposeSecret, SecretString};

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AeadError {
    #[error("CREDENTIALS_ENCRYPTION_KEYS: {0}")]
    BadKeyRing(String),
    /// The value names a key the ring no longer holds.
    #[error("credentials are sealed with key {0:?}, which is not configured")]
    UnknownKey(String),
    /// Wrong key, wrong row or field, or altered bytes: the tag does not verify.
    #[error("credentials ciphertext failed authentication")]
    Tampered,
    #[error("encryption failed")]
    Seal,
}

/// The configured keys; the first is the one new values are sealed with.
pub struct KeyRing {
    keys: Vec<(String, Aes256Gcm)>,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field(
                "key_ids",
                &self.keys.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl KeyRing {
    /// Parses `kid:base64key,…` (32-byte keys, distinct ids). Errors never echo
    /// key material.
    pub fn parse(spec: &SecretString) -> Result<Self, AeadError> {
        let keys = crate::crypto::key_material::parse_key_ring(spec.expose_secret())
            .map_err(AeadError::BadKeyRing)?
            .into_iter()
            .map(|(kid, raw)| {
                let cipher = Aes256Gcm::new_from_slice(&raw)
                    .map_err(|_| AeadError::BadKeyRing(format!("key {kid:?} is not 32 bytes")))?;
                Ok((kid, cipher))
            })
            .collect::<Result<Vec<_>, AeadError>>()?;
        Ok(Self { keys })
    }

    pub fn active_kid(&self) -> &str {
        &self.keys[0].0
    }

    pub fn has_key(&self, kid: &str) -> bool {
        self.keys.iter().any(|(k, _)| k == kid)
    }

    /// Seals under the active key with a fresh random nonce.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, AeadError> {
        let cipher = &self.keys[0].1;
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let ct = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .map_err(|_| AeadError::Seal)?;
        let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Opens a value sealed under `kid`; fails closed on any mismatch.
    pub fn open(&self, kid: &str, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, AeadError> {
        let (_, cipher) = self
            .keys
            .iter()
            .find(|(k, _)| k == kid)
            .ok_or_else(|| AeadError::UnknownKey(kid.to_string()))?;
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return Err(AeadError::Tampered);
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad })
            .map_err(|_| AeadError::Tampered)
    }
}

/// The associated data of one credential field of one account: a ciphertext
/// copied to another row or another column no longer opens.
pub fn credential_aad(account_id: uuid::Uuid, field: &str) -> Vec<u8> {
    format!("stocksblitz.trading_account.v1:{account_id}:{field}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(spec: &str) -> KeyRing {
        KeyRing::parse(&SecretString::from(spec.to_string())).unwrap()
    }

    const K1: &str = "a:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    const K2: &str = "b:AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";

    #[test]
    fn round_trip_with_fresh_nonces() {
        let r = ring(K1);
        let aad = credential_aad(uuid::Uuid::nil(), "api_key");
        let one = r.seal(&aad, b"secret").unwrap();
        let two = r.seal(&aad, b"secret").unwrap();
        assert_ne!(one, two);
        assert_eq!(one.len(), NONCE_LEN + 6 + TAG_LEN);
        assert_eq!(r.open("a", &aad, &one).unwrap(), b"secret");
    }

    #[test]
    fn fails_closed() {
        let r = ring(K1);
        let id = uuid::Uuid::new_v4();
        let aad = credential_aad(id, "api_key");
        let mut ct = r.seal(&aad, b"secret").unwrap();
        // Another row, another field, an unknown key, a flipped byte, truncation.
        assert_eq!(
            r.open("a", &credential_aad(uuid::Uuid::new_v4(), "api_key"), &ct),
            Err(AeadError::Tampered)
        );
        assert_eq!(
            r.open("a", &credential_aad(id, "api_secret"), &ct),
            Err(AeadError::Tampered)
        );
        assert_eq!(
            r.open("zz", &aad, &ct),
            Err(AeadError::UnknownKey("zz".into()))
        );
        assert_eq!(r.open("a", &aad, &ct[..10]), Err(AeadError::Tampered));
        ct[NONCE_LEN + 1] ^= 1;
        assert_eq!(r.open("a", &aad, &ct), Err(AeadError::Tampered));
    }

    #[test]
    fn first_key_is_active_and_old_keys_still_open() {
        let old = ring(K1);
        let aad = b"x";
        let ct = old.seal(aad, b"v").unwrap();
        let both = ring(&format!("{K2},{K1}"));
        assert_eq!(both.active_kid(), "b");
        assert_eq!(both.open("a", aad, &ct).unwrap(), b"v");
    }

    #[test]
    fn bad_rings_are_refused_without_echoing_keys() {
        for bad in ["", "nokid", "a:!!!", "a:AAAA", &format!("{K1},{K1}")] {
            let e = KeyRing::parse(&SecretString::from(bad.to_string())).unwrap_err();
            assert!(!e.to_string().contains("AAAAAAAA"), "{e}");
        }
    }
}
