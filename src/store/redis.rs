//! Redis (fred): what may be lost. Counters, cached verification results, the
//! session cache and the cross-replica invalidation channel. Every key and channel
//! is prefixed (REDIS_KEY_PREFIX), so environments and tests can share a server.

use std::time::Duration;

use fred::clients::SubscriberClient;
use fred::prelude::*;
use fred::types::Message;
use secrecy::ExposeSecret;
use tokio::sync::broadcast;

use super::{StoreError, StoreResult};
use crate::config::Settings;

/// How long any Redis command may take before we treat Redis as down and fall back.
const COMMAND_TIMEOUT: Duration = Duration::from_millis(300);

/// Atomic "count this attempt": INCR, and start the window on the first hit.
const INCR_WINDOW_LUA: &str = r#"
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return {n, redis.call('PTTL', KEYS[1])}
"#;

/// A TLS connector that trusts only the CA certificates in `ca_file` (PEM): for a
/// Redis whose certificate comes from a private CA, as managed services often
/// issue. Without REDIS_TLS_CA_FILE, rediss:// trusts the system's roots.
fn tls_connector_trusting(ca_file: &str) -> anyhow::Result<fred::types::config::TlsConnector> {
    use fred::rustls::pki_types::pem::PemObject;
    use fred::rustls::pki_types::CertificateDer;
    let mut roots = fred::rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file)
        .map_err(|e| anyhow::anyhow!("REDIS_TLS_CA_FILE {ca_file}: {e}"))?
    {
        let cert = cert.map_err(|e| anyhow::anyhow!("REDIS_TLS_CA_FILE {ca_file}: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| anyhow::anyhow!("REDIS_TLS_CA_FILE {ca_file}: {e}"))?;
    }
    anyhow::ensure!(
        !roots.is_empty(),
        "REDIS_TLS_CA_FILE {ca_file} holds no certificate"
    );
    let provider = std::sync::Arc::new(fred::rustls::crypto::ring::default_provider());
    let config = fred::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| anyhow::anyhow!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config.into())
}

#[derive(Clone)]
pub struct Cache {
    client: Client,
    subscriber: SubscriberClient,
    prefix: String,
}

fn store_err(e: Error) -> StoreError {
    StoreError::Unavailable(format!("redis: {}", e.kind().to_str()))
}

// Every fred command future is boxed (`Box::pin`): fred's are ~6.6 KB, and an
// async fn that awaits one inline is at least that large, whether or not the call
// runs — so were VerifyApiKey, VerifyToken and every gateway handler that may touch
// Redis on a rare branch (a rate-limited key, a session-cache miss), each call
// allocating and copying ~8 KB of future state. A Redis round trip pays one small
// allocation instead.
impl Cache {
    /// Builds the clients and starts connecting in the background: the service
    /// starts and keeps answering while Redis is down.
    pub fn connect(settings: &Settings) -> anyhow::Result<Self> {
        let mut config = Config::from_url(settings.redis_url.expose_secret())
            .map_err(|_| anyhow::anyhow!("REDIS_URL is not a valid Redis URL"))?;
        if let Some(ca_file) = &settings.redis_tls_ca_file {
            let Some(tls) = config.tls.as_mut() else {
                anyhow::bail!(
                    "REDIS_TLS_CA_FILE is set but REDIS_URL does not use TLS (rediss://)"
                );
            };
            tls.connector = tls_connector_trusting(ca_file)?;
        }
        let mut builder = Builder::from_config(config);
        builder
            .with_connection_config(|c| {
                c.connection_timeout = Duration::from_secs(2);
                c.internal_command_timeout = Duration::from_secs(2);
                c.max_command_attempts = 1;
                c.tcp = TcpConfig {
                    nodelay: Some(true),
                    ..Default::default()
                };
            })
            .with_performance_config(|p| {
                p.default_command_timeout = COMMAND_TIMEOUT;
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2));
        let client = builder.build()?;
        let subscriber = builder.build_subscriber_client()?;
        client.connect();
        subscriber.connect();
        // Re-subscribe to every channel after a reconnect.
        subscriber.manage_subscriptions();
        Ok(Self {
            client,
            subscriber,
            prefix: settings.redis_key_prefix.clone(),
        })
    }

    pub fn key(&self, suffix: &str) -> String {
        format!("{}{}", self.prefix, suffix)
    }

    pub async fn ping(&self) -> bool {
        matches!(
            tokio::time::timeout(COMMAND_TIMEOUT, Box::pin(self.client.ping::<String>(None))).await,
            Ok(Ok(_))
        )
    }

    /// Increments `key` (prefixed here) in a window of `window`; returns the count
    /// and the milliseconds left in the window.
    pub async fn incr_window(&self, key: &str, window: Duration) -> StoreResult<(i64, i64)> {
        let (n, ttl): (i64, i64) = Box::pin(self.client.eval(
            INCR_WINDOW_LUA,
            vec![self.key(key)],
            vec![window.as_millis() as i64],
        ))
        .await
        .map_err(store_err)?;
        Ok((n, ttl))
    }

    pub async fn get_i64(&self, key: &str) -> StoreResult<Option<i64>> {
        Box::pin(self.client.get(self.key(key)))
            .await
            .map_err(store_err)
    }

    pub async fn get_string(&self, key: &str) -> StoreResult<Option<String>> {
        Box::pin(self.client.get(self.key(key)))
            .await
            .map_err(store_err)
    }

    pub async fn set_string(&self, key: &str, value: &str, ttl: Duration) -> StoreResult<()> {
        Box::pin(self.client.set::<(), _, _>(
            self.key(key),
            value,
            Some(Expiration::PX(ttl.as_millis().max(1) as i64)),
            None,
            false,
        ))
        .await
        .map_err(store_err)
    }

    /// Time to live of a key in milliseconds (negative when absent or persistent).
    pub async fn pttl(&self, key: &str) -> StoreResult<i64> {
        Box::pin(self.client.pttl(self.key(key)))
            .await
            .map_err(store_err)
    }

    pub async fn publish(&self, channel: &str, message: &str) -> StoreResult<()> {
        Box::pin(self.client.publish::<(), _, _>(self.key(channel), message))
            .await
            .map_err(store_err)
    }

    /// Subscribes to `channel` (prefixed) and returns the raw message stream plus a
    /// stream of reconnect events: after a reconnect, messages may have been missed.
    pub(super) async fn subscribe(
        &self,
        channel: &str,
    ) -> StoreResult<(broadcast::Receiver<Message>, broadcast::Receiver<Server>)> {
        let rx = self.subscriber.message_rx();
        let reconnects = self.subscriber.reconnect_rx();
        // When Redis is down at start-up the subscription is recorded and made by
        // manage_subscriptions() once it connects.
        let _ = self.subscriber.subscribe(self.key(channel)).await;
        Ok((rx, reconnects))
    }

    /// The full channel name for `channel`, to match incoming messages.
    pub(super) fn channel_name(&self, channel: &str) -> String {
        self.key(channel)
    }

    pub async fn quit(&self) {
        let _ = self.client.quit().await;
        let _ = self.subscriber.quit().await;
    }
}
