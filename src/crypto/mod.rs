//! argon2 hashing on its own pool (and imported users' legacy hashes), JWT signing and JWKS, AEAD for credentials,
//! keyed API-key hashes and client-secret digests.

pub mod aead;
pub mod api_key_hash;
pub mod client_secret;
pub mod jwt;
pub mod key_material;
pub mod legacy;
pub mod password;
