//! argon2 hashing on the blocking pool, JWT signing and JWKS, AEAD for credentials.

pub mod aead;
pub mod api_key_hash;
pub mod jwt;
pub mod password;
