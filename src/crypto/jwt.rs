//! Ed25519 (EdDSA) JWTs: signing with a `kid`, the JWKS document (active and
//! previous keys) and strict verification — pinned algorithm, required claims,
//! expected type, and no key material taken from the token's own header.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::Settings;
use crate::crypto::key_material;

/// Clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenType {
    /// A user's access token, bound to a session.
    Access,
    /// A service client's token, carrying scopes.
    Service,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub aud: String,
    pub sub: String,
    pub exp: i64,
    pub iat: i64,
    pub nbf: i64,
    pub jti: String,
    /// The session an access token belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
    pub token_type: TokenType,
    /// Space-separated scopes of a service token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// How the user authenticated (RFC 8176 values, DESIGN §8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amr: Option<Vec<String>>,
    /// When the user last authenticated, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_time: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Well signed, but past `exp` (plus leeway).
    #[error("token expired")]
    Expired,
    /// Anything else: bad signature, algorithm, header, issuer, audience, type.
    #[error("invalid token")]
    Invalid,
}

pub struct JwtKeys {
    signing: EncodingKey,
    kid: String,
    verifying: HashMap<String, DecodingKey>,
    jwks: serde_json::Value,
    issuer: String,
    audience: String,
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Key id: base64url of the first 8 bytes of SHA-256 of the raw public key.
pub fn kid_for(public_key: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(&Sha256::digest(public_key)[..8])
}

fn jwk(public_key: &[u8], kid: &str) -> serde_json::Value {
    serde_json::json!({
        "kty": "OKP",
        "crv": "Ed25519",
        "x": URL_SAFE_NO_PAD.encode(public_key),
        "kid": kid,
        "alg": "EdDSA",
        "use": "sig",
    })
}

impl JwtKeys {
    /// From JWT_PRIVATE_KEY (required: development generates one into
    /// `.secrets/dev.env`) and JWT_PREVIOUS_PUBLIC_KEYS.
    pub fn from_settings(settings: &Settings) -> anyhow::Result<Self> {
        let private_pem = settings
            .jwt_private_key
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("JWT_PRIVATE_KEY is not set"))?;
        let key = key_material::parse_signing_key(private_pem.expose_secret())
            .map_err(|e| anyhow::anyhow!("JWT_PRIVATE_KEY {e}"))?;
        let der = key.pkcs8_der;
        let public = key.public_key;
        let kid = kid_for(&public);

        let mut verifying = HashMap::new();
        let mut keys = vec![jwk(&public, &kid)];
        verifying.insert(kid.clone(), DecodingKey::from_ed_der(&public));
        if let Some(prev) = &settings.jwt_previous_public_keys {
            let previous = key_material::parse_public_keys(prev)
                .map_err(|e| anyhow::anyhow!("JWT_PREVIOUS_PUBLIC_KEYS {e}"))?;
            for raw in &previous {
                let prev_kid = kid_for(raw);
                if verifying.contains_key(&prev_kid) {
                    continue;
                }
                keys.push(jwk(raw, &prev_kid));
                verifying.insert(prev_kid, DecodingKey::from_ed_der(raw));
            }
        }
        Ok(Self {
            signing: EncodingKey::from_ed_der(&der),
            kid,
            verifying,
            jwks: serde_json::json!({ "keys": keys }),
            issuer: settings.jwt_issuer.clone(),
            audience: settings.jwt_audience.clone(),
        })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn jwks(&self) -> &serde_json::Value {
        &self.jwks
    }

    /// Claims for a new token of `token_type` for `sub`, valid for `ttl`.
    pub fn claims(
        &self,
        token_type: TokenType,
        sub: String,
        ttl: Duration,
        sid: Option<String>,
        scope: Option<String>,
    ) -> Claims {
        let now = now_secs();
        Claims {
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            sub,
            exp: now + ttl.as_secs() as i64,
            iat: now,
            nbf: now,
            jti: uuid::Uuid::new_v4().to_string(),
            sid,
            token_type,
            scope,
            amr: None,
            auth_time: None,
        }
    }

    pub fn sign(&self, claims: &Claims) -> anyhow::Result<String> {
        let header = Header {
            typ: Some("JWT".into()),
            kid: Some(self.kid.clone()),
            ..Header::new(Algorithm::EdDSA)
        };
        jsonwebtoken::encode(&header, claims, &self.signing)
            .map_err(|e| anyhow::anyhow!("JWT signing failed: {e}"))
    }

    /// Verifies signature, algorithm, kid, exp/nbf (with leeway), iss, aud and the
    /// token type. A header naming where to fetch a key (jku, x5u, jwk, x5c) is
    /// refused outright: keys come only from our own configuration.
    pub fn verify(&self, token: &str, expected: TokenType) -> Result<Claims, JwtError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| JwtError::Invalid)?;
        if header.alg != Algorithm::EdDSA
            || header.jku.is_some()
            || header.x5u.is_some()
            || header.jwk.is_some()
            || header.x5c.is_some()
        {
            return Err(JwtError::Invalid);
        }
        let key = header
            .kid
            .as_deref()
            .and_then(|kid| self.verifying.get(kid))
            .ok_or(JwtError::Invalid)?;
        let mut v = Validation::new(Algorithm::EdDSA);
        v.leeway = LEEWAY_SECS;
        v.validate_exp = true;
        v.validate_nbf = true;
        v.set_issuer(&[&self.issuer]);
        v.set_audience(&[&self.audience]);
        v.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<Claims>(token, key, &v).map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => JwtError::Expired,
            _ => JwtError::Invalid,
        })?;
        if data.claims.token_type != expected {
            return Err(JwtError::Invalid);
        }
        Ok(data.claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> JwtKeys {
        let vars = [
            ("DATABASE_URL", "postgres://x@localhost/x"),
            ("REDIS_URL", "redis://localhost/0"),
            ("JWT_PRIVATE_KEY", &key_material::generate_signing_key_pem()),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        JwtKeys::from_settings(&Settings::from_vars(vars).unwrap()).unwrap()
    }

    #[test]
    fn round_trip_and_type_is_checked() {
        let k = keys();
        let c = k.claims(
            TokenType::Access,
            "u".into(),
            Duration::from_secs(60),
            Some("s".into()),
            None,
        );
        let t = k.sign(&c).unwrap();
        assert_eq!(k.verify(&t, TokenType::Access).unwrap().sub, "u");
        assert_eq!(
            k.verify(&t, TokenType::Service).unwrap_err(),
            JwtError::Invalid
        );
        assert_eq!(k.jwks()["keys"][0]["kid"], k.kid());
    }

    #[test]
    fn expired_is_told_apart() {
        let k = keys();
        let mut c = k.claims(
            TokenType::Access,
            "u".into(),
            Duration::from_secs(60),
            None,
            None,
        );
        c.exp = now_secs() - 120;
        let t = k.sign(&c).unwrap();
        assert_eq!(
            k.verify(&t, TokenType::Access).unwrap_err(),
            JwtError::Expired
        );
    }
}
