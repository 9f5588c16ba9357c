//! Cross-replica cache invalidation over Redis pub/sub: "API key X / user Y /
//! account Z changed". Any in-process cache registers a handler; `publish` runs the
//! handlers here at once and tells every other replica, which runs them on receipt.
//!
//! Call `publish` after the change has committed. A second channel carries the
//! same changes without Redis: triggers on the revoking tables (migration
//! `2026120100070101_invalidation_notify.sql`) `pg_notify` inside the writing
//! transaction, delivered at commit, and every replica LISTENs (`start_pg`). So a
//! revocation reaches every replica while either channel works. A replica whose
//! subscription (re)connects on either channel drops everything, since it may
//! have missed messages meanwhile.

use std::sync::{Arc, RwLock};

use uuid::Uuid;

use crate::shutdown::Shutdown;
use crate::store::bus::{self, BusEvent};
use crate::store::Cache;

const CHANNEL: &str = "invalidate";
/// The PostgreSQL NOTIFY channel the triggers use (per database, so per
/// deployment; payloads are `Change::encode` strings).
pub const PG_CHANNEL: &str = "user_service_invalidate";

/// What changed. Handlers drop whatever they derived from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// An API key was revoked, rotated or edited.
    ApiKey(Uuid),
    /// A user's status, roles, scopes or account memberships changed.
    User(Uuid),
    /// A trading account was deleted or its membership list changed.
    Account(Uuid),
    /// A session ended (logout, ended, password change or reset, disabled user).
    Session(Uuid),
    /// A user's name or email changed: copies are refreshed, nothing is revoked,
    /// so caches of what the user may do (API keys) keep their entries.
    Profile(Uuid),
    /// Messages may have been missed: drop every cached entry.
    Everything,
}

impl Change {
    fn encode(self) -> String {
        match self {
            Change::ApiKey(id) => format!("k:{id}"),
            Change::User(id) => format!("u:{id}"),
            Change::Account(id) => format!("a:{id}"),
            Change::Session(id) => format!("s:{id}"),
            Change::Profile(id) => format!("p:{id}"),
            Change::Everything => "*".into(),
        }
    }

    fn decode(s: &str) -> Option<Self> {
        if s == "*" {
            return Some(Change::Everything);
        }
        let (kind, id) = s.split_once(':')?;
        let id = id.parse().ok()?;
        match kind {
            "k" => Some(Change::ApiKey(id)),
            "u" => Some(Change::User(id)),
            "a" => Some(Change::Account(id)),
            "s" => Some(Change::Session(id)),
            "p" => Some(Change::Profile(id)),
            _ => None,
        }
    }
}

type Handler = Arc<dyn Fn(Change) + Send + Sync>;

/// Cheap to clone; one per process, shared by every cache that needs it.
#[derive(Clone)]
pub struct Invalidation {
    cache: Cache,
    handlers: Arc<RwLock<Vec<Handler>>>,
}

impl Invalidation {
    pub fn new(cache: Cache) -> Self {
        Self {
            cache,
            handlers: Arc::default(),
        }
    }

    /// Registers a cache's reaction to changes (local and remote). Handlers run
    /// synchronously on the publishing or receiving task: keep them short.
    pub fn on_change(&self, handler: impl Fn(Change) + Send + Sync + 'static) {
        self.handlers
            .write()
            .expect("handlers lock")
            .push(Arc::new(handler));
    }

    fn apply(&self, change: Change) {
        let handlers: Vec<Handler> = self.handlers.read().expect("handlers lock").clone();
        for h in handlers {
            h(change);
        }
        metrics::counter!("cache_invalidations_total").increment(1);
    }

    /// Applies `change` in this process at once, then tells the other replicas.
    pub async fn publish(&self, change: Change) {
        self.apply(change);
        if let Err(e) = self.cache.publish(CHANNEL, &change.encode()).await {
            // Other replicas fall back to their cache TTL for this change.
            tracing::warn!(error = %e, ?change, "could not publish cache invalidation");
            metrics::counter!("cache_invalidation_publish_failures_total").increment(1);
        }
    }

    pub async fn api_key_changed(&self, key_id: Uuid) {
        self.publish(Change::ApiKey(key_id)).await
    }

    pub async fn user_changed(&self, user_id: Uuid) {
        self.publish(Change::User(user_id)).await
    }

    pub async fn account_changed(&self, account_id: Uuid) {
        self.publish(Change::Account(account_id)).await
    }

