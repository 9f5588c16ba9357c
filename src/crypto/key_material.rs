//! Key material as the settings carry it: the PEM signing key, the previous public
//! keys and the credentials key ring parsed into their bytes; fingerprints of those
//! bytes, which is how development material is recognised whatever its text (PEM
//! layout, `kid` label, base64 padding); and generation of development keys.

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{Ed25519KeyPair, KeyPair};
use sha2::{Digest, Sha256};

/// SHA-256 of a key's bytes: the raw public key of a signing key pair, the 32 raw
/// bytes of an encryption key, the (trimmed) bytes of the hash secret.
pub type Fingerprint = [u8; 32];

pub fn fingerprint(bytes: &[u8]) -> Fingerprint {
    Sha256::digest(bytes).into()
}

/// Key material that was once committed to this repository (development values and
/// test constants, recovered from its history), by fingerprint only: staging and
/// production refuse any of them, whatever their formatting. Never add the key
/// text here, only `fingerprint(bytes)` in hex.
const COMMITTED_KEY_FINGERPRINTS: [&str; 10] = [
    // Ed25519 public keys of the committed signing keys (.env.dev and src/config.rs;
    // the staging/production test key of tests/api/config.rs).
    "77aa67040ac408426dfdde2129ee332aca530bf5bf07184818111065be3bea87",
    "242264efcf832e76aac48de42c518f7bcb464f33a7f34bf088e126a2541e9a28",
    // AES-256 keys: .env.dev's dev-2025, and the tests' zeros, ones and "new".
    "4e0ae26a719c2fa76540a0baeec438d7dab8a8f0aeebe716587b9f1c4011cab8",
    "66687aadf862bd776c8fc18b8e9f8e20089714856ee233b3902a591d0d5f2925",
    "72cd6e8422c407fb6d098690f1130b7ded7ec2f7f5e1d30bd9d521f015363793",
    "85c5758aeabde68618e9fe140d6b8e130b82bfc1e207eb71477663e0cec8b562",
    // API-key hash secrets: .env.dev's, the old built-in fallback, the tests'.
    "3738cf2040209bdf4983699f478687be1291e3504291d10019d8b67e29a461dc",
    "c71d26e1ab17f80daa5a26bbbee7e9bdf1f12aee82ac8c935b23e7e8ee8b9387",
    "e569806d2d520d4916ae454fb130bc0d65ef5c7ac8cf308e01d359d5068fa089",
    "c45c6a8658a3df02c620c06435b881cd8af27a26abd3a176739f77304442d5df",
];

/// Whether this fingerprint belongs to key material once committed to the repository.
pub fn was_committed(fp: &Fingerprint) -> bool {
    let hex = hex_lower(fp);
    COMMITTED_KEY_FINGERPRINTS.contains(&hex.as_str())
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// DER prefix of an Ed25519 SubjectPublicKeyInfo; the raw 32-byte key follows.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// The base64 body of every `-----BEGIN <label>-----` block in `text`. A value
/// passed through a process variable may carry literal `\n`; any whitespace or
/// line length inside a block is accepted.
pub fn pem_blocks(text: &str, label: &str) -> Result<Vec<Vec<u8>>, String> {
    let text = text.replace("\\n", "\n");
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut out = Vec::new();
    let mut rest = text.as_str();
    while let Some(start) = rest.find(&begin) {
        let after = &rest[start + begin.len()..];
        let stop = after
            .find(&end)
            .ok_or_else(|| format!("unterminated PEM block {label}"))?;
        let b64: String = after[..stop]
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        out.push(decode_base64(&b64).ok_or_else(|| format!("PEM block {label} is not base64"))?);
        rest = &after[stop + end.len()..];
    }
    Ok(out)
}

/// Standard or URL-safe base64, padded or not: the same bytes however written.
pub fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|e| e.decode(s).ok())
}

/// An Ed25519 signing key from PEM (PKCS#8 v1 or v2): its DER and raw public key.
pub struct SigningKey {
    pub pkcs8_der: Vec<u8>,
    pub public_key: Vec<u8>,
}

pub fn parse_signing_key(pem: &str) -> Result<SigningKey, String> {
    let der = pem_blocks(pem, "PRIVATE KEY")?
        .into_iter()
        .next()
        .ok_or("holds no PEM private key")?;
    let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
        .map_err(|_| "is not an Ed25519 PKCS#8 key")?;
    Ok(SigningKey {
        public_key: pair.public_key().as_ref().to_vec(),
        pkcs8_der: der,
    })
}

/// The raw 32-byte Ed25519 keys of every `PUBLIC KEY` PEM block in `pems`.
pub fn parse_public_keys(pems: &str) -> Result<Vec<Vec<u8>>, String> {
    pem_blocks(pems, "PUBLIC KEY")?
        .into_iter()
        .map(|spki| {
            spki.strip_prefix(&ED25519_SPKI_PREFIX[..])
                .filter(|k| k.len() == 32)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| "holds a key that is not Ed25519".to_string())
        })
        .collect()
}

