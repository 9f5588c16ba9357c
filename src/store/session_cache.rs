//! The Redis copy of session states: tombstones that let every replica refuse an
//! ended session without asking PostgreSQL, and short-lived "live" marks. Only a
//! cache: `sessions` holds the truth. Keys are `session:{id}` (prefixed like every
//! key); values JSON, `{"s":"live","uid":…,"roles":[…]}` or
//! `{"s":"revoked","reason":…}`, which replicas of every version read.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Cache, StoreResult};
use crate::domain::session::{RevocationReason, SessionState};
use crate::domain::user::Role;

#[derive(Serialize, Deserialize)]
#[serde(tag = "s", rename_all = "lowercase")]
enum Stored {
    /// `roles`: the user's when the session opened, for replicas that read them
    /// (this one takes roles from the user record).
    Live {
        uid: Uuid,
        #[serde(default)]
        roles: Vec<String>,
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
            Stored::Live { uid, .. } => SessionState::Live { user_id: uid },
            Stored::Revoked { reason } => SessionState::Revoked {
                reason: RevocationReason::from_stored(&reason),
            },
        }))
    }

    /// `roles` go with a live mark (see `Stored::Live`).
    pub async fn put(
        &self,
        sid: Uuid,
        state: &SessionState,
        roles: &[Role],
        ttl: Duration,
    ) -> StoreResult<()> {
        let stored = match state {
            SessionState::Live { user_id } => Stored::Live {
                uid: *user_id,
                roles: roles.iter().map(|r| r.as_str().to_string()).collect(),
            },
            SessionState::Revoked { reason } => Stored::Revoked {
                reason: reason.as_str().to_string(),
            },
        };
        let text = serde_json::to_string(&stored)
            .map_err(|e| super::StoreError::Other(anyhow::Error::new(e)))?;
        self.cache.set_string(&key(sid), &text, ttl).await
    }

    pub async fn forget(&self, sid: Uuid) -> StoreResult<()> {
        self.cache.del(&key(sid)).await
    }
}
