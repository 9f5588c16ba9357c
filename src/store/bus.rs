//! The cross-replica invalidation channel as plain text events, so nothing above
//! the store sees fred's message types.

use fred::prelude::Server;
use fred::types::Message;
use tokio::sync::broadcast::{self, error::RecvError};

use super::{Cache, StoreResult};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusEvent {
    Message(String),
    /// The subscription was re-established, or this listener fell behind: messages
    /// may have been missed, so whatever they would have invalidated is suspect.
    MaybeMissed,
}

pub struct BusListener {
    channel: String,
    messages: broadcast::Receiver<Message>,
    reconnects: broadcast::Receiver<Server>,
}

/// Subscribes to `channel` (prefixed like every key).
pub async fn listen(cache: &Cache, channel: &str) -> StoreResult<BusListener> {
    let (messages, reconnects) = cache.subscribe(channel).await?;
    Ok(BusListener {
        channel: cache.channel_name(channel),
        messages,
        reconnects,
    })
}

impl BusListener {
    /// The next event; `None` once the client is gone for good.
    pub async fn next(&mut self) -> Option<BusEvent> {
        loop {
            tokio::select! {
                m = self.messages.recv() => match m {
                    Ok(m) if m.channel.as_bytes() == self.channel.as_bytes() => {
                        if let Some(text) = m.value.as_string() {
                            return Some(BusEvent::Message(text));
                        }
                    }
                    Ok(_) => {}
                    Err(RecvError::Lagged(_)) => return Some(BusEvent::MaybeMissed),
                    Err(RecvError::Closed) => return None,
                },
                r = self.reconnects.recv() => match r {
                    Ok(_) | Err(RecvError::Lagged(_)) => return Some(BusEvent::MaybeMissed),
                    Err(RecvError::Closed) => return None,
                },
            }
        }
    }
}

/// The same events from PostgreSQL's NOTIFY `channel` (sent by triggers inside
/// the writing transaction), on a one-connection pool of its own so listening
/// never takes a place in the request pool. It reconnects by itself: after every
/// (re)connection the first event is `MaybeMissed`.
pub struct PgBusListener {
    pool: sqlx::PgPool,
    channel: &'static str,
    listener: Option<sqlx::postgres::PgListener>,
    down: bool,
}

/// Listens on `channel` of the database `db` points at (same connection options).
pub fn listen_pg(db: &super::Db, channel: &'static str) -> PgBusListener {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(std::time::Duration::from_secs(2))
        .connect_lazy_with((*db.pool.connect_options()).clone());
    PgBusListener {
        pool,
        channel,
        listener: None,
        down: false,
    }
}

impl PgBusListener {
    /// The next event, retrying the connection every half second while the
    /// database is unreachable.
    pub async fn next(&mut self) -> BusEvent {
        loop {
            let Some(listener) = self.listener.as_mut() else {
                match self.connect().await {
                    Ok(l) => {
                        if std::mem::take(&mut self.down) {
                            tracing::info!("PostgreSQL invalidation channel reconnected");
                        }
                        self.listener = Some(l);
                        return BusEvent::MaybeMissed;
                    }
                    Err(e) => {
                        if !std::mem::replace(&mut self.down, true) {
                            tracing::warn!(error = %e, "PostgreSQL invalidation channel unavailable");
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                        continue;
                    }
                }
            };
            match listener.try_recv().await {
                Ok(Some(n)) => return BusEvent::Message(n.payload().to_string()),
                Ok(None) | Err(_) => {
                    tracing::warn!("PostgreSQL invalidation channel lost");
                    self.listener = None;
                    self.down = true;
                }
            }
        }
    }

    async fn connect(&self) -> Result<sqlx::postgres::PgListener, sqlx::Error> {
        let mut l = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
        l.listen(self.channel).await?;
        Ok(l)
    }
}