/// `kid:base64key,…` into (kid, 32 raw bytes), in order, ids distinct. Errors never
/// echo key material.
pub fn parse_key_ring(spec: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut keys: Vec<(String, Vec<u8>)> = Vec::new();
    for (i, entry) in spec.split(',').enumerate() {
        let entry = entry.trim();
        if entry.is_empty() {
            continue;
        }
        let (kid, b64) = entry
            .split_once(':')
            .ok_or_else(|| format!("entry {} is not kid:base64key", i + 1))?;
        let kid = kid.trim();
        let valid_kid = !kid.is_empty()
            && kid.len() <= 64
            && kid
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !valid_kid {
            return Err(format!("entry {} has an invalid key id", i + 1));
        }
        let raw = decode_base64(b64).ok_or_else(|| format!("key {kid:?} is not base64"))?;
        if raw.len() != 32 {
            return Err(format!("key {kid:?} is not 32 bytes"));
        }
        if keys.iter().any(|(k, _)| k == kid) {
            return Err(format!("key id {kid:?} appears twice"));
        }
        keys.push((kid.to_string(), raw));
    }
    if keys.is_empty() {
        return Err("no keys".into());
    }
    Ok(keys)
}

/// The fingerprint of an API-key hash secret: its bytes, surrounding whitespace
/// ignored.
pub fn secret_fingerprint(secret: &str) -> Fingerprint {
    fingerprint(secret.trim().as_bytes())
}

/// Every fingerprint of the key material in these settings values (signing key,
/// previous public keys, key ring, hash secret); unparsable values are skipped.
pub fn fingerprints_of(
    jwt_private_key: Option<&str>,
    previous_public_keys: Option<&str>,
    encryption_keys: Option<&str>,
    hash_secret: Option<&str>,
) -> Vec<Fingerprint> {
    let mut out = Vec::new();
    if let Some(k) = jwt_private_key.and_then(|k| parse_signing_key(k).ok()) {
        out.push(fingerprint(&k.public_key));
    }
    if let Some(keys) = previous_public_keys.and_then(|k| parse_public_keys(k).ok()) {
        out.extend(keys.iter().map(|k| fingerprint(k)));
    }
    if let Some(ring) = encryption_keys.and_then(|k| parse_key_ring(k).ok()) {
        out.extend(ring.iter().map(|(_, k)| fingerprint(k)));
    }
    if let Some(s) = hash_secret {
        out.push(secret_fingerprint(s));
    }
    out
}

/// A fresh Ed25519 signing key as PKCS#8 PEM (64-character lines).
pub fn generate_signing_key_pem() -> String {
    let rng = SystemRandom::new();
    let der = Ed25519KeyPair::generate_pkcs8(&rng).expect("the system RNG works");
    let b64 = STANDARD.encode(der.as_ref());
    let body: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).expect("base64 is ASCII"))
        .collect();
    format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----",
        body.join("\n")
    )
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    SystemRandom::new()
        .fill(&mut b)
        .expect("the system RNG works");
    b
}

/// A fresh one-key ring `kid:base64key`.
pub fn generate_key_ring(kid: &str) -> String {
    format!("{kid}:{}", STANDARD.encode(random_bytes::<32>()))
}

/// A fresh 256-bit hash secret, hex.
pub fn generate_hash_secret() -> String {
    hex_lower(&random_bytes::<32>())
}

/// Fresh values for every key setting left unset, by variable name; the key
/// ring's id is `dev-<date>`.
pub fn generate(name: &str) -> Option<String> {
    match name {
        "JWT_PRIVATE_KEY" => Some(generate_signing_key_pem()),
        "CREDENTIALS_ENCRYPTION_KEYS" => Some(generate_key_ring(&format!(
            "dev-{}",
            chrono::Utc::now().format("%Y%m%d")
        ))),
        "API_KEY_HASH_SECRET" => Some(generate_hash_secret()),
        _ => None,
    }
}

/// The key settings development generates when they are left unset.
pub const GENERATED_IN_DEVELOPMENT: [&str; 3] = [
    "JWT_PRIVATE_KEY",
    "CREDENTIALS_ENCRYPTION_KEYS",
    "API_KEY_HASH_SECRET",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_differ() {
        let a = parse_signing_key(&generate_signing_key_pem()).unwrap();
        let b = parse_signing_key(&generate_signing_key_pem()).unwrap();
        assert_eq!(a.public_key.len(), 32);
        assert_ne!(a.public_key, b.public_key);
        let ring = parse_key_ring(&generate_key_ring("k")).unwrap();
        assert_eq!(ring[0].1.len(), 32);
        assert_eq!(generate_hash_secret().len(), 64);
    }

    #[test]
    fn the_same_bytes_have_one_fingerprint_however_written() {
        let bytes = random_bytes::<32>();
        let spellings = [
            format!("a:{}", STANDARD.encode(bytes)),
            format!("other-label : {}", STANDARD_NO_PAD.encode(bytes)),
            format!("x:{}", URL_SAFE_NO_PAD.encode(bytes)),
        ];
        let fps: Vec<Fingerprint> = spellings
            .iter()
            .map(|s| fingerprint(&parse_key_ring(s).unwrap()[0].1))
            .collect();
        assert!(fps.iter().all(|f| *f == fingerprint(&bytes)));
    }

    #[test]
    fn committed_fingerprints_are_well_formed_and_distinct() {
        let mut seen = std::collections::HashSet::new();
        for f in COMMITTED_KEY_FINGERPRINTS {
            assert_eq!(f.len(), 64, "{f}");
            assert!(f.chars().all(|c| c.is_ascii_hexdigit()), "{f}");
            assert!(seen.insert(f), "{f} twice");
        }
    }
}
