//! Trading accounts as the rules see them: broker identifiers, who may do what on an
//! account (owner or member role → permissions), subscription values. No I/O.

use std::fmt;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::email::Email;
use super::FieldError;

/// A broker's lowercase identifier (`zerodha`, `upstox`, …); the same rule as the
/// `trading_accounts_broker_check` constraint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broker(String);

impl Broker {
    pub fn parse(s: &str) -> Result<Self, FieldError> {
        let ok = (2..=32).contains(&s.len())
            && s.starts_with(|c: char| c.is_ascii_lowercase())
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if ok {
            Ok(Self(s.to_string()))
        } else {
            Err(FieldError::new(
                "broker",
                "invalid",
                "must be a lowercase identifier of 2 to 32 characters (a-z, 0-9, _), e.g. zerodha",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The broker's own login for the account (1 to 128 characters, trimmed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUserId(String);

impl BrokerUserId {
    pub fn parse(s: &str) -> Result<Self, FieldError> {
        let s = s.trim();
        let n = s.chars().count();
        if (1..=128).contains(&n) && !s.chars().any(char::is_control) {
            Ok(Self(s.to_string()))
        } else {
            Err(FieldError::new(
                "broker_user_id",
                "invalid",
                "must be 1 to 128 printable characters",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A display name chosen by the owner (at most 100 characters, may be empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nickname(String);

impl Nickname {
    pub fn parse(s: &str) -> Result<Self, FieldError> {
        let s = s.trim();
        if s.chars().count() <= 100 && !s.chars().any(char::is_control) {
            Ok(Self(s.to_string()))
        } else {
            Err(FieldError::new(
                "nickname",
                "invalid",
                "must be at most 100 printable characters",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Declares a closed set of lowercase wire/database values with parse and as_str.
macro_rules! string_enum {
    ($(#[$m:meta])* $name:ident, $field:literal { $($variant:ident = $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $s),+ }
            }

            pub fn parse(s: &str) -> Result<Self, FieldError> {
                match s {
                    $($s => Ok($name::$variant),)+
                    _ => Err(FieldError::new(
                        $field,
                        "invalid",
                        format!("must be one of: {}", [$($s),+].join(", ")),
                    )),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

string_enum!(
    /// What a user may do on an account. Ordered: read < trade < manage.
    Permission, "permission" { Read = "read", Trade = "trade", Manage = "manage" }
);

string_enum!(
    /// A shared member's role. Ordered by power: viewer < trader < manager.
    MemberRole, "role" { Viewer = "viewer", Trader = "trader", Manager = "manager" }
);

string_enum!(
    /// `trading_accounts_status_check`; `deleted` is set only by a soft delete.
    AccountStatus, "status" { Active = "active", Inactive = "inactive", Deleted = "deleted" }
);

string_enum!(
    /// `trading_accounts_subscription_tier_check`.
    SubscriptionTier, "subscription_tier" {
        Free = "free", Basic = "basic", Pro = "pro", Premium = "premium", Enterprise = "enterprise"
    }
);

impl SubscriptionTier {
    /// What an account gets when nobody with the authority chose a tier.
    pub const DEFAULT: SubscriptionTier = SubscriptionTier::Free;
}

string_enum!(
    /// `trading_accounts_subscription_status_check`.
    SubscriptionStatus, "subscription_status" {
        Active = "active", Trialing = "trialing", PastDue = "past_due",
        Cancelled = "cancelled", Expired = "expired"
    }
);

impl MemberRole {
    /// viewer: read; trader: read + trade; manager: read + trade + manage.
    pub fn permissions(self) -> &'static [Permission] {
        match self {
            MemberRole::Viewer => &[Permission::Read],
            MemberRole::Trader => &[Permission::Read, Permission::Trade],
            MemberRole::Manager => &[Permission::Read, Permission::Trade, Permission::Manage],
        }
    }
}

/// A user's standing on one account: the owner, or a live member with a role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    Owner,
    Member(MemberRole),
}

impl Access {
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Owner => "owner",
            Access::Member(r) => r.as_str(),
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "owner" => Some(Access::Owner),
            other => MemberRole::parse(other).ok().map(Access::Member),
        }
    }

    pub fn permissions(self) -> &'static [Permission] {
        match self {
            Access::Owner => &[Permission::Read, Permission::Trade, Permission::Manage],
            Access::Member(r) => r.permissions(),
        }
    }

    pub fn allows(self, p: Permission) -> bool {
        self.permissions().contains(&p)
    }

    /// Whether this caller may hand `role` to someone (never above their own).
    pub fn may_grant(self, role: MemberRole) -> bool {
        match self {
            Access::Owner => true,
            Access::Member(own) => self.allows(Permission::Manage) && role <= own,
        }
    }

    /// The rule name an access decision reports, e.g. "membership:trader".
    pub fn rule(self) -> String {
        match self {
            Access::Owner => "owner".into(),
            Access::Member(r) => format!("membership:{}", r.as_str()),
        }
    }
}

/// The last four characters of a broker API key behind a mask: enough to tell two
/// keys apart, useless to an attacker. Short keys show only the mask.
pub fn credentials_hint(api_key: &str) -> String {
    let chars: Vec<char> = api_key.chars().collect();
    if chars.len() < 12 {
        return "••••".into();
    }
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("••••{tail}")
}

/// A trading account's public facts. Broker credentials are never part of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TradingAccount {
    pub id: Uuid,
    pub owner_user_id: Uuid,
    pub broker: String,
    pub broker_user_id: String,
    pub nickname: String,
    pub status: AccountStatus,
    pub subscription_tier: SubscriptionTier,
    pub subscription_status: SubscriptionStatus,
    pub subscription_expires_at: Option<DateTime<Utc>>,
    pub has_credentials: bool,
    pub credentials_updated_at: Option<DateTime<Utc>>,
    pub credentials_hint: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// An account together with what one user may do on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountAccess {
    pub account: TradingAccount,
    pub access: Access,
}

impl AccountAccess {
    pub fn permissions(&self) -> &'static [Permission] {
        self.access.permissions()
    }
}

/// A live member of an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub user_id: Uuid,
    pub email: String,
    pub role: MemberRole,
    pub added_at: DateTime<Utc>,
}

/// Decrypted broker credentials; only ever handed to a service client with
/// `credentials:read`. Debug never prints the values.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerCredentials {
    pub api_key: String,
    pub api_secret: String,
    pub access_token: Option<String>,
}

impl fmt::Debug for BrokerCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BrokerCredentials { .. }")
    }
}

/// A parsed create request.
#[derive(Debug, Clone)]
pub struct NewAccount {
    pub broker: Broker,
    pub broker_user_id: BrokerUserId,
    pub nickname: Nickname,
    /// `None`: the default tier. Only an administrator may choose one.
    pub subscription_tier: Option<SubscriptionTier>,
}

impl NewAccount {
    /// Every field's problem at once, so a client fixes them in one go.
    pub fn parse(
        broker: &str,
        broker_user_id: &str,
        nickname: Option<&str>,
        subscription_tier: Option<&str>,
    ) -> Result<Self, Vec<FieldError>> {
        let mut errors = Vec::new();
        let broker = Broker::parse(broker).map_err(|e| errors.push(e)).ok();
        let broker_user_id = BrokerUserId::parse(broker_user_id)
            .map_err(|e| errors.push(e))
            .ok();
        let nickname = Nickname::parse(nickname.unwrap_or(""))
            .map_err(|e| errors.push(e))
            .ok();
        let tier = subscription_tier
            .map(SubscriptionTier::parse)
            .transpose()
            .map_err(|e| errors.push(e))
            .ok()
            .flatten();
        match (broker, broker_user_id, nickname) {
            (Some(broker), Some(broker_user_id), Some(nickname)) if errors.is_empty() => Ok(Self {
                broker,
                broker_user_id,
                nickname,
                subscription_tier: tier,
            }),
            _ => Err(errors),
        }
    }
}

/// Collects a field's error and goes on, so every problem is reported at once.
fn keep<T>(errors: &mut Vec<FieldError>, r: Result<T, FieldError>) -> Option<T> {
    r.map_err(|e| errors.push(e)).ok()
}

/// A parsed PATCH: absent fields stay as they are.
#[derive(Debug, Clone, Default)]
pub struct AccountPatch {
    pub nickname: Option<Nickname>,
    /// `active` or `inactive`; `deleted` only comes from DELETE.
    pub status: Option<AccountStatus>,
    pub subscription_tier: Option<SubscriptionTier>,
    pub subscription_status: Option<SubscriptionStatus>,
    /// `Some(None)` clears the expiry.
    pub subscription_expires_at: Option<Option<DateTime<Utc>>>,
}

impl AccountPatch {
    pub fn parse(
        nickname: Option<&str>,
        status: Option<&str>,
        subscription_tier: Option<&str>,
        subscription_status: Option<&str>,
        subscription_expires_at: Option<Option<DateTime<Utc>>>,
    ) -> Result<Self, Vec<FieldError>> {
        let mut errors = Vec::new();
        let patch = AccountPatch {
            nickname: nickname.and_then(|n| keep(&mut errors, Nickname::parse(n))),
            status: status.and_then(|s| {
                let s = AccountStatus::parse(s).and_then(|s| match s {
                    AccountStatus::Deleted => Err(FieldError::new(
                        "status",
                        "invalid",
                        "must be active or inactive (DELETE removes an account)",
                    )),
                    other => Ok(other),
                });
                keep(&mut errors, s)
            }),
            subscription_tier: subscription_tier
                .and_then(|t| keep(&mut errors, SubscriptionTier::parse(t))),
            subscription_status: subscription_status
                .and_then(|t| keep(&mut errors, SubscriptionStatus::parse(t))),
            subscription_expires_at,
        };
        if errors.is_empty() {
            Ok(patch)
        } else {
            Err(errors)
        }
    }

    pub fn is_empty(&self) -> bool {
        self.changed_fields().is_empty()
    }

    /// Subscription terms are billing's business, not the account holder's.
    pub fn touches_subscription(&self) -> bool {
        self.subscription_tier.is_some()
            || self.subscription_status.is_some()
            || self.subscription_expires_at.is_some()
    }

    /// Names of the fields this patch sets, for the audit row.
    pub fn changed_fields(&self) -> Vec<&'static str> {
        [
            ("nickname", self.nickname.is_some()),
            ("status", self.status.is_some()),
            ("subscription_tier", self.subscription_tier.is_some()),
            ("subscription_status", self.subscription_status.is_some()),
            (
                "subscription_expires_at",
                self.subscription_expires_at.is_some(),
            ),
        ]
        .into_iter()
        .filter_map(|(f, set)| set.then_some(f))
        .collect()
    }
}

/// Who to add as a member: by id or by email (exactly one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberTarget {
    UserId(Uuid),
    /// Normalised as registration and login normalise it.
    Email(Email),
}

impl MemberTarget {
    pub fn parse(user_id: Option<Uuid>, email: Option<&str>) -> Result<Self, FieldError> {
        match (user_id, email) {
            (Some(id), None) => Ok(MemberTarget::UserId(id)),
            (None, Some(e)) => Email::parse(e)
                .map(MemberTarget::Email)
                .map_err(|why| FieldError::new("email", "invalid", why)),
            _ => Err(FieldError::new(
                "user_id",
                "required",
                "give exactly one of user_id or email",
            )),
        }
    }
}

impl BrokerCredentials {
    /// Each value non-empty, at most 4096 characters, no control characters. The
    /// messages never repeat the value.
    pub fn parse(
        api_key: &str,
        api_secret: &str,
        access_token: Option<&str>,
    ) -> Result<Self, Vec<FieldError>> {
        let check = |field: &'static str, v: &str| {
            if v.is_empty() || v.chars().count() > 4096 || v.chars().any(char::is_control) {
                Some(FieldError::new(
                    field,
                    "invalid",
                    "must be 1 to 4096 printable characters",
                ))
            } else {
                None
            }
        };
        let errors: Vec<FieldError> = [
            check("api_key", api_key),
            check("api_secret", api_secret),
            access_token.and_then(|t| check("access_token", t)),
        ]
        .into_iter()
        .flatten()
        .collect();
        if errors.is_empty() {
            Ok(Self {
                api_key: api_key.to_string(),
                api_secret: api_secret.to_string(),
                access_token: access_token.map(str::to_string),
            })
        } else {
            Err(errors)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_permission_map() {
        assert_eq!(MemberRole::Viewer.permissions(), &[Permission::Read]);
        assert_eq!(
            MemberRole::Trader.permissions(),
            &[Permission::Read, Permission::Trade]
        );
        assert!(Access::Member(MemberRole::Manager).allows(Permission::Manage));
        assert!(!Access::Member(MemberRole::Trader).allows(Permission::Manage));
        assert!(!Access::Member(MemberRole::Viewer).allows(Permission::Trade));
        assert!(Access::Owner.allows(Permission::Manage));
    }

    #[test]
    fn nobody_grants_above_their_own_role() {
        let mgr = Access::Member(MemberRole::Manager);
        assert!(mgr.may_grant(MemberRole::Manager));
        assert!(mgr.may_grant(MemberRole::Viewer));
        // Without manage, not even a viewer can be granted.
        assert!(!Access::Member(MemberRole::Trader).may_grant(MemberRole::Viewer));
        assert!(!Access::Member(MemberRole::Viewer).may_grant(MemberRole::Viewer));
        assert!(Access::Owner.may_grant(MemberRole::Manager));
    }

    #[test]
    fn broker_is_a_lowercase_identifier() {
        assert!(Broker::parse("zerodha").is_ok());
        assert!(Broker::parse("angel_one2").is_ok());
        for bad in ["Zerodha", "z", "1broker", "ze rodha", "", "zerodha!"] {
            assert!(Broker::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn enums_round_trip_their_database_values() {
        for t in SubscriptionTier::ALL {
            assert_eq!(SubscriptionTier::parse(t.as_str()).unwrap(), *t);
        }
        for s in SubscriptionStatus::ALL {
            assert_eq!(SubscriptionStatus::parse(s.as_str()).unwrap(), *s);
        }
        assert_eq!(Access::parse("owner"), Some(Access::Owner));
        assert_eq!(
            Access::parse("trader"),
            Some(Access::Member(MemberRole::Trader))
        );
        assert_eq!(Access::parse("admin"), None);
    }

    #[test]
    fn hint_shows_only_the_last_four() {
        assert_eq!(credentials_hint("kite-api-key-abcd"), "••••abcd");
        assert_eq!(credentials_hint("short"), "••••");
    }
}
