//! A user as the service sees it (never the password hash), its roles and its
//! status: parsed once, at the edge of the store or of a request.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

/// A role a user may hold (DESIGN §9; the `roles` table's names). Ordered as
/// their names sort, the order a user's roles are listed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    User,
    Viewer,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Admin, Role::User, Role::Viewer];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::User => "user",
            Role::Viewer => "viewer",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// Stored role names as roles, sorted, each once; a name this build does not
    /// know grants nothing and is left out.
    pub fn from_names<S: AsRef<str>>(names: &[S]) -> Vec<Role> {
        let mut roles: Vec<Role> = names
            .iter()
            .filter_map(|n| Role::parse(n.as_ref()))
            .collect();
        roles.sort();
        roles.dedup();
        roles
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `users_status_check`: a disabled user can neither log in nor use a token,
/// a session or an API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UserStatus {
    Active,
    Disabled,
}

impl UserStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            UserStatus::Active => "active",
            UserStatus::Disabled => "disabled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(UserStatus::Active),
            "disabled" => Some(UserStatus::Disabled),
            _ => None,
        }
    }
}

impl fmt::Display for UserStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: Uuid,
    pub email: String,
    pub full_name: String,
    pub roles: Vec<Role>,
    pub status: UserStatus,
    /// Whether the user proved they receive mail at `email` (DESIGN.md section 8).
    pub email_verified: bool,
    pub created_at: DateTime<Utc>,
}

impl User {
    pub fn is_active(&self) -> bool {
        self.status == UserStatus::Active
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_and_statuses_round_trip_their_names() {
        for r in Role::ALL {
            assert_eq!(Role::parse(r.as_str()), Some(r));
            assert_eq!(serde_json::to_value(r).unwrap(), r.as_str());
        }
        for s in [UserStatus::Active, UserStatus::Disabled] {
            assert_eq!(UserStatus::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        assert_eq!(Role::parse("Admin"), None);
        assert_eq!(UserStatus::parse("locked"), None);
    }

    #[test]
    fn stored_names_sort_as_the_store_lists_them() {
        let names = ["viewer", "admin", "auditor", "admin", "user"];
        assert_eq!(
            Role::from_names(&names),
            vec![Role::Admin, Role::User, Role::Viewer]
        );
        let mut sorted: Vec<&str> = Role::ALL.iter().map(|r| r.as_str()).collect();
        sorted.sort();
        assert_eq!(sorted, ["admin", "user", "viewer"]);
    }
}
