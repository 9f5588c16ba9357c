//! The Redis copy of session states: tombstones that let every replica refuse an
//! ended session without asking PostgreSQL. Only a cache: `sessions` holds the
//! truth. Keys are `session:{id}` (prefixed like every key); values JSON,
//! `{"s":"revoked","reason":…}`, or `{"s":"live","uid":…,"roles":[…]}` as
//! earlier builds also wrote (read as "no tombstone").

use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Cache, StoreResult};
use crate::domain::session::{RevocationReason, SessionState};

#[derive(Serialize, Deserialize)]
#[serde(tag = "s", rename_all = "lowercase")]
enum Stored {
    /// Written by earlier builds (with the user's roles, ignored here).
    Live {
        uid: Uuid,
    },
    Revoked {
        reason: String,
    },
}

/// Cheap to clone (the Redis clients are shared).
#[derive(Clone)]
pub struct SessionCache {
    cache: Cache,
}

fn key(sid: Uuid) -> String {
    format!("session:{sid}")
}

impl SessionCache {
    pub fn new(cache: Cache) -> Self {
        Self { cache }
    }

    /// The cached state; `None` when absent or written in a form this build
    /// cannot read (the caller then asks PostgreSQL).
    pub async fn get(&self, sid: Uuid) -> StoreResult<Option<SessionState>> {
        let Some(text) = self.cache.get_string(&key(sid)).await? else {
            return Ok(None);
        };
        Ok(serde_json::from_str::<Stored>(&text).ok().map(|s| match s {
            Stored::Live { uid } => SessionState::Live { user_id: uid },
            Stored::Revoked { reason } => SessionState::Revoked {
                reason: RevocationReason::from_stored(&reason),
            },
        }))
    }

    /// A tombstone: the session ended for `reason`.
    pub async fn put_revoked(
        &self,
        sid: Uuid,
        reason: RevocationReason,
        ttl: Duration,
    ) -> StoreResult<()> {
        let stored = Stored::Revoked {
            reason: reason.as_str().to_string(),
        };
        let text = serde_json::to_string(&stored)
            .map_err(|e| super::StoreError::Other(anyhow::Error::new(e)))?;
        self.cache.set_string(&key(sid), &text, ttl).await
    }
}
