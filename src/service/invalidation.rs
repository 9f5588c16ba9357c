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
use crate::store::{Cache, Db};
use tokio_util::task::TaskTracker;

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

    /// Follows PostgreSQL's NOTIFY channel for the changes the triggers send; the
    /// store reconnects after a loss, and every (re)connection drops everything, as
    /// messages may have been missed. Waits at most two seconds for the first
    /// connection, so a database outage does not block start-up.
    pub async fn start_pg(&self, db: &Db, shutdown: Shutdown, tasks: &TaskTracker) {
        let this = self.clone();
        let mut listener = bus::listen_pg(db, PG_CHANNEL);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        tasks.spawn(async move {
            loop {
                let event = tokio::select! {
                    _ = shutdown.wait() => return,
                    e = listener.next() => e,
                };
                this.receive(event);
                if let Some(tx) = ready_tx.take() {
                    let _ = tx.send(());
                }
            }
        });
        wait_ready(
            ready_rx,
            "PostgreSQL slow at start-up; invalidation LISTEN pending",
        )
        .await;
    }

    /// Subscribes and spawns the listener on `tasks` (it ends with `shutdown`).
    /// Waits at most two seconds for the subscription, so a Redis outage does not
    /// block start-up: the subscription is then made when Redis comes back.
    pub async fn start(&self, shutdown: Shutdown, tasks: &TaskTracker) {
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
                    Some(event) => this.receive(event),
                    None => break,
                }
            }
        });
        wait_ready(
            ready_rx,
            "Redis slow at start-up; invalidation subscription pending",
        )
        .await;
    }

    /// One event from either channel.
    fn receive(&self, event: BusEvent) {
        match event {
            BusEvent::Message(text) => match Change::decode(&text) {
                Some(change) => self.apply(change),
                None => tracing::warn!(message = %text, "unknown invalidation message"),
            },
            BusEvent::MaybeMissed => {
                tracing::info!("invalidation channel (re)connected: dropping caches");
                self.apply(Change::Everything);
            }
        }
    }
}

async fn wait_ready(ready: tokio::sync::oneshot::Receiver<()>, slow: &'static str) {
    if tokio::time::timeout(std::time::Duration::from_secs(2), ready)
        .await
        .is_err()
    {
        tracing::warn!("{slow}");
    }
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
