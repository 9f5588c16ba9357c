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
