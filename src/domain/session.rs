//! A login session's state, as every replica's caches hold it, and why a
//! session ended.

use std::fmt;

use uuid::Uuid;

/// No roles here: a request takes them from the user as cached now (a role
/// change drops that copy), and up to 100,000 of these are cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    Live { user_id: Uuid },
    Revoked { reason: RevocationReason },
}

/// Why a session ended (`sessions.revoked_reason`, and the tombstones).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RevocationReason {
    /// The user logged out.
    Logout,
    /// The user ended it from their session list.
    Ended,
    /// The password changed (every other session of the user ends).
    PasswordChanged,
    /// The password was reset through an emailed link (every session ends).
    PasswordReset,
    /// An administrator disabled the user.
    UserDisabled,
    /// A used refresh token came back: a copy was stolen.
    RefreshReuse,
    /// No activity for SESSION_IDLE_TIMEOUT_SECONDS.
    IdleTimeout,
    /// Past its absolute lifetime.
    Expired,
    /// No such session, or a reason this build does not name (written by a
    /// newer replica): refused all the same.
    Unknown,
}

impl RevocationReason {
    const ALL: [RevocationReason; 9] = [
        RevocationReason::Logout,
        RevocationReason::Ended,
        RevocationReason::PasswordChanged,
        RevocationReason::PasswordReset,
        RevocationReason::UserDisabled,
        RevocationReason::RefreshReuse,
        RevocationReason::IdleTimeout,
        RevocationReason::Expired,
        RevocationReason::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RevocationReason::Logout => "logout",
            RevocationReason::Ended => "ended",
            RevocationReason::PasswordChanged => "password_changed",
            RevocationReason::PasswordReset => "password_reset",
            RevocationReason::UserDisabled => "user_disabled",
            RevocationReason::RefreshReuse => "refresh_reuse",
            RevocationReason::IdleTimeout => "idle_timeout",
            RevocationReason::Expired => "expired",
            RevocationReason::Unknown => "unknown",
        }
    }

    /// A stored reason; one this build does not name is `Unknown` (it still
    /// means the session ended).
    pub fn from_stored(s: &str) -> Self {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .unwrap_or(RevocationReason::Unknown)
    }
}

impl fmt::Display for RevocationReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_round_trip_and_unknown_ones_still_revoke() {
        for r in RevocationReason::ALL {
            assert_eq!(RevocationReason::from_stored(r.as_str()), r);
        }
        assert_eq!(
            RevocationReason::from_stored("some_future_reason"),
            RevocationReason::Unknown
        );
    }
}
