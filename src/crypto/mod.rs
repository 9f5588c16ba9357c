//! argon2 hashing on the blocking pool, JWT signing and JWKS, AEAD for credentials.
