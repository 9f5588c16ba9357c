//! Which permission on a trading account each API-key scope needs: the one table
//! key creation, VerifyApiKey and the account routes share, so a key can never do
//! on an account more than its owner's access there allows.

use super::account::{Access, Permission};

/// Scope → the account permission it needs. Reading needs `read`; anything that
/// writes on the account (orders, alerts) needs `trade`, as a viewer never writes
/// (the `viewer_no_writes` policy says the same for the platform role); changing
/// the account itself needs `manage`.
const TABLE: &[(&str, Permission)] = &[
    ("accounts:read", Permission::Read),
    ("orders:read", Permission::Read),
    ("market_data:read", Permission::Read),
    ("alerts:read", Permission::Read),
    ("orders:write", Permission::Trade),
    ("alerts:write", Permission::Trade),
    ("accounts:write", Permission::Manage),
];

/// The permission `scope` needs on an account. A scope not in the table (a
/// catalog entry added later) needs `manage`: forgetting a row fails closed.
pub fn account_permission(scope: &str) -> Permission {
    TABLE
        .iter()
        .find(|(s, _)| *s == scope)
        .map_or(Permission::Manage, |(_, p)| *p)
}

/// The first of `scopes` that `access` does not cover, if any.
pub fn first_uncovered<S: AsRef<str>>(access: Access, scopes: &[S]) -> Option<&str> {
    scopes
        .iter()
        .map(AsRef::as_ref)
        .find(|s| !access.allows(account_permission(s)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::account::MemberRole;

    #[test]
    fn each_scope_needs_its_permission() {
        assert_eq!(account_permission("orders:write"), Permission::Trade);
        for s in ["accounts:read", "orders:read", "market_data:read"] {
            assert_eq!(account_permission(s), Permission::Read, "{s}");
        }
        assert_eq!(account_permission("accounts:write"), Permission::Manage);
        assert_eq!(account_permission("something:new"), Permission::Manage);
    }

    #[test]
    fn access_covers_scopes_by_role() {
        let viewer = Access::Member(MemberRole::Viewer);
        let trader = Access::Member(MemberRole::Trader);
        assert_eq!(
            first_uncovered(viewer, &["orders:read", "orders:write"]),
            Some("orders:write")
        );
        assert_eq!(first_uncovered(viewer, &["market_data:read"]), None);
        assert_eq!(first_uncovered(trader, &["orders:write"]), None);
        assert_eq!(
            first_uncovered(trader, &["accounts:write"]),
            Some("accounts:write")
        );
        assert_eq!(
            first_uncovered::<&str>(Access::Owner, &["accounts:write"]),
            None
        );
        assert_eq!(first_uncovered::<&str>(viewer, &[]), None);
    }
}
