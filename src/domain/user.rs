//! A user (never the password hash: no layer above store/ sees it).

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// Roles a user may hold.
pub const ROLES: [&str; 3] = ["admin", "user", "viewer"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: Uuid,
    pub email: String,
    pub full_name: String,
    pub roles: Vec<String>,
    /// `active` or `disabled`.
    pub status: String,
    /// Whether the user proved they receive mail at `email` (DESIGN.md section 8).
    pub email_verified: bool,
    pub created_at: DateTime<Utc>,
}

impl User {
    pub fn is_active(&self) -> bool {
        self.status == "active"
    }
}
