//! Invitations to a trading account: nobody becomes a member of someone else's
//! account without accepting. No I/O.

use chrono::{DateTime, Duration, Utc};
use uuid::Uuid;

use super::account::MemberRole;

/// How long an invitation waits for an answer.
pub const INVITATION_TTL: Duration = Duration::days(7);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvitationStatus {
    Pending,
    Accepted,
    Declined,
    Revoked,
    Expired,
}

impl InvitationStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            InvitationStatus::Pending => "pending",
            InvitationStatus::Accepted => "accepted",
            InvitationStatus::Declined => "declined",
            InvitationStatus::Revoked => "revoked",
            InvitationStatus::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            InvitationStatus::Pending,
            InvitationStatus::Accepted,
            InvitationStatus::Declined,
            InvitationStatus::Revoked,
            InvitationStatus::Expired,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }
}

/// An invitation as the account's managers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invitation {
    pub id: Uuid,
    pub account_id: Uuid,
    pub email: String,
    pub invitee_user_id: Option<Uuid>,
    pub role: MemberRole,
    pub invited_by: Option<Uuid>,
    pub status: InvitationStatus,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

impl Invitation {
    pub fn expired(&self, now: DateTime<Utc>) -> bool {
        self.expires_at <= now
    }
}

/// An invitation as its invitee sees it: enough to decide (which account, which
/// role, who asks), nothing of the account that only members see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedInvitation {
    pub id: Uuid,
    pub account_id: Uuid,
    pub broker: String,
    pub nickname: String,
    pub role: MemberRole,
    pub invited_by_email: Option<String>,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip() {
        for s in ["pending", "accepted", "declined", "revoked", "expired"] {
            assert_eq!(InvitationStatus::parse(s).unwrap().as_str(), s);
        }
        assert_eq!(InvitationStatus::parse("maybe"), None);
    }
}
