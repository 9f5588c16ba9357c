//! Issue 13 point 4: the service's memory with its caches full. `mint` makes an
//! access token for each session and an API key for each session's user, keyed
//! and signed exactly as the service would (its own settings, from the same
//! environment); `verify-each` then verifies every key and every token once, so
//! each sits in the service's caches.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::metadata::MetadataValue;
use user_service::config::Settings;
use user_service::crypto::api_key_hash::ApiKeyHasher;
use user_service::crypto::jwt::{JwtKeys, TokenType};
use user_service::domain::api_key::ApiKeySecret;
use user_service::proto::auth_service_client::AuthServiceClient;
use user_service::proto::{VerifyApiKeyRequest, VerifyTokenRequest};

/// `sessions`: lines `user_id<TAB>session_id`. Writes one access token per line
/// to `tokens_out`, one API key per line to `secrets_out`, and `keys_csv` for
/// `\copy api_keys (id, user_id, name, prefix, key_hash) from … csv`.
pub fn mint(
    sessions: &str,
    tokens_out: &str,
    secrets_out: &str,
    keys_csv: &str,
) -> anyhow::Result<()> {
    let settings = Settings::load().map_err(|e| anyhow::anyhow!("settings: {e}"))?;
    let jwt = JwtKeys::from_settings(&settings)?;
    let hasher = ApiKeyHasher::new(settings.api_key_hash_secret.as_ref());
    let ttl = Duration::from_secs(settings.access_token_ttl_seconds);
    let mut tokens = std::io::BufWriter::new(std::fs::File::create(tokens_out)?);
    let mut secrets = std::io::BufWriter::new(std::fs::File::create(secrets_out)?);
    let mut csv = std::io::BufWriter::new(std::fs::File::create(keys_csv)?);
    for line in super::read_lines(sessions)? {
        let (user_id, session_id) = line
            .split_once('\t')
            .ok_or_else(|| anyhow::anyhow!("not user_id<TAB>session_id: {line}"))?;
        let claims = jwt.claims(
            TokenType::Access,
            user_id.to_string(),
            ttl,
            Some(session_id.to_string()),
            None,
        );
        writeln!(tokens, "{}", jwt.sign(&claims)?)?;
        let key = ApiKeySecret::generate(settings.app_env);
        let hash: String = hasher
            .hash(&key)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        writeln!(secrets, "{}", key.expose())?;
        writeln!(
            csv,
            "{},{user_id},fill,{},\\x{hash}",
            uuid::Uuid::new_v4(),
            key.prefix()
        )?;
    }
    tokens.flush()?;
    secrets.flush()?;
    csv.flush()?;
    Ok(())
}

/// Verifies every key and every token once over `concurrency` streams; prints
/// one JSON line (how many were valid, how long it took).
pub async fn verify_each(
    name: &str,
    addr: &str,
    keys: &str,
    tokens: &str,
    service_token: &str,
    concurrency: usize,
    connections: usize,
) -> anyhow::Result<()> {
    let keys = Arc::new(super::read_lines(keys)?);
    let tokens = Arc::new(super::read_lines(tokens)?);
    let auth: MetadataValue<_> = format!("Bearer {service_token}").parse()?;
    let channels = super::channels(addr, connections).await?;
    let next = Arc::new(AtomicUsize::new(0));
    let total = keys.len() + tokens.len();
    let start = Instant::now();
    let mut workers = Vec::new();
    for i in 0..concurrency {
        let mut client = AuthServiceClient::new(channels[i % channels.len()].clone());
        let (keys, tokens, auth, next) = (keys.clone(), tokens.clone(), auth.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let (mut keys_valid, mut tokens_valid, mut errors) = (0u64, 0u64, 0u64);
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                // Keys first, then tokens.
                let valid = if n < keys.len() {
                    let mut req = tonic::Request::new(VerifyApiKeyRequest {
                        api_key: keys[n].clone(),
                        ..Default::default()
                    });
                    req.metadata_mut().insert("authorization", auth.clone());
                    client
                        .verify_api_key(req)
                        .await
                        .map(|r| r.into_inner().valid)
                } else if n < keys.len() + tokens.len() {
                    let mut req = tonic::Request::new(VerifyTokenRequest {
                        token: tokens[n - keys.len()].clone(),
                    });
                    req.metadata_mut().insert("authorization", auth.clone());
                    client.verify_token(req).await.map(|r| r.into_inner().valid)
                } else {
                    break;
                };
                match valid {
                    Ok(true) if n < keys.len() => keys_valid += 1,
                    Ok(true) => tokens_valid += 1,
                    Ok(false) => {}
                    Err(_) => errors += 1,
                }
            }
            (keys_valid, tokens_valid, errors)
        }));
    }
    let (mut keys_valid, mut tokens_valid, mut errors) = (0, 0, 0);
    for w in workers {
        let (k, t, e) = w.await?;
        keys_valid += k;
        tokens_valid += t;
        errors += e;
    }
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "name": name,
            "fill": true,
            "keys": keys.len(),
            "keys_valid": keys_valid,
            "tokens": tokens.len(),
            "tokens_valid": tokens_valid,
            "errors": errors,
            "seconds": seconds,
            "rps": total as f64 / seconds,
        })
    );
    Ok(())
}