    pub async fn session_changed(&self, session_id: Uuid) {
        self.publish(Change::Session(session_id)).await
    }

    /// Listens on PostgreSQL's NOTIFY channel for the changes the triggers send,
    /// reconnecting (and dropping everything, as messages may have been missed)
    /// after the connection is lost. Waits at most two seconds for the first
    /// connection, so a database outage does not block start-up.
    pub async fn start_pg(
        &self,
        pool: sqlx::PgPool,
        shutdown: Shutdown,
        tasks: &tokio_util::task::TaskTracker,
    ) {
        let this = self.clone();
        // A pool of its own (same connection options), so the listening
        // connection does not take a place in the request pool.
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(std::time::Duration::from_secs(2))
            .connect_lazy_with((*pool.connect_options()).clone());
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        tasks.spawn(async move {
            let mut was_down = false;
            loop {
                let listener = tokio::select! {
                    _ = shutdown.wait() => return,
                    l = pg_listen(&pool) => l,
                };
                let mut listener = match listener {
                    Ok(l) => l,
                    Err(e) => {
                        if !was_down {
                            tracing::warn!(error = %e, "PostgreSQL invalidation channel unavailable");
                            was_down = true;
                        }
                        tokio::select! {
                            _ = shutdown.wait() => return,
                            _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => continue,
                        }
                    }
                };
                if std::mem::take(&mut was_down) {
                    tracing::info!("PostgreSQL invalidation channel reconnected: dropping caches");
                }
                // Anything cached before this connection may have missed a message.
                this.apply(Change::Everything);
                if let Some(tx) = ready_tx.take() {
                    let _ = tx.send(());
                }
                loop {
                    let n = tokio::select! {
                        _ = shutdown.wait() => return,
                        n = listener.try_recv() => n,
                    };
                    match n {
                        Ok(Some(n)) => match Change::decode(n.payload()) {
                            Some(change) => this.apply(change),
                            None => tracing::warn!(message = n.payload(), "unknown invalidation notification"),
                        },
                        Ok(None) | Err(_) => {
                            tracing::warn!("PostgreSQL invalidation channel lost");
                            was_down = true;
                            break;
                        }
                    }
                }
            }
        });
        if tokio::time::timeout(std::time::Duration::from_secs(2), ready_rx)
            .await
            .is_err()
        {
            tracing::warn!("PostgreSQL slow at start-up; invalidation LISTEN pending");
        }
    }

    /// Subscribes and spawns the listener on `tasks` (it ends with `shutdown`).
    /// Waits at most two seconds for the subscription, so a Redis outage does not
    /// block start-up: the subscription is then made when Redis comes back.
    pub async fn start(&self, shutdown: Shutdown, tasks: &tokio_util::task::TaskTracker) {
        let this = self.clone();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        tasks.spawn(async move {
            let listener = tokio::select! {
                _ = shutdown.wait() => return,
                l = bus::listen(&this.cache, CHANNEL) => l,
            };
            let mut listener = match listener {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "cache invalidation channel unavailable");
                    return;
                }
            };
            let _ = ready_tx.send(());
            loop {
                let event = tokio::select! {
                    _ = shutdown.wait() => break,
                    e = listener.next() => e,
                };
                match event {
                    Some(BusEvent::Message(text)) => match Change::decode(&text) {
                        Some(change) => this.apply(change),
                        None => tracing::warn!(message = %text, "unknown invalidation message"),
                    },
                    Some(BusEvent::MaybeMissed) => {
                        tracing::info!("invalidation channel (re)connected: dropping caches");
                        this.apply(Change::Everything);
                    }
                    None => break,
                }
            }
        });
        if tokio::time::timeout(std::time::Duration::from_secs(2), ready_rx)
            .await
            .is_err()
        {
            tracing::warn!("Redis slow at start-up; invalidation subscription pending");
        }
    }
}

async fn pg_listen(pool: &sqlx::PgPool) -> Result<sqlx::postgres::PgListener, sqlx::Error> {
    let mut l = sqlx::postgres::PgListener::connect_with(pool).await?;
    l.listen(PG_CHANNEL).await?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let id = Uuid::new_v4();
        for c in [
            Change::ApiKey(id),
            Change::User(id),
            Change::Account(id),
            Change::Session(id),
            Change::Profile(id),
            Change::Everything,
        ] {
            assert_eq!(Change::decode(&c.encode()), Some(c));
        }
        assert_eq!(Change::decode("x:1"), None);
        assert_eq!(Change::decode("k:not-a-uuid"), None);
    }
}
