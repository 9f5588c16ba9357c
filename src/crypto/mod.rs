//! argon2 hashing on its own pool, JWT signing and JWKS, AEAD for credentials,
//! keyed API-key hashes and client-secret digests.

pub mod aead;
pub mod api_key_hash;
pub mod client_secret;
pub mod jwt;
pub mod key_material;
pub mod password;
