//! A login session's state, as every replica's caches hold it.

use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionState {
    Live {
        user_id: Uuid,
        roles: Vec<String>,
    },
    /// `reason`: `logout`, `ended`, `password_changed`, `user_disabled`, `refresh_reuse`…
    Revoked {
        reason: String,
    },
}
